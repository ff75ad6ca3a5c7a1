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

The descriptor is opened with ``O_CLOEXEC``: a program that ``exec``s gets its
own descriptor from the environment hook, not a stray inherited one.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

SINK_UNWRITABLE = (
    "forksafe: cannot write fork events to {path!r} ({error}); events are not recorded "
    "there. Point {source} at a writable file."
)


class Sink:
    """An open report file. ``write`` never raises: a full disk must not stop a fork."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        self.fd: int | None = os.open(self.path, flags, 0o644)
        self.failed = False

    def write(self, record: dict[str, Any]) -> bool:
        """Append ``record`` as one line; False if it could not be written."""
        fd = self.fd
        if fd is None:
            return False
        data = (json.dumps(record, default=str, separators=(",", ":")) + "\n").encode()
        try:
            written = os.write(fd, data)
            # A regular file only writes short on a full disk or a signal; the rest
            # then follows in a second write (the line may be cut, never garbled
            # within another process's line, because every write is O_APPEND).
            while 0 < written < len(data):
                data = data[written:]
                written = os.write(fd, data)
        except OSError:
            self.failed = True
            return False
        return True

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
