"""The record of a process's forks: events kept, children remembered, lines written.

Every fork the guard sees becomes a ``ForkEvent``, kept in a bounded history,
remembered by child pid (so that its outcome can join it when the child is
reaped) and, with a report file, appended as one JSON line (``forksafe._sink``);
a fork the guard logged, warned about or refused also becomes a ``logging`` record
(``forksafe._logsink``, loaded at the first such fork).
The guard's hot path (``forksafe._forkpath``) queues forks and reaps when nobody
outside the process waits for them, and hands them here by the batch
(``flush``); the followers are told from here (``on_forked``, ``on_reaped``).

Cheap to import: the environment hook imports it (through the hot path) at every
interpreter start of a guarded tree. The model and the followers are bound at the
first fork (``bind``).
"""

from __future__ import annotations

import os
import sys
from _thread import RLock, get_ident

from forksafe._errors import failures, report_failure

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections import deque
    from typing import Any, Optional, Tuple, Union

    from forksafe._config import Config
    from forksafe._decide import Decision
    from forksafe._report import ForkEvent, Outcome
    from forksafe._seam import ChildSide, CrashFile, FollowerSide
    from forksafe._sink import Sink

    #: A queued fork, ``(decision, child pid, spare crash file)``, or a queued reap,
    #: ``(child pid, wait status)``.
    Queued = Union[Tuple[Decision, Optional[int], Optional[CrashFile]], Tuple[int, int]]
else:
    from _collections import deque  # the C deque, without importing `collections`

#: Fork events kept per process (``history()``), and children remembered by pid.
HISTORY_SIZE = 1000
CHILDREN_SIZE = 1000


class State:
    """The record of the forks of process ``pid`` (see ``forksafe._forkpath.own_state``).

    ``history`` and ``children`` (the event of each child, by pid) change under
    ``lock``, an RLock (a signal handler that forks may interrupt its own
    thread inside it). ``queue`` holds forks and reaps not yet recorded: a
    deque, whose append and popleft are atomic, so it needs no lock.

    A forked child inherits its parent's state, lock included, held perhaps
    by a thread that does not exist in the child. It makes its own when it
    first needs one, not in an at-fork hook: most children never need one,
    and every object a child touches is a page it copies. ``parent`` is then
    the inherited state, kept and not freed — freeing a thousand events would
    write to every page they live on — and ``successor``, on the inherited
    state in the child's memory, settles which new state wins if two threads
    of the child race to make it.

    ``log_now``: whether a ``logging`` record of a hazardous fork would reach
    anyone (``forksafe._logsink.active``), refreshed at the first fork and with
    each batch. While it is false, hazardous forks are queued like clean ones: a
    program whose logging nobody listens to keeps the batch's cost, and their
    records, made when the batch is recorded, go to the ``NullHandler`` or to
    whoever listens by then.
    """

    __slots__ = ("children", "history", "lock", "log_now", "parent", "pid", "queue",
                 "successor")

    def __init__(self, pid: int, parent: State | None = None) -> None:
        self.pid = pid
        self.lock = RLock()
        self.history: deque[ForkEvent] = deque(maxlen=HISTORY_SIZE)
        self.children: dict[int, ForkEvent] = {}
        self.queue: deque[Queued] = deque()
        self.parent = parent
        self.successor: list[State] = []
        self.log_now: bool = parent.log_now if parent is not None else False


# Bound at the first fork (``bind``) and by install() (``set_sink``).
_sink: Sink | None = None
_child: ChildSide | None = None
_follower: FollowerSide | None = None
_event_type: type[ForkEvent] | None = None
_forks = 0  # forks recorded by this process (the follower wants every SWEEP_EVERY-th)


def bind(event_type: type[ForkEvent], st: State | None = None) -> None:
    """The model's event class, once loaded (``forksafe._forkpath.load``), and whether
    ``st``'s hazardous forks have a listener for their records (``State.log_now``)."""
    global _event_type
    _event_type = event_type
    if st is not None:
        refresh_log(st)


def refresh_log(st: State) -> None:
    """Set ``st.log_now``: whether a record of the ``forksafe`` logger would reach anyone.

    A program that never imported ``logging`` has no listener, and is not made to
    import the sink (nor its text layer) to learn it.
    """
    if "logging" not in sys.modules:
        st.log_now = False
        return
    try:
        from forksafe import _logsink

        st.log_now = _logsink.active()
    except Exception as exc:
        st.log_now = False
        report_failure("forksafe._logsink", exc)


def set_followers(child: ChildSide | None, follower: FollowerSide | None) -> None:
    """The followers to tell of forks and reaps (``forksafe._forkpath.set_followers``)."""
    global _child, _follower
    _child, _follower = child, follower


def set_sink(sink: Sink | None) -> None:
    """The report file every event is appended to, or None."""
    global _sink
    _sink = sink


def report_path() -> str | None:
    sink = _sink
    return None if sink is None else sink.path


def flush(st: State, config: Config | None) -> None:
    """Record the queued forks and reaps of ``st``, oldest first; safe from any thread.

    Queued by the batch, recorded in one go: the code that records them, and the
    objects it touches, are then written to once per flush rather than once per
    fork — pages the parent copies when it writes to them while a child lives
    (docs/guard.md, "Cost").
    """
    queue = st.queue
    if not queue:
        return
    refresh_log(st)  # by the batch: whether the records of hazardous forks can wait
    me = get_ident()
    lines = _batches[me] = []  # the report file's lines of this batch, in order
    try:
        while queue:
            try:
                item = queue.popleft()
            except IndexError:
                break
            if len(item) == 3:
                record_fork(st, config, *item)
            else:
                reap(st, *item)
    finally:
        _batches.pop(me, None)
        if lines:
            emit_all(lines)


def record_fork(st: State, config: Config | None, decision: Decision, pid: int | None,
                spare: CrashFile | None = None) -> None:
    """Record a fork, then hand it over to the follower."""
    global _forks
    child = _child
    if spare is not None and pid is not None and child is not None:
        child.adopt_spare(spare, pid)
    event_type = _event_type
    if event_type is None:  # pragma: no cover - the guard binds before its first fork
        return
    event = event_type(os.getpid(), pid, decision.time, decision.mechanism, decision.site,
                       decision.action, decision.report)
    record(st, event)
    _forks += 1
    follower = _follower
    if follower is not None and pid is not None and config is not None and (
            config.hang_timeout is not None or _forks % follower.SWEEP_EVERY == 1):
        try:
            follower.on_forked(event, config.hang_timeout)
        except Exception as exc:
            report_failure("forksafe._outcome.on_forked", exc)


def record(st: State, event: ForkEvent) -> None:
    """Keep ``event`` (history, child map) and append it to the report file."""
    with st.lock:
        st.history.append(event)
        if event.child_pid is not None:
            children = st.children
            children.pop(event.child_pid, None)  # a recycled pid moves to the end
            children[event.child_pid] = event
            while len(children) > CHILDREN_SIZE:
                del children[next(iter(children))]
    if _sink is not None:
        emit({"type": "fork", **event.to_dict(), "command": list(getattr(sys, "argv", []))})
    if event.action != "allowed":
        tell_log(event)


def tell_log(event: ForkEvent) -> None:
    """A hazardous or refused fork, for the ``forksafe`` logger (``forksafe._logsink``).

    Never for an allowed fork: a server forking a million clean workers must not pay
    for a record nobody wants, nor this module for importing the sink.
    """
    if "logging" not in sys.modules:  # no handler anywhere: nobody to tell
        return
    try:
        from forksafe import _logsink

        _logsink.fork(event)
    except Exception as exc:
        report_failure("forksafe._logsink", exc)


def reap(st: State, pid: int, status: int) -> None:
    """Child ``pid`` was reaped with wait ``status``: the follower says how it ended."""
    follower = _follower
    if follower is None or not (os.WIFEXITED(status) or os.WIFSIGNALED(status)):
        return
    event = st.children.get(pid)
    if event is None:
        return
    try:
        follower.on_reaped(pid, status, event=event)
    except Exception as exc:
        report_failure("forksafe._outcome.on_reaped", exc)


def attach_outcome(st: State, pid: int, outcome: Outcome) -> None:
    """Attach ``outcome`` to child ``pid``'s event and append it to the report file."""
    with st.lock:
        event = st.children.get(pid)
        if event is not None:
            # Spelled out rather than dataclasses.replace(), which reads every field's
            # Field object: pages written on every reaped child.
            updated = type(event)(event.parent_pid, event.child_pid, event.time,
                                  event.mechanism, event.site, event.action,
                                  event.report, outcome)
            st.children[pid] = updated
            history = st.history
            for i in range(len(history) - 1, -1, -1):
                if history[i] is event:
                    history[i] = updated
                    break
    if _sink is not None:  # no record built for nobody: it is called for every child
        emit({"type": "outcome", "parent_pid": os.getpid(), "child_pid": pid,
              "outcome": outcome.to_dict()})


def emit(record: dict[str, Any]) -> None:
    """Append ``record`` as one JSON line to the report file, if one is configured."""
    emit_all([record])


#: Thread ident -> the report file lines its ``flush`` is collecting: a batch of forks and
#: reaps is written in one open and write, not three system calls per fork and per reap.
_batches: dict[int, list[dict[str, Any]]] = {}


def emit_all(records: list[dict[str, Any]]) -> None:
    """Append each of ``records`` as a JSON line, in one write (or to the batch this
    thread is flushing, written at its end)."""
    batch = _batches.get(get_ident()) if _batches else None
    if batch is not None:
        batch.extend(records)
        return
    sink = _sink
    if sink is not None and not sink.write_all(records) and "sink" not in failures:
        report_failure("sink", OSError(f"cannot write to {sink.path!r}"))
