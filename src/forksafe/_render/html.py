"""A run (or a check) as one self-contained HTML page: ``forksafe explain --html``.

A file a CI job keeps as an artifact, as coverage's HTML report: the headline,
every finding with its hazards' evidence and its children's diagnoses and
stacks, the process tree and a timeline of forks and their fates.

Self-contained and inert: one file, its style inline, no script, no image, no
font, no link out of the page (its own ``#`` anchors only), and a Content
Security Policy that forbids loading anything, so that opening it fetches nothing
even if a browser were asked to. Every string from the report - a path, a thread
name, a traceback - is escaped (``html.escape``), in text and in attributes
alike: a report is outside data, and a hostile one must stay text.

The findings are those of the text summary (``forksafe._render.runs.findings``),
so that the page and the summary never disagree.
"""

from __future__ import annotations

import html
import json

from forksafe._render.runs import TONES, Finding, fate, findings, headline, tone, without_known_fix
from forksafe._render.sites import evidence_site, site_text
from forksafe._render.timeline import Row, Timeline
from forksafe._render.tree import MAX_DEPTH, Group, Tree

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Mapping, Sequence

    from forksafe._render.shapes import EventLike, HazardLike, ReportLike

#: Lines of the process tree drawn; what a very wide tree has beyond is counted.
MAX_TREE_LINES = 5000
#: Rows of the timeline's table, and lanes of its chart (the rest: "other").
MAX_TABLE_ROWS = 1000
MAX_LANES = 24
#: Lines of one child's stacks shown (the report keeps them all).
MAX_TRACEBACK_LINES = 2000
#: Characters of one evidence text shown, and items of one evidence list.
MAX_TEXT = 20_000
MAX_ITEMS = 100

_POLICY = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"

_STYLE = """
:root { --fg: #1d2430; --muted: #5b6472; --line: #d8dde5; --bg: #fff; --panel: #f6f8fa;
  --crash: #c62828; --hung: #8e24aa; --stalled: #6a1b9a; --refused: #ad1457;
  --failed: #ef6c00; --hazard: #f9a825; --unknown: #78909c; --ok: #2e7d32; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg);
  background: var(--bg); margin: 0 auto; max-width: 1100px; padding: 1.5em; }
h1 { font-size: 1.5em; margin: 0 0 .3em; } h2 { border-bottom: 1px solid var(--line);
  padding-bottom: .2em; margin-top: 2em; } h3 { font-size: 1.05em; margin: 0 0 .5em; }
code, pre, .mono { font: 12.5px/1.4 ui-monospace, "SFMono-Regular", Menlo, monospace; }
pre { background: var(--panel); border: 1px solid var(--line); padding: .6em; overflow: auto;
  white-space: pre-wrap; word-break: break-word; }
nav a { margin-right: 1em; } .muted { color: var(--muted); }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: .15em 1em; }
dl.facts dt { color: var(--muted); } dl.facts dd { margin: 0; }
.finding { border: 1px solid var(--line); border-left: 6px solid var(--unknown);
  border-radius: 4px; padding: .8em 1em; margin: 1em 0; background: var(--bg); }
.hazard { margin: .6em 0; padding-left: .8em; border-left: 3px solid var(--line); }
.badge { display: inline-block; border-radius: 3px; padding: 0 .4em; color: #fff;
  font-size: .85em; font-weight: 600; text-transform: uppercase; }
.sev-error { background: var(--crash); } .sev-warning { background: var(--failed); }
.sev-info { background: var(--unknown); }
dl.evidence { display: grid; grid-template-columns: max-content 1fr; gap: .1em .8em;
  margin: .4em 0; } dl.evidence dt { color: var(--muted); } dl.evidence dd { margin: 0; }
dl.evidence ol, dl.evidence ul { margin: 0; padding-left: 1.2em; }
.tree, .tree ul { list-style: none; margin: 0; padding-left: 1.4em; }
.tree > li { padding-left: 0; } .tree li { border-left: 1px solid var(--line);
  padding-left: .6em; margin: .1em 0; }
.dot { display: inline-block; width: .7em; height: .7em; border-radius: 50%;
  margin-right: .35em; vertical-align: baseline; }
table { border-collapse: collapse; width: 100%; } td, th { border-bottom: 1px solid var(--line);
  padding: .2em .5em; text-align: left; vertical-align: top; } th { color: var(--muted); }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
svg text { font: 11px system-ui, sans-serif; fill: var(--muted); }
footer { margin-top: 3em; color: var(--muted); font-size: .9em; }
""" + "".join(
    f".tone-{name} {{ border-left-color: var(--{name}); }} "
    f".bg-{name} {{ background: var(--{name}); fill: var(--{name}); }}\n" for name in TONES)


def e(value: object) -> str:
    """Any value as HTML text, escaped for text and attributes alike."""
    return html.escape(str(value), quote=True)


def run_page(command: object, exit_code: object, events: Sequence[EventLike], *,
             tree: Tree, timeline: Timeline, facts: Mapping[str, object],
             omitted: int = 0) -> str:
    """The page of a run report (or of a report file's event lines)."""
    shown = " ".join(str(c) for c in command) if isinstance(command, list) else "?"
    found = findings(events)
    body = [f"<h1>forksafe: a run of <code>{e(shown)}</code></h1>",
            f"<p>{e(headline(command, exit_code, events, omitted))}</p>",
            _facts(facts),
            '<nav><a href="#findings">findings</a><a href="#tree">process tree</a>'
            '<a href="#timeline">timeline</a></nav>',
            '<section id="findings"><h2>Findings</h2>', _findings(found), "</section>",
            '<section id="tree"><h2>Process tree</h2>', _tree(tree), "</section>",
            '<section id="timeline"><h2>Timeline</h2>', _timeline(timeline), "</section>"]
    return _page(f"forksafe: {shown}", body)


def check_page(command: object, report: ReportLike, facts: Mapping[str, object]) -> str:
    """The page of a check (``forksafe check --json``): what a fork then would meet."""
    hazards = report.sorted_hazards()
    verdict = "no hazards found; forking looks safe" if not hazards else (
        "SAFE (notes only)" if report.is_safe else "UNSAFE")
    body = [f"<h1>forksafe check: pid {e(report.pid)} (thread {e(report.thread)})</h1>",
            f"<p>If this process forked then: {e(verdict)}.</p>", _facts(facts),
            '<section id="findings"><h2>Hazards</h2>', _hazards(hazards) or
            '<p class="muted">None.</p>', "</section>"]
    return _page(f"forksafe check: pid {report.pid}", body)


def _page(title: str, body: list[str]) -> str:
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_POLICY}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta name="referrer" content="no-referrer">',
        f"<title>{e(title)}</title>", f"<style>{_STYLE}</style>", "</head>", "<body>",
        *body,
        "<footer>Written by <code>forksafe explain --html</code>: one file, nothing loaded "
        "from anywhere, no script.</footer>", "</body>", "</html>", ""])


def _facts(facts: Mapping[str, object]) -> str:
    rows = "".join(f"<dt>{e(key)}</dt><dd>{e(value)}</dd>" for key, value in facts.items()
                   if value is not None)
    return f'<dl class="facts">{rows}</dl>' if rows else ""


# -- findings --------------------------------------------------------------------------


def _findings(found: list[Finding]) -> str:
    out: list[str] = []
    quiet: dict[str, int] = {}
    for finding in found:
        first = finding.first
        where = f" at {site_text(first.site)}" if first.site else ""
        if finding.quiet:
            quiet[f"{first.mechanism}{where}"] = quiet.get(
                f"{first.mechanism}{where}", 0) + len(finding.events)
            continue
        count = f" \u00d7{len(finding.events)}" if len(finding.events) > 1 else ""
        worst = min((tone(ev) for ev in finding.events), key=TONES.index)
        out.append(f'<article class="finding tone-{worst}">')
        out.append(f"<h3>fork via {e(first.mechanism)}{e(where)}{e(count)}: "
                   f"{e(first.action)}</h3>")
        fates = ", ".join(f"{n} {label}" for label, n in finding.fates().items())
        out.append(f"<p><b>children:</b> {e(fates)}</p>")
        hazards = first.report.sorted_hazards()
        out.append(_hazards(hazards) or '<p class="muted">No hazards at fork time.</p>')
        for events in finding.diagnosed():
            out.append(_child(events))
        out.append("</article>")
    if not out and not quiet:
        out.append('<p class="muted">No fork was seen.</p>')
    if quiet:
        rows = "".join(f'<tr><td><code>{e(place)}</code></td><td class="num">{n}</td></tr>'
                       for place, n in quiet.items())
        out.append('<h3>Clean forks</h3><p class="muted">Nothing above info at the fork; '
                   "no child crashed or hung.</p><table><tr><th>fork</th>"
                   f'<th class="num">forks</th></tr>{rows}</table>')
    return "\n".join(out)


def _hazards(hazards: Sequence[HazardLike]) -> str:
    """Each kind of hazard once, with the names of the alike ones and its evidence."""
    from forksafe._render.runs import shape

    groups: dict[tuple[object, ...], list[HazardLike]] = {}
    for hazard in hazards:
        groups.setdefault((hazard.kind, hazard.severity, shape(hazard.summary)),
                          []).append(hazard)
    out = []
    for group in groups.values():
        first = group[0]
        severity = str(first.severity)
        out.append('<div class="hazard">')
        out.append(f'<p><span class="badge sev-{e(severity)}">{e(severity)}</span> '
                   f"<b>{e(first.kind)}</b>: {e(first.summary)}</p>")
        if len(group) > 1:
            names = ", ".join(repr(str(h.evidence.get("name", "?"))) for h in group[1:21])
            more = ", ..." if len(group) > 21 else ""
            out.append(f'<p class="muted">and {len(group) - 1} more like it: '
                       f"{e(names)}{e(more)}</p>")
        if first.remedy:
            out.append(f"<p><b>fix:</b> {e(first.remedy)}</p>")
        if first.evidence:
            out.append("<details open><summary>evidence</summary>"
                       f"{_mapping(first.evidence, 0)}</details>")
        out.append("</div>")
    return "\n".join(out)


def _child(events: list[EventLike]) -> str:
    first = events[0]
    outcome = first.outcome
    assert outcome is not None
    more = f" (and {len(events) - 1} more like it)" if len(events) > 1 else ""
    out = [f'<div class="hazard"><p><b>child {e(first.child_pid)} {e(fate(outcome))}'
           f"</b>{e(more)}</p>"]
    if outcome.diagnosis:
        out.append(f"<p>{e(without_known_fix(outcome.diagnosis, first))}</p>")
    if outcome.traceback:
        lines = outcome.traceback.splitlines()
        cut = (f"\n... ({len(lines) - MAX_TRACEBACK_LINES} more lines in the report)"
               if len(lines) > MAX_TRACEBACK_LINES else "")
        out.append("<details open><summary>the child's stacks</summary>"
                   f"<pre>{e(chr(10).join(lines[:MAX_TRACEBACK_LINES]) + cut)}</pre></details>")
    out.append("</div>")
    return "\n".join(out)


def _mapping(value: Mapping[str, Any], depth: int) -> str:
    rows = "".join(f"<dt>{e(key)}</dt><dd>{_value(key, item, depth + 1)}</dd>"
                   for key, item in list(value.items())[:MAX_ITEMS])
    more = f"<dt>...</dt><dd>{len(value) - MAX_ITEMS} more</dd>" if len(
        value) > MAX_ITEMS else ""
    return f'<dl class="evidence">{rows}{more}</dl>'


def _value(key: str, value: object, depth: int) -> str:
    """Evidence as it is: texts as text, sites as places, lists as lists, objects as
    nested definitions (a depth past six as JSON text)."""
    if value is None or isinstance(value, (bool, int, float)):
        return f'<span class="mono">{e(json.dumps(value))}</span>'
    if isinstance(value, str):
        text = value if len(value) <= MAX_TEXT else value[:MAX_TEXT] + " ..."
        return f"<pre>{e(text)}</pre>" if "\n" in text else e(text)
    if depth > 6:
        return f'<span class="mono">{e(json.dumps(value, default=str)[:MAX_TEXT])}</span>'
    if isinstance(value, dict):
        if {"file", "line"} <= set(value):
            return f"<code>{e(evidence_site(value))}</code>"
        return _mapping(value, depth)
    if isinstance(value, list):
        if not value:
            return '<span class="muted">none</span>'
        items = "".join(f"<li>{_value(key, item, depth + 1)}</li>"
                        for item in value[:MAX_ITEMS])
        more = f"<li>... {len(value) - MAX_ITEMS} more</li>" if len(value) > MAX_ITEMS else ""
        return f"<ol>{items}{more}</ol>"
    return e(value)


# -- the process tree --------------------------------------------------------------------


def _tree(tree: Tree) -> str:
    roots = tree.roots()
    if not roots:
        return '<p class="muted">No fork was seen.</p>'
    budget = [MAX_TREE_LINES]
    out = ['<p class="muted">Who forked whom, by which mechanism, and what became of each '
           "child; children alike (same fork, same fate, alike below) are one line with a "
           "count.</p>", '<ul class="tree">']
    for root in roots:
        out.append(_node(root, budget))
    out.append("</ul>")
    hidden = -budget[0] if budget[0] < 0 else 0
    if hidden:
        out.append(f'<p class="muted">... {hidden} more line(s) not drawn.</p>')
    return "\n".join(out)


def _node(group: Group, budget: list[int]) -> str:
    budget[0] -= 1
    if budget[0] < 0:
        return ""
    if group.mechanism is None:
        label = f"<b>{e(group.label)}</b>"
    else:
        label = (f'<span class="dot bg-{group.tone}"></span>'
                 f"<code>{e(group.mechanism)}</code>"
                 + (f" at <code>{e(group.site)}</code>" if group.site else "")
                 + (f" <b>\u00d7{group.count}</b>" if group.count > 1 else "")
                 + f": {e(group.fate)}")
    inner = "".join(_node(child, budget) for child in group.children)
    if group.cut:
        inner += f'<li class="muted">... deeper forks not drawn (over {MAX_DEPTH} levels)</li>'
    return f"<li>{label}" + (f"<ul>{inner}</ul>" if inner else "") + "</li>"


# -- the timeline ------------------------------------------------------------------------


def _timeline(timeline: Timeline) -> str:
    rows = timeline.rows()
    if not rows:
        extra = f" ({timeline.untimed} fork(s) without a time)" if timeline.untimed else ""
        return f'<p class="muted">No fork with a time was seen{e(extra)}.</p>'
    span = timeline.span(rows)
    origin = "COMMAND's start" if timeline.started is not None else "the first fork"
    out = [f'<p class="muted">Forks by the second they were made (the report\'s '
           f"precision), counted from {e(origin)}; each kind of fork on a lane, coloured "
           "by its children's fate.</p>", _chart(rows, span)]
    table = ["<table><tr><th>second</th><th>fork</th><th>fate</th>"
             '<th class="num">forks</th></tr>']
    for row in rows[:MAX_TABLE_ROWS]:
        where = f" at {row.site}" if row.site else ""
        table.append(f'<tr><td class="num">+{row.second} s</td>'
                     f"<td><code>{e(row.mechanism)}{e(where)}</code></td>"
                     f'<td><span class="dot bg-{row.tone}"></span>{e(row.fate)}</td>'
                     f'<td class="num">{row.count}</td></tr>')
    table.append("</table>")
    out.extend(table)
    if len(rows) > MAX_TABLE_ROWS:
        out.append(f'<p class="muted">... {len(rows) - MAX_TABLE_ROWS} more rows.</p>')
    if timeline.dropped or timeline.untimed:
        out.append(f'<p class="muted">{timeline.dropped + timeline.untimed} fork(s) not '
                   "placed (no time, or past the rows kept).</p>")
    return "\n".join(out)


def _chart(rows: list[Row], span: float) -> str:
    """An inline SVG: one lane per kind of fork, a mark per second with forks."""
    lanes: dict[str, int] = {}
    for row in rows:
        if row.lane not in lanes and len(lanes) < MAX_LANES:
            lanes[row.lane] = len(lanes)
    other = len(lanes)
    label_width, width, lane_height = 260, 640, 22
    height = (other + (1 if any(r.lane not in lanes for r in rows) else 0)) * lane_height + 30
    out = [f'<svg role="img" width="{label_width + width}" '
           f'height="{height}" viewBox="0 0 {label_width + width} {height}">']
    names = [*lanes, *(["other forks"] if other * lane_height + 30 < height else [])]
    for index, name in enumerate(names):
        y = index * lane_height + 15
        short = name if len(name) <= 42 else name[:41] + "\u2026"
        out.append(f'<text x="0" y="{y}"><title>{e(name)}</title>{e(short)}</text>')
    step = width / span
    for row in rows:
        lane = lanes.get(row.lane, other)
        x = label_width + row.second * step
        y = lane * lane_height + 4
        out.append(f'<rect class="bg-{row.tone}" x="{x:.1f}" y="{y}" '
                   f'width="{max(step, 3.0):.1f}" height="{lane_height - 8}">'
                   f"<title>{e(f'+{row.second} s: {row.count} x {row.lane}')}</title></rect>")
    axis = len(names) * lane_height + 14
    for tick in range(5):
        seconds = span * tick / 4
        x = label_width + seconds * step
        out.append(f'<text x="{min(x, label_width + width - 30):.1f}" y="{axis}">'
                   f"{seconds:.3g} s</text>")
    out.append("</svg>")
    return "".join(out)
