"""Reading another thread's Python stack: where it is, whether it waits, what it holds.

Everything here works on live frames of *other* threads, so it only reads:
source lines through ``linecache`` and, to tell whether a ``with`` block's lock
is held, a dotted name looked up in the frame's variables and in instance
``__dict__``s — never ``getattr`` on arbitrary objects, which could run a
property and change the program being diagnosed.
"""

from __future__ import annotations

import linecache
import os
import re
import types
from dataclasses import dataclass
from typing import Any

from forksafe._report import Site
from forksafe._stdlib import PLATSTDLIB, STDLIB

#: Functions in which a thread sits idle, by (file name suffix, function name).
_WAIT_FUNCTIONS = {
    ("threading.py", "wait"): "waiting on a threading Condition/Event",
    ("threading.py", "_wait_for_tstate_lock"): "waiting in Thread.join",
    ("threading.py", "join"): "waiting in Thread.join",
    ("queue.py", "get"): "waiting in queue.Queue.get",
    ("queue.py", "put"): "waiting in queue.Queue.put",
    ("selectors.py", "select"): "waiting in a selector (select/poll/epoll)",
    ("socket.py", "accept"): "waiting in socket.accept",
    ("socket.py", "readinto"): "waiting on a socket read",
    ("connection.py", "_recv"): "waiting on a multiprocessing connection",
    ("connection.py", "wait"): "waiting on a multiprocessing connection",
}

#: A top frame whose current line calls one of these is blocked inside that call:
#: C functions push no Python frame, so the caller's line is all there is to see.
_BLOCKING_CALL = re.compile(
    r"\b(time\.sleep|sleep|select|poll|epoll\.poll|input)\s*\("
    r"|\.(wait|acquire|get|join|recv|recvfrom|recv_into|accept|read|readline|sleep)\s*\("
)

_WITH = re.compile(r"^(\s*)(async\s+)?with\s+(.+?)\s*:\s*(#.*)?$")
_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")

_LIB_DIRS = tuple(
    os.path.normcase(os.path.realpath(p)) + os.sep
    for p in {STDLIB, PLATSTDLIB}
)
_OWN_DIR = os.path.normcase(os.path.dirname(os.path.realpath(__file__))) + os.sep


#: Answers of ``is_library_file``, bounded: cleared when full. A plain dict, not
#: ``functools.lru_cache``: a hit in an LRU cache moves its entry to the front,
#: a write to memory on every call, and the guard calls this on every fork,
#: when each page first written costs a copy-on-write fault.
LIBRARY_FILES: dict[str, bool] = {}
LIBRARY_FILES_SIZE = 4096


def is_library_file(filename: str) -> bool:
    """True for the standard library and forksafe itself: not the user's code."""
    known = LIBRARY_FILES.get(filename)
    if known is not None:
        return known
    path = os.path.normcase(os.path.realpath(filename)) if os.sep in filename else filename
    answer = "site-packages" not in path and (
        path.startswith(_LIB_DIRS) or path.startswith(_OWN_DIR) or filename.startswith("<frozen"))
    if len(LIBRARY_FILES) >= LIBRARY_FILES_SIZE:
        LIBRARY_FILES.clear()
    LIBRARY_FILES[filename] = answer
    return answer


#: Whether a code object is forksafe's own, by its id (hashing a code object hashes
#: its contents); the code is kept with the answer, so that its id is not reused.
#: Bounded: cleared when full.
OWN_CODE: dict[int, tuple[types.CodeType, bool]] = {}


def outside_forksafe(frame: types.FrameType | None) -> types.FrameType | None:
    """The innermost frame of another thread's stack that is not forksafe's own.

    A thread in the middle of its own guarded fork (its check, its wait) is where
    the program put it: at the line that forks or waits. Its stack inside forksafe
    says nothing about the program, and changes at every step of the check; from
    its caller on, it is what the child loses. A stack all forksafe's is kept whole.
    """
    top = frame
    while frame is not None:
        code = frame.f_code
        known = OWN_CODE.get(id(code))
        if known is None:
            if len(OWN_CODE) >= LIBRARY_FILES_SIZE:
                OWN_CODE.clear()
            filename = code.co_filename
            path = os.path.normcase(os.path.realpath(filename)) if os.sep in filename else ""
            known = OWN_CODE[id(code)] = (code, path.startswith(_OWN_DIR))
        if not known[1]:
            return frame
        frame = frame.f_back
    return top


def stack_key(frame: types.FrameType | None, limit: int = 64) -> tuple[object, ...] | None:
    """A stack as (code, line) pairs, innermost first: equal while the thread stands
    where it stood; None for a stack deeper than ``limit``."""
    parts: list[object] = []
    while frame is not None:
        if len(parts) >= 2 * limit:
            return None
        parts += (frame.f_code, frame.f_lineno)
        frame = frame.f_back
    return tuple(parts)


def user_site(sites: list[Site]) -> Site | None:
    """The innermost site in the user's code, else the innermost site at all."""
    for site in sites:
        if not is_library_file(site.file):
            return site
    return sites[0] if sites else None


def stack(frame: types.FrameType | None, limit: int = 12) -> list[Site]:
    """Sites of ``frame`` and its callers, innermost first."""
    out: list[Site] = []
    while frame is not None and len(out) < limit:
        out.append(Site(frame.f_code.co_filename, line_of(frame), frame.f_code.co_name))
        frame = frame.f_back
    return out


def scope_holding(module: str, function: str, name: str, value: object) -> dict[str, Any] | None:
    """The variables of a running ``module.function`` (in any thread) whose local
    ``name`` is ``value`` itself: how the code that consumes an object is found
    (``forksafe._unstick`` finds the test runner that reads a pool's results)."""
    import sys

    for top in sys._current_frames().values():
        frame: types.FrameType | None = top
        while frame is not None:
            if frame.f_code.co_name == function and frame.f_globals.get("__name__") == module:
                scope = frame.f_locals
                if scope.get(name) is value:
                    return dict(scope)
            frame = frame.f_back
    return None


def line_of(frame: types.FrameType) -> int:
    """The line another thread's frame is at. ``f_lineno`` is None while that thread
    is at an instruction of no line (a storm of forking threads meets it): then the
    first line of the function, a place that takes no lock."""
    return frame.f_lineno or frame.f_code.co_firstlineno


def source_line(site: Site) -> str:
    return linecache.getline(site.file, site.line).strip()


def waiting(frame: types.FrameType) -> str | None:
    """Why the thread at ``frame`` is idle, or None when it seems to be running."""
    code = frame.f_code
    key = (os.path.basename(code.co_filename), code.co_name)
    if key in _WAIT_FUNCTIONS and is_library_file(code.co_filename):
        return _WAIT_FUNCTIONS[key]
    line = linecache.getline(code.co_filename, line_of(frame))
    match = _BLOCKING_CALL.search(line)
    if match:
        return f"blocked in `{match.group(0).strip()}...)`"
    return None


@dataclass(frozen=True)
class HeldLock:
    """A ``with`` block the thread is inside, and whether its object is a held lock."""

    expression: str
    site: Site
    locked: bool | None  # None: not a recognisable lock, or could not be resolved

    def to_dict(self) -> dict[str, Any]:
        return {"lock": self.expression, "at": f"{self.site.file}:{self.site.line}",
                "locked": self.locked}


def held_locks(frame: types.FrameType | None, limit: int = 12) -> list[HeldLock]:
    """``with`` blocks enclosing the current line of each frame, innermost frame first.

    Only blocks whose object looks like a lock (a ``Lock``/``RLock``/
    ``Condition``/``Semaphore``, or a name containing "lock" or "mutex") are
    kept. Standard-library frames are skipped: their ``with`` blocks around
    waits release the lock while waiting.
    """
    found: list[HeldLock] = []
    depth = 0
    while frame is not None and depth < limit:
        code = frame.f_code
        if not is_library_file(code.co_filename):
            for expr, line in _enclosing_withs(code, line_of(frame)):
                obj, resolved = _resolve(expr, frame)
                locked = _is_locked(obj) if resolved else None
                if locked is not None or re.search(r"lock|mutex", expr, re.IGNORECASE):
                    found.append(HeldLock(expr, Site(code.co_filename, line, code.co_name), locked))
        frame = frame.f_back
        depth += 1
    return found


#: Answers of ``_enclosing_withs`` by (code, line), bounded: cleared when full. Every
#: check reads every thread's ``with`` blocks, and a thread parked at one line
#: (idle, or a storm of threads forking from the same loop) asks the same again.
WITHS: dict[tuple[types.CodeType, int], list[tuple[str, int]]] = {}
WITHS_SIZE = 4096


def _enclosing_withs(code: types.CodeType, lineno: int) -> list[tuple[str, int]]:
    key = (code, lineno)
    found = WITHS.get(key)
    if found is None:
        if len(WITHS) >= WITHS_SIZE:
            WITHS.clear()
        found = WITHS[key] = _scan_withs(code, lineno)
    return found


def _scan_withs(code: types.CodeType, lineno: int) -> list[tuple[str, int]]:
    lines = linecache.getlines(code.co_filename)
    if not lines or lineno > len(lines):
        return []
    current = lines[lineno - 1]
    open_blocks: list[tuple[int, str, int]] = []  # (indent, expression, line)
    for number in range(code.co_firstlineno, lineno):
        text = lines[number - 1]
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        indent = len(text) - len(text.lstrip())
        while open_blocks and indent <= open_blocks[-1][0]:
            open_blocks.pop()
        match = _WITH.match(text)
        if match:
            open_blocks.append((indent, match.group(3), number))
    indent = len(current) - len(current.lstrip())
    while open_blocks and indent <= open_blocks[-1][0]:
        open_blocks.pop()
    result = []
    for _, expr, number in open_blocks:
        for part in expr.split(","):
            item = part.split(" as ")[0].strip()
            result.append((item, number))
    return result


def _resolve(expr: str, frame: types.FrameType) -> tuple[object, bool]:
    if not _DOTTED.match(expr):
        return None, False
    head, *rest = expr.split(".")
    scopes: list[Any] = [frame.f_locals, frame.f_globals]
    for scope in scopes:
        if head in scope:
            obj = scope[head]
            break
    else:
        return None, False
    for name in rest:
        namespace = obj.__dict__ if isinstance(obj, types.ModuleType) else instance_dict(obj)
        if namespace is None or name not in namespace:
            return None, False
        obj = namespace[name]
    return obj, True


def instance_dict(obj: object) -> dict[str, Any] | None:
    """``obj.__dict__`` read without ``getattr``: no property of the program runs."""
    try:
        namespace = object.__getattribute__(obj, "__dict__")
    except AttributeError:
        return None
    return namespace if isinstance(namespace, dict) else None


def _is_locked(obj: object) -> bool | None:
    """Whether ``obj`` is a threading primitive that is currently held, if it is one."""
    kind = type(obj).__name__
    if kind == "Condition":
        return _is_locked((instance_dict(obj) or {}).get("_lock"))
    if kind in ("lock", "Lock"):
        return bool(obj.locked())  # type: ignore[attr-defined]
    if kind in ("RLock", "_RLock"):
        # Only the C RLock's repr tells its owner without acquiring it.
        return repr(obj).startswith("<locked")
    if kind in ("Semaphore", "BoundedSemaphore"):
        namespace = instance_dict(obj) or {}
        value = namespace.get("_value")
        return None if not isinstance(value, int) else value == 0
    return None
