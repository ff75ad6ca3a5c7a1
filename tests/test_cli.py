"""The `forksafe check` and `forksafe explain` command lines, run as users run them."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from forksafe._cli import IMPORT_FAILED
from forksafe._explain import REPORT_FOREIGN, REPORT_UNREADABLE


def forksafe(*args: str, cwd: pathlib.Path, stdin: str | None = None
             ) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(cwd))
    return subprocess.run([sys.executable, "-m", "forksafe", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd, env=env, input=stdin)


@pytest.fixture
def project(tmp_path: pathlib.Path) -> pathlib.Path:
    """A small project whose modules have (or lack) fork hazards when imported."""
    (tmp_path / "clean_app.py").write_text("X = 1\n")
    (tmp_path / "threaded_app.py").write_text(
        "import threading\n"
        "stop = threading.Event()\n"
        "worker = threading.Thread(target=stop.wait, name='refresher', daemon=True)\n"
        "worker.start()\n"
    )
    (tmp_path / "broken_app.py").write_text("raise RuntimeError('boom at import')\n")
    return tmp_path


def test_check_clean_exits_zero(project: pathlib.Path) -> None:
    """A clean import exits 0 and says forking looks safe."""
    proc = forksafe("check", "--import", "clean_app", cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert "forking looks safe" in proc.stdout


def test_check_warning_passes_by_default_and_fails_on_warning(project: pathlib.Path) -> None:
    """A warning exits 0 under the default --fail-on error, 1 under --fail-on warning."""
    default = forksafe("check", "--import", "threaded_app", cwd=project)
    assert default.returncode == 0
    assert "refresher" in default.stdout
    assert "threaded_app.py:4" in default.stdout, "the thread's start line is known"
    strict = forksafe("check", "--import", "threaded_app", "--fail-on", "warning", cwd=project)
    assert strict.returncode == 1


def test_check_error_exits_one(project: pathlib.Path, native_dir: pathlib.Path) -> None:
    """An active OpenMP pool at import time fails the check with exit 1."""
    (project / "omp_app.py").write_text(
        f"import ctypes\nctypes.CDLL({str(native_dir / 'libomp_pool.so')!r}).omp_pool_run(1000)\n"
    )
    proc = forksafe("check", "--import", "omp_app", cwd=project)
    assert proc.returncode == 1
    assert "ERROR" in proc.stdout and "GNU OpenMP" in proc.stdout


def test_check_json_is_a_fork_like_entry(project: pathlib.Path) -> None:
    """--json prints the fork entry of the report contract, without child data."""
    proc = forksafe("check", "--import", "threaded_app", "--json", cwd=project)
    data = json.loads(proc.stdout)
    assert data["schema"] == "forksafe-report/1"
    assert {"parent_pid", "time", "mechanism", "site", "action", "hazards"} <= set(data)
    assert "child_pid" not in data and "outcome" not in data
    [hazard] = data["hazards"]
    assert set(hazard) == {"kind", "severity", "summary", "remedy", "evidence"}


def test_import_failure_is_one_line_exit_two(project: pathlib.Path) -> None:
    """A module that fails to import is named in one line, exit 2, no traceback."""
    proc = forksafe("check", "--import", "broken_app", cwd=project)
    assert proc.returncode == 2
    expected = IMPORT_FAILED.format(module="broken_app", error="RuntimeError: boom at import")
    assert proc.stderr.strip() == expected
    assert proc.stdout == ""


def test_import_failure_with_debug_shows_the_traceback(project: pathlib.Path) -> None:
    """--debug adds the traceback for the same failure."""
    proc = forksafe("--debug", "check", "--import", "broken_app", cwd=project)
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "boom at import" in proc.stderr


@pytest.mark.parametrize("args", [["check", "--fail-on", "info"], ["check", "--bogus"], [],
                                  ["nosuchcommand"]])
def test_usage_errors_are_one_line_exit_two(project: pathlib.Path, args: list[str]) -> None:
    """Bad arguments give exactly one line on stderr and exit 2."""
    proc = forksafe(*args, cwd=project)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "--help" in proc.stderr


def test_explain_renders_a_saved_check(project: pathlib.Path) -> None:
    """A saved `check --json` renders back to the same text as the live check."""
    saved = forksafe("check", "--import", "threaded_app", "--json", cwd=project).stdout
    (project / "r.json").write_text(saved)
    proc = forksafe("explain", "r.json", cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert "refresher" in proc.stdout and "WARNING thread" in proc.stdout
    assert forksafe("explain", "-", cwd=project, stdin=saved).stdout == proc.stdout


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", REPORT_UNREADABLE.format(path="r.json", error="not valid JSON")),
    ('{"schema": "other/1"}', REPORT_FOREIGN.format(path="r.json", schema="forksafe-report/1")),
    ('{"schema": "forksafe-report/1", "hazards": [{"kind": 1}]}',
     REPORT_UNREADABLE.format(path="r.json", error="corrupt")),
    ('{"schema": "forksafe-report/1", "forks": [{"hazards": 5}]}',
     REPORT_UNREADABLE.format(path="r.json", error="corrupt")),
])
def test_explain_corrupt_or_foreign_file_is_one_line(
    project: pathlib.Path, content: str, message: str
) -> None:
    """A corrupt or foreign report is refused in one line with exit 2."""
    (project / "r.json").write_text(content)
    proc = forksafe("explain", "r.json", cwd=project)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith(message.split("(", maxsplit=1)[0].rstrip(": ")), proc.stderr


def test_explain_missing_file(project: pathlib.Path) -> None:
    """A missing file is one line naming it, exit 2."""
    proc = forksafe("explain", "missing.json", cwd=project)
    assert proc.returncode == 2
    assert proc.stderr.strip() == REPORT_UNREADABLE.format(
        path="missing.json", error="No such file or directory")


@pytest.mark.parametrize(("args", "named"), [
    (["run", "--policy", "loud", "--", "true"],
     "--policy='loud': expected one of: log, warn, raise"),
    (["run", "--hang-timeout", "inf", "--", "true"], "--hang-timeout='inf' is not a finite"),
    (["run", "--hang-timeout", "-1", "--", "true"], "--hang-timeout='-1' is not a finite"),
    (["check", "--fail-on", "info"], "--fail-on='info': expected one of: warning, error"),
])
def test_bad_option_values_are_named_as_written(project: pathlib.Path, args: list[str],
                                                named: str) -> None:
    """Option values go through the one validation path (forksafe._config): the error
    names the option as the user wrote it, and what it accepts."""
    proc = forksafe(*args, cwd=project)
    assert proc.returncode == 2
    assert named in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(("fails", "code"), [(False, 1), (True, 2)])
def test_check_exits_although_the_module_started_a_non_daemon_thread(
        project: pathlib.Path, fails: bool, code: int) -> None:
    """A module whose non-daemon thread never ends: the report (or the import error) is
    printed whole and check exits with its own code instead of waiting for the thread."""
    (project / "server_app.py").write_text(
        "import threading\n"
        "threading.Thread(target=threading.Event().wait, name='serve-forever').start()\n"
        + ("raise RuntimeError('boom after the thread started')\n" if fails else ""))
    proc = forksafe("check", "--import", "server_app", "--fail-on", "warning", "--json",
                    cwd=project)  # the hard timeout (120 s) fails the test if it hangs
    assert proc.returncode == code, proc.stderr
    if fails:
        assert proc.stderr.strip() == IMPORT_FAILED.format(
            module="server_app", error="RuntimeError: boom after the thread started")
    else:
        names = [h["evidence"]["name"] for h in json.loads(proc.stdout)["hazards"]
                 if h["kind"] == "thread"]
        assert names == ["serve-forever"], "the JSON was flushed whole before the exit"


def test_check_without_a_thread_exits_normally(project: pathlib.Path) -> None:
    """Safe twin: with no thread left, check ends the normal way (the modules' atexit
    handlers run)."""
    (project / "tidy_app.py").write_text(
        "import atexit\natexit.register(lambda: print('atexit ran', flush=True))\n")
    proc = forksafe("check", "--import", "tidy_app", cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip().endswith("atexit ran")
