"""The watchdog: what ``forksafe run`` leaves is cleaned up even when it is SIGKILLed.

``forksafe run`` ends whatever COMMAND left running and removes its temporary
directories when COMMAND ends, or when SIGINT or SIGTERM reach it. SIGKILL (the
OOM killer, ``kill -9``, a CI runner's timeout) gives it no chance: COMMAND, its
children, and the event file and state directory would be left behind.

So ``forksafe run`` forks this watchdog before it starts COMMAND. A plain fork, no
exec: it costs about a millisecond and ``forksafe run`` does not wait for it (its
start-up must stay within a few milliseconds of COMMAND's own). The watchdog
holds the read end of a pipe whose only write end ``forksafe run`` holds (never
inherited: close-on-exec, and closed in the watchdog). ``forksafe run`` writes
COMMAND's pid into it once it runs (and its process group, when COMMAND has one
of its own: ``--new-session``), and ``done`` when it has cleaned up itself. When
the pipe reaches its end without ``done``, ``forksafe run`` is gone, and the
watchdog does its cleanup in its place: SIGTERM, then SIGKILL after a grace
period, to COMMAND (checked to be the same process by its start time), its
descendants, its process group when it has one, and every process whose
environment carries ``FORKSAFE_SUPERVISOR=<pid of that forksafe run>`` (the
variable it gave its tree; ``/proc/<pid>/environ``, readable for one's own
processes); then the temporary directories go, and the watchdog exits. A process
group COMMAND shares with ``forksafe run`` (the default) is never signalled: it is
its caller's too (a shell script, a ``| tee``).

The watchdog is in a session of its own and ignores the signals a terminal or a
process-group kill sends (it must outlive the group it cleans up after), keeps no
descriptor of its parent's (stdin, stdout and stderr become ``/dev/null``, so it
never holds a caller's pipe open), and is named ``forksafe-watch`` (``ps -o
comm``). A process of the tree that both left COMMAND's process group and cleared
its environment, and whose parent died, is not found (and is left alone).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time

from forksafe import _config

#: How long processes get between SIGTERM and SIGKILL (as ``forksafe run`` gives them).
GRACE = 1.0
#: Scans for processes of the tree; a tree that keeps forking is killed round by round.
ROUNDS = 8
NAME = b"forksafe-watch"
_IGNORED = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGTSTP", "SIGTTIN", "SIGTTOU")


class Watchdog:
    """``forksafe run``'s end of the pipe to its watchdog."""

    def __init__(self, pid: int, pipe: int) -> None:
        self.pid = pid
        self._pipe: int | None = pipe

    def command(self, pid: int, *, group: int | None = None) -> None:
        """COMMAND runs as ``pid``; ``group``: the process group of its own, if any."""
        started = start_time(pid)
        self._say(f"pid {pid} {started or 0}\n" + (f"group {group}\n" if group else ""))

    def done(self) -> None:
        """``forksafe run`` cleaned up itself: the watchdog exits, doing nothing."""
        self._say("done\n")
        if self._pipe is not None:
            with contextlib.suppress(OSError):
                os.close(self._pipe)
            self._pipe = None
        # It exits as soon as it reads that: reaped here, so that no zombie is left for
        # an init that may not reap (containers). Waited for at most a second, at the end
        # of the run (never at its start), through a pidfd where there is one: its exit
        # wakes us at once, where polling would sleep in steps.
        self._wait(1.0)

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pidfd = None
        with contextlib.suppress(OSError, AttributeError):
            pidfd = os.pidfd_open(self.pid)  # type: ignore[attr-defined,unused-ignore]
        try:
            while True:
                try:
                    if os.waitpid(self.pid, os.WNOHANG)[0]:
                        return
                except OSError:  # reaped already (by the supervisor's loop)
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                if pidfd is not None:
                    select.select([pidfd], [], [], left)
                else:
                    time.sleep(min(left, 0.001))
        finally:
            if pidfd is not None:
                os.close(pidfd)

    def _say(self, line: str) -> None:
        if self._pipe is not None:
            with contextlib.suppress(OSError):
                os.write(self._pipe, line.encode())


def start(directories: list[str]) -> Watchdog | None:
    """Fork the watchdog of this ``forksafe run`` (see the module docstring); None if it
    cannot be (then a SIGKILL leaves things behind, as it did before)."""
    supervisor = os.getpid()
    try:
        read_end, write_end = os.pipe()  # both close-on-exec: COMMAND inherits neither
    except OSError:
        return None
    try:
        pid = os.fork()
    except OSError:
        os.close(read_end)
        os.close(write_end)
        return None
    if pid == 0:  # pragma: no cover - runs in the forked watchdog; tested from outside
        try:
            os.close(write_end)
            _serve(read_end, supervisor, directories)
        finally:
            os._exit(0)
    os.close(read_end)
    return Watchdog(pid, write_end)


def _serve(pipe: int, supervisor: int, directories: list[str]) -> None:
    """The watchdog's life: wait for the end of the pipe; clean up unless told ``done``."""
    _detach(pipe)
    group = command = None
    started = 0
    buffered = b""
    while True:
        try:
            chunk = os.read(pipe, 4096)
        except InterruptedError:
            continue
        except OSError:
            chunk = b""
        if not chunk:
            break
        buffered += chunk
        *lines, buffered = buffered.split(b"\n")
        for line in lines:
            if line == b"done":
                return
            word, *values = line.split()
            if word == b"pid" and values and all(v.isdigit() for v in values):
                command = int(values[0])
                started = int(values[1]) if len(values) > 1 else 0
            elif word == b"group" and values and values[0].isdigit():
                group = int(values[0])
    if command is not None and started and start_time(command) != started:
        command = None  # gone, and its pid taken by another process since
    clean_up(group, supervisor, directories, command=command)


def _detach(pipe: int) -> None:
    """Own session, deaf to terminal and group signals, no descriptor of the parent's."""
    with contextlib.suppress(OSError):
        os.setsid()
    for name in _IGNORED:
        number = getattr(signal, name, None)
        if number is not None:
            with contextlib.suppress(OSError, ValueError):
                signal.signal(number, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        if null > 2:
            os.close(null)
    with contextlib.suppress(OSError, ValueError):
        os.closerange(3, pipe)
        os.closerange(pipe + 1, max(os.sysconf("SC_OPEN_MAX"), pipe + 1))
    _name_myself()


def _name_myself() -> None:
    """``forksafe-watch`` in ``ps``: otherwise it shows as a second ``forksafe run``."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError), open("/proc/self/comm", "wb") as f:
        f.write(NAME)


def clean_up(group: int | None, supervisor: int, directories: list[str], *,
             grace: float = GRACE, command: int | None = None) -> None:
    """End COMMAND, its descendants, its own group and every process of the tree
    (SIGTERM, then SIGKILL), then remove the temporary directories."""
    for round_ in range(ROUNDS):
        targets = tree(group, supervisor, command=command)
        if not targets:
            break
        sig = signal.SIGTERM if round_ == 0 else signal.SIGKILL
        if group is not None:
            with contextlib.suppress(OSError):
                os.killpg(group, sig)
        for pid in targets:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + (grace if round_ == 0 else 0.5)
        while time.monotonic() < deadline and tree(group, supervisor, command=command):
            time.sleep(0.02)
    import shutil  # here, not at the start of every run

    for directory in directories:
        shutil.rmtree(directory, ignore_errors=True)


def tree(group: int | None, supervisor: int, *, command: int | None = None,
         proc: str = "/proc") -> list[int]:
    """Live processes of COMMAND's own group, COMMAND and its descendants, and those whose
    environment names ``supervisor`` as their ``forksafe run`` (zombies are done: they
    only wait to be reaped)."""
    me = os.getpid()
    marker = f"{_config.ENV_SUPERVISOR}={supervisor}".encode()
    table = processes(proc=proc)
    found = {pid for pid, (_, pgrp) in table.items() if group is not None and pgrp == group}
    if command is not None and command in table:
        found.add(command)
        found.update(descendants(command, table))
    for pid in table:
        if pid in found or pid == me:
            continue
        try:
            with open(f"{proc}/{pid}/environ", "rb") as f:
                environ = f.read()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            found.add(pid)
    found.discard(me)
    return sorted(found)


def processes(*, proc: str = "/proc") -> dict[int, tuple[int, int]]:
    """Every live process (zombies aside): pid -> (parent pid, process group). Empty
    where there is no procfs."""
    table = {}
    try:
        entries = os.listdir(proc)
    except OSError:
        return {}
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"{proc}/{entry}/stat", "rb") as f:
                fields = f.read().rpartition(b")")[2].split()
        except OSError:
            continue
        if len(fields) < 3 or fields[0] in (b"Z", b"X"):
            continue
        table[int(entry)] = (int(fields[1]), int(fields[2]))
    return table


def descendants(root: int, table: dict[int, tuple[int, int]]) -> set[int]:
    """The processes below ``root`` in ``table`` (children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return found


def start_time(pid: int, *, proc: str = "/proc") -> int | None:
    """When ``pid`` started (clock ticks since boot): a pid and this name one process."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None
