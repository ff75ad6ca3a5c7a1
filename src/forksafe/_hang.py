"""Hang diagnosis: find forked children that make no progress, and say why.

A hung child cannot be asked: it may be blocked in C code that holds the GIL,
where no Python watchdog in it can run. So the monitor lives in another
process - ``forksafe run`` itself, which is an ancestor of every process in the
tree, or, for ``install(hang_timeout=...)`` without ``forksafe run``, a small
helper process the parent starts on its first guarded fork (a process rather
than a thread, because a thread of ours would itself be a fork hazard for the
program's next fork). It reads each child from outside through procfs
(``_platform/_procinfo.py``).

"No progress" means: for ``timeout`` seconds, every thread of the child stayed
in the very same system call, with the same arguments and stack pointer, and
was not scheduled once (``schedstat`` unchanged). A child that computes is
scheduled; a child that sleeps in a loop is scheduled at every wake-up; only a
child parked in one wait stays unchanged. That alone is not a hang - an idle
pool worker waiting for its next task looks the same - so a stuck child is
reported only when its wait is explained by a hazard recorded at its fork:

* lock: a thread of the child is stopped at a line that takes a lock which, at
  fork time, another thread of the parent held (by the lock's name, from the
  fork-time ``with`` blocks of that thread);
* native runtime: a thread of the child is blocked inside the code of a native
  runtime that was active at fork time (GNU OpenMP's pool), or of a library
  whose own thread was alive then (a native thread holding a mutex).

A stuck child whose wait is not explained is left alone (it is probably idle).
The Python stacks come from the child itself: ``_child.arm`` registered
``faulthandler`` for ``DUMP_SIGNAL``, whose C handler writes every thread's
traceback into the child's crash file even while the GIL is held. A reported
child is then ended with SIGKILL, so that a run or a parent waiting for it can
finish; its parent sees the outcome ``hung`` when it reaps it.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import linecache
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from forksafe._child import DUMP_SIGNAL, crash_path, hung_path, state_dir
from forksafe._outcome import describe_fork, frame_text, parse_sections, short_file
from forksafe._platform import _procinfo
from forksafe._report import ForkEvent, Hazard, Outcome, Severity, Site

HUNG = "child {pid} ({forked}) made no progress for {seconds:g} s"
LOCK_LINK = (
    "it is blocked taking `{lock}` at {where}; at fork time thread {holder!r}{started} held "
    "`{lock}` (taken at {taken}), and that thread does not exist in the child, so the lock "
    "is never released"
)
RUNTIME_LINK = (
    "{who} is blocked ({call}) inside {library}: {runtime} was active at fork time "
    "({signals}), and its threads do not exist in the child"
)
THREAD_LINK = (
    "{who} is blocked ({call}) inside {library}, whose own thread {holder!r} was alive at "
    "fork time and does not exist in the child (a lock it held stays held)"
)
FIX = "fix: {remedy}"
ENDED = "forksafe: {diagnosis} [ended with SIGKILL]"

#: The system calls a thread blocked acquiring a lock is seen in (after a signal
#: interrupted a futex wait with a timeout, the kernel restarts it as restart_syscall).
_LOCK_WAITS = ("futex", "restart_syscall")

#: How long to wait for a stuck child's faulthandler dump to appear.
DUMP_WAIT = 1.0
#: The most children watched at once (bounded memory for huge pools).
MAX_WATCHED = 4096


def sample(pid: int, started: str | None, *, proc: str = "/proc") -> tuple[Any, ...] | None:
    """What changes whenever ``pid`` makes any progress; None when it is gone or dead."""
    state = _procinfo.process_state(pid, proc=proc)
    if state is None or state[0] in ("Z", "X") or (started is not None and state[1] != started):
        return None
    tasks = _procinfo.tasks(pid, proc=proc)
    if any(t.state in ("T", "t") for t in tasks):
        # Stopped (Ctrl-Z, SIGSTOP) or held by a debugger: someone is looking at it,
        # so it is never "stuck"; a sample that differs every time says so.
        return ("stopped", next(_stops))
    return tuple((t.tid, t.state, t.syscall, t.schedstat) for t in tasks)


_stops = itertools.count()


def request_dump(pid: int, *, directory: str, wait: float = DUMP_WAIT) -> str:
    """Ask the child for its Python stacks (DUMP_SIGNAL) and return what it wrote.

    Sent only when the child catches the signal (armed by ``_child.arm``): the
    default action of a real-time signal would kill it. The dump is cut off the
    crash file again, so that a later crash finds the file as it was.
    """
    if DUMP_SIGNAL is None or not _procinfo.catches(pid, DUMP_SIGNAL):
        return ""
    path = crash_path(pid, directory=directory)
    if _procinfo.has_open(pid, path) is False:
        # The program closed its crash file (daemons close "all other"
        # descriptors): faulthandler would write into whatever file now has that
        # number. Better no stacks than a stack dump in someone's data.
        return ""
    try:
        before = os.path.getsize(path)
        os.kill(pid, DUMP_SIGNAL)
    except OSError:
        return ""
    deadline = time.monotonic() + wait
    size, stable = before, 0
    while time.monotonic() < deadline and stable < 3:
        time.sleep(0.02)
        try:
            now = os.path.getsize(path)
        except OSError:
            return ""
        stable = stable + 1 if now == size and now > before else 0
        size = now
    try:
        with open(path, "rb") as f:
            f.seek(before)
            data = f.read(64 * 1024)
        os.truncate(path, before)
    except OSError:
        return ""
    return data.decode("utf-8", "replace").strip()


@dataclass
class Finding:
    """A stuck child's wait, explained by one fork-time hazard."""

    hazard: Hazard
    text: str


def analyse(event: ForkEvent, seconds: float, *, directory: str,
            proc: str = "/proc") -> Outcome | None:
    """A ``hung`` outcome for ``event``'s stuck child, or None when fork does not explain it."""
    pid = event.child_pid
    hazards = [h for h in event.report.hazards if h.severity >= Severity.WARNING]
    if pid is None or not hazards:
        return None  # a clean fork: a stuck child is not fork's doing (probably idle)
    tasks = _procinfo.tasks(pid, proc=proc)
    reader = _procinfo.StackReader(pid, proc=proc)
    natives = [(t, reader.libraries(t)) for t in tasks if t.blocked_in is not None]
    found_native = native_findings(natives, hazards)
    # The dump signal interrupts the child's wait (restarted, or EINTR that Python
    # retries); it is sent only when its answer matters: to find a lock, or to show
    # the Python stacks of a child that is about to be reported anyway.
    # A thread waiting for a lock sits in futex: a child waiting in read, poll,
    # sleep or accept is not asked (where call names are unknown, it is).
    lockish = any(t.blocked_in in _LOCK_WAITS or (t.blocked_in or "").startswith("syscall ")
                  for t in tasks)
    dump = ""
    if found_native or (lockish and any(_held_locks(h) for h in hazards)):
        dump = request_dump(pid, directory=directory)
    base = _procinfo.cwd(pid, proc=proc)
    findings = lock_findings(parse_sections(dump), hazards, base=base) + found_native
    if not findings:
        return None
    head = HUNG.format(pid=pid, forked=describe_fork(event), seconds=round(seconds, 1))
    diagnosis = f"{head}: " + "; ".join(f.text for f in findings[:3])
    diagnosis += ". " + FIX.format(remedy=findings[0].hazard.remedy)
    native = "\n".join(
        f"thread {t.tid} ({t.name}): {t.blocked_in or 'running'}"
        + (f" in {t.wchan}" if t.wchan and t.wchan != "0" else "")
        + (f"; native code: {', '.join(os.path.basename(p) for p in libs)}" if libs else "")
        for t, libs in natives
    )
    traceback = "\n\n".join(part for part in (dump, "Native threads:\n" + native) if part)
    return Outcome("hung", None, None, traceback, diagnosis)


def lock_findings(sections: list[list[Site]], hazards: Sequence[Hazard], *,
                  base: str | None) -> list[Finding]:
    """Child threads stopped at a line that takes a lock another thread held at fork time."""
    from forksafe._frames import is_library_file

    held = []
    for hazard in hazards:
        for lock in _held_locks(hazard):
            expr = str(lock["lock"])
            token = re.split(r"[.\s]", expr.rstrip("()"))[-1]
            held.append((hazard, expr, token, str(lock.get("at", "?"))))
    found: list[Finding] = []
    seen: set[int] = set()
    for frames in sections:
        user = [f for f in frames if not is_library_file(f.file)][:3]
        for frame in user:
            path = frame.file
            if base and not os.path.isabs(path):
                path = os.path.join(base, path)
            code = linecache.getline(path, frame.line)
            for hazard, expr, token, taken in held:
                if id(hazard) in seen or not token:
                    continue
                if re.search(rf"(?<!\w){re.escape(token)}(?!\w)", code):
                    seen.add(id(hazard))
                    text = LOCK_LINK.format(
                        lock=expr, where=frame_text(frame),
                        holder=str(hazard.evidence.get("name", "?")),
                        started=_started(hazard), taken=_short_at(taken))
                    found.append(Finding(hazard, text))
    return found


def _held_locks(hazard: Hazard) -> list[dict[str, Any]]:
    """The ``with`` blocks a fork-time thread was inside whose lock may have been held."""
    if hazard.kind != "thread":
        return []
    locks = hazard.evidence.get("locks")
    return [lock for lock in (locks if isinstance(locks, list) else [])
            if isinstance(lock, dict) and lock.get("locked") is not False and lock.get("lock")]


def native_findings(natives: Sequence[tuple[_procinfo.Task, tuple[str, ...]]],
                    hazards: Sequence[Hazard]) -> list[Finding]:
    """Child threads blocked inside a runtime active at fork, or a library whose thread was."""
    from forksafe import _catalog

    found: list[Finding] = []
    seen: set[int] = set()
    several = len(natives) > 1
    for task, libs in natives:
        who = f"its thread {task.tid} ({task.name})" if several else "it"
        names = {os.path.basename(p) for p in libs} | {os.path.realpath(p) for p in libs}
        for hazard in hazards:
            if id(hazard) in seen:
                continue
            ev = hazard.evidence
            call = task.blocked_in or "a wait"
            if hazard.kind == "native-runtime" and ev.get("active"):
                paths = [str(p) for p in ev.get("libraries", []) if isinstance(p, str)]
                hit = next((p for p in paths if _same(p, names)), None)
                if hit is None:
                    continue
                try:
                    runtime = _catalog.find(str(ev.get("runtime"))).name
                except KeyError:
                    runtime = str(ev.get("runtime"))
                signals = ", ".join(str(x) for x in ev.get("signals", ())) or "active"
                text = RUNTIME_LINK.format(who=who, call=call, library=os.path.basename(hit),
                                           runtime=runtime, signals=signals)
            elif hazard.kind == "native-thread" and isinstance(ev.get("owner"), str):
                owner = str(ev["owner"])
                if not _same(owner, names):
                    continue
                text = THREAD_LINK.format(who=who, call=call, library=os.path.basename(owner),
                                          holder=str(ev.get("name", "?")))
            else:
                continue
            seen.add(id(hazard))
            found.append(Finding(hazard, text))
    return found


def _same(path: str, names: set[str]) -> bool:
    return os.path.basename(path) in names or os.path.realpath(path) in names


def _started(hazard: Hazard) -> str:
    started = hazard.evidence.get("started_at")
    if not isinstance(started, list):
        return ""
    from forksafe._frames import user_site

    sites = [Site.from_dict(s) for s in started if isinstance(s, dict)]
    site = user_site(sites)
    return f" (started at {short_file(site.file)}:{site.line})" if site else ""


def _short_at(at: str) -> str:
    path, _, line = at.rpartition(":")
    return f"{short_file(path)}:{line}" if path else at


class HangMonitor:
    """Watches forked children; reports (and ends) those stuck in a fork-explained wait."""

    def __init__(
        self,
        timeout: float,
        *,
        on_hung: Callable[[ForkEvent, Outcome], None],
        directory: str | None = None,
        kill: bool = True,
        proc: str = "/proc",
        _clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.timeout = timeout
        self.on_hung = on_hung
        self.directory = directory or state_dir()
        self.kill = kill
        self.proc = proc
        self._clock = _clock
        # child pid -> [event, start time, last sample, time of last change, quiet]
        self._watched: dict[int, list[Any]] = {}
        self.hung: list[ForkEvent] = []

    @property
    def interval(self) -> float:
        """How often to poll: often enough to notice within a quarter of the timeout."""
        return max(0.02, min(0.25, self.timeout / 4))

    def __len__(self) -> int:
        return len(self._watched)

    def add(self, event: ForkEvent) -> None:
        pid = event.child_pid
        if pid is None or event.action == "refused" or len(self._watched) >= MAX_WATCHED:
            return
        state = _procinfo.process_state(pid, proc=self.proc)
        if state is None:
            return
        self._watched[pid] = [event, state[1], None, self._clock(), False]

    def poll(self) -> None:
        now = self._clock()
        for pid, watch in list(self._watched.items()):
            event, started, last, since, quiet = watch
            current = sample(pid, started, proc=self.proc)
            if current is None:
                del self._watched[pid]
                continue
            if current != last:
                watch[2], watch[3], watch[4] = current, now, False
                continue
            if quiet or now - since < self.timeout:
                continue
            outcome = analyse(event, now - since, directory=self.directory, proc=self.proc)
            if outcome is None:
                # Stuck but unexplained: idle; look again once it moves. Sampled anew,
                # because a dump signal of ours woke it for a moment: that is not
                # progress, and must not make an idle worker get one every timeout.
                watch[2], watch[4] = sample(pid, started, proc=self.proc), True
                continue
            del self._watched[pid]
            self._report(pid, event, outcome)

    def _report(self, pid: int, event: ForkEvent, outcome: Outcome) -> None:
        marker = hung_path(pid, directory=self.directory)
        try:
            with open(marker + ".tmp", "w", encoding="utf-8") as f:
                json.dump(outcome.to_dict(), f)
            os.replace(marker + ".tmp", marker)
        except OSError:
            pass
        self.hung.append(event)
        try:
            self.on_hung(event, outcome)
        finally:
            if self.kill:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


# -- the helper process for install(hang_timeout=...) outside `forksafe run` ----------------


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
        if not _is_python(sys.executable):
            # Embedded interpreters (uWSGI, some app servers) name their own binary
            # here: starting it with our arguments would start another server.
            raise OSError(f"sys.executable {sys.executable!r} is not a Python interpreter")
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, FORKSAFE_POLICY="off")
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
        argv = [sys.executable, "-m", "forksafe._hang", "--timeout", repr(self.timeout),
                "--dir", state_dir(), "--parent", str(os.getpid())]
        if self.report:
            argv += ["--report", self.report]
        env["FORKSAFE_HELPER_DETACH"] = "1"
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


def _is_python(executable: str | None) -> bool:
    name = os.path.basename(executable or "").lower()
    return name.startswith(("python", "pypy")) and os.access(executable or "", os.X_OK)


def send(sock: socket.socket, data: bytes) -> bool:
    """Send ``data`` without blocking and without SIGPIPE; False if (all of) it was not sent.

    Also used in a forked child (``_child._announce_from_preexec``): a single
    system call, no lock.
    """
    try:
        return sock.send(data, _SEND_FLAGS) == len(data)
    except BlockingIOError:
        return False


_SEND_FLAGS = getattr(socket, "MSG_DONTWAIT", 0) | getattr(socket, "MSG_NOSIGNAL", 0)


_client: Client | None = None


def client(timeout: float) -> Client:
    """This process's helper client (a forked child gets its own, not its parent's)."""
    global _client
    if _client is None or _client.owner != os.getpid() or _client.timeout != timeout:
        report = None
        try:
            from forksafe import _guard

            sink = getattr(_guard, "_sink", None)  # the guard's open report file, if any
            report = getattr(sink, "path", None)
        except Exception:
            report = None
        _client = Client(timeout, report or os.environ.get("FORKSAFE_REPORT") or None)
    return _client


def main(argv: Sequence[str] | None = None) -> int:
    """The helper: read fork events on stdin, watch the children, report the hung ones."""
    parser = argparse.ArgumentParser(prog="python -m forksafe._hang")
    parser.add_argument("--timeout", type=float, required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--report")
    args = parser.parse_args(argv)
    parent = _Parent(args.parent)  # before detaching: the parent waits for that
    if os.environ.pop("FORKSAFE_HELPER_DETACH", None) and os.fork() > 0:
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
            print(ENDED.format(diagnosis=outcome.diagnosis), file=sys.stderr, flush=True)
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
