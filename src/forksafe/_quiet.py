"""The one place forksafe calls the real ``fork()`` after it has already warned.

CPython 3.12+ emits its own ``DeprecationWarning`` ("This process (pid=...) is
multi-threaded, use of fork() may lead to deadlocks in the child.") from inside
``os.fork()``/``os.forkpty()``, attributed to the Python frame that called them.
When forksafe has just issued a ``ForkSafetyWarning`` (or refused) for the same
fork, that generic line adds nothing, and through our wrapper it would even
point at forksafe's own code instead of the user's.

Silencing it "for that call only" with ``warnings.catch_warnings()`` is not an
option: that swaps the process-wide filter list, and forks that CPython warns
about happen, by definition, while other threads run and may warn. Instead the
guard installs one ordinary filter, once, matching only warnings attributed to
*this module*, and routes exactly the forks it has reported through ``call``.
Every other fork, and every other warning, is untouched.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing is not imported at every interpreter start for this
if TYPE_CHECKING:
    from typing import Callable, TypeVar

    T = TypeVar("T")

#: The regular expressions of the filter the guard installs (see module docstring).
MESSAGE = r"This process \(pid=\d+\) is multi-threaded, use of \w+\(\) may lead to deadlocks"
MODULE = r"forksafe\._quiet\Z"


def call(function: Callable[[], T]) -> T:
    """``function()``, from a frame that CPython attributes to this module."""
    return function()


#: The filter ``install_filter`` put in place, while it is there.
_filter: object = None


def install_filter() -> None:
    """Install the one filter that drops CPython's warning for the forks ``call`` makes.

    Once, at the guard's first fork (``warnings`` is not imported before).
    """
    global _filter
    if _filter is not None:
        return
    import warnings

    warnings.filterwarnings("ignore", message=MESSAGE, category=DeprecationWarning,
                            module=MODULE)
    _filter = warnings.filters[0]


def remove_filter() -> None:
    """Take that filter out again (``uninstall()``), unless the program reset the filters."""
    global _filter
    if _filter is None:
        return
    import warnings

    filters: list[object] = warnings.filters  # type: ignore[assignment]
    try:
        filters.remove(_filter)
        warnings._filters_mutated()  # type: ignore[attr-defined]
    except ValueError:  # the program reset the filters itself
        pass
    _filter = None
