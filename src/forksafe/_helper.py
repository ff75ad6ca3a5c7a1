"""The hang helper: a process that watches a program's forked children for hangs.

``install(hang_timeout=...)`` outside ``forksafe run`` has nobody outside the
program to watch its children, so the parent starts this helper on its first
guarded fork (``Client``): a process rather than a thread, because a thread of
ours would itself be a fork hazard for the program's next fork. The parent sends
it one JSON line per forked child over a Unix socket; the helper runs a
``forksafe._hang.HangMonitor`` over them and ends with the program, even while
children of the program keep the socket open.

Started as ``python -m forksafe._helper``; it forks once and its first process
exits at once, so it is not a child of the program.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence

from forksafe import _config
from forksafe._interpreter import interpreter_problem
from forksafe._platform import _procinfo
from forksafe._render import outcomes
from forksafe._render.text import printable
from forksafe._report import ForkEvent, Outcome
from forksafe._statedir import current


class Client:
    """The parent's end of its hang-monitor helper: one line of JSON per forked child.

    This runs in the user's process, on its fork path, so sending must never
    block nor kill it: the events go through a Unix socket (not a pipe), sent
    with ``MSG_DONTWAIT`` - when the helper falls behind and the buffer is
    full, the event is dropped (that child is not watched) - and with
    ``MSG_NOSIGNAL``, so that a helper that died cannot kill a program that
    restored SIGPIPE's default action. Each line starts with a newline: a line
    cut short by a full buffer is then one unreadable line for the helper,
    which skips it, and the next line reads intact.
    """

    def __init__(self, timeout: float, report: str | None) -> None:
        self.owner = os.getpid()
        self.timeout = timeout
        self.report = report
        self._lock = threading.Lock()  # only ever used in the process that made it
        self._sock: socket.socket | None = None
        self.broken = False
        self.dropped = 0

    def watch(self, event: ForkEvent) -> None:
        line = b"\n" + json.dumps(event.to_dict(), default=str).encode() + b"\n"
        # A timeout, not a plain acquire: a signal handler that forks could
        # interrupt this very thread while it holds the lock.
        if not self._lock.acquire(timeout=1.0):
            self.dropped += 1
            return
        try:
            if self.broken:
                return
            if self._sock is None:
                self._start()
            assert self._sock is not None
            if not send(self._sock, line):
                self.dropped += 1
        except (OSError, ValueError, subprocess.SubprocessError):
            self.broken = True
        finally:
            self._lock.release()

    def ready(self) -> bool:
        """Whether the helper runs (or is known not to be startable): nothing to start."""
        return self._sock is not None or self.broken

    def send_now(self, data: bytes) -> None:
        """Send ``data`` without taking the lock: for a forked child, where a thread that
        held it may not exist. One system call; nothing if the helper is not running."""
        sock = self._sock
        if sock is not None:
            send(sock, data)

    def start(self) -> None:
        """Start the helper now, if it is not running yet (never raises)."""
        if self._sock is not None or self.broken or not self._lock.acquire(timeout=1.0):
            return
        try:
            if self._sock is None and not self.broken:
                self._start()
        except (OSError, ValueError, subprocess.SubprocessError):
            self.broken = True
        finally:
            self._lock.release()

    def _start(self) -> None:
        problem = interpreter_problem()
        if problem is not None:
            # Embedded interpreters (uWSGI, some app servers) name their own binary
            # here: starting it with our arguments would start another server.
            raise OSError(problem)
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env[_config.ENV_POLICY] = "off"
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
        argv = [sys.executable, "-m", "forksafe._helper", "--timeout", repr(self.timeout),
                "--parent", str(os.getpid())]
        directory = current()  # the one this process checked: never a planted one
        if directory:
            argv += ["--dir", directory]
        if self.report:
            argv += ["--report", self.report]
        env[_config.ENV_HELPER_DETACH] = "1"
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            theirs.shutdown(socket.SHUT_WR)  # the helper only reads
            proc = subprocess.Popen(argv, stdin=theirs.fileno(), stdout=subprocess.DEVNULL,
                                    env=env, close_fds=True)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        # The helper forks once and its first process exits at once: reaped here, so
        # the program never finds a child it did not start (a loop of os.wait()
        # until ChildProcessError would otherwise wait for our helper forever).
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        ours.shutdown(socket.SHUT_RD)
        self._sock = ours


def send(sock: socket.socket, data: bytes) -> bool:
    """Send ``data`` without blocking and without SIGPIPE; False if (all of) it was not sent.

    Also used in a forked child (``Client.send_now``): a single system call, no lock.
    """
    try:
        return sock.send(data, _SEND_FLAGS) == len(data)
    except BlockingIOError:
        return False


_SEND_FLAGS = getattr(socket, "MSG_DONTWAIT", 0) | getattr(socket, "MSG_NOSIGNAL", 0)


def main(argv: Sequence[str] | None = None) -> int:
    """The helper: read fork events on stdin, watch the children, report the hung ones."""
    from forksafe._hang import HangMonitor  # here: the program's own process never needs it

    parser = argparse.ArgumentParser(prog="python -m forksafe._helper")
    parser.add_argument("--timeout", type=float, required=True)
    parser.add_argument("--dir", help="the state directory; none: no stacks, no markers")
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--report")
    args = parser.parse_args(argv)
    parent = _Parent(args.parent)  # before detaching: the parent waits for that
    if os.environ.pop(_config.ENV_HELPER_DETACH, None) and os.fork() > 0:
        os._exit(0)  # see Client._start: the watcher is not a child of the program
    # Ctrl-C at a terminal goes to the whole process group, the helper included:
    # it is for the program; the helper ends when the program does, quietly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sink = None
    if args.report:
        from forksafe._sink import Sink

        try:
            sink = Sink(args.report)
        except OSError:
            sink = None

    def on_hung(event: ForkEvent, outcome: Outcome) -> None:
        with contextlib.suppress(OSError, ValueError):  # the program's stderr may be gone
            print(printable(outcomes.ended(outcome.diagnosis)), file=sys.stderr, flush=True)
        if sink is not None:
            sink.write({"type": "outcome", "parent_pid": event.parent_pid,
                        "child_pid": event.child_pid, "outcome": outcome.to_dict()})

    monitor = HangMonitor(args.timeout, on_hung=on_hung, directory=args.dir)
    stdin = sys.stdin.buffer
    buffered = b""
    open_ = True
    while (open_ or len(monitor)) and parent.alive():
        if open_:
            ready, _, _ = select.select([stdin], [], [], monitor.interval)
            if ready:
                chunk = os.read(stdin.fileno(), 65536)
                if not chunk:
                    open_ = False
                buffered += chunk
                *lines, buffered = buffered.split(b"\n")
                if len(buffered) > MAX_LINE:
                    buffered = b""  # not a line of ours; the next newline resynchronises
                for line in lines:
                    try:
                        monitor.add(ForkEvent.from_dict(json.loads(line)))
                    except Exception:  # an empty, torn or foreign line
                        continue
        else:
            time.sleep(monitor.interval)
        monitor.poll()
    return 0


#: The longest event line the helper buffers (a fork event with many hazards is a few KiB).
MAX_LINE = 4 * 1024 * 1024


class _Parent:
    """The program the helper serves. It ends with it, even while children of the
    program keep the event socket open (they inherit it when forked)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        state = _procinfo.process_state(pid)
        self.started = state[1] if state is not None else None

    def alive(self) -> bool:
        state = _procinfo.process_state(self.pid)
        return state is not None and state[0] not in ("Z", "X") and state[1] == self.started


if __name__ == "__main__":
    sys.exit(main())
