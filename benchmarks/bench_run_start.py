"""What ``forksafe run`` adds to a command's start: the supervisor's fixed cost.

Each round starts, in turn (the order swapped every round, so that a machine
getting slower or faster weighs on both alike), a plain ``python -c pass`` and
``forksafe run -- python -c pass``, and reads each one's wall time and CPU time
(the whole process tree's, from ``wait4``). Also measured in the same rounds: the
plain command with the environment ``forksafe run`` gives its tree, so that the
guard's own share (the ``.pth`` hook installing it in COMMAND) is told apart from
the supervisor's.

Printed: medians in milliseconds, the median of the paired differences (run
minus plain, round by round) and its ratio. Target: the difference at most 50 ms
(docs/follow.md, "Start-up cost"); about 30 ms is the aim.

Bytecode caches are written during the warm-up rounds even where
``PYTHONDONTWRITEBYTECODE`` is set (an installed forksafe has them: compiling
forksafe's modules at every start is not what a user pays). ``ROUNDS=N``
overrides the number of rounds.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

ROUNDS = int(os.environ.get("ROUNDS", "21"))
WARMUP = 3
TARGET_MS = 50.0


def forksafe_command() -> list[str]:
    """The ``forksafe`` console script next to this Python, else ``python -m forksafe``."""
    script = os.path.join(os.path.dirname(sys.executable), "forksafe")
    return [script] if os.access(script, os.X_OK) else [sys.executable, "-m", "forksafe"]


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU seconds (user + system, the whole tree it waited for) of one run."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{argv} failed with {proc.returncode}")
    return wall, usage.ru_utime + usage.ru_stime


def main() -> int:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FORKSAFE_") and k != "PYTHONDONTWRITEBYTECODE"}
    tree_env = dict(env, FORKSAFE_POLICY="warn", FORKSAFE_REPORT=os.devnull,
                    FORKSAFE_SUPERVISOR="1")
    plain = [sys.executable, "-c", "pass"]
    commands = {"plain": (plain, env), "guarded": (plain, tree_env),
                "run": ([*forksafe_command(), "run", "--", *plain], env)}
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for number in range(WARMUP + ROUNDS):
        order = list(commands) if number % 2 == 0 else list(reversed(commands))
        for name in order:
            argv, environ = commands[name]
            result = timed(argv, environ)
            if number >= WARMUP:
                samples[name].append(result)

    def median(name: str, index: int) -> float:
        return statistics.median(s[index] for s in samples[name]) * 1e3

    def paired(name: str, index: int) -> float:
        return statistics.median(
            r[index] - p[index] for r, p in zip(samples[name], samples["plain"])) * 1e3

    print(f"forksafe run start-up, {ROUNDS} rounds (after {WARMUP} warm-up), "
          f"{' '.join(commands['run'][0][:2])}")
    for label, index in (("wall", 0), ("cpu", 1)):
        base = median("plain", index)
        for name, what in (("guarded", "python -c pass, guard installed by the hook"),
                           ("run", "forksafe run -- python -c pass")):
            cand = median(name, index)
            diff = paired(name, index)
            verdict = ""
            if name == "run" and label == "wall":
                verdict = f"  (target <= {TARGET_MS:.0f} ms: " \
                          f"{'ok' if diff <= TARGET_MS else 'MISSED'})"
            print(f"{label:4} {what:45} plain {base:7.1f} ms  this {cand:7.1f} ms  "
                  f"+{diff:6.1f} ms  {cand / base if base else float('inf'):5.2f}x{verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
