"""Reading another process from outside: procfs parsing on recorded inputs, and one live read."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

from forksafe._platform import _procinfo
from forksafe._platform._procinfo import Task


def fake_proc(root: pathlib.Path, pid: int, *, state: str = "S", caught: str = "0") -> None:
    base = root / str(pid)
    (base / "task" / str(pid)).mkdir(parents=True)
    stat = f"{pid} (python app) {state} 1 {pid} {pid} " + " ".join(["0"] * 15) + " 4242 0 0\n"
    (base / "stat").write_text(stat)
    (base / "status").write_text(f"Name:\tpython\nSigCgt:\t{caught}\n")
    task = base / "task" / str(pid)
    (task / "stat").write_text(stat)
    (task / "comm").write_text("python\n")
    (task / "syscall").write_text(
        "202 0x7f00 0x80 0x0 0x0 0x0 0x0 0x7ffd1000 0x7f0012345678\n")
    (task / "schedstat").write_text("1000 20 3\n")
    (task / "wchan").write_text("futex_wait_queue")


def test_blocked_task_names_its_system_call_and_stack_pointer(tmp_path: pathlib.Path) -> None:
    """A thread blocked in futex reports the call by name and the stack pointer from syscall."""
    fake_proc(tmp_path, 77)
    [task] = _procinfo.tasks(77, proc=str(tmp_path))
    assert (task.tid, task.name, task.state, task.wchan) == (77, "python", "S", "futex_wait_queue")
    if os.uname().machine == "x86_64":
        assert task.blocked_in == "futex"
    assert task.stack_pointer == 0x7FFD1000
    assert _procinfo.process_state(77, proc=str(tmp_path)) == ("S", "4242")


def test_running_task_is_not_blocked() -> None:
    """'running' (on a CPU) and '-1 sp pc' (between calls) are not waits."""
    for line in ("running", "-1 0x7ffd1000 0x7f00"):
        assert Task(1, "t", "R", line, "", "").blocked_in is None


def test_caught_signal_mask(tmp_path: pathlib.Path) -> None:
    """SigCgt bit N-1 says signal N has a handler; a missing process catches nothing."""
    fake_proc(tmp_path, 78, caught="0000000000004010")  # signals 5 (SIGTRAP) and 15
    assert _procinfo.catches(78, 5, proc=str(tmp_path))
    assert _procinfo.catches(78, 15, proc=str(tmp_path))
    assert not _procinfo.catches(78, 11, proc=str(tmp_path))
    assert not _procinfo.catches(79, 5, proc=str(tmp_path))


def test_gone_process_reads_as_gone(tmp_path: pathlib.Path) -> None:
    """A pid without a procfs entry has no state and no threads."""
    assert _procinfo.process_state(12345, proc=str(tmp_path)) is None
    assert _procinfo.tasks(12345, proc=str(tmp_path)) == []


def test_plumbing_libraries_are_skipped() -> None:
    """libc, the loader, the interpreter and ctypes do not explain why a thread waits."""
    for path in ("/lib/x86_64-linux-gnu/libc.so.6", "/usr/bin/python3.11",
                 "/x/_ctypes.cpython-311-x86_64-linux-gnu.so", "/lib/libffi.so.8"):
        assert _procinfo.is_plumbing(path)
    assert not _procinfo.is_plumbing("/lib/x86_64-linux-gnu/libgomp.so.1")


def test_live_child_blocked_in_a_c_library_is_attributed(native_dir: pathlib.Path) -> None:
    """A real child blocked in a C mutex: its stack, read from outside, names the library."""
    code = (
        "import ctypes, sys\n"
        f"lib = ctypes.CDLL({str(native_dir / 'libnative_mutex.so')!r})\n"
        "lib.native_mutex_hold.argtypes = [ctypes.c_double]\n"
        "lib.native_mutex_wait_held.argtypes = [ctypes.c_double]\n"
        "lib.native_mutex_hold(30.0); lib.native_mutex_wait_held(5.0)\n"
        "print('ready', flush=True)\n"
        "lib.native_mutex_take()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(0.2)
        main = next(t for t in _procinfo.tasks(proc.pid) if t.tid == proc.pid)
        if os.uname().machine == "x86_64":
            assert main.blocked_in == "futex"
        libs = _procinfo.StackReader(proc.pid).libraries(main)
        assert libs and os.path.basename(libs[0]) == "libnative_mutex.so", libs
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_has_open_tells_open_closed_and_unknown(tmp_path: pathlib.Path) -> None:
    """A file this process holds open is found; a closed one is not; a missing pid is unknown."""
    path = tmp_path / "held"
    with open(path, "w"):
        assert _procinfo.has_open(os.getpid(), str(path)) is True
    assert _procinfo.has_open(os.getpid(), str(path)) is False
    assert _procinfo.has_open(2**22 + 999, str(path)) is None
