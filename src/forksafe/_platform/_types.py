"""The records and the interface every platform backend shares.

Kept apart from the package's ``__init__`` (which picks the backend) so that the
backends import these without importing the package that imports them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class LoadedLibrary:
    """A native image mapped into the process.

    ``text`` holds the executable address ranges ``[start, end)`` so that a
    code address found on a thread's stack can be mapped back to its library.
    """

    path: str
    text: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class OSThread:
    """An OS-level thread of this process.

    ``tid`` is the id Python reports as ``threading.Thread.native_id``
    (the kernel tid on Linux, ``pthread_threadid_np`` on macOS), so that OS
    threads and Python threads can be matched. ``libraries`` lists the loaded
    libraries whose code is on the thread's stack, the outermost first, or is
    empty when the stack cannot be seen; ``owner`` is the library whose start
    routine runs the thread (the outermost one that is not libc/pthread
    plumbing), or ``None`` when unknown. ``named`` is false when the thread
    never set a name of its own and merely carries the process's name (Linux)
    or has none (macOS, where an unnamed GCD worker is named by the label of
    the dispatch queue it is serving, with libdispatch as its owner).
    """

    tid: int
    name: str
    state: str = "unknown"
    libraries: tuple[str, ...] = ()
    owner: str | None = None
    named: bool = True


class Platform(Protocol):
    """What the probes need from the operating system."""

    name: str

    def loaded_libraries(self) -> list[LoadedLibrary]:
        """Every native image currently mapped, main program included."""
        ...

    def threads(self, skip: frozenset[int], libraries: list[LoadedLibrary]) -> list[OSThread]:
        """Every OS thread except those whose tid is in ``skip``.

        ``libraries`` is the caller's fresh ``loaded_libraries()`` answer, used
        to attribute stack addresses without listing the images twice.
        """
        ...

    def call_flag(self, library: str, symbol: str) -> int | None:
        """Call ``int symbol(void)`` in ``library`` if it is already loaded.

        Never loads anything (``RTLD_NOLOAD``); ``None`` when the library is
        not loaded or lacks the symbol. Only for side-effect-free query
        functions such as libdispatch's ``_dispatch_is_multithreaded``.
        """
        ...

    def native_id(self, ident: int) -> int | None:
        """The OS thread id of the live thread whose ``threading.get_ident()`` is ``ident``.

        For threads started with ``_thread.start_new_thread``, which have no
        ``threading.Thread`` to say; None when it cannot be told safely.
        """
        ...
