"""Hangs beyond locks: a child waiting for work a vanished thread would have done.

Each hazard class is reproduced for real in a child interpreter, with the hang
timeout at 1 s: a ``multiprocessing.Queue`` read after a bare ``os.fork`` (its
feeder thread is gone), a ``ThreadPoolExecutor`` future (its worker is gone but
counted as idle), a native library whose worker and I/O threads are gone (a C
fixture of that shape), gRPC with fork support switched off (the child polls in
place, never blocked in one wait). Each is diagnosed, with its cause, soon after the
hang timeout (benchmarks/bench_diagnosis.py measures how soon). Their safe twins —
the child makes its own queue, executor or library threads — finish. And a parent
holding every one of those hazards at once has children that are never reported
nor ended while they sit idle in ``accept``, sleep in a loop for 10 s, or compute.

A stall that no fork-time hazard explains is shown, never ended.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from conftest import Scenario, run_scenario

TIMEOUT = 1.0

HARNESS = """
import json, os, sys, time
import forksafe
from forksafe._guard import event_for_child
forksafe.install("log", hang_timeout={timeout})
{setup}
time.sleep(0.1)
start = time.monotonic()
pid = os.fork()
if pid == 0:
{child}
    os._exit(0)
{parent}
_, status = os.waitpid(pid, 0)
elapsed = time.monotonic() - start
e = event_for_child(pid)
print("FORKSAFE-RESULT:" + json.dumps({{
    "outcome": e.outcome.to_dict(), "elapsed": elapsed,
    "hazards": [h.to_dict() for h in e.report.hazards]}}))
"""


def forked(tmp_path: pathlib.Path, setup: str, child: str, *, parent: str = "",
           env: dict[str, str] | None = None, timeout: float = TIMEOUT) -> Scenario:
    """Run ``setup``, fork, run ``child`` in the child; the child's outcome and how long
    after the fork its parent reaped it."""
    code = HARNESS.format(timeout=timeout, setup=textwrap.dedent(setup),
                          child=textwrap.indent(textwrap.dedent(child), "    "),
                          parent=textwrap.dedent(parent))
    return run_scenario(code, tmp_path, timeout=60, env=env)


#: How long after its fork a hung child must have been diagnosed here: the hang timeout
#: and then some, for a loaded machine. The latency itself (target: the hang timeout +
#: 1 s) is measured on a quiet machine by benchmarks/bench_diagnosis.py.
IN_TIME = TIMEOUT + 4.0


def assert_hung_in_time(s: Scenario, *parts: str) -> str:
    """The child was reported hung, with every one of ``parts`` in the diagnosis, at the
    first looks after the hang timeout (``IN_TIME``); the diagnosis."""
    outcome: dict[str, Any] = s.result["outcome"]
    assert outcome["status"] == "hung", (outcome, s.stderr)
    diagnosis: str = outcome["diagnosis"]
    for part in parts:
        assert part in diagnosis, (part, diagnosis)
    assert s.result["elapsed"] <= IN_TIME, s.result["elapsed"]
    assert "ForkSafetyWarning: child" not in s.stderr  # policy log: logged, not warned
    return diagnosis


def assert_finished(s: Scenario) -> None:
    outcome = s.result["outcome"]
    assert outcome["status"] == "exited" and outcome["exit_code"] == 0, (outcome, s.stderr)
    assert outcome["diagnosis"] is None
    assert "made no progress" not in s.stderr and "stalled" not in s.stderr


# -- an inherited multiprocessing.Queue -------------------------------------------------------

QUEUE = """
import multiprocessing as mp
q = mp.Queue()
q.put("warm"); q.get()  # the queue's feeder thread runs from here on  # feeder-line
"""


def test_inherited_queue_read_after_a_bare_fork_is_a_hang_naming_its_feeder(
        tmp_path: pathlib.Path) -> None:
    s = forked(tmp_path, QUEUE, 'q.put("from child")\nq.get()  # child-line')
    diagnosis = assert_hung_in_time(s, "'QueueFeederThread'", "(multiprocessing)",
                                    f"(started at scenario.py:{s.line_of('feeder-line')})")
    assert "does not exist in the child" in diagnosis
    assert f"line {s.line_of('child-line')} in <module>" in s.result["outcome"]["traceback"]


def test_a_queue_made_in_the_child_is_fine(tmp_path: pathlib.Path) -> None:
    """Safe twin: the same parent; the child makes and uses its own queue."""
    s = forked(tmp_path, QUEUE, 'own = mp.Queue()\nown.put("x"); own.get(timeout=10)')
    assert_finished(s)


# -- an inherited ThreadPoolExecutor ----------------------------------------------------------

EXECUTOR = """
from concurrent.futures import ThreadPoolExecutor
executor = ThreadPoolExecutor(max_workers=1)
executor.submit(int).result()  # its worker now waits, idle, for the next task  # pool-line
"""


def test_future_of_an_inherited_executor_is_a_hang_naming_its_worker(
        tmp_path: pathlib.Path) -> None:
    s = forked(tmp_path, EXECUTOR, "executor.submit(int).result()")
    assert_hung_in_time(s, "'ThreadPoolExecutor-0_0'", "(concurrent)",
                        f"(started at scenario.py:{s.line_of('pool-line')})",
                        "create a new executor in the child")


def test_an_executor_made_in_the_child_is_fine(tmp_path: pathlib.Path) -> None:
    """Safe twin: the child makes its own executor."""
    s = forked(tmp_path, EXECUTOR,
               "with ThreadPoolExecutor(max_workers=1) as own:\n    own.submit(int).result()")
    assert_finished(s)


# -- a native library whose worker and I/O threads vanish -------------------------------------

WORKER_POOL = """
import ctypes
lib = ctypes.CDLL(LIBRARY)
lib.wp_call.restype = ctypes.c_int64
lib.wp_call.argtypes = [ctypes.c_int64]
"""


def worker_pool(native_dir: pathlib.Path, before: str = "") -> str:
    """The fixture library loaded; ``before``: what the parent does with it then."""
    return f"LIBRARY = {str(native_dir / 'libworker_pool.so')!r}\n" + WORKER_POOL + before


def test_native_library_whose_threads_vanished_is_a_hang_naming_them(
        tmp_path: pathlib.Path, native_dir: pathlib.Path) -> None:
    setup = worker_pool(native_dir, "assert lib.wp_call(20) == 40  # starts its threads")
    s = forked(tmp_path, setup, "lib.wp_call(21)")
    assert_hung_in_time(s, "inside libworker_pool.so", "'wp-worker', 'wp-io'",
                        "work they would have done is never done")
    assert {h["kind"] for h in s.result["hazards"]} == {"native-thread"}


def test_native_library_started_in_the_child_is_fine(tmp_path: pathlib.Path,
                                                     native_dir: pathlib.Path) -> None:
    """Safe twin: forked before the library started its threads; the child starts its own."""
    setup = worker_pool(native_dir)
    s = forked(tmp_path, setup, "assert lib.wp_call(21) == 42")
    assert_finished(s)
    assert s.result["hazards"] == []


# -- gRPC with fork support switched off ------------------------------------------------------

GRPC_SERVER = """
import sys
from concurrent import futures
import grpc
def echo(request, context):
    return b"echo:" + request
server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
    "test.Echo", {"Call": grpc.unary_unary_rpc_method_handler(echo)}),))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
sys.stdin.read()  # until the client goes
"""

GRPC_CLIENT = """
import subprocess
import grpc
server = subprocess.Popen([sys.executable, "grpc_server.py"], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True)
port = server.stdout.readline().strip()
channel = grpc.insecure_channel(f"127.0.0.1:{port}")
call = channel.unary_unary("/test.Echo/Call")
assert call(b"parent", timeout=10) == b"echo:parent"  # gRPC's threads run from here on
"""

OFF = {"GRPC_ENABLE_FORK_SUPPORT": "0"}


@pytest.fixture
def grpc_server(tmp_path: pathlib.Path) -> pathlib.Path:
    pytest.importorskip("grpc", reason="grpcio is in the test extras")
    (tmp_path / "grpc_server.py").write_text(GRPC_SERVER)
    return tmp_path


def test_grpc_with_fork_support_off_is_a_hang_although_its_threads_poll(
        grpc_server: pathlib.Path) -> None:
    """The child's main thread waits for an answer gRPC's vanished threads would have
    read; the threads gRPC starts in the child wake every 200 ms, so the child is never
    in one blocking wait: it is judged as polling in place."""
    s = forked(grpc_server, GRPC_CLIENT, 'call(b"child")', env=OFF)
    assert_hung_in_time(s, "gRPC core was active at fork time", "cygrpc")
    [hazard] = [h for h in s.result["hazards"] if h["kind"] == "native-runtime"]
    assert "fork support is switched off (GRPC_ENABLE_FORK_SUPPORT is false)" in \
        hazard["summary"]


def test_grpc_channel_ready_future_in_the_child_is_a_hang(grpc_server: pathlib.Path) -> None:
    s = forked(grpc_server, GRPC_CLIENT,
               'grpc.channel_ready_future(grpc.insecure_channel(f"127.0.0.1:{port}")).result()',
               env=OFF)
    assert_hung_in_time(s, "gRPC core was active at fork time")


# -- idle, asleep, computing: never hung, whatever was wrong at fork time -------------------

EVERYTHING = GRPC_CLIENT + QUEUE + EXECUTOR + """
import socket, threading
lock = threading.Lock()
def hold():
    with lock:
        time.sleep(60)
threading.Thread(target=hold, name="holder", daemon=True).start()
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen()
"""


@pytest.mark.parametrize(("child", "parent"), [
    pytest.param("conn, _ = listener.accept()\nconn.close()",
                 "time.sleep(4 * TIMEOUT)\nsocket.create_connection(listener.getsockname())",
                 id="idle-in-accept"),
    pytest.param("for _ in range(50):\n    time.sleep(0.2)", "", id="asleep-in-a-loop-10s"),
    pytest.param("end = time.monotonic() + 4 * TIMEOUT\nwhile time.monotonic() < end:\n"
                 "    sum(range(1000))", "", id="computing"),
])
def test_children_idle_asleep_or_computing_are_never_hung(grpc_server: pathlib.Path,
                                                          native_dir: pathlib.Path, child: str,
                                                          parent: str) -> None:
    """Safe twins: a parent with every hazard above (and a thread holding a lock) forks a
    child that waits in ``accept`` until the parent connects after 4 s, sleeps in a loop
    for 10 s, or computes for 4 s: each exits 0, never reported nor ended."""
    setup = f"TIMEOUT = {TIMEOUT!r}\n" + EVERYTHING + worker_pool(native_dir, "lib.wp_call(20)")
    s = forked(grpc_server, setup, child, parent=parent, env=OFF)
    assert_finished(s)
    kinds = {h["kind"] for h in s.result["hazards"] if h["severity"] != "info"}
    assert {"thread", "native-thread", "native-runtime"} <= kinds


# -- a stall nothing explains: shown, never ended ---------------------------------------------

STUCK = """
import json, os, signal, sys, threading, time
import forksafe
if sys.argv[1:] != ["run"]:
    forksafe.install("log", hang_timeout=0.5)
pid = os.fork()
if pid == 0:
    lock = threading.Lock()
    lock.acquire()
    lock.acquire()  # stuck-line
    os._exit(0)
if sys.argv[1:] != ["run"]:
    from forksafe._statedir import stall_path
    # Until the monitor has noted the stall (6 hang timeouts on a quiet machine; a loaded
    # one may need longer), bounded.
    deadline = time.monotonic() + 30
    while not os.path.exists(stall_path(pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
time.sleep(3)
alive = os.waitpid(pid, os.WNOHANG) == (0, 0)
if sys.argv[1:] != ["run"]:
    from forksafe._guard import event_for_child
    os.kill(pid, signal.SIGKILL)  # the program's own timeout
    os.waitpid(pid, 0)
    print("FORKSAFE-RESULT:" + json.dumps({"alive": alive,
                                           "outcome": event_for_child(pid).outcome.to_dict()}))
else:
    print("FORKSAFE-RESULT:" + json.dumps({"alive": alive}))
"""


def test_an_unexplained_stall_is_left_running_and_carried_by_the_outcome(
        tmp_path: pathlib.Path) -> None:
    """A child stuck on a lock it took itself, after a clean fork: not ended (still alive
    after 6 hang timeouts); its parent ends it, and the outcome says it had stalled, with
    its stacks."""
    s = run_scenario(STUCK, tmp_path, timeout=60)
    assert s.result["alive"], "a stall nothing explains is never ended"
    outcome = s.result["outcome"]
    assert outcome["status"] == "signaled" and outcome["signal"] == "SIGKILL", outcome
    assert outcome["diagnosis"].startswith("stalled: no progress for at least 0.5 s in "
                                           f"scenario.py:{s.line_of('stuck-line')} (<module>)")
    assert "no fork-time hazard explains it" in outcome["diagnosis"]
    assert f"line {s.line_of('stuck-line')} in <module>" in outcome["traceback"]
    assert "ForkSafetyWarning" not in s.stderr  # nothing blames the fork


def test_forksafe_run_shows_a_stall_nobody_ended(tmp_path: pathlib.Path) -> None:
    """Under ``forksafe run`` the program exits and leaves the stalled child behind: the
    summary and the report show it as stalled, with its stacks."""
    script = tmp_path / "app.py"
    script.write_text(STUCK)
    proc = subprocess.run(
        [sys.executable, "-m", "forksafe", "run", "--hang-timeout", "0.5", "--report",
         str(tmp_path / "r.json"), "--", sys.executable, str(script), "run"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert '"alive": true' in proc.stdout
    assert "1 child stalled" in proc.stderr
    [fork] = json.loads((tmp_path / "r.json").read_text())["forks"]
    assert fork["outcome"]["status"] == "stalled"
    assert "no fork-time hazard explains it" in fork["outcome"]["diagnosis"]
    assert "app.py\", line" in fork["outcome"]["traceback"]
