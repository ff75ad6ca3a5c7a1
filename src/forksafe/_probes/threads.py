"""Python threads other than the caller: the classic fork hazard.

In the child only the forking thread exists. Every other thread simply stops
wherever it was: a lock it held stays held, a queue it consumed is never
drained, a condition it would have signalled never is. We cannot know that a
given thread is harmless, so each live one is a warning, with enough evidence
(who started it, what it is doing, which ``with lock:`` blocks it is inside) to
decide quickly — unless the code that owns it handles fork itself
(``forksafe._forkaware``: it stops the thread before every fork, or starts a new
one in every child), or the catalog knows the thread for harmless
(``forksafe._catalog.THREADS``).

Python threads are Python threads however they were started: one started with
``_thread.start_new_thread`` has no ``threading.Thread`` object, but its frames
are in ``sys._current_frames()`` and it is reported here, not as a native thread.

When the program's driver labels what it is doing (``forksafe._labels``: the
pytest plugin names each test), the label set when the thread started is shown
with its start site: "started at test_a.py:9 during tests/test_a.py::test_y"
names the test that left it behind, not only its line.
"""

from __future__ import annotations

import threading
import types
import weakref
from _thread import get_ident
from typing import Any

from forksafe import _catalog, _forkaware, _frames, _ledger
from forksafe._render.sites import where, working_directory
from forksafe._report import Hazard, Severity, Site
from forksafe._snapshot import ACTIVE, Snapshot, read_tokens, same_tokens

ORIGIN_UNKNOWN = "origin unknown: call forksafe.observe() (or install()) before threads start"
MAIN_THREAD = "the main thread, started by the interpreter"

REMEDY = (
    "join or stop this thread before forking, or fork before starting it; in the child "
    "it does not exist, and any lock it holds stays locked forever"
)
HANDLED = {
    _forkaware.BEFORE: "handles fork itself: {name} runs before every fork",
    _forkaware.CHILD: "handles fork itself: {name} runs in every child",
    _forkaware.MULTIPROCESSING: (
        "handles fork itself for multiprocessing's children only ({name} runs there; "
        "not after a bare os.fork)"),
}
HANDLED_REMEDY = "nothing to do: its owner makes it safe across fork"
#: After the start site: when, as the program's driver labelled it (``forksafe._labels``).
DURING = " during {}"


def probe(snapshot: Snapshot) -> list[Hazard]:
    if len(ACTIVE) == 1 and get_ident() in ACTIVE and not snapshot.raw_threads():
        return []  # the caller alone
    # What every thread's hazard is looked up by, read once per check, not per thread.
    handlers = snapshot.fork_handlers_version()
    try:
        directory: str | None = working_directory()
    except OSError:
        directory = None
    tokens = _tokens(snapshot, handlers, directory)
    if tokens is not None:
        known = _known(tokens)
        if known is not None:
            return known
    threads = snapshot.python_threads()
    raw = snapshot.raw_threads()
    if not threads and not raw:
        return []
    frames = snapshot.frames
    hazards = [_hazard(t, snapshot, frames, handlers, directory) for t in threads]
    if tokens is not None and not raw and len(tokens) == len(threads):
        _learn(tokens, hazards)
    hazards.extend(_raw_hazard(ident, tid, snapshot) for ident, tid in raw)
    return hazards


#: Hazards by their thread's token (``forksafe._speedups.thread_tokens``: the same
#: token while a thread stands where it stood), made under ``_token_context`` (the fork
#: handlers version and the working directory); bounded: cleared when full. This is
#: the memo below without a Python look at any thread: in a fork storm each of 8
#: threads is met at one of a few places, and reading their frames from Python made
#: a frame object for each and wrote to every one (~90 pages copied per fork).
BY_TOKEN: dict[object, Hazard] = {}
_token_context: tuple[int, str | None] = (0, None)


def _tokens(snapshot: Snapshot, handlers: int, directory: str | None) -> list[object] | None:
    """Each other thread's token (``forksafe._snapshot.read_tokens``); the memo by token
    emptied when the hazards' context changed. None: no tokens to go by."""
    global _token_context
    if directory is None:
        return None
    tokens = snapshot.thread_tokens()
    context = _token_context
    if context[0] != handlers or context[1] != directory:
        BY_TOKEN.clear()
        _token_context = (handlers, directory)
    return tokens


def by_tokens(tokens: list[object], directory: str) -> list[Hazard] | None:
    """The probe's answer for threads whose tokens are ``tokens``, if every one is
    known under the fork handlers there are now and ``directory``; else None (for
    ``forksafe._check``, which then runs the probe)."""
    context = _token_context
    if context[1] != directory or \
            context[0] != _forkaware.versioned(_forkaware.GUARD_HOOKS)[1]:
        return None
    return _known(tokens)


def _known(tokens: list[object]) -> list[Hazard] | None:
    """Every thread's hazard, if each token has one; else None."""
    hazards = []
    memo = BY_TOKEN
    for token in tokens:
        hazard = memo.get(token)
        if hazard is None:
            return None
        hazards.append(hazard)
    return hazards


def _learn(tokens: list[object], hazards: list[Hazard]) -> None:
    """Keep each hazard by its thread's token, if every thread still stands where its
    token says (the probe's Python may have let another thread run) — but not one
    inside a ``with lock:`` block, whose lock may change while the thread stands still."""
    if not same_tokens(tokens, read_tokens()):
        return
    if len(BY_TOKEN) + len(tokens) > MEMO_SIZE:
        BY_TOKEN.clear()
    for token, hazard in zip(tokens, hazards):
        if not hazard.evidence.get("locks"):
            BY_TOKEN[token] = hazard


#: Hazards made before, by what each was made of (``_memo_key``); bounded: cleared when
#: full. In a process that forks from several threads at once, every fork's check finds
#: the others elsewhere, so the report as a whole is rarely reused (``forksafe._check``);
#: but each thread stands at one of a few places, and its hazard is made once per place.
MEMO: dict[tuple[Any, ...], Hazard] = {}
MEMO_SIZE = 1024


def _hazard(thread: threading.Thread, snapshot: Snapshot,
            frames: dict[int, types.FrameType], handlers: int,
            directory: str | None) -> Hazard:
    frame = _frames.outside_forksafe(frames.get(thread._ident or -1))  # type: ignore[attr-defined]
    key = None if directory is None else _memo_key(thread, frame, handlers, directory)
    if key is not None:
        known = MEMO.get(key)
        if known is not None:
            return known
    hazard = _made(thread, frame, snapshot.fork_handlers_of(thread), snapshot)
    if key is not None and not hazard.evidence.get("locks"):
        # A `with` block's lock may be taken or released while the thread stands
        # still: such a hazard is made anew each time (and the check's report too).
        if len(MEMO) >= MEMO_SIZE:
            MEMO.clear()
        MEMO[key] = hazard
    return hazard


def _memo_key(thread: threading.Thread, frame: types.FrameType | None,
              handlers: int, directory: str) -> tuple[Any, ...] | None:
    """Everything a thread's hazard is made of: the thread (the same object, by weak
    reference; its name and daemon flag), where it stands, the fork handlers there
    are (their version), and the directory its sites are shown against. None: not to
    be kept. (The attributes behind ``name``, ``daemon`` and ``native_id``: a property
    is a call, and every call in a storm's checks is pages written.)"""
    stack = _frames.stack_key(frame)
    if stack is None:
        return None
    return (weakref.ref(thread), thread._name, thread._daemonic,  # type: ignore[attr-defined]
            thread._native_id, handlers, directory, stack)  # type: ignore[attr-defined]


def _made(thread: threading.Thread, frame: types.FrameType | None,
          handlers: list[_forkaware.Handler], snapshot: Snapshot) -> Hazard:
    raw = _ledger.thread_origin(thread)
    started = _ledger.sites(raw) if raw else []
    main = thread is threading.main_thread()
    dummy = isinstance(thread, threading._DummyThread)
    who = f"thread {thread.name!r}"
    if dummy:
        who = f"native thread {thread.name!r} running Python code"
    evidence: dict[str, Any] = {
        "name": thread.name,
        "ident": thread.ident,
        "native_id": thread.native_id,
        "daemon": thread.daemon,
        "target": _target(thread),
    }
    if main:
        evidence["main"] = True
    if dummy:
        evidence["dummy"] = True
    code = _code(frame) + _target_code(thread)
    return _build(who, frame, started, unknown=MAIN_THREAD if main else ORIGIN_UNKNOWN,
                  evidence=evidence, snapshot=snapshot, handlers=handlers,
                  known=_catalog.known_thread(code), during=_ledger.thread_during(thread))


def _raw_hazard(ident: int, tid: int | None, snapshot: Snapshot) -> Hazard:
    frame = _frames.outside_forksafe(snapshot.frames.get(ident))
    origin = _ledger.raw_thread_origin(ident)
    started = _ledger.sites(origin[0]) if origin else []
    evidence: dict[str, Any] = {
        "name": f"(started with _thread.start_new_thread, {ident:#x})",
        "ident": ident,
        "native_id": tid,
        "daemon": True,
        "target": origin[1] if origin else None,
        "raw": True,
    }
    who = "a Python thread started with _thread.start_new_thread"
    return _build(who, frame, started, unknown=ORIGIN_UNKNOWN, evidence=evidence,
                  snapshot=snapshot, handlers=[], known=_catalog.known_thread(_code(frame)),
                  during=origin[2] if origin else None)


def _build(who: str, frame: types.FrameType | None, started: list[Site], *, unknown: str,
           evidence: dict[str, Any], snapshot: Snapshot,
           handlers: list[_forkaware.Handler], known: _catalog.KnownThread | None,
           during: str | None = None) -> Hazard:
    whole = _frames.stack(frame)
    wait = _frames.waiting(frame) if frame is not None else None
    locks = _frames.held_locks(frame)
    if locks:
        snapshot.volatile = True  # a lock's state changes while the thread stands still
    held = [lock for lock in locks if lock.locked]
    origin = _frames.user_site(started)
    parts = [who]
    if origin is not None:
        parts.append(f"(started at {where(origin)}{DURING.format(during) if during else ''})")
    elif during is not None:
        parts.append(f"(started{DURING.format(during)})")
    if held:
        parts.append(f"holds `{held[0].expression}` (taken at {where(held[0].site)})")
    elif wait:
        parts.append(f"is idle, {wait}")
    else:
        parts.append("is running")
    here = _frames.user_site(whole)
    if here is not None:
        parts.append(f"at {where(here)} in {here.function}")
    evidence.update({
        "state": "idle" if wait and not held else "running",
        "doing": wait,
        "current": [_site(s) for s in whole[:4]],
        "started_at": [_site(s) for s in started[:5]] if started else unknown,
        "locks": [lock.to_dict() for lock in locks],
    })
    if during is not None:
        evidence["during"] = during
    severity = Severity.WARNING
    remedy = REMEDY
    if known is not None:
        evidence["known"] = known.key
        evidence["why"] = known.why
        remedy = known.remedy
        if known.pool is not None:
            evidence["pool"] = known.pool
        if known.severity is not None:
            severity = known.severity
    if handlers:
        evidence["fork_handlers"] = [{"name": h.name, "when": h.when} for h in handlers]
        handler = next((h for h in handlers if h.when != _forkaware.MULTIPROCESSING),
                       handlers[0])
        parts.append(f"- {HANDLED[handler.when].format(name=handler.name)}")
        if handler.when != _forkaware.MULTIPROCESSING:
            severity = Severity.INFO
            remedy = HANDLED_REMEDY
    if held and severity > Severity.INFO:
        name = evidence["name"]
        remedy = (
            f"do not fork while {name!r} is inside `with {held[0].expression}:`; the "
            f"child would wait forever for that lock. {remedy[0].upper()}{remedy[1:]}"
        )
    return Hazard("thread", severity, " ".join(parts), remedy, evidence)


def _code(frame: types.FrameType | None) -> list[tuple[str, str]]:
    """(file, function) of every frame of a stack, innermost first."""
    out: list[tuple[str, str]] = []
    while frame is not None and len(out) < 64:
        out.append((frame.f_code.co_filename, frame.f_code.co_name))
        frame = frame.f_back
    return out


def _target_code(thread: threading.Thread) -> list[tuple[str, str]]:
    """(file, function) of the thread's target, which need not be on its stack yet, and
    of its class's ``run``."""
    out: list[tuple[str, str]] = []
    target = (_frames.instance_dict(thread) or {}).get("_target")
    if isinstance(target, types.MethodType):
        target = target.__func__
    for func in (target, type(thread).__dict__.get("run")):
        if isinstance(func, types.FunctionType):
            out.append((func.__code__.co_filename, func.__code__.co_name))
    return out


def _site(site: Site) -> dict[str, Any]:
    data = site.to_dict()
    data["code"] = _frames.source_line(site)
    return data


def _target(thread: threading.Thread) -> str | None:
    target = (_frames.instance_dict(thread) or {}).get("_target")
    if target is None:
        return None
    module = getattr(target, "__module__", None) or "?"
    name = getattr(target, "__qualname__", None) or repr(target)
    return f"{module}.{name}"
