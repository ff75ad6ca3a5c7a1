"""The seam between the guard and the child followers, as types mypy checks.

The guard (``forksafe._forkpath``, ``forksafe._record``) loads the followers at
the first fork and calls them through ``ChildSide`` (``forksafe._child``: arming
the child) and ``FollowerSide`` (``forksafe._outcome``: what became of it). It
hands the follower a ``GuardLink`` at that moment (``FollowerSide.attach``):
everything a follower may ask of the guard goes through it, and nothing else —
no follower looks the guard's module up or reads its private names.

A module fits a protocol when it has the functions with these signatures; mypy
checks that where the guard binds the modules. Nothing here runs: the module is
imported for type checking only.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol, Tuple

from forksafe._config import Config
from forksafe._report import ForkEvent, Outcome

#: A crash file: descriptor, device and inode (None when not known), path ("" for a
#: memory file); for a spare (``forksafe._child.open_spare``) also the pid that
#: opened it and its directory prefix.
CrashFile = Tuple[int, Optional[int], Optional[int], str, int, str]


class GuardLink(Protocol):
    """What a follower may ask of the guard that loaded it (``forksafe._forkpath.Link``)."""

    def config(self) -> Config | None:
        """The active configuration, or None when the guard is off."""
        ...

    def event_for_child(self, pid: int) -> ForkEvent | None:
        """The event of the fork that created child ``pid`` (queued forks recorded first)."""
        ...

    def attach_outcome(self, pid: int, outcome: Outcome) -> None:
        """Attach ``outcome`` to child ``pid``'s event; append it to the report file.

        Does not record queued forks first: it is called while they are recorded.
        """
        ...

    def flush(self) -> None:
        """Record the queued forks and reaps now."""
        ...

    def emit(self, record: dict[str, Any]) -> None:
        """Append ``record`` to the report file, if there is one."""
        ...

    def report_path(self) -> str | None:
        """The report file's path, if there is one."""
        ...


class ChildSide(Protocol):
    """``forksafe._child``, as the guard uses it around a fork."""

    def prepare(self, hang_timeout: float | None = None) -> None: ...

    def warm_up(self) -> None: ...

    def open_spare(self, hang_timeout: float | None, pid: int | None = None
                   ) -> CrashFile | None: ...

    def release_spare(self, crash: CrashFile) -> None: ...

    def adopt_spare(self, crash: CrashFile, child_pid: int) -> None: ...

    def memory_armer(self, crash: CrashFile) -> tuple[Callable[[], object], ...] | None: ...

    def arm(self, parent_pid: int, hang_timeout: float | None,
            spare: CrashFile | None = None) -> None: ...

    def close_memory_files(self) -> None: ...

    def armed(self) -> CrashFile | None: ...


class FollowerSide(Protocol):
    """``forksafe._outcome``, as the guard uses it: told of forks and reaps."""

    SWEEP_EVERY: int

    def attach(self, link: GuardLink) -> None: ...

    def on_forked(self, event: ForkEvent, hang_timeout: float | None) -> None: ...

    def on_reaped(self, pid: int, status: int, *, event: ForkEvent | None = None) -> None: ...

    def before_fork(self, timeout: float) -> None: ...

    def tidy_at_exit(self) -> None: ...

    def announce_pending(self, event: ForkEvent) -> None: ...
