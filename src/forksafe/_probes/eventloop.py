"""Running asyncio event loops, in the calling thread and in others.

A forked child inherits the loop's selector — the very same epoll instance in
the kernel — and its self-pipe: registering or waiting on it in the child
steals the parent's events. A loop running in another thread is gone in the
child but its state (and any lock its callbacks held) is not.
"""

from __future__ import annotations

import os
import sys
import types

from forksafe._forkaware import BEFORE, MULTIPROCESSING
from forksafe._report import Hazard, Severity
from forksafe._snapshot import Snapshot

REMEDY_CALLER = (
    "fork before starting the loop, or run the forking code in a process without a loop; "
    "in the child, never reuse the parent's loop: create one with asyncio.new_event_loop()"
)
REMEDY_OTHER = (
    "fork before starting the loop's thread, or use forksafe.get_context() so children "
    "do not inherit it; in the child, create a new loop with asyncio.new_event_loop()"
)


def probe(snapshot: Snapshot) -> list[Hazard]:
    events = sys.modules.get("asyncio.events")
    if events is None:
        return []
    hazards = []
    loop = events._get_running_loop()
    if loop is not None:
        hazards.append(Hazard(
            "event-loop", Severity.WARNING,
            f"the calling thread {snapshot.caller.name!r} is running an asyncio event loop "
            f"({type(loop).__name__}); the child would share its selector with the parent",
            REMEDY_CALLER,
            {"thread": snapshot.caller.name, "loop": repr(loop), "in_caller": True},
        ))
    threads = {t.ident: t for t in snapshot.python_threads()}
    for ident, frame in snapshot.frames.items():
        if ident == snapshot.caller.ident:
            continue
        running = _loop_frame(frame)
        if running is None:
            continue
        thread = threads.get(ident)
        name = thread.name if thread is not None else f"thread {ident}"
        evidence = {"thread": name, "ident": ident, "loop": running, "in_caller": False}
        summary = (f"thread {name!r} runs an asyncio event loop; the child inherits its "
                   "state without the thread that drives it")
        handlers = snapshot.fork_handlers_of(thread) if thread is not None else []
        handler = next((h for h in handlers if h.when != MULTIPROCESSING), None)
        if handler is None:
            hazards.append(Hazard("event-loop", Severity.WARNING, summary, REMEDY_OTHER,
                                  evidence))
            continue
        # The loop's thread is its owner's, which handles fork itself (gunicorn stops
        # its control server's loop before every fork): so is the loop.
        evidence.update(native_id=thread.native_id if thread is not None else None,
                        fork_handlers=[{"name": h.name, "when": h.when} for h in handlers])
        hazards.append(Hazard(
            "event-loop", Severity.INFO,
            f"{summary} - handles fork itself: {handler.name} runs "
            f"{'before every fork' if handler.when == BEFORE else 'in every child'}",
            "nothing to do: its owner makes it safe across fork", evidence))
    if hazards:
        snapshot.volatile = True  # the loop's identity is not in the fingerprint
    return hazards


def _loop_frame(frame: types.FrameType | None) -> str | None:
    while frame is not None:
        code = frame.f_code
        if code.co_name == "run_forever" and os.path.basename(code.co_filename) == "base_events.py":
            loop = frame.f_locals.get("self")
            return f"{type(loop).__name__} at {id(loop):#x}"
        frame = frame.f_back
    return None
