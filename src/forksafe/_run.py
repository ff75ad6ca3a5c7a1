"""``forksafe run -- COMMAND``: guard a whole process tree, then report once.

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
* COMMAND runs in its own session and process group. SIGINT, SIGTERM, SIGHUP
  and SIGQUIT that reach ``forksafe run`` are passed on to that whole group,
  as a terminal would deliver them. When COMMAND ends, whatever it left
  running is sent SIGTERM, then SIGKILL after a grace period: no process is
  left behind. A watchdog process (``forksafe._watchdog``) does the same, and
  removes the temporary directories, should ``forksafe run`` itself be killed
  by SIGKILL.
* The exit status is COMMAND's own; when COMMAND was killed by signal N it is
  128+N, the shell's convention (re-raising the signal in ourselves would make
  a SIGSEGV'd command look like a crash of forksafe).
* At the end, one summary goes to stderr (stdout belongs to COMMAND), and with
  ``--report FILE`` the JSON report (docs/report-format.md) is written (atomically).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, TextIO

from forksafe import _config, _watchdog
from forksafe._errors import UsageError
from forksafe._render import outcomes
from forksafe._report import ForkEvent, Outcome
from forksafe._runreport import EventTail, Merger, check_writable, render_run, write_report
from forksafe._statedir import fast_temp_root

NO_COMMAND = "forksafe run: no command given; usage: forksafe run [OPTIONS] -- COMMAND [ARG]..."
CANNOT_RUN = "forksafe run: cannot run {command!r}: {error}"
REPORT_WRITTEN = "forksafe: report written to {path}"
REPORT_LOST = "the summary above is all there is; exit code {code} is COMMAND's own"

#: Signals passed on to COMMAND's process group.
FORWARDED = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT")
#: How long leftover processes get between SIGTERM and SIGKILL.
GRACE = 1.0
#: How often events are read when no hang timeout asks for faster polling.
POLL = 0.1

PR_SET_CHILD_SUBREAPER = 36


def cli(args: argparse.Namespace) -> int:
    """The ``forksafe run`` subcommand (arguments parsed by ``_cli``)."""
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise UsageError(NO_COMMAND)
    if args.report:
        check_writable(args.report)
    from forksafe import _accept

    try:
        rules = "; ".join(rule.text() for rule in _accept.command_rules(args.accept))
    except _accept.AcceptError as exc:
        raise UsageError(f"forksafe: {exc}") from exc
    result = run(argv, policy=args.policy, hang_timeout=args.hang_timeout, accept=rules)
    sys.stderr.write(render_run(result.report) + "\n")
    if args.report:
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


@dataclass
class RunResult:
    exit_code: int
    report: dict[str, Any]
    skipped_lines: int = 0
    hung: list[ForkEvent] = field(default_factory=list)


def run(
    argv: list[str],
    *,
    policy: str = "warn",
    hang_timeout: float | None = None,
    env: dict[str, str] | None = None,
    stderr: TextIO | None = None,
    accept: str = "",
) -> RunResult:
    """Run ``argv`` guarded; return its exit code and the merged report."""
    out = sys.stderr if stderr is None else stderr
    workdir = tempfile.mkdtemp(prefix="forksafe-run-")
    try:
        state = tempfile.mkdtemp(prefix="forksafe-run-state-", dir=fast_temp_root())
    except OSError:
        state = tempfile.mkdtemp(prefix="forksafe-run-state-")
    # Before COMMAND exists: should we be SIGKILLed from here on, it cleans up for us.
    watchdog = _watchdog.start([workdir, state])
    try:
        events = os.path.join(workdir, "events.jsonl")
        child_env = _config.tree_environment(
            os.environ if env is None else env, policy=policy, hang_timeout=hang_timeout,
            report=events, state_dir=state, supervisor=os.getpid(), accept=accept)
        _become_subreaper()
        tail = EventTail(events)
        merger = Merger(state=state)
        monitor = None
        # Children stalled for no reason the monitor could tell: never ended, shown.
        stalls: dict[tuple[int | None, int | None], Outcome] = {}
        if hang_timeout is not None:
            from forksafe._hang import HangMonitor

            def on_hung(event: ForkEvent, outcome: Outcome) -> None:
                tail.extra.append({"type": "outcome", "parent_pid": event.parent_pid,
                                   "child_pid": event.child_pid, "outcome": outcome.to_dict()})
                with contextlib.suppress(OSError, ValueError):  # stderr may be gone
                    out.write(outcomes.hung_live(event.child_pid, hang_timeout) + "\n")
                    out.flush()

            def on_stall(event: ForkEvent, note: Outcome | None) -> None:
                key = (event.parent_pid, event.child_pid)
                if note is None:
                    stalls.pop(key, None)  # it moved again
                else:
                    stalls[key] = note

            monitor = HangMonitor(hang_timeout, on_hung=on_hung, directory=state,
                                  on_stall=on_stall)
        # Signals are caught from before COMMAND starts until everything it left is
        # gone: one arriving in between must not end us and orphan COMMAND.
        with _Forwarder() as forwarder:
            try:
                proc = subprocess.Popen(argv, env=child_env, start_new_session=True)
            except OSError as exc:
                raise UsageError(CANNOT_RUN.format(command=argv[0],
                                                   error=exc.strerror or exc)) from exc
            forwarder.attach(proc.pid)
            if watchdog is not None:
                watchdog.command(proc.pid)
            try:
                status = _supervise(proc, tail, merger, monitor)
            finally:  # also if supervising failed: no process is left behind
                _end_leftovers(proc.pid, spare=watchdog.pid if watchdog else None)
        for record in tail.read(final=True):
            merger.add(record)
        for (parent, child), note in stalls.items():
            merger.stalled(parent, child, note.to_dict())
        report = merger.report(argv, exit_code(status))
        return RunResult(exit_code(status), report, tail.skipped,
                         monitor.hung if monitor else [])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)
        if watchdog is not None:
            watchdog.done()


def exit_code(status: int) -> int:
    """The shell's view of a wait status: the exit code, or 128+N for death by signal N."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    return 1


class _Forwarder:
    """Passes SIGINT, SIGTERM, SIGHUP and SIGQUIT on to COMMAND's process group.

    Installed before COMMAND starts: a signal that arrives before its group
    exists is kept and passed on as soon as it does.
    """

    def __init__(self) -> None:
        self.group: int | None = None
        self.pending: list[int] = []
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Forwarder:
        for name in FORWARDED:
            number = getattr(signal, name, None)
            if number is not None:
                self._previous[number] = signal.signal(number, self._forward)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        if self.group is None:
            self.pending.append(signum)
            return
        with contextlib.suppress(OSError):
            os.killpg(self.group, signum)

    def attach(self, group: int) -> None:
        self.group = group
        for signum in self.pending:
            self._forward(signum, None)
        self.pending.clear()


def _supervise(proc: subprocess.Popen[bytes], tail: EventTail, merger: Merger,
               monitor: Any) -> int:
    """Wait for COMMAND, reaping orphans, merging events, feeding the hang monitor."""
    interval = POLL if monitor is None else min(POLL, monitor.interval)
    while True:
        status = _reap(proc.pid)
        if status is not None:
            proc.returncode = exit_code(status)  # reaped here, not by Popen
            return status
        for record in tail.read():
            merger.add(record)
            if monitor is not None and record.get("type") in ("fork", "fork-pending"):
                with contextlib.suppress(ValueError, TypeError):
                    monitor.add(ForkEvent.from_dict(record))
        if monitor is not None:
            monitor.poll()
        time.sleep(interval)


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
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _end_leftovers(group: int, *, grace: float = GRACE, spare: int | None = None) -> None:
    """Whatever COMMAND left running: SIGTERM, then SIGKILL; reap them all. ``spare``
    (the watchdog, a child of ours too) is left to exit when told."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        targets = [pid for pid in _leftovers(group) if pid != spare]
        if not targets:
            return
        for pid in targets:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            _reap(-1)
            if not [pid for pid in _leftovers(group) if pid != spare]:
                return
            time.sleep(0.02)
    _reap(-1)


def _leftovers(group: int) -> list[int]:
    """Live processes of COMMAND's group, and live descendants of ours (subreaped orphans)."""
    me = os.getpid()
    parents: dict[int, int] = {}
    found = set()
    try:
        entries = os.listdir("/proc")
    except OSError:
        entries = []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as f:
                tail = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if len(tail) < 4 or tail[0] in ("Z", "X"):
            continue
        pid, ppid, pgrp = int(entry), int(tail[1]), int(tail[2])
        parents[pid] = ppid
        if pgrp == group:
            found.add(pid)
    for pid in parents:
        seen, cur = 0, parents.get(pid)
        while cur is not None and cur > 1 and seen < 64:
            if cur == me:
                found.add(pid)
                break
            cur, seen = parents.get(cur), seen + 1
    found.discard(me)
    return sorted(found)
