"""The report model: severities, grouping, text, and the JSON round trip."""

from __future__ import annotations

import json

import pytest

from forksafe import ForkEvent, Hazard, Outcome, Report, Severity, Site


def hazard(
    kind: str = "thread", severity: Severity = Severity.WARNING, **evidence: object
) -> Hazard:
    return Hazard(kind, severity, f"{kind} summary", f"{kind} remedy", dict(evidence))


def test_severity_orders_and_parses() -> None:
    """Severities compare by badness and parse case-insensitively."""
    assert Severity.INFO < Severity.WARNING < Severity.ERROR
    assert Severity.parse("Warning") is Severity.WARNING
    assert str(Severity.ERROR) == "error"
    with pytest.raises(ValueError, match="expected one of: info, warning, error"):
        Severity.parse("fatal")


def test_empty_report_is_safe() -> None:
    """No hazards: no worst severity, safe, and the text says so."""
    report = Report()
    assert report.max_severity is None
    assert report.is_safe
    assert "no hazards found" in str(report)


def test_info_only_report_is_safe_but_warning_is_not() -> None:
    """Info is worth knowing, not dangerous; a warning makes the report unsafe."""
    assert Report((hazard(severity=Severity.INFO),)).is_safe
    unsafe = Report((hazard(severity=Severity.INFO), hazard(severity=Severity.WARNING)))
    assert not unsafe.is_safe
    assert unsafe.max_severity is Severity.WARNING


def test_sorted_hazards_put_the_worst_first() -> None:
    """Errors before warnings before info; kinds keep probe order within a level."""
    hazards = (
        hazard("thread", Severity.WARNING), hazard("native-runtime", Severity.ERROR),
        hazard("sqlite-connection", Severity.WARNING), hazard("native-runtime", Severity.INFO),
    )
    kinds = [(h.kind, h.severity) for h in Report(hazards).sorted_hazards()]
    assert kinds == [("native-runtime", Severity.ERROR), ("thread", Severity.WARNING),
                     ("sqlite-connection", Severity.WARNING), ("native-runtime", Severity.INFO)]


def test_text_groups_identical_threads_with_a_count() -> None:
    """A pool of identical workers reads as one finding with the others named."""
    same = {"started_at": [{"file": "app.py", "line": 3, "function": "main"}],
            "current": [{"file": "q.py", "line": 9, "function": "get"}], "state": "idle"}
    hazards = tuple(hazard(name=f"w{i}", **same) for i in range(8))
    text = str(Report(hazards))
    assert text.count("WARNING thread") == 1
    assert "and 7 more like it: 'w1', 'w2'" in text
    assert "8 warnings" in text


def test_to_dict_is_json_and_round_trips() -> None:
    """to_dict() is JSON-ready and from_dict() gives the same hazards back."""
    report = Report((hazard(severity=Severity.ERROR, path="/lib/x.so"),), pid=42, thread="T")
    data = json.loads(json.dumps(report.to_dict()))
    assert data["schema"] == "forksafe-report/1"
    assert data["parent_pid"] == 42
    assert data["max_severity"] == "error"
    assert data["hazards"][0] == {"kind": "thread", "severity": "error",
                                  "summary": "thread summary",
                                  "remedy": "thread remedy", "evidence": {"path": "/lib/x.so"}}
    again = Report.from_dict(data)
    assert again.hazards == report.hazards
    assert again.pid == 42


def test_fork_event_round_trips_with_outcome() -> None:
    """A fork event keeps its site, action and outcome through JSON."""
    event = ForkEvent(100, 101, 1_700_000_000.0, "os.fork", Site("app.py", 12, "main"), "warned",
                      Report((hazard(),), pid=100),
                      Outcome("signaled", signal="SIGSEGV", diagnosis="gRPC was active"))
    data = json.loads(json.dumps(event.to_dict()))
    assert data["time"] == "2023-11-14T22:13:20Z"
    assert data["outcome"]["signal"] == "SIGSEGV"
    again = ForkEvent.from_dict(data)
    assert again.site == event.site
    assert again.outcome == event.outcome
    assert again.report.hazards == event.report.hazards


@pytest.mark.parametrize("bad", [
    {"hazards": "nope"},
    {"hazards": [{"kind": "thread"}]},
    {"hazards": [{"kind": "thread", "severity": "fatal", "summary": "x"}]},
    {"hazards": [], "time": "yesterday"},
])
def test_from_dict_rejects_corrupt_data(bad: dict[str, object]) -> None:
    """Corrupt reports raise ValueError (the CLI turns that into one line)."""
    with pytest.raises(ValueError):
        Report.from_dict(bad)
