"""Hazards as text: one hazard, a group of alike hazards, a whole report.

A pool of a thousand identical workers must read as one finding with a count,
not a thousand lines, so hazards that differ only in the thread's name are
folded together. When the program's driver labelled what it was doing (the
pytest plugin: "during tests/test_a.py::test_y"), a folded group says every
label its members carry, in one line: the tests that left the threads behind.
"""

from __future__ import annotations

import os
import textwrap
from typing import Any, Sequence

from forksafe._render.shapes import HazardLike, ReportLike
from forksafe._render.sites import evidence_site, path

WIDTH = 100

#: The line that says when (``evidence["during"]``: the label the program's driver set),
#: by hazard kind.
DURING = {
    "thread": "started during",
    "native-thread": "started during",
    "sqlite-connection": "opened during",
    "native-runtime": "became active during",
}
#: At most this many labels are listed on that line.
DURING_SHOWN = 4


def render_report(report: ReportLike) -> str:
    """``str(report)``: what forking now would meet, worst first, with every fix."""
    head = f"forksafe: if pid {report.pid} forked now (from thread {report.thread!r}): "
    hazards = report.sorted_hazards()
    if not hazards:
        return head + "no hazards found; forking looks safe."
    counts = []
    for severity in sorted({h.severity for h in hazards}, reverse=True):
        n = sum(1 for h in hazards if h.severity == severity)
        label = str(severity) + ("s" if n != 1 and str(severity) != "info" else "")
        counts.append(f"{n} {label}")
    verdict = "SAFE (notes only)" if report.is_safe else "UNSAFE"
    lines = [head + f"{verdict} - {', '.join(counts)}", ""]
    lines.extend(render_hazards(hazards))
    return "\n".join(lines).rstrip()


def counts(hazards: Sequence[HazardLike], floor: int = 20) -> str:
    """``"1 error, 2 warnings"``: how many hazards at each level from ``floor`` up."""
    parts = []
    for severity in sorted({h.severity for h in hazards if h.severity >= floor}, reverse=True):
        n = sum(1 for h in hazards if h.severity == severity)
        parts.append(f"{n} {severity}{'s' if n != 1 else ''}")
    return ", ".join(parts)


def render_hazards(hazards: Sequence[HazardLike], indent: str = "") -> list[str]:
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
        lines.extend(_details(first, sub, group))
        lines.append("")
    return lines


def hazards_text(hazards: Sequence[HazardLike]) -> str:
    """The grouped text of ``hazards`` (sorted), as one block."""
    return "\n".join(render_hazards(hazards)).rstrip()


def hazard_text(hazard: HazardLike) -> str:
    """One line: a hazard's summary plus the library and thread names that prove it."""
    ev = hazard.evidence
    details = []
    libraries = ev.get("libraries")
    if isinstance(libraries, list) and libraries:
        details.append(f"library {path(str(libraries[0]))}")
    owner = ev.get("owner")
    if isinstance(owner, str) and owner:
        details.append(f"library {path(owner)}")
    threads = [t for t in ev.get("threads", ()) if isinstance(t, dict)]
    if threads:
        # A thread that never named itself is shown by its tid: still a thread, with an owner.
        shown = sorted({repr(str(t.get("name"))) if t.get("named", True) else
                        f"unnamed tid {t.get('tid')}" for t in threads})
        details.append("its thread" + ("s " if len(shown) > 1 else " ") + ", ".join(shown[:6]))
    if hazard.kind == "native-thread" and isinstance(ev.get("name"), str):
        details.append(f"thread {ev['name']!r}")
    return hazard.summary + (f" ({'; '.join(details)})" if details else "")


def library_name(library: str) -> str:
    """A native library as prose names it: its file name (``libgomp.so.1``)."""
    return os.path.basename(library.rstrip("/")) or library


def _details(hazard: HazardLike, indent: str,
             group: Sequence[HazardLike] = ()) -> list[str]:
    ev = hazard.evidence
    out: list[str] = []
    why = ev.get("why")
    if isinstance(why, str):
        out.extend(wrap("why: " + why, indent))
    for key, label in (("started_at", "started at"), ("opened_at", "opened at")):
        value = ev.get(key)
        if isinstance(value, list) and value:
            out.append(f"{indent}{label}: {evidence_site(value[0])}")
        elif isinstance(value, str):
            out.append(f"{indent}{label}: {value}")
    labels = during_labels(group or (hazard,))
    if labels:
        out.extend(wrap(f"{DURING.get(hazard.kind, 'during')}: {labels}", indent))
    current = ev.get("current")
    if isinstance(current, list) and current:
        out.append(f"{indent}now at: {evidence_site(current[0])}")
    libraries = ev.get("libraries")
    if isinstance(libraries, list) and libraries:
        out.append(f"{indent}library: {libraries[0]}")
    out.extend(wrap("fix: " + hazard.remedy, indent))
    return out


def during_labels(hazards: Sequence[HazardLike]) -> str:
    """The distinct labels (``evidence["during"]``) of ``hazards``, in order, as one
    phrase: ``"tests/a.py::t1, tests/a.py::t2 and 3 more"``; "" when none has one."""
    seen: dict[str, None] = {}
    for hazard in hazards:
        label = hazard.evidence.get("during")
        if isinstance(label, str) and label:
            seen.setdefault(label, None)
    labels = list(seen)
    if len(labels) <= DURING_SHOWN:
        return ", ".join(labels)
    return f"{', '.join(labels[:DURING_SHOWN - 1])} and {len(labels) - DURING_SHOWN + 1} more"


def wrap(text: str, indent: str) -> list[str]:
    """``text`` wrapped at ``WIDTH``, continuation lines indented two more."""
    return textwrap.wrap(text, WIDTH, initial_indent=indent, subsequent_indent=indent + "  ")


def _groups(hazards: Sequence[HazardLike]) -> list[list[HazardLike]]:
    groups: dict[tuple[Any, ...], list[HazardLike]] = {}
    for hazard in hazards:
        groups.setdefault(_group_key(hazard), []).append(hazard)
    return list(groups.values())


def _group_key(hazard: HazardLike) -> tuple[Any, ...]:
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
