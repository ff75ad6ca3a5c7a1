"""Human text for reports: grouped, worst first, every hazard with its fix.

A pool of a thousand identical workers must read as one finding with a count,
not a thousand lines, so hazards that differ only in the thread's name are
folded together.
"""

from __future__ import annotations

import re
import textwrap
from typing import TYPE_CHECKING, Any

from forksafe._frames import short_path
from forksafe._report import ForkEvent, Hazard, Outcome, Severity

if TYPE_CHECKING:
    from forksafe._report import Report

WIDTH = 100


def render_report(report: Report) -> str:
    head = f"forksafe: if pid {report.pid} forked now (from thread {report.thread!r}): "
    hazards = report.sorted_hazards()
    if not hazards:
        return head + "no hazards found; forking looks safe."
    counts = []
    for severity in sorted(Severity, reverse=True):
        n = sum(1 for h in hazards if h.severity == severity)
        if n:
            label = str(severity) + ("s" if n != 1 and severity != Severity.INFO else "")
            counts.append(f"{n} {label}")
    verdict = "SAFE (notes only)" if report.is_safe else "UNSAFE"
    lines = [head + f"{verdict} - {', '.join(counts)}", ""]
    lines.extend(render_hazards(hazards))
    return "\n".join(lines).rstrip()


def render_hazards(hazards: list[Hazard], indent: str = "") -> list[str]:
    """Grouped text for already sorted hazards."""
    lines: list[str] = []
    for group in _groups(hazards):
        first = group[0]
        label = f"{str(first.severity).upper():7} {first.kind}"
        lines.append(f"{indent}{label}: {first.summary}")
        sub = indent + "    "
        if len(group) > 1:
            others = ", ".join(repr(h.evidence.get("name", "?")) for h in group[1:6])
            more = ", ..." if len(group) > 6 else ""
            lines.append(f"{sub}and {len(group) - 1} more like it: {others}{more}")
        lines.extend(_details(first, sub))
        lines.append("")
    return lines


def _details(hazard: Hazard, indent: str) -> list[str]:
    ev = hazard.evidence
    out: list[str] = []
    why = ev.get("why")
    if isinstance(why, str):
        out.extend(_wrap("why: " + why, indent))
    for key, label in (("started_at", "started at"), ("opened_at", "opened at")):
        value = ev.get(key)
        if isinstance(value, list) and value:
            out.append(f"{indent}{label}: {_site_text(value[0])}")
        elif isinstance(value, str):
            out.append(f"{indent}{label}: {value}")
    current = ev.get("current")
    if isinstance(current, list) and current:
        out.append(f"{indent}now at: {_site_text(current[0])}")
    libraries = ev.get("libraries")
    if isinstance(libraries, list) and libraries:
        out.append(f"{indent}library: {libraries[0]}")
    out.extend(_wrap("fix: " + hazard.remedy, indent))
    return out


def _site_text(site: Any) -> str:
    if not isinstance(site, dict):
        return str(site)
    text = f"{short_path(str(site.get('file')))}:{site.get('line')} in {site.get('function')}"
    code = site.get("code")
    return f"{text}: {code}" if code else text


def _wrap(text: str, indent: str) -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=indent, subsequent_indent=indent + "  ")


def _groups(hazards: list[Hazard]) -> list[list[Hazard]]:
    groups: dict[tuple[Any, ...], list[Hazard]] = {}
    for hazard in hazards:
        groups.setdefault(_group_key(hazard), []).append(hazard)
    return list(groups.values())


def _group_key(hazard: Hazard) -> tuple[Any, ...]:
    ev = hazard.evidence
    if hazard.kind == "thread":
        started = ev.get("started_at")
        current = ev.get("current")
        return (
            hazard.kind,
            hazard.severity,
            repr(started[:1] if isinstance(started, list) else started),
            repr(current[:1] if isinstance(current, list) else current),
            ev.get("state"),
            ev.get("target"),
            bool(ev.get("locks")),
        )
    if hazard.kind == "native-thread":
        return (hazard.kind, hazard.severity, ev.get("owner"), ev.get("state"),
                ev.get("name"))
    return (hazard.kind, hazard.severity, hazard.summary)


def render_events(command: object, exit_code: object, events: list[ForkEvent],
                  omitted: int = 0) -> str:
    """Text for a run's fork events, grouped so that a pool of 1,000 reads as one finding.

    Forks with the same mechanism, site, action and hazards (numbers such as
    thread ids aside) fold into one entry with a count; within it, children
    with the same fate (same status, signal and diagnosis, pids aside) fold
    too. Clean forks whose children all exited are one line per site.
    """
    shown = " ".join(str(c) for c in command) if isinstance(command, list) else "?"
    crashed = sum(1 for e in events if e.outcome is not None and e.outcome.status == "signaled"
                  and e.outcome.signal in _CRASH_SIGNALS)
    hung = sum(1 for e in events if e.outcome is not None and e.outcome.status == "hung")
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
    lines = [head + (": " + ", ".join(fates) if fates else "")]
    groups: dict[tuple[Any, ...], list[ForkEvent]] = {}
    for event in events:
        key = (event.mechanism, event.site, event.action,
               tuple((h.kind, h.severity, _digits(h.summary))
                     for h in event.report.sorted_hazards()))
        groups.setdefault(key, []).append(event)
    quiet: list[str] = []
    for group in groups.values():
        first = group[0]
        where = f" at {_site_text(first.site.to_dict())}" if first.site else ""
        count = f" x{len(group)}" if len(group) > 1 else ""
        troubled = [e for e in group if e.outcome is not None and _noteworthy(e.outcome)]
        if not first.report.hazards and not troubled:
            quiet.append(f"{first.mechanism}{where}{count}")
            continue
        lines.append("")
        lines.append(f"fork via {first.mechanism}{where}{count}: {first.action}")
        lines.extend(render_hazards(first.report.sorted_hazards(), indent="  "))
        if not first.report.hazards:
            lines.append("  no hazards at fork time")
        lines.extend(_render_outcomes(group))
    if quiet:
        lines.append("")
        lines.append(f"{QUIET_FORKS}: "
                     + "; ".join(quiet))
    return "\n".join(lines).rstrip()


_CRASH_SIGNALS = frozenset({"SIGSEGV", "SIGBUS", "SIGILL", "SIGFPE", "SIGABRT", "SIGTRAP",
                            "SIGSYS"})

#: Said when a long run kept only the forks that matter (``_run.MAX_FORKS``).
OMITTED = "; {count} more, whose children exited uneventfully, not kept"

#: The line that lists forks with no hazards whose children neither crashed nor hung.
QUIET_FORKS = "clean forks (no hazards; no child crashed or hung)"

#: How many lines of a child's traceback the summary shows (the report has all of it).
TRACEBACK_LINES = 12


def _render_outcomes(group: list[ForkEvent]) -> list[str]:
    counts: dict[str, int] = {}
    fates: dict[tuple[Any, ...], list[ForkEvent]] = {}
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
        assert first.outcome is not None
        more = f" (and {len(events) - 1} more like it)" if len(events) > 1 else ""
        lines.append(f"  child {first.child_pid} {_fate(first.outcome)}{more}:")
        if first.outcome.diagnosis:
            lines.extend(_wrap(_without_known_fix(first.outcome.diagnosis, first), "    "))
        if first.outcome.traceback:
            tb = first.outcome.traceback.splitlines()
            lines.append("    child's stacks:")
            lines.extend("      " + ln for ln in tb[:TRACEBACK_LINES])
            if len(tb) > TRACEBACK_LINES:
                lines.append(f"      ... ({len(tb) - TRACEBACK_LINES} more lines in the report)")
    return lines


def _without_known_fix(diagnosis: str, event: ForkEvent) -> str:
    """The diagnosis without its "fix:" when that fix is printed with the hazards above it."""
    head, sep, fix = diagnosis.partition(". fix: ")
    if sep and any(fix.startswith(h.remedy) for h in event.report.hazards if h.remedy):
        return head + " (fix: see above)"
    return diagnosis


def _noteworthy(outcome: Outcome) -> bool:
    """A crash, a hang, or anything diagnosed; not an exit, nor a child stopped by SIGTERM."""
    return bool(outcome.status == "hung" or outcome.diagnosis or (
        outcome.status == "signaled" and outcome.signal in _CRASH_SIGNALS))


def _fate(outcome: Outcome) -> str:
    if outcome.status == "exited":
        return f"exited {outcome.exit_code}" if outcome.exit_code is not None else "exited"
    if outcome.status == "signaled":
        return f"killed by {outcome.signal or 'a signal'}"
    return outcome.status


def _digits(text: str) -> str:
    return re.sub(r"\d+", "#", text)


def render_run(report: dict[str, Any]) -> str:
    """Text for a whole ``forksafe run`` report (DESIGN.md §3 JSON)."""
    forks = report.get("forks", [])
    events = []
    for data in forks if isinstance(forks, list) else []:
        try:
            events.append(ForkEvent.from_dict(data))
        except (ValueError, TypeError, KeyError):
            continue
    omitted = report.get("forks_omitted")
    return render_events(report.get("command"), report.get("exit_code"), events,
                         omitted if isinstance(omitted, int) else 0)
