"""Native runtimes from the catalog, and native threads nobody accounts for.

A runtime is judged on what it is *doing*, not on being loaded: scikit-learn
loads GNU OpenMP on import, and forking then is perfectly safe until a parallel
region has started the pool. So each catalog entry found among the loaded
libraries is checked for its activity signals (its threads, its own flag
function, its use) and reported at its "active" or its "loaded" severity.
OS threads that no Python thread and no runtime accounts for are reported on
their own: a thread of unknown safety is a warning.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from forksafe import _catalog, _ledger
from forksafe._catalog import Runtime
from forksafe._platform import OSThread
from forksafe._render.hazards import library_name
from forksafe._report import Hazard, Severity
from forksafe._snapshot import Snapshot

_TRUE = ("1", "true", "yes", "on")

UNKNOWN_THREAD_REMEDY = (
    "find which library started this thread (its name and owner are in the evidence) and "
    "fork before it starts, or use forksafe.get_context() to avoid forking"
)


def probe(snapshot: Snapshot, runtimes: tuple[Runtime, ...] = _catalog.RUNTIMES) -> list[Hazard]:
    hazards = []
    libraries = snapshot.libraries
    threads = snapshot.os_threads
    claimed: set[int] = set()
    for runtime, paths in _present(libraries, runtimes):
        if any(activity != "threads" for activity in runtime.activity):
            snapshot.volatile = True  # a flag or SQLite's use: no fingerprint sees it change
        own = [t for t in threads if _belongs(t, runtime)]
        claimed.update(t.tid for t in own)
        signals = _signals(runtime, paths, own, snapshot)
        hazard = _runtime_hazard(runtime, paths, own, signals)
        if hazard is not None:
            hazards.append(hazard)
    if not threads:  # every thread is a Python thread (the common case): nothing more
        return hazards
    snapshot.claimed |= claimed
    dummies = snapshot.dummy_native_ids()
    unknown = [t for t in threads if t.tid not in claimed and t.tid not in dummies]
    if unknown and snapshot.platform.name == "linux":  # procfs tells when a thread is gone
        unknown = _without_exiting(unknown)
    hazards.extend(_unknown_thread(t) for t in unknown)
    return hazards


#: How long a thread that only the interpreter could have started may take to vanish.
EXIT_GRACE = 0.002


def _without_exiting(
    threads: list[OSThread], *, grace: float = EXIT_GRACE, _exists: Any = os.path.exists
) -> list[OSThread]:
    """Drop the threads of Python threads that were joined but have not quite exited.

    ``Thread.join()`` returns once the thread's Python state is gone, before its
    OS thread has run glibc's exit path; for a few microseconds to a millisecond
    it is still listed in ``/proc/self/task``, running in the interpreter's own
    code and known to no ``threading.Thread``. A fork right after a join would
    report it as an unknown native thread (8 checks in 40 did here). Such a
    thread, owned by the interpreter or by nothing visible, gets ``grace``
    seconds to vanish; a thread of any other library is never waited for.
    """
    import time

    interpreter = [t for t in threads if t.owner is None or _is_interpreter(t.owner)]
    if not interpreter:
        return threads
    deadline = time.monotonic() + grace
    gone: set[int] = set()
    while True:
        gone.update(t.tid for t in interpreter
                    if t.tid not in gone and not _exists(f"/proc/self/task/{t.tid}"))
        if len(gone) == len(interpreter) or time.monotonic() >= deadline:
            break
        time.sleep(grace / 20)
    return [t for t in threads if t.tid not in gone]


def _is_interpreter(path: str) -> bool:
    """The Python executable itself, or the shared libpython it runs on."""
    known = _interpreter_paths.get(path)
    if known is None:
        base = os.path.basename(path)
        try:
            known = base.startswith("libpython") or (
                os.path.realpath(path) == os.path.realpath(sys.executable))
        except (OSError, ValueError):
            known = False
        if len(_interpreter_paths) < 64:
            _interpreter_paths[path] = known
    return known


_interpreter_paths: dict[str, bool] = {}


#: The last answer of ``_present``: (libraries, catalog, answer), by identity: the
#: check hands the same list of libraries while nothing was loaded (``forksafe._snapshot``).
_last_present: tuple[list[Any], tuple[Runtime, ...],
                     tuple[tuple[Runtime, list[str]], ...]] | None = None


def _present(libraries: list[Any],
             runtimes: tuple[Runtime, ...]) -> tuple[tuple[Runtime, list[str]], ...]:
    """The runtimes with a loaded library, in catalog order, each with the paths of its
    libraries. Not the whole catalog per check: each entry looked at is an object
    written to (its reference count), a page copied in a fork storm."""
    global _last_present
    last = _last_present
    if last is not None and last[0] is libraries and last[1] is runtimes:
        return last[2]
    found: dict[str, list[str]] = {}
    for lib in libraries:
        for key in _runtimes_of(lib.path, runtimes):
            found.setdefault(key, []).append(lib.path)
    present = tuple((r, found[r.key]) for r in runtimes if found.get(r.key))
    _last_present = (libraries, runtimes, present)
    return present


#: Catalog (by identity) -> library path -> matching runtime keys.
_RUNTIMES_OF: dict[int, tuple[tuple[Runtime, ...], dict[str, tuple[str, ...]]]] = {}
_RUNTIMES_OF_SIZE = 2048


def _runtimes_of(path: str, runtimes: tuple[Runtime, ...]) -> tuple[str, ...]:
    """Keys of the runtimes whose library pattern matches ``path`` (paths rarely change).

    Memoised in plain dicts, cleared when full: an LRU cache would write to its
    bookkeeping on every hit, and hash the whole catalog, for every loaded
    library on every check. The catalog is told apart by identity (and kept
    referenced, so that its id cannot be reused).
    """
    entry = _RUNTIMES_OF.get(id(runtimes))
    if entry is None or entry[0] is not runtimes:
        if len(_RUNTIMES_OF) >= 8:
            _RUNTIMES_OF.clear()
        entry = _RUNTIMES_OF[id(runtimes)] = (runtimes, {})
    paths = entry[1]
    keys = paths.get(path)
    if keys is None:
        keys = tuple(r.key for r in runtimes if r.matches_library(path))
        if len(paths) >= _RUNTIMES_OF_SIZE:
            paths.clear()
        paths[path] = keys
    return keys


def _belongs(thread: OSThread, runtime: Runtime) -> bool:
    if thread.owner is not None and runtime.matches_library(thread.owner):
        return True
    return runtime.matches_thread_name(thread.name)


def _signals(
    runtime: Runtime, paths: list[str], own: list[OSThread], snapshot: Snapshot
) -> list[str]:
    signals = []
    for activity in runtime.activity:
        if activity == "threads" and own:
            signals.append(f"{len(own)} live thread{'s' if len(own) != 1 else ''}")
        elif activity.startswith("flag:"):
            symbol = activity[len("flag:"):]
            if any(snapshot.platform.call_flag(path, symbol) for path in paths):
                signals.append(f"{symbol}() is true")
        elif activity == "sqlite-used" and (_ledger.sqlite_used() or _open_connection_count()):
            signals.append("a connection was opened")
    return signals


def _open_connection_count() -> int:
    from forksafe._probes.sqlite import open_connections

    return len(open_connections())


def _runtime_hazard(
    runtime: Runtime, paths: list[str], own: list[OSThread], signals: list[str]
) -> Hazard | None:
    evidence: dict[str, Any] = {
        "runtime": runtime.key,
        "libraries": paths,
        "active": bool(signals),
        "signals": signals,
        "threads": [
            {"tid": t.tid, "name": t.name, "named": t.named, "state": t.state} for t in own
        ],
        "why": runtime.why,
    }
    if not signals:
        if runtime.loaded is None:
            return None
        summary = f"{runtime.name} is loaded ({library_name(paths[0])}) but not active"
        return Hazard("native-runtime", runtime.loaded, summary, runtime.remedy, evidence)
    severity = runtime.active
    summary = f"{runtime.name} is active: {', '.join(signals)}"
    names = sorted({t.name for t in own if t.named})
    if names:
        summary += f" ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})"
    summary += f" in {library_name(paths[0])}"
    if runtime.fork_support is not None:
        setting = os.environ.get(runtime.fork_support, "").strip().lower()
        enabled = setting in _TRUE
        evidence["fork_support"] = {"variable": runtime.fork_support, "enabled": enabled}
        if enabled:
            severity = min(severity, Severity.WARNING)
            summary += f"; {runtime.fork_support} is on, so it prepares for fork itself"
        elif setting:
            summary += f"; fork support is switched off ({runtime.fork_support} is false)"
        else:
            summary += f"; fork support is off ({runtime.fork_support} not set)"
    return Hazard("native-runtime", severity, summary, runtime.remedy, evidence)


def _unknown_thread(thread: OSThread) -> Hazard:
    owner = library_name(thread.owner) if thread.owner else "unknown code"
    label = repr(thread.name) if thread.named else "(unnamed)"
    summary = f"native thread {thread.tid} {label} ({thread.state}) started by {owner}"
    evidence = {
        "tid": thread.tid,
        "name": thread.name,
        "state": thread.state,
        "owner": thread.owner,
        "stack_libraries": list(thread.libraries),
    }
    return Hazard("native-thread", Severity.WARNING, summary, UNKNOWN_THREAD_REMEDY, evidence)

