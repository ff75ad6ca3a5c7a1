"""The report file: written whole or not at all, never through another user's link.

``forksafe run --report FILE`` writes the run report (docs/report-format.md) and
``forksafe explain --html -o OUT`` a page: a new or regular file atomically (a
temporary file in its directory, then a rename), a FIFO or device (``/dev/null``,
``/dev/stdout``, ``>(jq .)``) by writing into it as it is. ``check_writable``
refuses before COMMAND runs what cannot be written afterwards.

Apart from the run's reader (``forksafe._runreport``) so that checking ``--report``
before COMMAND starts costs no import of the report model.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

from forksafe._errors import UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

REPORT_UNWRITABLE = "forksafe run: cannot write the report {path!r}: {error}"


def write_report(report: dict[str, Any], path: str) -> None:
    """Write ``report`` to ``path``: a new or regular file whole or not at all (a temporary
    file in its directory, then a rename), anything else (a FIFO, ``/dev/null``, a
    terminal, ``/dev/stdout``) by writing to it directly. UsageError (one line) when it
    cannot be written; no temporary file is left behind then.

    Renaming over a FIFO or a device would replace it with a regular file (as root,
    ``--report /dev/null`` replaced ``/dev/null``), so those are written to as they
    are, which is also what ``--report >(jq .)`` needs. A symbolic link is followed
    only when it belongs to this user or root (``/dev/stdout``): one planted by
    another user in a shared directory is refused, as is a file of another user's.
    """
    import json

    write_file(path, (json.dumps(report, indent=2) + "\n").encode())


def write_file(path: str, data: bytes, *, message: str = REPORT_UNWRITABLE) -> None:
    """Write ``data`` to ``path`` as ``write_report`` does; ``message`` (with ``{path}``
    and ``{error}``) says why it could not be."""
    kind = _target(path, message)
    try:
        if kind == "direct":
            _write_direct(path, data)
        else:
            _write_atomic(path, data)
    except OSError as exc:
        raise UsageError(message.format(path=path, error=_reason(exc))) from exc


def check_writable(path: str, *, message: str = REPORT_UNWRITABLE) -> None:
    """Fail before running COMMAND, not after, when the report cannot be written."""
    kind = _target(path, message)
    if kind == "direct":
        if not os.access(path, os.W_OK):
            raise UsageError(message.format(path=path, error="it is not writable"))
        return
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        raise UsageError(message.format(
            path=path, error=f"directory {directory!r} does not exist or is not writable"))


def _target(path: str, message: str) -> str:
    """How ``path`` gets the report: "atomic" (missing, or a regular file of ours) or
    "direct" (an existing FIFO, device or the like); UsageError when neither may be."""
    def refuse(why: str) -> UsageError:
        return UsageError(message.format(path=path, error=why))

    me = os.getuid()
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return "atomic"
    except OSError as exc:
        raise refuse(_reason(exc)) from exc
    if stat.S_ISLNK(info.st_mode):
        if info.st_uid not in (me, 0):
            raise refuse(f"it is a symbolic link of uid {info.st_uid}'s, which is not followed")
        try:
            info = os.stat(path)
        except OSError as exc:
            raise refuse(f"it is a symbolic link to nothing usable ({_reason(exc)})") from exc
        if stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode):
            raise refuse("it is a symbolic link; give the path of the file itself")
    if stat.S_ISDIR(info.st_mode):
        raise refuse("it is a directory")
    if info.st_uid not in (me, 0):
        raise refuse(f"it belongs to uid {info.st_uid}, not to this user (uid {me})")
    if stat.S_ISSOCK(info.st_mode):
        raise refuse("it is a socket")
    return "atomic" if stat.S_ISREG(info.st_mode) else "direct"


def _write_atomic(path: str, data: bytes) -> None:
    """A temporary file next to ``path``, renamed over it; removed again on any failure."""
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=".forksafe-", dir=os.path.dirname(os.path.abspath(path)))
    try:
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_direct(path: str, data: bytes) -> None:
    """Write into an existing FIFO, device or terminal as it is (never replacing it).

    Opened without blocking, so that a FIFO nobody reads fails at once instead
    of keeping ``forksafe run`` from ending; then written blocking, so that a
    slow reader gets all of it.
    """
    flags = os.O_WRONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
    if not os.path.islink(path):
        flags |= getattr(os, "O_NOFOLLOW", 0)  # it was no link a moment ago: still none
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            raise OSError(exc.errno, "it is a FIFO that nobody reads") from None
        raise
    try:
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode) or info.st_uid not in (os.getuid(), 0):
            raise OSError(errno.EPERM, "it was replaced while the command ran")
        os.set_blocking(fd, True)
        _write_all(fd, data)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "it is a symbolic link, which is not followed"
    return exc.strerror or str(exc)
