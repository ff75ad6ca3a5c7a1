"""A test suite's forks, step by step: what each test forked, and what became of it.

The guard keeps each process's recent fork events (``forksafe._guard.history()``),
each with its hazards and, once the child is reaped, its outcome. A test runner's
plugin (``forksafe.pytest_plugin``) asks here at the end of every step — a test's
setup, call or teardown, the collection of a module — which forks the step made,
whose children's fate became known meanwhile (a pool's worker forked in one test
and reaped in another), and whether a child was found hung: a hang monitor ended
it, so the step's test must fail with the diagnosis rather than pass as if
nothing happened (``ForkLog``).

What a step made is JSON-ready, because it travels: pytest-xdist carries it on
the test's report from the worker that ran the test to the process that reports
the session, which gathers every step's forks (``SuiteForks``) for the summary
and the JSON report (the run report of docs/report-format.md, each fork entry
with the ``test`` and ``phase`` it was made in).

A step's uneventful forks (their children exited 0 or were stopped by a signal
that is no crash, with nothing diagnosed) fold into one entry with a ``count``,
as a run report folds them; a step forking 500 clean children is one entry.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Iterable, Mapping, NamedTuple, Sequence

from forksafe import _forkpath, _guard
from forksafe._report import CRASH_SIGNALS, SCHEMA, ForkEvent, Severity

if TYPE_CHECKING:
    from forksafe._attribution import RuntimeWatch

#: Children forked in an earlier step whose fate is still awaited, at most (the
#: oldest are given up: their entries keep no outcome, "unknown" in the report).
MAX_OPEN = 64
#: Fork entries a session keeps, at most; past it the oldest uneventful ones are
#: dropped and counted (``forks_omitted``), as ``forksafe run`` does.
MAX_ENTRIES = 20_000

EventKey = tuple[int, Any, float, str]


class Step(NamedTuple):
    """What one step forked and learnt, JSON-ready (see the module docstring)."""

    #: Forks the step made.
    forks: int
    #: Fork entries (``ForkEvent.to_dict()`` plus ``test``, ``phase``, perhaps ``count``).
    records: list[dict[str, Any]]
    #: Outcomes of children forked in earlier steps that became known during this one.
    outcomes: list[dict[str, Any]]
    #: The fork entries of children found hung during this step (each with its outcome).
    hung: list[dict[str, Any]]

    def payload(self) -> dict[str, Any] | None:
        """What travels on the step's test report; None when the step forked nothing and
        learnt nothing (the report is then left exactly as it was)."""
        if not self.forks and not self.records and not self.outcomes:
            return None
        return {"forks": self.forks, "records": self.records, "outcomes": self.outcomes}


class ForkLog:
    """This process's forks, taken step by step (``take``)."""

    def __init__(self, watch: RuntimeWatch | None = None) -> None:
        self.watch = watch
        events = _guard.history()
        self._mark: EventKey | None = _key(events[-1]) if events else None
        #: Child pid -> (test, phase) it was forked in, while its fate is awaited.
        self._open: dict[int, tuple[str, str]] = {}

    def pending(self) -> bool:
        """Whether ``take`` would find anything: a fork since the last one, or a child whose
        fate is awaited. Cheap (no copy of the history): most steps of most suites fork
        nothing, and this runs at the end of every one."""
        if self._open:
            return True
        _forkpath.flush_pending()
        history = _forkpath.own_state().history
        try:
            last = history[-1]
        except IndexError:
            return False
        return _key(last) != self._mark

    def take(self, test: str, phase: str) -> Step:
        """The forks made since the last ``take``, as forks of ``test``'s ``phase``; and
        the fate of earlier children, as learnt during it."""
        events = _guard.history()
        new = _since(events, self._mark)
        if events:
            self._mark = _key(events[-1])
        records: list[dict[str, Any]] = []
        hung: list[dict[str, Any]] = []
        folded: dict[tuple[Any, ...], dict[str, Any]] = {}
        outcomes = self._learnt(test, hung)
        for event in new:
            entry = self.entry(event, test, phase)
            outcome = event.outcome
            if outcome is None:
                if event.child_pid is not None:
                    self._await(event.child_pid, test, phase)
                records.append(entry)
                continue
            if outcome.status == "hung":
                hung.append(entry)
            if not uneventful(entry.get("outcome")):
                records.append(entry)
                continue
            key = _fold_key(entry)
            first = folded.get(key)
            if first is None:
                folded[key] = entry
                records.append(entry)
            else:
                first["count"] = first.get("count", 1) + 1
        return Step(len(new), records, outcomes, hung)

    def entry(self, event: ForkEvent, test: str, phase: str) -> dict[str, Any]:
        """``event`` as a fork entry of ``test``'s ``phase``, native hazards labelled."""
        entry = event.to_dict()
        entry["test"] = test
        entry["phase"] = phase
        if self.watch is not None:
            self.watch.annotate(entry["hazards"])
        return entry

    def _await(self, pid: int, test: str, phase: str) -> None:
        self._open.pop(pid, None)  # a recycled pid: the newer child
        self._open[pid] = (test, phase)
        while len(self._open) > MAX_OPEN:
            del self._open[next(iter(self._open))]

    def _learnt(self, test: str, hung: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Outcomes of awaited children that arrived since the last step."""
        found: list[dict[str, Any]] = []
        for pid, (forked_in, phase) in list(self._open.items()):
            event = _guard.event_for_child(pid)
            if event is not None and event.outcome is None:
                continue
            del self._open[pid]
            if event is None or event.outcome is None:
                continue  # forgotten by the guard's bounded record
            outcome = event.outcome.to_dict()
            found.append({"parent_pid": event.parent_pid, "child_pid": pid, "outcome": outcome,
                          "test": forked_in, "phase": phase, "found_in": test})
            if event.outcome.status == "hung":
                hung.append(self.entry(event, forked_in, phase))
        return found


def _key(event: ForkEvent) -> EventKey:
    """What tells an event apart, also after its outcome was attached (which replaces
    the event object in the history)."""
    return (event.parent_pid, event.child_pid, event.time, event.mechanism)


def _since(events: Sequence[ForkEvent], mark: EventKey | None) -> Sequence[ForkEvent]:
    """The events after the one ``mark`` names (all of them if it was pushed out of the
    bounded history, or was never there)."""
    if mark is None:
        return events
    for i in range(len(events) - 1, -1, -1):
        if _key(events[i]) == mark:
            return events[i + 1:]
    return events


def uneventful(outcome: object) -> bool:
    """A child that exited 0, or was stopped by a signal that means "stop", with nothing
    diagnosed: the fate a run report folds (docs/report-format.md, ``count``)."""
    if not isinstance(outcome, Mapping) or outcome.get("traceback") or outcome.get("diagnosis"):
        return False
    status = outcome.get("status")
    if status == "exited":
        return outcome.get("exit_code") == 0
    return status == "signaled" and outcome.get("signal") not in CRASH_SIGNALS


def noteworthy(outcome: object) -> bool:
    """A hang, a crash, a stall or anything diagnosed: what a summary shows."""
    if not isinstance(outcome, Mapping):
        return False
    return bool(outcome.get("status") in ("hung", "stalled") or outcome.get("diagnosis")
                or (outcome.get("status") == "signaled"
                    and outcome.get("signal") in CRASH_SIGNALS))


_NUMBER = re.compile(r"(?<!\.py:)(?<![\w.])\d+")


def _fold_key(entry: Mapping[str, Any]) -> tuple[Any, ...]:
    hazards = entry.get("hazards") or []
    outcome = entry.get("outcome") or {}
    return (entry.get("parent_pid"), entry.get("mechanism"), repr(entry.get("site")),
            entry.get("action"), entry.get("test"), entry.get("phase"),
            tuple((h.get("kind"), h.get("severity"), _NUMBER.sub("#", str(h.get("summary"))))
                  for h in hazards if isinstance(h, Mapping)),
            outcome.get("status"), outcome.get("exit_code"), outcome.get("signal"))


def unsafe(events: Iterable[ForkEvent], level: Severity) -> list[ForkEvent]:
    """The events with a hazard at ``level`` or above, or whose child hung or crashed."""
    found = []
    for event in events:
        worst = event.report.max_severity
        outcome = event.outcome
        if (worst is not None and worst >= level) or (
                outcome is not None and (outcome.status == "hung" or outcome.crashed)):
            found.append(event)
    return found


def events_since(mark: EventKey | None) -> Sequence[ForkEvent]:
    """This process's fork events after ``mark`` (``mark_now()``)."""
    return _since(_guard.history(), mark)


def mark_now() -> EventKey | None:
    """A mark of this process's fork record as it is now (for ``events_since``)."""
    events = _guard.history()
    return _key(events[-1]) if events else None


# -- the session's forks, gathered from every step of every process -------------------


class SuiteForks:
    """Every step's forks, as they arrive (from this process, or from xdist's workers)."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []
        self._children: dict[tuple[Any, Any], dict[str, Any]] = {}
        self.forks = 0
        self.omitted = 0
        #: Tests (node ids) that forked, in the order they were first seen.
        self.tests: dict[str, None] = {}

    def add(self, payload: object, test: str, *, is_test: bool = True) -> None:
        """A step's payload (``Step.payload()``) from a report of ``test`` (or, not
        ``is_test``, of a collection step or the session's end); anything malformed is
        skipped (it came through another process)."""
        if not isinstance(payload, Mapping):
            return
        forks = payload.get("forks")
        if isinstance(forks, int) and forks > 0:
            self.forks += forks
            if is_test:
                self.tests.setdefault(test, None)
        for entry in _dicts(payload.get("records")):
            key = (entry.get("parent_pid"), entry.get("child_pid"))
            if key[1] is not None:
                self._children[key] = entry
            self.entries.append(entry)
        for late in _dicts(payload.get("outcomes")):
            self._join(late)
        if len(self.entries) > MAX_ENTRIES:
            self._trim()

    def _join(self, late: Mapping[str, Any]) -> None:
        entry = self._children.get((late.get("parent_pid"), late.get("child_pid")))
        outcome = late.get("outcome")
        if entry is None or not isinstance(outcome, Mapping):
            return
        old = entry.get("outcome")
        if not (isinstance(old, Mapping) and old.get("status") == "hung"):  # hung wins
            entry["outcome"] = dict(outcome)

    def _trim(self) -> None:
        """Drop the oldest entries whose children met an uneventful fate (never a
        hazardous fork, a crash, a hang or a fork whose fate is unknown)."""
        excess = len(self.entries) - MAX_ENTRIES * 3 // 4
        kept: list[dict[str, Any]] = []
        for entry in self.entries:
            if excess > 0 and entry.get("action") == "allowed" and uneventful(
                    entry.get("outcome")):
                excess -= 1
                self.omitted += int(entry.get("count", 1))
                self._children.pop((entry.get("parent_pid"), entry.get("child_pid")), None)
                continue
            kept.append(entry)
        self.entries = kept

    def hazardous(self) -> list[dict[str, Any]]:
        """Entries of forks the policy logged, warned about or refused, or whose child's
        fate is noteworthy (a hang, a crash, a diagnosis)."""
        return [e for e in self.entries
                if e.get("action") != "allowed" or noteworthy(e.get("outcome"))]

    def events(self, entries: Iterable[Mapping[str, Any]]) -> list[tuple[ForkEvent, str, int]]:
        """Entries as (event, where, count) for the text layer, ``where`` the test (or the
        step that was no test); unreadable ones skipped."""
        out = []
        for entry in entries:
            try:
                event = ForkEvent.from_dict(entry)
            except (ValueError, TypeError):
                continue
            count = entry.get("count", 1)
            out.append((event, step_name(entry), count if isinstance(count, int) else 1))
        return out

    def report(self, command: list[str], exit_code: int) -> dict[str, Any]:
        """The run report (docs/report-format.md) of the session: every fork entry, with
        ``test`` and ``phase``; a child whose fate was never seen is ``unknown``."""
        forks = []
        for entry in self.entries:
            fork = dict(entry)
            if fork.get("child_pid") is not None and "outcome" not in fork:
                fork["outcome"] = {"status": "unknown", "exit_code": None, "signal": None,
                                   "traceback": None, "diagnosis": None}
            forks.append(fork)
        data: dict[str, Any] = {"schema": SCHEMA, "command": command, "exit_code": exit_code,
                                "forks": forks}
        if self.omitted:
            data["forks_omitted"] = self.omitted
        return data


def step_name(entry: Mapping[str, Any]) -> str:
    """The step a fork entry was made in, as people read it: the test's node id, or
    "collection of tests/test_a.py", or "the session's end"."""
    test, phase = str(entry.get("test") or ""), entry.get("phase")
    if phase == "collect":
        return f"collection of {test or '.'}"
    if phase == "session":
        return "the session's end"
    return test or "(outside any test)"


def _dicts(value: object) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []
