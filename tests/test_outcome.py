"""Crash diagnosis in the parent: a dead child's signal linked to the hazards at its fork.

The reproductions are real: gRPC in use then fork, a libdispatch imitation that
traps in a forked child, a ProcessPoolExecutor whose worker dies. Each has a
safe twin where forksafe must not blame fork.
"""

from __future__ import annotations

import os
import pathlib
import signal
import time
import warnings

import pytest

from conftest import run_scenario
from forksafe import _outcome, _statedir
from forksafe._config import Config
from forksafe._diagnose import blame, diagnose_death, outcome_for
from forksafe._errors import ForkSafetyWarning
from forksafe._render.outcomes import (
    AS_ERROR,
    CALLED_FROM,
    CLEAN_FORK,
    KILLED,
    NATIVE_THREAD,
    NO_TRACEBACK,
)
from forksafe._report import CRASH_SIGNALS, ForkEvent, Hazard, Outcome, Report, Severity, Site


class FakeGuard:
    """The guard as a follower sees it (forksafe._seam.GuardLink), with its children's
    events given and the outcomes attached kept."""

    def __init__(self, events: dict[int, ForkEvent]) -> None:
        self.events = events
        self.recorded: dict[int, Outcome] = {}

    def config(self) -> Config | None:
        return None

    def event_for_child(self, pid: int) -> ForkEvent | None:
        return self.events.get(pid)

    def attach_outcome(self, pid: int, outcome: Outcome) -> None:
        self.recorded[pid] = outcome

    def flush(self) -> None:
        return None

    def emit(self, record: dict[str, object]) -> None:
        return None

    def report_path(self) -> str | None:
        return None

# -- units: the diagnosis from an event and a wait status ----------------------------

GRPC = Hazard("native-runtime", Severity.ERROR, "gRPC core is active: 6 live threads",
              "set GRPC_ENABLE_FORK_SUPPORT=1",
              {"runtime": "grpc", "active": True,
               "libraries": ["/venv/site-packages/grpc/_cython/cygrpc.so"],
               "threads": [{"tid": 7, "name": "grpc_global_tim", "named": True}]})
THREAD = Hazard("thread", Severity.WARNING, "thread 'refresher' is running", "join it",
                {"name": "refresher"})
TRACE = """Fatal Python error: Segmentation fault

Thread 0x00007f0000000001 (most recent call first):
  File "/app/other.py", line 3 in idle

Current thread 0x00007f0000000002 (most recent call first):
  File "/venv/lib/python3.11/site-packages/grpc/_channel.py", line 1152 in _blocking
  File "/app/app.py", line 31 in main
"""


def event(*hazards: Hazard, pid: int = 4242) -> ForkEvent:
    return ForkEvent(100, pid, 0.0, "multiprocessing", Site("/app/app.py", 31, "main"),
                     "warned", Report(tuple(hazards), pid=100))


def segv() -> int:
    return signal.SIGSEGV  # a raw wait status of "killed by SIGSEGV, no core" is the number


def test_crash_names_the_signal_the_frame_and_the_runtime() -> None:
    """SIGSEGV in grpc/_channel.py with gRPC active at fork: the diagnosis says all of it."""
    outcome = outcome_for(event(THREAD, GRPC), segv(), TRACE)
    assert (outcome.status, outcome.signal, outcome.exit_code) == ("signaled", "SIGSEGV", None)
    text = outcome.diagnosis or ""
    assert text.startswith(KILLED.format(pid=4242, forked="forked at /app/app.py:31 in main "
                                         "via multiprocessing", signal="SIGSEGV",
                                         where=" in grpc/_channel.py:1152 (_blocking)"))
    assert "gRPC core is active" in text and "'grpc_global_tim'" in text
    assert "fix: set GRPC_ENABLE_FORK_SUPPORT=1" in text
    assert "refresher" not in text, "a thread is not blamed when a runtime explains the crash"
    assert outcome.traceback == TRACE


def test_crash_inside_the_standard_library_names_the_callers_line() -> None:
    """A crash in ctypes (stdlib) also names the user's line that called into it."""
    stdlib = os.path.dirname(os.__file__)
    trace = (f'Current thread 0x1 (most recent call first):\n'
             f'  File "{stdlib}/ctypes/__init__.py", line 519 in string_at\n'
             f'  File "/app/app.py", line 12 in main\n')
    text = diagnose_death(event(THREAD), "SIGSEGV", trace)
    assert " in ctypes/__init__.py:519 (string_at)" + CALLED_FROM.format(
        frame="/app/app.py:12 (main)") in text


def test_crash_in_a_native_thread_says_so() -> None:
    """No "Current thread" in the dump: the signal hit a thread that runs no Python code."""
    trace = TRACE.replace("Current thread 0x00007f0000000002", "Thread 0x00007f0000000002")
    trace = trace.replace("Thread 0x00007f0000000001 (most recent call first):\n"
                          '  File "/app/other.py", line 3 in idle\n\n', "")
    text = diagnose_death(event(GRPC), "SIGSEGV", trace)
    assert NATIVE_THREAD.format(frame="grpc/_channel.py:1152 (_blocking)") in text


def test_runtime_mentioned_in_the_traceback_ranks_first() -> None:
    """Of two active runtimes, the one whose code is in the traceback is blamed first."""
    omp = Hazard("native-runtime", Severity.ERROR, "GNU OpenMP is active", "spawn",
                 {"runtime": "gnu-openmp", "libraries": ["/lib/libgomp.so.1"]})
    ranked, typical = blame([omp, GRPC], TRACE.lower())
    assert ranked[0] is GRPC and typical


def test_thread_only_hazard_is_named_as_a_possible_cause() -> None:
    """With only other threads at fork, they are named, marked as a possible cause."""
    text = diagnose_death(event(THREAD), "SIGABRT", None)
    assert "a possible cause" in text and "refresher" in text


def test_clean_fork_is_not_blamed() -> None:
    """Safe twin: a crash after a clean fork says the fork was clean."""
    info = Hazard("native-runtime", Severity.INFO, "OpenBLAS is loaded", "nothing", {})
    text = diagnose_death(event(info), "SIGSEGV", TRACE)
    assert text.endswith(CLEAN_FORK)
    assert "OpenBLAS" not in text


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGINT, signal.SIGHUP])
def test_a_child_stopped_by_its_parent_gets_no_diagnosis(sig: int) -> None:
    """Safe twin: SIGTERM/SIGKILL/SIGINT/SIGHUP are how parents stop children, not crashes."""
    outcome = outcome_for(event(GRPC), sig, None)
    assert outcome == Outcome("signaled", None, signal.Signals(sig).name, None, None)


def test_crash_signal_lists_agree() -> None:
    """The summary's idea of a crash is the diagnosis's idea of a crash: one list."""
    for name in CRASH_SIGNALS:
        assert Outcome("signaled", signal=name).crashed
    assert not Outcome("signaled", signal="SIGTERM").crashed


def test_exit_codes_and_hung_markers() -> None:
    """Exits keep their code; a hang marker turns a SIGKILL into a 'hung' outcome."""
    assert outcome_for(event(GRPC), 3 << 8, None) == Outcome("exited", 3)
    hung = Outcome("hung", diagnosis="child 4242 made no progress")
    result = outcome_for(event(GRPC), signal.SIGKILL, None, hung)
    assert (result.status, result.signal) == ("hung", "SIGKILL")
    assert result.diagnosis == "child 4242 made no progress (then ended by SIGKILL)"


def test_on_reaped_records_warns_at_the_caller_and_removes_the_crash_file(
        tmp_path: pathlib.Path) -> None:
    """on_reaped reads and removes the crash file, records the outcome, warns at our line."""
    (tmp_path / "4242.crash").write_text(TRACE)
    guard = FakeGuard({4242: event(GRPC)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _outcome.on_reaped(4242, segv(), link=guard, directory=str(tmp_path))  # here
    assert guard.recorded[4242].signal == "SIGSEGV"
    assert not (tmp_path / "4242.crash").exists()
    [w] = caught
    assert w.category is ForkSafetyWarning
    assert w.filename == __file__, "the warning points at the line that reaped the child"


def test_stopping_signals_are_recorded_but_not_warned(tmp_path: pathlib.Path) -> None:
    """Safe twin: SIGTERM/SIGKILL (Pool.terminate, OOM) are outcomes, not warnings."""
    guard = FakeGuard({4242: event(GRPC)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for sig in (signal.SIGTERM, signal.SIGKILL):
            _outcome.on_reaped(4242, sig, link=guard, directory=str(tmp_path))
            assert guard.recorded[4242].signal == signal.Signals(sig).name


def test_unknown_child_is_ignored(tmp_path: pathlib.Path) -> None:
    """A pid the guard did not fork is none of our business."""
    guard = FakeGuard({})
    _outcome.on_reaped(1, segv(), link=guard, directory=str(tmp_path))
    assert guard.recorded == {}


# -- real reproductions ------------------------------------------------------------

HEAD_TEMPLATE = """
import json, os, sys, time, warnings
import forksafe
from forksafe._guard import event_for_child, history
forksafe.install({policy!r})
def result(**kw):
    print("FORKSAFE-RESULT:" + json.dumps(kw), flush=True)
def outcome(pid):
    e = event_for_child(pid)
    return e.outcome.to_dict() if e is not None and e.outcome is not None else None
"""
HEAD = HEAD_TEMPLATE.replace("{policy!r}", repr("warn"))

GRPC_SERVER = """
import grpc
from concurrent import futures
server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
channel = grpc.insecure_channel(f"127.0.0.1:{port}")
grpc.channel_ready_future(channel).result(timeout=20)
"""


def test_grpc_child_segfault_is_diagnosed_as_grpc(tmp_path: pathlib.Path) -> None:
    """gRPC in use, fork, the child makes an RPC: SIGSEGV, and the diagnosis names gRPC.

    The crash is real but not certain: about every second such child crashes here
    (grpcio 1.85), the others get an RPC error. So up to 20 children try, each
    with a SIGALRM deadline, and the first crash is examined.
    """
    pytest.importorskip("grpc")
    s = run_scenario(HEAD + GRPC_SERVER + """
import signal
seen = []
for attempt in range(20):
    pid = os.fork()  # fork-line
    if pid == 0:
        signal.alarm(5)
        try:
            channel.unary_unary("/x.Y/Z")(b"", timeout=3)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)  # reap-line
    seen.append(outcome(pid))
    if seen[-1]["status"] == "signaled" and seen[-1]["signal"] == "SIGSEGV":
        break
result(outcome=seen[-1], seen=[o["signal"] for o in seen])
""", tmp_path, timeout=120, env={"GRPC_ENABLE_FORK_SUPPORT": ""})
    o = s.result["outcome"]
    if o["status"] == "exited" and not any(s.result["seen"]):
        import grpc

        pytest.skip(f"grpcio {grpc.__version__} let 20 forked children survive their RPC "
                    "(the crash reproduces with grpcio 1.85.3 on Python 3.11 on this machine)")
    assert (o["status"], o["signal"]) == ("signaled", "SIGSEGV"), (s.result, s.stderr[-2000:])
    assert "gRPC" in o["diagnosis"] and "fork support is off" in o["diagnosis"]
    assert f"forked at scenario.py:{s.line_of('fork-line')}" in o["diagnosis"]
    # Most crashes are in the child's first RPC; some happen in gRPC's own at-fork
    # handler, before any Python code runs in the child, which the diagnosis says.
    if o["traceback"] is None:
        assert NO_TRACEBACK in o["diagnosis"]
    else:
        # Usually the main thread's stack is inside grpc/; when a thread gRPC restarted in
        # the child crashes instead, faulthandler still lists gRPC's extension module.
        assert "grpc" in o["traceback"], "the child's traceback shows gRPC"
    assert "GRPC_ENABLE_FORK_SUPPORT=1" in o["diagnosis"]
    assert f"scenario.py:{s.line_of('reap-line')}: ForkSafetyWarning: child" in s.stderr


def test_grpc_imported_but_idle_is_not_blamed(tmp_path: pathlib.Path) -> None:
    """Safe twin: gRPC imported, nothing started: children are fine, a crash is not gRPC's.

    (A child forked while gRPC *is* active may die even if it never touches gRPC: gRPC's
    own at-fork handler sometimes crashes it. That is a true positive, not a twin.)
    """
    pytest.importorskip("grpc")
    s = run_scenario(HEAD + """
import ctypes
import grpc
fine = os.fork()
if fine == 0:
    os._exit(0)
os.waitpid(fine, 0)
crash = os.fork()
if crash == 0:
    ctypes.string_at(0)
os.waitpid(crash, 0)
result(fine=outcome(fine), crash=outcome(crash))
""", tmp_path, timeout=90, env={"GRPC_ENABLE_FORK_SUPPORT": ""})
    assert s.result["fine"] == {"status": "exited", "exit_code": 0, "signal": None,
                                "traceback": None, "diagnosis": None}
    assert s.result["crash"]["signal"] == "SIGSEGV"
    assert CLEAN_FORK in s.result["crash"]["diagnosis"]
    assert "gRPC" not in s.result["crash"]["diagnosis"]


DISPATCH = """
import ctypes
lib = ctypes.CDLL({path!r})
lib.fake_dispatch_start()
time.sleep(0.05)
"""


@pytest.mark.parametrize(("use", "signame"), [("fake_dispatch_use", "SIGILL"),
                                               ("fake_dispatch_use_trap", "SIGTRAP")])
def test_libdispatch_trap_names_the_library_and_its_thread(
        tmp_path: pathlib.Path, native_dir: pathlib.Path, use: str, signame: str) -> None:
    """The libdispatch imitation traps in the child: the diagnosis names it and its thread."""
    s = run_scenario(HEAD + DISPATCH.format(path=str(native_dir / "libdispatch.so")) + f"""
pid = os.fork()
if pid == 0:
    lib.{use}()  # use-line
    os._exit(0)
os.waitpid(pid, 0)
result(outcome=outcome(pid), threads=sorted(os.listdir("/proc/self/task")), pid=os.getpid())
""", tmp_path)
    o = s.result["outcome"]
    assert (o["status"], o["signal"]) == ("signaled", signame)
    assert "libdispatch" in o["diagnosis"] and "libdispatch.so" in o["diagnosis"]
    assert "fakedispatch-wk" in o["diagnosis"], "the library's worker thread is named"
    assert f"scenario.py:{s.line_of('use-line')}" in o["diagnosis"]


def test_libdispatch_loaded_but_idle_child_runs_fine(tmp_path: pathlib.Path,
                                                     native_dir: pathlib.Path) -> None:
    """Safe twin: the library loaded but never started: the child uses it and exits 0."""
    s = run_scenario(HEAD + f"""
import ctypes
lib = ctypes.CDLL({str(native_dir / "libdispatch.so")!r})
pid = os.fork()
if pid == 0:
    lib.fake_dispatch_use()
    os._exit(0)
os.waitpid(pid, 0)
result(outcome=outcome(pid))
""", tmp_path)
    assert s.result["outcome"]["status"] == "exited"
    assert "ForkSafetyWarning: child" not in s.stderr


def test_log_policy_records_the_crash_without_a_warning(tmp_path: pathlib.Path,
                                                        native_dir: pathlib.Path) -> None:
    """Under "log" the outcome is recorded with its diagnosis, and nothing is printed."""
    head = HEAD_TEMPLATE.replace("{policy!r}", repr("log"))
    s = run_scenario(head + DISPATCH.format(path=str(native_dir / "libdispatch.so")) + """
pid = os.fork()
if pid == 0:
    lib.fake_dispatch_use()
    os._exit(0)
os.waitpid(pid, 0)
result(outcome=outcome(pid))
""", tmp_path)
    assert s.result["outcome"]["signal"] == "SIGILL"
    assert "libdispatch" in s.result["outcome"]["diagnosis"]
    assert "ForkSafetyWarning: child" not in s.stderr


def test_multiprocessing_exitcode_comes_with_a_diagnosis(tmp_path: pathlib.Path,
                                                         native_dir: pathlib.Path) -> None:
    """A fork-context Process that dies: exitcode -4, and the outcome says why."""
    s = run_scenario(HEAD + DISPATCH.format(path=str(native_dir / "libdispatch.so")) + """
import multiprocessing
if __name__ == "__main__":
    p = multiprocessing.get_context("fork").Process(target=lib.fake_dispatch_use)
    p.start()  # start-line
    p.join()
    result(exitcode=p.exitcode, outcome=outcome(p.pid))
""", tmp_path)
    assert s.result["exitcode"] == -4
    o = s.result["outcome"]
    assert o["signal"] == "SIGILL" and "via multiprocessing" in o["diagnosis"]
    assert "libdispatch" in o["diagnosis"]


FAULTHANDLER = HEAD + """
import ctypes, faulthandler
if {enabled}:
    faulthandler.enable()
pid = os.fork()
if pid == 0:
    ctypes.string_at(0)  # crash-line
os.waitpid(pid, 0)
result(outcome=outcome(pid))
"""


def test_a_programs_own_faulthandler_still_shows_the_childs_traceback(
        tmp_path: pathlib.Path) -> None:
    """The program turned faulthandler on: the child's traceback still reaches stderr."""
    s = run_scenario(FAULTHANDLER.format(enabled=True), tmp_path)
    assert s.result["outcome"]["signal"] == "SIGSEGV"
    assert "Fatal Python error: Segmentation fault" in s.stderr
    assert f'scenario.py", line {s.line_of("crash-line")}' in s.stderr


def test_no_traceback_is_printed_for_a_program_without_faulthandler(
        tmp_path: pathlib.Path) -> None:
    """Safe twin: faulthandler off, the traceback stays in the report (one warning only)."""
    s = run_scenario(FAULTHANDLER.format(enabled=False), tmp_path)
    assert s.result["outcome"]["signal"] == "SIGSEGV"
    assert "Fatal Python error" not in s.stderr
    assert "ForkSafetyWarning: child" in s.stderr


def test_crash_warning_made_an_error_does_not_cost_the_wait_status(
        tmp_path: pathlib.Path) -> None:
    """With ForkSafetyWarning turned into an error, os.waitpid still returns the status."""
    s = run_scenario(HEAD + """
import ctypes
warnings.simplefilter("error", forksafe.ForkSafetyWarning)
pid = os.fork()
if pid == 0:
    ctypes.string_at(0)
got = os.waitpid(pid, 0)
result(got=list(got), outcome=outcome(pid))
""", tmp_path)
    assert s.result["got"] == [s.result["got"][0], signal.SIGSEGV]
    assert s.result["outcome"]["signal"] == "SIGSEGV"
    assert AS_ERROR.split("{")[0] in s.stderr and CLEAN_FORK in s.stderr
    assert "failed" not in s.stderr, "not reported as a failure of forksafe"


def test_clean_fork_crash_is_reported_without_blaming_fork(tmp_path: pathlib.Path) -> None:
    """Safe twin: a child that segfaults after a clean fork is reported as such."""
    s = run_scenario(HEAD + """
import ctypes
pid = os.fork()
if pid == 0:
    ctypes.string_at(0)
os.waitpid(pid, 0)
result(outcome=outcome(pid))
""", tmp_path)
    o = s.result["outcome"]
    assert o["signal"] == "SIGSEGV"
    assert CLEAN_FORK in o["diagnosis"]


PPE = HEAD + DISPATCH + """
import concurrent.futures as cf, multiprocessing
def task(n):
    if {crash}:
        lib.fake_dispatch_use()
    return n * 2
if __name__ == "__main__":
    with cf.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as ex:
        future = ex.submit(task, 21)  # submit-line
        try:
            value = future.result(timeout=30)
        except Exception as exc:
            value = type(exc).__name__
    time.sleep(0.2)
    result(value=value, outcomes=[e.outcome.to_dict() for e in history() if e.outcome])
"""


def test_broken_process_pool_is_explained(tmp_path: pathlib.Path, native_dir: pathlib.Path) -> None:
    """A fork-context ProcessPoolExecutor worker dies: BrokenProcessPool, explained at submit."""
    s = run_scenario(PPE.format(path=str(native_dir / "libdispatch.so"), crash=True), tmp_path)
    assert s.result["value"] == "BrokenProcessPool"
    crashed = [o for o in s.result["outcomes"] if o["signal"] == "SIGILL"]
    assert len(crashed) == 1, s.result["outcomes"]
    assert "via concurrent.futures" in crashed[0]["diagnosis"]
    assert "libdispatch" in crashed[0]["diagnosis"]
    assert f"scenario.py:{s.line_of('submit-line')}: ForkSafetyWarning" in s.stderr, s.stderr


def test_healthy_process_pool_has_no_diagnosis(tmp_path: pathlib.Path,
                                               native_dir: pathlib.Path) -> None:
    """Safe twin: the same pool whose workers do not touch the library works, no warning."""
    s = run_scenario(PPE.format(path=str(native_dir / "libdispatch.so"), crash=False), tmp_path)
    assert s.result["value"] == 42
    assert all(o["signal"] in (None, "SIGTERM") for o in s.result["outcomes"])
    assert "ForkSafetyWarning: child" not in s.stderr


def test_crash_signals_cover_the_issue_list() -> None:
    """The signals that count as crashes include SIGTRAP, which faulthandler does not handle."""
    assert {"SIGSEGV", "SIGBUS", "SIGILL", "SIGFPE", "SIGABRT", "SIGTRAP"} <= CRASH_SIGNALS
    assert os.WIFSIGNALED(segv())


def test_sweep_removes_only_empty_files_of_vanished_processes(tmp_path: pathlib.Path) -> None:
    """Empty crash files of dead pids go; a live pid's file and a fresh traceback stay."""
    dead = 2**22 + 4321  # above the default pid_max: never a live process
    (tmp_path / f"{dead}.crash").write_text("")
    (tmp_path / f"{dead + 1}.crash").write_text(TRACE)
    (tmp_path / f"{dead + 2}.hung").write_text("{}")
    (tmp_path / f"{os.getpid()}.crash").write_text("")
    (tmp_path / f"{dead}-3.spare").write_text("")  # its parent died before naming it
    (tmp_path / f"{os.getpid()}-4.spare").write_text("")  # ours: about to be named
    (tmp_path / "notes.txt").write_text("")
    assert _statedir.sweep(str(tmp_path)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{dead + 1}.crash", f"{dead + 2}.hung", f"{os.getpid()}.crash",
         f"{os.getpid()}-4.spare", "notes.txt"])


def test_sweep_removes_stale_evidence_nobody_collected(tmp_path: pathlib.Path) -> None:
    """A dead pid's traceback or hang marker older than STALE_AFTER goes; a live pid's stays."""
    dead = 2**22 + 4321
    for name in (f"{dead}.crash", f"{dead}.hung", f"{dead}.hung.tmp", f"{os.getpid()}.crash"):
        (tmp_path / name).write_text(TRACE)
    later = time.time() + _statedir.STALE_AFTER + 1
    assert _statedir.sweep(str(tmp_path), now=later) == 3
    assert [p.name for p in tmp_path.iterdir()] == [f"{os.getpid()}.crash"]


def test_nothing_is_left_in_the_state_dir_after_a_normal_exit(tmp_path: pathlib.Path) -> None:
    """Children reaped by subprocess, exec'd, or by a pool: no crash file survives the program."""
    state = tmp_path / "state"
    run_scenario(HEAD + """
import multiprocessing, subprocess
with multiprocessing.get_context("fork").Pool(2) as pool:
    pool.map(abs, range(4))
subprocess.run(["true"], preexec_fn=lambda: None)
pid = os.fork()
if pid == 0:
    os.execv("/bin/true", ["true"])
time.sleep(0.2)  # exec'd and exited, never reaped by the program
""", tmp_path, env={"FORKSAFE_STATE_DIR": str(state)})
    assert list(state.iterdir()) == []
