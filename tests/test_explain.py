"""`forksafe explain FILE`: a saved run report renders as the run's own summary did."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import subprocess
import sys

import pytest

from forksafe._explain import LINES_SKIPPED, REPORT_FOREIGN, REPORT_UNREADABLE
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


def explain_text(tmp_path: pathlib.Path, content: str | bytes, **env: str
                 ) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "r.json"
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)
    return subprocess.run([sys.executable, "-m", "forksafe", "explain", str(path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})


def refused(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    [line] = proc.stderr.splitlines()
    return line


RUN_HEAD = '{"schema": "forksafe-report/1", "command": ["app"], "exit_code": 0, "forks": '
CLEAN_FORK = {"parent_pid": 1, "child_pid": 2, "time": "2026-11-25T10:00:00Z",
              "mechanism": "os.fork", "site": {"file": "app.py", "line": 3, "function": "main"},
              "action": "allowed", "thread": "MainThread", "hazards": [],
              "outcome": {"status": "exited", "exit_code": 0, "signal": None,
                          "traceback": None, "diagnosis": None}}


def test_a_schema_alone_says_what_is_missing(tmp_path: pathlib.Path) -> None:
    """It used to render "if pid 0 forked now (from thread '')": now it says what is missing."""
    line = refused(explain_text(tmp_path, '{"schema": "forksafe-report/1"}'))
    assert "neither 'forks' (a run report) nor 'hazards' (a check)" in line
    line = refused(explain_text(tmp_path, '{"schema": "forksafe-report/1", "hazards": []}'))
    assert "a check without 'parent_pid'" in line
    line = refused(explain_text(tmp_path, '{"schema": "forksafe-report/1", "forks": []}'))
    assert "a run report without 'command'" in line


@pytest.mark.parametrize(("forks", "said"), [
    pytest.param("[1, 2]", "fork entry 1 is not an object", id="non-objects"),
    pytest.param('[{"parent_pid": 1}]', "fork entry 1 has no 'mechanism'", id="missing"),
    # An id of its own: pytest puts the test's id in the environment (PYTEST_CURRENT_TEST),
    # and 200,000 brackets there make every exec fail with E2BIG.
    pytest.param("[" * 100_000 + "]" * 100_000, "nested too deeply", id="deep"),
    pytest.param(json.dumps([CLEAN_FORK, {**CLEAN_FORK, "outcome": {"status": "exploded"}}]),
                 "fork entry 2 has an outcome status 'exploded' this version does not know",
                 id="unknown-status"),
    pytest.param(json.dumps([{**CLEAN_FORK, "hazards": [
        {"kind": "thread", "severity": "warning", "summary": "s", "remedy": "r",
         "evidence": {"state": ["running"]}}]}]),
        "fork entry 1, hazard 1: evidence 'state' has the wrong type (list)",
        id="evidence-shape"),
])
def test_malformed_entries_are_one_line(tmp_path: pathlib.Path, forks: str, said: str) -> None:
    """Non-objects, missing fields, deep nesting (RecursionError), an outcome status this
    version does not know (it rendered as a clean fork), evidence of the wrong shape."""
    line = refused(explain_text(tmp_path, RUN_HEAD + forks + "}"))
    assert line.startswith(REPORT_UNREADABLE.format(path=str(tmp_path / "r.json"), error=""))
    assert said in line, line


def test_dev_zero_is_refused_at_once() -> None:
    """An endless input is not read to its end: /dev/zero fails at its first byte."""
    proc = subprocess.run([sys.executable, "-m", "forksafe", "explain", "/dev/zero"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.strip() == REPORT_UNREADABLE.format(
        path="/dev/zero", error="not valid JSON (Expecting value at line 1)")


def test_a_closed_stdin_is_one_line() -> None:
    """``explain -`` started with no standard input at all (``0<&-``): one line, not an
    AttributeError on ``sys.stdin`` (which Python then sets to None)."""
    proc = subprocess.run(["sh", "-c", '"$0" -m forksafe explain - 0<&-', sys.executable],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == REPORT_UNREADABLE.format(
        path="-", error="there is no standard input"), proc.stderr


def test_non_ascii_report_renders_on_an_ascii_terminal(tmp_path: pathlib.Path) -> None:
    """PYTHONIOENCODING=ascii: a valid report naming non-ASCII paths renders, escaped (it
    used to be called corrupt); from stdin too."""
    fork = {**CLEAN_FORK, "site": {"file": "café.py", "line": 3, "function": "crème"}}
    content = RUN_HEAD + json.dumps([fork], ensure_ascii=False) + "}"
    proc = explain_text(tmp_path, content, PYTHONIOENCODING="ascii")
    assert proc.returncode == 0, proc.stderr
    assert "caf\\xe9.py:3 in cr\\xe8me" in proc.stdout
    piped = subprocess.run([sys.executable, "-m", "forksafe", "explain", "-"], input=content,
                           capture_output=True, text=True, timeout=60, encoding="utf-8",
                           env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert piped.returncode == 0 and piped.stdout == proc.stdout, piped.stderr


def test_a_forksafe_report_event_file_is_explained(tmp_path: pathlib.Path) -> None:
    """The JSON lines FORKSAFE_REPORT writes are merged as forksafe run merges them; a torn
    last line is skipped and said (it was "Extra data at line 2")."""
    (tmp_path / "app.py").write_text(CRASH)
    env = {**os.environ, "FORKSAFE_REPORT": str(tmp_path / "events.jsonl"),
           "FORKSAFE_POLICY": "log"}
    subprocess.run([sys.executable, "app.py"], cwd=tmp_path, env=env, capture_output=True,
                   timeout=60, check=True)
    with open(tmp_path / "events.jsonl", "a") as f:
        f.write('{"type": "fork", "parent_pid": 1, "chi')  # a writer killed mid-line
    proc = forksafe(tmp_path, "explain", "events.jsonl")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("forksafe: 2 forks seen in `app.py`: 1 child crashed")
    assert "x2: logged" in proc.stdout and "killed by SIGSEGV" in proc.stdout
    assert proc.stderr.strip() == LINES_SKIPPED.format(count=1, path="events.jsonl")


def big_report(path: pathlib.Path, megabytes: int) -> int:
    """A run report of ``megabytes``: forks of a few kinds, every child its own pid and
    diagnosis; how many forks."""
    hazard = {"kind": "thread", "severity": "warning", "summary": "thread 'holder' holds `lock`",
              "remedy": "join it", "evidence": {"name": "holder", "state": "idle",
                                                "locks": [{"lock": "lock", "at": "app.py:4",
                                                           "locked": True}]}}
    count = 0
    with open(path, "w") as f:
        f.write(RUN_HEAD + "[\n")
        while f.tell() < megabytes * 1024 * 1024:
            crashed = count % 3 == 0
            outcome = ({"status": "signaled", "signal": "SIGSEGV",
                        "traceback": "Fatal Python error: Segmentation fault\n" * 20,
                        "diagnosis": f"child {1000 + count} was killed by SIGSEGV"}
                       if crashed else {"status": "exited", "exit_code": 0})
            fork = {**CLEAN_FORK, "child_pid": 1000 + count, "hazards": [hazard],
                    "action": "logged", "outcome": outcome}
            f.write(("," if count else "") + json.dumps(fork, indent=2))
            count += 1
        f.write("]}\n")
    return count


def test_a_large_report_renders_in_bounded_memory_with_progress(tmp_path: pathlib.Path) -> None:
    """A 16 MB report: read as a stream (the summary's memory grows with kinds of fork, not
    with forks), its progress shown on a terminal's stderr."""
    import pty

    path = tmp_path / "big.json"
    count = big_report(path, 16)
    # Its peak memory as wait4 tells it, asked by a fresh interpreter in between: a child
    # inherits its parent's peak at exec (Linux), and this test runner's may be large.
    measured = ("import os, subprocess, sys\np = subprocess.Popen(sys.argv[1:])\n"
                "_, status, usage = os.wait4(p.pid, 0)\n"
                "with open('maxrss.txt', 'w') as f:\n"
                "    f.write(str(usage.ru_maxrss))\n"
                "sys.exit(os.waitstatus_to_exitcode(status))\n")
    master, slave = pty.openpty()
    with open(tmp_path / "out.txt", "w") as out_file:
        proc = subprocess.Popen([sys.executable, "-c", measured, sys.executable, "-m",
                                 "forksafe", "explain", str(path)],
                                stdout=out_file, stderr=slave, cwd=tmp_path)
    os.close(slave)
    shown = b""
    try:
        with contextlib.suppress(OSError):  # EIO once the child closed the terminal
            while chunk := os.read(master, 4096):
                shown += chunk
        proc.wait(timeout=60)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = (tmp_path / "out.txt").read_text()
    crashed = (count + 2) // 3
    assert proc.returncode == 0, shown
    assert out.startswith(f"forksafe: {count} forks seen in `app` (exit code 0): "
                          f"{crashed} children crashed")
    assert f"children: {crashed} killed by SIGSEGV, {count - crashed} exited 0" in out
    assert b"forksafe: reading " in shown and b"MB of 16 MB" in shown, shown[:200]
    peak = int((tmp_path / "maxrss.txt").read_text())  # KB
    assert peak < 45_000, f"{peak} KB: the file alone is 16 MB; read whole it took ~95 MB"
