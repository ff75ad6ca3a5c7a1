"""check() itself: probe failures, the caller's point of view, and rendering."""

from __future__ import annotations

import types
import warnings
from typing import Any

import pytest

from forksafe import ForkSafetyWarning, Hazard, Severity, _check
from forksafe._snapshot import Snapshot


def broken(snapshot: Snapshot) -> list[Hazard]:
    raise RuntimeError("probe exploded")


def fine(snapshot: Snapshot) -> list[Hazard]:
    return [Hazard("thread", Severity.WARNING, "s", "r", {})]


@pytest.fixture(autouse=True)
def _fresh_failures() -> None:
    _check._reported_failures.clear()


def test_failing_probe_is_reported_once_and_the_check_goes_on() -> None:
    """A probe bug becomes an info hazard each time and one warning per process."""
    probes = [("broken", broken), ("fine", fine)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = _check.check_with(probes=probes)
        second = _check.check_with(probes=probes)
    assert [h.kind for h in first.hazards] == ["probe-error", "thread"]
    assert first.hazards[0].severity is Severity.INFO
    assert "probe exploded" in first.hazards[0].summary
    assert len(second.hazards) == 2
    assert [str(w.message) for w in caught] == [
        _check.PROBE_FAILED.format(probe="broken", error="RuntimeError: probe exploded")
    ]
    assert caught[0].category is ForkSafetyWarning


def test_report_names_the_calling_thread() -> None:
    """The report records which thread would survive the fork."""
    report = _check.check_with(probes=[])
    assert report.thread == "MainThread"
    assert report.hazards == ()


def test_a_failing_fingerprint_means_a_fresh_check_not_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """If the fingerprint cannot be taken, fork_check() runs the probes and reuses nothing."""
    def broken(*args: object) -> None:
        raise TypeError("odd thread object")

    monkeypatch.setattr(_check, "_fingerprint", broken)
    monkeypatch.setattr(_check, "_last", None)
    first = _check.fork_check()
    second = _check.fork_check()
    assert first is not second
    assert first.hazards == second.hazards == _check.check_with(reuse=False).hazards
    assert not [h for h in first.hazards if h.kind == "probe-error"]


def test_a_frame_at_an_instruction_of_no_line_is_read_at_its_first_line() -> None:
    """Another thread's frame can have ``f_lineno`` None (at an instruction of no line; a
    storm of forking threads met it): its stack and its ``with`` blocks still read."""
    from forksafe import _frames

    def parked() -> None:
        with open(__file__):  # a with block, not at the first line
            pass

    frame: Any = types.SimpleNamespace(f_code=parked.__code__, f_lineno=None, f_back=None,
                                       f_locals={}, f_globals={})
    [site] = _frames.stack(frame)
    assert site.line == parked.__code__.co_firstlineno
    assert _frames.held_locks(frame) == []


def test_the_standard_library_is_where_sysconfig_says() -> None:
    """``forksafe._stdlib`` tells the two directories without loading the build
    variables; they are the ones ``sysconfig`` names."""
    import sysconfig

    from forksafe import _stdlib

    paths = sysconfig.get_paths()
    assert (paths["stdlib"], paths["platstdlib"]) == (_stdlib.STDLIB, _stdlib.PLATSTDLIB)
