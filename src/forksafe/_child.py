"""The little that runs in a forked child right after a guarded fork.

Work in progress: the interface is firm (the guard calls ``arm``), the body grows.
"""

from __future__ import annotations

import os


def crash_path(child_pid: int, *, directory: str | None = None) -> str:
    """Where the child with ``child_pid`` writes its fatal-signal traceback."""
    base = directory if directory is not None else os.environ.get("TMPDIR") or "/tmp"
    return os.path.join(base, f"forksafe-{os.getuid()}-crash-{child_pid}.txt")


def arm(parent_pid: int, hang_timeout: float | None) -> None:
    """Prepare this freshly forked child so that its death or hang can be explained."""
    import faulthandler

    fd = os.open(crash_path(os.getpid()), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    faulthandler.enable(file=fd, all_threads=True)
