"""Linux: what another process's threads are doing, read from outside through procfs.

A hung child cannot report on itself: it may be stuck in C code holding the
GIL, so no Python watchdog in it can run. Its parent, or the supervising
``forksafe run`` (an ancestor), can still read everything needed from procfs:
each thread's state, the system call it is blocked in with its stack pointer
(``/proc/PID/task/TID/syscall``), the kernel function it sleeps in (``wchan``),
how often it was scheduled and for how long (``schedstat``), and the live part
of its stack (``/proc/PID/mem``, readable by an ancestor even under Yama's
ptrace_scope=1). Mapping the stack words that point into a library's
executable mapping back to that library names the code a blocked thread is in,
the same way ``_linux.py`` attributes the threads of the calling process.

Everything here tolerates the process disappearing between two reads: a vanished
file reads as empty and the caller treats the thread or process as gone.
"""

from __future__ import annotations

import array
import bisect
import os
import sys
from dataclasses import dataclass

#: How much of a blocked thread's stack to scan, from its stack pointer upwards.
STACK_SCAN_BYTES = 64 * 1024

#: Libraries that are on every blocked thread's stack and say nothing about why:
#: libc and the dynamic loader, and the interpreter and ctypes that called into C.
PLUMBING = (
    "libc.so", "libc-", "libpthread", "ld-linux", "libstdc++", "libgcc_s", "[vdso]",
    "libpython", "python", "_ctypes", "libffi",
)

#: x86-64 system call numbers of the waits a hung thread typically sits in.
SYSCALLS_X86_64 = {
    0: "read", 1: "write", 7: "poll", 23: "select", 35: "nanosleep", 43: "accept",
    45: "recvfrom", 47: "recvmsg", 61: "wait4", 202: "futex", 230: "clock_nanosleep",
    232: "epoll_wait", 247: "waitid", 270: "pselect6", 271: "ppoll", 281: "epoll_pwait",
    288: "accept4", 34: "pause", 128: "rt_sigtimedwait", 130: "rt_sigsuspend",
    219: "restart_syscall",
}


@dataclass(frozen=True)
class Task:
    """One thread of another process, as procfs shows it."""

    tid: int
    name: str
    state: str  # the one-letter code: R running, S sleeping, D disk wait, Z zombie, ...
    syscall: str  # the raw line of /proc/PID/task/TID/syscall ("running" when on a CPU)
    schedstat: str  # "cpu-ns wait-ns timeslices": changes whenever the thread runs
    wchan: str

    @property
    def blocked_in(self) -> str | None:
        """The system call it is blocked in (a name where known), or None when running."""
        fields = self.syscall.split()
        if len(fields) < 3 or fields[0] in ("running", "-1"):
            return None
        try:
            number = int(fields[0])
        except ValueError:
            return None
        if sys.platform.startswith("linux") and os.uname().machine == "x86_64":
            return SYSCALLS_X86_64.get(number, f"syscall {number}")
        return f"syscall {number}"

    @property
    def stack_pointer(self) -> int | None:
        from forksafe._platform._linux import _stack_pointer

        return _stack_pointer(self.syscall)


def read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def process_state(pid: int, *, proc: str = "/proc") -> tuple[str, str] | None:
    """(state letter, start time) of ``pid``, or None when it does not exist.

    The start time (field 22 of stat) tells a reused pid from the process we watched.
    """
    stat = read(f"{proc}/{pid}/stat")
    if not stat:
        return None
    tail = stat.rpartition(")")[2].split()
    if len(tail) < 20:
        return None
    return tail[0], tail[19]


def tasks(pid: int, *, proc: str = "/proc") -> list[Task]:
    """Every thread of ``pid`` (empty when the process is gone)."""
    base = f"{proc}/{pid}/task"
    try:
        tids = sorted(int(t) for t in os.listdir(base))
    except (OSError, ValueError):
        return []
    found = []
    for tid in tids:
        where = f"{base}/{tid}"
        stat = read(f"{where}/stat")
        if not stat:
            continue
        tail = stat.rpartition(")")[2].split()
        found.append(Task(
            tid=tid,
            name=read(f"{where}/comm").rstrip("\n"),
            state=tail[0] if tail else "?",
            syscall=read(f"{where}/syscall").strip(),
            schedstat=read(f"{where}/schedstat").strip(),
            wchan=read(f"{where}/wchan").strip(),
        ))
    return found


def caught_signals(pid: int, *, proc: str = "/proc") -> int:
    """The mask of signals ``pid`` has a handler for (SigCgt), 0 when unknown."""
    for line in read(f"{proc}/{pid}/status").splitlines():
        if line.startswith("SigCgt:"):
            try:
                return int(line.split()[1], 16)
            except (IndexError, ValueError):
                return 0
    return 0


def catches(pid: int, signum: int, *, proc: str = "/proc") -> bool:
    """True when ``pid`` handles ``signum`` (so sending it cannot kill the process)."""
    return bool(caught_signals(pid, proc=proc) >> (signum - 1) & 1)


def has_open(pid: int, path: str, *, proc: str = "/proc") -> bool | None:
    """Whether ``pid`` has ``path`` open; None when its descriptors cannot be listed."""
    base = f"{proc}/{pid}/fd"
    wanted = os.path.realpath(path)
    try:
        names = os.listdir(base)
    except OSError:
        return None
    for name in names:
        try:
            if os.readlink(f"{base}/{name}") == wanted:
                return True
        except OSError:
            continue
    return False


def cwd(pid: int, *, proc: str = "/proc") -> str | None:
    try:
        return os.readlink(f"{proc}/{pid}/cwd")
    except OSError:
        return None


#: (start, end, permissions, path) of one line of /proc/PID/maps.
Span = tuple[int, int, str, str]


def mappings(pid: int, *, proc: str = "/proc") -> list[Span]:
    spans: list[Span] = []
    for line in read(f"{proc}/{pid}/maps").splitlines():
        fields = line.split(None, 5)
        if len(fields) < 5:
            continue
        lo, _, hi = fields[0].partition("-")
        try:
            spans.append((int(lo, 16), int(hi, 16), fields[1],
                          fields[5].strip() if len(fields) > 5 else ""))
        except ValueError:
            continue
    spans.sort()
    return spans


class StackReader:
    """Names the libraries on the stacks of another process's blocked threads."""

    def __init__(self, pid: int, *, proc: str = "/proc") -> None:
        self.pid = pid
        self._proc = proc
        spans = mappings(pid, proc=proc)
        self._spans = spans
        code = [(lo, hi, path) for lo, hi, perms, path in spans
                if "x" in perms and path.startswith("/")]
        self._code = code
        self._starts = [lo for lo, _, _ in code]

    def libraries(self, task: Task, limit: int = 3) -> tuple[str, ...]:
        """Libraries whose code is on ``task``'s stack, innermost first, plumbing skipped.

        Words are read from the stack pointer upwards, so the first library found
        is the one the thread is blocked in (after libc's wait wrapper).
        """
        sp = task.stack_pointer
        if sp is None or not self._code:
            return ()
        i = bisect.bisect_right(self._spans, (sp, sys.maxsize)) - 1
        if i < 0 or not self._spans[i][0] <= sp < self._spans[i][1]:
            return ()
        end = min(self._spans[i][1], sp + STACK_SCAN_BYTES)
        data = self._pread(sp, end - sp)
        usable = len(data) - len(data) % 8
        if not usable:
            return ()
        found: dict[str, None] = {}
        low, high = self._code[0][0], max(hi for _, hi, _ in self._code)
        for word in array.array("Q", data[:usable]):
            if not low <= word < high:
                continue
            j = bisect.bisect_right(self._starts, word) - 1
            if j < 0 or word >= self._code[j][1]:
                continue
            path = self._code[j][2]
            if path in found or is_plumbing(path):
                continue
            found[path] = None
            if len(found) >= limit:
                break
        return tuple(found)

    def _pread(self, address: int, size: int) -> bytes:
        from forksafe._platform._linux import read_memory

        return read_memory(f"{self._proc}/{self.pid}/mem", address, size)


def is_plumbing(path: str) -> bool:
    base = os.path.basename(path)
    return any(base.startswith(p) for p in PLUMBING)
