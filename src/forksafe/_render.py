"""Human text for reports: grouped, worst first, every hazard with its fix.

A pool of a thousand identical workers must read as one finding with a count,
not a thousand lines, so hazards that differ only in the thread's name are
folded together.
"""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING, Any

from forksafe._frames import short_path
from forksafe._report import ForkEvent, Hazard, Severity

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


def render_events(command: object, exit_code: object, events: list[ForkEvent]) -> str:
    """Text for a run's fork events: identical forks (same site, same hazards) fold into one."""
    shown = " ".join(command) if isinstance(command, list) else "?"
    lines = [f"forksafe: {len(events)} fork{'s' if len(events) != 1 else ''} seen in `{shown}`"
             + (f" (exit code {exit_code})" if isinstance(exit_code, int) else "")]
    groups: dict[tuple[Any, ...], list[ForkEvent]] = {}
    for event in events:
        key = (event.mechanism, event.site, event.action,
               tuple((h.kind, h.severity, h.summary) for h in event.report.sorted_hazards()))
        groups.setdefault(key, []).append(event)
    for group in groups.values():
        first = group[0]
        where = f" at {first.site}" if first.site else ""
        count = f" x{len(group)}" if len(group) > 1 else ""
        lines.append("")
        lines.append(f"fork via {first.mechanism}{where}{count}: {first.action}")
        lines.extend(render_hazards(first.report.sorted_hazards(), indent="  "))
        for event in group:
            if event.outcome is not None and event.outcome.status != "exited":
                lines.append(f"  child {event.child_pid}: {event.outcome.status}"
                             + (f" by {event.outcome.signal}" if event.outcome.signal else ""))
                if event.outcome.diagnosis:
                    lines.extend(_wrap(event.outcome.diagnosis, "    "))
    return "\n".join(lines).rstrip()
