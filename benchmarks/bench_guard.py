"""What does the installed guard add to a fork, and to a program that never forks?

Per-fork overhead: a process of ~100 MB (resident, touched) forks, the child
``_exit``s at once, the parent waits — thousands of times — with and without
the guard, alternating rounds in one run (``_common.interleaved``) so that both
sides see the same machine. Cases, as issue 3 asks:

* a clean process, default policy ``warn``: target <= 1.05x the bare fork;
* 10 idle Python threads, policy ``log``: target <= 1.10x;
* growth to 100 idle threads (reported, no target).

No-fork overhead: a workload that never forks (JSON, regular expressions, a
few thread starts) with and without the guard installed: target <= 1.01x.

The follower's hooks (``_outcome.on_forked``/``on_reaped``, ``_child.arm``) run
as in production (no hang timeout is set); one extra line shows the clean case
without them, to tell the guard's own cost from the follower's.
"""

from __future__ import annotations

import json
import os
import re
import resource
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import interleaved, line

import forksafe

MB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")


def ballast(megabytes: int) -> bytearray:
    """Resident memory: every page written once, as a real program's heap would be."""
    data = bytearray(megabytes * MB)
    for offset in range(0, len(data), PAGE):
        data[offset] = 1
    return data


def forks(n: int) -> None:
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)


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


def fork_case(name: str, policy: str, rounds: int, per_round: int, target: float | None,
              *, follower: bool = True) -> float:
    """Bare forks against guarded forks; ``follower=False`` leaves out the child follower."""
    from forksafe import _guard

    _guard._load_followers()
    modules = (_guard._child_module, _guard._outcome_module)

    def setup() -> None:
        forksafe.install(policy)
        if not follower:
            _guard._child_module = _guard._outcome_module = None

    def teardown() -> None:
        forksafe.uninstall()
        _guard._child_module, _guard._outcome_module = modules

    base, cand = interleaved(lambda: forks(per_round), lambda: forks(per_round), rounds,
                             setup_candidate=setup, teardown_candidate=teardown)
    print(line(name, base / per_round, cand / per_round, target), flush=True)
    # The deterministic side of the cost: pages first written after a fork (each one a
    # copy-on-write fault), in the parent and in the child, per fork.
    bare = faults_per_fork(per_round)
    setup()
    try:
        guarded = faults_per_fork(per_round)
    finally:
        teardown()
    print(f"{'':4}minor faults per fork (parent + child): bare {bare[0]:.0f} + {bare[1]:.0f}, "
          f"forksafe {guarded[0]:.0f} + {guarded[1]:.0f}", flush=True)
    return (cand - base) / per_round


def faults_per_fork(n: int) -> tuple[float, float]:
    """Minor page faults per fork cycle in the parent and in the child."""
    forks(2)  # settle: the first forks after a change write more
    before = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt,
              resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt)
    forks(n)
    return ((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before[0]) / n,
            (resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt - before[1]) / n)


def main() -> None:
    quick = "--quick" in sys.argv
    rounds, per_round = (5, 20) if quick else (15, 100)
    heap = ballast(100)
    print(f"resident memory: {rss_mb():.0f} MB; {rounds} rounds x {per_round} forks per side")
    print("(times are per fork: fork + child _exit + parent waitpid)")
    # The follower's modules register fork hooks when imported, for good: from then on
    # the baseline's bare forks run them too. Say how much that adds to the baseline.
    from forksafe import _guard

    pristine = faults_per_fork(per_round)
    _guard._load_followers()
    hooked = faults_per_fork(per_round)
    print(f"baseline forks run forksafe's permanent fork hooks once loaded: minor faults per "
          f"bare fork {pristine[0]:.0f} + {pristine[1]:.0f} before, "
          f"{hooked[0]:.0f} + {hooked[1]:.0f} after")
    fork_case("clean process, policy warn", "warn", rounds, per_round, 1.05)
    fork_case("  the same, child follower left out", "warn", rounds, per_round, None,
              follower=False)

    stop = threading.Event()
    threads: list[threading.Thread] = []

    def grow_to(n: int) -> None:
        while len(threads) < n:
            t = threading.Thread(target=stop.wait, daemon=True)
            t.start()
            threads.append(t)

    extra: dict[int, float] = {}
    with_observed_threads = forksafe.observe  # thread origins known, as under install()
    with_observed_threads()
    for n, target in ((10, 1.10), (100, None)):
        grow_to(n)
        extra[n] = fork_case(f"{n} idle threads, policy log", "log", rounds, per_round,
                             target)
        if n == 10:
            fork_case("  the same, child follower left out", "log", rounds, per_round, None,
                      follower=False)
    forksafe.unobserve()
    print(f"growth 10 -> 100 threads: guard adds {extra[10] * 1e6:.0f} us -> "
          f"{extra[100] * 1e6:.0f} us per fork "
          f"({extra[100] / extra[10] if extra[10] > 0 else float('inf'):.1f}x)")
    stop.set()
    for t in threads:
        t.join()

    base, cand = interleaved(no_fork_workload, no_fork_workload, 40 if quick else 200,
                             setup_candidate=lambda: forksafe.install("warn"),
                             teardown_candidate=forksafe.uninstall)
    print(line("never forks (json, re, 5 threads)", base, cand, 1.01))
    del heap


if __name__ == "__main__":
    main()
