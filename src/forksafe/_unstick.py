"""Unstick a parent whose pool lost a worker to a hang forksafe ended.

When the hang monitor ends a hung child, a parent that waits for that child's
work would wait forever: a ``multiprocessing.Pool`` sends each task to whichever
worker is free and hears back only when the task is done, so a worker killed
mid-task leaves its task — and the ``map``, ``apply`` or ``imap`` waiting for
it — pending for good (the pool starts a replacement worker, which knows nothing
of the lost task). ``concurrent.futures.ProcessPoolExecutor`` answers a dead
worker with ``BrokenProcessPool`` on every pending future; forksafe does the same
for a pool whose worker it ended, with a ``ForkSafetyError`` carrying the
diagnosis: the program's wait ends, with the reason, instead of never.

It runs in the parent when it reaps the worker (``forksafe._outcome.on_reaped``,
in the pool's own worker-handler thread, milliseconds after the kill). The pool is
the one whose worker list holds the pid; as the pool cannot tell which pending
task the worker held, every pending task of that pool fails (as with
``BrokenProcessPool``). The failures go through the pool's own result queue, so
that its result-handler thread settles them in order, as it settles results.

billiard (Celery's pool) knows which task a worker took and fails it with its own
``WorkerLostError`` after ``lost_worker_timeout`` (10 s by default): for a worker
forksafe ended, that wait is cut to none.
"""

from __future__ import annotations

import gc
import sys
from typing import Any

from forksafe._errors import ForkSafetyError

POOL_WORKER_HUNG = (
    "a worker of this pool (pid {pid}) hung and forksafe ended it; the task it held is "
    "lost, so every pending task of the pool fails: {diagnosis}"
)
#: How long to wait for the pool's result-queue lock (a worker killed while it
#: wrote a result holds it for good): then the tasks are left as they are.
LOCK_WAIT = 1.0


def worker_hung(pid: int, diagnosis: str) -> int:
    """Fail the pending tasks of the pools whose worker ``pid`` was ended; how many."""
    failed = 0
    pools = sys.modules.get("multiprocessing.pool")
    billiard = sys.modules.get("billiard.pool")
    kinds = tuple(module.Pool for module in (pools, billiard)
                  if module is not None and isinstance(getattr(module, "Pool", None), type))
    if not kinds:
        return 0
    for pool in _pools_with(pid, kinds):
        try:
            if billiard is not None and isinstance(pool, billiard.Pool):
                failed += _hasten_billiard(pool, pid)
            else:
                failed += _fail_pending(pool, ForkSafetyError(POOL_WORKER_HUNG.format(
                    pid=pid, diagnosis=diagnosis)))
        except Exception:  # a pool of another shape: leave it as it is
            continue
    return failed


def _pools_with(pid: int, kinds: tuple[type, ...]) -> list[Any]:
    found = []
    for obj in gc.get_objects():
        if isinstance(obj, kinds):
            workers = obj.__dict__.get("_pool")
            if isinstance(workers, list) and any(
                    getattr(w, "pid", None) == pid for w in workers):
                found.append(obj)
    return found


def _fail_pending(pool: Any, error: ForkSafetyError) -> int:
    """Send a failure for every pending task of a ``multiprocessing.Pool`` through its
    result queue, as ``(job, index, (False, error))``: what a worker sends for a task
    that raised."""
    from multiprocessing.reduction import ForkingPickler

    cache = pool.__dict__.get("_cache")
    outqueue = pool.__dict__.get("_outqueue")
    if not isinstance(cache, dict) or outqueue is None:
        return 0
    messages = []
    for job, result in list(cache.items()):
        name = type(result).__name__
        if name == "MapResult":
            # Each chunk settles once; a failure only counts down, so as many as remain.
            messages += [(job, i, (False, error)) for i in range(max(result._number_left, 1))]
        elif name in ("IMapIterator", "IMapUnorderedIterator"):
            messages.append((job, result._index, (False, error)))
        else:
            messages.append((job, 0, (False, error)))
    if not messages:
        return 0
    lock = getattr(outqueue, "_wlock", None)
    if lock is not None and not lock.acquire(timeout=LOCK_WAIT):
        return 0
    try:
        for message in messages:
            outqueue._writer.send_bytes(ForkingPickler.dumps(message))
    finally:
        if lock is not None:
            lock.release()
    return len(cache)


def _hasten_billiard(pool: Any, pid: int) -> int:
    """billiard fails the task a lost worker held after ``lost_worker_timeout``: none."""
    hastened = 0
    for job in list(pool.__dict__.get("_cache", {}).values()):
        if pid in job.worker_pids():
            job._lost_worker_timeout = 0.0
            hastened += 1
    return hastened
