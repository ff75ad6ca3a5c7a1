"""A whole run as text: every fork seen, grouped, with what became of its children.

The grouping (``findings``) is shared with the HTML page (``forksafe._render.html``),
so that the page and the summary tell the same findings. Cheap to import: a run
without a fork (most commands) says its one line without the hazard and site
formatters, which are loaded with the first finding.
"""

from __future__ import annotations

import re

TYPE_CHECKING = False  # typing is not imported for a run without a fork
if TYPE_CHECKING:
    from typing import Any, Sequence

    from forksafe._render.shapes import EventLike, OutcomeLike

#: Said when a long run kept only the forks that matter (``forksafe._runreport.MAX_FORKS``).
OMITTED = "; {count} more, whose children exited uneventfully, not kept"

#: The line that lists forks with nothing at warning level or above whose children
#: neither crashed nor hung (notes, such as a thread that handles fork itself, aside).
QUIET_FORKS = "clean forks (nothing above info; no child crashed or hung)"

#: How many lines of a child's traceback the summary shows (the report has all of it).
TRACEBACK_LINES = 12


class Finding:
    """Forks alike (mechanism, site, action, hazards: see ``render_events``), and their
    children by fate."""

    def __init__(self, events: list[EventLike]) -> None:
        self.events = events
        self.first = events[0]
        self.troubled = [e for e in events if e.outcome is not None and noteworthy(e.outcome)]

    @property
    def quiet(self) -> bool:
        """Nothing above info at the fork, and no child crashed, hung or was diagnosed:
        one item of the "clean forks" line, not a finding of its own."""
        return self.first.report.is_safe and not self.troubled

    def fates(self) -> dict[str, int]:
        """How many children met each fate (``exited 0``, ``killed by SIGSEGV``, ...)."""
        counts: dict[str, int] = {}
        for event in self.events:
            label = "no outcome seen" if event.outcome is None else fate(event.outcome)
            counts[label] = counts.get(label, 0) + 1
        return counts

    def diagnosed(self) -> list[list[EventLike]]:
        """The noteworthy children, those with the same fate together (pids aside)."""
        groups: dict[tuple[Any, ...], list[EventLike]] = {}
        for event in self.troubled:
            outcome = event.outcome
            assert outcome is not None
            key = (outcome.status, outcome.signal, _digits(outcome.diagnosis or ""))
            groups.setdefault(key, []).append(event)
        return list(groups.values())


def findings(events: Sequence[EventLike]) -> list[Finding]:
    """The run's forks grouped: same mechanism, site, action and hazards (numbers such
    as thread ids aside, but not the lines that started a thread)."""
    groups: dict[tuple[Any, ...], list[EventLike]] = {}
    for event in events:
        key = (event.mechanism, event.site, event.action,
               tuple((h.kind, h.severity, shape(h.summary))
                     for h in event.report.sorted_hazards()))
        groups.setdefault(key, []).append(event)
    return [Finding(group) for group in groups.values()]


def headline(command: object, exit_code: object, events: Sequence[EventLike],
             omitted: int = 0) -> str:
    """``forksafe: 3 forks seen in `app.py` (exit code 0): 1 child crashed``."""
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
    return head + (": " + ", ".join(fates) if fates else "")


def render_events(command: object, exit_code: object, events: Sequence[EventLike],
                  omitted: int = 0, tree: Sequence[str] = ()) -> str:
    """Text for a run's fork events, grouped so that a pool of 1,000 reads as one finding.

    Forks with the same mechanism, site, action and hazards (numbers such as
    thread ids aside, but not the lines that started a thread: hazards started
    elsewhere are another finding) fold into one entry with a count; within it,
    children with the same fate (same status, signal and diagnosis, pids aside)
    fold too. Clean forks whose children all exited are one line per site. The
    lines of the process tree (``forksafe._render.tree``), when given, follow.
    """
    lines = [headline(command, exit_code, events, omitted)]
    if not events:
        return lines[0]
    from forksafe._render.hazards import render_hazards
    from forksafe._render.sites import site_text

    quiet: dict[str, int] = {}  # "mechanism at site" -> forks
    for finding in findings(events):
        first = finding.first
        where = f" at {site_text(first.site)}" if first.site else ""
        if finding.quiet:
            place = f"{first.mechanism}{where}"
            quiet[place] = quiet.get(place, 0) + len(finding.events)
            continue
        lines.append("")
        count = f" x{len(finding.events)}" if len(finding.events) > 1 else ""
        lines.append(f"fork via {first.mechanism}{where}{count}: {first.action}")
        lines.extend(render_hazards(first.report.sorted_hazards(), indent="  "))
        if not first.report.hazards:
            lines.append("  no hazards at fork time")
        lines.extend(_render_outcomes(finding))
    if quiet:
        lines.append("")
        lines.append(f"{QUIET_FORKS}: " + "; ".join(
            f"{place} x{n}" if n > 1 else place for place, n in quiet.items()))
    if tree:
        lines.append("")
        lines.extend(tree)
    return "\n".join(lines).rstrip()


def _render_outcomes(finding: Finding) -> list[str]:
    from forksafe._render.hazards import wrap

    lines = ["  children: " + ", ".join(f"{n} {label}" for label, n in finding.fates().items())]
    for events in finding.diagnosed():
        first = events[0]
        outcome = first.outcome
        assert outcome is not None
        more = f" (and {len(events) - 1} more like it)" if len(events) > 1 else ""
        lines.append(f"  child {first.child_pid} {fate(outcome)}{more}:")
        if outcome.diagnosis:
            lines.extend(wrap(without_known_fix(outcome.diagnosis, first), "    "))
        if outcome.traceback:
            tb = outcome.traceback.splitlines()
            lines.append("    child's stacks:")
            lines.extend("      " + ln for ln in tb[:TRACEBACK_LINES])
            if len(tb) > TRACEBACK_LINES:
                lines.append(f"      ... ({len(tb) - TRACEBACK_LINES} more lines in the report)")
    return lines


def without_known_fix(diagnosis: str, event: EventLike) -> str:
    """The diagnosis without its "fix:" when that fix is printed with the hazards above it."""
    head, sep, fix = diagnosis.partition(". fix: ")
    if sep and any(fix.startswith(h.remedy) for h in event.report.hazards if h.remedy):
        return head + " (fix: see above)"
    return diagnosis


def noteworthy(outcome: OutcomeLike) -> bool:
    """A crash, a hang, or anything diagnosed; not an exit, nor a child stopped by SIGTERM."""
    return bool(outcome.status in ("hung", "stalled") or outcome.diagnosis or outcome.crashed)


def fate(outcome: OutcomeLike) -> str:
    """What became of a child, in two or three words: ``exited 0``, ``killed by SIGSEGV``."""
    if outcome.status == "exited":
        return f"exited {outcome.exit_code}" if outcome.exit_code is not None else "exited"
    if outcome.status == "signaled":
        return f"killed by {outcome.signal or 'a signal'}"
    return outcome.status


#: How a fate is coloured, worst first (the page's CSS has a class for each).
TONES = ("crash", "hung", "stalled", "refused", "failed", "hazard", "unknown", "ok")


def tone(event: EventLike) -> str:
    """The colour of a fork on the timeline: its child's fate, or its hazards."""
    outcome = event.outcome
    if outcome is None:
        return "refused" if event.action == "refused" else "unknown"
    if outcome.crashed:
        return "crash"
    if outcome.status in ("hung", "stalled"):
        return outcome.status
    if outcome.status == "unknown":
        return "unknown"
    if noteworthy(outcome) or (outcome.status == "exited" and outcome.exit_code != 0):
        return "failed"
    return "ok" if event.report.is_safe else "hazard"


def _digits(text: str) -> str:
    return re.sub(r"\d+", "#", text)


_HEX = re.compile(r"0x[0-9a-fA-F]+")
_NUMBER = re.compile(r"(?<!\.py:)(?<![\w.])\d+")


def shape(text: str) -> str:
    """``text`` with the numbers that differ from fork to fork (pids, thread ids, thread
    counts, ``Thread-3``) made alike, and the ``file.py:line`` sites kept."""
    return _NUMBER.sub("#", _HEX.sub("0x#", text))
