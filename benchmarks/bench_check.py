"""How much does ``forksafe.check()`` cost, against the fork it guards?

Builds ~100 tiny shared libraries with gcc and loads them, starts idle Python
threads, then times ``check()`` and, in the same run, a bare ``fork()`` +
child ``_exit`` + ``waitpid`` of the same process as the baseline. Reports the
median, the ratio to a fork, and the growth from 1 to 1,000 threads, for the
full check (every probe runs) and, once, for an unchanged process whose last
report is reused (``forksafe._check``'s fingerprint).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import IdleThreads, median_time

import forksafe
from forksafe import _check
from forksafe._platform import current


def load_libraries(count: int, workdir: str) -> None:
    if shutil.which("gcc") is None:
        print("gcc not found: fewer libraries are loaded")
        return
    source = os.path.join(workdir, "lib.c")
    with open(source, "w") as f:
        f.write("int value(void) { return 1; }\n")
    for i in range(count):
        path = os.path.join(workdir, f"libbench{i}.so")
        subprocess.run(["gcc", "-shared", "-fPIC", "-o", path, source], check=True)
        ctypes.CDLL(path)


def bare_fork() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)


def main() -> None:
    forksafe.observe()
    idle = IdleThreads()
    with tempfile.TemporaryDirectory() as tmp:
        load_libraries(100 - len(current().loaded_libraries()), tmp)
        print(f"loaded libraries: {len(current().loaded_libraries())}")
        idle.grow_to(100)
        forksafe.check()  # warm caches as a long-running process would have them
        fork = median_time(bare_fork, 200)
        # The full check: every probe runs (what a changed process costs).
        check = median_time(lambda: _check.check_with(reuse=False), 200)
        print(f"check() with 100 threads: median {check * 1e3:.3f} ms (target <= 2 ms: "
              f"{'ok' if check <= 0.002 else 'MISSED'}); "
              f"{check / fork:.2f}x a bare fork+exit+wait ({fork * 1e3:.3f} ms)")
        # An unchanged process: the fingerprint matches and the last report is reused.
        reused = median_time(forksafe.check, 200)
        print(f"  the same process unchanged (report reused): median {reused * 1e3:.3f} ms")
        print("growth with the number of Python threads (ratio to 1 thread):")
        idle.stop()
        first = None
        for n in (1, 10, 100, 1000):
            idle.grow_to(n)
            cost = median_time(lambda: _check.check_with(reuse=False), 50 if n < 1000 else 15)
            first = first or cost
            print(f"  {n:5} threads: {cost * 1e3:8.3f} ms  {cost / first:7.1f}x"
                  f"  ({cost / n * 1e6:.1f} us per thread)")
        idle.stop()


if __name__ == "__main__":
    main()
