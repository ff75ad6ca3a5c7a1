"""A test suite's forks in words: the session's summary, and a test failed by a hung child.

The summary reads like pytest-timeout's and pytest-cov's sections: one headline
(how many forks, in how many tests, how many hazardous), then the tests that made
hazardous forks, then each finding once — a fork site with what it met and what
became of its children — however many tests went through it. Hazards that differ
only in numbers (pids, thread ids) are one finding; the tests of a finding are
listed, a few by name.
"""

from __future__ import annotations

import re
from typing import Any, Protocol, Sequence

from forksafe._render.hazards import DURING, render_hazards, wrap
from forksafe._render.shapes import EventLike, HazardLike, OutcomeLike
from forksafe._render.sites import site_text, where

#: The severity (``forksafe._report.Severity``) from which a hazard makes a fork hazardous.
WARNING = 20
#: Tests named on one line before "and N more".
TESTS_SHOWN = 4
#: Tests listed under the headline, at most.
TESTS_LISTED = 10
#: Lines of a child's stacks shown in a failure (the JSON report keeps all of them).
TRACEBACK_LINES = 30

#: The first line (pytest's short summary shows its start: the cause comes first).
HUNG = "forksafe: child {pid} hung{cause}; ended after {timeout} ({forked})"
CAUSE = ": {who} at its fork"
ENDED = (
    "forksafe ended the child when it had made no progress for the hang timeout, so that "
    "the session goes on; this test fails because of it (docs/pytest.md)."
)
FORKED_HERE = "forked at {site}"
FORKED_EARLIER = "forked at {site} during {test}"
#: Frames of the test runner itself in a child's stacks, folded into one line.
RUNNER_FRAMES = ("/_pytest/", "/pluggy/", "/xdist/", "/execnet/")
MET = "At that fork ({action}), the child inherited:"
MET_NOTHING = "At that fork forksafe found nothing at warning level or above."
STACKS = "The child's stacks, read from outside before it was ended:"
LATER = "forksafe: children of earlier tests, whose fate was learnt during this test:"


class TestForkLike(Protocol):
    """A fork of a test, as the session keeps it."""

    @property
    def event(self) -> EventLike: ...
    @property
    def test(self) -> str: ...
    @property
    def count(self) -> int: ...


def plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n} {word if n == 1 else (many or word + 's')}"


def tests_phrase(tests: Sequence[str]) -> str:
    """``"tests/a.py::t1, tests/a.py::t2 and 3 more tests"``."""
    if len(tests) <= TESTS_SHOWN:
        return ", ".join(tests)
    rest = len(tests) - TESTS_SHOWN + 1
    return f"{', '.join(tests[:TESTS_SHOWN - 1])} and {plural(rest, 'more test')}"


def summary(forks: Sequence[tuple[EventLike, str, int]], *, settings: str, total: int,
            tests: int, omitted: int = 0) -> list[str]:
    """The session's section: ``forks`` are the hazardous or troubled ones (event, test,
    count), ``total`` all forks of the session, made in ``tests`` tests."""
    head = f"forksafe ({settings}): "
    if not total:
        return [head + "no test forked"]
    head += f"{plural(total, 'fork')} in {plural(tests, 'test')}"
    if omitted:
        head += f" ({omitted} uneventful ones not kept)"
    hazardous = [(e, t, n) for e, t, n in forks if e.action != "allowed"]
    fates = _fates([(e, n) for e, _, n in forks])
    if not hazardous and not fates:
        return [head + ", none hazardous"]
    by_test: dict[str, list[tuple[EventLike, int]]] = {}
    for event, test, count in forks:
        by_test.setdefault(test, []).append((event, count))
    n_hazardous = sum(n for _, _, n in hazardous)
    head += (f"; {plural(n_hazardous, 'hazardous fork')} in "
             f"{plural(len({t for _, t, _ in hazardous}), 'test')}")
    if fates:
        head += f"; {fates}"
    lines = [head]
    for test, events in list(by_test.items())[:TESTS_LISTED]:
        made = sum(n for e, n in events if e.action != "allowed")
        parts = [plural(made, "hazardous fork")] if made else []
        fate = _fates(events)
        if fate:
            parts.append(fate)
        lines.append(f"  {test}: {', '.join(parts)}")
    if len(by_test) > TESTS_LISTED:
        lines.append(f"  ... and {plural(len(by_test) - TESTS_LISTED, 'more test')}")
    for group in _findings(forks):
        lines.append("")
        lines.extend(_finding(group))
    return lines


def _findings(forks: Sequence[tuple[EventLike, str, int]]
              ) -> list[list[tuple[EventLike, str, int]]]:
    groups: dict[tuple[Any, ...], list[tuple[EventLike, str, int]]] = {}
    for event, test, count in forks:
        site = event.site
        key = (event.mechanism, None if site is None else (site.file, site.line),
               event.action, tuple((h.kind, h.severity, _shape(h.summary))
                                   for h in _above_info(event)))
        groups.setdefault(key, []).append((event, test, count))
    return list(groups.values())


def _finding(group: list[tuple[EventLike, str, int]]) -> list[str]:
    first = group[0][0]
    count = sum(n for _, _, n in group)
    where_ = f" at {site_text(first.site)}" if first.site else ""
    lines = [f"{first.mechanism}{where_}: {first.action}"
             f"{f' x{count}' if count > 1 else ''}"]
    tests = list(dict.fromkeys(t for _, t, _ in group))
    lines.extend(wrap(f"in {tests_phrase(tests)}", "  "))
    shown = _above_info(first)
    if shown:
        lines.extend(line for line in render_hazards(shown, indent="  ") if line)
    notes = len(first.report.hazards) - len(shown)
    if notes:
        lines.append(f"  (and {plural(notes, 'note')} at info level)")
    lines.extend(_children([e for e, _, _ in group]))
    return lines


def _above_info(event: EventLike) -> list[HazardLike]:
    return [h for h in event.report.sorted_hazards() if h.severity >= WARNING]


def _children(events: Sequence[EventLike]) -> list[str]:
    lines: list[str] = []
    fates: dict[tuple[Any, ...], list[EventLike]] = {}
    for event in events:
        outcome = event.outcome
        if outcome is not None and _noteworthy(outcome):
            key = (outcome.status, outcome.signal, _shape(outcome.diagnosis or ""))
            fates.setdefault(key, []).append(event)
    for same in fates.values():
        outcome = same[0].outcome
        assert outcome is not None
        more = f" (and {len(same) - 1} more like it)" if len(same) > 1 else ""
        lines.append(f"  child {same[0].child_pid} {_fate(outcome)}{more}:")
        if outcome.diagnosis:
            lines.extend(wrap(_without_fix(outcome.diagnosis), "    "))
    return lines


def hung_failure(event: EventLike, *, forked_in: str | None, timeout: float | None,
                 this_test: str) -> str:
    """Why a test failed: a child hung during it (its diagnosis), what the fork that made
    the child met (with the labels that name the polluting tests), and its stacks."""
    forked = (FORKED_HERE if not forked_in or forked_in == this_test else FORKED_EARLIER
              ).format(site=where(event.site), test=forked_in)
    seconds = f"{timeout:g} s" if timeout is not None else "the hang timeout"
    outcome = event.outcome
    shown = _above_info(event)
    cause = _cause(shown, outcome.diagnosis if outcome is not None else None)
    lines = [HUNG.format(pid=event.child_pid, forked=forked, timeout=seconds, cause=cause), ""]
    lines.extend(wrap(ENDED, ""))
    lines.append("")
    if outcome is not None and outcome.diagnosis:
        lines.extend(wrap(_without_fix(outcome.diagnosis) if shown else outcome.diagnosis, ""))
        lines.append("")
    if shown:
        lines.append(MET.format(action=event.action))
        lines.extend(render_hazards(shown, indent="  "))
    else:
        lines.extend([MET_NOTHING, ""])
    if outcome is not None and outcome.traceback:
        stacks = _without_runner(outcome.traceback.rstrip().splitlines())
        lines.append(STACKS)
        lines.extend("  " + line for line in stacks[:TRACEBACK_LINES])
        if len(stacks) > TRACEBACK_LINES:
            lines.append(f"  ... ({len(stacks) - TRACEBACK_LINES} more lines)")
    return "\n".join(lines).rstrip()


def _cause(hazards: Sequence[HazardLike], diagnosis: str | None) -> str:
    """The hazard the diagnosis names (or else the first one) in a few words, with the
    label that names the step it comes from: ": thread 'refresher' held `lock` at its
    fork, started during tests/test_a.py::test_y"; "" when there is none."""
    if not hazards:
        return ""
    named = [h for h in hazards if isinstance(h.evidence.get("name"), str)
             and repr(h.evidence["name"]) in (diagnosis or "")]
    hazard = (named or [h for h in hazards if h.evidence.get("during")] or list(hazards))[0]
    ev = hazard.evidence
    if hazard.kind == "thread" and isinstance(ev.get("name"), str):
        held = [lock for lock in ev.get("locks") or () if isinstance(lock, dict)
                and lock.get("locked")]
        who = f"thread {ev['name']!r}" + (f" held `{held[0].get('lock')}`" if held else
                                          " was running")
    else:
        who = hazard.summary
    during = ev.get("during")
    when = (f", {DURING.get(hazard.kind, 'during')} {during}"
            if isinstance(during, str) and during else "")
    return CAUSE.format(who=who) + when


def _without_runner(lines: list[str]) -> list[str]:
    """A child's stacks with the test runner's own frames folded: the frames that matter
    are the test's, above them."""
    out: list[str] = []
    folded = 0
    for line in lines:
        if line.lstrip().startswith("File ") and any(part in line for part in RUNNER_FRAMES):
            folded += 1
            continue
        if folded:
            out.append(f"    ... ({plural(folded, 'frame')} of pytest)")
            folded = 0
        out.append(line)
    if folded:
        out.append(f"    ... ({plural(folded, 'frame')} of pytest)")
    return out


def fates_section(events: Sequence[tuple[EventLike, str]]) -> str:
    """A test's report section: the noteworthy fates of children (event, test forked in)
    learnt during it."""
    lines = []
    for event, test in events:
        outcome = event.outcome
        if outcome is None:
            continue
        site = where(event.site)
        lines.append(f"child {event.child_pid} (forked at {site} via {event.mechanism}"
                     f"{f' during {test}' if test else ''}) {_fate(outcome)}:")
        if outcome.diagnosis:
            lines.extend(wrap(outcome.diagnosis, "  "))
    return "\n".join(lines)


def unsafe_block(events: Sequence[EventLike], level: str) -> str:
    """Why ``forksafety.assert_safe()`` failed: the forks of its block that were not."""
    lines = [f"forksafe: {plural(len(events), 'fork')} in this block "
             f"{'was' if len(events) == 1 else 'were'} not safe (a hazard at {level} level "
             "or above, or a child that hung or crashed):"]
    for event in events:
        lines.append("")
        lines.append(f"{event.mechanism} at {site_text(event.site) if event.site else '?'}: "
                     f"{event.action}")
        lines.extend(line for line in render_hazards(_above_info(event), indent="  ") if line)
        if event.outcome is not None and _noteworthy(event.outcome):
            lines.append(f"  child {event.child_pid} {_fate(event.outcome)}:")
            lines.extend(wrap(event.outcome.diagnosis or "", "    "))
    return "\n".join(lines)


def _fates(events: Sequence[tuple[EventLike, int]]) -> str:
    counts: dict[str, int] = {}
    for event, _ in events:
        outcome = event.outcome
        if outcome is not None and _noteworthy(outcome):
            label = _fate(outcome).split(" (")[0]
            counts[label] = counts.get(label, 0) + 1
    return ", ".join(f"{plural(n, 'child', 'children')} {label}" for label, n in counts.items())


def _noteworthy(outcome: OutcomeLike) -> bool:
    return bool(outcome.status in ("hung", "stalled") or outcome.diagnosis or outcome.crashed)


def _fate(outcome: OutcomeLike) -> str:
    if outcome.status == "signaled":
        return f"was killed by {outcome.signal or 'a signal'}"
    if outcome.status == "exited":
        return f"exited {outcome.exit_code}"
    return outcome.status


def _without_fix(diagnosis: str) -> str:
    """A diagnosis without its "fix:" (the finding prints the hazard's fix above it)."""
    head, sep, _ = diagnosis.partition(". fix: ")
    return head + " (fix: see above)" if sep else diagnosis


_HEX = re.compile(r"0x[0-9a-fA-F]+")
_NUMBER = re.compile(r"(?<!\.py:)(?<![\w.])\d+")


def _shape(text: str) -> str:
    return _NUMBER.sub("#", _HEX.sub("0x#", text))
