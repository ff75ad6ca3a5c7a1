"""The state directory: where children's crash files and hang markers live, by name.

A guarded child's crash file (written by ``faulthandler``, see ``forksafe._child``)
is a memory file its parent reads when it reaps it, unless someone outside the
parent may look for it: ``forksafe run`` or a hang monitor. Then it has a name,
``<child pid>.crash``, in this directory, next to ``<child pid>.hung``, the
marker a hang monitor leaves for a child it reported hung (its outcome, as JSON).

``forksafe run`` gives its tree a private directory (``FORKSAFE_STATE_DIR``) and
removes it at the end; otherwise it is one directory per user under a temp root.
Either is used only when it is ours and no one else can write to it
(``checked_prefix``), else a private one made for the process; every file in it is
created new, never through a link (``create``). Leftovers of processes that are
gone are swept now and then (``sweep``).
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
LEFTOVERS = ("crash", "spare", "hung", "hung.tmp", "stall", "stall.tmp")
#: Seconds after which a dead process's traceback or hang marker is no longer awaited.
STALE_AFTER = 600.0

_READ_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)


def state_dir(environ: dict[str, str] | os._Environ[str] | None = None) -> str:
    """The shared state directory: per run, or one per user. Whether it may be used is
    ``checked_prefix``'s decision; everything that writes or reads there goes by that.

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


#: Said once per process when the shared state directory cannot be trusted.
NOT_OURS = ("forksafe: not using the state directory {path!r}: it {why}; crash files and "
            "hang markers of this process go to the private directory {private!r} instead")
NO_PLACE = ("forksafe: not using the state directory {path!r}: it {why}, and no private "
            "directory could be made ({error}); children of this process are not followed "
            "by name (no crash file for forksafe run, no hang diagnosis)")

#: This process's decision: (pid, ``<directory>/`` or None). A forked child decides anew
#: (``forksafe._child.prepare`` calls ``checked_prefix`` once per process).
_decided: tuple[int, str | None] | None = None
#: The private directory fallen back to, by this process or the one it was forked from
#: (a forked child keeps using it), and the pid that made it (it removes it at exit).
_private: tuple[int, str] | None = None
#: Whether this process (or the one it was forked from) said why it fell back.
_warned = False


def checked_prefix() -> str | None:
    """``<directory>/`` for this process's crash files and hang markers; None: none at all.

    The shared directory (``state_dir``) is used only when it is ours: a real
    directory, not a symbolic link, owned by this user, open to nobody else,
    in a parent where nobody else can swap it (sticky, or writable by its owner
    only). It is checked with ``lstat``, created with mode 0700 when missing, and
    checked again after creating it (another user may have won the race).
    Otherwise another local user could have planted it (say, 0777 and full of
    symbolic links named after our future children's pids), to have our files
    written through the links, read our tracebacks, or silently turn crash
    capture and hang detection off. Then a private directory is made instead
    (random name, mode 0700), said once on stderr; a process forked from this
    one inherits it. Decided once per process (``forksafe._child.prepare``):
    never on the fork path.
    """
    global _decided
    directory = state_dir()
    why = _untrusted(directory, create=True)
    prefix = os.path.join(directory, "") if why is None else _fall_back(directory, why)
    _decided = (os.getpid(), prefix)
    return prefix


def current() -> str | None:
    """``<directory>/`` as this process decided (deciding now if it has not): where the
    hang helper, the reaping parent and the sweep look."""
    decided = _decided
    if decided is not None and decided[0] == os.getpid():
        return decided[1]
    return checked_prefix()


def _untrusted(directory: str, *, create: bool) -> str | None:
    """Why ``directory`` must not hold our files (a phrase after "it"); None when it is ours."""
    try:
        info = os.lstat(directory)
    except FileNotFoundError:
        if not create:
            return "does not exist"
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass  # someone made it meanwhile: judged below like any other
        except OSError as exc:
            return f"cannot be created ({exc.strerror or exc})"
        return _untrusted(directory, create=False)
    except OSError as exc:
        return f"cannot be examined ({exc.strerror or exc})"
    if stat.S_ISLNK(info.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(info.st_mode):
        return "is not a directory"
    uid = os.getuid()
    if info.st_uid != uid:
        return f"belongs to uid {info.st_uid}, not to this user (uid {uid})"
    if info.st_mode & 0o077:
        return f"is open to other users (mode {stat.S_IMODE(info.st_mode):o}, not 700)"
    try:
        parent = os.stat(os.path.dirname(os.path.abspath(directory)))
    except OSError as exc:
        return f"lies in a directory that cannot be examined ({exc.strerror or exc})"
    if parent.st_uid not in (0, uid) or (
            parent.st_mode & 0o022 and not parent.st_mode & stat.S_ISVTX):
        return "lies in a directory where others may rename or replace it"
    return None


def _fall_back(shared: str, why: str) -> str | None:
    """A private directory of ours instead of ``shared``; said once per process."""
    global _private, _warned
    private = _private
    if private is not None and _untrusted(private[1], create=False) is None:
        return os.path.join(private[1], "")  # made by this process or the one it forked from
    error = "no temporary directory"
    made = None
    roots = dict.fromkeys((fast_temp_root(), os.environ.get("TMPDIR") or "/tmp", "/tmp"))
    for root in roots:
        for _ in range(4):
            path = os.path.join(root, f"forksafe-{os.getuid()}-{os.urandom(6).hex()}")
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                continue
            except OSError as exc:
                error = exc.strerror or str(exc)
                break
            if _untrusted(path, create=False) is None:
                made = path
                break
            error = f"{path} {_untrusted(path, create=False)}"
        if made is not None:
            break
    if not _warned:
        _warned = True
        from forksafe._errors import write_fd2  # no lock: this may run in a forked child

        write_fd2(NOT_OURS.format(path=shared, why=why, private=made) if made else
                  NO_PLACE.format(path=shared, why=why, error=error))
    if made is None:
        return None
    _private = (os.getpid(), made)
    import atexit

    atexit.register(_remove_private)
    return os.path.join(made, "")


def _remove_private() -> None:
    """At exit of the process that made the private directory: its leftovers of
    finished processes go (``sweep``), then the directory if that left it empty. A
    child still running keeps it (and its files) until the next sweep of its own."""
    private = _private
    if private is None or private[0] != os.getpid():
        return  # a forked child exiting through atexit: the directory is its parent's
    with contextlib.suppress(OSError):
        sweep(private[1], now=time.time() + STALE_AFTER)
        os.rmdir(private[1])


def crash_path(child_pid: int, *, directory: str | None = None) -> str:
    """The file the child with ``child_pid`` writes its tracebacks into."""
    return os.path.join(directory or current() or state_dir(), f"{child_pid}.crash")


def hung_path(child_pid: int, *, directory: str | None = None) -> str:
    """The marker a hang monitor leaves for a child it reported hung (JSON outcome)."""
    return _beside(f"{child_pid}.hung", directory)


def _beside(name: str, directory: str | None) -> str:
    """``name`` in ``directory``, else in the state directory as this process checked it."""
    return os.path.join(directory or current() or state_dir(), name)


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


#: How a file is made in the state directory: never through a link, never over a file
#: that is there already (a leftover is removed first: the directory is ours alone).
CREATE_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
                | getattr(os, "O_NOFOLLOW", 0))
#: The most of a hang marker that is read (an outcome with its traceback, bounded).
MAX_MARKER_BYTES = 1024 * 1024


def create(path: str, flags: int = CREATE_FLAGS) -> int:
    """A new file at ``path`` (mode 0600), opened with ``flags`` (which hold ``O_EXCL``
    and ``O_NOFOLLOW``); a leftover of the same name, or a link, is removed and the file
    made anew, once. OSError when that fails too."""
    try:
        return os.open(path, flags, 0o600)
    except FileExistsError:
        os.unlink(path)  # removes a link itself, never its target
        return os.open(path, flags, 0o600)


def write_hung_marker(pid: int, outcome: Outcome, *, directory: str) -> None:
    """Leave ``outcome`` for the parent of hung child ``pid`` (whole, or not at all)."""
    write_marker(hung_path(pid, directory=directory), outcome)


def stall_path(child_pid: int, *, directory: str | None = None) -> str:
    """The note a hang monitor keeps on a child stalled for no reason it can tell
    (``forksafe._stall``): gone when the child moves on, read if it dies stalled."""
    return _beside(f"{child_pid}.stall", directory)


def write_marker(marker: str, outcome: Outcome) -> None:
    """Write ``outcome`` as JSON to ``marker``, whole or not at all: to a new temporary
    file (``O_EXCL``, no link followed), then renamed within its directory."""
    data = json.dumps(outcome.to_dict()).encode()
    try:
        fd = create(marker + ".tmp")
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(marker + ".tmp", marker)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(marker + ".tmp")


def remove_marker(marker: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(marker)


def take_hung_marker(pid: int, *, directory: str | None = None) -> Outcome | None:
    """The outcome a hang monitor recorded for ``pid``, removing the marker. Only a
    regular file of this user's, reached without following a link, counts."""
    return take_marker(hung_path(pid, directory=directory))


def take_stall_marker(pid: int, *, directory: str | None = None) -> Outcome | None:
    """The stall a hang monitor noted for ``pid`` (``stall_path``), removing the note."""
    return take_marker(stall_path(pid, directory=directory))


def take_marker(path: str) -> Outcome | None:
    """The outcome in marker ``path``, removing it (see ``take_hung_marker``)."""
    try:
        fd = os.open(path, _READ_FLAGS)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            return None
        raw = os.read(fd, MAX_MARKER_BYTES)
    except OSError:
        return None
    finally:
        os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(path)
    try:
        data: Any = json.loads(raw)
    except ValueError:
        return None
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
    if directory is None:
        directory = current()
        if directory is None:
            return 0
    try:
        entries = list(os.scandir(directory))
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
