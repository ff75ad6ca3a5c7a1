"""Open ``sqlite3`` connections: the child must never use an inherited one.

SQLite's documentation ("How To Corrupt An SQLite Database File", section 2.6)
says not to carry an open connection across ``fork()``: POSIX advisory locks
are not inherited, so the child writes believing it holds locks it does not,
and closing the connection in the child can checkpoint or delete the parent's
journal. ``sqlite3.Connection`` supports no weak references, so live
connections are found by asking the garbage collector — only when the program
imported ``sqlite3`` at all — and their origins are looked up in the ledger
(with the label set when each was opened, ``forksafe._labels``, if any).

Before Python 3.10 the connection type is not tracked by the collector at all
(it lacks ``Py_TPFLAGS_HAVE_GC``), so ``gc.get_objects()`` never lists one;
there the connections are found one step away instead, among the objects that
tracked containers and live frames refer to. That costs a few milliseconds in a
large program (7 ms for 23,000 objects), and only on those old Pythons.
"""

from __future__ import annotations

import gc
import sys
import types
from typing import Any

from forksafe import _frames, _labels, _ledger
from forksafe._render.sites import where
from forksafe._report import Hazard, Severity
from forksafe._snapshot import Snapshot

REMEDY = (
    "open a new connection in the child and never touch this one there; close it before "
    "forking if the parent is done with it (forksafe.protect_sqlite() enforces this)"
)
MEMORY = (
    "an open in-memory SQLite database ({origin}): after the fork each process has its "
    "own copy, so nothing is shared that could be corrupted"
)
MEMORY_REMEDY = "nothing to do: an in-memory database is private to each process"


def open_connections() -> list[Any]:
    """Live, not yet closed ``sqlite3.Connection`` objects of this process."""
    module = sys.modules.get("sqlite3")
    if module is None:
        return []
    kind = module.Connection
    error = module.ProgrammingError
    found = []
    for obj in _candidates(kind):
        if isinstance(obj, kind):
            try:
                obj.total_changes  # raises ProgrammingError once closed  # noqa: B018
            except error:
                continue
            except Exception:  # a subclass with odd properties: count it as open
                pass
            found.append(obj)
    return found


_HAVE_GC = 1 << 14  # Py_TPFLAGS_HAVE_GC


def _candidates(kind: type) -> list[Any]:
    """Objects among which every reachable connection is found.

    A tracked connection refers to its type (a heap type's instances visit it), so
    ``gc.get_referrers`` of the type and its subclasses finds every one. Never
    ``gc.get_objects()``: its list takes a reference to every object of the
    process, a write to every page of the heap, and after a fork each such page is
    copied — a process of 300,000 objects that had imported sqlite3 forked 7x
    slower under the guard (16,857 page faults per fork). The referrers are found
    by reading each object's references, writing to none but the few found.
    """
    if kind.__flags__ & _HAVE_GC:
        return gc.get_referrers(kind, *_subclasses(kind))
    # Untracked type (Python < 3.10): look one reference away from everything
    # tracked, and from the running frames, which hold locals.
    kinds = {kind, *_subclasses(kind)}
    roots: list[Any] = gc.get_objects()
    for top in sys._current_frames().values():
        frame: types.FrameType | None = top
        while frame is not None:
            roots.append(frame)
            frame = frame.f_back
    seen: dict[int, Any] = {}
    for obj in gc.get_referents(*roots):
        if type(obj) in kinds:
            seen[id(obj)] = obj
    return list(seen.values())


def _subclasses(kind: type) -> list[type]:
    found: list[type] = []
    subclasses: list[type] = kind.__subclasses__()
    for sub in subclasses:
        found += [sub, *_subclasses(sub)]
    return found


def probe(snapshot: Snapshot) -> list[Hazard]:
    if "sqlite3" not in sys.modules:
        if _ledger.has_connections():  # sqlite3 taken out of sys.modules: tidy up
            _ledger.forget_closed(_ledger.recorded_connections(), ())
        return []
    snapshot.volatile = True  # connections come and go unseen by the fingerprint
    hazards = []
    recorded = _ledger.recorded_connections()
    connections = open_connections()
    _ledger.forget_closed(recorded, connections)
    for connection in connections:
        raw = _ledger.connection_origin(connection)
        sites = _ledger.sites(raw) if raw else []
        site = _frames.user_site(sites)
        origin = f"opened at {where(site)}" if site else "origin unknown"
        during = _labels.connection_during(connection)
        if during is not None:
            origin += f" during {during}"
        known, database = _ledger.connection_database(connection)
        try:
            in_transaction = bool(connection.in_transaction)
        except Exception:
            in_transaction = False
        summary = f"an open SQLite connection ({origin}) would be inherited by the child"
        if in_transaction:
            summary += ", in the middle of a transaction"
        evidence: dict[str, Any] = {
            "opened_at": [s.to_dict() for s in sites[:5]] if sites else (
                "origin unknown: call forksafe.observe() before connecting"),
            "in_transaction": in_transaction,
            "code": _frames.source_line(site) if site else None,
        }
        if during is not None:
            evidence["during"] = during
        if known and _ledger.in_memory(database):
            evidence["in_memory"] = True
            hazards.append(Hazard("sqlite-connection", Severity.INFO,
                                  MEMORY.format(origin=origin), MEMORY_REMEDY, evidence))
            continue
        hazards.append(Hazard(
            "sqlite-connection", Severity.WARNING,
            summary + "; using it there can corrupt the database", REMEDY, evidence,
        ))
    return hazards
