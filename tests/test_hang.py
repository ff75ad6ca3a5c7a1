"""Hang diagnosis: a child stuck in a wait its fork explains is reported; a busy one is not.

Real hangs, each in a child interpreter with a hard timeout: a Python lock held by
another thread at fork time, a GNU OpenMP pool, a C mutex taken while holding the
GIL, a subprocess preexec_fn. Each has a safe twin: the same program where the
child computes, waits on something unrelated, or finds the lock free.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import run_scenario
from forksafe._hang import HangMonitor, sample
from forksafe._render.outcomes import LOCK_LINK
from forksafe._report import ForkEvent, Report

LOCKED = """
import json, os, threading, time
import forksafe
from forksafe._guard import event_for_child
forksafe.observe()  # install() does this too; explicit, so origins never depend on order
forksafe.install("warn", hang_timeout=0.5)
cache_lock = threading.Lock()
def refresh():
    while True:
        with cache_lock:  # taken-line
            time.sleep(30)
threading.Thread(target=refresh, name="cache-refresher", daemon=True).start()  # start-line
time.sleep(0.1)
pid = os.fork()
if pid == 0:
    {child}
    os._exit(0)
_, status = os.waitpid(pid, 0)
e = event_for_child(pid)
print("FORKSAFE-RESULT:" + json.dumps({{"outcome": e.outcome.to_dict(), "status": status}}))
"""


def test_child_blocked_on_a_lock_held_at_fork_is_reported(tmp_path: pathlib.Path) -> None:
    """The diagnosis names the thread that held the lock, where it took it, and the child's line."""
    s = run_scenario(LOCKED.format(child="with cache_lock:  # child-line\n        pass"),
                     tmp_path, timeout=30)
    o = s.result["outcome"]
    assert o["status"] == "hung" and o["signal"] == "SIGKILL", o
    assert LOCK_LINK.format(
        lock="cache_lock", where=f"scenario.py:{s.line_of('child-line')} (<module>)",
        holder="cache-refresher", started=f" (started at scenario.py:{s.line_of('start-line')})",
        taken=f"scenario.py:{s.line_of('taken-line')}") in o["diagnosis"]
    assert f'line {s.line_of("child-line")} in <module>' in o["traceback"]
    assert "futex" in o["traceback"], "the native state of the stuck thread is shown"
    assert "ForkSafetyWarning: child" in s.stderr


def test_busy_child_is_not_reported(tmp_path: pathlib.Path) -> None:
    """Safe twin: a child that computes for 4 hang timeouts is left alone and exits 0.

    It spins on a line that names the lock held at fork time (try-acquire in a
    loop), so a stack dump would explain it as a lock hang: only the progress
    check (it keeps being scheduled) stands between it and a false report.
    """
    s = run_scenario(LOCKED.format(
        child="end = time.monotonic() + 2.0\n"
              "    while time.monotonic() < end and not cache_lock.acquire(False): pass"),
        tmp_path, timeout=30)
    assert s.result["outcome"]["status"] == "exited", s.result
    assert s.result["status"] == 0


def test_child_idle_in_an_unrelated_wait_is_not_reported(tmp_path: pathlib.Path) -> None:
    """Safe twin: a child parked in one sleep (no progress at all) that fork does not explain."""
    s = run_scenario(LOCKED.format(child="time.sleep(2.0)"), tmp_path, timeout=30)
    assert s.result["outcome"]["status"] == "exited", s.result
    assert "ForkSafetyWarning: child" not in s.stderr


@pytest.mark.parametrize(("wait", "most"), [("threading.Event().wait(3.0)", 4),
                                            ("time.sleep(3.0)", 2)])
def test_an_idle_child_is_not_signalled_again_and_again(tmp_path: pathlib.Path, wait: str,
                                                        most: int) -> None:
    """Safe twin: an idle child waiting in futex gets one stack-dump signal, not one per hang
    timeout (the wake-up our signal causes is not progress); one asleep gets none."""
    s = run_scenario(LOCKED.format(
        child="ticks = lambda: int(open('/proc/self/schedstat').read().split()[2])\n"
              f"    before = ticks()\n    {wait}\n"
              "    os._exit(min(ticks() - before, 100))"), tmp_path, timeout=30)
    assert s.result["outcome"]["status"] == "exited", s.result
    # Waiting without signals it is scheduled once (to wake), twice if preempted once
    # awake on a busy machine; each dump adds one or two, one per hang timeout (6 here)
    # would add six or more.
    assert s.result["outcome"]["exit_code"] <= most, s.result


GIL_MUTEX = """
import ctypes, json, os, time
import forksafe
from forksafe._guard import event_for_child
forksafe.install("log", hang_timeout=0.5)
lib = ctypes.PyDLL({path!r})  # PyDLL: calls keep holding the GIL
lib.native_mutex_hold.argtypes = [ctypes.c_double]
lib.native_mutex_wait_held.argtypes = [ctypes.c_double]
lib.native_mutex_hold({hold})
lib.native_mutex_wait_held(5.0)
{settle}
pid = os.fork()
if pid == 0:
    lib.native_mutex_take()  # take-line
    os._exit(0)
_, status = os.waitpid(pid, 0)
e = event_for_child(pid)
print("FORKSAFE-RESULT:" + json.dumps({{"outcome": e.outcome.to_dict()}}))
"""


def test_child_stuck_in_c_holding_the_gil_is_reported(tmp_path: pathlib.Path,
                                                      native_dir: pathlib.Path) -> None:
    """Blocked in a C mutex with the GIL held: stacks read from outside name the library."""
    s = run_scenario(GIL_MUTEX.format(path=str(native_dir / "libnative_mutex.so"), hold=30.0,
                                      settle=""), tmp_path, timeout=30)
    o = s.result["outcome"]
    assert o["status"] == "hung", o
    assert "inside libnative_mutex.so" in o["diagnosis"]
    assert "'mutex-holder'" in o["diagnosis"]
    assert f'line {s.line_of("take-line")} in <module>' in o["traceback"], \
        "faulthandler's C handler dumps the Python stack although the GIL is held"


def test_a_stopped_child_is_not_ended(tmp_path: pathlib.Path, native_dir: pathlib.Path) -> None:
    """Safe twin: a child held stopped (SIGSTOP, a debugger) is not killed as hung while
    stopped; once continued, its real hang is reported."""
    s = run_scenario(GIL_MUTEX.format(path=str(native_dir / "libnative_mutex.so"), hold=30.0,
                                      settle="").replace("""
_, status = os.waitpid(pid, 0)
""", """
import signal
time.sleep(0.1)
os.kill(pid, signal.SIGSTOP)
time.sleep(2.5)  # five hang timeouts
stopped_alive = os.waitpid(pid, os.WNOHANG)[0] == 0
os.kill(pid, signal.SIGCONT)
_, status = os.waitpid(pid, 0)
print("FORKSAFE-RESULT:" + json.dumps({"stopped_alive": stopped_alive,
                                       "outcome": event_for_child(pid).outcome.to_dict()}))
raise SystemExit(0)
"""), tmp_path, timeout=30)
    assert s.result["stopped_alive"], "not killed while stopped"
    assert s.result["outcome"]["status"] == "hung", "reported once it runs (and is stuck) again"


def test_mutex_released_before_fork_is_not_a_hang(tmp_path: pathlib.Path,
                                                  native_dir: pathlib.Path) -> None:
    """Safe twin: the holder let go before the fork; the child takes the mutex and exits."""
    s = run_scenario(GIL_MUTEX.format(path=str(native_dir / "libnative_mutex.so"), hold=0.05,
                                      settle="lib.native_mutex_take()  # until released"),
                     tmp_path, timeout=30)
    assert s.result["outcome"]["status"] == "exited", s.result


def forksafe_run(tmp_path: pathlib.Path, script: str, *args: str, timeout: float = 60,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "app.py").write_text(script)
    full = dict(os.environ, OMP_NUM_THREADS="2", **(env or {}))
    return subprocess.run([sys.executable, "-m", "forksafe", "run", *args, "--",
                           sys.executable, "app.py"], cwd=tmp_path, env=full,
                          capture_output=True, text=True, timeout=timeout)


def hang_reported(summary: str) -> bool:
    """Whether a run's stderr reports a hung child (the summary's head, or a live notice)."""
    return "made no progress" in summary or re.search(r"\d+ child(ren)? hung", summary) is not None


OMP = """
import ctypes, os
lib = ctypes.CDLL({path!r})
{before}
pid = os.fork()
if pid == 0:
    lib.omp_pool_run(100000)
    os._exit(0)
os.waitpid(pid, 0)
"""


def test_openmp_hang_is_reported_by_forksafe_run(tmp_path: pathlib.Path,
                                                 native_dir: pathlib.Path) -> None:
    """An active GNU OpenMP pool, fork, a parallel region in the child: hang naming OpenMP."""
    proc = forksafe_run(tmp_path, OMP.format(path=str(native_dir / "libomp_pool.so"),
                                             before="lib.omp_pool_run(100000)"),
                        "--policy", "log", "--hang-timeout", "0.5",
                        "--report", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr
    [fork] = json.loads((tmp_path / "r.json").read_text())["forks"]
    assert fork["outcome"]["status"] == "hung"
    assert "GNU OpenMP (libgomp)" in fork["outcome"]["diagnosis"]
    assert "inside libgomp" in fork["outcome"]["diagnosis"]
    assert "1 child hung" in proc.stderr


def test_openmp_before_the_pool_starts_is_fine(tmp_path: pathlib.Path,
                                               native_dir: pathlib.Path) -> None:
    """Safe twin: forked before the first parallel region, the child's region completes."""
    proc = forksafe_run(tmp_path, OMP.format(path=str(native_dir / "libomp_pool.so"),
                                             before=""),
                        "--policy", "log", "--hang-timeout", "0.5")
    assert proc.returncode == 0, proc.stderr
    assert not hang_reported(proc.stderr), proc.stderr


PREEXEC = """
import os, subprocess, threading, time
env_lock = threading.Lock()
def hold():
    with env_lock:
        time.sleep({hold})
threading.Thread(target=hold, name="env-writer", daemon=True).start()
time.sleep(0.2)
def prepare():
    with env_lock:  # preexec-line
        pass
subprocess.run(["true"], preexec_fn=prepare)
"""


def test_preexec_fn_blocked_on_a_lock_is_reported(tmp_path: pathlib.Path) -> None:
    """subprocess's preexec_fn waits for a lock another thread holds: reported as a hang."""
    forksafe_run(tmp_path, PREEXEC.format(hold=30), "--policy", "log",
                        "--hang-timeout", "0.5", "--report", str(tmp_path / "r.json"))
    [fork] = json.loads((tmp_path / "r.json").read_text())["forks"]
    assert fork["mechanism"] == "subprocess-preexec_fn"
    assert fork["outcome"]["status"] == "hung", fork
    assert "blocked taking `env_lock` at app.py:10 (prepare)" in fork["outcome"]["diagnosis"]
    assert "'env-writer'" in fork["outcome"]["diagnosis"]


def test_preexec_fn_with_a_free_lock_is_fine(tmp_path: pathlib.Path) -> None:
    """Safe twin: the lock is free by the time of the fork; no hang, exit 0."""
    proc = forksafe_run(tmp_path, PREEXEC.format(hold=0.01), "--policy", "log",
                        "--hang-timeout", "0.5")
    assert proc.returncode == 0
    assert not hang_reported(proc.stderr), proc.stderr


def test_preexec_fn_hang_is_reported_without_forksafe_run(tmp_path: pathlib.Path) -> None:
    """install(hang_timeout=...) alone: the first fork of the program is a preexec_fn child
    that hangs; the helper, started before that fork, reports and ends it."""
    s = run_scenario("""
import json, forksafe
forksafe.install("log", hang_timeout=0.5)
""" + PREEXEC.format(hold=30).replace(
        'subprocess.run(["true"], preexec_fn=prepare)',
        'r = subprocess.run(["true"], preexec_fn=prepare)\n'
        'print("FORKSAFE-RESULT:" + json.dumps({"rc": r.returncode}))'), tmp_path, timeout=30)
    assert s.result == {"rc": -9}, s.stderr
    assert "blocked taking `env_lock` at scenario.py:" in s.stderr
    assert "'env-writer'" in s.stderr and "[ended with SIGKILL]" in s.stderr


def test_monitor_drops_children_that_are_gone() -> None:
    """A pid that does not exist is never watched, and sampling it says so."""
    monitor = HangMonitor(1.0, on_hung=lambda e, o: None, directory="/nonexistent")
    gone = ForkEvent(1, 2**22 + 12345, 0.0, "os.fork", None, "logged", Report())
    monitor.add(gone)
    assert len(monitor) == 0
    assert sample(2**22 + 12345, None) is None


def test_hang_helper_is_not_a_child_of_the_program(tmp_path: pathlib.Path) -> None:
    """A program reaping all its children with os.wait() finds only its own, then stops."""
    s = run_scenario("""
import json, os, threading, time, forksafe
forksafe.install("log", hang_timeout=0.5)
lock = threading.Lock()
threading.Thread(target=lambda: lock.acquire() or time.sleep(30), daemon=True).start()
time.sleep(0.1)
pid = os.fork()
if pid == 0:
    time.sleep(0.2)
    os._exit(0)
reaped = []
while True:
    try:
        reaped.append(os.wait()[0])
    except ChildProcessError:
        break
print("FORKSAFE-RESULT:" + json.dumps({"ok": reaped == [pid]}))
""", tmp_path, timeout=30)
    assert s.result == {"ok": True}


def test_hang_watching_adds_no_thread_to_the_program(tmp_path: pathlib.Path) -> None:
    """install(hang_timeout=...) watches from another process: no thread is added here."""
    s = run_scenario("""
import json, os, time, forksafe
forksafe.install("log", hang_timeout=0.5)
before = sorted(os.listdir("/proc/self/task"))
pid = os.fork()
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
time.sleep(0.2)
after = sorted(os.listdir("/proc/self/task"))
again = forksafe.check()
print("FORKSAFE-RESULT:" + json.dumps({"same": before == after,
                                       "hazards": [h.kind for h in again.hazards]}))
""", tmp_path, timeout=30)
    assert s.result == {"same": True, "hazards": []}


FIND_HELPER = """
import json, os, signal, time, forksafe
from forksafe import _hang
from forksafe._report import ForkEvent, Hazard, Report, Severity
forksafe.install("log", hang_timeout=0.5)
def helper():
    mark = f"--parent\\0{os.getpid()}\\0".encode()
    for _ in range(500):
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if b"forksafe._helper" in cmdline and mark in cmdline:
                return int(entry)
        time.sleep(0.02)
    raise AssertionError("no hang helper")
def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in "ZX"
    except OSError:
        return False
"""


def test_hang_helper_ends_with_its_program_and_ignores_ctrl_c(tmp_path: pathlib.Path) -> None:
    """Ctrl-C does not kill the helper (no traceback); it ends with the program although
    long-lived children hold its socket open."""
    s = run_scenario(FIND_HELPER + """
children = []
for _ in range(2):
    pid = os.fork()
    if pid == 0:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        time.sleep(30)
        os._exit(0)
    children.append(pid)
h = helper()
os.kill(h, signal.SIGINT)
time.sleep(0.3)
print("FORKSAFE-RESULT:" + json.dumps({"helper": h, "after_sigint": alive(h),
                                       "children": children}), flush=True)
""", tmp_path, timeout=30)
    helper, children = s.result["helper"], s.result["children"]
    try:
        assert s.result["after_sigint"], "SIGINT is for the program, not for the helper"
        assert "KeyboardInterrupt" not in s.stderr
        deadline = time.monotonic() + 20
        while _alive(helper) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(helper), "the helper outlived its program"
    finally:
        for pid in [*children, helper]:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_a_stalled_or_dead_helper_never_blocks_nor_kills_the_program(
        tmp_path: pathlib.Path) -> None:
    """Events to a helper that stopped reading are dropped, not waited for; a dead helper
    costs no SIGPIPE even where the program restored SIGPIPE's default action."""
    s = run_scenario(FIND_HELPER + """
pid = os.fork()
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
h = helper()
os.kill(h, signal.SIGSTOP)
big = Hazard("thread", Severity.WARNING, "x", "y", {"blob": "z" * 100_000})
event = ForkEvent(os.getpid(), 4242, 0.0, "os.fork", None, "logged", Report((big,)))
from forksafe import _outcome
client = _outcome._client  # the helper client the guard started
assert client is not None
for _ in range(40):  # 4 MB: far more than a socket buffer
    client.watch(event)
dropped = client.dropped
os.kill(h, signal.SIGKILL)
time.sleep(0.2)
signal.signal(signal.SIGPIPE, signal.SIG_DFL)
for _ in range(3):
    client.watch(event)
print("FORKSAFE-RESULT:" + json.dumps({"dropped": dropped, "broken": client.broken}))
""", tmp_path, timeout=30)
    assert s.result["dropped"] > 0, s.result
    assert s.result["broken"], "a dead helper is noticed and left alone"


def test_no_dump_is_asked_of_a_child_that_closed_its_crash_file(tmp_path: pathlib.Path) -> None:
    """Safe twin: a child that closed its crash file (and reused the number for its own
    data) is not sent the dump signal, which would write stacks into that data."""
    data = tmp_path / "data.txt"
    s = run_scenario(f"""
import json, os, time
from forksafe import _child, _hang
state = {str(tmp_path / "state")!r}
os.environ["FORKSAFE_STATE_DIR"] = state
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    _child.arm(os.getppid(), 0.5)
    fd = _child.armed()[0]
    os.close(fd)
    mine = os.open({str(data)!r}, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(mine, fd)  # the program's data file now has the crash file's number
    os.write(w, b"x")
    time.sleep(30)
    os._exit(0)
os.read(r, 1)
dump = _hang.request_dump(pid, directory=state, wait=0.3)
os.kill(pid, 9)
os.waitpid(pid, 0)
print("FORKSAFE-RESULT:" + json.dumps({{"dump": dump}}))
""", tmp_path, timeout=30)
    assert s.result == {"dump": ""}
    assert data.read_text() == "", "nothing was written into the program's file"


def test_the_helper_is_started_only_with_a_python_interpreter() -> None:
    """An embedded interpreter's sys.executable (uWSGI's binary) is never run as the helper."""
    from forksafe._interpreter import interpreter_problem

    assert interpreter_problem(sys.executable) is None
    assert interpreter_problem("/usr/bin/uwsgi") is not None
    assert interpreter_problem("") is not None


def test_an_embedded_interpreter_never_starts_a_second_server(tmp_path: pathlib.Path) -> None:
    """Safe twin: with sys.executable naming a server binary, forks go on, nothing is run."""
    server = tmp_path / "uwsgi"
    server.write_text(f"#!/bin/sh\ntouch {tmp_path / 'started'}\n")
    server.chmod(0o755)
    s = run_scenario(f"""
import json, os, sys, forksafe
sys.executable = {str(server)!r}
forksafe.install("log", hang_timeout=0.5)
pid = os.fork()
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
print("FORKSAFE-RESULT:" + json.dumps({{"ok": True}}))
""", tmp_path, timeout=30)
    assert s.result == {"ok": True}
    assert not (tmp_path / "started").exists(), "the server binary was not started"
