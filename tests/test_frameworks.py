"""The real frameworks, installed from the package registry, run on loopback.

Clean programs of each are quiet (nothing above info) under the guard; the
hazardous twin of each is still caught, with its evidence:

* gunicorn ``--preload --max-requests`` re-forking its workers (its control
  server's thread is stopped before every fork by gunicorn's own hook); twin: an
  app that starts a lock-holding thread at import;
* a pytest-xdist suite that forks, ``-n 2 -W error``, under ``forksafe run``;
* Django's ``manage.py test --parallel 2`` (an in-memory SQLite test database the
  forked workers reuse by design) under ``FORKSAFE_POLICY=raise``; twin: a test
  database on disk, whose inherited connection is still refused;
* OpenTelemetry's batch span processor, whose thread is restarted in every child.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from typing import Any

import pytest

BIN = pathlib.Path(sys.executable).parent


def forksafe_run(tmp_path: pathlib.Path, *command: str, timeout: float = 120,
                 env: dict[str, str] | None = None, policy: str = "warn"
                 ) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "forksafe", "run", "--policy", policy, "--report", str(report),
         "--", *command],
        cwd=tmp_path, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})})
    return proc, json.loads(report.read_text()) if report.exists() else {}


def above_info(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [h for fork in report.get("forks", []) for h in fork["hazards"]
            if h["severity"] != "info"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- gunicorn ------------------------------------------------------------------------------

CLEAN_APP = """
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]
"""

HAZARDOUS_APP = CLEAN_APP + """
import threading, time
cache_lock = threading.Lock()
def refresh():
    while True:
        with cache_lock:
            time.sleep(0.5)  # a slow upstream call, made while holding the lock
threading.Thread(target=refresh, name="cache-refresher", daemon=True).start()
time.sleep(0.1)
"""


def gunicorn(tmp_path: pathlib.Path, app: str) -> tuple[str, dict[str, Any]]:
    """Serve ``app`` with --preload --max-requests 3 under forksafe run; drive enough
    requests through it that workers are replaced; stop it. Its stderr and report."""
    pytest.importorskip("gunicorn", reason="gunicorn is in the test extras")
    (tmp_path / "app.py").write_text(textwrap.dedent(app))
    port = free_port()
    report = tmp_path / "report.json"
    pidfile = tmp_path / "gunicorn.pid"
    proc = subprocess.Popen(
        [sys.executable, "-m", "forksafe", "run", "--policy", "warn", "--report", str(report),
         "--", str(BIN / "gunicorn"), "--preload", "--max-requests", "3", "-w", "2",
         "-b", f"127.0.0.1:{port}", "--pid", str(pidfile), "app:app"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        served = 0
        while time.monotonic() < deadline and served < 16:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    served += r.read() == b"ok"
            except OSError:
                time.sleep(0.1)
        assert served == 16, "gunicorn served the requests"
        time.sleep(0.5)  # the last replacement workers boot
        os.kill(int(pidfile.read_text()), signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return err, json.loads(report.read_text())


def test_gunicorn_preload_re_forks_are_quiet(tmp_path: pathlib.Path) -> None:
    err, report = gunicorn(tmp_path, CLEAN_APP)
    forks = report["forks"]
    assert sum(f.get("count", 1) for f in forks) >= 4, "workers were replaced (--max-requests)"
    assert above_info(report) == []
    assert {f["action"] for f in forks} == {"allowed"}
    assert "ForkSafetyWarning" not in err
    handled = [h for f in forks for h in f["hazards"] if h["kind"] == "thread"]
    if handled:  # gunicorn >= 25.2 runs a control-socket thread; older ones do not
        assert all("handles fork itself" in h["summary"] for h in handled)


def test_gunicorn_app_with_a_lock_holding_thread_is_caught(tmp_path: pathlib.Path) -> None:
    err, report = gunicorn(tmp_path, HAZARDOUS_APP)
    assert "ForkSafetyWarning" in err and "cache-refresher" in err
    warned = [f for f in report["forks"] if f["action"] == "warned"]
    assert warned, report
    refresher = [h for h in warned[0]["hazards"] if h["evidence"].get("name") == "cache-refresher"]
    assert refresher and refresher[0]["severity"] == "warning"
    assert "post_fork" in refresher[0]["remedy"], "a fix a gunicorn user can apply"
    assert "get_context" not in refresher[0]["remedy"]


# -- pytest-xdist -------------------------------------------------------------------------------


def test_a_clean_xdist_suite_that_forks_passes_with_warnings_as_errors(
        tmp_path: pathlib.Path) -> None:
    """execnet's reader thread (a _thread thread) is known, not an unknown native one."""
    pytest.importorskip("xdist", reason="pytest-xdist is in the test extras")
    (tmp_path / "test_forks.py").write_text(textwrap.dedent("""
        import os
        def test_forks():
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            assert os.waitpid(pid, 0)[1] == 0
        def test_plain():
            assert True
    """))
    proc, report = forksafe_run(tmp_path, sys.executable, "-m", "pytest", "-q", "-n", "2",
                                "-W", "error", "-p", "no:cacheprovider", "test_forks.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 passed" in proc.stdout
    assert report["forks"] and above_info(report) == []


# -- Django ---------------------------------------------------------------------------------------

DJANGO = {
    "manage.py": """
        import os, sys
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")
        from django.core.management import execute_from_command_line
        execute_from_command_line(sys.argv)
    """,
    "proj/__init__.py": "",
    "proj/settings.py": """
        import os
        SECRET_KEY = "test"
        INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth", "shop"]
        DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": "db.sqlite3"}}
        if os.environ.get("ON_DISK"):
            DATABASES["default"]["TEST"] = {"NAME": "test_db.sqlite3"}
        USE_TZ = True
        DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
    """,
    "shop/__init__.py": "",
    "shop/models.py": """
        from django.db import models
        class Item(models.Model):
            name = models.CharField(max_length=20)
    """,
    "shop/tests.py": """
        from django.test import TestCase
        from shop.models import Item
        class ATests(TestCase):
            def test_a(self):
                Item.objects.create(name="a")
                self.assertEqual(Item.objects.count(), 1)
        class BTests(TestCase):
            def test_b(self):
                Item.objects.create(name="b")
                self.assertEqual(Item.objects.filter(name="b").count(), 1)
    """,
}


def django_test(tmp_path: pathlib.Path, files: dict[str, str] | None = None,
                **env: str) -> subprocess.CompletedProcess[str]:
    pytest.importorskip("django", reason="Django is in the test extras")
    for name, text in (DJANGO if files is None else files).items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    command = [env.pop("DJANGO_COMMAND")] if "DJANGO_COMMAND" in env else \
        ["manage.py", "test", "--parallel", "2"]
    return subprocess.run([sys.executable, *command],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "FORKSAFE_POLICY": "raise", **env})


def test_django_parallel_tests_pass_under_policy_raise(tmp_path: pathlib.Path) -> None:
    """The forked workers reuse the in-memory test database, as Django designs it."""
    proc = django_test(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Ran 2 tests" in proc.stderr and "OK" in proc.stderr
    assert "ForkSafetyError" not in proc.stderr


def test_django_parallel_tests_on_disk_pass_too(tmp_path: pathlib.Path) -> None:
    """With a test database on disk Django closes the inherited connection in each worker
    (protection detaches it) and opens the worker's own clone: nothing is refused."""
    proc = django_test(tmp_path, ON_DISK="1")
    assert proc.returncode == 0, proc.stderr
    assert "Ran 2 tests" in proc.stderr and "ForkSafetyError" not in proc.stderr


#: A module that keeps prices fresh on a thread started when Django loads the app: it
#: holds its lock most of the time, so a worker forked meanwhile never gets it.
PRICES = """
    import threading, time
    lock = threading.Lock()
    def refresh():
        while True:
            with lock:
                time.sleep(30)
    threading.Thread(target=refresh, name="price-refresher", daemon=True).start()
    time.sleep(0.05)
"""
HANGING_TESTS = """
    import time
    from django.test import SimpleTestCase
    from shop import prices
    class PriceTests(SimpleTestCase):
        def test_price(self):
            with prices.lock:  # hang-line
                pass
    class FastTests(SimpleTestCase):
        def test_a(self):
            time.sleep(0.3)
        def test_b(self):
            time.sleep(0.3)
    class MoreTests(SimpleTestCase):
        def test_c(self):
            time.sleep(0.3)
"""


@pytest.mark.parametrize("how", ["hang-timeout", "forksafe-run"])
def test_django_parallel_test_that_hangs_in_a_worker_fails_with_the_diagnosis(
        tmp_path: pathlib.Path, how: str) -> None:
    """The hung worker is diagnosed and ended; its test fails with the diagnosis; the other
    tests run in the replacement worker; the run ends instead of waiting forever."""
    files = {**DJANGO, "shop/prices.py": PRICES, "shop/tests.py": HANGING_TESTS,
             "shop/models.py": "from shop import prices  # noqa: F401\n"}
    if how == "forksafe-run":
        files["run.py"] = """
            import subprocess, sys
            sys.exit(subprocess.call([sys.executable, "-m", "forksafe", "run", "--policy",
                                      "log", "--hang-timeout", "1", "--", sys.executable,
                                      "manage.py", "test", "--parallel", "2"]))
        """
    proc = django_test(tmp_path, files, FORKSAFE_POLICY="log",
                       **({"FORKSAFE_HANG_TIMEOUT": "1"} if how == "hang-timeout" else {}),
                       **({"DJANGO_COMMAND": "run.py"} if how == "forksafe-run" else {}))
    assert proc.returncode == 1, proc.stderr
    assert "Ran 4 tests" in proc.stderr and "FAILED (errors=1)" in proc.stderr, proc.stderr
    assert "ERROR: test_price (shop.tests.PriceTests" in proc.stderr
    assert "forksafe.ForkSafetyError: this test hung in worker " in proc.stderr
    hang = line_of(HANGING_TESTS, "# hang-line")
    start = line_of(PRICES, ".start()")
    assert f"it is blocked taking `lock` at shop/tests.py:{hang} (test_price); at fork time " \
        f"thread 'price-refresher' (started at shop/prices.py:{start}) held `lock`" in proc.stderr


def line_of(text: str, part: str) -> int:
    """The 1-based line of a dedented file text that holds ``part``."""
    lines = textwrap.dedent(text).splitlines()
    return next(n for n, line in enumerate(lines, 1) if part in line)


# -- OpenTelemetry ------------------------------------------------------------------------------


def test_opentelemetry_batch_thread_restarted_in_the_child_is_info(
        tmp_path: pathlib.Path) -> None:
    pytest.importorskip("opentelemetry.sdk.trace", reason="opentelemetry-sdk is in the extras")
    (tmp_path / "traced.py").write_text(textwrap.dedent("""
        import os
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(
            out=open(os.devnull, "w"))))
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
    """))
    proc, report = forksafe_run(tmp_path, sys.executable, "traced.py")
    assert proc.returncode == 0, proc.stderr
    [fork] = report["forks"]
    [thread] = [h for h in fork["hazards"] if h["kind"] == "thread"]
    assert thread["severity"] == "info" and "runs in every child" in thread["summary"]
    assert fork["action"] == "allowed"
