"""The process tree of a run: who forked whom, by which mechanism, with what fate.

A run's fork entries are its edges: ``parent_pid`` forked ``child_pid`` by a
mechanism at a site, and the child met a fate. Put together they make one tree
for each process that forked without having been forked where forksafe saw it:
COMMAND, or a program it started by ``exec`` (a spawn child, a worker command).

Grouped like the findings, or a pool of 1,000 workers would be 1,000 lines: the
children of a process with the same mechanism, site and fate, whose own children
look alike (the same lines below them, counts aside), are one line with a count;
alike roots are one line too. A worker whose child crashed has a different line
below it, so it stands apart from the 999 others.

What is kept is a few numbers per fork entry (an entry's ``count`` already stands
for that many alike children) for the first ``MAX_EDGES`` entries with a child;
past them, and for refused forks, only a count per parent and kind of fork: the
tree of a report of any size is drawn in bounded memory, and a process whose own
entry came past the bound is drawn as a root of its own. A tree deeper than
``MAX_DEPTH`` is cut there. Cycles (a pid reused, or a hostile report) end where
they come back.
"""

from __future__ import annotations

from forksafe._render.runs import fate, tone
from forksafe._render.sites import site_text

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Iterable

    from forksafe._render.shapes import EventLike

#: Fork entries kept with their child's pid; past this many, counted by parent and kind.
MAX_EDGES = 20_000
#: Levels of forks drawn below a root.
MAX_DEPTH = 32
#: Lines of the tree the text summary shows (the HTML page shows all of it).
MAX_LINES = 40

HEAD = "process tree (who forked whom; alike children counted, with their fate):"
MORE_LINES = "... {count} more line(s): `forksafe explain --html` draws the whole tree"
CUT = "... deeper forks not drawn (more than {depth} levels)"


class Group:
    """One line of the tree: ``count`` alike processes (the children of one line
    above, or roots), and the lines below them."""

    __slots__ = ("children", "command", "count", "cut", "fate", "mechanism", "pids", "site",
                 "tone")

    def __init__(self, mechanism: str | None, site: str, fate: str, command: str | None,
                 tone: str = "ok") -> None:
        self.mechanism = mechanism  # None for a root: nobody forked it where seen
        self.site = site
        self.fate = fate
        self.tone = tone  # the colour of the fate (``forksafe._render.runs.tone``)
        self.command = command
        self.count = 0
        self.pids: list[int] = []  # the processes of this line that are known by pid
        self.children: list[Group] = []
        self.cut = False  # children below MAX_DEPTH not drawn

    @property
    def label(self) -> str:
        """The line's words, without the branches drawn before it."""
        if self.mechanism is None:
            who = (f"pid {self.pids[0]}" if self.count == 1 and self.pids
                   else f"{self.count} processes")
            command = f" `{self.command}`" if self.command else ""
            return f"{who}{command}{' (COMMAND)' if self.fate == 'COMMAND' else ''}"
        where = f" at {self.site}" if self.site else ""
        count = f" x{self.count}" if self.count > 1 else ""
        return f"{self.mechanism}{where}{count}: {self.fate}"


class Tree:
    """The process tree, built entry by entry as a report is read (``add``)."""

    def __init__(self, command_pid: int | None = None) -> None:
        self.command_pid = command_pid  # COMMAND's own pid, when the report says it
        self._edges = 0
        self._kinds: dict[tuple[str, str, str, str], int] = {}
        self._kind_list: list[tuple[str, str, str, str]] = []
        # parent pid -> [child pid (or -1: no child, or not kept), kind, count], in
        # arrival order; children without a pid of one kind share one entry (_leaves)
        self._children: dict[int, list[tuple[int, int, int]]] = {}
        self._leaves: dict[tuple[int, int], int] = {}  # (parent, kind) -> its index
        self._forked: set[int] = set()  # pids some entry forked
        self._commands: dict[int, str] = {}

    def add(self, event: EventLike, count: int = 1, command: object = None,
            kind: tuple[str, str, str, str] | None = None) -> None:
        """One fork entry (``count`` alike forks); ``command``: the forking process's
        ``sys.argv``, as the report keeps it; ``kind``: ``kind_of(event)``, if known."""
        kind_key = kind_of(event) if kind is None else kind
        number = self._kinds.get(kind_key)
        if number is None:
            number = self._kinds[kind_key] = len(self._kind_list)
            self._kind_list.append(kind_key)
        parent = event.parent_pid
        children = self._children.setdefault(parent, [])
        child = event.child_pid
        if child is None or self._edges >= MAX_EDGES:
            at = self._leaves.get((parent, number))
            if at is None:
                self._leaves[(parent, number)] = len(children)
                children.append((-1, number, count))
            else:
                children[at] = (-1, number, children[at][2] + count)
        else:
            self._edges += 1
            children.append((child, number, count))
            self._forked.add(child)
        if parent not in self._commands and isinstance(command, list) and command:
            self._commands[parent] = " ".join(str(part) for part in command)

    def nested(self) -> bool:
        """Whether some child forked in turn: more than one level, worth drawing (one
        level is what the findings already say)."""
        return any(pid in self._children for pid in self._forked)

    def roots(self) -> list[Group]:
        """The tree, grouped (see the module docstring): one group per alike roots."""
        self._shapes: dict[int, int] = {}
        self._interned: dict[frozenset[tuple[int, int]], int] = {}
        roots = [pid for pid in self._children if pid not in self._forked]
        if self.command_pid in roots:
            roots.remove(self.command_pid)
            roots.insert(0, self.command_pid)
        groups: dict[tuple[object, ...], Group] = {}
        for pid in roots:
            command = self._commands.get(pid)
            is_command = pid == self.command_pid
            key = (command, is_command, self._shape(pid, frozenset()))
            group = groups.get(key)
            if group is None:
                group = groups[key] = Group(None, "", "COMMAND" if is_command else "",
                                            command)
            group.count += 1
            group.pids.append(pid)
        for group in groups.values():
            self._expand(group, frozenset(group.pids), 0)
        return list(groups.values())

    def _shape(self, pid: int, path: frozenset[int]) -> int:
        """An id for what ``pid``'s children look like, counts aside (0: no children)."""
        known = self._shapes.get(pid)
        if known is not None:
            return known
        if len(path) > MAX_DEPTH:
            return -1
        inside = path | {pid}
        key = frozenset((kind, self._shape(child, inside) if self._forks(child, inside) else 0)
                        for child, kind, _ in self._children.get(pid, ()))
        found = self._interned.setdefault(key, len(self._interned) + 1)
        self._shapes[pid] = found
        return found

    def _forks(self, pid: int, path: frozenset[int]) -> bool:
        """Whether ``pid`` forked, and is not a process above it again (a cycle)."""
        return pid in self._children and pid not in path

    def _expand(self, group: Group, path: frozenset[int], depth: int) -> None:
        """The lines below ``group``: its processes' children, alike ones together."""
        if depth >= MAX_DEPTH:
            group.cut = any(pid in self._children for pid in group.pids)
            return
        below: dict[tuple[int, int], Group] = {}
        for pid in group.pids:
            for child, kind, count in self._children.get(pid, ()):
                forked = self._forks(child, path)
                key = (kind, self._shape(child, path) if forked else 0)
                line = below.get(key)
                if line is None:
                    mechanism, site, what, colour = self._kind_list[kind]
                    line = below[key] = Group(mechanism, site, what, None, colour)
                line.count += count
                if forked:
                    line.pids.append(child)
        group.children = list(below.values())
        for line in group.children:
            if line.pids:
                self._expand(line, path | frozenset(line.pids), depth + 1)

    def lines(self, limit: int = MAX_LINES) -> list[str]:
        """The tree as text, at most ``limit`` lines of it (and a line saying so)."""
        out = [HEAD]
        for root in self.roots():
            out.append("  " + root.label)
            out.extend(_branches(root.children, "  "))
            if root.cut:
                out.append("    " + CUT.format(depth=MAX_DEPTH))
        if len(out) > limit + 1:
            hidden = len(out) - limit
            out = [*out[:limit], "  " + MORE_LINES.format(count=hidden)]
        return out


def kind_of(event: EventLike) -> tuple[str, str, str, str]:
    """What a line of the tree (and a lane of the timeline) tells forks apart by: the
    mechanism, the site, the child's fate in words, and that fate's colour."""
    if event.outcome is not None:
        what = fate(event.outcome)
    else:
        what = "refused" if event.action == "refused" else "no outcome seen"
    return (event.mechanism, site_text(event.site) if event.site else "", what, tone(event))


def _branches(groups: Iterable[Group], indent: str) -> list[str]:
    """ASCII branches (any terminal shows them), ``|-`` for all lines but the last."""
    items = list(groups)
    out = []
    for number, group in enumerate(items):
        last = number == len(items) - 1
        out.append(f"{indent}{'`-' if last else '|-'} {group.label}")
        deeper = indent + ("   " if last else "|  ")
        out.extend(_branches(group.children, deeper))
        if group.cut:
            out.append(deeper + CUT.format(depth=MAX_DEPTH))
    return out
