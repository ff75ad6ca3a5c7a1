"""What does the installed guard add to a fork, and to a program that never forks?

Per-fork overhead: a process of ~100 MB (resident, touched) forks, the child
``_exit``s at once, the parent waits — thousands of times — with and without
the guard, alternating fork by fork in one run (see ``fork_case``) so that
both sides see the same machine. Cases, as issue 3 asks:

* a clean process, default policy ``warn``: target <= 1.05x the bare fork;
* 10 idle Python threads, policy ``log``: target <= 1.10x;
* 100 idle threads, policy ``log``: target <= 1.10x (issue 14);
* a clean process with a report file, as ``forksafe run`` gives every process:
  target <= 1.05x (issue 14: the fork's line is written by the batch, not while
  the child lives).

Last, informative: a process of 300,000 objects that imported sqlite3 and holds a
connection, whose check walks the collector's objects at every fork.

No-fork overhead: a workload that never forks (JSON, regular expressions, a
few thread starts) with and without the guard installed: target <= 1.01x.

The follower (crash capture: ``_child.arm``, ``_outcome.on_reaped``) runs as in
production with no hang timeout and outside ``forksafe run``, where crash files
are reused memory files; one extra line per case shows it left out, to tell the
guard's own cost from the follower's. Each line also prints the minor page
faults per fork, the deterministic side of the cost.
"""

from __future__ import annotations

import json
import os
import re
import resource
import statistics
import sys
import tempfile
import threading
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import IdleThreads, interleaved, line

import forksafe

MB = 1 << 20
#: Fork pairs per block: whole batches of the guard's queue (see fork_case).
BLOCK = 32
PAGE = os.sysconf("SC_PAGE_SIZE")


def ballast(megabytes: int) -> bytearray:
    """Resident memory: every page written once, as a real program's heap would be."""
    data = bytearray(megabytes * MB)
    for offset in range(0, len(data), PAGE):
        data[offset] = 1
    return data


def forks(n: int, fork: Callable[[], int] | None = None,
          waitpid: Callable[[int, int], object] | None = None) -> None:
    fork = fork or os.fork  # looked up now: the guard replaces os.fork
    waitpid = waitpid or os.waitpid
    for _ in range(n):
        pid = fork()
        if pid == 0:
            os._exit(0)
        waitpid(pid, 0)


def no_fork_workload() -> None:
    pattern = re.compile(r"(\w+)=(\d+)")
    text = " ".join(f"key{i}={i}" for i in range(200))
    for _ in range(20):
        data = {m.group(1): int(m.group(2)) for m in pattern.finditer(text)}
        json.loads(json.dumps(data))
    for _ in range(5):
        t = threading.Thread(target=int)
        t.start()
        t.join()


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / MB


def fork_case(name: str, policy: str, pairs: int, target: float | None,
              *, follower: bool = True, report: str | None = None) -> float:
    """Bare forks against guarded forks, alternating one by one; returns the added seconds.

    ``follower=False`` leaves out the child follower; ``report``: a report file, as
    ``forksafe run`` (without a hang timeout) gives every guarded process. The guard stays installed
    throughout; a bare fork calls the original ``os.fork`` and ``os.waitpid``
    with the guard switched off (its at-fork hooks, registered for good, then
    return at once), a guarded one goes through the wrappers. Each pair is
    measured back to back, so that the machine's slow drifts, which dwarf the
    difference when whole rounds are compared, cancel out within a pair. The
    guard records forks by the batch (``_forkpath.QUEUE_SIZE``), so one guarded
    fork in several carries the others' recording: the extra cost is the mean
    over a block of ``BLOCK`` pairs, and the ratio is 1 + median(block means)
    / median(bare).
    """
    from forksafe import _forkpath

    forksafe.install(policy, report=report)
    _forkpath.load()
    modules = (_forkpath.child_side, _forkpath.follower)
    if not follower:
        _forkpath.set_followers(None, None)
    config = _forkpath.config
    fork, waitpid = os.fork.__wrapped__, os.waitpid.__wrapped__  # type: ignore[attr-defined]
    clock = time.perf_counter_ns

    def bare() -> int:
        _forkpath.config = None
        start = clock()
        pid = fork()
        if pid == 0:
            os._exit(0)
        waitpid(pid, 0)
        took = clock() - start
        _forkpath.config = config
        return took

    def guarded() -> int:
        start = clock()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        return clock() - start

    try:
        for _ in range(20):  # settle
            bare(), guarded()
        bases, extras = [], []
        for _ in range(max(pairs // BLOCK, 1)):
            block = []
            for _ in range(BLOCK):
                base = bare()
                bases.append(base)
                block.append(guarded() - base)
            extras.append(statistics.mean(block))
        base_s, extra_s = statistics.median(bases) / 1e9, statistics.median(extras) / 1e9
        print(line(name, base_s, base_s + extra_s, target), flush=True)
        # The deterministic side of the cost: pages first written after a fork (each one a
        # copy-on-write fault), in the parent and in the child, per fork.
        _forkpath.config = None
        bare_faults = faults_per_fork(min(pairs, 200), fork, waitpid)
        _forkpath.config = config
        guarded_faults = faults_per_fork(min(pairs, 200))
    finally:
        forksafe.uninstall()
        _forkpath.set_followers(*modules)
    print(f"{'':4}minor faults per fork (parent + child): bare {bare_faults[0]:.0f} + "
          f"{bare_faults[1]:.0f}, forksafe {guarded_faults[0]:.0f} + {guarded_faults[1]:.0f}",
          flush=True)
    return extra_s


def faults_per_fork(n: int, fork: Callable[[], int] | None = None,
                    waitpid: Callable[[int, int], object] | None = None) -> tuple[float, float]:
    """Minor page faults per fork cycle in the parent and in the child.

    ``os.fork`` and ``os.waitpid`` are looked up at each call (``forks``): the
    guard replaces them.
    """
    forks(2, fork, waitpid)  # settle: the first forks after a change write more
    before = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt,
              resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt)
    forks(n, fork, waitpid)
    return ((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before[0]) / n,
            (resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt - before[1]) / n)


def main() -> None:
    quick = "--quick" in sys.argv
    pairs = 100 if quick else 1500
    heap = ballast(100)
    print(f"resident memory: {rss_mb():.0f} MB; {pairs} bare/guarded fork pairs per line")
    print("(times are per fork: fork + child _exit + parent waitpid; ratio = 1 + median "
          "extra / median bare)")
    fork_case("clean process, policy warn", "warn", pairs, 1.05)
    fork_case("  the same, child follower left out", "warn", pairs, None, follower=False)
    with tempfile.TemporaryDirectory() as directory:
        fork_case("  the same, with a report file", "warn", pairs, 1.05,
                  report=os.path.join(directory, "report.jsonl"))

    idle = IdleThreads()
    extra: dict[int, float] = {}
    with_observed_threads = forksafe.observe  # thread origins known, as under install()
    with_observed_threads()
    for n, target in ((10, 1.10), (100, 1.10)):
        idle.grow_to(n)
        extra[n] = fork_case(f"{n} idle threads, policy log", "log", pairs, target)
        if n == 10:
            fork_case("  the same, child follower left out", "log", pairs, None,
                      follower=False)
    forksafe.unobserve()
    print(f"growth 10 -> 100 threads: guard adds {extra[10] * 1e6:.0f} us -> "
          f"{extra[100] * 1e6:.0f} us per fork "
          f"({extra[100] / extra[10] if extra[10] > 0 else float('inf'):.1f}x)")
    idle.stop()

    base, cand = interleaved(no_fork_workload, no_fork_workload, 40 if quick else 200,
                             setup_candidate=lambda: forksafe.install("warn"),
                             teardown_candidate=forksafe.uninstall)
    print(line("never forks (json, re, 5 threads)", base, cand, 1.01))

    # Last, as it changes the process: one that imported sqlite3 and holds a connection
    # (Django, coverage.py) has its connections looked for at every fork, by a walk of
    # the collector's objects that reads them (no target; README, "Limits").
    objects = [{"k": i, "v": [i, str(i)]} for i in range(300_000)]
    import sqlite3

    connection = sqlite3.connect(":memory:")
    fork_case("300k objects, sqlite3 imported, connected", "log", min(pairs, 300), None)
    connection.close()
    del heap, objects


if __name__ == "__main__":
    main()
