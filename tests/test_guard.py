"""The guard: every fork mechanism is seen, warned at the user's line, refused, recorded.

Each scenario runs in its own interpreter (``run_scenario``): it forks, starts
threads and loads native runtimes, none of which may happen in the test runner.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from typing import Any

import pytest

from conftest import MARK, run_scenario
from forksafe import _config, _forkpath, _guard, _reaping, _record

# Shared by every scenario: record warnings, and print the guard's view as JSON.
PRELUDE = f"""
import json, os, sys, threading, time, warnings
import forksafe
from forksafe import _forkpath, _guard
warnings.simplefilter("always")
_seen = []
_show = warnings.showwarning
def _record(message, category, filename, lineno, file=None, line=None):
    _seen.append({{"category": category.__name__, "file": filename, "line": lineno,
                  "text": str(message)}})
warnings.showwarning = _record

def no_children():
    '''True when this process has no child at all (none created, none left).'''
    try:
        os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        pass
    else:
        return False
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{{tid}}/children") as f:
            if f.read().split():
                return False
    return True

def hold_lock():
    '''A real thread holding a real lock: a warning-level hazard.'''
    lock, ready, stop = threading.Lock(), threading.Event(), threading.Event()
    def body():
        with lock:
            ready.set()
            stop.wait()
    t = threading.Thread(target=body, name="lock-holder", daemon=True)
    t.start()
    ready.wait()
    return stop

def out(**extra):
    data = {{"warnings": _seen, "events": [e.to_dict() for e in _guard.history()]}}
    data.update(extra)
    print({MARK!r} + json.dumps(data), flush=True)
"""

OMP = """
import ctypes
omp = ctypes.CDLL({lib!r})
omp.omp_pool_run(2)  # an active GNU OpenMP pool: an error-level hazard
"""

# One snippet per mechanism; the line marked FORK is the user's line.
MECHANISMS: dict[str, tuple[str, str]] = {
    "os.fork": ("os.fork", """
pid = os.fork()  # FORK
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
"""),
    "os.forkpty": ("os.forkpty", """
pid, fd = os.forkpty()  # FORK
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
os.close(fd)
"""),
    "pty.fork": ("pty.fork", """
import pty
pid, fd = pty.fork()  # FORK
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
os.close(fd)
"""),
    "Process": ("multiprocessing", """
import multiprocessing
ctx = multiprocessing.get_context("fork")
p = ctx.Process(target=int)
p.start()  # FORK
p.join()
"""),
    "Pool": ("multiprocessing.Pool", """
import multiprocessing
ctx = multiprocessing.get_context("fork")
pool = ctx.Pool(1)  # FORK
pool.apply(int)
pool.terminate()
pool.join()
"""),
    "ProcessPoolExecutor": ("concurrent.futures", """
import concurrent.futures, multiprocessing
ex = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"))
future = ex.submit(int)  # FORK
future.result()
ex.shutdown()
"""),
    "subprocess-preexec_fn": ("subprocess-preexec_fn", """
import subprocess
subprocess.run(["true"], preexec_fn=os.getpid, check=True)  # FORK
"""),
}


def _indent(code: str) -> str:
    return "\n".join("    " + line for line in code.strip("\n").splitlines())


@pytest.mark.parametrize("name", list(MECHANISMS))
def test_hazardous_fork_is_warned_at_the_users_line(name: str, tmp_path: pathlib.Path) -> None:
    """Each mechanism, with a thread holding a lock, gives one warning at the user's line."""
    mechanism, snippet = MECHANISMS[name]
    code = PRELUDE + f"""
if __name__ == "__main__":
    stop = hold_lock()
    forksafe.install("warn")
{_indent(snippet)}
    stop.set()
    out()
"""
    s = run_scenario(code, tmp_path, timeout=60)
    line = s.line_of("FORK")
    ours = [w for w in s.result["warnings"] if w["category"] == "ForkSafetyWarning"]
    events = s.result["events"]
    assert [e["mechanism"] for e in events] == [mechanism]
    event = events[0]
    assert event["action"] == "warned"
    assert event["site"]["line"] == line
    assert event["site"]["file"] == str(s.path)
    assert isinstance(event["child_pid"], int) and event["child_pid"] > 0
    assert any(h["kind"] == "thread" and h["evidence"]["name"] == "lock-holder"
               for h in event["hazards"])
    assert [(w["file"], w["line"]) for w in ours] == [(str(s.path), line)]
    assert "lock-holder" in ours[0]["text"]
    if name == "subprocess-preexec_fn":
        assert any(h["kind"] == "preexec-fn" for h in event["hazards"])


@pytest.mark.parametrize("name", list(MECHANISMS))
def test_clean_fork_is_quiet(name: str, tmp_path: pathlib.Path) -> None:
    """The safe twin: with no hazard, the same fork is recorded as allowed and not warned."""
    mechanism, snippet = MECHANISMS[name]
    code = PRELUDE + f"""
if __name__ == "__main__":
    forksafe.install("raise", fail_on="warning")
{_indent(snippet)}
    out()
"""
    s = run_scenario(code, tmp_path, timeout=60)
    assert [w for w in s.result["warnings"] if w["category"] == "ForkSafetyWarning"] == []
    events = s.result["events"]
    assert [(e["mechanism"], e["action"]) for e in events] == [(mechanism, "allowed")]
    assert not any(h["kind"] == "preexec-fn" for h in events[0]["hazards"])


@pytest.mark.parametrize("name", list(MECHANISMS))
def test_raise_refuses_before_any_child_exists(
    name: str, tmp_path: pathlib.Path, native_dir: pathlib.Path
) -> None:
    """Under 'raise', an error-level hazard raises ForkSafetyError and no child is created."""
    mechanism, snippet = MECHANISMS[name]
    omp = OMP.format(lib=str(native_dir / "libomp_pool.so"))
    code = PRELUDE + f"""
if __name__ == "__main__":
{_indent(omp)}
    forksafe.install("raise")
    try:
{_indent(_indent(snippet))}
    except forksafe.ForkSafetyError as exc:
        out(refused=str(exc), kinds=[h.kind for h in exc.report.hazards],
            no_children=no_children())
    else:
        out(refused=None)
"""
    s = run_scenario(code, tmp_path, timeout=60)
    assert s.result["refused"], s.stderr
    assert "no child was created" in s.result["refused"]
    assert "native-runtime" in s.result["kinds"]
    assert s.result["no_children"] is True
    events = s.result["events"]
    assert [(e["mechanism"], e["action"], e["child_pid"]) for e in events] == [
        (mechanism, "refused", None)]
    assert events[0]["site"]["line"] == s.line_of("FORK")


def test_raise_only_warns_below_the_threshold(tmp_path: pathlib.Path) -> None:
    """Under 'raise' a warning-level hazard (a thread) is warned and the fork goes on."""
    code = PRELUDE + """
stop = hold_lock()
forksafe.install("raise")
pid = os.fork()  # FORK
if pid == 0:
    os._exit(7)
_, status = os.waitpid(pid, 0)
stop.set()
out(code=os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode")
    else status >> 8)
"""
    s = run_scenario(code, tmp_path)
    assert s.result["code"] == 7
    assert [e["action"] for e in s.result["events"]] == ["warned"]
    assert [w["line"] for w in s.result["warnings"]
            if w["category"] == "ForkSafetyWarning"] == [s.line_of("FORK")]


def test_raise_with_fail_on_warning_refuses_a_thread_hazard(tmp_path: pathlib.Path) -> None:
    """fail_on='warning' moves the refusal threshold down to warning-level hazards."""
    code = PRELUDE + """
stop = hold_lock()
forksafe.install("raise", fail_on="warning")
try:
    os.fork()  # FORK
except forksafe.ForkSafetyError as exc:
    out(refused=True, worst=str(exc.report.max_severity), no_children=no_children())
"""
    s = run_scenario(code, tmp_path)
    assert s.result["refused"] is True
    assert s.result["worst"] == "warning"
    assert s.result["no_children"] is True


def test_log_policy_records_without_warning(tmp_path: pathlib.Path) -> None:
    """Under 'log' a hazardous fork is recorded as logged and nothing is shown."""
    code = PRELUDE + """
stop = hold_lock()
forksafe.install("log")
pid = os.fork()
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
stop.set()
out()
"""
    s = run_scenario(code, tmp_path)
    assert [w for w in s.result["warnings"] if w["category"] == "ForkSafetyWarning"] == []
    assert [e["action"] for e in s.result["events"]] == ["logged"]


SAFE = {
    "subprocess": """
import subprocess
subprocess.run(["true"], check=True)
""",
    "posix_spawn": """
pid = os.posix_spawn("/bin/true", ["true"], dict(os.environ))
os.waitpid(pid, 0)
""",
    "spawn": """
import multiprocessing
p = multiprocessing.get_context("spawn").Process(target=int)
p.start()
p.join()
""",
    "forkserver": """
import multiprocessing
p = multiprocessing.get_context("forkserver").Process(target=int)
p.start()
p.join()
""",
}


@pytest.mark.parametrize("name", list(SAFE))
def test_safe_mechanisms_produce_no_report(name: str, tmp_path: pathlib.Path) -> None:
    """subprocess without preexec_fn, posix_spawn, spawn and forkserver are never reported."""
    code = PRELUDE + f"""
if __name__ == "__main__":
    stop = hold_lock()
    forksafe.install("raise", fail_on="warning")
{_indent(SAFE[name])}
    stop.set()
    out()
"""
    s = run_scenario(code, tmp_path, timeout=60)
    assert s.result["events"] == []
    assert [w for w in s.result["warnings"] if w["category"] == "ForkSafetyWarning"] == []


C_FORK = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
api = ctypes.pythonapi

def c_fork():
    '''What a C extension does: PyOS_BeforeFork, fork(), then the after hooks.'''
    api.PyOS_BeforeFork()  # FORK
    pid = libc.fork()
    if pid == 0:
        api.PyOS_AfterFork_Child()
        os._exit(5)
    api.PyOS_AfterFork_Parent()
    return pid
"""


@pytest.mark.parametrize("policy", ["warn", "raise"])
def test_c_level_fork_is_seen_through_register_at_fork(
    policy: str, tmp_path: pathlib.Path
) -> None:
    """A fork made by C code through PyOS_BeforeFork is warned (never refused), with its pid."""
    code = PRELUDE + C_FORK + f"""
stop = hold_lock()
forksafe.install({policy!r}, fail_on="warning")
pid = c_fork()
_, status = os.waitpid(pid, 0)
stop.set()
out(pid=pid, code=status >> 8)
"""
    s = run_scenario(code, tmp_path)
    assert s.result["code"] == 5
    events = s.result["events"]
    assert [(e["mechanism"], e["action"], e["child_pid"]) for e in events] == [
        ("unwrapped-fork", "warned", s.result["pid"])]
    ours = [w for w in s.result["warnings"] if w["category"] == "ForkSafetyWarning"]
    assert [(w["file"], w["line"]) for w in ours] == [(str(s.path), s.line_of("FORK"))]
    assert ("cannot be refused" in ours[0]["text"]) == (policy == "raise")


def test_fork_bound_before_install_is_still_seen(tmp_path: pathlib.Path) -> None:
    """`from os import fork` done before install() bypasses the wrapper but is still warned."""
    code = PRELUDE + """
from os import fork
stop = hold_lock()
forksafe.install("warn")
pid = fork()  # FORK
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
stop.set()
out(pid=pid)
"""
    s = run_scenario(code, tmp_path)
    events = s.result["events"]
    assert [(e["mechanism"], e["child_pid"]) for e in events] == [
        ("unwrapped-fork", s.result["pid"])]
    assert events[0]["site"]["line"] == s.line_of("FORK")
    ours = [w for w in s.result["warnings"] if w["category"] == "ForkSafetyWarning"]
    assert [w["line"] for w in ours] == [s.line_of("FORK")]


def test_a_child_of_a_wrapped_fork_still_sees_its_own_unwrapped_fork(
    tmp_path: pathlib.Path,
) -> None:
    """The child inherits the wrapper's "inside a fork" mark as it was; it is not its own.

    (The mark holds the forking process's pid, so that the child need not
    write to it.) A fork the child then makes around the wrapper is judged
    and recorded in the child.
    """
    code = PRELUDE + """
from os import fork as unwrapped
forksafe.install("log")
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    grandchild = unwrapped()  # GRANDCHILD
    if grandchild == 0:
        os._exit(0)
    os.waitpid(grandchild, 0)
    mine = [(e.mechanism, e.child_pid == grandchild) for e in _guard.history()]
    os.write(w, json.dumps(mine).encode())
    os._exit(0)
os.close(w)
os.waitpid(pid, 0)
out(child=json.loads(os.read(r, 4096)))
"""
    s = run_scenario(code, tmp_path)
    assert s.result["child"] == [["unwrapped-fork", True]]
    assert [e["mechanism"] for e in s.result["events"]] == ["os.fork"]


def test_wrapped_fork_is_not_counted_twice_by_the_hooks(tmp_path: pathlib.Path) -> None:
    """A fork through the wrapper runs the at-fork hooks too, yet gives one event and one arm.

    Its child is armed by C calls the parent prepared (``_child_calls``): no
    Python ``arm()`` runs there ("P"), and yet faulthandler points at its file.
    """
    code = PRELUDE + """
import faulthandler
import forksafe._child
forksafe.install("log")
marks = os.pipe()
real_arm = forksafe._child.arm
def arm(*args):
    os.write(marks[1], b"P")
    real_arm(*args)
forksafe._child.arm = arm
for _ in range(3):
    pid = os.fork()
    if pid == 0:
        armed = forksafe._child.armed() is not None and faulthandler.is_enabled()
        os.write(marks[1], b"A" if armed else b"-")
        os._exit(0)
    os.waitpid(pid, 0)
os.close(marks[1])
out(arms=os.read(marks[0], 100).decode())
"""
    s = run_scenario(code, tmp_path)
    assert s.result["arms"] == "AAA"
    assert len(s.result["events"]) == 3


def test_fork_event_records_every_field(tmp_path: pathlib.Path) -> None:
    """A fork event holds parent and child pid, time, mechanism, site, hazards and action."""
    code = PRELUDE + """
stop = hold_lock()
forksafe.install("log")
before = time.time()
pid = os.fork()  # FORK
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
stop.set()
event = _guard.history()[0]
out(pid=pid, me=os.getpid(), before=before, time=event.time,
    thread=event.report.thread, child=_guard.event_for_child(pid) is event)
"""
    s = run_scenario(code, tmp_path)
    event = s.result["events"][0]
    assert event["parent_pid"] == s.result["me"]
    assert event["child_pid"] == s.result["pid"]
    assert s.result["before"] <= s.result["time"] <= s.result["before"] + 5
    assert event["mechanism"] == "os.fork"
    assert event["site"] == {"file": str(s.path), "line": s.line_of("FORK"),
                             "function": "<module>"}
    assert event["action"] == "logged"
    assert event["thread"] == "MainThread"
    assert [h["kind"] for h in event["hazards"]] == ["thread"]
    assert s.result["child"] is True


def test_report_file_gets_one_json_line_per_event(tmp_path: pathlib.Path) -> None:
    """Forks, refusals and outcomes are appended as JSON lines with the command line."""
    report = tmp_path / "events.jsonl"
    code = PRELUDE + f"""
from forksafe import Outcome
import forksafe._outcome
forksafe._outcome.on_forked = forksafe._outcome.on_reaped = lambda *args: None
stop = hold_lock()
forksafe.install("raise", fail_on="warning", report={str(report)!r})
try:
    os.fork()
except forksafe.ForkSafetyError:
    pass
forksafe.install("log", report={str(report)!r})
pid = os.fork()
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
_guard.set_outcome(pid, Outcome("exited", exit_code=0))
_guard.emit({{"type": "note", "n": 1}})
stop.set()
out(pid=pid, outcome=_guard.history()[-1].outcome.status,
    mapped=_guard.event_for_child(pid).outcome.status)
"""
    s = run_scenario(code, tmp_path)
    lines = [json.loads(line) for line in report.read_text().splitlines()]
    assert [(r["type"], r.get("action"), r.get("child_pid")) for r in lines] == [
        ("fork", "refused", None), ("fork", "logged", s.result["pid"]),
        ("outcome", None, s.result["pid"]), ("note", None, None)]
    assert lines[0]["command"] == [str(s.path)]
    assert lines[1]["mechanism"] == "os.fork"
    assert lines[2]["outcome"]["status"] == "exited"
    assert s.result["outcome"] == s.result["mapped"] == "exited"


def test_uninstall_restores_everything_by_identity(tmp_path: pathlib.Path) -> None:
    """install twice, then uninstall: os.fork and friends are the very same objects again."""
    code = PRELUDE + """
import subprocess, warnings as w
names = ["fork", "forkpty", "waitpid", "wait", "wait3", "wait4"]
before = {n: getattr(os, n) for n in names}
execute = subprocess.Popen._execute_child
start = threading.Thread.start
filters = list(w.filters)
forksafe.install("warn")
forksafe.install("raise")
wrapped_once = os.fork.__wrapped__ is before["fork"]
changed = [n for n in names if getattr(os, n) is before[n]]
forksafe.uninstall()
forksafe.uninstall()
same = [n for n in names if getattr(os, n) is before[n]]
with forksafe.guard("log"):
    inside = os.fork is not before["fork"]
    forksafe.install("warn")
after_guard = os.fork is before["fork"]
forksafe.install("log")
with forksafe.guard("raise"):
    nested = _guard.installed().policy
restored = _guard.installed().policy
forksafe.uninstall()
out(wrapped_once=wrapped_once, changed=changed, same=same, names=names,
    execute=subprocess.Popen._execute_child is execute, start=threading.Thread.start is start,
    filters=list(w.filters) == filters, inside=inside, after_guard=after_guard,
    nested=nested, restored=restored)
"""
    s = run_scenario(code, tmp_path)
    r = s.result
    assert r["wrapped_once"] is True
    assert r["changed"] == []
    assert r["same"] == r["names"]
    assert r["execute"] is True
    assert r["start"] is True
    assert r["filters"] is True
    assert r["inside"] is True
    assert r["after_guard"] is True
    assert (r["nested"], r["restored"]) == ("raise", "log")


def test_uninstall_leaves_a_later_wrapper_in_place(tmp_path: pathlib.Path) -> None:
    """If another library wrapped our wrapper, uninstall keeps theirs and ours passes through."""
    code = PRELUDE + """
stop = hold_lock()
forksafe.install("warn")
ours = os.fork
def theirs():
    return ours()
os.fork = theirs
forksafe.uninstall()
pid = os.fork()
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
stop.set()
out(kept=os.fork is theirs)
"""
    s = run_scenario(code, tmp_path)
    assert s.result["kept"] is True
    assert s.result["events"] == []
    assert [w for w in s.result["warnings"] if w["category"] == "ForkSafetyWarning"] == []


def test_a_failing_probe_is_reported_once_and_forks_go_on(tmp_path: pathlib.Path) -> None:
    """A probe that raises yields one warning naming it; every fork still happens."""
    code = PRELUDE + """
import forksafe._check as check_module
real = check_module.probes
def broken(snapshot):
    raise KeyError("boom")
check_module.probes = lambda: real() + [("broken", broken)]
forksafe.install("warn")
codes = []
for _ in range(3):
    pid = os.fork()
    if pid == 0:
        os._exit(4)
    codes.append(os.waitpid(pid, 0)[1] >> 8)
out(codes=codes)
"""
    s = run_scenario(code, tmp_path)
    assert s.result["codes"] == [4, 4, 4]
    ours = [w["text"] for w in s.result["warnings"] if w["category"] == "ForkSafetyWarning"]
    assert len(ours) == 1
    assert "'broken' probe failed" in ours[0]
    assert [e["action"] for e in s.result["events"]] == ["allowed"] * 3


def test_a_failing_check_or_follower_never_stops_a_fork(tmp_path: pathlib.Path) -> None:
    """check(), on_forked and arm raising: forks go on, each failure is said once."""
    code = PRELUDE + """
import forksafe._check, forksafe._child, forksafe._outcome
def fail(*args, **kwargs):
    raise RuntimeError("broken on purpose")
forksafe._check.check = forksafe._check.fork_check = fail
forksafe._outcome.on_forked = fail
forksafe._child.arm = fail
forksafe._child.memory_armer = lambda crash: None  # so that every child runs arm()
forksafe.install("raise")
codes = []
for _ in range(2):
    pid = os.fork()
    if pid == 0:
        os._exit(6)
    codes.append(os.waitpid(pid, 0)[1] >> 8)
out(codes=codes)
"""
    s = run_scenario(code, tmp_path)
    assert s.result["codes"] == [6, 6]
    texts = [w["text"] for w in s.result["warnings"] if w["category"] == "ForkSafetyWarning"]
    assert len(texts) == 2
    assert any("fork-time check failed" in t for t in texts)
    assert any("on_forked failed" in t for t in texts)
    assert s.stderr.count("forksafe._child.arm failed") == 2  # once in each child


def test_own_lock_is_reset_in_the_child(tmp_path: pathlib.Path) -> None:
    """A child forked while another thread holds the guard's lock can still use the guard."""
    code = PRELUDE + """
forksafe.install("log")
held, release = threading.Event(), threading.Event()
def hog():
    with _forkpath.own_state().lock:
        held.set()
        release.wait()
t = threading.Thread(target=hog)
t.start()
held.wait()
threading.Timer(0.3, release.set).start()  # the parent records the fork once released
pid = os.fork()
if pid == 0:
    # In the child: the guard's history and a nested fork both need the lock.
    _guard.history()
    grandchild = os.fork()
    if grandchild == 0:
        os._exit(0)
    os.waitpid(grandchild, 0)
    os._exit(9 if len(_guard.history()) == 1 else 1)
deadline = time.time() + 10
while time.time() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        break
    time.sleep(0.02)
else:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    status = -1
t.join()
out(status=status)
"""
    s = run_scenario(code, tmp_path, timeout=30)
    assert s.result["status"] == 9 << 8


def test_history_and_child_map_stay_bounded(tmp_path: pathlib.Path) -> None:
    """After more forks than the bounds, only the newest events are kept."""
    forks = _record.HISTORY_SIZE + 100
    code = PRELUDE + f"""
forksafe.install("log")
pids = []
for _ in range({forks}):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    pids.append(pid)
h = _guard.history()
print({MARK!r} + json.dumps({{"n": len(h), "children": len(_forkpath.own_state().children),
      "last": h[-1].child_pid == pids[-1], "first": h[0].child_pid == pids[100],
      "oldest_gone": _guard.event_for_child(pids[0]) is None}}))
"""
    s = run_scenario(code, tmp_path, timeout=120)
    assert s.result == {"n": _record.HISTORY_SIZE, "children": _record.CHILDREN_SIZE,
                        "last": True, "first": True, "oldest_gone": True}


def test_forks_recorded_after_the_fork_are_complete_and_in_order(tmp_path: pathlib.Path) -> None:
    """Forks queued until the child is gone are all recorded, in order, waited for or not."""
    code = PRELUDE + f"""
forksafe.install("log")
pids = []
for _ in range(3):
    pid = os.fork()
    if pid == 0:
        time.sleep(0.2)
        os._exit(0)
    pids.append(pid)
# No wait yet: the events are queued, and asking for them records them.
h = [e.child_pid for e in _guard.history()]
pid = os.fork()
if pid == 0:
    os._exit(0)
by_pid = _guard.event_for_child(pid) is not None
pids.append(pid)
for pid in pids:
    os.waitpid(pid, 0)
print({MARK!r} + json.dumps({{"queued_by_pid": by_pid, "order": h == pids[:3],
      "after_wait": [e.child_pid for e in _guard.history()] == pids}}))
"""
    s = run_scenario(code, tmp_path, timeout=60)
    assert s.result == {"queued_by_pid": True, "order": True, "after_wait": True}


def test_reaping_calls_the_follower_for_guarded_children_only(tmp_path: pathlib.Path) -> None:
    """os.waitpid/wait/wait3/wait4/waitid and Process.join report guarded children's exits."""
    code = PRELUDE + """
import multiprocessing, subprocess
import forksafe._outcome
reaped, forked = [], []
forksafe._outcome.on_reaped = lambda pid, status, **_: reaped.append((pid, status >> 8))
forksafe._outcome.on_forked = lambda event, timeout: forked.append(event.child_pid)
forksafe.install("log", hang_timeout=2.5)
pids = []
for i, reap in enumerate([lambda p: os.waitpid(p, 0), lambda p: os.wait(),
                          lambda p: os.wait3(0), lambda p: os.wait4(p, 0)]):
    pid = os.fork()
    if pid == 0:
        os._exit(10 + i)
    reap(pid)
    pids.append(pid)
if hasattr(os, "waitid"):
    pid = os.fork()
    if pid == 0:
        os._exit(14)
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # a peek reaps nothing
    os.waitid(os.P_PID, pid, os.WEXITED)
    pids.append(pid)
p = multiprocessing.get_context("fork").Process(target=sys.exit, args=(20,))
p.start()
p.join()
pids.append(p.pid)
subprocess.run(["true"])  # not guarded: not reported
out(reaped=reaped, forked=forked, pids=pids)
"""
    s = run_scenario(code, tmp_path)
    pids = s.result["pids"]
    assert s.result["forked"] == pids
    assert s.result["reaped"] == [[pids[0], 10], [pids[1], 11], [pids[2], 12], [pids[3], 13],
                                  [pids[4], 14], [pids[5], 20]]


def test_parent_pid_and_hang_timeout_reach_the_child(tmp_path: pathlib.Path) -> None:
    """arm() gets the parent's pid and the configured hang timeout, in the child."""
    code = PRELUDE + """
import forksafe._child
r, w = os.pipe()
def arm(parent, timeout, spare=None):
    os.write(w, json.dumps([parent, timeout]).encode())
forksafe._child.arm = arm
forksafe.install("log", hang_timeout=1.5)
pid = os.fork()
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
os.close(w)
out(armed=json.loads(os.read(r, 100)), me=os.getpid())
"""
    s = run_scenario(code, tmp_path)
    assert s.result["armed"] == [s.result["me"], 1.5]


@pytest.mark.skipif(sys.version_info < (3, 12), reason="CPython warns about fork since 3.12")
def test_cpythons_generic_warning_is_dropped_only_for_forks_forksafe_reported(
    tmp_path: pathlib.Path,
) -> None:
    """After a ForkSafetyWarning, CPython's DeprecationWarning for that fork is not repeated."""
    code = PRELUDE + """
def fork_once():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
stop = hold_lock()
forksafe.install("warn")
fork_once()
warned = [w["category"] for w in _seen]
_seen.clear()
forksafe.install("log")
fork_once()
logged = [w["category"] for w in _seen]
_seen.clear()
forksafe.uninstall()
fork_once()
stop.set()
out(warned=warned, logged=logged, bare=[w["category"] for w in _seen])
"""
    s = run_scenario(code, tmp_path)
    assert s.result["warned"] == ["ForkSafetyWarning"]
    assert s.result["logged"] == ["DeprecationWarning"]
    assert s.result["bare"] == ["DeprecationWarning"]


def test_bad_arguments_are_one_clear_error() -> None:
    """install() rejects a bad policy, level or timeout with a message naming the choices."""
    with pytest.raises(ValueError, match="expected one of: log, warn, raise"):
        _config.Config.make("loud", "error", None, None)
    with pytest.raises(ValueError, match="expected one of: warning, error"):
        _config.Config.make("warn", "info", None, None)
    with pytest.raises(ValueError, match="not a finite positive number"):
        _config.Config.make("warn", "error", -1.0, None)
    assert _guard.installed() is None  # nothing was installed in the test runner


def test_env_messages_name_the_variable() -> None:
    """The hook's error texts name the environment variable and the accepted values."""
    config, [problem] = _config.from_environment({"FORKSAFE_POLICY": "x"})
    assert config is None
    assert "FORKSAFE_POLICY" in problem
    assert "log, warn, raise, off" in problem


def _lines(path: pathlib.Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_modules_imported_after_install_are_still_guarded(tmp_path: pathlib.Path) -> None:
    """threading and subprocess imported after install(): origins known, preexec_fn refused."""
    code = f"""
import json, os, sys
import forksafe
from forksafe import _guard
forksafe.install("warn")
early = sorted(m for m in ("threading", "subprocess") if m in sys.modules)
forksafe.install("raise", fail_on="warning")
import threading
stop = threading.Event()
worker = threading.Thread(target=stop.wait, name="late-thread")
worker.start()  # STARTED
import subprocess
try:
    subprocess.run(["true"], preexec_fn=os.getpid)  # FORK
    refused = None
except forksafe.ForkSafetyError as exc:
    refused = [h.to_dict() for h in exc.report.hazards]
stop.set()
worker.join()
print({MARK!r} + json.dumps({{"early": early, "refused": refused,
      "events": [e.mechanism for e in _guard.history()]}}))
"""
    s = run_scenario(code, tmp_path)
    assert s.result["early"] == []
    assert s.result["events"] == ["subprocess-preexec_fn"]
    thread = [h for h in s.result["refused"] if h["kind"] == "thread"]
    assert f"started at scenario.py:{s.line_of('STARTED')}" in thread[0]["summary"]
    assert any(h["kind"] == "preexec-fn" for h in s.result["refused"])


def test_an_unusable_report_file_fails_install_cleanly(tmp_path: pathlib.Path) -> None:
    """install(report=<bad path>) raises OSError and leaves nothing patched."""
    code = f"""
import json, os
import forksafe
from forksafe import _guard
fork = os.fork
try:
    forksafe.install("warn", report="/nonexistent/dir/events.jsonl")
except OSError as exc:
    error = type(exc).__name__
forksafe.install("warn")
once = os.fork.__wrapped__ is fork
forksafe.uninstall()
print({MARK!r} + json.dumps({{"error": error, "once": once, "same": os.fork is fork,
                             "installed": _guard.installed() is not None}}))
"""
    s = run_scenario(code, tmp_path)
    assert s.result == {"error": "FileNotFoundError", "once": True, "same": True,
                        "installed": False}


def test_a_guarded_fork_leaves_no_garbage_cycle(tmp_path: pathlib.Path) -> None:
    """The fork-time check leaves no reference cycle (it kept thread objects alive)."""
    code = PRELUDE + """
import gc
stop = hold_lock()
forksafe.install("log")
def fork():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
fork()
gc.collect()
gc.disable()
fork()
out(garbage=gc.collect())
stop.set()
"""
    s = run_scenario(code, tmp_path)
    assert s.result["garbage"] == 0


@pytest.mark.parametrize("mechanism", ["os.fork()", "subprocess.Popen(['true'], preexec_fn=int)"])
def test_fork_at_interpreter_shutdown_behaves_as_without_the_guard(
    mechanism: str, tmp_path: pathlib.Path
) -> None:
    """At finalization the guard stands aside: the program gets CPython's own answer."""
    results = []
    for install in ("", "forksafe.install('warn')"):
        code = f"""
import os, subprocess, sys
import forksafe
{install}
class AtFinalization:
    def __del__(self):
        try:
            pid = {mechanism}
            outcome = "forked"
            if pid == 0:
                os._exit(0)
        except BaseException as exc:
            outcome = type(exc).__name__ + ": " + str(exc)
        sys.stdout.write("OUTCOME " + outcome + "\\n")
keep = AtFinalization()
"""
        path = tmp_path / f"shutdown{len(results)}.py"
        path.write_text(code)
        proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                              timeout=60)
        results.append((proc.stdout, proc.stderr))
    assert results[0] == results[1]


def test_raise_turns_sqlite_protection_on_and_off_only_if_it_did(tmp_path: pathlib.Path) -> None:
    """Policy raise protects SQLite; uninstall undoes that, but not the user's own choice."""
    code = f"""
import json
import forksafe
from forksafe._remedies import sqlite as remedy
forksafe.install("raise")
on = remedy.protecting()
forksafe.install("warn")
off_with_policy = remedy.protecting()
forksafe.install("raise")
forksafe.uninstall()
off = remedy.protecting()
forksafe.protect_sqlite()
forksafe.install("raise")
forksafe.uninstall()
kept = remedy.protecting()
print({MARK!r} + json.dumps([on, off_with_policy, off, kept]))
"""
    s = run_scenario(code, tmp_path)
    assert s.result == [True, False, False, True]


def test_modules_imported_before_install_are_guarded_too(tmp_path: pathlib.Path) -> None:
    """threading and subprocess imported before install(): origins known, preexec_fn refused."""
    code = f"""
import json, os, subprocess, sys, threading
import forksafe
from forksafe import _guard
execute = subprocess.Popen._execute_child
forksafe.install("raise", fail_on="warning")
wrapped = subprocess.Popen._execute_child is not execute
stop = threading.Event()
worker = threading.Thread(target=stop.wait, name="early-thread")
worker.start()  # STARTED
try:
    subprocess.run(["true"], preexec_fn=os.getpid)
    refused = None
except forksafe.ForkSafetyError as exc:
    refused = [h.to_dict() for h in exc.report.hazards]
stop.set()
worker.join()
forksafe.uninstall()
print({MARK!r} + json.dumps({{"wrapped": wrapped, "refused": refused,
      "restored": subprocess.Popen._execute_child is execute}}))
"""
    s = run_scenario(code, tmp_path)
    assert s.result["wrapped"] is True
    assert s.result["restored"] is True
    thread = [h for h in s.result["refused"] if h["kind"] == "thread"]
    assert f"started at scenario.py:{s.line_of('STARTED')}" in thread[0]["summary"]


def test_repeated_forks_from_one_line_follow_every_change(tmp_path: pathlib.Path) -> None:
    """The guard's reused verdict follows the policy, the threads, and the forking line."""
    code = PRELUDE + """
def fork_here():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
def fork_there():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
stop = threading.Event()
forksafe.install("log")
fork_here(); fork_here()
t = threading.Thread(target=stop.wait, name="idle"); t.start(); time.sleep(0.05)
fork_here(); fork_here()
forksafe.install("warn")
fork_here(); fork_here()
fork_there()
stop.set(); t.join()
while len(os.listdir("/proc/self/task")) > 1:
    time.sleep(0.01)
fork_here()
events = forksafe._guard.history()
out(actions=[e.action for e in events], lines=[e.site.line for e in events],
    kinds=[[h.kind for h in e.report.hazards] for e in events],
    shared=events[0].report is events[1].report and events[0].site is events[1].site)
"""
    s = run_scenario(code, tmp_path)
    r = s.result
    assert r["actions"] == ["allowed", "allowed", "logged", "logged", "warned", "warned",
                            "warned", "allowed"]
    assert r["kinds"][2:7] == [["thread"]] * 5 and r["kinds"][7] == []
    assert len(set(r["lines"][:6])) == 1 and r["lines"][6] != r["lines"][5]
    assert r["shared"], "an unchanged process reuses the report and the site"
    texts = [w["text"] for w in r["warnings"] if w["category"] == "ForkSafetyWarning"]
    assert len(texts) == 3 and all("'idle'" in t for t in texts)


def test_waitid_answers_become_the_wait_status_they_stand_for() -> None:
    """A waitid result is turned into the status os.waitpid would have given."""
    import os
    import signal

    exited = _reaping.wait_status(os.CLD_EXITED, 3)
    killed = _reaping.wait_status(os.CLD_KILLED, signal.SIGSEGV)
    dumped = _reaping.wait_status(os.CLD_DUMPED, signal.SIGABRT)
    assert exited is not None and os.WIFEXITED(exited) and os.WEXITSTATUS(exited) == 3
    assert killed is not None and os.WIFSIGNALED(killed)
    assert os.WTERMSIG(killed) == signal.SIGSEGV and not os.WCOREDUMP(killed)
    assert dumped is not None and os.WTERMSIG(dumped) == signal.SIGABRT and os.WCOREDUMP(dumped)
    assert _reaping.wait_status(os.CLD_STOPPED, signal.SIGSTOP) is None


def test_outcomes_reach_the_history_and_survive_the_child_map_bound(
    tmp_path: pathlib.Path,
) -> None:
    """A reaped child's outcome is in history() and event_for_child(), also after the
    bounded child map forgot its pid."""
    code = PRELUDE + """
forksafe.install("log")
import forksafe._record
forksafe._record.CHILDREN_SIZE = 2
pids = []
for code in range(5):
    pid = os.fork()
    if pid == 0:
        os._exit(30 + code)
    os.waitpid(pid, 0)
    pids.append(pid)
last = _guard.event_for_child(pids[-1])
out(codes=[e.outcome.exit_code if e.outcome else None for e in _guard.history()],
    last=last.outcome.exit_code, forgotten=_guard.event_for_child(pids[0]) is None)
"""
    s = run_scenario(code, tmp_path)
    assert s.result["codes"] == [30, 31, 32, 33, 34]
    assert s.result["last"] == 34
    assert s.result["forgotten"] is True


def test_exited_children_are_recorded_in_batches_yet_none_is_lost(tmp_path: pathlib.Path) -> None:
    """Forks and reaps of children that exited are queued and recorded by the batch: the
    queue stays bounded, and every fork reaches the history with its exit code."""
    code = PRELUDE + """
forksafe.install("log")
longest, codes = 0, {}
for n in range(3 * _forkpath.QUEUE_SIZE // 2 + 2):  # not a whole number of batches
    pid = os.fork()
    if pid == 0:
        os._exit(n % 7)
    os.waitpid(pid, 0)
    codes[pid] = n % 7
    longest = max(longest, len(_forkpath.own_state().queue))
queued = len(_forkpath.own_state().queue)
recorded = {e.child_pid: e.outcome.exit_code for e in _guard.history()}
out(longest=longest, queued=queued, same=recorded == codes, left=len(_forkpath.own_state().queue))
"""
    s = run_scenario(code, tmp_path)
    assert 0 < s.result["longest"] <= _forkpath.QUEUE_SIZE
    assert s.result["queued"] > 0, "recorded by the batch, not one by one"
    assert s.result["same"] and s.result["left"] == 0


def test_a_crashed_child_is_reported_when_it_is_reaped_not_batched(
    tmp_path: pathlib.Path,
) -> None:
    """A child killed by a signal is no batch item: its warning comes from its own wait."""
    code = PRELUDE + """
import ctypes
forksafe.install("warn")
for _ in range(3):  # a few clean children queued first
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
pid = os.fork()
if pid == 0:
    ctypes.string_at(0)
os.waitpid(pid, 0)
at_wait = [w["text"] for w in _seen if w["category"] == "ForkSafetyWarning"]
out(at_wait=at_wait, queued=len(_forkpath.own_state().queue), pid=pid)
"""
    s = run_scenario(code, tmp_path)
    assert len(s.result["at_wait"]) == 1 and "SIGSEGV" in s.result["at_wait"][0]
    assert s.result["queued"] == 0, "the queue before it was recorded first, in order"
    [crashed] = [e for e in s.result["events"] if e["child_pid"] == s.result["pid"]]
    assert crashed["outcome"]["signal"] == "SIGSEGV"


def test_an_unchanged_process_warning_again_is_not_rendered_again(tmp_path: pathlib.Path) -> None:
    """Issue 14: under ``warn`` the text of a fork's warning is made once while the
    process is unchanged (the check hands back the same report), not at every fork —
    and made anew when something changed."""
    s = run_scenario("""
import os, threading, time, warnings
import forksafe
from forksafe._render import forks
made = []
real = forks.fork_warning
def counting(*args, **kwargs):
    made.append(1)
    return real(*args, **kwargs)
forks.fork_warning = counting
forksafe.install("warn")
lock = threading.Lock()
def hold():
    with lock:
        time.sleep(30)
threading.Thread(target=hold, name="holder", daemon=True).start()
time.sleep(0.1)
def fork_some(n):
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    fork_some(5)
    first = len(made)
    threading.Thread(target=time.sleep, args=(30,), name="another", daemon=True).start()
    time.sleep(0.1)
    fork_some(3)
emit(made=[first, len(made)], warned=len(caught))
""", tmp_path)
    assert s.result["warned"] == 8, "every fork still warns"
    assert s.result["made"] == [1, 2], "made once per state of the process"
