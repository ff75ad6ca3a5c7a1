"""``forksafe run -- COMMAND``: guard a whole process tree, then report once.

How it works:

* COMMAND runs with ``FORKSAFE_POLICY``, ``FORKSAFE_REPORT`` (a private
  JSON-lines file), ``FORKSAFE_HANG_TIMEOUT``, ``FORKSAFE_STATE_DIR`` (where
  children leave crash files) and ``FORKSAFE_SUPERVISOR`` set. The environment
  hook (``_hook.py``) installs the guard in every Python process of the tree
  that has forksafe installed; each appends its fork and outcome events to the
  file with one ``O_APPEND`` write per line (``_sink.py``), so concurrent
  writers never interleave, and a process that dies mid-write loses at most
  its own last line, which the reader skips.
* This process supervises from outside: it tails the event file, and with
  ``--hang-timeout`` watches every forked child through procfs
  (``_hang.HangMonitor``). It is an ancestor of every process in the tree (it
  makes itself a child subreaper, so orphans are re-parented to it), which is
  what lets it read a stuck child's stack even under Yama's ptrace_scope=1.
* COMMAND runs in its own session and process group. SIGINT, SIGTERM, SIGHUP
  and SIGQUIT that reach ``forksafe run`` are passed on to that whole group,
  as a terminal would deliver them. When COMMAND ends, whatever it left
  running is sent SIGTERM, then SIGKILL after a grace period: no process is
  left behind.
* The exit status is COMMAND's own; when COMMAND was killed by signal N it is
  128+N, the shell's convention (re-raising the signal in ourselves would make
  a SIGSEGV'd command look like a crash of forksafe).
* At the end, one summary goes to stderr (stdout belongs to COMMAND), and with
  ``--report FILE`` the JSON report of DESIGN.md §3 is written (atomically).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
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

from forksafe._report import SCHEMA, ForkEvent, Outcome

NO_COMMAND = "forksafe run: no command given; usage: forksafe run [OPTIONS] -- COMMAND [ARG]..."
CANNOT_RUN = "forksafe run: cannot run {command!r}: {error}"
REPORT_UNWRITABLE = "forksafe run: cannot write the report {path!r}: {error}"
HUNG_LIVE = (
    "forksafe: child {pid} made no progress for {seconds:g} s in a wait its fork explains; "
    "ended it with SIGKILL (diagnosis in the summary at the end)"
)
REPORT_WRITTEN = "forksafe: report written to {path}"

#: Signals passed on to COMMAND's process group.
FORWARDED = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT")
#: How long leftover processes get between SIGTERM and SIGKILL.
GRACE = 1.0
#: How often events are read when no hang timeout asks for faster polling.
POLL = 0.1

PR_SET_CHILD_SUBREAPER = 36


def cli(args: argparse.Namespace) -> int:
    """The ``forksafe run`` subcommand (arguments parsed by ``_cli``)."""
    from forksafe._cli import UsageError

    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise UsageError(NO_COMMAND)
    if args.report:
        _check_writable(args.report)
    result = run(argv, policy=args.policy, hang_timeout=args.hang_timeout)
    from forksafe._render import render_run

    sys.stderr.write(render_run(result.report) + "\n")
    if args.report:
        write_report(result.report, args.report)
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
) -> RunResult:
    """Run ``argv`` guarded; return its exit code and the merged report."""
    from forksafe._cli import UsageError

    out = sys.stderr if stderr is None else stderr
    workdir = tempfile.mkdtemp(prefix="forksafe-run-")
    from forksafe._child import fast_temp_root

    try:
        state = tempfile.mkdtemp(prefix="forksafe-run-state-", dir=fast_temp_root())
    except OSError:
        state = tempfile.mkdtemp(prefix="forksafe-run-state-")
    try:
        events = os.path.join(workdir, "events.jsonl")
        child_env = dict(os.environ if env is None else env)
        child_env.update({
            "FORKSAFE_POLICY": policy,
            "FORKSAFE_REPORT": events,
            "FORKSAFE_STATE_DIR": state,
            "FORKSAFE_SUPERVISOR": str(os.getpid()),
        })
        child_env.pop("FORKSAFE_HANG_TIMEOUT", None)
        if hang_timeout is not None:
            child_env["FORKSAFE_HANG_TIMEOUT"] = repr(hang_timeout)
        _become_subreaper()
        tail = EventTail(events)
        merger = Merger(state=state)
        monitor = None
        if hang_timeout is not None:
            from forksafe._hang import HangMonitor

            def on_hung(event: ForkEvent, outcome: Outcome) -> None:
                tail.extra.append({"type": "outcome", "parent_pid": event.parent_pid,
                                   "child_pid": event.child_pid, "outcome": outcome.to_dict()})
                with contextlib.suppress(OSError, ValueError):  # stderr may be gone
                    out.write(HUNG_LIVE.format(pid=event.child_pid, seconds=hang_timeout)
                              + "\n")
                    out.flush()

            monitor = HangMonitor(hang_timeout, on_hung=on_hung, directory=state)
        # Signals are caught from before COMMAND starts until everything it left is
        # gone: one arriving in between must not end us and orphan COMMAND.
        with _Forwarder() as forwarder:
            try:
                proc = subprocess.Popen(argv, env=child_env, start_new_session=True)
            except OSError as exc:
                raise UsageError(CANNOT_RUN.format(command=argv[0],
                                                   error=exc.strerror or exc)) from exc
            forwarder.attach(proc.pid)
            try:
                status = _supervise(proc, tail, merger, monitor)
            finally:  # also if supervising failed: no process is left behind
                _end_leftovers(proc.pid)
        for record in tail.read(final=True):
            merger.add(record)
        report = merger.report(argv, exit_code(status))
        return RunResult(exit_code(status), report, tail.skipped,
                         monitor.hung if monitor else [])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)


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


def _end_leftovers(group: int, *, grace: float = GRACE) -> None:
    """Whatever COMMAND left running: SIGTERM, then SIGKILL; reap them all."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        targets = _leftovers(group)
        if not targets:
            return
        for pid in targets:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            _reap(-1)
            if not _leftovers(group):
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


class EventTail:
    """Reads the JSON-lines event file as it grows; complete lines only.

    A line is complete when its newline is there. At the final read, what is
    left without a newline is a torn write of a process that died: skipped, as
    is any line that is not a JSON object (counted in ``skipped``).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""
        self.skipped = 0
        self.extra: list[dict[str, Any]] = []  # outcomes this process adds itself

    def read(self, *, final: bool = False) -> list[dict[str, Any]]:
        """New complete records since the last call; at ``final``, also the torn last
        line is given up on, and this process's own records (``extra``) follow."""
        new: list[dict[str, Any]] = []
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            data = b""
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                self.skipped += 1
                continue
            if isinstance(record, dict):
                new.append(record)
            else:
                self.skipped += 1
        if final and self._partial.strip():
            self.skipped += 1
            self._partial = b""
        if final:
            new.extend(self.extra)
            self.extra = []
        return new


def merge(command: list[str], code: int, records: list[dict[str, Any]],
          *, state: str | None = None) -> dict[str, Any]:
    """The DESIGN.md §3 report from a list of event records (see ``Merger``)."""
    merger = Merger(state=state)
    for record in records:
        merger.add(record)
    return merger.report(command, code)


#: Fork entries a run keeps in memory and in its report. A server run for days may
#: fork millions of times; past this many, entries whose child simply exited (or was
#: stopped by its parent) are dropped, oldest first, and counted in ``forks_omitted``.
#: Entries with a crash, a hang or a diagnosis are always kept.
MAX_FORKS = 20_000
#: Seconds after which a fork whose child is gone without a recorded outcome may be dropped.
UNSEEN_AFTER = 30.0


class Merger:
    """Fork records with their outcomes merged in, built as the events arrive.

    Outcomes join their fork by (parent_pid, child_pid). When a child has
    several (its parent reaped it after the hang monitor reported it), "hung"
    wins, then the latest. A child's own ``fork-pending`` record (see
    ``_child._announce_from_preexec``) stands in only for a fork whose parent
    never wrote one: it hung with the child. Memory stays bounded (``MAX_FORKS``).
    """

    def __init__(self, *, state: str | None = None, limit: int = MAX_FORKS,
                 _clock: Any = time.monotonic) -> None:
        self.state = state
        self.limit = limit
        self.omitted = 0
        self._clock = _clock
        self._entries: dict[int, dict[str, Any]] = {}  # by arrival number: report order
        self._index: dict[tuple[Any, Any], int] = {}  # (parent, child) -> its latest entry
        self._pending: set[int] = set()  # entries made from a child's own record
        self._seen: dict[int, float] = {}
        self._early: dict[tuple[Any, Any], dict[str, Any]] = {}  # outcomes before their fork
        self._serial = 0
        self._retry_at = 0  # after an eviction that freed too little, wait for more growth

    def add(self, record: dict[str, Any]) -> None:
        kind = record.get("type", "fork")
        key = (record.get("parent_pid"), record.get("child_pid"))
        if kind == "outcome":
            if isinstance(record.get("outcome"), dict):
                self._outcome(key, record["outcome"])
            return
        if kind not in ("fork", "fork-pending"):
            return
        entry = {k: v for k, v in record.items() if k != "type"}
        if "command" in entry:
            entry["process_command"] = entry.pop("command")
        known = self._index.get(key) if record.get("child_pid") is not None else None
        if known is not None and (kind == "fork-pending") != (known in self._pending):
            if kind == "fork-pending":
                return  # the parent's record is there already
            old = self._entries[known]  # the parent's record replaces the child's own
            self._pending.discard(known)
            if "outcome" in old:
                entry["outcome"] = old["outcome"]
            old.clear()
            old.update(entry)
            return
        # A new fork (also a pid the same parent got again, long after).
        self._serial += 1
        number = self._serial
        self._entries[number] = entry
        self._seen[number] = self._clock()
        if kind == "fork-pending":
            self._pending.add(number)
        if record.get("child_pid") is not None:
            self._index[key] = number
            early = self._early.pop(key, None)
            if early is not None:
                self._outcome(key, early)
        if len(self._entries) > max(self.limit, self._retry_at):
            self._evict()

    def _outcome(self, key: tuple[Any, Any], outcome: dict[str, Any]) -> None:
        number = self._index.get(key)
        if number is None:
            if len(self._early) < 1000:
                self._early[key] = outcome
            return
        target = self._entries[number]
        old = target.get("outcome")
        if isinstance(old, dict) and old.get("status") == "hung" and \
                outcome.get("status") != "hung":
            return
        target["outcome"] = outcome

    def _evict(self) -> None:
        """Drop the oldest uneventful entries until a tenth of the room is free again."""
        goal = self.limit - max(1, self.limit // 10)
        now = self._clock()
        for number in list(self._entries):
            if len(self._entries) <= goal:
                break
            entry = self._entries[number]
            if self._droppable(number, entry, now):
                del self._entries[number]
                self._seen.pop(number, None)
                self._pending.discard(number)
                key = (entry.get("parent_pid"), entry.get("child_pid"))
                if self._index.get(key) == number:
                    del self._index[key]
                self.omitted += 1
        # Whatever is left is evidence or still running: scan again only after the
        # next tenth has arrived, not on every new fork.
        self._retry_at = len(self._entries) + max(1, self.limit // 10)

    def _droppable(self, number: int, entry: dict[str, Any], now: float) -> bool:
        from forksafe._outcome import CRASH_SIGNALS

        outcome = entry.get("outcome")
        if isinstance(outcome, dict):
            status = outcome.get("status")
            return not outcome.get("diagnosis") and (status == "exited" or (
                status == "signaled" and outcome.get("signal") not in CRASH_SIGNALS))
        # No outcome (reaped by code the guard does not wrap): droppable once the
        # child is long gone and left no crash file behind. A refused fork has no
        # child at all: its record is the evidence, kept.
        pid = entry.get("child_pid")
        if not isinstance(pid, int) or now - self._seen.get(number, now) < UNSEEN_AFTER or \
                os.path.exists(f"/proc/{pid}"):
            return False
        if self.state is not None:
            from forksafe._child import crash_path

            with contextlib.suppress(OSError):
                if os.path.getsize(crash_path(pid, directory=self.state)) > 0:
                    return False
        return True

    def report(self, command: list[str], code: int) -> dict[str, Any]:
        """The DESIGN.md §3 report (with ``forks_omitted`` when entries were dropped)."""
        forks = list(self._entries.values())
        by_child = [e for e in forks if e.get("child_pid") is not None]
        if self.state is not None:
            _orphan_crashes(by_child, self.state)
        for entry in by_child:
            # Reaped by code the guard does not wrap (subprocess), or still running when
            # COMMAND ended: what became of it is not known.
            entry.setdefault("outcome", Outcome("unknown").to_dict())
        report: dict[str, Any] = {"schema": SCHEMA, "command": command, "exit_code": code,
                                  "forks": forks}
        if self.omitted:
            report["forks_omitted"] = self.omitted
        return report


_FATAL = {
    "Segmentation fault": "SIGSEGV", "Bus error": "SIGBUS", "Illegal instruction": "SIGILL",
    "Floating-point exception": "SIGFPE", "Floating point exception": "SIGFPE",
    "Aborted": "SIGABRT",
}


def _orphan_crashes(entries: Any, state: str) -> None:
    from forksafe._outcome import diagnose_death, take_crash_text

    for entry in entries:
        if entry.get("outcome") is not None:
            continue
        pid = entry.get("child_pid")
        text = take_crash_text(pid, directory=state) if isinstance(pid, int) else None
        if not text:
            continue
        name = next((sig for words, sig in _FATAL.items()
                     if f"Fatal Python error: {words}" in text), None)
        try:
            event = ForkEvent.from_dict(entry)
        except (ValueError, TypeError):
            continue
        diagnosis = diagnose_death(event, name or "a fatal signal", text)
        entry["outcome"] = Outcome("signaled", None, name, text, diagnosis).to_dict()


def write_report(report: dict[str, Any], path: str) -> None:
    """Write ``report`` to ``path`` whole or not at all (temp file, then rename)."""
    from forksafe._cli import UsageError

    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".forksafe-", dir=directory)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except OSError as exc:
        raise UsageError(REPORT_UNWRITABLE.format(path=path, error=exc.strerror or exc)) from exc


def _check_writable(path: str) -> None:
    """Fail before running COMMAND, not after, when the report cannot be written."""
    from forksafe._cli import UsageError

    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(REPORT_UNWRITABLE.format(path=path, error="it is a directory"))
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        raise UsageError(REPORT_UNWRITABLE.format(
            path=path, error=f"directory {directory!r} does not exist or is not writable"))

