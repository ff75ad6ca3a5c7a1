"""The recipes of docs/integrations.md, run with the real servers on loopback.

Each server gets a hazardous app - a thread that holds ``cache_lock`` whenever the
server forks, and a request or task that takes it - and its safe twin. The hazardous
one must be diagnosed through the integration, in the server's own log: the check
before the first fork, a record per hazardous fork, the hang with its diagnosis. The
clean one must leave no forksafe line at all there. Every server runs in a session of
its own, with a hard timeout, and its whole process group is killed at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from typing import Any, Iterator

import pytest

from conftest import run_scenario

BIN = pathlib.Path(sys.executable).parent
#: No FORKSAFE_* from the environment the tests run in: the recipes alone must do it.
ENV = {k: v for k, v in os.environ.items() if not k.startswith("FORKSAFE_")}

CLEAN = """
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]
"""
#: Forks of the server meet ``cache-refresher`` inside ``with cache_lock:``; a request
#: takes the lock, which in a forked worker nobody will ever release.
HAZARDOUS = """
import threading, time
cache_lock = threading.Lock()
def refresh():
    while True:
        with cache_lock:
            time.sleep(60)  # a slow upstream call, made while holding the lock
threading.Thread(target=refresh, name="cache-refresher", daemon=True).start()
time.sleep(0.1)

def app(environ, start_response):
    with cache_lock:  # hang-line
        pass
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def line_of(text: str, part: str) -> int:
    lines = textwrap.dedent(text).splitlines()
    return next(n for n, line in enumerate(lines, 1) if part in line)


class Running:
    """A server started by ``server``: its process, and all it printed once it ended."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.output = ""

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)


@contextlib.contextmanager
def server(command: list[str], cwd: pathlib.Path, *, timeout: float = 90) -> Iterator[Running]:
    """Run ``command`` in a session of its own; on the way out, whatever happened, end
    its whole process group (SIGTERM, then SIGKILL) and keep what it printed."""
    proc = subprocess.Popen(command, cwd=cwd, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    running = Running(proc)
    deadline = time.monotonic() + timeout
    try:
        yield running
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            running.output = proc.communicate(
                timeout=max(1.0, min(15.0, deadline - time.monotonic())))[0]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        if not running.output:
            running.output = proc.communicate()[0] or ""


def get(port: int, timeout: float = 10) -> bytes | str:
    """The body of ``/``, or the error that ended the request."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=timeout) as r:
            body: bytes = r.read()
            return body
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


def wait_until_serving(port: int, proc: Running, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the server ended early"
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.1)
    raise AssertionError("the server never listened")


def wait_for(path: pathlib.Path, pattern: str, seconds: float = 30) -> str:
    """``path``'s text once ``pattern`` is in it (or whatever it holds after ``seconds``)."""
    deadline = time.monotonic() + seconds
    text = ""
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if re.search(pattern, text):
            return text
        time.sleep(0.2)
    return text


# -- gunicorn ---------------------------------------------------------------------------------

GUNICORN_CONF = """
from forksafe.integrations import gunicorn as forksafe_gunicorn

forksafe_gunicorn.configure(policy={policy!r}{extra})
when_ready = forksafe_gunicorn.when_ready
pre_fork = forksafe_gunicorn.pre_fork
"""


def gunicorn(tmp_path: pathlib.Path, app: str, *args: str, policy: str = "log",
             extra: str = "") -> list[str]:
    pytest.importorskip("gunicorn", reason="gunicorn is in the test extras")
    (tmp_path / "app.py").write_text(textwrap.dedent(app))
    (tmp_path / "gunicorn.conf.py").write_text(GUNICORN_CONF.format(policy=policy, extra=extra))
    return [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "--preload", "-w", "2",
            "--error-logfile", "error.log", *args, "app:app"]


@pytest.mark.parametrize("policy", ["log", "raise"])
def test_gunicorn_recipe_is_silent_for_a_clean_app(tmp_path: pathlib.Path, policy: str) -> None:
    """The safe twin: a clean preloaded app, workers re-forked (--max-requests), under
    the recipe's default policy and under "raise" refusing warnings: it serves, and the
    error log has no line of forksafe's."""
    port = free_port()
    extra = ', fail_on="warning"' if policy == "raise" else ""
    command = gunicorn(tmp_path, CLEAN, "-b", f"127.0.0.1:{port}", "--max-requests", "3",
                       policy=policy, extra=extra)
    with server(command, tmp_path) as proc:
        wait_until_serving(port, proc)
        bodies = [get(port) for _ in range(12)]
        time.sleep(0.5)  # the last replacement workers boot
    log = (tmp_path / "error.log").read_text()
    assert bodies == [b"ok"] * 12, log
    assert log.count("Booting worker") >= 4, "workers were re-forked"
    assert "forksafe" not in log
    assert "ForkSafetyWarning" not in proc.output


def test_gunicorn_recipe_diagnoses_a_hazardous_app_in_the_error_log(
        tmp_path: pathlib.Path) -> None:
    """The check before the first fork, one record per worker fork, and the worker that
    hangs on the inherited lock: ended after half of --timeout, with its diagnosis, all
    in gunicorn's error log in gunicorn's format."""
    port = free_port()
    command = gunicorn(tmp_path, HAZARDOUS, "-b", f"127.0.0.1:{port}", "--timeout", "8")
    with server(command, tmp_path) as proc:
        wait_until_serving(port, proc)
        started = time.monotonic()
        answer = get(port, timeout=30)
        took = time.monotonic() - started
        log = wait_for(tmp_path / "error.log", r"Booting worker with pid: \d+\n(.|\n)*"
                       r"Booting worker with pid: \d+\n(.|\n)*Booting worker")
    assert isinstance(answer, str), "the request on the hung worker failed"
    assert took < 8, "forksafe ended the worker before gunicorn's --timeout would have"
    verdict = re.search(r"\[WARNING\] forksafe: the preloaded app \(gunicorn --preload\) is "
                        r"not safe to fork: 1 warning\.\n", log)
    assert verdict, log
    assert "thread 'cache-refresher' (started at app.py:" in log
    assert "a post_fork or post_worker_init hook in gunicorn.conf.py" in log, "a gunicorn fix"
    forks = re.findall(r"\[WARNING\] forksafe: os\.fork at gunicorn/arbiter\.py:\d+ forked "
                       r"child (\d+) \(parent pid \d+\) while that was unsafe: 1 warning; the "
                       r"same hazards as logged in full at ", log)
    assert len(forks) >= 3, "two workers, and the one that replaced the hung one"
    hang = line_of(HAZARDOUS, "# hang-line")
    hung = re.search(r"\[ERROR\] forksafe: child (\d+) \(forked at gunicorn/arbiter\.py:\d+ in "
                     r"spawn_worker via os\.fork\) made no progress for [\d.]+ s: it is blocked "
                     rf"taking `cache_lock` at app\.py:{hang} \(app\); at fork time thread "
                     r"'cache-refresher'", log)
    assert hung, log
    assert hung.group(1) in forks
    assert f"Worker (pid:{hung.group(1)}) was sent SIGKILL!" in log
    assert "ForkSafetyWarning" not in proc.output, "policy log: records only"


def test_gunicorn_recipe_under_raise_halts_instead_of_forking(tmp_path: pathlib.Path) -> None:
    """pre_fork refuses the first worker's fork for the guard: gunicorn halts cleanly,
    with the refusal as its reason, and no worker ever boots."""
    port = free_port()
    command = gunicorn(tmp_path, HAZARDOUS, "-b", f"127.0.0.1:{port}", policy="raise",
                       extra=', fail_on="warning"')
    with server(command, tmp_path) as proc:
        code = proc.wait(timeout=60)
    log = (tmp_path / "error.log").read_text()
    assert code == 1, log
    assert "[ERROR] Reason: forksafe refused to fork a worker: forksafe refused os.fork " \
        "at an unknown place: 1 hazard(s) at or above 'warning' would break the child" in log
    assert "cache-refresher" in log
    assert "Booting worker" not in log
    assert "Unhandled exception in main loop" not in log


# -- Celery (billiard's prefork pool), filesystem broker -----------------------------------------

CELERY_APP = """
import os
from celery import Celery
from forksafe.integrations import celery as forksafe_celery

HERE = os.path.dirname(os.path.abspath(__file__))
app = Celery("tasks", broker="filesystem://",
             backend="file://" + os.path.join(HERE, "results"))
app.conf.broker_transport_options = {{
    "data_folder_in": os.path.join(HERE, "queue"),
    "data_folder_out": os.path.join(HERE, "queue"),
    "processed_folder": os.path.join(HERE, "processed"),
}}
app.conf.task_time_limit = 8  # forksafe's hang timeout: half of it
app.conf.broker_connection_retry_on_startup = True
forksafe_celery.configure(policy="log")
{hazard}

@app.task
def add(x, y):
    {take}
    return x + y
"""
CELERY_HAZARD = """
import threading, time
cache_lock = threading.Lock()
def refresh():
    while True:
        with cache_lock:
            time.sleep(60)
threading.Thread(target=refresh, name="cache-refresher", daemon=True).start()
time.sleep(0.1)
"""
CELERY_CLIENT = """
import json, os, sys
from celery import Celery
HERE = os.path.dirname(os.path.abspath(__file__))
client = Celery("client", broker="filesystem://",
                backend="file://" + os.path.join(HERE, "results"))
client.conf.broker_transport_options = {
    "data_folder_in": os.path.join(HERE, "queue"),
    "data_folder_out": os.path.join(HERE, "queue"),
    "processed_folder": os.path.join(HERE, "processed"),
}
result = client.send_task("tasks.add", args=(2, 3))
try:
    print(json.dumps({"value": result.get(timeout=45)}))
except Exception as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
"""


def celery_worker(tmp_path: pathlib.Path, hazardous: bool, policy: str = "log"
                  ) -> list[str]:
    """The app (and a client for it) written out; the command of a real ``celery worker``
    on it, prefork pool of one process, logging to ``worker.log``."""
    pytest.importorskip("celery", reason="Celery is in the test extras")
    for folder in ("queue", "processed", "results"):
        (tmp_path / folder).mkdir()
    app = textwrap.dedent(CELERY_APP.format(
        hazard=CELERY_HAZARD if hazardous else "",
        take="with cache_lock:  # hang-line\n        pass" if hazardous else "pass"))
    if policy != "log":
        app = app.replace('configure(policy="log")',
                          f'configure(policy={policy!r}, fail_on="warning")')
    (tmp_path / "tasks.py").write_text(app)
    (tmp_path / "client.py").write_text(textwrap.dedent(CELERY_CLIENT))
    return [str(BIN / "celery"), "-A", "tasks", "worker", "-P", "prefork", "-c", "1",
            "--loglevel", "INFO", "--logfile", str(tmp_path / "worker.log"), "-n",
            "w1@localhost", "--without-heartbeat", "--without-mingle", "--without-gossip"]


def celery(tmp_path: pathlib.Path, hazardous: bool) -> tuple[dict[str, Any], str]:
    """Start a real ``celery worker`` on the app, send it one task from another process,
    stop it; the task's result or error, and the worker's log."""
    command = celery_worker(tmp_path, hazardous)
    log = tmp_path / "worker.log"
    with server(command, tmp_path) as proc:
        wait_for(log, r"ready\.", 60)
        assert proc.poll() is None, log.read_text() if log.exists() else ""
        client = subprocess.run([sys.executable, "client.py"], cwd=tmp_path, env=ENV,
                                capture_output=True, text=True, timeout=60)
        assert client.returncode == 0, client.stderr
    return json.loads(client.stdout.splitlines()[-1]), log.read_text()


def test_celery_recipe_is_silent_for_a_clean_app(tmp_path: pathlib.Path) -> None:
    result, log = celery(tmp_path, hazardous=False)
    assert result == {"value": 5}, log
    assert "forksafe" not in log


def test_celery_recipe_diagnoses_a_hazardous_app_in_the_worker_log(
        tmp_path: pathlib.Path) -> None:
    """The verdict before the pool forks, a record for the fork of the pool process, and
    the task's hang: the pool process is ended after half of the hard time limit with
    the diagnosis in the worker's log, and billiard fails the task at once."""
    result, log = celery(tmp_path, hazardous=True)
    assert "WorkerLostError" in result.get("error", ""), result
    assert re.search(r"WARNING/MainProcess\] forksafe: the worker's main process \(Celery's "
                     r"prefork pool forks its processes from it\) is not safe to fork: "
                     r"1 warning\.", log), log
    assert "Celery's worker_process_init signal" in log, "a fix a Celery user can apply"
    assert re.search(r"WARNING/MainProcess\] forksafe: os\.fork at billiard/popen_fork\.py:\d+ "
                     r"forked child \d+ \(parent pid \d+\) while that was unsafe", log), log
    hang = line_of(CELERY_APP.format(hazard=CELERY_HAZARD, take="with cache_lock:  # hang-line"),
                   "# hang-line")
    assert re.search(r"ERROR/MainProcess\] forksafe: child \d+ \(forked at "
                     r"billiard/popen_fork\.py:\d+ in _launch via os\.fork\) made no progress "
                     r"for [\d.]+ s: it is blocked taking `cache_lock` at "
                     rf"tasks\.py:{hang} \(add\); at fork time thread 'cache-refresher'", log), log


def test_celery_recipe_under_raise_stops_the_worker_before_a_hazardous_fork(
        tmp_path: pathlib.Path) -> None:
    """The first fork of the pool is refused: the worker stops at start with the
    refusal, which is also an error record in its log; no pool process ever exists."""
    command = celery_worker(tmp_path, hazardous=True, policy="raise")
    with server(command, tmp_path) as proc:
        code = proc.wait(timeout=60)
    log = (tmp_path / "worker.log").read_text()
    assert code == 1, log
    assert re.search(r"ERROR/MainProcess\] forksafe refused os\.fork at "
                     r"billiard/popen_fork\.py:\d+ \(pid \d+, thread 'MainThread'\): 1 warning; "
                     r"no child was created \(policy 'raise'\)\.", log), log
    assert "Unrecoverable error: ForkSafetyError('forksafe refused os.fork at " in log
    assert "ForkPoolWorker" not in log


# -- Django: manage.py test --parallel with the recipe's TEST_RUNNER ---------------------------

DJANGO = {
    "manage.py": """
        import os, sys
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")
        from django.core.management import execute_from_command_line
        execute_from_command_line(sys.argv)
    """,
    "proj/__init__.py": "",
    "proj/settings.py": """
        import forksafe
        forksafe.observe()  # the recipe's optional line: where each thread was started
        SECRET_KEY = "test"
        INSTALLED_APPS = ["shop"]
        DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": "db.sqlite3"}}
        USE_TZ = True
        TEST_RUNNER = "forksafe.integrations.django.DiscoverRunner"
        FORKSAFE = {"hang_timeout": 1}
    """,
    "shop/__init__.py": "",
    "shop/models.py": "",
    "shop/tests.py": """
        import time
        from django.test import SimpleTestCase
        class ATests(SimpleTestCase):
            def test_a(self):
                time.sleep(0.2)
        class BTests(SimpleTestCase):
            def test_b(self):
                time.sleep(0.2)
    """,
}
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


def django_test(tmp_path: pathlib.Path, files: dict[str, str], *args: str
                ) -> subprocess.CompletedProcess[str]:
    pytest.importorskip("django", reason="Django is in the test extras")
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    proc = subprocess.Popen([sys.executable, "manage.py", "test", "--parallel", "2", *args],
                            cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_django_runner_setting_is_silent_for_a_clean_suite(tmp_path: pathlib.Path) -> None:
    proc = django_test(tmp_path, DJANGO)
    assert proc.returncode == 0, proc.stderr
    assert "Ran 2 tests" in proc.stderr and "OK" in proc.stderr
    assert "forksafe" not in proc.stderr.lower().replace("forksafe.integrations", "")


def test_django_runner_setting_ends_a_hung_worker_and_fails_its_test(
        tmp_path: pathlib.Path) -> None:
    """Only the setting - no FORKSAFE_* variable, no forksafe run: the hazardous fork is a
    warning in the test output, the hung worker is ended after the setting's hang
    timeout, its test fails with the diagnosis, the others pass, and the run ends."""
    files = {**DJANGO, "shop/prices.py": PRICES, "shop/tests.py": HANGING_TESTS,
             "shop/models.py": "from shop import prices  # noqa: F401\n"}
    started = time.monotonic()
    proc = django_test(tmp_path, files)
    assert time.monotonic() - started < 60
    assert proc.returncode == 1, proc.stderr
    assert "Ran 4 tests" in proc.stderr and "FAILED (errors=1)" in proc.stderr, proc.stderr
    assert "ERROR: test_price (shop.tests.PriceTests" in proc.stderr
    assert "ForkSafetyWarning: forksafe: multiprocessing.Pool at " in proc.stderr
    hang = line_of(HANGING_TESTS, "# hang-line")
    start = line_of(PRICES, ".start()")
    assert f"it is blocked taking `lock` at shop/tests.py:{hang} (test_price); at fork time " \
        f"thread 'price-refresher' (started at shop/prices.py:{start}) held `lock`" in proc.stderr


def test_django_runner_options_override_the_setting(tmp_path: pathlib.Path) -> None:
    """``--forksafe-policy raise`` refuses the hazardous fork of the parallel runner."""
    files = {**DJANGO, "shop/prices.py": PRICES,
             "shop/models.py": "from shop import prices  # noqa: F401\n"}
    files["proj/settings.py"] = textwrap.dedent(DJANGO["proj/settings.py"]) + \
        'FORKSAFE["fail_on"] = "warning"\n'
    proc = django_test(tmp_path, files, "--forksafe-policy", "raise")
    assert proc.returncode != 0
    assert "forksafe.ForkSafetyError: forksafe refused multiprocessing.Pool" in proc.stderr
    assert "price-refresher" in proc.stderr


def test_django_runner_names_a_bad_setting(tmp_path: pathlib.Path) -> None:
    files = {**DJANGO}
    files["proj/settings.py"] = textwrap.dedent(DJANGO["proj/settings.py"]) + \
        'FORKSAFE["hang_timout"] = 3\n'
    proc = django_test(tmp_path, files)
    assert proc.returncode != 0
    assert "settings.FORKSAFE: unknown key(s) hang_timout; expected: policy, hang_timeout, " \
        "fail_on" in proc.stderr


# -- uWSGI ------------------------------------------------------------------------------------

UWSGI = shutil.which("uwsgi", path=str(BIN))
needs_uwsgi = pytest.mark.skipif(
    UWSGI is None, reason="uWSGI is not installed here (pip install uwsgi: it builds from "
    "source with a C compiler, about a minute); add it to the test extras to run these")

UWSGI_APP = """
from forksafe.integrations import uwsgi as forksafe_uwsgi
forksafe_uwsgi.setup(policy="log")
"""


def uwsgi(tmp_path: pathlib.Path, app: str, *options: str) -> tuple[list[bytes | str], str]:
    """Serve ``app`` with uWSGI (master, one worker) and the recipe's options; two
    requests; its log."""
    (tmp_path / "app.py").write_text(textwrap.dedent(UWSGI_APP + app))
    port = free_port()
    log = tmp_path / "uwsgi.log"
    command = [str(UWSGI), "--http-socket", f"127.0.0.1:{port}", "--master", "--processes",
               "1", "--wsgi-file", "app.py", "--callable", "app", "--logto", str(log),
               "--die-on-term", *options]
    with server(command, tmp_path) as proc:
        wait_until_serving(port, proc)
        wait_for(log, r"spawned uWSGI worker 1", 20)
        answers = [get(port, timeout=20), get(port, timeout=20)]
        time.sleep(0.5)
    return answers, log.read_text()


RECIPE = ["--enable-threads", "--py-call-uwsgi-fork-hooks",
          "--py-sys-executable", sys.executable, "--harakiri", "8"]


@needs_uwsgi
def test_uwsgi_recipe_diagnoses_a_hazardous_preloaded_app(tmp_path: pathlib.Path) -> None:
    """The worker's fork, seen through the fork hooks uWSGI runs; the request that hangs
    on the inherited lock: the worker is ended after half of harakiri, with the
    diagnosis in uWSGI's log; uWSGI respawns it (another hazardous fork, one line)."""
    answers, log = uwsgi(tmp_path, HAZARDOUS, *RECIPE)
    assert all(isinstance(a, str) for a in answers), answers
    assert re.search(r"WARNING forksafe: unwrapped-fork at an unknown place forked child \d+ "
                     r"\(parent pid \d+, thread 'MainThread'\) while that was unsafe: 1 "
                     r"warning\.", log), log
    assert "thread 'cache-refresher' (started at app.py:" in log
    hang = line_of(UWSGI_APP + HAZARDOUS, "# hang-line")
    assert re.search(r"forksafe: child \d+ \(forked via unwrapped-fork\) made no progress for "
                     r"[\d.]+ s: it is blocked taking `cache_lock` at "
                     rf"app\.py:{hang} \(app\)", log), log
    assert re.search(r"DAMN ! worker 1 \(pid: \d+\) died, killed by signal 9", log)
    assert "the same hazards as logged in full at " in log, "the respawned worker's fork"


@needs_uwsgi
@pytest.mark.parametrize("app, options", [
    pytest.param(CLEAN, RECIPE, id="clean-preloaded"),
    pytest.param(HAZARDOUS.replace("with cache_lock:  # hang-line\n        pass", "pass"),
                 [*RECIPE, "--lazy-apps"], id="hazardous-but-lazy-apps"),
])
def test_uwsgi_recipe_is_silent_when_safe(tmp_path: pathlib.Path, app: str,
                                          options: list[str]) -> None:
    """Safe twins: a clean preloaded app, and the hazardous app under ``lazy-apps``
    (each worker loads it after its fork, inheriting nothing): served, no forksafe line."""
    answers, log = uwsgi(tmp_path, app, *options)
    assert answers == [b"ok", b"ok"], log
    assert "forksafe" not in log


@needs_uwsgi
def test_uwsgi_setup_says_which_option_hides_the_forks(tmp_path: pathlib.Path) -> None:
    """Without py-call-uwsgi-fork-hooks no Python code sees uWSGI's forks: setup says so
    in uWSGI's log rather than stay silent about a hazard it cannot see."""
    answers, log = uwsgi(tmp_path, CLEAN, "--enable-threads")
    assert answers == [b"ok", b"ok"]
    assert "forksafe: uWSGI option py-call-uwsgi-fork-hooks is off: uWSGI forks its workers " \
        "in C without running Python's fork hooks" in log
    assert "forksafe: hung workers are not watched: sys.executable is " in log


# -- the logging route itself ------------------------------------------------------------------


def test_send_logs_to_hands_records_to_another_loggers_handlers_at_its_level(
        tmp_path: pathlib.Path) -> None:
    """What the gunicorn recipe does with gunicorn's error log: records reach the target's
    handlers in its format, at its level (a debug verdict is not shown at INFO), and not
    the root logger's (no second copy)."""
    s = run_scenario("""
        import io, logging, os
        import forksafe
        from forksafe import integrations
        root = io.StringIO()
        logging.basicConfig(stream=root, level=logging.DEBUG, format="ROOT %(message)s")
        server = logging.getLogger("server.error")
        server.propagate = False
        out = io.StringIO()
        handler = logging.StreamHandler(out)
        handler.setFormatter(logging.Formatter("[%(levelname)s] %(message)s"))
        server.addHandler(handler)
        server.setLevel(logging.INFO)
        integrations.send_logs_to(server)
        integrations.check_before_forking("gunicorn", "the clean app")  # a debug line
        forksafe.install("log")
        import threading, time
        lock = threading.Lock()
        def hold():
            with lock:
                time.sleep(60)
        threading.Thread(target=hold, name="holder", daemon=True).start()
        time.sleep(0.1)
        integrations.check_before_forking("gunicorn", "the app")
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        emit(server=out.getvalue(), root=root.getvalue())
    """, tmp_path, timeout=60)
    server_log = s.result["server"]
    assert "the clean app" not in server_log, "debug, under the target's INFO"
    assert server_log.startswith("[WARNING] forksafe: the app is not safe to fork: 1 warning.")
    assert "\n[WARNING] forksafe: os.fork at scenario.py:" in server_log
    assert "the same hazards as logged in full at " in server_log
    assert "forksafe" not in s.result["root"]
