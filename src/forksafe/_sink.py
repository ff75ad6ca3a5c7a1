"""The JSON-lines event file: one line per fork event, appended by every process.

``forksafe run`` points a whole process tree at one file (``FORKSAFE_REPORT``).
Parents, children and grandchildren append to it at the same time, and any of
them may die at any moment, so the file is written the way ``O_APPEND`` was
made for: each record is encoded first, then handed to the kernel in one
``os.write`` on a descriptor opened with ``O_APPEND``. The kernel moves to the
end of the file and writes under the file's lock in one step, so lines from
different processes never interleave, and a process killed mid-record loses
at most its own line. No Python lock is taken, so a child forked while another
thread of the parent was writing can write too.

The file is opened for each record and closed right after, rather than held
open: a guarded program's descriptor table stays exactly as it would be without
forksafe (CPython's own test suite checks which descriptors are open, and so do
servers that close "all other" descriptors), and nothing is inherited by a
child or leaked by ``uninstall()``. An ``open``/``close`` pair costs a few
microseconds, next to a fork's hundreds.
"""

from __future__ import annotations

import errno
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

SINK_UNWRITABLE = (
    "forksafe: cannot write fork events to {path!r} ({error}); events are not recorded "
    "there. Point {source} at a writable file."
)


class Sink:
    """The report file. ``write`` never raises: a full disk must not stop a fork.

    The path often comes from the environment and names a shared place (``/tmp``),
    where another local user may have put something first: a symbolic link to a
    file of the victim's (which we would append to), or a file or FIFO of their own
    (which would receive our events: command lines, paths, thread names). So the
    file is opened without following a link (``O_NOFOLLOW``), created 0600, and
    checked once, when the sink is made, to belong to this user (or to root, who
    can read it anyway: ``/dev/null``). ``O_NONBLOCK``: a FIFO that nobody reads
    fails at once instead of blocking the program at every fork.
    """

    FLAGS = (os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
             | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))

    def __init__(self, path: str) -> None:
        """Check now that ``path`` can be opened for appending, and is ours (OSError if
        not, whose ``strerror`` says why in words)."""
        self.path = os.path.abspath(path)
        try:
            fd = os.open(self.path, self.FLAGS, 0o600)
        except OSError as exc:
            raise OSError(exc.errno, _why(exc)) from None
        try:
            owner = os.fstat(fd).st_uid
        finally:
            os.close(fd)
        if owner not in (os.getuid(), 0):
            raise OSError(errno.EPERM, NOT_OURS.format(uid=owner, me=os.getuid()))

    def write(self, record: dict[str, Any]) -> bool:
        """Append ``record`` as one line; False if it could not be written."""
        return self.write_all([record])

    def write_all(self, records: list[dict[str, Any]]) -> bool:
        """Append each of ``records`` as a line, in one open and write (the guard's
        batch of forks: three system calls per batch, not per fork); False if they
        could not be written."""
        import json  # here: the environment hook must not import it at every start

        dumps = json.dumps
        data = "".join([dumps(record, default=str, separators=(",", ":")) + "\n"
                        for record in records]).encode()
        try:
            fd = os.open(self.path, self.FLAGS, 0o600)
        except OSError:
            return False
        try:
            written = os.write(fd, data)
            # A regular file only writes short on a full disk or a signal; the rest
            # then follows in a second write (a line may be cut, never garbled
            # within another process's line, because every write is O_APPEND).
            while 0 < written < len(data):
                data = data[written:]
                written = os.write(fd, data)
        except OSError:
            return False
        finally:
            os.close(fd)
        return True

    def close(self) -> None:
        """Nothing is held open; kept so that callers need not know."""


#: Why a report file is refused when another user owns it.
NOT_OURS = ("it belongs to uid {uid}, not to this user (uid {me}); forksafe never writes "
            "its events into another user's file")


def _why(exc: OSError) -> str:
    """The words for a failed open, where the system's own would puzzle."""
    if exc.errno == errno.ELOOP:
        return "it is a symbolic link, which forksafe does not follow"
    if exc.errno == errno.ENXIO:
        return "it is a FIFO that nobody reads"
    return exc.strerror or str(exc)


def unusable(path: str, source: str) -> str | None:
    """Why the report file ``path`` (named by ``source``) cannot be written, as the one
    line to say; None when it can."""
    try:
        Sink(path)
    except OSError as exc:
        return SINK_UNWRITABLE.format(path=path, error=exc.strerror or exc, source=source)
    return None
