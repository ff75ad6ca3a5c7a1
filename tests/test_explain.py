"""`forksafe explain FILE`: a saved run report renders as the run's own summary did."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

from forksafe._cli import REPORT_FOREIGN, REPORT_UNREADABLE
from forksafe._render.runs import QUIET_FORKS
from forksafe._runreport import render_run

CRASH = """
import ctypes, os, threading, time
lock = threading.Lock()
def hold():
    with lock:
        time.sleep(30)
threading.Thread(target=hold, name="holder", daemon=True).start()
time.sleep(0.1)
for i in range(2):
    pid = os.fork()
    if pid == 0:
        if i == 1:
            ctypes.string_at(0)
        os._exit(0)
    os.waitpid(pid, 0)
"""


def forksafe(tmp_path: pathlib.Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "forksafe", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)


def test_explain_renders_a_saved_run_report(tmp_path: pathlib.Path) -> None:
    """The saved report explains the crashed child just as the live summary did."""
    (tmp_path / "app.py").write_text(CRASH)
    live = forksafe(tmp_path, "run", "--policy", "log", "--report", "r.json", "--",
                    sys.executable, "app.py")
    assert live.returncode == 0, live.stderr
    saved = forksafe(tmp_path, "explain", "r.json")
    assert saved.returncode == 0, saved.stderr
    assert "forksafe: 2 forks seen in" in saved.stdout
    assert "x2: logged" in saved.stdout
    assert "killed by SIGSEGV" in saved.stdout and "'holder'" in saved.stdout
    assert saved.stdout.strip() in live.stderr, "explain and the live summary are the same text"
    report = json.loads((tmp_path / "r.json").read_text())
    assert "killed by SIGSEGV" in render_run(report)


def test_explain_of_a_clean_run_is_short(tmp_path: pathlib.Path) -> None:
    """Safe twin: a run whose forks were clean and whose children exited is one line per site."""
    report = {"schema": "forksafe-report/1", "command": ["python", "app.py"], "exit_code": 0,
              "forks": [{"parent_pid": 1, "child_pid": 2 + i, "time": "2026-11-25T10:00:00Z",
                         "mechanism": "os.fork",
                         "site": {"file": "app.py", "line": 3, "function": "main"},
                         "action": "allowed", "hazards": [],
                         "outcome": {"status": "exited", "exit_code": 0}} for i in range(5)]}
    (tmp_path / "r.json").write_text(json.dumps(report))
    proc = forksafe(tmp_path, "explain", "r.json")
    assert proc.returncode == 0
    assert proc.stdout.splitlines() == [
        "forksafe: 5 forks seen in `python app.py` (exit code 0)", "",
        f"{QUIET_FORKS}: os.fork at app.py:3 in main x5"]


def test_corrupt_and_foreign_files_are_one_line_exit_2(tmp_path: pathlib.Path) -> None:
    """A torn report, a foreign JSON file and a missing file each give one line and exit 2."""
    (tmp_path / "torn.json").write_text('{"schema": "forksafe-report/1", "forks": [{"pa')
    (tmp_path / "foreign.json").write_text('{"name": "not ours"}')
    (tmp_path / "bad.json").write_text(
        '{"schema": "forksafe-report/1", "command": [], "exit_code": 0, "forks": 3}')
    for name, start in [
        ("torn.json", REPORT_UNREADABLE.format(path="torn.json", error="not valid JSON")),
        ("foreign.json", REPORT_FOREIGN.format(path="foreign.json", schema="forksafe-report/1")),
        ("bad.json", REPORT_UNREADABLE.format(path="bad.json", error="corrupt")),
        ("missing.json", REPORT_UNREADABLE.format(path="missing.json", error="")),
    ]:
        proc = forksafe(tmp_path, "explain", name)
        assert proc.returncode == 2, (name, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith(start.rstrip(")").rstrip()), (name, proc.stderr)


def test_children_stopped_by_their_parent_are_not_findings() -> None:
    """Safe twin: a clean fork whose child was ended by SIGTERM (Pool.terminate) stays quiet."""
    forks = [{"parent_pid": 1, "child_pid": 2 + i, "time": 0, "mechanism": "multiprocessing.Pool",
              "site": {"file": "app.py", "line": 5, "function": "main"}, "action": "allowed",
              "hazards": [], "outcome": {"status": "signaled", "signal": sig}}
             for i, sig in enumerate(["SIGTERM", "SIGKILL"])]
    text = render_run({"schema": "forksafe-report/1", "command": ["app"], "exit_code": 0,
                       "forks": forks})
    assert text.splitlines() == [
        "forksafe: 2 forks seen in `app` (exit code 0)", "",
        f"{QUIET_FORKS}: multiprocessing.Pool at app.py:5 in main x2"]


def test_identical_fates_fold_into_one_diagnosis() -> None:
    """Five workers killed the same way, pids aside, read as one diagnosis and a count."""
    forks = []
    for i in range(5):
        forks.append({
            "parent_pid": 1, "child_pid": 100 + i, "time": 0, "mechanism": "multiprocessing",
            "site": {"file": "app.py", "line": 7, "function": "main"}, "action": "warned",
            "hazards": [{"kind": "native-runtime", "severity": "error",
                         "summary": "gRPC core is active", "remedy": "use spawn",
                         "evidence": {}}],
            "outcome": {"status": "signaled", "signal": "SIGSEGV",
                        "diagnosis": f"child {100 + i} was killed by SIGSEGV. fix: use spawn"}})
    text = render_run({"schema": "forksafe-report/1", "command": ["app"], "exit_code": 1,
                       "forks": forks})
    assert "fork via multiprocessing at app.py:7 in main x5: warned" in text
    assert "children: 5 killed by SIGSEGV" in text
    assert "child 100 killed by SIGSEGV (and 4 more like it):" in text
    assert text.count("was killed by SIGSEGV") == 1
    assert "child 100 was killed by SIGSEGV (fix: see above)" in text
