"""How bad each hazard is for *this* fork, and what fits as a fix.

The check (``forksafe._check``) says what a fork now would meet; whether that
hurts depends on the fork:

* a thread whose owner handles fork for multiprocessing's children only (a
  ``multiprocessing.Queue``'s feeder) is harmless to a child multiprocessing
  starts, not to a bare ``os.fork`` child;
* a pool that forks a worker to replace another (``maxtasksperchild``, Celery's
  ``--max-tasks-per-child``) does so from its own handler thread: the new worker
  only runs the pool's tasks, so the pool's other threads, and any thread that held
  no lock at the fork, are nothing it uses (an executor's or a queue's threads
  stay hazards: a task may use what they serve);
* a hazard the project accepted (``forksafe._accept``) is info, with the reason;
* the fix must be one the user can apply: ``get_context()`` for a multiprocessing
  fork, a worker hook for a pre-forking server (gunicorn), Celery's
  ``worker_process_init`` for billiard's forks.

``grade`` returns the report with those hazards graded ``info`` (summary and
evidence say why) and the fixes fitted; a graded report is kept for the next fork
of the same kind, so an unchanged process pays nothing again.
"""

from __future__ import annotations

import dataclasses
import os
import types
from typing import Any, NamedTuple

from forksafe import _accept, _catalog
from forksafe._forkaware import BEFORE, MULTIPROCESSING, MULTIPROCESSING_MECHANISMS
from forksafe._report import Hazard, Report, Severity


class ForkContext(NamedTuple):
    """What kind of fork is being judged."""

    mechanism: str
    #: The pool replacing a worker when this fork is one (``multiprocessing.Pool``,
    #: ``billiard.Pool``), else None.
    pool: str | None = None
    #: A pre-forking framework whose own code forks (``gunicorn``, ``celery``).
    framework: str | None = None


#: A check with no fork behind it (``forksafe.check()``, ``forksafe check``).
GENERIC = ForkContext("check")

HANDLED_MP = "- handles fork itself: {name} runs in multiprocessing's children"
POOL_THREAD = "- the pool's own thread: the worker it forks to replace another never uses it"
POOL_OTHER = (
    "- the pool's replacement worker only runs the pool's tasks, and this thread held no lock "
    "at the fork")
#: Threads that stay hazards in a pool's replacement worker: a task may well use the
#: inherited executor or queue they serve.
_TASK_HAZARDS = ("thread-pool-worker", "mp-queue-feeder")
ACCEPTED = "(accepted: {reason})"
NOTHING = "nothing to do: {why}"

#: What replaces the catalog's "use a start method that does not fork" where that is
#: not the user's choice to make.
FIT_START = {
    "gunicorn": (
        "create it in each worker instead of in the preloaded app (a post_fork or "
        "post_worker_init hook in gunicorn.conf.py), or do not --preload the code that "
        "starts it"
    ),
    "celery": (
        "create it in each worker process (Celery's worker_process_init signal) instead of "
        "before the pool starts"
    ),
    "fork": (
        "start the child with exec (subprocess) or through multiprocessing with a 'spawn' or "
        "'forkserver' context instead of a bare fork"
    ),
}
FIT_THREAD = {
    "gunicorn": (
        "start this thread in each worker (a post_fork or post_worker_init hook in "
        "gunicorn.conf.py) rather than in the preloaded app, or do not --preload the code "
        "that starts it"
    ),
    "celery": (
        "start this thread in each worker process (Celery's worker_process_init signal) "
        "rather than before the pool starts"
    ),
}
FIT_SQLITE = {
    "gunicorn": (
        "open connections in each worker (a post_fork hook, or lazily on first use), not in "
        "the preloaded app; close this one before the arbiter forks"
    ),
    "celery": (
        "open connections in each worker process (Celery's worker_process_init signal); "
        "close this one before the pool starts"
    ),
}

_THREAD_REMEDY_START = "join or stop this thread before forking"
_SQLITE_REMEDY_START = "open a new connection in the child"

#: (id(report), context, rules version) -> (report, graded, confirmations)
_graded: dict[tuple[int, ForkContext, int], tuple[Report, Report, tuple[Any, ...]]] = {}


#: ``_catalog.POOL_REFORKS`` by function name: a frame's name is looked up once, not
#: compared with every entry (each entry read is objects written to, per fork).
_REFORKS_BY_NAME: dict[str, list[tuple[str, str]]] = {}
for _suffix, _function, _name in _catalog.POOL_REFORKS:
    _REFORKS_BY_NAME.setdefault(_function, []).append((_suffix, _name))
_GUNICORN = f"{os.sep}gunicorn{os.sep}"
_CELERY = (f"{os.sep}billiard{os.sep}", f"{os.sep}celery{os.sep}")


def context(mechanism: str, caller: types.FrameType | None) -> ForkContext:
    """The kind of fork ``caller``'s thread is making, from the frames above it."""
    pool = framework = None
    frame = caller
    depth = 0
    reforks = _REFORKS_BY_NAME
    while frame is not None and depth < 64:
        code = frame.f_code
        filename = code.co_filename
        if pool is None:
            for suffix, name in reforks.get(code.co_name, ()):
                if filename.endswith(suffix):
                    pool = name
        if framework is None:
            if _GUNICORN in filename:
                framework = "gunicorn"
            elif _CELERY[0] in filename or _CELERY[1] in filename:
                framework = "celery"
        frame = frame.f_back
        depth += 1
    return ForkContext(mechanism, pool, framework)


def grade(report: Report, fork: ForkContext) -> tuple[Report, tuple[Any, ...]]:
    """``report`` graded for ``fork``, and the threads to confirm gone after the fork.

    The confirmations are ``(ident, native_id)`` of threads graded info because
    their owner's hook stops them before every fork: after the fork, one that
    still runs was there at the fork after all (``forksafe._forkpath``).
    """
    key = (id(report), fork, _accept.version)
    cached = _graded.get(key)
    if cached is not None and cached[0] is report:
        return cached[1], cached[2]
    rules = _accept.rules()
    graded_ones = [_graded_one(h, fork, rules) for h in report.hazards]
    hazards = tuple(one[0] for one in graded_ones)
    graded = report if all(a is b for a, b in zip(hazards, report.hazards)) else \
        dataclasses.replace(report, hazards=hazards)
    confirm = tuple(one[1] for one in graded_ones if one[1] is not None)
    if len(_graded) >= 16:
        _graded.clear()
    _graded[key] = (report, graded, confirm)
    return graded, confirm


#: (id(hazard), context, rules version) -> (hazard, graded, its confirmation): a fork
#: storm's checks make a new report per fork from the same few hazards (see
#: forksafe._probes.threads.MEMO); each is graded once. Bounded: cleared when full.
_graded_ones: dict[tuple[int, ForkContext, int],
                   tuple[Hazard, Hazard, tuple[Any, ...] | None]] = {}
_GRADED_ONES_SIZE = 1024


def _graded_one(hazard: Hazard, fork: ForkContext,
                rules: list[_accept.Rule]) -> tuple[Hazard, tuple[Any, ...] | None]:
    key = (id(hazard), fork, _accept.version)
    known = _graded_ones.get(key)
    if known is not None and known[0] is hazard:
        return known[1], known[2]
    graded = _grade_one(hazard, fork, rules)
    confirmation = _confirmation(graded)
    if len(_graded_ones) >= _GRADED_ONES_SIZE:
        _graded_ones.clear()
    _graded_ones[key] = (hazard, graded, confirmation)
    return graded, confirmation


def _confirmation(hazard: Hazard) -> tuple[Any, ...] | None:
    handlers = hazard.evidence.get("fork_handlers")
    if hazard.severity != Severity.INFO or not isinstance(handlers, list):
        return None
    if not any(isinstance(h, dict) and h.get("when") == BEFORE for h in handlers):
        return None
    return (hazard.evidence.get("ident"), hazard.evidence.get("native_id"))


def _grade_one(hazard: Hazard, fork: ForkContext, rules: list[_accept.Rule]) -> Hazard:
    if hazard.severity < Severity.WARNING:
        return hazard
    ev = hazard.evidence
    if hazard.kind == "thread":
        handlers = ev.get("fork_handlers")
        if isinstance(handlers, list) and fork.mechanism in MULTIPROCESSING_MECHANISMS:
            mp = [h for h in handlers if isinstance(h, dict) and h.get("when") == MULTIPROCESSING]
            if mp:
                return _info(hazard, HANDLED_MP.format(name=mp[0].get("name")),
                             "its owner makes it safe in multiprocessing's children",
                             graded="handled")
        if fork.pool is not None:
            if ev.get("pool") == fork.pool:
                return _info(hazard, POOL_THREAD, "a pool's replacement worker needs nothing",
                             graded="pool")
            if not _holds_a_lock(ev) and ev.get("known") not in _TASK_HAZARDS:
                return _info(hazard, POOL_OTHER, "a pool's replacement worker needs nothing",
                             graded="pool")
    for rule in rules:
        if rule.matches(hazard.kind, ev):
            accepted = dict(ev)
            accepted["accepted"] = {"reason": rule.reason, "rule": rule.text(),
                                    "source": rule.source, "severity": str(hazard.severity)}
            return Hazard(hazard.kind, Severity.INFO,
                          f"{hazard.summary} {ACCEPTED.format(reason=rule.reason)}",
                          hazard.remedy, accepted)
    return _fitted(hazard, fork)


def _info(hazard: Hazard, note: str, why: str, *, graded: str) -> Hazard:
    evidence = dict(hazard.evidence)
    evidence["graded"] = graded
    return Hazard(hazard.kind, Severity.INFO, f"{hazard.summary} {note}",
                  NOTHING.format(why=why), evidence)


def _holds_a_lock(evidence: Any) -> bool:
    """Whether the thread was inside a ``with`` block of a held (or unknown) lock."""
    locks = evidence.get("locks")
    return isinstance(locks, list) and any(
        isinstance(lock, dict) and lock.get("locked") is not False for lock in locks)


def _fitted(hazard: Hazard, fork: ForkContext) -> Hazard:
    """The hazard with a fix the user can apply for this kind of fork."""
    remedy = hazard.remedy
    where = fork.framework or (
        None if fork.mechanism in MULTIPROCESSING_MECHANISMS or fork.mechanism == "check"
        else "fork")
    if where is None:
        return hazard
    start = _catalog.ANY_START
    if start in remedy:
        remedy = remedy.replace(start, FIT_START[where])
    at = remedy.lower().find(_THREAD_REMEDY_START)
    if hazard.kind == "thread" and where in FIT_THREAD and at != -1:
        # "do not fork while 'x' is inside `with lock:`; ..." stays in front.
        fit = FIT_THREAD[where]
        remedy = remedy[:at] + (fit[0].upper() + fit[1:] if at else fit)
    if hazard.kind == "sqlite-connection" and where in FIT_SQLITE and \
            remedy.startswith(_SQLITE_REMEDY_START):
        remedy = FIT_SQLITE[where]
    if remedy == hazard.remedy:
        return hazard
    return Hazard(hazard.kind, hazard.severity, hazard.summary, remedy, hazard.evidence)


LATE = "- but it was still running at the fork: {name} did not stop it in time"
LATE_REMEDY = (
    "its owner's before-fork hook ({name}) stops it before every fork, but it was still "
    "running when this fork happened; see why the hook did not stop it (a join that timed "
    "out?), or join it yourself before forking"
)


def unconfirmed(report: Report, alive: set[tuple[Any, Any]]) -> Report:
    """``report`` with the threads in ``alive`` (ident, native id) graded warnings again:
    their owner's before-fork hook should have stopped them, and had not."""
    hazards = []
    for hazard in report.hazards:
        ev = hazard.evidence
        if (ev.get("ident"), ev.get("native_id")) not in alive or hazard.severity > Severity.INFO:
            hazards.append(hazard)
            continue
        handlers = ev.get("fork_handlers")
        name = next((h.get("name") for h in handlers if isinstance(h, dict)
                     and h.get("when") == BEFORE), "its hook") if isinstance(handlers, list) \
            else "its hook"
        summary = hazard.summary.split(" - handles fork itself", 1)[0]
        evidence = dict(ev)
        evidence["graded"] = "still running at the fork"
        hazards.append(Hazard(hazard.kind, Severity.WARNING,
                              f"{summary} {LATE.format(name=name)}",
                              LATE_REMEDY.format(name=name), evidence))
    return dataclasses.replace(report, hazards=tuple(hazards))
