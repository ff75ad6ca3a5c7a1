"""A run's forks over time, for the page: when each kind of fork happened, and its fate.

A fork's ``time`` is to the second (docs/report-format.md), and its child's fate
has no time of its own, so the timeline counts forks by the second they were
made, each kind (mechanism, site, fate) on a lane of its own and coloured by that
fate: a burst of crashes at second 40 shows as a red mark on the lane of the
crashing fork. Seconds are counted from COMMAND's start when the report says it
(``started``), else from the first fork. At most ``MAX_ROWS`` (second, kind)
rows are kept; the rest are counted in ``dropped``.
"""

from __future__ import annotations

from forksafe._render.tree import kind_of

TYPE_CHECKING = False
if TYPE_CHECKING:
    from forksafe._render.shapes import EventLike

MAX_ROWS = 5000

class Row:
    """``count`` forks of one kind in one second."""

    __slots__ = ("count", "fate", "mechanism", "second", "site", "tone")

    def __init__(self, second: int, mechanism: str, site: str, fate: str, tone: str) -> None:
        self.second = second
        self.mechanism = mechanism
        self.site = site
        self.fate = fate
        self.tone = tone
        self.count = 0

    @property
    def lane(self) -> str:
        """The kind of fork, as its lane is labelled."""
        where = f" at {self.site}" if self.site else ""
        return f"{self.mechanism}{where}: {self.fate}"


class Timeline:
    """Forks counted by second and kind, as a report is read (``add``)."""

    def __init__(self, started: float | None = None, duration: float | None = None) -> None:
        self.started = started if started and started > 0 else None
        self.duration = duration if duration is not None and duration >= 0 else None
        self.dropped = 0
        self.untimed = 0  # forks whose time the report does not say
        self._times: dict[tuple[float, str, str, str, str], Row] = {}

    def add(self, event: EventLike, when: float, count: int = 1,
            kind: tuple[str, str, str, str] | None = None) -> None:
        """A fork entry made at ``when`` (seconds since the epoch; 0: not known);
        ``kind``: ``forksafe._render.tree.kind_of(event)``, if known."""
        if when <= 0:
            self.untimed += count
            return
        key = (when, *(kind_of(event) if kind is None else kind))
        row = self._times.get(key)
        if row is None:
            if len(self._times) >= MAX_ROWS:
                self.dropped += count
                return
            row = self._times[key] = Row(0, key[1], key[2], key[3], key[4])
        row.count += count

    def rows(self) -> list[Row]:
        """The rows by second (from COMMAND's start, or the first fork), kinds in the
        order they first appeared."""
        if not self._times:
            return []
        origin = self.started if self.started is not None else min(
            when for when, *_ in self._times)
        merged: dict[tuple[int, str, str, str, str], Row] = {}
        for (when, *_), row in self._times.items():
            second = max(0, int(when - origin))
            key = (second, row.mechanism, row.site, row.fate, row.tone)
            into = merged.get(key)
            if into is None:
                into = merged[key] = Row(second, row.mechanism, row.site, row.fate, row.tone)
            into.count += row.count
        order: dict[str, int] = {}
        for row in merged.values():
            order.setdefault(row.lane, len(order))
        return sorted(merged.values(), key=lambda r: (r.second, order[r.lane]))

    def span(self, rows: list[Row]) -> float:
        """Seconds the timeline covers: the run, or to just past its last fork."""
        last = max((row.second + 1 for row in rows), default=1)
        return max(float(last), self.duration or 0.0, 1.0)
