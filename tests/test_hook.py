"""The environment hook: FORKSAFE_* variables guard Python processes you do not control.

These tests start real interpreters of the test environment, where forksafe is
installed (editable or not) with its ``forksafe-hook.pth``; the scripts never
import forksafe themselves.
"""

from __future__ import annotations

import io
import json
import pathlib
import site
import sys

from conftest import MARK, ROOT, run_scenario
from forksafe import _config, _hook

UNSET = {"FORKSAFE_POLICY": "", "FORKSAFE_REPORT": "", "FORKSAFE_HANG_TIMEOUT": "",
         "FORKSAFE_FAIL_ON": ""}

# The script knows nothing about forksafe; it reports what the hook did.
SCRIPT = f"""
import json, os, sys, threading
lock, ready, stop = threading.Lock(), threading.Event(), threading.Event()
def body():
    with lock:
        ready.set()
        stop.wait()
threading.Thread(target=body, name="lock-holder", daemon=True).start()
ready.wait()
pid = os.fork()  # FORK
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
stop.set()
guard = sys.modules.get("forksafe._guard")
config = guard.installed() if guard else None
print({MARK!r} + json.dumps({{
    "imported": "forksafe._guard" in sys.modules,
    "policy": config.policy if config else None,
    "hang_timeout": config.hang_timeout if config else None,
    "events": [e.action for e in guard.history()] if guard else [],
}}))
"""


def _ours(stderr: str) -> list[str]:
    """forksafe's own lines (CPython 3.12+ adds its DeprecationWarning for the fork)."""
    return [line for line in stderr.splitlines() if line.startswith("forksafe")]


def _run(tmp_path: pathlib.Path, **env: str) -> object:
    return run_scenario(SCRIPT, tmp_path, env={**UNSET, **env})


def test_the_pth_file_is_installed_next_to_the_package() -> None:
    """This environment's site-packages holds the hook, identical to the source file."""
    shipped = (ROOT / "src" / "forksafe-hook.pth").read_text()
    found = [pathlib.Path(d) / "forksafe-hook.pth" for d in site.getsitepackages()]
    installed = [p.read_text() for p in found if p.exists()]
    assert installed == [shipped]


def test_without_variables_the_guard_is_not_even_imported(tmp_path: pathlib.Path) -> None:
    """With no FORKSAFE_* variable, a Python process never imports the guard."""
    s = _run(tmp_path)
    assert s.result == {"imported": False, "policy": None, "hang_timeout": None, "events": []}
    assert "forksafe" not in s.stderr


def test_policy_from_the_environment_warns_at_the_scripts_line(tmp_path: pathlib.Path) -> None:
    """FORKSAFE_POLICY=warn guards a script that never imports forksafe."""
    s = _run(tmp_path, FORKSAFE_POLICY="warn", FORKSAFE_HANG_TIMEOUT="2.5")
    assert s.result == {"imported": True, "policy": "warn", "hang_timeout": 2.5,
                        "events": ["warned"]}
    assert f"{s.path}:{s.line_of('FORK')}: ForkSafetyWarning" in s.stderr
    assert "lock-holder" in s.stderr


def test_policy_off_leaves_the_process_alone(tmp_path: pathlib.Path) -> None:
    """FORKSAFE_POLICY=off installs nothing and says nothing."""
    s = _run(tmp_path, FORKSAFE_POLICY="off")
    assert s.result["policy"] is None
    assert "forksafe" not in s.stderr


def test_bad_policy_is_one_line_and_the_program_runs(tmp_path: pathlib.Path) -> None:
    """A bad FORKSAFE_POLICY gets one line naming the variable and values; the script runs."""
    s = _run(tmp_path, FORKSAFE_POLICY="loud")
    assert s.returncode == 0
    assert s.result["policy"] is None
    assert _ours(s.stderr) == _config.from_environment({"FORKSAFE_POLICY": "loud"})[1]
    [line] = _ours(s.stderr)
    assert "FORKSAFE_POLICY='loud'" in line and "log, warn, raise, off" in line


def test_bad_hang_timeout_is_one_line_and_the_guard_still_runs(tmp_path: pathlib.Path) -> None:
    """A bad FORKSAFE_HANG_TIMEOUT is reported once; the guard is installed without it."""
    s = _run(tmp_path, FORKSAFE_POLICY="log", FORKSAFE_HANG_TIMEOUT="-3")
    assert s.result["policy"] == "log"
    assert s.result["hang_timeout"] is None
    assert s.result["events"] == ["logged"]
    assert _ours(s.stderr) == _config.from_environment(
        {"FORKSAFE_POLICY": "log", "FORKSAFE_HANG_TIMEOUT": "-3"})[1]
    [line] = _ours(s.stderr)
    assert "FORKSAFE_HANG_TIMEOUT='-3'" in line and "not watched" in line


def test_unwritable_report_is_one_line_and_the_guard_still_runs(tmp_path: pathlib.Path) -> None:
    """A FORKSAFE_REPORT that cannot be opened is named once; forks are still guarded."""
    s = _run(tmp_path, FORKSAFE_POLICY="log", FORKSAFE_REPORT="/nonexistent/dir/r.jsonl")
    assert s.result["events"] == ["logged"]
    lines = _ours(s.stderr)
    assert len(lines) == 1
    assert "FORKSAFE_REPORT" in lines[0]
    assert "/nonexistent/dir/r.jsonl" in lines[0]


def test_report_collects_forks_from_the_whole_process_tree(tmp_path: pathlib.Path) -> None:
    """Forks of a parent and of a Python it runs land in one JSON-lines file."""
    report = tmp_path / "tree.jsonl"
    child = tmp_path / "child.py"
    child.write_text("import os\npid = os.fork()\nif pid == 0:\n    os._exit(0)\n"
                     "os.waitpid(pid, 0)\n")
    code = f"""
import os, subprocess, sys
pid = os.fork()
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
subprocess.run([sys.executable, {str(child)!r}, "--flag"], check=True)
print({MARK!r} + '{{"done": true}}')
"""
    s = run_scenario(code, tmp_path, env={**UNSET, "FORKSAFE_REPORT": str(report)})
    assert s.result == {"done": True}
    records = [json.loads(line) for line in report.read_text().splitlines()]
    forks = [r for r in records if r["type"] == "fork"]
    # Each process writes its lines by the batch (and at exit): in any order.
    assert sorted(r["command"] for r in forks) == sorted([[str(s.path)], [str(child), "--flag"]])
    assert len({r["parent_pid"] for r in forks}) == 2
    assert all(r["action"] == "allowed" and r["mechanism"] == "os.fork" for r in forks)


def test_activate_without_variables_does_nothing() -> None:
    """activate() on an empty environment installs nothing and prints nothing."""
    err = io.StringIO()
    assert _hook.activate({}, stderr=err) is False
    assert err.getvalue() == ""


def test_activate_names_a_bad_policy_in_one_line() -> None:
    """activate() reports a bad policy as one line and does not install the guard."""
    err = io.StringIO()
    assert _hook.activate({"FORKSAFE_POLICY": "sometimes"}, stderr=err) is False
    assert err.getvalue() == _config.IGNORED.format(
        problem="FORKSAFE_POLICY='sometimes': expected one of: log, warn, raise, off",
        consequence="the fork guard is off in this process") + "\n"
    assert "forksafe._guard" not in sys.modules or \
        sys.modules["forksafe._guard"].installed() is None  # type: ignore[attr-defined]


def test_the_hook_imports_nothing_the_program_did_not(tmp_path: pathlib.Path) -> None:
    """A guarded interpreter starts without threading, subprocess, warnings or typing."""
    code = f"""
import sys
heavy = [m for m in ("threading", "subprocess", "warnings", "typing") if m in sys.modules]
guard = sys.modules["forksafe._guard"]
print({MARK!r} + '{{"heavy": %s, "policy": "%s"}}' % (heavy, guard.installed().policy))
"""
    s = run_scenario(code, tmp_path, env={**UNSET, "FORKSAFE_POLICY": "warn"})
    assert s.result == {"heavy": [], "policy": "warn"}


def test_the_pth_line_looks_at_exactly_the_user_variables() -> None:
    """The .pth condition and _config name the same variables: a variable only _config
    knows would be silently ignored, one only the .pth knows would import for nothing."""
    import re

    line = (ROOT / "src" / "forksafe-hook.pth").read_text()
    assert tuple(re.findall(r'get\("(FORKSAFE_\w+)"\)', line)) == _config.USER_VARIABLES


def test_hang_timeout_alone_implies_log(tmp_path: pathlib.Path) -> None:
    """FORKSAFE_HANG_TIMEOUT alone asks for hang watching: the guard runs under 'log'."""
    s = _run(tmp_path, FORKSAFE_HANG_TIMEOUT="30")
    assert s.result == {"imported": True, "policy": "log", "hang_timeout": 30.0,
                        "events": ["logged"]}
    assert _ours(s.stderr) == []


def test_fail_on_alone_says_it_needs_policy_raise(tmp_path: pathlib.Path) -> None:
    """FORKSAFE_FAIL_ON alone would do nothing: one line says so, and nothing is installed."""
    s = _run(tmp_path, FORKSAFE_FAIL_ON="warning")
    assert s.result["policy"] is None
    assert s.returncode == 0
    [line] = _ours(s.stderr)
    assert "FORKSAFE_FAIL_ON='warning'" in line and "FORKSAFE_POLICY=raise" in line
    assert "guard is off" in line


def test_fail_on_with_an_implied_policy_says_forks_are_only_logged() -> None:
    """FORKSAFE_FAIL_ON with FORKSAFE_REPORT (policy log implied): said once, recording on."""
    config, [line] = _config.from_environment({"FORKSAFE_FAIL_ON": "warning",
                                               "FORKSAFE_REPORT": "r.jsonl"})
    assert config is not None and config.policy == "log" and config.report == "r.jsonl"
    assert "only logged" in line
    config, lines = _config.from_environment({"FORKSAFE_FAIL_ON": "warning",
                                              "FORKSAFE_POLICY": "raise"})
    assert config is not None and config.fail_on == _config.LEVELS["warning"] and lines == []


def test_a_bad_hang_timeout_alone_installs_nothing() -> None:
    """FORKSAFE_HANG_TIMEOUT=-3 alone: the one reason for the guard is gone, and so is it."""
    config, [line] = _config.from_environment({"FORKSAFE_HANG_TIMEOUT": "-3"})
    assert config is None and "FORKSAFE_HANG_TIMEOUT='-3'" in line


def test_a_report_file_gets_the_forks_of_a_process_that_ends_by_os_exit(
        tmp_path: pathlib.Path) -> None:
    """Lines are written by the batch; a worker that ends with ``os._exit`` (no exit
    handler runs) still leaves the forks it made and its children's outcomes."""
    report = tmp_path / "worker.jsonl"
    code = """
import os
for _ in range(3):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
os._exit(0)
"""
    s = run_scenario(code, tmp_path, env={**UNSET, "FORKSAFE_REPORT": str(report)})
    assert s.returncode == 0
    records = [json.loads(line) for line in report.read_text().splitlines()]
    assert [r["type"] for r in records].count("fork") == 3
    outcomes = [r["outcome"] for r in records if r["type"] == "outcome"]
    assert [(o["status"], o["exit_code"]) for o in outcomes] == [("exited", 0)] * 3
