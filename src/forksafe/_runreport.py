"""A run's report: the event file read as it grows, merged into forks with outcomes.

Every process of a ``forksafe run`` tree appends its fork and outcome events to
one JSON-lines file (``forksafe._sink``); ``EventTail`` reads the complete lines
as they arrive, ``Merger`` joins each outcome to its fork with bounded memory, and
``write_report`` writes the report (docs/report-format.md) whole or not at all.
``render_run`` turns a saved report back into the run's summary.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import tempfile
import time
from typing import Any

from forksafe._errors import UsageError
from forksafe._report import CRASH_SIGNALS, SCHEMA, ForkEvent, Outcome
from forksafe._statedir import crash_path, take_crash_text

REPORT_UNWRITABLE = "forksafe run: cannot write the report {path!r}: {error}"


class EventTail:
    """Reads the JSON-lines event file as it grows; complete lines only.

    A line is complete when its newline is there. At the final read, what is
    left without a newline is a torn write of a process that died: skipped, as
    is any line that is not a JSON object (counted in ``skipped``).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""
        self.skipped = 0
        self.extra: list[dict[str, Any]] = []  # outcomes this process adds itself

    def read(self, *, final: bool = False) -> list[dict[str, Any]]:
        """New complete records since the last call; at ``final``, also the torn last
        line is given up on, and this process's own records (``extra``) follow."""
        new: list[dict[str, Any]] = []
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            data = b""
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                self.skipped += 1
                continue
            if isinstance(record, dict):
                new.append(record)
            else:
                self.skipped += 1
        if final and self._partial.strip():
            self.skipped += 1
            self._partial = b""
        if final:
            new.extend(self.extra)
            self.extra = []
        return new


def merge(command: list[str], code: int, records: list[dict[str, Any]],
          *, state: str | None = None) -> dict[str, Any]:
    """The report (docs/report-format.md) from a list of event records (see ``Merger``)."""
    merger = Merger(state=state)
    for record in records:
        merger.add(record)
    return merger.report(command, code)


#: Fork entries a run keeps in memory and in its report. A server run for days may
#: fork millions of times; past this many, entries whose child simply exited (or was
#: stopped by its parent) are dropped, oldest first, and counted in ``forks_omitted``.
#: Entries with a crash, a hang or a diagnosis are always kept.
MAX_FORKS = 20_000
#: Seconds after which a fork whose child is gone without a recorded outcome may be dropped.
UNSEEN_AFTER = 30.0


class Merger:
    """Fork records with their outcomes merged in, built as the events arrive.

    Outcomes join their fork by (parent_pid, child_pid). When a child has
    several (its parent reaped it after the hang monitor reported it), "hung"
    wins, then the latest. A child's own ``fork-pending`` record (see
    ``forksafe._outcome.announce_pending``) stands in only for a fork whose parent
    never wrote one: it hung with the child. Memory stays bounded (``MAX_FORKS``).
    """

    def __init__(self, *, state: str | None = None, limit: int = MAX_FORKS,
                 clock: Any = time.monotonic) -> None:
        self.state = state
        self.limit = limit
        self.omitted = 0
        self._clock = clock
        self._entries: dict[int, dict[str, Any]] = {}  # by arrival number: report order
        self._index: dict[tuple[Any, Any], int] = {}  # (parent, child) -> its latest entry
        self._pending: set[int] = set()  # entries made from a child's own record
        self._seen: dict[int, float] = {}
        self._early: dict[tuple[Any, Any], dict[str, Any]] = {}  # outcomes before their fork
        self._serial = 0
        self._retry_at = 0  # after an eviction that freed too little, wait for more growth

    def add(self, record: dict[str, Any]) -> None:
        kind = record.get("type", "fork")
        key = (record.get("parent_pid"), record.get("child_pid"))
        if kind == "outcome":
            if isinstance(record.get("outcome"), dict):
                self._outcome(key, record["outcome"])
            return
        if kind not in ("fork", "fork-pending"):
            return
        entry = {k: v for k, v in record.items() if k != "type"}
        if "command" in entry:
            entry["process_command"] = entry.pop("command")
        known = self._index.get(key) if record.get("child_pid") is not None else None
        if known is not None and (kind == "fork-pending") != (known in self._pending):
            if kind == "fork-pending":
                return  # the parent's record is there already
            old = self._entries[known]  # the parent's record replaces the child's own
            self._pending.discard(known)
            if "outcome" in old:
                entry["outcome"] = old["outcome"]
            old.clear()
            old.update(entry)
            return
        # A new fork (also a pid the same parent got again, long after).
        self._serial += 1
        number = self._serial
        self._entries[number] = entry
        self._seen[number] = self._clock()
        if kind == "fork-pending":
            self._pending.add(number)
        if record.get("child_pid") is not None:
            self._index[key] = number
            early = self._early.pop(key, None)
            if early is not None:
                self._outcome(key, early)
        if len(self._entries) > max(self.limit, self._retry_at):
            self._evict()

    def _outcome(self, key: tuple[Any, Any], outcome: dict[str, Any]) -> None:
        number = self._index.get(key)
        if number is None:
            if len(self._early) < 1000:
                self._early[key] = outcome
            return
        target = self._entries[number]
        old = target.get("outcome")
        if isinstance(old, dict) and old.get("status") == "hung" and \
                outcome.get("status") != "hung":
            return
        target["outcome"] = outcome

    def _evict(self) -> None:
        """Drop the oldest uneventful entries until a tenth of the room is free again."""
        goal = self.limit - max(1, self.limit // 10)
        now = self._clock()
        for number in list(self._entries):
            if len(self._entries) <= goal:
                break
            entry = self._entries[number]
            if self._droppable(number, entry, now):
                del self._entries[number]
                self._seen.pop(number, None)
                self._pending.discard(number)
                key = (entry.get("parent_pid"), entry.get("child_pid"))
                if self._index.get(key) == number:
                    del self._index[key]
                self.omitted += 1
        # Whatever is left is evidence or still running: scan again only after the
        # next tenth has arrived, not on every new fork.
        self._retry_at = len(self._entries) + max(1, self.limit // 10)

    def _droppable(self, number: int, entry: dict[str, Any], now: float) -> bool:
        outcome = entry.get("outcome")
        if isinstance(outcome, dict):
            status = outcome.get("status")
            return not outcome.get("diagnosis") and (status == "exited" or (
                status == "signaled" and outcome.get("signal") not in CRASH_SIGNALS))
        # No outcome (reaped by code the guard does not wrap): droppable once the
        # child is long gone and left no crash file behind. A refused fork has no
        # child at all: its record is the evidence, kept.
        pid = entry.get("child_pid")
        if not isinstance(pid, int) or now - self._seen.get(number, now) < UNSEEN_AFTER or \
                os.path.exists(f"/proc/{pid}"):
            return False
        if self.state is not None:
            with contextlib.suppress(OSError):
                if os.path.getsize(crash_path(pid, directory=self.state)) > 0:
                    return False
        return True

    def report(self, command: list[str], code: int) -> dict[str, Any]:
        """The report, docs/report-format.md (``forks_omitted`` when entries were dropped)."""
        forks = list(self._entries.values())
        by_child = [e for e in forks if e.get("child_pid") is not None]
        if self.state is not None:
            _orphan_crashes(by_child, self.state)
        for entry in by_child:
            # Reaped by code the guard does not wrap (subprocess), or still running when
            # COMMAND ended: what became of it is not known.
            entry.setdefault("outcome", Outcome("unknown").to_dict())
        report: dict[str, Any] = {"schema": SCHEMA, "command": command, "exit_code": code,
                                  "forks": forks}
        if self.omitted:
            report["forks_omitted"] = self.omitted
        return report


_FATAL = {
    "Segmentation fault": "SIGSEGV", "Bus error": "SIGBUS", "Illegal instruction": "SIGILL",
    "Floating-point exception": "SIGFPE", "Floating point exception": "SIGFPE",
    "Aborted": "SIGABRT",
}


def _orphan_crashes(entries: Any, state: str) -> None:
    from forksafe._diagnose import diagnose_death

    for entry in entries:
        if entry.get("outcome") is not None:
            continue
        pid = entry.get("child_pid")
        text = take_crash_text(pid, directory=state) if isinstance(pid, int) else None
        if not text:
            continue
        name = next((sig for words, sig in _FATAL.items()
                     if f"Fatal Python error: {words}" in text), None)
        try:
            event = ForkEvent.from_dict(entry)
        except (ValueError, TypeError):
            continue
        diagnosis = diagnose_death(event, name or "a fatal signal", text)
        entry["outcome"] = Outcome("signaled", None, name, text, diagnosis).to_dict()


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
    data = (json.dumps(report, indent=2) + "\n").encode()
    kind = _target(path)
    try:
        if kind == "direct":
            _write_direct(path, data)
        else:
            _write_atomic(path, data)
    except OSError as exc:
        raise UsageError(REPORT_UNWRITABLE.format(path=path, error=_reason(exc))) from exc


def check_writable(path: str) -> None:
    """Fail before running COMMAND, not after, when the report cannot be written."""
    kind = _target(path)
    if kind == "direct":
        if not os.access(path, os.W_OK):
            raise UsageError(REPORT_UNWRITABLE.format(path=path, error="it is not writable"))
        return
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        raise UsageError(REPORT_UNWRITABLE.format(
            path=path, error=f"directory {directory!r} does not exist or is not writable"))


def _target(path: str) -> str:
    """How ``path`` gets the report: "atomic" (missing, or a regular file of ours) or
    "direct" (an existing FIFO, device or the like); UsageError when neither may be."""
    def refuse(why: str) -> UsageError:
        return UsageError(REPORT_UNWRITABLE.format(path=path, error=why))

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


def events_of(report: dict[str, Any]) -> list[ForkEvent]:
    """The fork events of a saved run report; entries that do not parse are skipped."""
    forks = report.get("forks", [])
    events = []
    for data in forks if isinstance(forks, list) else []:
        try:
            events.append(ForkEvent.from_dict(data))
        except (ValueError, TypeError, KeyError, AttributeError):
            continue
    return events


def render_run(report: dict[str, Any]) -> str:
    """Text for a whole ``forksafe run`` report (docs/report-format.md)."""
    from forksafe._render.runs import render_events

    omitted = report.get("forks_omitted")
    return render_events(report.get("command"), report.get("exit_code"), events_of(report),
                         omitted if isinstance(omitted, int) else 0)
