"""A whole run as text: every fork seen, grouped, with what became of its children."""

from __future__ import annotations

import re
from typing import Any, Sequence

from forksafe._render.hazards import render_hazards, wrap
from forksafe._render.shapes import EventLike, OutcomeLike
from forksafe._render.sites import site_text

#: Said when a long run kept only the forks that matter (``forksafe._runreport.MAX_FORKS``).
OMITTED = "; {count} more, whose children exited uneventfully, not kept"

#: The line that lists forks with nothing at warning level or above whose children
#: neither crashed nor hung (notes, such as a thread that handles fork itself, aside).
QUIET_FORKS = "clean forks (nothing above info; no child crashed or hung)"

#: How many lines of a child's traceback the summary shows (the report has all of it).
TRACEBACK_LINES = 12


def render_events(command: object, exit_code: object, events: Sequence[EventLike],
                  omitted: int = 0) -> str:
    """Text for a run's fork events, grouped so that a pool of 1,000 reads as one finding.

    Forks with the same mechanism, site, action and hazards (numbers such as
    thread ids aside, but not the lines that started a thread: hazards started
    elsewhere are another finding) fold into one entry with a count; within it,
    children with the same fate (same status, signal and diagnosis, pids aside)
    fold too. Clean forks whose children all exited are one line per site.
    """
    shown = " ".join(str(c) for c in command) if isinstance(command, list) else "?"
    crashed = sum(1 for e in events if e.outcome is not None and e.outcome.crashed)
    hung = sum(1 for e in events if e.outcome is not None and e.outcome.status == "hung")
    stalled = sum(1 for e in events if e.outcome is not None and e.outcome.status == "stalled")
    head = f"forksafe: {len(events)} fork{'s' if len(events) != 1 else ''} seen in `{shown}`"
    if isinstance(exit_code, int):
        head += f" (exit code {exit_code})"
    if omitted:
        head += OMITTED.format(count=omitted)
    fates = []
    if crashed:
        fates.append(f"{crashed} child{'ren' if crashed != 1 else ''} crashed")
    if hung:
        fates.append(f"{hung} child{'ren' if hung != 1 else ''} hung")
    if stalled:
        fates.append(f"{stalled} child{'ren' if stalled != 1 else ''} stalled")
    lines = [head + (": " + ", ".join(fates) if fates else "")]
    groups: dict[tuple[Any, ...], list[EventLike]] = {}
    for event in events:
        key = (event.mechanism, event.site, event.action,
               tuple((h.kind, h.severity, shape(h.summary))
                     for h in event.report.sorted_hazards()))
        groups.setdefault(key, []).append(event)
    quiet: dict[str, int] = {}  # "mechanism at site" -> forks
    for group in groups.values():
        first = group[0]
        where = f" at {site_text(first.site)}" if first.site else ""
        troubled = [e for e in group if e.outcome is not None and _noteworthy(e.outcome)]
        if first.report.is_safe and not troubled:
            place = f"{first.mechanism}{where}"
            quiet[place] = quiet.get(place, 0) + len(group)
            continue
        lines.append("")
        count = f" x{len(group)}" if len(group) > 1 else ""
        lines.append(f"fork via {first.mechanism}{where}{count}: {first.action}")
        lines.extend(render_hazards(first.report.sorted_hazards(), indent="  "))
        if not first.report.hazards:
            lines.append("  no hazards at fork time")
        lines.extend(_render_outcomes(group))
    if quiet:
        lines.append("")
        lines.append(f"{QUIET_FORKS}: " + "; ".join(
            f"{place} x{n}" if n > 1 else place for place, n in quiet.items()))
    return "\n".join(lines).rstrip()


def _render_outcomes(group: list[EventLike]) -> list[str]:
    counts: dict[str, int] = {}
    fates: dict[tuple[Any, ...], list[EventLike]] = {}
    for event in group:
        outcome = event.outcome
        if outcome is None:
            counts["no outcome seen"] = counts.get("no outcome seen", 0) + 1
            continue
        label = _fate(outcome)
        counts[label] = counts.get(label, 0) + 1
        if _noteworthy(outcome):
            key = (outcome.status, outcome.signal, _digits(outcome.diagnosis or ""))
            fates.setdefault(key, []).append(event)
    lines = ["  children: " + ", ".join(f"{n} {label}" for label, n in counts.items())]
    for events in fates.values():
        first = events[0]
        outcome = first.outcome
        assert outcome is not None
        more = f" (and {len(events) - 1} more like it)" if len(events) > 1 else ""
        lines.append(f"  child {first.child_pid} {_fate(outcome)}{more}:")
        if outcome.diagnosis:
            lines.extend(wrap(_without_known_fix(outcome.diagnosis, first), "    "))
        if outcome.traceback:
            tb = outcome.traceback.splitlines()
            lines.append("    child's stacks:")
            lines.extend("      " + ln for ln in tb[:TRACEBACK_LINES])
            if len(tb) > TRACEBACK_LINES:
                lines.append(f"      ... ({len(tb) - TRACEBACK_LINES} more lines in the report)")
    return lines


def _without_known_fix(diagnosis: str, event: EventLike) -> str:
    """The diagnosis without its "fix:" when that fix is printed with the hazards above it."""
    head, sep, fix = diagnosis.partition(". fix: ")
    if sep and any(fix.startswith(h.remedy) for h in event.report.hazards if h.remedy):
        return head + " (fix: see above)"
    return diagnosis


def _noteworthy(outcome: OutcomeLike) -> bool:
    """A crash, a hang, or anything diagnosed; not an exit, nor a child stopped by SIGTERM."""
    return bool(outcome.status in ("hung", "stalled") or outcome.diagnosis or outcome.crashed)


def _fate(outcome: OutcomeLike) -> str:
    if outcome.status == "exited":
        return f"exited {outcome.exit_code}" if outcome.exit_code is not None else "exited"
    if outcome.status == "signaled":
        return f"killed by {outcome.signal or 'a signal'}"
    return outcome.status


def _digits(text: str) -> str:
    return re.sub(r"\d+", "#", text)


_HEX = re.compile(r"0x[0-9a-fA-F]+")
_NUMBER = re.compile(r"(?<!\.py:)(?<![\w.])\d+")


def shape(text: str) -> str:
    """``text`` with the numbers that differ from fork to fork (pids, thread ids, thread
    counts, ``Thread-3``) made alike, and the ``file.py:line`` sites kept."""
    return _NUMBER.sub("#", _HEX.sub("0x#", text))

