"""Python threads other than the caller: the classic fork hazard.

In the child only the forking thread exists. Every other thread simply stops
wherever it was: a lock it held stays held, a queue it consumed is never
drained, a condition it would have signalled never is. We cannot know that a
given thread is harmless, so each live one is a warning, with enough evidence
(who started it, what it is doing, which ``with lock:`` blocks it is inside) to
decide quickly.
"""

from __future__ import annotations

import threading
from typing import Any

from forksafe import _frames, _ledger
from forksafe._render.sites import where
from forksafe._report import Hazard, Severity, Site
from forksafe._snapshot import Snapshot

ORIGIN_UNKNOWN = "origin unknown: call forksafe.observe() (or install()) before threads start"

REMEDY = (
    "join or stop this thread before forking, or fork before starting it; in the child "
    "it does not exist, and any lock it holds stays locked forever"
)


def probe(snapshot: Snapshot) -> list[Hazard]:
    return [_hazard(t, snapshot) for t in snapshot.python_threads()]


def _hazard(thread: threading.Thread, snapshot: Snapshot) -> Hazard:
    frame = snapshot.frames.get(thread.ident or -1)
    whole = _frames.stack(frame)
    current = whole[:4]
    wait = _frames.waiting(frame) if frame is not None else None
    locks = _frames.held_locks(frame)
    if locks:
        snapshot.volatile = True  # a lock's state changes while the thread stands still
    held = [lock for lock in locks if lock.locked]
    raw = _ledger.thread_origin(thread)
    started = _ledger.sites(raw) if raw else []
    origin = _frames.user_site(started)
    dummy = isinstance(thread, threading._DummyThread)

    who = f"thread {thread.name!r}"
    if dummy:
        who = f"native thread {thread.name!r} running Python code"
    parts = [who]
    if origin is not None:
        parts.append(f"(started at {where(origin)})")
    if held:
        parts.append(f"holds `{held[0].expression}` (taken at {where(held[0].site)})")
    elif wait:
        parts.append(f"is idle, {wait}")
    else:
        parts.append("is running")
    here = _frames.user_site(whole)
    if here is not None:
        parts.append(f"at {where(here)} in {here.function}")
    evidence: dict[str, Any] = {
        "name": thread.name,
        "ident": thread.ident,
        "native_id": thread.native_id,
        "daemon": thread.daemon,
        "state": "idle" if wait and not held else "running",
        "doing": wait,
        "current": [_site(s) for s in current],
        "target": _target(thread),
        "started_at": [_site(s) for s in started[:5]] if started else ORIGIN_UNKNOWN,
        "locks": [lock.to_dict() for lock in locks],
    }
    if dummy:
        evidence["dummy"] = True
    remedy = REMEDY
    if held:
        remedy = (
            f"do not fork while {thread.name!r} is inside `with {held[0].expression}:`; the "
            f"child would wait forever for that lock. {REMEDY[0].upper()}{REMEDY[1:]}"
        )
    return Hazard("thread", Severity.WARNING, " ".join(parts), remedy, evidence)


def _site(site: Site) -> dict[str, Any]:
    data = site.to_dict()
    data["code"] = _frames.source_line(site)
    return data


def _target(thread: threading.Thread) -> str | None:
    target = getattr(thread, "_target", None)
    if target is None:
        return None
    module = getattr(target, "__module__", None) or "?"
    name = getattr(target, "__qualname__", None) or repr(target)
    return f"{module}.{name}"
