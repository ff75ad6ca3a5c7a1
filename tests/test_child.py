"""The child side of following a fork: the crash file that survives the child's death.

Each scenario forks a real child in a fresh interpreter, arms it exactly as the
guard does (``forksafe._child.arm``), kills it with a real signal and reads what
it left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib

from conftest import run_scenario
from forksafe import _child

CHILD = """
import json, os, signal, ctypes, sys
from forksafe import _child, _statedir
os.environ["FORKSAFE_STATE_DIR"] = {state!r}

def fork_and(action, hang_timeout=None):
    pid = os.fork()
    if pid == 0:
        _child.arm(os.getppid(), hang_timeout)
        action()
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    path = _statedir.crash_path(pid)
    text = open(path).read() if os.path.exists(path) else None
    return {{"signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
             "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
             "crash": text,
             "mode": oct(os.stat(path).st_mode & 0o777) if text is not None else None}}
"""


def scenario(body: str, tmp_path: pathlib.Path, **kwargs: object):  # type: ignore[no-untyped-def]
    code = CHILD.format(state=str(tmp_path / "state")) + body
    return run_scenario(code, tmp_path, timeout=60, **kwargs)  # type: ignore[arg-type]


def test_segfault_leaves_the_python_traceback_and_the_true_signal(tmp_path: pathlib.Path) -> None:
    """A child killed by SIGSEGV still dies by SIGSEGV and leaves its Python traceback."""
    s = scenario("""
def crash_here():
    ctypes.string_at(0)  # crash-line
r = fork_and(crash_here)
print("FORKSAFE-RESULT:" + json.dumps(r))
""", tmp_path)
    assert s.result["signal"] == 11
    assert "Segmentation fault" in s.result["crash"]
    assert f'line {s.line_of("crash-line")} in crash_here' in s.result["crash"]
    assert s.result["mode"] == "0o600", "the crash file is private to the user"


def test_sigtrap_is_captured_and_the_child_still_dies_by_it(tmp_path: pathlib.Path) -> None:
    """SIGTRAP (libdispatch on arm64), which faulthandler.enable skips, is captured; no loop."""
    s = scenario("""
def trap_here():
    os.kill(os.getpid(), signal.SIGTRAP)  # trap-line
    os._exit(7)  # reached only if the handler returned instead of re-raising
r = fork_and(trap_here)
print("FORKSAFE-RESULT:" + json.dumps(r))
""", tmp_path)
    assert s.result["signal"] == 5, s.result
    assert f'line {s.line_of("trap-line")} in trap_here' in s.result["crash"]


def test_fake_dispatch_trap_instructions_are_captured(tmp_path: pathlib.Path,
                                                      native_dir: pathlib.Path) -> None:
    """The libdispatch imitation's SIGILL (x86-64) and SIGTRAP (arm64) both leave a traceback."""
    s = scenario(f"""
import time
lib = ctypes.CDLL({str(native_dir / "libdispatch.so")!r})
lib.fake_dispatch_start()
ill = fork_and(lambda: lib.fake_dispatch_use())
trap = fork_and(lambda: lib.fake_dispatch_use_trap())
print("FORKSAFE-RESULT:" + json.dumps({{"ill": ill, "trap": trap}}))
""", tmp_path)
    assert s.result["ill"]["signal"] == 4
    assert "Illegal instruction" in s.result["ill"]["crash"]
    assert s.result["trap"]["signal"] == 5, "raise(SIGTRAP) kills before the fixture's abort()"
    assert "<lambda>" in s.result["trap"]["crash"]


def test_clean_child_leaves_an_empty_crash_file(tmp_path: pathlib.Path) -> None:
    """Safe twin: a child that exits normally writes nothing (the parent removes the file)."""
    s = scenario("""
r = fork_and(lambda: None)
print("FORKSAFE-RESULT:" + json.dumps(r))
""", tmp_path)
    assert s.result["exit"] == 0
    assert s.result["crash"] == ""


def test_dump_signal_is_caught_only_with_a_hang_timeout(tmp_path: pathlib.Path) -> None:
    """The hang monitor's dump signal is handled only when hang watching is on."""
    s = scenario("""
import time
from forksafe._platform._procinfo import catches
def probe(hang):
    pid = os.fork()
    if pid == 0:
        _child.arm(os.getppid(), hang)
        time.sleep(5)
        os._exit(0)
    for _ in range(200):
        if catches(pid, signal.SIGTRAP):
            break
        time.sleep(0.01)
    caught = catches(pid, _child.DUMP_SIGNAL)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return caught
print("FORKSAFE-RESULT:" + json.dumps({"with": probe(2.0), "without": probe(None)}))
""", tmp_path)
    assert s.result == {"with": True, "without": False}


def test_unwritable_state_dir_does_not_harm_the_child(tmp_path: pathlib.Path) -> None:
    """A child that cannot create its crash file runs on exactly as it would unarmed."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a directory should be")
    s = run_scenario(f"""
import json, os
from forksafe import _child
os.environ["FORKSAFE_STATE_DIR"] = {str(blocker / "state")!r}
pid = os.fork()
if pid == 0:
    _child.arm(os.getppid(), 1.0)
    os._exit(3)
_, status = os.waitpid(pid, 0)
print("FORKSAFE-RESULT:" + json.dumps({{"exit": os.WEXITSTATUS(status)}}))
""", tmp_path)
    assert s.result == {"exit": 3}


def test_a_state_dir_others_can_write_is_not_used(tmp_path: pathlib.Path) -> None:
    """Safe twin: a world-writable state directory (planted by someone else) gets no files."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    s = run_scenario(f"""
import json, os
from forksafe import _child
os.environ["FORKSAFE_STATE_DIR"] = {str(shared)!r}
pid = os.fork()
if pid == 0:
    _child.arm(os.getppid(), None)
    os._exit(0)
os.waitpid(pid, 0)
print("FORKSAFE-RESULT:" + json.dumps({{"files": os.listdir({str(shared)!r})}}))
""", tmp_path)
    assert s.result == {"files": []}


def test_a_child_of_a_child_keeps_one_crash_file_and_crashes_into_its_own(
        tmp_path: pathlib.Path) -> None:
    """A grandchild closes the crash file it inherited; its traceback lands in its own file."""
    s = scenario("""
def crash_files():
    links = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the descriptor listdir itself used
            pass
    return sorted(link for link in links if link.endswith(".crash"))
def middle():
    me = crash_files()
    r = fork_and(lambda: (print("FORKSAFE-RESULT:" + json.dumps(
        {"grandchild": crash_files(), "pid": os.getpid()}), flush=True), ctypes.string_at(0)),
                 hang_timeout=1.0)
    print("FORKSAFE-RESULT:" + json.dumps({"middle": me, "pid": os.getpid(), "r": r}), flush=True)
r = fork_and(middle, hang_timeout=1.0)
""", tmp_path)
    results = [json.loads(line.partition(":")[2]) for line in s.stdout.splitlines()
               if line.startswith("FORKSAFE-RESULT:")]
    [g] = [r for r in results if "grandchild" in r]
    [m] = [r for r in results if "middle" in r]
    state = str(tmp_path / "state")
    assert m["middle"] == [f"{state}/{m['pid']}.crash"]
    assert g["grandchild"] == [f"{state}/{g['pid']}.crash"], "the inherited one was closed"
    assert m["r"]["signal"] == 11 and "Segmentation fault" in m["r"]["crash"]


def test_a_reused_descriptor_number_is_not_closed(tmp_path: pathlib.Path) -> None:
    """Safe twin: a program that closed our crash file and reused its number keeps its file."""
    s = scenario("""
def middle():
    fd = _child.armed()[0]
    os.close(fd)
    mine = os.open({mine!r}, os.O_WRONLY | os.O_CREAT, 0o600)
    os.dup2(mine, fd)  # the program's file now has our old number
    os.close(mine)
    mine = fd
    def grandchild():
        os.write(mine, b"still open")
    r = fork_and(grandchild)
    os.write(mine, b"; and here")
    os._exit(0 if r["exit"] == 0 else 9)
r = fork_and(middle)
print("FORKSAFE-RESULT:" + json.dumps({{"r": r, "text": open({mine!r}).read()}}))
""".replace("{mine!r}", repr(str(tmp_path / "mine.txt"))).replace("{{", "{").replace("}}", "}"),
                 tmp_path)
    assert s.result["r"]["exit"] == 0, s.result
    assert s.result["text"] == "still open; and here"


def test_a_programs_own_handler_for_the_dump_signal_is_kept(tmp_path: pathlib.Path) -> None:
    """Safe twin: a program that handles the dump signal itself keeps its handler in children."""
    s = scenario("""
got = []
signal.signal(_child.DUMP_SIGNAL, lambda *a: got.append(1))
def child():
    os.kill(os.getpid(), _child.DUMP_SIGNAL)
    os._exit(40 + len(got))
r = fork_and(child, hang_timeout=1.0)
print("FORKSAFE-RESULT:" + json.dumps(r))
""", tmp_path)
    assert s.result["exit"] == 41, s.result
    assert s.result["crash"] == "", "faulthandler did not take the signal over"


def test_the_crash_file_descriptor_is_kept_out_of_the_programs_way(
        tmp_path: pathlib.Path) -> None:
    """The crash file sits at a high descriptor number, so a program's own files rarely
    get its number; the traceback still lands in it."""
    s = scenario("""
def crash():
    os.write(1, (json.dumps({"fd": _child.armed()[0]}) + "\\n").encode())
    ctypes.string_at(0)
r = fork_and(crash)
print("FORKSAFE-RESULT:" + json.dumps(r))
""", tmp_path)
    [fd] = [json.loads(line)["fd"] for line in s.stdout.splitlines() if line.startswith('{"fd"')]
    assert fd >= _child.HIGH_FD
    assert s.result["signal"] == 11 and "Segmentation fault" in s.result["crash"]


def test_a_crash_file_opened_by_the_parent_gets_the_childs_name_and_traceback(
        tmp_path: pathlib.Path) -> None:
    """The guard's os.fork opens the child's crash file in the parent (``open_spare``)
    and names it ``<pid>.crash`` after the fork; the child only points faulthandler at it."""
    s = scenario("""
spare = _child.open_spare(None)
pid = os.fork()
if pid == 0:
    _child.arm(os.getppid(), None, spare)
    os.write(1, (json.dumps({"same_fd": _child.armed()[0] == spare[0]}) + "\\n").encode())
    ctypes.string_at(0)  # crash-line
_child.adopt_spare(spare, pid)
_, status = os.waitpid(pid, 0)
try:
    os.fstat(spare[0])
    parent_fd_open = True
except OSError:
    parent_fd_open = False
path = _statedir.crash_path(pid)
print("FORKSAFE-RESULT:" + json.dumps({"signal": os.WTERMSIG(status), "crash": open(path).read(),
      "mode": oct(os.stat(path).st_mode & 0o777), "files": os.listdir({state!r}),
      "parent_fd_open": parent_fd_open, "pid": pid}))
""".replace("{state!r}", repr(str(tmp_path / "state"))).replace("{{", "{").replace("}}", "}"),
                 tmp_path)
    [child] = [json.loads(line) for line in s.stdout.splitlines() if line.startswith('{"same_fd"')]
    assert child["same_fd"] is True
    r = s.result
    assert r["signal"] == 11 and "Segmentation fault" in r["crash"]
    assert f'line {s.line_of("crash-line")}' in r["crash"]
    assert r["mode"] == "0o600"
    assert r["files"] == [f"{r['pid']}.crash"]
    assert r["parent_fd_open"] is False


def test_a_spare_crash_file_is_gone_when_the_fork_fails(tmp_path: pathlib.Path) -> None:
    """A fork that raises (EAGAIN, say) leaves no crash file and no open descriptor."""
    s = scenario("""
import forksafe
from forksafe import _forkpath
forksafe.install("warn")
_forkpath.load()
def failing():
    raise BlockingIOError(11, "Resource temporarily unavailable")
fork = _forkpath.wrap_fork(failing)
from forksafe import _check
_check.fork_check(watch=True)  # opens the check's own descriptor, kept while installed
before = sorted(os.listdir("/proc/self/fd"))
try:
    fork()
except BlockingIOError:
    raised = True
after = sorted(os.listdir("/proc/self/fd"))
print("FORKSAFE-RESULT:" + json.dumps({"raised": raised, "files": os.listdir({state!r}),
                                       "fds": after == before}))
""".replace("{state!r}", repr(str(tmp_path / "state"))).replace("{{", "{").replace("}}", "}"),
                 tmp_path)
    assert s.result == {"raised": True, "files": [], "fds": True}


def test_without_a_reader_by_name_crash_files_are_reused_memory_files(
        tmp_path: pathlib.Path) -> None:
    """No hang monitor, no `forksafe run`: each child's crash file is a memory file the
    parent reads when it reaps the child; an empty one serves the next child, a written
    one never does, and nothing is left on disk or open after uninstall."""
    s = run_scenario("""
import ctypes, json, os, sys
import forksafe
from forksafe import _child, _guard, _statedir
forksafe.install("log")
def fork(crash):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        st = os.fstat(_child.armed()[0])
        os.write(w, json.dumps([os.readlink(f"/proc/self/fd/{_child.armed()[0]}"),
                                st.st_ino]).encode())
        if crash:
            ctypes.string_at(0)  # crash-line
        os._exit(0)
    os.close(w)
    seen = json.loads(os.read(r, 4096))
    os.close(r)
    os.waitpid(pid, 0)
    outcome = _guard.event_for_child(pid).outcome
    return seen, outcome.traceback
runs = [fork(False), fork(False), fork(True), fork(False)]
state = _statedir.state_dir()
files = sorted(n for n in os.listdir(state) if n.split(".")[0].split("-")[0] == str(os.getpid()))
forksafe.uninstall()
left = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
        if os.path.exists(f"/proc/self/fd/{fd}")]
print("FORKSAFE-RESULT:" + json.dumps({"runs": runs, "files": files,
      "open": [link for link in left if "forksafe" in link]}))
""", tmp_path, timeout=60)
    runs = s.result["runs"]
    assert all(link.startswith("/memfd:forksafe-crash") for (link, _), _ in runs)
    inodes = [inode for (_, inode), _ in runs]
    assert inodes[0] == inodes[1] == inodes[2], "an empty memory file serves the next child"
    assert inodes[3] != inodes[2], "a written one is never handed on"
    assert runs[2][1] is not None and "Segmentation fault" in runs[2][1]
    assert f'line {s.line_of("crash-line")}' in runs[2][1]
    assert [trace for _, trace in (runs[0], runs[1], runs[3])] == [None, None, None]
    assert s.result["files"] == []
    assert s.result["open"] == []


def test_a_child_gone_unseen_loses_its_memory_file_only_the_second_time_round() -> None:
    """A memory file held for a child reaped elsewhere is closed, but never on the first
    sight of the child gone: the thread that just reaped it may be reading it."""
    fd = os.memfd_create("forksafe-test")
    gone = 2**22 + 77  # above the default pid_max: never a live process
    saved = (_child._memory, _child._gone)
    try:
        _child._memory = (os.getpid(), [], {gone: (fd, None, None, "", os.getpid(), "")})
        _child._gone = set()
        assert _child.forget_gone_children() == 0
        os.fstat(fd)  # still open
        assert _child.forget_gone_children() == 1
        assert _child._memory[2] == {}
    finally:
        _child._memory, _child._gone = saved
        with contextlib.suppress(OSError):
            os.close(fd)


def test_warming_faulthandler_up_leaves_the_program_as_it_was(tmp_path: pathlib.Path) -> None:
    """The guard's one-time warm-up (so that children allocate nothing) leaves faulthandler
    off and every signal handler as it was (a program's own faulthandler is left alone:
    test_outcome's faulthandler tests)."""
    s = run_scenario("""
import faulthandler, json, os, signal, sys
import forksafe
from forksafe import _child
got = []
signal.signal(signal.SIGSEGV, lambda *a: got.append("segv"))  # a program's own handler
watched = [signal.SIGSEGV, signal.SIGFPE, signal.SIGABRT, signal.SIGBUS, signal.SIGILL,
           _child.DUMP_SIGNAL]
before = [repr(signal.getsignal(n)) for n in watched]
forksafe.install("warn")
pid = os.fork()
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
after = [repr(signal.getsignal(n)) for n in watched]
os.kill(os.getpid(), signal.SIGSEGV)  # still the program's handler
print("FORKSAFE-RESULT:" + json.dumps({"warm": _child._warm, "same": before == after,
      "enabled": faulthandler.is_enabled(), "got": got}))
""", tmp_path, timeout=60)
    assert s.result == {"warm": True, "same": True, "enabled": False, "got": ["segv"]}
