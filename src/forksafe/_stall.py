"""What a stuck child waits for: idle, stalled, or in code that lost its threads at the fork.

A child that makes no progress is not hung by that alone: a server worker waits in
``accept``, a pool worker waits for its next task. ``forksafe._hang`` asks this
module three things about such a child.

**Is it idle?** Blocked in a wait for the outside world — ``accept``, ``select``,
``poll``, ``epoll_wait``, a sleep, a ``read`` of a socket or pipe, a wait for its own
children — it is idle; waiting inside a known worker loop for its next piece of work
(a ``multiprocessing`` pool's worker, a ``ProcessPoolExecutor``'s, billiard's), with
nothing but that library's code between the loop and the wait, it is idle too.

**Whose code does it wait in?** The *wait owner* of a thread is the top-level package
of its innermost frame outside the standard library's plumbing (``threading``,
``queue``, ``selectors``, ``socket``, ...): ``concurrent`` for a thread waiting in
``Future.result``, ``multiprocessing`` for one reading a ``Queue``, ``grpc`` for one
in ``grpc/_channel.py``.

**Does a fork-time hazard own that code?** (``ownership_findings``) A stall is linked,
and so is a hang with a named cause, when the wait owner is

* the Python package of a native runtime that was active at fork time (the
  catalog's ``modules``: ``grpc`` for gRPC core), whatever the thread waits in;
* the package of a thread that ran at fork time and does not exist in the child
  (its target's package, or a package its frames were in), when the child waits for
  another thread — a lock, a condition, an event, a future (``futex``); for a wait on
  I/O, only when that thread is one the catalog knows its library's I/O depends on (a
  ``multiprocessing.Queue``'s feeder: the child reads what it would have sent).
  Only library code (an installed package, the standard library) owns a wait here:
  the program's own threads are linked through the locks they held instead; and a
  worker idle in its loop owns nothing (its wait is for work, not for a lost thread).

A stuck child that nothing explains is *stalled*: shown (with its stacks, if it dies
or the run ends that way), never ended.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from forksafe import _catalog
from forksafe._diagnose import library_code, package_of, thread_packages
from forksafe._render import outcomes
from forksafe._report import Hazard, Site

#: System calls in which a thread waits for the outside world: idle, not stalled.
IDLE_SYSCALLS = frozenset({
    "accept", "accept4", "select", "pselect6", "poll", "ppoll", "epoll_wait", "epoll_pwait",
    "nanosleep", "clock_nanosleep", "pause", "rt_sigsuspend", "rt_sigtimedwait", "wait4",
    "waitid", "read", "recvfrom", "recvmsg",
})
#: System calls in which a thread waits for another thread (a lock, a condition).
SYNC_WAITS = frozenset({"futex", "restart_syscall"})

#: Packages every waiting thread passes through: they own no wait.
PLUMBING = frozenset({"threading", "queue", "selectors", "socket", "time", "ssl", "asyncio",
                      "contextlib", "forksafe", "subprocess", "io", "_weakrefset"})

#: Worker loops that wait for their next piece of work: (file suffix, function).
IDLE_LOOPS = (
    ("multiprocessing/pool.py", "worker"),
    ("concurrent/futures/process.py", "_process_worker"),
    ("billiard/pool.py", "workloop"),
    ("multiprocessing/managers.py", "serve_forever"),
)

#: Catalog threads whose library's I/O in the child depends on them.
IO_FEEDERS = frozenset({"mp-queue-feeder"})


@dataclass
class Finding:
    """A stuck child's wait, explained by one fork-time hazard."""

    hazard: Hazard
    text: str


def idle_syscalls(calls: Sequence[str | None]) -> bool:
    """Every blocked thread waits for the outside world (or is not blocked at all)."""
    return all(call is None or call in IDLE_SYSCALLS for call in calls)


def wait_owner(frames: Sequence[Site]) -> tuple[str, Site] | None:
    """The package and frame of a thread's innermost frame outside the plumbing
    (``frames``: innermost first)."""
    for frame in frames:
        package = package_of(frame.file)
        if package is not None and package not in PLUMBING:
            return package, frame
    return None





def idle_loop(frames: Sequence[Site]) -> bool:
    """Whether a thread waits inside a known worker loop for its next piece of work,
    with only that library's code between the loop and the wait."""
    owner = wait_owner(frames)
    if owner is None:
        return False
    for depth, frame in enumerate(frames):
        if any(frame.file.endswith(suffix) and frame.function == function
               for suffix, function in IDLE_LOOPS):
            inner = [package_of(f.file) for f in frames[:depth]]
            return all(p is None or p in PLUMBING or p == owner[0] for p in inner) and \
                package_of(frame.file) == owner[0]
    return False


def ownership_findings(sections: Sequence[Sequence[Site]], calls: Sequence[str | None],
                       hazards: Sequence[Hazard]) -> list[Finding]:
    """Threads of a stuck child waiting in code owned by a hazard that lost its threads
    at the fork (see the module docstring). ``calls``: the system calls the child's
    threads are blocked in (to tell a wait for a thread from a wait for I/O)."""
    sync = any(call in SYNC_WAITS or (call or "").startswith("syscall ") for call in calls)
    found: list[Finding] = []
    seen: set[int] = set()
    several = len(sections) > 1
    for index, frames in enumerate(sections):
        owner = wait_owner(frames)
        if owner is None or not library_code(owner[1].file) or idle_loop(frames):
            continue  # the program's own code, or a worker idle in its loop: owns no wait
        package, frame = owner
        who = "it" if not several else f"its thread #{index + 1}"
        for hazard in hazards:
            if id(hazard) in seen:
                continue
            ev = hazard.evidence
            if hazard.kind == "native-runtime" and ev.get("active"):
                if package not in _catalog.modules_of(ev.get("runtime")):
                    continue
                text = outcomes.runtime_code_link(who, frame, package, _runtime_name(ev),
                                                  ", ".join(str(s) for s in ev.get("signals", ())))
            elif hazard.kind == "thread":
                if package not in thread_packages(ev, libraries=True):
                    continue
                if not sync and ev.get("known") not in IO_FEEDERS:
                    continue
                text = outcomes.thread_code_link(who, frame, package,
                                                 str(ev.get("name", "?")), _started(ev))
            else:
                continue
            seen.add(id(hazard))
            found.append(Finding(hazard, text))
    return found


def _runtime_name(evidence: Any) -> str:
    from forksafe import _catalog

    try:
        return _catalog.find(str(evidence.get("runtime"))).name
    except KeyError:
        return str(evidence.get("runtime"))


def _started(evidence: Any) -> Site | None:
    started = evidence.get("started_at")
    if not isinstance(started, list):
        return None
    from forksafe._frames import user_site

    return user_site([Site.from_dict(s) for s in started if isinstance(s, dict)])


def stall_note(seconds: float, sections: Sequence[Sequence[Site]], calls: Sequence[str | None],
               stacks: str) -> tuple[str, str]:
    """The diagnosis and traceback of a stall nothing explains."""
    owner = next((wait_owner(frames) for frames in sections if wait_owner(frames)), None)
    where = outcomes.frame_place(owner[1]) if owner else next(
        (f" (blocked in {call})" for call in calls if call), "")
    return outcomes.stalled(seconds, where), stacks

