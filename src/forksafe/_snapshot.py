"""The facts several probes share, gathered once per check and only when asked.

A check runs several probes that look at the same process: the thread probe
and the native probe both need the Python threads, the native probe and the
SQLite probe both need the loaded libraries. ``Snapshot`` computes each fact on
first use and keeps it for the rest of the check, so a check costs what its
questions cost, once.
"""

from __future__ import annotations

import os
import sys
import threading
import types
from _thread import get_ident
from typing import Any, Callable, List, Optional

from forksafe import _forkaware
from forksafe._forkaware import Handler
from forksafe._platform import LoadedLibrary, OSThread, Platform

#: ``threading``'s tables of running and starting threads, bound once (the check reads
#: them on every fork too, ``forksafe._check``).
ACTIVE: dict[int, threading.Thread] = threading._active  # type: ignore[attr-defined]
LIMBO: dict[object, threading.Thread] = threading._limbo  # type: ignore[attr-defined]

#: Whether threads may be told apart by ``forksafe._speedups.thread_tokens`` (off: tests
#: of the Python way).
C_TOKENS = True
#: The thread attributes a thread's hazard shows (name, daemon flag, OS id): read into
#: its token.
TOKEN_KEYS = ("_name", "_daemonic", "_native_id")
#: The deepest stack a token is made for.
TOKEN_DEPTH = 64
#: Where forksafe's own code is, as its frames name their files: passed over at the top
#: of a thread's stack, as ``forksafe._frames.outside_forksafe`` does.
OWN = os.path.dirname(__file__) + os.sep
_DUMMY = threading._DummyThread
#: The C reader once looked up; False: there is none.
_token_reader: Any = None

Tokens = Optional[List[object]]


def read_tokens() -> Tokens:
    """A token for each Python thread but the caller, in ``threading``'s order: the same
    object while the thread stands where it stood when it was made (its object, name,
    daemon flag and OS id, its stack from its first frame outside forksafe). None: not
    every thread can have one (no C reader, a dummy thread, a stack deeper than
    TOKEN_DEPTH, a Python thread that ``threading`` does not list).

    Read in C (``forksafe._speedups.thread_tokens``), writing to no thread, frame or
    code object: in a fork storm every page written before a fork is copied after it.
    """
    global _token_reader
    read = _token_reader
    if read is None:
        try:
            from forksafe import _speedups

            read = _token_reader = getattr(_speedups, "thread_tokens", None) or False
        except ImportError:  # not built
            read = _token_reader = False
    if read is False or not C_TOKENS:
        return None
    tokens: Tokens = read(ACTIVE, get_ident(), _DUMMY, TOKEN_KEYS, TOKEN_DEPTH, OWN)
    return tokens


def same_tokens(tokens: list[object], again: Tokens) -> bool:
    """Whether ``again`` is the very same tokens: no thread moved in between."""
    return again is not None and len(again) == len(tokens) and \
        all(a is b for a, b in zip(again, tokens))


#: The libraries of the last check that knew its images version: (version, platform,
#: libraries). A fork storm's checks read the same list again and again.
_last_libraries: tuple[int, Platform, list[LoadedLibrary]] | None = None


class Snapshot:
    """One check's view of the process, from the calling thread's point of view."""

    def __init__(
        self,
        platform: Platform,
        current_frames: Callable[[], dict[int, types.FrameType]] = sys._current_frames,
    ) -> None:
        self.platform = platform
        self.caller = threading.current_thread()
        self._current_frames = current_frames
        self._frames: dict[int, types.FrameType] | None = None
        self._threads: list[threading.Thread] | None = None
        self._libraries: list[LoadedLibrary] | None = None
        self._os_threads: list[OSThread] | None = None
        self._raw: list[tuple[int, int | None]] | None = None
        self._handlers: list[Handler] | None = None
        self._handlers_version = 0
        self.claimed: set[int] = set()  # OS thread ids a runtime has accounted for
        # Told by the check when its fingerprint read them (``forksafe._check``): the
        # images version (glibc's load and unload counters; the libraries are those of
        # the last check with the same), and that every OS thread is a Python thread
        # (no native thread to list, no /proc/self/task to read).
        self.images: int | None = None
        self.python_only = False
        # Each other thread's token (``read_tokens``), when the check read them first.
        self.tokens: Tokens | bool = False  # False: not read yet
        # Set by a probe whose answer can change while the process looks the
        # same to ``forksafe._check``'s fingerprint (a lock taken or released, a
        # runtime's own flag, a connection opened): such a report is never reused.
        self.volatile = False

    @property
    def live_frames(self) -> bool:
        """The stacks are the interpreter's own, as they are now (not a table a test or
        the check's fingerprint handed in): a probe may read them some other way."""
        return self._current_frames is sys._current_frames

    def thread_tokens(self) -> Tokens:
        """``read_tokens()``, read once per check (None for stacks handed in)."""
        tokens = self.tokens
        if tokens is False:
            tokens = self.tokens = read_tokens() if self.live_frames else None
        return tokens  # type: ignore[return-value]

    @property
    def frames(self) -> dict[int, types.FrameType]:
        """Each *other* Python thread's current frame, by ident.

        The calling thread's own frame is left out: it is the frame reading
        this table, which refers to the snapshot, which refers to the table —
        a reference cycle that would keep the snapshot, and every thread
        object it looked at, alive until the next garbage collection. No probe
        looks at the caller's frames through this table.
        """
        if self._frames is None:
            frames = self._current_frames()
            frames.pop(get_ident(), None)
            self._frames = frames
        return self._frames

    def python_threads(self) -> list[threading.Thread]:
        """Live Python threads other than the caller (computed once per check).

        From ``threading``'s table of running threads, not ``enumerate()`` and
        ``is_alive()``: a thread is put there once it runs and taken out before it
        stops, so in it means alive (a thread still starting is not running yet, as
        ``is_alive()`` says). Every call and lock a fork storm's checks make per
        thread is pages written (forksafe._check). A dummy thread (a native thread
        that ran Python code) stays in the table after its thread ended: it alone
        is asked.
        """
        found = self._threads
        if found is None:
            me = self.caller.ident
            dummy = threading._DummyThread
            found = self._threads = [
                t for ident, t in list(ACTIVE.items())
                if ident != me and (not isinstance(t, dummy) or t.is_alive())]
        return found

    def raw_threads(self) -> list[tuple[int, int | None]]:
        """Python threads without a ``threading.Thread``: (ident, OS thread id or None).

        ``_thread.start_new_thread`` starts a thread that runs Python code (its
        frames are in ``sys._current_frames()``) but that ``threading`` never
        hears of. It is a Python thread like any other, not an unknown native one.
        """
        if self._raw is None:
            known = set(ACTIVE)
            known.update(t.ident for t in list(LIMBO.values()) if t.ident is not None)
            self._raw = [(ident, self.platform.native_id(ident))
                         for ident in sorted(self.frames) if ident not in known]
        return self._raw

    @property
    def libraries(self) -> list[LoadedLibrary]:
        if self._libraries is None:
            global _last_libraries
            images = self.images
            last = _last_libraries
            if images is not None and last is not None and last[0] == images and \
                    last[1] is self.platform:
                self._libraries = last[2]  # nothing loaded or unloaded since
            else:
                self._libraries = self.platform.loaded_libraries()
                if images is not None:
                    _last_libraries = (images, self.platform, self._libraries)
        return self._libraries

    @property
    def os_threads(self) -> list[OSThread]:
        """OS threads that no regular Python thread accounts for.

        Threads that merely run Python callbacks for native code (threading's
        dummy threads) are kept: their owner is a native runtime.
        """
        if self._os_threads is None and self.python_only:
            self._os_threads = []
        if self._os_threads is None:
            skip = {threading.get_native_id()}
            for t in threading.enumerate():
                if t.native_id is not None and not isinstance(t, threading._DummyThread):
                    skip.add(t.native_id)
            skip.update(tid for _, tid in self.raw_threads() if tid is not None)
            self._os_threads = self.platform.threads(frozenset(skip), self.libraries)
        return self._os_threads

    def fork_handlers_of(self, thread: threading.Thread) -> list[Handler]:
        """The registered fork handlers that belong to ``thread``'s code (``_forkaware``)."""
        return _forkaware.handled_by(_forkaware.thread_owners(thread), self._fork_handlers())

    def fork_handlers_version(self) -> int:
        """Changes when the registered fork handlers may have: a thread's hazard made
        with the same version found the same handlers."""
        self._fork_handlers()
        return self._handlers_version

    def _fork_handlers(self) -> list[Handler]:
        if self._handlers is None:
            self._handlers, self._handlers_version = _forkaware.versioned(
                _forkaware.GUARD_HOOKS)
        return self._handlers

    def dummy_native_ids(self) -> set[int]:
        dummy = threading._DummyThread
        return {
            t.native_id
            for t in list(ACTIVE.values())
            if isinstance(t, dummy) and t.native_id is not None
        }
