"""The state directory: where children's crash files and hang markers live, by name.

A guarded child's crash file (written by ``faulthandler``, see ``forksafe._child``)
is a memory file its parent reads when it reaps it, unless someone outside the
parent may look for it: ``forksafe run`` or a hang monitor. Then it has a name,
``<child pid>.crash``, in this directory, next to ``<child pid>.hung``, the
marker a hang monitor leaves for a child it reported hung (its outcome, as JSON).

``forksafe run`` gives its tree a private directory (``FORKSAFE_STATE_DIR``) and
removes it at the end; otherwise it is one directory per user under a temp root,
used only when it is ours and no one else can write to it (``checked_prefix``).
Leftovers of processes that are gone are swept now and then (``sweep``).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
from typing import Any

from forksafe import _config
from forksafe._report import Outcome

SHM = "/dev/shm"
#: The most of a crash file that is read: a traceback of every thread, bounded.
MAX_CRASH_BYTES = 64 * 1024
#: What a process leaves here: crash file (and a spare not yet named for its child),
#: hang marker (and its temp file).
LEFTOVERS = ("crash", "spare", "hung", "hung.tmp")
#: Seconds after which a dead process's traceback or hang marker is no longer awaited.
STALE_AFTER = 600.0

_READ_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)


def state_dir(environ: dict[str, str] | os._Environ[str] | None = None) -> str:
    """Where crash files and hang markers live: per run, or one per user.

    Computed from ``os.environ`` only (no ``tempfile``, whose lock another thread
    may hold at fork time).
    """
    explicit = _config.state_dir_override(environ)
    if explicit:
        return explicit
    return os.path.join(fast_temp_root(environ), f"forksafe-{os.getuid()}")


def fast_temp_root(environ: dict[str, str] | os._Environ[str] | None = None) -> str:
    """``/dev/shm`` when it is usable, else ``$TMPDIR`` or ``/tmp``.

    Every guarded child creates its crash file, so creating it must be cheap:
    on a tmpfs it costs a few microseconds, on a journaling disk file system
    (ext4 here) about 0.4 ms - as much as the fork itself.
    """
    if os.path.isdir(SHM) and os.access(SHM, os.W_OK | os.X_OK):
        return SHM
    env = os.environ if environ is None else environ
    return env.get("TMPDIR") or "/tmp"


def checked_prefix() -> str | None:
    """``<state dir>/`` when it is a directory of our own that no one else may write to.

    In a shared temporary directory another user could otherwise plant it and
    read our tracebacks, or swap files under us. ``None``: crash files are off.
    """
    directory = state_dir()
    try:
        info = os.lstat(directory)
    except FileNotFoundError:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
        return None
    return os.path.join(directory, "")


def crash_path(child_pid: int, *, directory: str | None = None) -> str:
    """The file the child with ``child_pid`` writes its tracebacks into."""
    return os.path.join(directory or state_dir(), f"{child_pid}.crash")


def hung_path(child_pid: int, *, directory: str | None = None) -> str:
    """The marker a hang monitor leaves for a child it reported hung (JSON outcome)."""
    return os.path.join(directory or state_dir(), f"{child_pid}.hung")


def take_crash_text(pid: int, *, directory: str | None = None) -> str | None:
    """The child's crash file contents (bounded), removing the file; None if empty."""
    return take_crash_file(crash_path(pid, directory=directory))


def take_crash_file(path: str) -> str | None:
    """``take_crash_text`` by path.

    Read through the descriptor, not a file object: this runs for every reaped
    child, and the objects of ``open()`` are pages written in the parent while
    it still shares them with its children (copy-on-write).
    """
    try:
        fd = os.open(path, _READ_FLAGS)
    except OSError:
        return None
    try:
        data = os.read(fd, MAX_CRASH_BYTES)
    except OSError:
        data = b""
    finally:
        os.close(fd)
    try:  # noqa: SIM105 - contextlib.suppress is three Python calls on every reaped child
        os.unlink(path)
    except OSError:
        pass
    if not data:
        return None
    text = data.decode("utf-8", "replace").strip()
    return text or None


def write_hung_marker(pid: int, outcome: Outcome, *, directory: str) -> None:
    """Leave ``outcome`` for the parent of hung child ``pid`` (whole, or not at all)."""
    marker = hung_path(pid, directory=directory)
    try:
        with open(marker + ".tmp", "w", encoding="utf-8") as f:
            json.dump(outcome.to_dict(), f)
        os.replace(marker + ".tmp", marker)
    except OSError:
        pass


def take_hung_marker(pid: int, *, directory: str | None = None) -> Outcome | None:
    """The outcome a hang monitor recorded for ``pid``, removing the marker."""
    path = hung_path(pid, directory=directory)
    try:
        with open(path, encoding="utf-8") as f:
            data: Any = json.load(f)
    except (OSError, ValueError):
        return None
    with contextlib.suppress(OSError):
        os.unlink(path)
    return Outcome.from_dict(data) if isinstance(data, dict) else None


def sweep(directory: str | None = None, *, now: float | None = None) -> int:
    """Remove leftovers of processes that no longer exist; how many were removed.

    A child reaped through the guard's wait wrappers has its file removed at
    once; this catches the others (children that exec'd, or that were reaped by
    code the guard does not wrap). An empty crash file goes at once. A crash
    file with a traceback, or a hang marker, is evidence that its parent may
    still be about to read: it goes once it is ``STALE_AFTER`` seconds old, so
    that the state directory, in RAM on ``/dev/shm``, never grows without bound.
    (Under ``forksafe run`` the state directory is private and removed whole.)
    """
    removed = 0
    now = time.time() if now is None else now
    try:
        entries = list(os.scandir(directory or state_dir()))
    except OSError:
        return 0
    for entry in entries:
        name, _, ext = entry.name.partition(".")
        if ext == "spare":  # <parent pid>-<n>.spare: a crash file not yet named for its child
            name = name.partition("-")[0]
        if ext not in LEFTOVERS or not name.isdigit() or not _finished(name):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if (ext in ("crash", "spare") and info.st_size == 0) or (
                    now - info.st_mtime > STALE_AFTER):
                os.unlink(entry.path)
                removed += 1
        except OSError:
            continue
    return removed


def _finished(pid: str) -> bool:
    """True when process ``pid`` is gone or a zombie: it writes nothing any more."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[:1] in ([b"Z"], [b"X"])
    except OSError:
        return True
