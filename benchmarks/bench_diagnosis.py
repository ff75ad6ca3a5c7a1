"""How soon after the fork is a hung child diagnosed (and its parent unstuck)?

Issue 12 asks for a child stuck on work a vanished thread would have done to be
diagnosed within the hang timeout + 1 s of its fork, and for ``Pool.map`` over a
hung worker to raise within the hang timeout + 2 s. The tests check what is
diagnosed with generous time limits (a loaded CI machine may take seconds to
schedule a process); the latency itself is measured here, on a quiet machine.

Cases, each in a fresh interpreter with ``install("log", hang_timeout=1)``:

* an inherited ``multiprocessing.Queue`` read after a bare ``os.fork`` (its
  feeder thread is gone): target <= timeout + 1 s;
* a future of an inherited ``ThreadPoolExecutor`` (its worker is gone):
  target <= timeout + 1 s;
* ``Pool.map`` whose worker blocks on a lock an application thread held at fork
  time: target <= timeout + 2 s until ``ForkSafetyError`` is raised.

Reported: the median over the rounds (the time from the fork, or from the call
of ``Pool.map``, until the parent has the diagnosis).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap

TIMEOUT = 1.0
ROUNDS = 5

FORKED = """
import json, os, time
import forksafe
from forksafe._guard import event_for_child
forksafe.install("log", hang_timeout={timeout})
{setup}
time.sleep(0.1)
start = time.monotonic()
pid = os.fork()
if pid == 0:
    {child}
    os._exit(0)
os.waitpid(pid, 0)
elapsed = time.monotonic() - start
print(json.dumps({{"elapsed": elapsed, "status": event_for_child(pid).outcome.status}}))
"""

QUEUE = ("import multiprocessing as mp\nq = mp.Queue()\nq.put('warm'); q.get()",
         "q.put('from child'); q.get()")
EXECUTOR = ("from concurrent.futures import ThreadPoolExecutor\n"
            "executor = ThreadPoolExecutor(max_workers=1)\nexecutor.submit(int).result()",
            "executor.submit(int).result()")

POOL = """
import json, threading, time
import multiprocessing as mp
import forksafe
forksafe.install("log", hang_timeout={timeout})
lock = threading.Lock()
def hold():
    with lock:
        time.sleep(60)
threading.Thread(target=hold, name="holder", daemon=True).start()
time.sleep(0.1)
def task(n):
    with lock:
        return n
start = time.monotonic()
try:
    with mp.get_context("fork").Pool(2) as pool:
        pool.map(task, range(4))
    status = "returned"
except Exception as exc:
    status = type(exc).__name__
print(json.dumps({{"elapsed": time.monotonic() - start, "status": status}}))
"""


def run(code: str) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "case.py")
        with open(path, "w") as f:
            f.write(code)
        proc = subprocess.run([sys.executable, path], capture_output=True, text=True,
                              timeout=60, cwd=directory,
                              env={k: v for k, v in os.environ.items()
                                   if not k.startswith("FORKSAFE_")})
    if proc.returncode != 0:
        raise SystemExit(f"a case failed:\n{proc.stderr}")
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def case(name: str, code: str, expected: str, target: float, *, rounds: int,
         since: str = "the fork") -> bool:
    times = []
    for _ in range(rounds):
        result = run(code)
        if result["status"] != expected:
            print(f"{name:40} {result['status']} (expected {expected}): MISSED")
            return False
        times.append(float(result["elapsed"]))  # type: ignore[arg-type]
    took = statistics.median(times)
    ok = took <= TIMEOUT + target
    print(f"{name:40} {took:5.2f} s after {since:8}, hang timeout {TIMEOUT:.0f} s  "
          f"(target <= timeout + {target:.0f} s: {'ok' if ok else 'MISSED'})")
    return ok


def forked(setup: str, child: str) -> str:
    return FORKED.format(timeout=TIMEOUT, setup=setup, child=textwrap.indent(child, "    ")
                         .lstrip())


def main() -> int:
    rounds = 2 if "--quick" in sys.argv else ROUNDS
    ok = case("multiprocessing.Queue after a bare fork", forked(*QUEUE), "hung", 1.0, rounds=rounds)
    ok &= case("inherited ThreadPoolExecutor", forked(*EXECUTOR), "hung", 1.0, rounds=rounds)
    ok &= case("Pool.map over a hung worker raises", POOL.format(timeout=TIMEOUT),
               "ForkSafetyError", 2.0, rounds=rounds, since="the call")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
