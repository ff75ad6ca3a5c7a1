"""A run's report: the event file read as it grows, merged into forks with outcomes.

Every process of a ``forksafe run`` tree appends its fork and outcome events to
one JSON-lines file (``forksafe._sink``); ``EventTail`` reads the complete lines
as they arrive, and ``Merger`` joins each outcome to its fork with bounded memory
(``forksafe._reportfile`` writes the report, docs/report-format.md, whole or not at all).
``render_run`` turns a saved report back into the run's summary.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from typing import Any, Iterator, Sequence, overload

from forksafe._render.runs import shape
from forksafe._report import (
    CRASH_SIGNALS,
    SCHEMA,
    ForkEvent,
    Outcome,
    format_time,
    parse_time,
)
from forksafe._reportfile import REPORT_UNWRITABLE  # noqa: F401 - its old home, still read
from forksafe._statedir import crash_path, take_crash_text


class EventTail:
    """Reads the JSON-lines event file as it grows; complete lines only.

    A line is complete when its newline is there. At the final read, what is
    left without a newline is a torn write of a process that died: skipped, as
    is any line that is not a JSON object (counted in ``skipped``). The file is
    read a chunk at a time and its records handed on as they are parsed, so a
    tree that wrote a hundred megabytes between two polls costs a chunk of
    memory, not the backlog.
    """

    #: Bytes read at a time; a poll (not final) reads at most ``BURST`` of them.
    CHUNK = 1024 * 1024
    BURST = 8 * CHUNK
    #: A line longer than this is not one of ours: skipped, resynchronised at its end.
    MAX_LINE = 64 * 1024 * 1024

    def __init__(self, path: str) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""
        self._dropping = False  # inside an overlong line, skipping to its newline
        self.skipped = 0
        self.extra: list[dict[str, Any]] = []  # outcomes this process adds itself

    @property
    def position(self) -> int:
        """How much of the file has been read."""
        return self._offset

    def read(self, *, final: bool = False) -> Iterator[dict[str, Any]]:
        """New complete records since the last call, as they are parsed; at ``final``,
        everything up to the end, the torn last line given up on, and this process's
        own records (``extra``) after them."""
        for data in self._chunks(None if final else self.BURST):
            yield from self._lines(data)
        if final:
            if self._partial.strip() or self._dropping:
                self.skipped += 1
            self._partial, self._dropping = b"", False
            extra, self.extra = self.extra, []
            yield from extra

    def _chunks(self, budget: int | None) -> Iterator[bytes]:
        """What was appended since the last read, a chunk at a time (``budget`` bytes
        at most, when given); nothing while the file does not exist yet."""
        try:
            with open(self.path, "rb") as f:
                while budget is None or budget > 0:
                    f.seek(self._offset)
                    data = f.read(self.CHUNK)
                    if not data:
                        return
                    self._offset += len(data)
                    if budget is not None:
                        budget -= len(data)
                    yield data
        except OSError:
            return

    def _lines(self, data: bytes) -> Iterator[dict[str, Any]]:
        *lines, partial = (self._partial + data).split(b"\n")
        if self._dropping and lines:
            lines, self._dropping = lines[1:], False  # the end of the overlong line
        if self._dropping or len(partial) > self.MAX_LINE:
            if not self._dropping:
                self.skipped += 1
            partial, self._dropping = b"", True
        self._partial = partial
        for line in lines:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                self.skipped += 1
                continue
            if isinstance(record, dict):
                yield record
            else:
                self.skipped += 1


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
#: Processes remembered as having forked (their own fork entries stay apart, so that the
#: process tree can hang their children below them); past this many, they may fold.
MAX_PARENTS = 100_000


class Merger:
    """Fork records with their outcomes merged in, built as the events arrive.

    Outcomes join their fork by (parent_pid, child_pid). When a child has
    several (its parent reaped it after the hang monitor reported it), "hung"
    wins, then the latest. A child's own ``fork-pending`` record (see
    ``forksafe._outcome.announce_pending``) stands in only for a fork whose parent
    never wrote one: it hung with the child.

    Memory stays bounded. A server forks the same way from the same line
    millions of times, and each entry is a few kilobytes (its hazards): so once
    a child's uneventful outcome is known (it exited 0, or its parent stopped
    it), its entry folds into the first entry of the same parent, mechanism,
    site, action, hazards (numbers in their texts aside) and fate, which counts
    them (``count``, docs/report-format.md); only forks still running, and
    eventful ones, are kept one by one. Past ``MAX_FORKS`` entries the oldest
    uneventful ones are dropped and counted (``forks_omitted``).
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
        self._folds: dict[tuple[Any, ...], int] = {}  # fold key -> the entry that counts them
        self._parents: set[int] = set()  # processes that forked: never folded as children
        self._serial = 0
        self._retry_at = 0  # after an eviction that freed too little, wait for more growth

    def add(self, record: dict[str, Any]) -> None:
        kind = record.get("type", "fork")
        key = (record.get("parent_pid"), record.get("child_pid"))
        if not all(pid is None or type(pid) is int for pid in key):
            return  # not a record of ours (the file is readable by `forksafe explain` too)
        if kind == "outcome":
            if isinstance(record.get("outcome"), dict):
                self._outcome(key, record["outcome"])
            return
        if kind not in ("fork", "fork-pending"):
            return
        entry = {k: v for k, v in record.items() if k != "type"}
        if type(key[0]) is int and len(self._parents) < MAX_PARENTS:
            self._parents.add(key[0])
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
        if number not in self._pending and uneventful(outcome) and key[1] not in self._parents:
            self._fold(number, target)

    def _fold(self, number: int, entry: dict[str, Any]) -> None:
        """Count an uneventful fork in the first entry like it, instead of keeping it.

        Both leave the index: the child's story is told, and a later fork that
        gets the same pid again is a new entry.
        """
        fold = fold_key(entry)
        if fold is None:
            return
        key = (entry.get("parent_pid"), entry.get("child_pid"))
        if self._index.get(key) == number:
            del self._index[key]
        into = self._folds.setdefault(fold, number)
        if into == number:
            return  # the first of its kind: it counts the others
        counter = self._entries[into]
        counter["count"] = counter.get("count", 1) + entry.get("count", 1)
        del self._entries[number]
        self._seen.pop(number, None)

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
                if "count" in entry or "outcome" in entry:
                    fold = fold_key(entry)
                    if fold is not None and self._folds.get(fold) == number:
                        del self._folds[fold]
                self.omitted += entry.get("count", 1)
        # Whatever is left is evidence or still running: scan again only after the
        # next tenth has arrived, not on every new fork.
        self._retry_at = len(self._entries) + max(1, self.limit // 10)

    def _droppable(self, number: int, entry: dict[str, Any], now: float) -> bool:
        outcome = entry.get("outcome")
        if isinstance(outcome, dict):
            return uneventful(outcome) or (
                outcome.get("status") == "exited" and not outcome.get("diagnosis"))
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

    def stalled(self, parent_pid: int | None, child_pid: int | None,
                outcome: dict[str, Any]) -> None:
        """A child the hang monitor saw stalled, for no reason it could tell, and that
        nobody reaped afterwards: the stall is its outcome. A child reaped after the
        stall has its real outcome already (with the stall in it), which stays."""
        number = self._index.get((parent_pid, child_pid))
        if number is not None and "outcome" not in self._entries[number]:
            self._entries[number]["outcome"] = outcome

    def report(self, command: list[str], code: int, *, pid: int | None = None,
               started: float | None = None, duration: float | None = None
               ) -> dict[str, Any]:
        """The report, docs/report-format.md (``forks_omitted`` when entries were dropped;
        COMMAND's ``pid``, when it ``started`` and how long it ran, when known)."""
        forks = list(self._entries.values())
        by_child = [e for e in forks if e.get("child_pid") is not None]
        if self.state is not None:
            _orphan_crashes(by_child, self.state)
        for entry in by_child:
            # Reaped by code the guard does not wrap (subprocess), or still running when
            # COMMAND ended: what became of it is not known.
            entry.setdefault("outcome", Outcome("unknown").to_dict())
        report: dict[str, Any] = {"schema": SCHEMA, "command": command, "exit_code": code}
        report.update(run_facts(pid=pid, started=started, duration=duration))
        report["forks"] = forks
        if self.omitted:
            report["forks_omitted"] = self.omitted
        return report


def run_facts(*, pid: int | None = None, started: float | None = None,
              duration: float | None = None) -> dict[str, Any]:
    """The report's keys about COMMAND itself: its ``pid``, when it ``started`` (UTC, to
    the second, as fork times) and its ``duration`` in seconds; those that are known."""
    facts: dict[str, Any] = {}
    if pid is not None:
        facts["pid"] = pid
    if started is not None:
        facts["started"] = format_time(started)
    if duration is not None:
        facts["duration"] = round(duration, 3)
    return facts


def uneventful(outcome: dict[str, Any]) -> bool:
    """A child that exited 0, or that its parent stopped (SIGTERM, SIGKILL, ...), and
    left nothing to explain: one of many, whose entry may fold into a count."""
    if outcome.get("diagnosis") or outcome.get("traceback"):
        return False
    status = outcome.get("status")
    return (status == "exited" and outcome.get("exit_code") == 0) or (
        status == "signaled" and outcome.get("signal") not in CRASH_SIGNALS)


def fold_key(entry: dict[str, Any]) -> tuple[Any, ...] | None:
    """What an uneventful fork entry must share with another to be counted with it: the
    parent, mechanism, site, action, hazards (kind, severity, summary with the numbers
    that differ from fork to fork aside, as the summary groups them) and the child's
    fate. None: not foldable."""
    hazards, site, outcome = entry.get("hazards"), entry.get("site"), entry.get("outcome")
    if not isinstance(hazards, list) or not isinstance(outcome, dict) or not (
            site is None or isinstance(site, dict)):
        return None
    try:
        key = (entry.get("parent_pid"), entry.get("mechanism"), entry.get("action"),
               None if site is None else (site.get("file"), site.get("line"),
                                          site.get("function")),
               tuple((h.get("kind"), h.get("severity"), shape(str(h.get("summary"))))
                     for h in hazards),
               (outcome.get("status"), outcome.get("exit_code"), outcome.get("signal")))
        hash(key)
    except (AttributeError, TypeError):  # a hazard that is no object, an unhashable value
        return None
    return key


def _digits(text: str) -> str:
    return _DIGITS.sub("#", text)


_DIGITS = re.compile(r"\d+")


_FATAL = {
    "Segmentation fault": "SIGSEGV", "Bus error": "SIGBUS", "Illegal instruction": "SIGILL",
    "Floating-point exception": "SIGFPE", "Floating point exception": "SIGFPE",
    "Aborted": "SIGABRT",
}


def _orphan_crashes(entries: Any, state: str) -> None:
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
        from forksafe._diagnose import diagnose_death

        diagnosis = diagnose_death(event, name or "a fatal signal", text)
        entry["outcome"] = Outcome("signaled", None, name, text, diagnosis).to_dict()


class Runs(Sequence[ForkEvent]):
    """A run's fork events for the summary, in memory that grows with the kinds of
    fork, not their number: each distinct event once, with how many times it occurs.

    ``forksafe._render.runs.render_events`` takes a sequence of events and
    groups them itself; a report entry with ``count`` N stands for N forks, and a
    long run has hundreds of thousands. So events that the summary cannot tell
    apart - same mechanism, site, action, hazards and child's fate, numbers in
    texts aside (the same key the summary groups by, only finer) - are stored
    once and given back once per occurrence, gathered at the place of the first.
    The summary is the same text as for the events one by one: it shows only the
    first event of each group and of each fate within it, and counts the rest
    (tested against the plain list).
    """

    def __init__(self) -> None:
        self._runs: dict[tuple[Any, ...], list[Any]] = {}
        self._total = 0

    def add(self, event: ForkEvent, count: int = 1) -> None:
        key = summary_key(event)
        run = self._runs.get(key)
        if run is None:
            self._runs[key] = [event, count]
        else:
            run[1] += count
        self._total += count

    @property
    def distinct(self) -> int:
        return len(self._runs)

    def __len__(self) -> int:
        return self._total

    def __iter__(self) -> Iterator[ForkEvent]:
        for event, count in self._runs.values():
            for _ in range(count):
                yield event

    @overload
    def __getitem__(self, index: int) -> ForkEvent: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[ForkEvent]: ...

    def __getitem__(self, index: int | slice) -> ForkEvent | Sequence[ForkEvent]:
        if isinstance(index, slice):
            return list(self)[index]
        if index < 0:
            index += self._total
        if not 0 <= index < self._total:
            raise IndexError(index)
        for event, count in self._runs.values():
            if index < count:
                return event  # type: ignore[no-any-return]
            index -= count
        raise IndexError(index)  # pragma: no cover - the total says otherwise


def summary_key(event: ForkEvent) -> tuple[Any, ...]:
    """What the run summary tells events apart by (see ``Runs``)."""
    outcome = event.outcome
    fate = None if outcome is None else (
        outcome.status, outcome.exit_code, outcome.signal, _digits(outcome.diagnosis or ""))
    return (event.mechanism, event.site, event.action,
            tuple((h.kind, h.severity, shape(h.summary))
                  for h in event.report.sorted_hazards()), fate)


class Picture:
    """What a run's summary and its page are drawn from, gathered fork entry by fork
    entry: the events (``Runs``), the process tree and the timeline, each in memory
    that grows with the kinds of fork (the tree: with the entries, up to its bound)."""

    def __init__(self, *, command_pid: int | None = None, started: float | None = None,
                 duration: float | None = None) -> None:
        from forksafe._render.timeline import Timeline
        from forksafe._render.tree import Tree, kind_of

        self._kind_of = kind_of
        self.runs = Runs()
        self.tree = Tree(command_pid)
        self.timeline = Timeline(started, duration)

    def add(self, event: ForkEvent, count: int = 1, command: object = None) -> None:
        """One fork entry: ``count`` alike forks; ``command``, the forking process's."""
        kind = self._kind_of(event)
        self.runs.add(event, count)
        self.tree.add(event, count, command, kind)
        self.timeline.add(event, event.time, count, kind)

    def text(self, command: object, exit_code: object, omitted: int = 0) -> str:
        """The run's summary (``forksafe._render.runs``), the tree after the findings when
        it has more than one level."""
        from forksafe._render.runs import render_events

        tree = self.tree.lines() if self.tree.nested() else []
        return render_events(command, exit_code, self.runs, omitted, tree)

    def page(self, command: object, exit_code: object, omitted: int = 0,
             facts: dict[str, Any] | None = None) -> str:
        """The run as one HTML page (``forksafe._render.html``)."""
        from forksafe._render.html import run_page

        return run_page(command, exit_code, self.runs, tree=self.tree,
                        timeline=self.timeline, facts=facts or {}, omitted=omitted)


def picture_of(report: dict[str, Any]) -> Picture:
    """The picture of a saved run report (an entry's ``count`` as that many forks);
    entries that do not parse are skipped."""
    pid, duration = report.get("pid"), report.get("duration")
    picture = Picture(command_pid=pid if type(pid) is int else None,
                      started=started_of(report.get("started")),
                      duration=duration if isinstance(duration, (int, float)) else None)
    forks = report.get("forks", [])
    for data in forks if isinstance(forks, list) else []:
        try:
            count = data.get("count", 1)
            picture.add(ForkEvent.from_dict(data),
                        count if type(count) is int and count > 0 else 1,
                        data.get("process_command"))
        except (ValueError, TypeError, KeyError, AttributeError):
            continue
    return picture


def started_of(value: object) -> float | None:
    """A report's ``started`` as seconds since the epoch (None: absent or not a time)."""
    if not isinstance(value, str):
        return None
    try:
        return parse_time(value) or None
    except (ValueError, OverflowError):
        return None


def facts_of(report: dict[str, Any]) -> dict[str, Any]:
    """What the page says about the run itself, from a report's top-level keys."""
    facts: dict[str, Any] = {}
    command = report.get("command")
    if isinstance(command, list):
        facts["command"] = " ".join(str(part) for part in command)
    for key, label in (("exit_code", "exit code"), ("pid", "COMMAND's pid"),
                       ("started", "started (UTC)"), ("duration", "ran for (s)"),
                       ("forks_omitted", "forks not kept")):
        if report.get(key) is not None:
            facts[label] = report[key]
    return facts


def events_of(report: dict[str, Any]) -> Runs:
    """The fork events of a saved run report (an entry's ``count`` as that many forks);
    entries that do not parse are skipped."""
    return picture_of(report).runs


def render_run(report: dict[str, Any]) -> str:
    """Text for a whole ``forksafe run`` report (docs/report-format.md)."""
    omitted = report.get("forks_omitted")
    return picture_of(report).text(report.get("command"), report.get("exit_code"),
                                   omitted if isinstance(omitted, int) else 0)


def render_page(report: dict[str, Any]) -> str:
    """A whole ``forksafe run`` report as one HTML page."""
    omitted = report.get("forks_omitted")
    return picture_of(report).page(report.get("command"), report.get("exit_code"),
                                   omitted if isinstance(omitted, int) else 0,
                                   facts_of(report))
