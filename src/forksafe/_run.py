"""``forksafe run -- COMMAND``: guard a whole process tree, supervise it, report once.

How it works:

* COMMAND runs with ``FORKSAFE_POLICY``, ``FORKSAFE_REPORT`` (a private
  JSON-lines file), ``FORKSAFE_HANG_TIMEOUT``, ``FORKSAFE_STATE_DIR`` (where
  children leave crash files) and ``FORKSAFE_SUPERVISOR`` set
  (``forksafe._config.tree_environment``). The environment hook (``_hook.py``)
  installs the guard in every Python process of the tree that has forksafe
  installed; each appends its fork and outcome events to the file with one
  ``O_APPEND`` write per line (``_sink.py``), so concurrent writers never
  interleave, and a process that dies mid-write loses at most its own last line,
  which the reader skips (``forksafe._runreport``).
* This process supervises from outside: it tails the event file, and with
  ``--hang-timeout`` watches every forked child through procfs
  (``_hang.HangMonitor``). It is an ancestor of every process in the tree (it
  makes itself a child subreaper, so orphans are re-parented to it), which is
  what lets it read a stuck child's stack even under Yama's ptrace_scope=1.
* COMMAND stays in this process's session and process group (``--new-session``
  gives it its own), so it keeps the controlling terminal: ``/dev/tty``, password
  prompts, ``pdb``, Ctrl-Z all work as without forksafe. A signal the terminal
  sends (Ctrl-C) reaches COMMAND's group by itself and is not sent again; one
  sent to ``forksafe run`` (``kill``, a CI runner, systemd) is passed to COMMAND's
  main process only (a Celery master must get SIGTERM, its pool children must not:
  the master stops them), or with ``--signal-group`` to its whole group. COMMAND
  still running ``--grace`` seconds after a SIGTERM, or a second Ctrl-C within that
  time, and its whole tree is killed (SIGKILL): a COMMAND that ignores signals
  never makes ``forksafe run`` wait forever.
* Signals and the end of children are waited for, never polled for: the
  forwarded signals and SIGCHLD are blocked and taken with ``sigtimedwait``, so
  COMMAND's exit wakes this process at once, and the ``si_code`` tells a
  terminal's signal from a ``kill``. COMMAND is started with ``posix_spawn``
  (nothing of Python runs between fork and exec) before anything but what the
  start needs is imported: the event file's reader is loaded once there are
  events (docs/follow.md, "Start-up cost"; ``benchmarks/bench_run_start.py``).
* When COMMAND ends, whatever it left running (every descendant of this
  process; its process group too with ``--new-session``) is sent SIGTERM, then
  SIGKILL after a second: no process is left behind. A watchdog process
  (``forksafe._watchdog``) does the same, and removes the temporary directories,
  should ``forksafe run`` itself be killed by SIGKILL.
* The exit status is COMMAND's own; when COMMAND was killed by signal N it is
  128+N, the shell's convention (re-raising the signal in ourselves would make
  a SIGSEGV'd command look like a crash of forksafe).
* At the end, one summary goes to stderr (stdout belongs to COMMAND), and with
  ``--report FILE`` the JSON report (docs/report-format.md) is written (atomically).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import time

from forksafe import _config, _watchdog
from forksafe._errors import UsageError
from forksafe._render.text import printable

TYPE_CHECKING = False  # typing and the report model are not imported before COMMAND runs
if TYPE_CHECKING:
    import argparse
    from types import FrameType
    from typing import Any, Iterable, TextIO

    from forksafe._report import ForkEvent, Outcome
    from forksafe._runreport import EventTail, Merger

NO_COMMAND = "forksafe run: no command given; usage: forksafe run [OPTIONS] -- COMMAND [ARG]..."
CANNOT_RUN = "forksafe run: cannot run {command!r}: {error}"
REPORT_WRITTEN = "forksafe: report written to {path}"
REPORT_LOST = "the summary above is all there is; exit code {code} is COMMAND's own"
#: Said when forksafe run ends COMMAND's tree itself.
KILLED_AFTER_GRACE = ("forksafe run: COMMAND still runs {grace:g} s after SIGTERM; "
                      "killing its process tree (SIGKILL)")
KILLED_ON_SECOND_INTERRUPT = ("forksafe run: second interrupt (Ctrl-C) within {grace:g} s; "
                              "killing COMMAND's process tree (SIGKILL)")

#: ``forksafe._report.SCHEMA`` and the form of its times, for a report made without the
#: model (a test keeps them equal).
SCHEMA = "forksafe-report/1"
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"

#: Signals passed on to COMMAND.
FORWARDED = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT")
#: Seconds COMMAND gets after SIGTERM, and the most between two Ctrl-C that kill its tree.
GRACE = 10.0
#: How long processes COMMAND left behind get between SIGTERM and SIGKILL.
LEFTOVER_GRACE = 1.0
#: How often events are read when no hang timeout asks for more (a child's exit or a
#: signal wakes the supervisor at once whatever this is).
POLL = 0.1

PR_SET_CHILD_SUBREAPER = 36
#: ``si_code`` of a signal the kernel sent: a terminal's Ctrl-C, Ctrl-\\ or hangup.
SI_KERNEL = 0x80


def cli(args: argparse.Namespace) -> int:
    """The ``forksafe run`` subcommand (arguments parsed by ``_cli``)."""
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise UsageError(NO_COMMAND)
    if args.report:
        from forksafe._reportfile import check_writable

        check_writable(args.report)
    from forksafe import _accept

    try:
        rules = "; ".join(rule.text() for rule in _accept.command_rules(args.accept))
    except _accept.AcceptError as exc:
        raise UsageError(f"forksafe: {exc}") from exc
    result = run(argv, policy=args.policy, hang_timeout=args.hang_timeout, accept=rules,
                 new_session=args.new_session, signal_group=args.signal_group,
                 grace=GRACE if args.grace is None else args.grace)
    sys.stderr.write(printable(summary(result.report)) + "\n")
    if args.report:
        from forksafe._reportfile import write_report

        # COMMAND has run: its exit code is the result, also when the report cannot be
        # written now (a full disk, a directory removed meanwhile): one line says so.
        try:
            write_report(result.report, args.report)
        except UsageError as exc:
            sys.stderr.write(f"{exc}; {REPORT_LOST.format(code=result.exit_code)}\n")
        else:
            sys.stderr.write(REPORT_WRITTEN.format(path=args.report) + "\n")
    sys.stderr.flush()
    return result.exit_code


def summary(report: dict[str, Any]) -> str:
    """The run's summary; for a run without a fork, without loading the report model."""
    if not report["forks"] and not report.get("forks_omitted"):
        from forksafe._render.runs import render_events

        return render_events(report["command"], report["exit_code"], [])
    from forksafe._runreport import render_run

    return render_run(report)


class RunResult:
    """What a run came to: COMMAND's exit code (the shell's view) and the merged report."""

    def __init__(self, exit_code: int, report: dict[str, Any], skipped_lines: int = 0,
                 hung: list[ForkEvent] | None = None) -> None:
        self.exit_code = exit_code
        self.report = report
        self.skipped_lines = skipped_lines
        self.hung = [] if hung is None else hung


def run(
    argv: list[str],
    *,
    policy: str = "warn",
    hang_timeout: float | None = None,
    env: dict[str, str] | None = None,
    stderr: TextIO | None = None,
    accept: str = "",
    new_session: bool = False,
    signal_group: bool = False,
    grace: float = GRACE,
) -> RunResult:
    """Run ``argv`` guarded and supervised; return its exit code and the merged report."""
    out = sys.stderr if stderr is None else stderr
    workdir = _private_directory("forksafe-run-", _temp_root())
    try:
        state = _private_directory("forksafe-run-state-", _fast_root())
    except OSError:
        state = _private_directory("forksafe-run-state-", _temp_root())
    # Before COMMAND exists: should we be SIGKILLed from here on, it cleans up for us.
    watchdog = _watchdog.start([workdir, state])
    try:
        events = os.path.join(workdir, "events.jsonl")
        child_env = _config.tree_environment(
            os.environ if env is None else env, policy=policy, hang_timeout=hang_timeout,
            report=events, state_dir=state, supervisor=os.getpid(), accept=accept)
        _become_subreaper()
        # Signals are taken from before COMMAND starts until everything it left is
        # gone: one arriving in between must not end us and orphan COMMAND.
        with _Signals() as signals:
            supervisor = _Supervisor(events, state, hang_timeout, out, signals,
                                     spare=watchdog.pid if watchdog else None,
                                     new_session=new_session, signal_group=signal_group,
                                     grace=grace)
            started = time.time()
            try:
                pid = _spawn(argv, child_env, new_session=new_session, mask=signals.mask)
            except OSError as exc:
                raise UsageError(CANNOT_RUN.format(command=argv[0],
                                                   error=exc.strerror or exc)) from exc
            if watchdog is not None:
                watchdog.command(pid, group=pid if new_session else None)
            try:
                status = supervisor.supervise(pid)
            finally:  # also if supervising failed: no process is left behind
                supervisor.end_leftovers()
        duration = time.time() - started
        report = supervisor.report(argv, exit_code(status), pid=pid, started=started,
                                   duration=duration)
        return RunResult(exit_code(status), report, supervisor.skipped, supervisor.hung)
    finally:
        _remove(workdir)
        _remove(state)
        if watchdog is not None:
            watchdog.done()


def exit_code(status: int) -> int:
    """The shell's view of a wait status: the exit code, or 128+N for death by signal N."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    return 1


class _Supervisor:
    """COMMAND's supervisor: reaps, reads events, passes signals on, ends the tree."""

    def __init__(self, events: str, state: str, hang_timeout: float | None, out: TextIO,
                 signals: _Signals, *, spare: int | None, new_session: bool,
                 signal_group: bool, grace: float) -> None:
        self.events = events
        self.state = state
        self.out = out
        self.signals = signals
        self.spare = spare  # the watchdog: a child of ours, never signalled
        self.new_session = new_session
        self.signal_group = signal_group
        self.grace = grace
        self.pid = 0
        self.tail: EventTail | None = None
        self.merger: Merger | None = None
        self.hung: list[ForkEvent] = []
        # Children stalled for no reason the monitor could tell: never ended, shown.
        self.stalls: dict[tuple[int | None, int | None], Outcome] = {}
        self.extra: list[dict[str, Any]] = []  # outcomes this process adds itself
        self.monitor: Any = None
        if hang_timeout is not None:
            self._watch_hangs(hang_timeout)
        self.kill_at: float | None = None  # the end of the grace period after SIGTERM
        self.interrupted_at: float | None = None  # the last Ctrl-C
        self.killed = False

    # -- waiting ---------------------------------------------------------------------

    def supervise(self, pid: int) -> int:
        """Wait for COMMAND, reaping orphans, merging events, feeding the hang monitor,
        passing signals on; COMMAND's wait status."""
        self.pid = pid
        interval = POLL if self.monitor is None else min(POLL, self.monitor.interval)
        while True:
            status = _reap(pid)
            if status is not None:
                return status
            self._read()
            if self.monitor is not None:
                self.monitor.poll()
            timeout = interval
            if self.kill_at is not None and not self.killed:
                left = self.kill_at - time.monotonic()
                if left <= 0:
                    self._kill_tree(KILLED_AFTER_GRACE.format(grace=self.grace))
                else:
                    timeout = min(timeout, left)
            for signum, from_terminal in self.signals.wait(timeout):
                self._on_signal(signum, from_terminal)

    def _on_signal(self, signum: int, from_terminal: bool) -> None:
        if signum == signal.SIGCHLD:
            return  # a child ended: the loop reaps
        now = time.monotonic()
        if signum == signal.SIGINT:
            if self.interrupted_at is not None and now - self.interrupted_at <= self.grace:
                self._kill_tree(KILLED_ON_SECOND_INTERRUPT.format(grace=self.grace))
                return
            self.interrupted_at = now
        if not (from_terminal and self._shares_terminal_group()):
            self._send(signum)
        if signum == signal.SIGTERM and self.kill_at is None:
            self.kill_at = now + self.grace

    def _shares_terminal_group(self) -> bool:
        """Whether a signal the terminal sent to our process group reached COMMAND too:
        it is in our group unless it was given a session or moved itself out."""
        if self.new_session:
            return False
        try:
            return os.getpgid(self.pid) == os.getpgrp()
        except OSError:
            return False

    def _send(self, signum: int) -> None:
        """``signum`` to COMMAND's main process, or with ``--signal-group`` to its group:
        its own group with ``--new-session``, else every process of its tree (the group
        it shares is ours, and perhaps a pipeline's: ``| tee`` must not get it)."""
        if not self.signal_group:
            with contextlib.suppress(OSError):
                os.kill(self.pid, signum)
            return
        if self.new_session:
            with contextlib.suppress(OSError):
                os.killpg(self.pid, signum)
            return
        for pid in sorted({self.pid, *self._tree()}):  # COMMAND is in its own tree
            with contextlib.suppress(OSError):
                os.kill(pid, signum)

    def _kill_tree(self, why: str) -> None:
        self.killed = True
        with contextlib.suppress(OSError, ValueError):  # stderr may be gone
            self.out.write(printable(why) + "\n")
            self.out.flush()
        if self.new_session:
            with contextlib.suppress(OSError):
                os.killpg(self.pid, signal.SIGKILL)
        for pid in sorted({self.pid, *self._tree()}):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def _tree(self) -> list[int]:
        if _only_child(self.spare):
            return []  # nothing below us but the watchdog: no procfs scan needed
        return [pid for pid in _leftovers(self.pid if self.new_session else None)
                if pid != self.spare]

    def end_leftovers(self) -> None:
        """Whatever COMMAND left running: SIGTERM, then SIGKILL; reap them all. The
        watchdog (a child of ours too) is left to exit when told."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            targets = self._tree()
            if not targets:
                return
            for pid in targets:
                with contextlib.suppress(OSError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + LEFTOVER_GRACE
            while time.monotonic() < deadline:
                _reap(-1)
                if not self._tree():
                    return
                time.sleep(0.02)
        _reap(-1)

    # -- events ----------------------------------------------------------------------

    def _read(self) -> None:
        """Merge the events written since the last read. The reader (and the report
        model it needs) is imported only once there is an event file: a COMMAND that
        never forks costs none of it."""
        if self.tail is None:
            if not self.extra and not _has_data(self.events):
                return  # the guard makes the file at its start: empty, it says nothing
            from forksafe._runreport import EventTail, Merger

            self.tail = EventTail(self.events)
            self.merger = Merger(state=self.state)
        assert self.merger is not None
        if self.extra:
            self.tail.extra.extend(self.extra)
            self.extra.clear()
        for record in self.tail.read():
            self.merger.add(record)
            if self.monitor is not None and record.get("type") in ("fork", "fork-pending"):
                from forksafe._report import ForkEvent

                with contextlib.suppress(ValueError, TypeError):
                    self.monitor.add(ForkEvent.from_dict(record))

    @property
    def skipped(self) -> int:
        return self.tail.skipped if self.tail is not None else 0

    def report(self, argv: list[str], code: int, **facts: Any) -> dict[str, Any]:
        """The run report: every event, this process's own outcomes, the stalls."""
        self._read()
        if self.tail is None or self.merger is None:  # not one event: no model needed
            return _empty_report(argv, code, **facts)
        for record in self.tail.read(final=True):
            self.merger.add(record)
        for (parent, child), note in self.stalls.items():
            self.merger.stalled(parent, child, note.to_dict())
        return self.merger.report(argv, code, **facts)

    def _watch_hangs(self, hang_timeout: float) -> None:
        from forksafe._hang import HangMonitor
        from forksafe._render import outcomes

        def on_hung(event: ForkEvent, outcome: Outcome) -> None:
            self.hung.append(event)
            self.extra.append({"type": "outcome", "parent_pid": event.parent_pid,
                               "child_pid": event.child_pid, "outcome": outcome.to_dict()})
            with contextlib.suppress(OSError, ValueError):  # stderr may be gone
                self.out.write(printable(outcomes.hung_live(event.child_pid, hang_timeout))
                               + "\n")
                self.out.flush()

        def on_stall(event: ForkEvent, note: Outcome | None) -> None:
            key = (event.parent_pid, event.child_pid)
            if note is None:
                self.stalls.pop(key, None)  # it moved again
            else:
                self.stalls[key] = note

        self.monitor = HangMonitor(hang_timeout, on_hung=on_hung, directory=self.state,
                                   on_stall=on_stall)


def _has_data(path: str) -> bool:
    try:
        return os.stat(path).st_size > 0
    except OSError:
        return False


def _empty_report(argv: list[str], code: int, *, pid: int, started: float,
                  duration: float) -> dict[str, Any]:
    """The report of a run without one fork event, in ``forksafe._runreport.Merger``'s
    form: what most commands come to, said without importing the report model."""
    return {"schema": SCHEMA, "command": argv, "exit_code": code, "pid": pid,
            "started": time.strftime(TIME_FORMAT, time.gmtime(started)),
            "duration": round(duration, 3), "forks": []}


class _Signals:
    """The signals ``forksafe run`` passes on, and SIGCHLD, taken synchronously.

    Blocked from before COMMAND starts (one that arrives before COMMAND exists
    is kept pending, and passed on once it does) and waited for with
    ``sigtimedwait``, whose ``si_code`` says whether the terminal sent it. A
    signal ignored when ``forksafe run`` started (``nohup``, a shell's background
    job) stays ignored, for COMMAND too. Where ``sigtimedwait`` is missing
    (macOS), handlers wake a ``select`` through ``signal.set_wakeup_fd``; the
    terminal's part is then not known, and a signal is passed on unless it is
    SIGINT or SIGQUIT while this process is in the terminal's foreground group.
    """

    #: Off: the handler way everywhere (tests of it).
    synchronous = hasattr(signal, "sigtimedwait") and hasattr(signal, "pthread_sigmask")

    def __init__(self) -> None:
        self.numbers: set[int] = set()
        self.mask: set[int] = set()  # this process's mask before: COMMAND's
        self._previous: dict[int, Any] = {}
        self._received: list[int] = []
        self._wakeup: tuple[int, int] | None = None
        self._old_wakeup = -1

    def __enter__(self) -> _Signals:
        # An inherited SIG_IGN for SIGCHLD would make the kernel reap our children
        # itself, and waitpid never see COMMAND's status.
        self._previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for name in FORWARDED:
            number = getattr(signal, name, None)
            if number is not None and signal.getsignal(number) != signal.SIG_IGN:
                self.numbers.add(number)
        if self.synchronous:
            self.mask = set(signal.pthread_sigmask(
                signal.SIG_BLOCK, {*self.numbers, signal.SIGCHLD}))
            return self
        self.mask = set(signal.pthread_sigmask(signal.SIG_BLOCK, ())) if hasattr(
            signal, "pthread_sigmask") else set()
        read_end, write_end = os.pipe()
        os.set_blocking(read_end, False)
        os.set_blocking(write_end, False)
        self._wakeup = (read_end, write_end)
        for number in {*self.numbers, signal.SIGCHLD}:
            self._previous.setdefault(number, signal.getsignal(number))
            signal.signal(number, self._handle)
        self._old_wakeup = signal.set_wakeup_fd(write_end)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.synchronous:
            # What arrived after COMMAND ended is let go: the run is over anyway, and
            # unblocking it would kill us before the summary (or raise KeyboardInterrupt).
            while signal.sigtimedwait({*self.numbers, signal.SIGCHLD}, 0) is not None:
                pass
            signal.pthread_sigmask(signal.SIG_SETMASK, self.mask)
        else:
            signal.set_wakeup_fd(self._old_wakeup)
            assert self._wakeup is not None
            for fd in self._wakeup:
                os.close(fd)
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._received.append(signum)

    def wait(self, timeout: float) -> list[tuple[int, bool]]:
        """The signals that arrived, waiting at most ``timeout`` seconds for the first:
        (number, whether the terminal sent it)."""
        if self.synchronous:
            wanted = {*self.numbers, signal.SIGCHLD}
            found = []
            info = signal.sigtimedwait(wanted, max(timeout, 0.0))
            while info is not None:
                found.append((info.si_signo, info.si_code == SI_KERNEL))
                info = signal.sigtimedwait(wanted, 0)
            return found
        import select

        assert self._wakeup is not None
        with contextlib.suppress(InterruptedError):
            select.select([self._wakeup[0]], [], [], max(timeout, 0.0))
        with contextlib.suppress(OSError):
            while os.read(self._wakeup[0], 512):
                pass
        received, self._received = self._received, []
        return [(number, number in (signal.SIGINT, signal.SIGQUIT) and _in_foreground())
                for number in received]


def _in_foreground() -> bool:
    """Whether this process's group is its terminal's foreground group."""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(fd)


def _spawn(argv: list[str], env: dict[str, str], *, new_session: bool,
           mask: Iterable[int]) -> int:
    """Start COMMAND with ``posix_spawn``: no copy of this process's pages and no Python
    between fork and exec, and an exec failure is an OSError here. Looked up on the
    PATH of COMMAND's environment, as ``execvpe`` would; SIGPIPE and SIGXFSZ back to
    their defaults (Python ignores them) and the signal mask as ours was."""
    defaults = [getattr(signal, name) for name in ("SIGPIPE", "SIGXFSZ", "SIGXFZ")
                if hasattr(signal, name)]
    options: dict[str, Any] = {"setsigmask": mask, "setsigdef": defaults}
    if new_session:
        options["setsid"] = True
    program = argv[0]
    candidates = [program] if os.sep in program else [
        os.path.join(directory, program) for directory in os.get_exec_path(env)]
    failure: OSError | None = None
    for path in candidates:
        try:
            return os.posix_spawn(path, argv, env, **options)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.EACCES) or \
                    os.sep in program:
                raise
            if failure is None or failure.errno != errno.EACCES:
                failure = exc  # as execvp: "permission denied" over "not found"
    raise failure or FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)


def _reap(command: int) -> int | None:
    """Reap every exited child (orphans come to us as subreaper); COMMAND's status if done."""
    found = None
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return found
        except InterruptedError:
            continue
        if pid == 0:
            return found
        if pid == command:
            found = status


def _become_subreaper() -> None:
    """Orphans of the tree are re-parented to us, so none escapes supervision."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _leftovers(group: int | None) -> list[int]:
    """Live descendants of ours (COMMAND's tree, subreaped orphans included), and with
    ``group`` the live processes of that process group."""
    me = os.getpid()
    table = _watchdog.processes()
    found = {pid for pid, (_, pgrp) in table.items() if group is not None and pgrp == group}
    found.update(_watchdog.descendants(me, table))
    found.discard(me)
    return sorted(found)


def _only_child(spare: int | None) -> bool:
    """Whether ``spare`` is our one live child (Linux's ``/proc/self/task/*/children``).
    As a subreaper we are an ancestor of every process of the tree, so then nothing of
    it is left; False whenever that cannot be told."""
    if spare is None:
        return False
    try:
        children = []
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/children", "rb") as f:
                children += f.read().split()
    except OSError:
        return False
    return children == [str(spare).encode()]


def _temp_root() -> str:
    """Where ``tempfile`` would make a directory (without importing it: its import
    costs more than the rest of the start)."""
    for name in ("TMPDIR", "TEMP", "TMP"):
        directory = os.environ.get(name)
        if directory and os.path.isdir(directory):
            return directory
    return "/tmp"


def _fast_root() -> str:
    """``/dev/shm`` when usable (crash files are made at every fork), as
    ``forksafe._statedir.fast_temp_root`` says, else the temporary directory."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK | os.X_OK):
        return "/dev/shm"
    return _temp_root()


def _private_directory(prefix: str, root: str) -> str:
    """A new directory of ours only (mode 0700, a random name), as ``tempfile.mkdtemp``."""
    for _ in range(100):
        path = os.path.join(root, prefix + os.urandom(6).hex())
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        return os.path.abspath(path)
    raise FileExistsError(errno.EEXIST, "no unused name for a temporary directory", root)


def _remove(directory: str) -> None:
    """Remove one of our temporary directories: files only, as a rule; anything else
    (a directory a child made there) through ``shutil``."""
    try:
        with os.scandir(directory) as entries:
            names = [entry.name for entry in entries]
        for name in names:
            os.unlink(os.path.join(directory, name))
        os.rmdir(directory)
    except FileNotFoundError:
        return
    except OSError:
        import shutil

        shutil.rmtree(directory, ignore_errors=True)
