"""A parent whose pool lost a hung worker is unstuck: its wait ends with the diagnosis.

A real ``multiprocessing.Pool.map`` whose worker hangs on a lock a parent's thread
held at fork time raises ``ForkSafetyError`` soon after the hang timeout (within
+ 2 s on a quiet machine: benchmarks/bench_diagnosis.py), both with a hang timeout
set in the program and under ``forksafe run``; its twin, a pool whose tasks compute
for longer than the hang timeout, returns every result.
(Django's parallel test runner: tests/test_frameworks.py.)
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from conftest import run_scenario

TIMEOUT = 1.0

POOL = """
import json, multiprocessing as mp, os, sys, threading, time
import forksafe
lock = threading.Lock()
def hold():
    with lock:
        time.sleep(60)
def task(x):
    {task}
    return x * 2
if __name__ == "__main__":
    if "{mode}" == "install":
        forksafe.install("log", hang_timeout={timeout})
    threading.Thread(target=hold, name="holder", daemon=True).start()
    time.sleep(0.1)
    start = time.monotonic()
    try:
        with mp.get_context("fork").Pool(2) as pool:
            result = {{"value": pool.map(task, range(4))}}
    except Exception as exc:
        result = {{"raised": type(exc).__name__, "message": str(exc)}}
    result["elapsed"] = time.monotonic() - start
    print("FORKSAFE-RESULT:" + json.dumps(result), flush=True)
"""

#: Soon after the hang timeout, with room for a loaded machine; the latency itself
#: (target: the hang timeout + 2 s) is measured by benchmarks/bench_diagnosis.py.
IN_TIME = TIMEOUT + 5.0

HANG = "with lock:  # task-line\n        pass"
COMPUTE = "end = time.monotonic() + 2.5\n    while time.monotonic() < end: sum(range(100))"


def pool_run(tmp_path: pathlib.Path, mode: str, task: str) -> tuple[dict[str, object], str]:
    code = POOL.format(task=task, mode=mode, timeout=TIMEOUT)
    if mode == "install":
        s = run_scenario(code, tmp_path, timeout=60)
        return s.result, s.stderr
    (tmp_path / "app.py").write_text(code)
    proc = subprocess.run([sys.executable, "-m", "forksafe", "run", "--policy", "log",
                           "--hang-timeout", str(TIMEOUT), "--", sys.executable, "app.py"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("FORKSAFE-RESULT:"))
    return json.loads(line.partition(":")[2]), proc.stderr


@pytest.mark.parametrize("mode", ["install", "run"])
def test_pool_map_whose_worker_hangs_raises_with_the_diagnosis(tmp_path: pathlib.Path,
                                                               mode: str) -> None:
    result, _ = pool_run(tmp_path, mode, HANG)
    assert result.get("raised") == "ForkSafetyError", result
    message = str(result["message"])
    assert message.startswith("a worker of this pool (pid ")
    assert "hung and forksafe ended it" in message
    assert "it is blocked taking `lock` at app.py:" in message or \
        "it is blocked taking `lock` at scenario.py:" in message
    assert "thread 'holder'" in message
    elapsed = result["elapsed"]
    assert isinstance(elapsed, float) and elapsed <= IN_TIME, elapsed


@pytest.mark.parametrize("mode", ["install", "run"])
def test_pool_map_whose_tasks_compute_for_long_returns_every_result(tmp_path: pathlib.Path,
                                                                    mode: str) -> None:
    """Twin: the same hazard at fork time; each task computes for 2.5 hang timeouts."""
    result, stderr = pool_run(tmp_path, mode, COMPUTE)
    assert result.get("value") == [0, 2, 4, 6], (result, stderr)
    assert "made no progress" not in stderr


BILLIARD = """
import json, os, threading, time
import forksafe
from billiard import Pool
lock = threading.Lock()
def hold():
    with lock:
        time.sleep(60)
def task(x):
    with lock:
        return x
if __name__ == "__main__":
    forksafe.install("log", hang_timeout={timeout})
    threading.Thread(target=hold, name="holder", daemon=True).start()
    time.sleep(0.1)
    start = time.monotonic()
    pool = Pool(2)
    try:
        pool.apply_async(task, (1,)).get(timeout=30)
        result = {{"raised": None}}
    except Exception as exc:
        # billiard wraps the error to carry its traceback across processes
        inner = getattr(exc, "exc", exc)
        result = {{"raised": type(inner).__name__, "text": str(inner)}}
    result["elapsed"] = time.monotonic() - start
    pool.terminate()
    print("FORKSAFE-RESULT:" + json.dumps(result), flush=True)
"""


def test_billiard_fails_the_lost_task_at_once(tmp_path: pathlib.Path) -> None:
    """billiard (Celery's pool) fails a lost worker's task after ``lost_worker_timeout``
    (10 s); for a worker forksafe ended, at once."""
    pytest.importorskip("billiard", reason="celery (with billiard) is in the test extras")
    s = run_scenario(BILLIARD.format(timeout=TIMEOUT), tmp_path, timeout=60)
    assert s.result["raised"] == "WorkerLostError", (s.result, s.stderr)
    assert s.result["elapsed"] <= IN_TIME
