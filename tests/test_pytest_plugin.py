"""The pytest plugin, run for real: suites written with ``pytester``, each run by a pytest
of its own in a new session, with a hard timeout and its whole process group ended after.

The acceptance case of the issue: ``test_a.py::test_starts_refresher`` leaves a thread
holding a lock behind, ``test_b.py::test_forks_worker`` forks a child that takes that
lock. With ``--forksafe=warn --forksafe-hang-timeout=2`` the session ends in seconds,
``test_forks_worker`` failed with a failure naming the thread and the polluting test;
without the plugin the same suite hangs. Safe twins: clean suites that fork (with
pytest-xdist too, ``-W error``) are quiet and their results unchanged.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import ROOT

pytest_plugins = ["pytester"]

#: The suite of the issue's acceptance: a leftover thread that always holds the lock.
POLLUTER = """
    import threading, time

    lock = threading.Lock()

    def refresh():
        while True:
            with lock:
                time.sleep(3600)  # a slow upstream call, made while holding the lock

    def test_starts_refresher():
        threading.Thread(target=refresh, name="refresher", daemon=True).start()
        time.sleep(0.1)

    def test_other():
        assert True
"""
FORKER = """
    import os
    from test_a import lock

    def test_forks_worker():
        pid = os.fork()
        if pid == 0:
            with lock:
                pass
            os._exit(0)
        os.waitpid(pid, 0)

    def test_after():
        assert True
"""
#: A clean suite that forks every way the guard sees, and joins its threads.
CLEAN = """
    import multiprocessing, os, subprocess, sys, threading

    def test_bare_fork():
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0

    def test_pool():
        with multiprocessing.get_context("fork").Pool(2) as pool:
            assert pool.map(abs, [-1, -2, 3]) == [1, 2, 3]

    def test_joined_thread_then_fork():
        t = threading.Thread(target=sum, args=([1, 2],))
        t.start()
        t.join()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0

    def test_subprocess():
        subprocess.run([sys.executable, "-c", "pass"], check=True)

    def test_plain():
        assert True
"""


class Run:
    """A finished (or timed-out) pytest run."""

    def __init__(self, returncode: int | None, stdout: str, stderr: str, seconds: float,
                 timed_out: bool) -> None:
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.seconds = seconds
        self.timed_out = timed_out

    def outcomes(self) -> dict[str, int]:
        return pytest.RunResult(self.returncode or 0, self.stdout.splitlines(),
                                self.stderr.splitlines(), self.seconds).parseoutcomes()

    def section(self) -> str:
        """The forksafe section of the terminal summary."""
        start = self.stdout.find("- forksafe -")
        assert start != -1, self.stdout
        end = self.stdout.find("\n===", start)
        return self.stdout[start:end if end != -1 else None]


#: CPython 3.12+ warns at every fork of a multi-threaded process; forksafe drops that
#: warning only for the forks it warned about itself (docs/guard.md), so these suites,
#: whose polluters are threads, would count it under policy log.
CPYTHON_FORK_WARNING = "ignore:This process:DeprecationWarning"


def run(pytester: pytest.Pytester, *args: str, timeout: float = 60,
        env: dict[str, str] | None = None) -> Run:
    """pytest in ``pytester``'s directory, in a session of its own; everything left in its
    process group (a hung grandchild, a hang helper) is ended afterwards."""
    full = {k: v for k, v in os.environ.items()
            if not k.startswith(("FORKSAFE_", "PYTEST_ADDOPTS", "PYTEST_XDIST"))}
    full.update(env or {})
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-W",
                             CPYTHON_FORK_WARNING, *args],
                            cwd=pytester.path, env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    timed_out = False
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _end_group(proc.pid)
        out, err = proc.communicate()
    finally:
        _end_group(proc.pid)
        if proc.poll() is None:
            proc.wait()
    return Run(proc.returncode, out, err, time.monotonic() - start, timed_out)


def _end_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _group_gone(pgid: int) -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def write(pytester: pytest.Pytester, **files: str) -> None:
    for name, text in files.items():
        path = pytester.path / (name if "." in name else name + ".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


# -- the acceptance ---------------------------------------------------------------------------


def test_a_hung_child_fails_its_test_and_names_the_polluting_test(
        pytester: pytest.Pytester) -> None:
    write(pytester, **{"test_a.py": POLLUTER, "test_b.py": FORKER})
    result = run(pytester, "--forksafe=warn", "--forksafe-hang-timeout=2",
                 "--forksafe-report=report.json", "-rf")
    assert not result.timed_out
    assert result.seconds < 30, result.seconds
    assert result.outcomes() == {"failed": 1, "passed": 3, "warnings": 2}, result.stdout
    assert result.returncode == 1
    failure = result.stdout[result.stdout.index("_ test_forks_worker _"):]
    head = failure.splitlines()[1]
    # The first line (pytest's short summary shows its start) names thread and polluter.
    assert head.startswith("forksafe: child ")
    assert head.endswith(" hung: thread 'refresher' held `lock` at its fork, started during "
                         "test_a.py::test_starts_refresher; ended after 2 s (forked at "
                         "test_b.py:6)")
    assert "blocked taking `lock` at test_b.py:8" in failure  # the diagnosis
    assert "started during: test_a.py::test_starts_refresher" in failure
    assert "File \"" in failure and "frames of pytest" in failure  # the child's stacks
    assert "FAILED test_b.py::test_forks_worker" in result.stdout
    section = result.section()
    assert "1 hazardous fork in 1 test; 1 child hung" in section
    assert "os.fork at test_b.py:6 in test_forks_worker: warned" in section
    report = json.loads((pytester.path / "report.json").read_text())
    validate(report)
    (fork,) = report["forks"]
    assert fork["test"] == "test_b.py::test_forks_worker" and fork["phase"] == "call"
    assert fork["outcome"]["status"] == "hung"
    (thread,) = [h for h in fork["hazards"] if h["kind"] == "thread"]
    assert thread["evidence"]["during"] == "test_a.py::test_starts_refresher"


def validate(report: dict[str, object]) -> None:
    """``report`` is a run report of docs/report-format.md, and ``forksafe explain`` reads it."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((ROOT / "docs" / "report-format.schema.json").read_text())
    jsonschema.validate(report, schema)
    out = subprocess.run([sys.executable, "-m", "forksafe", "explain", "-"], input=json.dumps(
        report), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "seen in `pytest" in out.stdout, out.stderr


def test_without_the_plugin_the_same_suite_hangs(pytester: pytest.Pytester) -> None:
    """That is the point of the plugin; the hung run is ended with its whole group."""
    write(pytester, **{"test_a.py": POLLUTER, "test_b.py": FORKER})
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider"],
                            cwd=pytester.path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                            env={k: v for k, v in os.environ.items()
                                 if not k.startswith("FORKSAFE_")})
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=6)
    finally:
        _end_group(proc.pid)
        proc.wait()
    assert time.monotonic() - started >= 6
    assert _group_gone(proc.pid)


# -- precision: clean suites stay quiet, and unchanged ----------------------------------------


@pytest.mark.parametrize("extra", [[], ["-n", "2"]], ids=["serial", "xdist"])
def test_a_clean_suite_that_forks_is_quiet_and_unchanged(pytester: pytest.Pytester,
                                                         extra: list[str]) -> None:
    if extra:
        pytest.importorskip("xdist", reason="pytest-xdist is in the test extras")
    write(pytester, test_clean=CLEAN)
    plain = run(pytester, "-W", "error", *extra)
    guarded = run(pytester, "-W", "error", "--forksafe", *extra)
    assert plain.outcomes() == guarded.outcomes() == {"passed": 5}, guarded.stdout
    assert "warnings summary" not in guarded.stdout
    assert "none hazardous" in guarded.section()
    assert "forksafe" not in "".join(line for line in plain.stdout.splitlines(True)
                                     if not line.startswith("plugins:"))


def test_under_the_environment_hook_the_guard_it_installed_comes_back(
        pytester: pytest.Pytester) -> None:
    """``forksafe run -- pytest`` (the hook imports forksafe before pytest starts): no
    warning that pytest cannot rewrite it (``-W error``), and the hook's guard is back,
    as it was, once the session is over."""
    write(pytester, test_clean=CLEAN, conftest="""
        import pytest

        @pytest.hookimpl(trylast=True)
        def pytest_unconfigure(config):
            from forksafe import _guard
            with open("after.txt", "w") as f:
                f.write(repr(_guard.installed()))
    """)
    result = run(pytester, "-W", "error", "--forksafe=raise", "--forksafe-hang-timeout=9",
                 env={"FORKSAFE_POLICY": "log"})
    assert result.outcomes() == {"passed": 5}, result.stdout + result.stderr
    assert "policy raise, hang timeout 9 s): 4 forks in 3 tests, none hazardous" in \
        result.section()
    assert (pytester.path / "after.txt").read_text() == \
        "Config(policy='log', fail_on=30, hang_timeout=None, report=None)"


def test_a_hazard_is_reported_once_per_fork_site(pytester: pytest.Pytester) -> None:
    """Twelve tests forking through one helper with the same leftover thread: one finding."""
    write(pytester, **{"test_a.py": POLLUTER, "helper.py": """
        import os
        def fork_and_wait():
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
    """, "test_b.py": """
        import pytest
        from helper import fork_and_wait

        @pytest.mark.parametrize("n", range(12))
        def test_forks(n):
            fork_and_wait()
    """})
    result = run(pytester, "--forksafe=log", "-p", "no:randomly")
    assert result.outcomes() == {"passed": 14}
    section = result.section()
    assert "12 hazardous forks in 12 tests" in section
    assert section.count("os.fork at helper.py:4 in fork_and_wait: logged x12") == 1
    assert section.count("WARNING thread:") == 1
    assert "in test_b.py::test_forks[0], test_b.py::test_forks[1], test_b.py::test_forks[2] " \
        "and 9 more tests" in section


# -- attribution -------------------------------------------------------------------------------

ORIGINS = {
    "conftest.py": """
        import threading, time
        import pytest

        threading.Thread(target=time.sleep, args=(3600,), name="from-conftest",
                         daemon=True).start()

        @pytest.fixture(scope="session")
        def server():
            threading.Thread(target=time.sleep, args=(3600,), name="server",
                             daemon=True).start()
    """,
    "test_m.py": """
        import os, sqlite3, threading, time
        threading.Thread(target=time.sleep, args=(3600,), name="at-import", daemon=True).start()
        kept = []

        def test_db(tmp_path):
            kept.append(sqlite3.connect(str(tmp_path / "x.db")))

        def test_uses(server):
            pass

        def test_forks():
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
    """,
}


def test_each_hazard_names_the_test_fixture_or_import_it_comes_from(
        pytester: pytest.Pytester) -> None:
    write(pytester, **ORIGINS)
    result = run(pytester, "--forksafe=log", "--forksafe-report=report.json")
    assert result.outcomes() == {"passed": 3}, result.stdout
    report = json.loads((pytester.path / "report.json").read_text())
    (fork,) = report["forks"]
    during = {h["evidence"].get("name", h["kind"]): h["evidence"].get("during")
              for h in fork["hazards"]}
    assert during == {
        "from-conftest": "start-up (initial conftest.py import)",
        "at-import": "import of test_m.py",
        "server": "session-scoped fixture 'server' (set up for test_m.py::test_uses)",
        "sqlite-connection": "test_m.py::test_db",
    }
    (sqlite,) = [h for h in fork["hazards"] if h["kind"] == "sqlite-connection"]
    assert sqlite["evidence"]["opened_at"][0]["function"] == "test_db"  # not forksafe's frame
    assert "(opened at test_m.py:7 during test_m.py::test_db)" in sqlite["summary"]
    assert "opened during: test_m.py::test_db" in result.section()


def test_a_runtime_is_named_by_the_test_it_became_active_in(
        pytester: pytest.Pytester, native_dir: pathlib.Path) -> None:
    write(pytester, test_omp=f"""
        import ctypes, os

        def test_starts_openmp():
            ctypes.CDLL({str(native_dir / "libomp_pool.so")!r}).omp_pool_run(100000)

        def test_forks():
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
    """)
    result = run(pytester, "--forksafe=log", "--forksafe-report=report.json",
                 env={"OMP_NUM_THREADS": "2"})
    assert result.outcomes() == {"passed": 2}, result.stdout
    (fork,) = json.loads((pytester.path / "report.json").read_text())["forks"]
    (omp,) = [h for h in fork["hazards"] if h["kind"] == "native-runtime"]
    assert omp["severity"] == "error"
    assert omp["evidence"]["during"] == "test_omp.py::test_starts_openmp"
    assert "became active during: test_omp.py::test_starts_openmp" in result.section()


# -- pytest-xdist --------------------------------------------------------------------------------


def test_xdist_workers_fail_the_hung_test_and_the_controller_sums_up(
        pytester: pytest.Pytester) -> None:
    pytest.importorskip("xdist", reason="pytest-xdist is in the test extras")
    # One module: --dist loadfile runs the polluter and the forker in the same worker.
    forker = FORKER.replace("from test_a import lock", "")
    write(pytester, test_ab=textwrap.dedent(POLLUTER) + textwrap.dedent(forker), test_c=CLEAN)
    result = run(pytester, "-n", "2", "--dist", "loadfile", "--forksafe=warn",
                 "--forksafe-hang-timeout=2", "-W", "ignore::forksafe.ForkSafetyWarning",
                 "--forksafe-report=report.json")
    assert not result.timed_out
    assert result.outcomes() == {"failed": 1, "passed": 8}, result.stdout
    failure = result.stdout[result.stdout.index("_ test_forks_worker _"):]
    assert "thread 'refresher' held `lock` at its fork, started during " \
        "test_ab.py::test_starts_refresher" in failure
    section = result.section()
    assert "1 hazardous fork in 1 test; 1 child hung" in section
    report = json.loads((pytester.path / "report.json").read_text())
    validate(report)
    hung = [f for f in report["forks"] if f.get("outcome", {}).get("status") == "hung"]
    assert [f["test"] for f in hung] == ["test_ab.py::test_forks_worker"]
    assert {f["test"] for f in report["forks"]} >= {"test_c.py::test_bare_fork",
                                                    "test_c.py::test_pool"}


# -- options, ini, accept rules ----------------------------------------------------------------


@pytest.mark.parametrize(("args", "ini", "message"), [
    (["--forksafe=loud"], "",
     "forksafe: --forksafe='loud': expected one of: log, warn, raise, off"),
    (["--forksafe-hang-timeout=-1"], "",
     "forksafe: --forksafe-hang-timeout='-1' is not a finite positive number of seconds"),
    ([], "forksafe = loud",
     "forksafe: forksafe (ini)='loud': expected one of: log, warn, raise, off"),
    (["--forksafe"], "forksafe_accept = thread/colour=x: why",
     "forksafe: forksafe_accept (ini): cannot read the accept rule 'thread/colour=x: why'"),
    (["--forksafe-report="], "", "forksafe: --forksafe-report='' is not a file name"),
    (["--forksafe", "test_x.py"], "", "forksafe: --forksafe='test_x.py': expected one of: "
     "log, warn, raise, off (a bare --forksafe takes the next word as its policy: write "
     "--forksafe=warn)"),
], ids=["policy", "timeout", "ini", "accept", "report", "path"])
def test_a_bad_setting_is_one_usage_error_line(pytester: pytest.Pytester, args: list[str],
                                               ini: str, message: str) -> None:
    write(pytester, test_x="def test_x():\n    pass\n")
    if ini:
        pytester.makeini(f"[pytest]\n{ini}\n")
    result = run(pytester, *args)
    assert result.returncode == 4, result.stdout + result.stderr
    assert f"ERROR: {message}" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_ini_settings_and_accept_rules_from_pyproject(pytester: pytest.Pytester) -> None:
    """``forksafe = warn`` in the ini and an accepted thread: the fork is info, so quiet
    even with ``-W error``; ``--forksafe=off`` turns the ini's plugin off."""
    write(pytester, **{"test_a.py": POLLUTER, "test_c.py": """
        import os
        def test_forks():
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
    """, "pyproject.toml": """
        [tool.pytest.ini_options]
        forksafe = "warn"
        forksafe_hang_timeout = "5"

        [tool.forksafe]
        accept = ["thread/name=refresher: it never touches what the child uses"]
    """})
    result = run(pytester, "-W", "error::forksafe.ForkSafetyWarning", "-p", "no:randomly")
    assert result.outcomes() == {"passed": 3}, result.stdout
    assert "policy warn, hang timeout 5 s): 1 fork in 1 test, none hazardous" in \
        result.section()
    off = run(pytester, "--forksafe=off", "-p", "no:randomly")
    assert off.outcomes() == {"passed": 3}
    assert "- forksafe -" not in off.stdout


def test_the_plugin_is_inactive_unless_asked(pytester: pytest.Pytester) -> None:
    write(pytester, test_x="""
        import threading
        def test_nothing_is_patched():
            from forksafe import _guard, _ledger
            assert _guard.installed() is None
            assert not _ledger.observing()
            assert not hasattr(threading.Thread.start, "__wrapped__")
    """)
    result = run(pytester)
    assert result.outcomes() == {"passed": 1}, result.stdout
    assert "- forksafe -" not in result.stdout
    assert "--forksafe=POLICY" in run(pytester, "--help").stdout


def test_importing_the_plugin_loads_nothing_of_forksafe_but_its_seams() -> None:
    code = ("import sys; import forksafe.pytest_plugin; "
            "print(sorted(m for m in sys.modules if m.startswith('forksafe')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.strip() == str(["forksafe", "forksafe._errors", "forksafe._pytest_session",
                               "forksafe.pytest_plugin"])


# -- the marker and the fixture -----------------------------------------------------------------


def test_the_marker_guards_one_test_of_an_unguarded_session(pytester: pytest.Pytester) -> None:
    write(pytester, **{"test_a.py": POLLUTER, "test_b.py": """
        import os, pytest
        import forksafe

        def fork_and_wait():
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)

        def test_unmarked_fork_is_not_guarded():
            fork_and_wait()

        @pytest.mark.forksafe(policy="raise", fail_on="warning")
        def test_refused():
            with pytest.raises(forksafe.ForkSafetyError) as info:
                fork_and_wait()
            assert "during test_a.py::test_starts_refresher" in str(info.value)

        @pytest.mark.forksafe("loud")
        def test_bad_marker():
            pass
    """})
    result = run(pytester, "-p", "no:randomly", "-W", "error::forksafe.ForkSafetyWarning")
    assert result.outcomes() == {"passed": 4, "errors": 1}, result.stdout
    assert "forksafe marker: policy='loud': expected one of: log, warn, raise" in result.stdout
    assert "tests marked forksafe only" in result.section()


def test_the_fixture_asserts_that_a_block_forks_safely(pytester: pytest.Pytester) -> None:
    write(pytester, **{"test_a.py": POLLUTER, "test_b.py": """
        import os

        def fork_and_wait():
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)

        def test_clean_block(forksafety):
            with forksafety.assert_safe(fail_on="error"):  # a thread is only a warning
                fork_and_wait()
            assert [e.mechanism for e in forksafety.forks] == ["os.fork"]
            assert not forksafety.check().is_safe

        def test_unsafe_block(forksafety):
            with forksafety.assert_safe():
                fork_and_wait()
    """})
    result = run(pytester, "-p", "no:randomly")
    assert result.outcomes() == {"passed": 3, "failed": 1}, result.stdout
    failure = result.stdout[result.stdout.index("_ test_unsafe_block _"):]
    assert "1 fork in this block was not safe" in failure
    assert "thread 'refresher' holds `lock`" in failure  # unobserved: its origin is unknown
    # With the plugin on for the session, it names where and during which test.
    result = run(pytester, "-p", "no:randomly", "--forksafe=log")
    assert result.outcomes() == {"passed": 3, "failed": 1}, result.stdout
    assert "thread 'refresher' (started at test_a.py:12 during " \
        "test_a.py::test_starts_refresher)" in result.stdout


# -- never harm the host -----------------------------------------------------------------------


def test_a_failing_part_of_forksafe_is_said_once_and_the_session_goes_on(
        pytester: pytest.Pytester) -> None:
    write(pytester, **{"conftest.py": """
        from forksafe import _suite

        def broken(self, test, phase):
            raise RuntimeError("boom")

        _suite.ForkLog.take = broken
    """, "test_x.py": """
        import os
        def fork_and_wait():
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
        def test_one():
            fork_and_wait()
        def test_two():
            fork_and_wait()
    """})
    result = run(pytester, "--forksafe", "-W", "error")
    assert result.outcomes() == {"passed": 2}, result.stdout
    said = "forksafe: following the forks of tests failed (RuntimeError: boom)"
    assert (result.stdout + result.stderr).count(said) == 1

