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
finish; its parent sees the outcome ``hung`` when it reaps it (the monitor
leaves a marker, ``forksafe._statedir``).

The monitor runs in ``forksafe run`` or in the helper process
(``forksafe._helper``); the sentences are ``forksafe._render.outcomes``'s.
"""

from __future__ import annotations

import contextlib
import itertools
import linecache
import os
import re
import signal
import stat
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from forksafe._child import DUMP_SIGNAL
from forksafe._platform import _procinfo
from forksafe._render import forks, outcomes
from forksafe._report import ForkEvent, Hazard, Outcome, Severity, Site
from forksafe._stall import (
    Finding,
    idle_loop,
    idle_syscalls,
    ownership_findings,
    stall_note,
)
from forksafe._statedir import (
    crash_path,
    remove_marker,
    stall_path,
    write_hung_marker,
    write_marker,
)
from forksafe._tracebacks import parse_sections

#: The system calls a thread blocked acquiring a lock is seen in (after a signal
#: interrupted a futex wait with a timeout, the kernel restarts it as restart_syscall).
_LOCK_WAITS = ("futex", "restart_syscall")

#: How long to wait for a stuck child's faulthandler dump to appear.
DUMP_WAIT = 1.0
#: The most children watched at once (bounded memory for huge pools).
MAX_WATCHED = 4096


def sample(pid: int, started: str | None, *, proc: str = "/proc") -> tuple[Any, ...] | None:
    """What changes whenever ``pid`` makes any progress; None when it is gone or dead."""
    found = _sample(pid, started, proc=proc)
    return None if found is None else found[0]


def _sample(pid: int, started: str | None, *, proc: str
            ) -> tuple[tuple[Any, ...], list[_procinfo.Task]] | None:
    state = _procinfo.process_state(pid, proc=proc)
    if state is None or state[0] in ("Z", "X") or (started is not None and state[1] != started):
        return None
    tasks = _procinfo.tasks(pid, proc=proc)
    if any(t.state in ("T", "t") for t in tasks):
        # Stopped (Ctrl-Z, SIGSTOP) or held by a debugger: someone is looking at it,
        # so it is never "stuck"; a sample that differs every time says so.
        return ("stopped", next(_stops)), tasks
    return tuple((t.tid, t.state, t.syscall, t.schedstat) for t in tasks), tasks


_stops = itertools.count()


def request_dump(pid: int, *, directory: str | None, wait: float = DUMP_WAIT) -> str:
    """Ask the child for its Python stacks (DUMP_SIGNAL) and return what it wrote.

    Sent only when the child catches the signal (armed by ``_child.arm``): the
    default action of a real-time signal would kill it. The dump is cut off the
    crash file again, so that a later crash finds the file as it was. The file
    is opened once, without following a link, and must be a regular file of
    ours: sizes, reading and cutting then go through that descriptor, never
    through a path that could be swapped meanwhile.
    """
    if directory is None or DUMP_SIGNAL is None or not _procinfo.catches(pid, DUMP_SIGNAL):
        return ""
    path = crash_path(pid, directory=directory)
    if _procinfo.has_open(pid, path) is False:
        # The program closed its crash file (daemons close "all other"
        # descriptors): faulthandler would write into whatever file now has that
        # number. Better no stacks than a stack dump in someone's data.
        return ""
    try:
        fd = os.open(path, _DUMP_FLAGS)
    except OSError:
        return ""
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            return ""
        before = info.st_size
        os.kill(pid, DUMP_SIGNAL)
        deadline = time.monotonic() + wait
        size, stable = before, 0
        while time.monotonic() < deadline and stable < 3:
            time.sleep(0.02)
            now = os.fstat(fd).st_size
            stable = stable + 1 if now == size and now > before else 0
            size = now
        data = os.pread(fd, 64 * 1024, before)
        os.ftruncate(fd, before)
    except OSError:
        return ""
    finally:
        os.close(fd)
    return data.decode("utf-8", "replace").strip()


_DUMP_FLAGS = os.O_RDWR | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)


@dataclass
class Analysis:
    """What a stuck child's wait is: a hang a fork-time hazard explains (``outcome``), a
    stall nothing explains (``stall``, a note), or neither (idle); and the Python stacks
    asked for on the way (``sections``, innermost first, the signalled thread first)."""

    outcome: Outcome | None = None
    stall: Outcome | None = None
    sections: list[list[Site]] = field(default_factory=list)


def analyse(event: ForkEvent, seconds: float, *, directory: str | None,
            proc: str = "/proc", polling: bool = False) -> Analysis:
    """What ``event``'s stuck child waits for (see ``Analysis``).

    ``polling``: the child is not stuck by the strict rule (its main thread wakes and
    sleeps) but its main thread has polled in place for ``seconds``; only a fork-time
    hazard's code on its stack makes that a hang, and nothing makes it a stall.
    """
    pid = event.child_pid
    if pid is None:
        return Analysis()
    hazards = [h for h in event.report.hazards if h.severity >= Severity.WARNING]
    tasks = _procinfo.tasks(pid, proc=proc)
    calls = [t.blocked_in for t in tasks]
    if not hazards and idle_syscalls(calls) and not polling:
        return Analysis()  # a clean fork waiting for the outside world: idle
    reader = _procinfo.StackReader(pid, proc=proc)
    natives = [(t, reader.libraries(t)) for t in tasks if t.blocked_in is not None]
    found_native = native_findings(natives, hazards)
    # The dump signal interrupts the child's wait (restarted, or EINTR that Python
    # retries); it is sent only when its answer matters: to find a lock or the code a
    # wait is in, to show the stacks of a child about to be reported, or to tell a
    # stall from an idle worker. A child of a clean fork waiting for the outside world
    # (read, poll, sleep, accept) is never asked.
    lockish = any(t.blocked_in in _LOCK_WAITS or (t.blocked_in or "").startswith("syscall ")
                  for t in tasks)
    want = (found_native or polling or not idle_syscalls(calls) or _owns_io(hazards)
            or (lockish and any(_held_locks(h) for h in hazards)))
    dump = request_dump(pid, directory=directory) if want else ""
    sections = parse_sections(dump)
    base = _procinfo.cwd(pid, proc=proc)
    findings = _unique(lock_findings(sections, hazards, base=base) + found_native
                       + ownership_findings(sections, calls, hazards))
    native = "\n".join(outcomes.native_thread(t.tid, t.name, t.blocked_in, t.wchan, libs)
                       for t, libs in natives)
    traceback = "\n\n".join(part for part in (dump, "Native threads:\n" + native) if part)
    if findings:
        diagnosis = outcomes.hang(pid, forks.describe_fork(event.mechanism, event.site),
                                  seconds, [f.text for f in findings],
                                  findings[0].hazard.remedy)
        return Analysis(Outcome("hung", None, None, traceback, diagnosis), None, sections)
    if polling or idle_syscalls(calls) or (
            sections and all(idle_loop(frames) for frames in sections if frames)):
        return Analysis(None, None, sections)  # a poller, or a worker idle in its loop
    diagnosis, stacks = stall_note(seconds, sections, calls, traceback)
    return Analysis(None, Outcome("stalled", None, None, stacks, diagnosis), sections)


def _ownable(hazards: Sequence[Hazard]) -> bool:
    """Whether a stack could show a hazard's code: a vanished thread's library, or the
    Python side of an active runtime's (``forksafe._stall.ownership_findings``)."""
    from forksafe._diagnose import thread_packages

    return _owns_io(hazards) or any(
        h.kind == "thread" and thread_packages(h.evidence, libraries=True) for h in hazards)


def _owns_io(hazards: Sequence[Hazard]) -> bool:
    """Whether a hazard can own a wait for I/O (a read, a poll): the Python side of an
    active runtime, or a thread the child's reads depend on (a queue's feeder)."""
    from forksafe import _catalog
    from forksafe._stall import IO_FEEDERS

    return any(
        (h.kind == "native-runtime" and h.evidence.get("active")
         and _catalog.modules_of(h.evidence.get("runtime")))
        or (h.kind == "thread" and h.evidence.get("known") in IO_FEEDERS)
        for h in hazards)


def _unique(findings: list[Finding]) -> list[Finding]:
    """One finding per hazard, the first found (locks, then native code, then packages)."""
    seen: set[int] = set()
    unique = []
    for finding in findings:
        if id(finding.hazard) not in seen:
            seen.add(id(finding.hazard))
            unique.append(finding)
    return unique


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
                    text = outcomes.lock_link(expr, frame, str(hazard.evidence.get("name", "?")),
                                              _started(hazard), taken)
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
        who = outcomes.blocked_thread(task.tid, task.name, several)
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
                text = outcomes.runtime_link(who, call, hit, runtime, signals)
            elif hazard.kind == "native-thread" and isinstance(ev.get("owner"), str):
                owner = str(ev["owner"])
                if not _same(owner, names):
                    continue
                # One sentence for all of the library's vanished threads.
                mates = [h for h in hazards if h.kind == "native-thread"
                         and h.evidence.get("owner") == owner]
                seen.update(id(h) for h in mates)
                text = outcomes.thread_link(who, call, owner,
                                            [str(h.evidence.get("name", "?")) for h in mates])
            else:
                continue
            seen.add(id(hazard))
            found.append(Finding(hazard, text))
    return found


def _same(path: str, names: set[str]) -> bool:
    return os.path.basename(path) in names or os.path.realpath(path) in names


def _started(hazard: Hazard) -> Site | None:
    """Where the thread of a hazard was started, in the user's code if known."""
    started = hazard.evidence.get("started_at")
    if not isinstance(started, list):
        return None
    from forksafe._frames import user_site

    return user_site([Site.from_dict(s) for s in started if isinstance(s, dict)])


class _Watch:
    """One watched child: its fork, and what the monitor last saw of it."""

    __slots__ = ("event", "last", "linkable", "poll_cpu", "poll_frames", "poll_line",
                 "poll_since", "quiet", "since", "stalled", "started")

    def __init__(self, event: ForkEvent, started: str, now: float) -> None:
        self.event = event
        self.started = started
        self.last: Any = None
        self.since = now  # when it last made progress
        self.quiet = False  # analysed while stuck, nothing to report: wait for progress
        self.stalled = False  # a stall note is out for it
        self.linkable = _ownable([h for h in event.report.hazards
                                  if h.severity >= Severity.WARNING])
        # Its main thread polling in place: the syscall line, since when, its CPU time
        # then, and its Python frames at half the timeout.
        self.poll_line: str | None = None
        self.poll_since = now
        self.poll_cpu = 0
        self.poll_frames: list[Site] | None = None


class HangMonitor:
    """Watches forked children; reports (and ends) those stuck in a fork-explained wait,
    and keeps a note on those stalled for no reason it can tell (never ending them)."""

    def __init__(
        self,
        timeout: float,
        *,
        on_hung: Callable[[ForkEvent, Outcome], None],
        directory: str | None,
        kill: bool = True,
        proc: str = "/proc",
        on_stall: Callable[[ForkEvent, Outcome | None], None] | None = None,
        _clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.timeout = timeout
        self.on_hung = on_hung
        # Told of a stall note (and of its end, with None) when given.
        self.on_stall = on_stall
        # The state directory (crash files, hang markers) as the watched program checked
        # it; None: there is none, so no Python stacks are asked for and no marker left.
        self.directory = directory
        self.kill = kill
        self.proc = proc
        self._clock = _clock
        self._watched: dict[int, _Watch] = {}
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
        self._watched[pid] = _Watch(event, state[1], self._clock())

    def poll(self) -> None:
        now = self._clock()
        for pid, watch in list(self._watched.items()):
            found = _sample(pid, watch.started, proc=self.proc)
            if found is None:
                del self._watched[pid]  # gone: a stall note stays for its parent to read
                continue
            current, tasks = found
            if current != watch.last:
                watch.last, watch.since, watch.quiet = current, now, False
                if watch.stalled:
                    self._unstall(pid, watch)
                if watch.linkable:
                    self._poll_in_place(pid, watch, tasks, now)
                continue
            if watch.quiet or now - watch.since < self.timeout:
                continue
            analysis = analyse(watch.event, now - watch.since, directory=self.directory,
                               proc=self.proc)
            if analysis.outcome is not None:
                del self._watched[pid]
                self._report(pid, watch.event, analysis.outcome)
                continue
            if analysis.stall is not None and not watch.stalled:
                self._stall(pid, watch, analysis.stall)
            # Stuck but not hung: look again once it moves. Sampled anew, because a dump
            # signal of ours woke it for a moment: that is not progress, and must not make
            # an idle worker get one every timeout.
            watch.last, watch.quiet = sample(pid, watch.started, proc=self.proc), True

    def _poll_in_place(self, pid: int, watch: _Watch, tasks: list[_procinfo.Task],
                       now: float) -> None:
        """A child whose main thread wakes and sleeps (so never stuck by the strict rule)
        but makes no Python progress: same system call line (number, arguments, stack
        pointer) and little CPU for the whole timeout, and the same Python frames at half
        of it and at the end. Only checked for a child whose fork left a hazard whose code
        could be on its stack (``_ownable``)."""
        main = next((t for t in tasks if t.tid == pid), None)
        line = main.syscall if main is not None and main.blocked_in is not None else None
        cpu = _cpu_ns(main)
        if line is None or line != watch.poll_line:
            watch.poll_line, watch.poll_since, watch.poll_cpu = line, now, cpu
            watch.poll_frames = None
            return
        elapsed = now - watch.poll_since
        if elapsed < self.timeout / 2:
            return
        if (cpu - watch.poll_cpu) / 1e9 > POLL_CPU * elapsed:
            watch.poll_since, watch.poll_cpu, watch.poll_frames = now, cpu, None  # computing
            return
        if watch.poll_frames is None:
            sections = parse_sections(request_dump(pid, directory=self.directory))
            watch.poll_frames = sections[0] if sections else []
            return
        if elapsed < self.timeout:
            return
        analysis = analyse(watch.event, elapsed, directory=self.directory, proc=self.proc,
                           polling=True)
        again = analysis.sections[0] if analysis.sections else []
        if not again or _places(again) != _places(watch.poll_frames):
            watch.poll_since, watch.poll_frames = now, None  # it moved: Python progress
            return
        if analysis.outcome is not None:
            del self._watched[pid]
            self._report(pid, watch.event, analysis.outcome)
            return
        watch.poll_line = "explained: nothing"  # look again once its system call changes

    def _stall(self, pid: int, watch: _Watch, note: Outcome) -> None:
        watch.stalled = True
        if self.directory is not None:
            write_marker(stall_path(pid, directory=self.directory), note)
        if self.on_stall is not None:
            self.on_stall(watch.event, note)

    def _unstall(self, pid: int, watch: _Watch) -> None:
        watch.stalled = False
        if self.directory is not None:
            remove_marker(stall_path(pid, directory=self.directory))
        if self.on_stall is not None:
            self.on_stall(watch.event, None)

    def _report(self, pid: int, event: ForkEvent, outcome: Outcome) -> None:
        if self.directory is not None:
            write_hung_marker(pid, outcome, directory=self.directory)
        self.hung.append(event)
        try:
            self.on_hung(event, outcome)
        finally:
            if self.kill:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


#: The most CPU a thread polling in place may use (a share of the time): more is work.
POLL_CPU = 0.05


def _cpu_ns(task: _procinfo.Task | None) -> int:
    try:
        return int(task.schedstat.split()[0]) if task is not None else 0
    except (ValueError, IndexError):
        return 0


def _places(frames: Sequence[Site]) -> list[tuple[str, int, str]]:
    return [(f.file, f.line, f.function) for f in frames]
