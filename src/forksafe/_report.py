"""The data model every other part of forksafe speaks: hazards, reports, fork events.

These are plain records. Probes create hazards, the check bundles them into a
``Report``, the guard wraps a report into a ``ForkEvent`` and the parent-side
follower attaches an ``Outcome``. Nothing here observes the process; it only
holds, renders and (de)serialises what was observed, so that a saved JSON report
can be rendered again by ``forksafe explain`` exactly as it was seen live.
"""

from __future__ import annotations

import enum
import os
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

#: The report format's name and version (docs/report-format.md).
SCHEMA = "forksafe-report/1"

#: Signals that mean a child crashed, as opposed to being stopped by someone
#: (SIGKILL, SIGTERM, SIGINT are how parents end children: ``Pool.terminate``).
CRASH_SIGNALS = frozenset({"SIGSEGV", "SIGBUS", "SIGILL", "SIGFPE", "SIGABRT", "SIGTRAP",
                           "SIGSYS"})


class Severity(enum.IntEnum):
    """How bad a hazard is; ordered so that ``max()`` gives the worst one.

    *error* is documented to crash or hang a forked child, *warning* may
    deadlock or corrupt, *info* is worth knowing only.
    """

    INFO = 10
    WARNING = 20
    ERROR = 30

    def __str__(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Severity:
        """Turn ``"warning"`` (any case) into ``Severity.WARNING``; ValueError otherwise."""
        try:
            return cls[text.strip().upper()]
        except KeyError:
            names = ", ".join(str(s) for s in cls)
            raise ValueError(f"unknown severity {text!r}; expected one of: {names}") from None


@dataclass(frozen=True)
class Hazard:
    """One thing that will break, or may break, a child forked now.

    ``summary`` is one line, ``remedy`` one or two lines a user can act on, and
    ``evidence`` holds JSON-ready details (thread names, library paths, source
    locations) so that a machine can group and compare hazards without parsing
    the prose.
    """

    kind: str
    severity: Severity
    summary: str
    remedy: str
    evidence: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "severity": str(self.severity),
            "summary": self.summary,
            "remedy": self.remedy,
            "evidence": dict(self.evidence),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Hazard:
        evidence = data.get("evidence", {})
        if not isinstance(evidence, Mapping):
            raise ValueError("hazard evidence must be an object")
        return cls(
            kind=_text(data, "kind"),
            severity=Severity.parse(_text(data, "severity")),
            summary=_text(data, "summary"),
            remedy=str(data.get("remedy", "")),
            evidence=dict(evidence),
        )


@dataclass(frozen=True)
class Report:
    """The hazards found if the calling thread forked at ``time``.

    ``thread`` names the thread that asked: the thread that would survive the
    fork. Everything else in the process is judged from its point of view.
    """

    hazards: tuple[Hazard, ...] = ()
    pid: int = field(default_factory=os.getpid)
    thread: str = "MainThread"
    time: float = field(default_factory=time.time)

    @property
    def max_severity(self) -> Severity | None:
        """The worst severity present, or ``None`` when there is no hazard at all."""
        return max((h.severity for h in self.hazards), default=None)

    @property
    def is_safe(self) -> bool:
        """True when nothing reaches warning level: info-only reports count as safe."""
        worst = self.max_severity
        return worst is None or worst < Severity.WARNING

    def at_least(self, severity: Severity) -> tuple[Hazard, ...]:
        """The hazards at or above ``severity``, worst first."""
        return tuple(h for h in self.sorted_hazards() if h.severity >= severity)

    def sorted_hazards(self) -> list[Hazard]:
        """Worst first; within a severity, grouped by kind, in probe order."""
        order = {kind: i for i, kind in reversed(list(enumerate(h.kind for h in self.hazards)))}
        return sorted(self.hazards, key=lambda h: (-h.severity, order[h.kind]))

    def __str__(self) -> str:
        from forksafe._render.hazards import render_report  # the text layer, when asked

        return render_report(self)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form: a fork entry of the report format without child data."""
        worst = self.max_severity
        return {
            "schema": SCHEMA,
            "parent_pid": self.pid,
            "thread": self.thread,
            "time": format_time(self.time),
            "max_severity": None if worst is None else str(worst),
            "hazards": [h.to_dict() for h in self.sorted_hazards()],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Report:
        hazards = data.get("hazards", [])
        if not isinstance(hazards, Sequence) or isinstance(hazards, str):
            raise ValueError("'hazards' must be a list")
        pid = data.get("pid", data.get("parent_pid", 0))
        return cls(
            hazards=tuple(Hazard.from_dict(_mapping(h, "hazard")) for h in hazards),
            pid=int(pid) if isinstance(pid, int) else 0,
            thread=str(data.get("thread", "")),
            time=parse_time(data.get("time")),
        )


@dataclass(frozen=True)
class Site:
    """Where, in the user's code, a fork or a thread start or a connection came from."""

    file: str
    line: int
    function: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line} in {self.function}"

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "function": self.function}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Site:
        line = data.get("line", 0)
        return cls(
            file=str(data.get("file", "?")),
            line=line if isinstance(line, int) else 0,
            function=str(data.get("function", "?")),
        )


@dataclass(frozen=True)
class Outcome:
    """What became of a forked child, as its parent saw it."""

    status: str  # exited | signaled | hung | stalled | unknown
    exit_code: int | None = None
    signal: str | None = None
    traceback: str | None = None
    diagnosis: str | None = None

    @property
    def crashed(self) -> bool:
        """Killed by a signal that means a crash, not by one that means "stop"."""
        return self.status == "signaled" and self.signal in CRASH_SIGNALS

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "traceback": self.traceback,
            "diagnosis": self.diagnosis,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Outcome:
        code = data.get("exit_code")
        return cls(
            status=str(data.get("status", "unknown")),
            exit_code=code if isinstance(code, int) else None,
            signal=_optional_text(data, "signal"),
            traceback=_optional_text(data, "traceback"),
            diagnosis=_optional_text(data, "diagnosis"),
        )


@dataclass(frozen=True)
class ForkEvent:
    """One fork seen by the guard: who forked, how, what was wrong, what was done."""

    parent_pid: int
    child_pid: int | None
    time: float
    mechanism: str
    site: Site | None
    action: str  # allowed | logged | warned | refused
    report: Report
    outcome: Outcome | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "parent_pid": self.parent_pid,
            "child_pid": self.child_pid,
            "time": format_time(self.time),
            "mechanism": self.mechanism,
            "site": None if self.site is None else self.site.to_dict(),
            "action": self.action,
            "thread": self.report.thread,
            "hazards": [h.to_dict() for h in self.report.sorted_hazards()],
        }
        if self.outcome is not None:
            data["outcome"] = self.outcome.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ForkEvent:
        site = data.get("site")
        outcome = data.get("outcome")
        child = data.get("child_pid")
        parent = data.get("parent_pid", 0)
        return cls(
            parent_pid=parent if isinstance(parent, int) else 0,
            child_pid=child if isinstance(child, int) else None,
            time=parse_time(data.get("time")),
            mechanism=str(data.get("mechanism", "unknown")),
            site=None if site is None else Site.from_dict(_mapping(site, "site")),
            action=str(data.get("action", "allowed")),
            report=Report.from_dict(data),
            outcome=None if outcome is None else Outcome.from_dict(_mapping(outcome, "outcome")),
        )


def format_time(stamp: float) -> str:
    """UTC, second precision, with a ``Z``: the form the report format uses."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))


def parse_time(value: object) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        import calendar

        try:
            return float(calendar.timegm(time.strptime(value, "%Y-%m-%dT%H:%M:%SZ")))
        except ValueError:
            raise ValueError(f"time {value!r} is not of the form 2026-11-25T10:00:00Z") from None
    return 0.0


def _mapping(value: object, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"each {what} must be an object")
    return value


def _text(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str):
        raise ValueError(f"missing or non-text {key!r}")
    return value


def _optional_text(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    return value if isinstance(value, str) else None
