"""A fork storm: many threads forking at once, with and without the guard.

A server that forks from several threads at once (a pool refilling itself while
requests fork helpers) makes every fork's check see the other threads somewhere
else in their stacks, so the guard's reuse of the last report (``forksafe._check``)
rarely applies and each fork runs the probes. Issue 14 asks for a storm of 8
threads x 200 forks under policy ``log`` to take at most 2x the unguarded wall
time.

Each round runs the storm once bare and once guarded, each in a fresh interpreter
(so neither inherits the other's state), back to back; reported: the median of the
rounds' ratios (a pair run seconds apart meets the same load on a shared machine,
which the medians of each side alone do not), the medians of each side, and how
many hazards a fork's report repeats (none: each appears once, whatever the number
of threads forking at once).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

THREADS = 8
FORKS = 200
ROUNDS = 7
TARGET = 2.0

STORM = """
import json, os, resource, sys, threading, time
guarded = sys.argv[1] == "guarded"
threads, forks = int(sys.argv[2]), int(sys.argv[3])
if guarded:
    import forksafe
    forksafe.install("log")
ballast = [bytearray(1 << 20) for _ in range(8)]  # a small service's few MB of heap
start = threading.Barrier(threads + 1)
def storm():
    start.wait()
    for _ in range(forks):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
workers = [threading.Thread(target=storm, name=f"storm-{i}") for i in range(threads)]
for w in workers:
    w.start()
start.wait()
began = time.perf_counter()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for w in workers:
    w.join()
elapsed = time.perf_counter() - began
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / (threads * forks)
with open("/proc/self/status") as status:  # what a fork late in the storm maps again
    anon = next((int(line.split()[1]) for line in status if line.startswith("RssAnon")), 0)
repeated = 0
if guarded:
    from forksafe._guard import history
    for event in history():
        summaries = [h.summary for h in event.report.hazards]
        repeated = max(repeated, len(summaries) - len(set(summaries)))
print(json.dumps({"elapsed": elapsed, "repeated": repeated, "faults": faults, "anon": anon}))
"""


def storm(mode: str, threads: int, forks: int) -> dict[str, object]:
    proc = subprocess.run([sys.executable, "-c", STORM, mode, str(threads), str(forks)],
                          capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items()
                               if not k.startswith("FORKSAFE_")})
    if proc.returncode != 0:
        raise SystemExit(f"the {mode} storm failed:\n{proc.stderr}")
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    quick = "--quick" in sys.argv
    rounds = 2 if quick else ROUNDS
    bare, guarded, ratios = [], [], []
    faults: dict[str, list[float]] = {"bare": [], "guarded": []}
    anon = {"bare": 0, "guarded": 0}
    repeated = 0
    began = time.perf_counter()
    for _ in range(rounds):
        plain = storm("bare", THREADS, FORKS)
        bare.append(float(plain["elapsed"]))  # type: ignore[arg-type]
        faults["bare"].append(float(plain["faults"]))  # type: ignore[arg-type]
        got = storm("guarded", THREADS, FORKS)
        guarded.append(float(got["elapsed"]))  # type: ignore[arg-type]
        faults["guarded"].append(float(got["faults"]))  # type: ignore[arg-type]
        anon = {"bare": int(plain["anon"]), "guarded": int(got["anon"])}  # type: ignore[call-overload]
        ratios.append(guarded[-1] / bare[-1])
        repeated = max(repeated, int(got["repeated"]))  # type: ignore[call-overload]
    base, cand = statistics.median(bare), statistics.median(guarded)
    ratio = statistics.median(ratios)
    verdict = "ok" if ratio <= TARGET else "MISSED"
    print(f"fork storm {THREADS} threads x {FORKS} forks, policy log   base {base:.3f} s  "
          f"forksafe {cand:.3f} s  {ratio:.2f}x (median of rounds)  (target <= {TARGET:.1f}x: "
          f"{verdict})")
    print(f"  round ratios {' '.join(f'{r:.2f}' for r in sorted(ratios))}")
    print(f"  parent page faults per fork: bare {statistics.median(faults['bare']):.0f}, "
          f"forksafe {statistics.median(faults['guarded']):.0f}; anonymous memory at the end: "
          f"bare {anon['bare'] / 1024:.1f} MB, forksafe {anon['guarded'] / 1024:.1f} MB")
    print(f"  hazards repeated within one fork's report: {repeated} (must be 0); "
          f"{rounds} rounds in {time.perf_counter() - began:.0f} s")
    return 0 if ratio <= TARGET and repeated == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
