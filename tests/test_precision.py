"""Quiet on forks that code makes safe itself; still loud on the hazardous twin of each.

Each rule has its minimal real reproduction here, run in its own interpreter with
the guard installed (``run_scenario``): a thread its owner stops in a before-fork
hook; one its owner restarts in every child; a thread started with
``_thread.start_new_thread``; a multiprocessing queue's feeder thread; a pool
replacing its workers; accepted hazards. The same rules on the real frameworks
(gunicorn, pytest-xdist, Django, OpenTelemetry) are in ``test_frameworks.py``.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from typing import Any

import pytest

from conftest import run_scenario
from forksafe import _accept

GUARDED = """
import json, os, sys, threading, time, warnings
import forksafe
from forksafe import _guard
warnings.simplefilter("always")
seen = []
warnings.showwarning = lambda message, category, *a, **k: seen.append(
    (category.__name__, str(message))) if category is forksafe.ForkSafetyWarning else None
forksafe.install({policy!r}{extra})
def fork():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    return os.waitpid(pid, 0)[1]
def out(**more):
    events = [e.to_dict() for e in _guard.history()]
    print("FORKSAFE-RESULT:" + json.dumps(dict(events=events, warnings=seen, **more)))
"""


def guarded(body: str, tmp_path: pathlib.Path, *, policy: str = "warn", extra: str = "",
            **kwargs: Any) -> Any:
    return run_scenario(GUARDED.format(policy=policy, extra=extra) + body, tmp_path,
                        **kwargs)


def kinds(event: dict[str, Any]) -> list[tuple[str, str]]:
    return [(h["kind"], h["severity"]) for h in event["hazards"]]


# -- a thread its owner stops before every fork ------------------------------------------

STOPPED_BY_HOOK = """
class Server:  # the shape of gunicorn's control-socket server
    def __init__(self):
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.serve, name="control", daemon=True)
        self.thread.start()
    def serve(self):
        while not self.stop.wait({tick}):
            pass
servers = [Server()]
def before():
    servers[0].stop.set()
    servers[0].thread.join({join})
def after_in_parent():
    servers[0] = Server()
os.register_at_fork(before=before, after_in_parent=after_in_parent)
statuses = [fork() for _ in range(3)]
out(statuses=statuses)
"""


def test_a_thread_stopped_before_every_fork_is_not_a_hazard(tmp_path: pathlib.Path) -> None:
    """Stopped and joined in a before hook, restarted after: quiet, even with -W error."""
    s = guarded(STOPPED_BY_HOOK.format(tick=60, join=5), tmp_path,
                env={"PYTHONWARNINGS": "error::forksafe.ForkSafetyWarning"})
    assert s.result["statuses"] == [0, 0, 0]
    assert s.result["warnings"] == []
    for event in s.result["events"]:
        assert event["action"] == "allowed"
        [hazard] = event["hazards"]
        assert hazard["severity"] == "info"
        assert "handles fork itself: __main__.before runs before every fork" in hazard["summary"]


def test_a_thread_its_hook_fails_to_stop_is_warned_after_the_fork(
        tmp_path: pathlib.Path) -> None:
    """Twin: the hook's join times out, the thread is there at the fork: warned (after
    the fork, printed rather than raised) and recorded as a warning."""
    s = guarded(STOPPED_BY_HOOK.format(tick=60, join=0.001).replace(
        "while not self.stop.wait(60):\n            pass",
        "time.sleep(60)"), tmp_path)
    assert s.result["statuses"] == [0, 0, 0]
    [first, *_] = s.result["events"]
    assert first["action"] == "warned"
    [hazard] = first["hazards"]
    assert hazard["severity"] == "warning"
    assert "still running at the fork" in hazard["summary"]
    assert any("still running at the fork" in text for _, text in s.result["warnings"])


# -- a thread its owner restarts in every child ------------------------------------------

RESTARTED = """
class Exporter:  # the shape of OpenTelemetry's BatchProcessor
    def __init__(self):
        self.start()
    def start(self):
        self.thread = threading.Thread(target=self.work, name="exporter", daemon=True)
        self.thread.start()
    def work(self):
        threading.Event().wait(60)
exporter = Exporter()
{hook}
statuses = [fork() for _ in range(2)]
out(statuses=statuses)
"""


def test_a_thread_restarted_in_every_child_is_info(tmp_path: pathlib.Path) -> None:
    s = guarded(RESTARTED.format(hook="os.register_at_fork(after_in_child=exporter.start)"),
                tmp_path)
    [hazard] = s.result["events"][0]["hazards"]
    assert hazard["severity"] == "info"
    assert "Exporter.start runs in every child" in hazard["summary"]
    assert s.result["warnings"] == []


def test_the_same_thread_without_the_hook_is_a_warning(tmp_path: pathlib.Path) -> None:
    s = guarded(RESTARTED.format(hook="pass"), tmp_path)
    [hazard] = s.result["events"][0]["hazards"]
    assert hazard["severity"] == "warning"
    assert s.result["events"][0]["action"] == "warned"


# -- threads started with _thread.start_new_thread ------------------------------------------


def test_a_thread_started_with_thread_module_is_a_python_thread(tmp_path: pathlib.Path) -> None:
    """It shows in sys._current_frames() but not threading.enumerate(): a Python thread
    with its frames and start site, not an unknown native thread."""
    s = run_scenario("""
        import _thread, time, forksafe
        forksafe.observe()
        def reader():
            time.sleep(60)  # READING
        _thread.start_new_thread(reader, ())  # STARTED
        time.sleep(0.2)
        emit()
    """, tmp_path)
    assert s.of_kind("native-thread") == []
    [hazard] = s.of_kind("thread")
    assert hazard["severity"] == "warning"
    assert hazard["evidence"]["raw"] is True
    assert hazard["evidence"]["target"] == "__main__.reader"
    assert hazard["evidence"]["native_id"] is not None
    assert f"scenario.py:{s.line_of('STARTED')}" in hazard["summary"]
    assert hazard["evidence"]["current"][0]["line"] == s.line_of("READING")


# -- multiprocessing: a queue's feeder, an executor's worker, a pool replacing workers ----

QUEUE = """
import multiprocessing as mp
ctx = mp.get_context("fork")
q = ctx.Queue()
q.put("warm"); q.get()  # the feeder thread runs
def child(q):
    q.put("from the child")
"""


def test_a_queue_feeder_is_safe_for_a_multiprocessing_child(tmp_path: pathlib.Path) -> None:
    """multiprocessing resets the queue in children it starts: info there."""
    s = guarded(QUEUE + """
p = ctx.Process(target=child, args=(q,))
p.start()
got = q.get(timeout=10)
p.join()
out(got=got)
""", tmp_path)
    assert s.result["got"] == "from the child"
    [event] = s.result["events"]
    assert event["mechanism"] == "multiprocessing" and event["action"] == "allowed"
    [hazard] = event["hazards"]
    assert hazard["severity"] == "info"
    assert "multiprocessing.queues.Queue._after_fork runs in multiprocessing's children" in \
        hazard["summary"]


def test_the_same_queue_after_a_bare_fork_is_a_warning(tmp_path: pathlib.Path) -> None:
    """Twin: a bare os.fork runs no multiprocessing reset; the feeder is named, with why."""
    s = guarded(QUEUE + """
out(status=fork())
""", tmp_path)
    [event] = s.result["events"]
    assert event["action"] == "warned"
    [hazard] = event["hazards"]
    assert hazard["severity"] == "warning"
    assert hazard["evidence"]["known"] == "mp-queue-feeder"
    assert "not after a bare os.fork" in hazard["summary"]


def test_an_inherited_thread_pool_executor_is_a_warning_that_says_why(
        tmp_path: pathlib.Path) -> None:
    """An idle executor worker is no safe thread: the child's submit() never runs."""
    s = guarded("""
from concurrent.futures import ThreadPoolExecutor
ex = ThreadPoolExecutor(1)
ex.submit(int).result()  # its worker now waits, idle
out(status=fork())
""", tmp_path)
    [event] = s.result["events"]
    [hazard] = event["hazards"]
    assert hazard["severity"] == "warning"
    assert hazard["evidence"]["known"] == "thread-pool-worker"
    assert "never run" in hazard["evidence"]["why"]


POOL = """
import multiprocessing as mp
def double(x):
    return 2 * x
with mp.get_context("fork").Pool(2, maxtasksperchild=1) as pool:
    {during}
    total = sum(pool.map(double, range(8), chunksize=1))
out(total=total)
"""


def test_a_pool_replacing_its_workers_is_quiet(tmp_path: pathlib.Path) -> None:
    """maxtasksperchild: the pool forks from its own thread; nothing there is a hazard
    to the new worker, which runs only the pool's tasks."""
    s = guarded(POOL.format(during="pass"), tmp_path,
                env={"PYTHONWARNINGS": "error::forksafe.ForkSafetyWarning"})
    assert s.result["total"] == 56
    assert s.result["warnings"] == []
    events = s.result["events"]
    assert len(events) >= 8
    assert {e["action"] for e in events} == {"allowed"}
    refork = [e for e in events if e["thread"] != "MainThread"]
    assert refork, "replacement workers are forked by the pool's own thread"
    assert all(e["site"]["file"].endswith("scenario.py") for e in refork), \
        "a fork with no user code is sited where the pool was made"


def test_a_pool_replacing_workers_while_a_thread_holds_a_lock_warns(
        tmp_path: pathlib.Path) -> None:
    """Twin: a thread of the program holding a lock at a replacement fork is a warning."""
    s = guarded(POOL.format(during="""lock = threading.Lock()
    def hold():
        with lock:
            time.sleep(30)
    threading.Thread(target=hold, name="holder", daemon=True).start()
    time.sleep(0.1)"""), tmp_path)
    refork = [e for e in s.result["events"] if e["thread"] != "MainThread"]
    assert refork and all(e["action"] == "warned" for e in refork)
    held = [h for h in refork[0]["hazards"] if h["evidence"].get("name") == "holder"]
    assert held and held[0]["severity"] == "warning"


# -- origins ---------------------------------------------------------------------------------


def test_install_records_origins_without_threading_imported_first(
        tmp_path: pathlib.Path) -> None:
    """Connection origins are known from install() on, whatever was imported first; the
    main thread's origin is the interpreter, never 'origin unknown'."""
    s = run_scenario("""
        import sys
        assert "threading" not in sys.modules or True
        import forksafe
        forksafe.install("log")
        import sqlite3
        conn = sqlite3.connect("app.db")  # OPENED
        import threading
        seen = {}
        def look():
            seen["report"] = forksafe.check().to_dict()
        t = threading.Thread(target=look)
        t.start(); t.join()
        emit(forksafe.Report.from_dict(seen["report"]))
    """, tmp_path)
    [connection] = s.of_kind("sqlite-connection")
    assert f"scenario.py:{s.line_of('OPENED')}" in connection["summary"]
    [main] = [h for h in s.of_kind("thread") if h["evidence"]["name"] == "MainThread"]
    assert main["evidence"]["started_at"] == "the main thread, started by the interpreter"


# -- accepting a hazard ------------------------------------------------------------------------

HOLDER = """
lock = threading.Lock()
def hold():
    with lock:
        time.sleep(30)
threading.Thread(target=hold, name="cache-refresher", daemon=True).start()
time.sleep(0.1)
"""


def test_an_accepted_hazard_is_info_with_its_reason(tmp_path: pathlib.Path) -> None:
    """accept() grades it info, reason shown, and -W error passes; never dropped."""
    s = guarded("""
forksafe.accept("thread", name="cache-*", reason="the refresher is joined before forking")
""" + HOLDER + """
out(status=fork())
""", tmp_path, env={"PYTHONWARNINGS": "error::forksafe.ForkSafetyWarning"})
    [event] = s.result["events"]
    assert event["action"] == "allowed"
    [hazard] = event["hazards"]
    assert hazard["severity"] == "info"
    assert hazard["summary"].endswith("(accepted: the refresher is joined before forking)")
    assert hazard["evidence"]["accepted"]["severity"] == "warning"
    assert hazard["evidence"]["accepted"]["source"] == "forksafe.accept()"


def test_a_rule_that_does_not_match_accepts_nothing(tmp_path: pathlib.Path) -> None:
    """Twin: another name, or another kind, leaves the warning as it was."""
    s = guarded("""
forksafe.accept("thread", name="other-*", reason="not this one")
forksafe.accept("native-runtime", runtime="grpc", reason="not a thread")
""" + HOLDER + """
out(status=fork())
""", tmp_path)
    [event] = s.result["events"]
    assert event["action"] == "warned"
    assert kinds(event) == [("thread", "warning")]


def test_accept_rules_from_the_environment_reach_the_whole_tree(tmp_path: pathlib.Path) -> None:
    s = run_scenario("""
        import os, threading, time, forksafe
        lock = threading.Lock()
        def hold():
            with lock:
                time.sleep(30)
        threading.Thread(target=hold, name="cache-refresher", daemon=True).start()
        time.sleep(0.1)
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        emit(forksafe._guard.history()[-1].report)
    """, tmp_path, env={"FORKSAFE_POLICY": "warn",
                        "FORKSAFE_ACCEPT": "thread/started_in=__main__: joined in production"})
    [hazard] = s.hazards
    assert hazard["severity"] == "info" and "accepted: joined in production" in hazard["summary"]
    assert hazard["evidence"]["accepted"]["source"] == "FORKSAFE_ACCEPT"


def test_accept_rules_from_pyproject_and_the_command_line(tmp_path: pathlib.Path) -> None:
    """forksafe check reads [tool.forksafe] accept (text and table forms) and --accept."""
    (tmp_path / "pyproject.toml").write_text(
        '[tool.forksafe]\naccept = [\n'
        '  {kind = "thread", name = "cache-*", reason = "joined before forking"},\n'
        '  "native-runtime/runtime=gnu-openmp: OMP_NUM_THREADS=1 in production",\n]\n')
    (tmp_path / "app.py").write_text(
        "import threading, time\nlock = threading.Lock()\n"
        "def hold():\n    with lock:\n        time.sleep(30)\n"
        "threading.Thread(target=hold, name='cache-refresher', daemon=True).start()\n"
        "threading.Thread(target=time.sleep, args=(30,), name='poller', daemon=True).start()\n"
        "time.sleep(0.1)\n")
    command = [sys.executable, "-m", "forksafe", "check", "--import", "app", "--json",
               "--fail-on", "warning"]
    plain = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    data = json.loads(plain.stdout)
    graded = {h["evidence"]["name"]: h["severity"] for h in data["hazards"]}
    assert graded == {"cache-refresher": "info", "poller": "warning"}
    assert plain.returncode == 1
    both = subprocess.run([*command, "--accept", "thread/name=poller: a harmless sleeper"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert both.returncode == 0, both.stdout + both.stderr
    bad = subprocess.run([*command, "--accept", "thread/colour=red: nonsense"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1 and "colour=red" in bad.stderr


@pytest.mark.parametrize(("text", "problem"), [
    ("thread/name=x", "expected KIND[/FIELD=GLOB]...: REASON"),
    ("thread/name=x:   ", "needs a reason"),
    ("threads/name=x: why", "unknown hazard kind 'threads'"),
    ("thread/who=x: why", "'who=x' is not FIELD=GLOB"),
])
def test_a_bad_rule_is_one_clear_error(text: str, problem: str) -> None:
    with pytest.raises(_accept.AcceptError) as info:
        _accept.parse(text, "--accept")
    assert problem in str(info.value) and "--accept" in str(info.value)


def test_rules_match_on_kind_name_module_and_runtime() -> None:
    thread = {"name": "cache-refresher", "target": "myapp.cache.refresh",
              "started_at": [{"file": os.path.abspath(__file__), "line": 1, "function": "f"}]}
    [by_name] = _accept.parse("thread/name=cache-*: x", "t")
    [by_module] = _accept.parse("thread/started_in=myapp.*: x", "t")
    [by_runtime] = _accept.parse("native-runtime/runtime=grpc: x", "t")
    assert by_name.matches("thread", thread) and not by_name.matches("native-thread", {})
    assert by_module.matches("thread", thread)
    assert not by_module.matches("thread", {"name": "x", "target": "other.thing"})
    assert by_runtime.matches("native-runtime", {"runtime": "grpc"})
    assert not by_runtime.matches("native-runtime", {"runtime": "gnu-openmp"})


# -- fixes that fit the fork --------------------------------------------------------------------


def test_fixes_fit_the_mechanism(tmp_path: pathlib.Path, native_dir: pathlib.Path) -> None:
    """get_context() is suggested for a multiprocessing fork, not for a bare os.fork."""
    s = guarded(f"""
import ctypes, multiprocessing as mp
ctypes.CDLL({str(native_dir / 'libomp_pool.so')!r}).omp_pool_run(1000)
fork()
p = mp.get_context("fork").Process(target=int)
p.start(); p.join()
out()
""", tmp_path, env={"OMP_NUM_THREADS": "2"})
    bare, pooled = s.result["events"]
    [bare_omp] = [h for h in bare["hazards"] if h["kind"] == "native-runtime"]
    [pooled_omp] = [h for h in pooled["hazards"] if h["kind"] == "native-runtime"]
    assert "get_context" not in bare_omp["remedy"] and "exec" in bare_omp["remedy"]
    assert "forksafe.get_context()" in pooled_omp["remedy"]


def test_grouping_keeps_start_sites_apart() -> None:
    """Forks whose hazards differ only in thread numbers fold; started elsewhere, they do not."""
    from forksafe._render.runs import render_events
    from forksafe._report import ForkEvent, Hazard, Report, Severity, Site

    def event(pid: int, name: str, line: int) -> ForkEvent:
        hazard = Hazard("thread", Severity.WARNING,
                        f"thread '{name}' (started at srv.py:{line}) is idle", "join it",
                        {"name": name})
        return ForkEvent(1, pid, 0.0, "os.fork", Site("app.py", 3, "main"), "warned",
                         Report((hazard,)))

    text = render_events(["app"], 0, [event(10, "Thread-1", 115), event(11, "Thread-2", 187),
                                      event(12, "Thread-3", 187)])
    assert text.count("fork via os.fork at app.py:3 in main") == 2
    assert "srv.py:115" in text and "srv.py:187" in text
