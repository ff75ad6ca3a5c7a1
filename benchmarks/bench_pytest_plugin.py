"""What ``pytest --forksafe`` costs a suite that never forks, and one whose tests fork.

Two suites are written to a temporary directory: 2,000 trivial tests with a
fixture each (the worst case for a per-test cost: the tests themselves cost
almost nothing), and 200 tests that each fork and wait for a child. Each runs
in a fresh pytest, alternately without and with ``--forksafe``, several rounds;
the CPU time of the pytest process (user + system, its children's included) is
compared by the medians, which a busy machine disturbs less than wall time.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import tempfile
import textwrap

ROUNDS = 7

TRIVIAL = """
    import pytest

    @pytest.fixture
    def value():
        return 1

    @pytest.mark.parametrize("n", range(2000))
    def test_n(n, value):
        assert value == 1
"""

FORKING = """
    import os
    import pytest

    @pytest.mark.parametrize("n", range(200))
    def test_fork(n):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
"""


def cpu_of(directory: str, *args: str) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    "-p", "no:randomly", *args], cwd=directory, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={k: v for k, v in os.environ.items() if not k.startswith("FORKSAFE_")})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def compare(name: str, suite: str, tests: int) -> None:
    with tempfile.TemporaryDirectory() as directory:
        with open(os.path.join(directory, "test_suite.py"), "w") as f:
            f.write(textwrap.dedent(suite))
        plain: list[float] = []
        guarded: list[float] = []
        for _ in range(ROUNDS):
            plain.append(cpu_of(directory))
            guarded.append(cpu_of(directory, "--forksafe"))
    base, cost = statistics.median(plain), statistics.median(guarded)
    print(f"{name:34} plain {base:6.2f} s  --forksafe {cost:6.2f} s  {cost / base:5.3f}x  "
          f"(+{(cost - base) / tests * 1e6:.0f} us per test, start-up included)")


def main() -> None:
    print(f"CPU time of the whole pytest run, median of {ROUNDS} alternating rounds")
    compare("2,000 trivial tests (no fork)", TRIVIAL, 2000)
    compare("200 tests that fork once each", FORKING, 200)


if __name__ == "__main__":
    main()
