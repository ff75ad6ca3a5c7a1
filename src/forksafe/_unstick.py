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

One consumer is known well enough to do better: Django's parallel test runner
(``ParallelTestSuite.run``) reads the pool's ``imap_unordered`` of its test
subsuites. The hung worker's stacks name the test method it was in; only that
subsuite's result is settled, as that test's error (``ForkSafetyError`` with the
diagnosis), and the other subsuites run on in the replacement worker. The run ends
with a failed test instead of never (the results of tests the worker had passed in
that subsuite before the hang are lost with it). When no test matches, the pending
tasks fail as above, and the runner stops with the error.

billiard (Celery's pool) knows which task a worker took and fails it with its own
``WorkerLostError`` after ``lost_worker_timeout`` (10 s by default): for a worker
forksafe ended, that wait is cut to none.
"""

from __future__ import annotations

import gc
import inspect
import os
import sys
from typing import Any

from forksafe._errors import ForkSafetyError
from forksafe._frames import scope_holding
from forksafe._tracebacks import sections

POOL_WORKER_HUNG = (
    "a worker of this pool (pid {pid}) hung and forksafe ended it; the task it held is "
    "lost, so every pending task of the pool fails: {diagnosis}"
)
TEST_HUNG = (
    "this test hung in worker {pid} of the parallel test runner, and forksafe ended the "
    "worker: {diagnosis}"
)
#: How long to wait for the pool's result-queue lock (a worker killed while it
#: wrote a result holds it for good): then the tasks are left as they are.
LOCK_WAIT = 1.0


def worker_hung(pid: int, diagnosis: str, traceback: str | None = None) -> int:
    """Fail the pending tasks of the pools whose worker ``pid`` was ended; how many.
    ``traceback``: the worker's stacks, to find the task it was in where that can be
    told (a Django test)."""
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
                    pid=pid, diagnosis=diagnosis)), _django_test(pool, pid, diagnosis, traceback))
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


def _fail_pending(pool: Any, error: ForkSafetyError,
                  settled: tuple[int, Any] | None = None) -> int:
    """Send a failure for every pending task of a ``multiprocessing.Pool`` through its
    result queue, as ``(job, index, (False, error))``: what a worker sends for a task
    that raised. ``settled``: instead, one job's result for the task the worker held."""
    from multiprocessing.reduction import ForkingPickler

    cache = pool.__dict__.get("_cache")
    outqueue = pool.__dict__.get("_outqueue")
    if not isinstance(cache, dict) or outqueue is None:
        return 0
    messages: list[tuple[Any, ...]] = []
    if settled is not None:
        job, value = settled
        messages.append((job, 0, (True, value)))
    for job, result in list(cache.items()) if settled is None else ():
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
    return len(messages) if settled is not None else len(cache)


def _django_test(pool: Any, pid: int, diagnosis: str,
                 traceback: str | None) -> tuple[int, Any] | None:
    """The result Django's parallel runner expects for the subsuite whose test hung
    (``ParallelTestSuite.run_subsuite`` returns ``(index, events)``): that test
    started, failed with the diagnosis, stopped. None unless Django's runner reads
    this pool's results and the worker's stacks name one of its tests."""
    if traceback is None or "django.test.runner" not in sys.modules:
        return None
    cache = pool.__dict__.get("_cache")
    if not isinstance(cache, dict):
        return None
    for job, result in list(cache.items()):
        if type(result).__name__ != "IMapUnorderedIterator":
            continue
        scope = scope_holding("django.test.runner", "run", "test_results", result)
        suite = scope.get("self") if scope else None
        subsuites = getattr(suite, "subsuites", None)
        if not isinstance(subsuites, list):
            continue
        places = {(os.path.realpath(site.file), site.function)
                  for _, frames in sections(traceback) for site in frames}
        for index, subsuite in enumerate(subsuites):
            for number, test in enumerate(subsuite):
                if _test_place(test) in places:
                    error = ForkSafetyError(TEST_HUNG.format(pid=pid, diagnosis=diagnosis))
                    return job, (index, [("startTest", number),
                                         ("addError", number, (ForkSafetyError, error, None)),
                                         ("stopTest", number)])
    return None


def _test_place(test: Any) -> tuple[str, str] | None:
    """A unittest test's source file and method name."""
    method = getattr(test, "_testMethodName", None)
    try:
        file = inspect.getsourcefile(type(test))
    except TypeError:
        return None
    return (os.path.realpath(file), method) if file and isinstance(method, str) else None


def _hasten_billiard(pool: Any, pid: int) -> int:
    """billiard fails the task a lost worker held after ``lost_worker_timeout``: none."""
    hastened = 0
    for job in list(pool.__dict__.get("_cache", {}).values()):
        if pid in job.worker_pids():
            job._lost_worker_timeout = 0.0
            hastened += 1
    return hastened
