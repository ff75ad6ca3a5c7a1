"""The guard's hot path: what runs at every fork, in the parent and in the child.

* The wrappers ``install()`` puts in place (``forksafe._patching``): ``os.fork``,
  ``os.forkpty``, ``subprocess.Popen._execute_child`` (with a ``preexec_fn``), and
  the ``os.wait*`` family, which tells the record when a guarded child is reaped.
  ``multiprocessing``'s fork start method and ``ProcessPoolExecutor`` look
  ``os.fork`` up at call time, and ``pty.fork`` calls ``os.forkpty``, so they go
  through the wrappers too.
* ``judge``: the check (``forksafe._check.fork_check``), then the policy's verdict
  (``forksafe._decide``), both before the real fork, which a refusal stops.
* The at-fork hooks (``os.register_at_fork``, once per process). ``before`` sees
  forks no wrapper saw — C code calling ``PyOS_BeforeFork()``, or ``fork`` bound
  before ``install()`` — which cannot be refused (CPython ignores exceptions from
  fork hooks); their child's pid comes from ``/proc/self/task/<tid>/children``,
  read by an ``after_in_parent`` hook registered at the first such fork.
  ``after_in_child`` is the only child side: it arms ``forksafe._child`` once per
  fork; for ``os.fork``'s wrapper with a memory crash file it is C calls prepared
  in the parent (``child_calls``), and no Python runs in the child at all.

A fork through a wrapper marks its thread (``_local.busy``) so that the hooks,
which run inside the real ``fork()``, do not count it twice.

Everything here is written for the pages it touches. After a fork, parent and
child share every page copy-on-write, every Python statement writes (reference
counts, allocator pools), and each page written costs a copy: so the wrappers
spell their steps out rather than call helpers, the decision reuses the verdict
on a report it judged before (an unchanged process, or threads forking at once
that meet the same few reports: ``forksafe._check._storm``), and forks and reaps
are queued and recorded ``QUEUE_SIZE`` at a time (``forksafe._record.flush``)
unless someone outside the process waits for them (a report file, a hang timeout,
or - for a hazardous fork - a ``logging`` handler for its record:
``forksafe._record.State.log_now``). docs/guard.md ("Cost") says where the
remaining pages go.

Anything that goes wrong here is reported once and the fork goes on unguarded;
only a refusal under ``raise`` (or the program's own ``-W
error::forksafe.ForkSafetyWarning``) ever stops one.
"""

from __future__ import annotations

import os
import sys
from _functools import partial  # type: ignore[import-not-found,unused-ignore]  # no stubs
from _operator import methodcaller
from _thread import _local as thread_local
from _thread import get_native_id

from forksafe import _exits, _quiet, _record
from forksafe._decide import (
    Decision,
    Lazy,
    action,
    announce,
    confirmed,
    failed_check,
    locate,
    make,
    preexec_hazards,
    site_of,
)
from forksafe._errors import FAILED, ForkSafetyError, ForkSafetyWarning, report_failure, write_fd2
from forksafe._record import State

# Nothing heavier is imported here: the environment hook imports this module at
# the start of every Python process of a `forksafe run` tree (CPython's own tests
# check that `threading` is not imported behind their back). The check, the
# model and the followers are imported at the first fork (``load``).
TYPE_CHECKING = False
if TYPE_CHECKING:
    import types
    from collections import deque
    from typing import Any, Callable, NoReturn

    from forksafe._config import Config
    from forksafe._report import ForkEvent, Hazard, Outcome, Report
    from forksafe._seam import ChildSide, CrashFile, FollowerSide

else:
    from _collections import deque  # the C deque, without importing `collections`

#: Queued forks and reaps (two per child) recorded in one go, when nobody outside
#: the process waits for them.
QUEUE_SIZE = 32

# --- state: set by install()/uninstall() (forksafe._guard), read by every wrapper ---
#: None when the guard is not installed: every wrapper and hook reads it once and
#: passes straight through when it is None.
config: Config | None = None
#: Whether forks and reaps are queued rather than recorded at once (no hang timeout:
#: nobody outside this process waits for them while the child lives; a report file
#: gets them by the batch, at exit, and at ``os._exit``: ``wrap_exit``).
defer = False
#: The followers, once loaded (``load``); None if one failed to import.
child_side: ChildSide | None = None
follower: FollowerSide | None = None

_st = State(os.getpid())
_hooks_registered = False
# The verdicts judge() reached without ``extra`` hazards, by the id of the report
# checked: (report checked, config, refusable, user code, user line, site, action,
# mechanism, report graded, threads to confirm gone). Several: threads forking at once
# meet a few reports in turn (forksafe._check._storm). Bounded: cleared when full.
_verdicts: dict[int, tuple[Any, ...]] = {}
VERDICTS_SIZE = 64


def own_state(pid: int | None = None) -> State:
    """This process's fork record (``pid``: this process's pid, when the caller has it)."""
    global _st
    st = _st
    if pid is None:
        pid = os.getpid()
    if st.pid == pid:
        return st
    st.successor.append(State(pid, st))  # atomic: the first one appended wins
    _st = st.successor[0]
    return _st


def flush_pending() -> None:
    """Record the queued forks and reaps now (``forksafe._record.flush``)."""
    _record.flush(own_state(), config)


class _Local(thread_local):
    """Per-thread fork state; class attributes are every thread's defaults.

    ``busy``: the pid of the process whose wrapper is inside the real fork on
    this thread; ``pending``: (pid, decision, children before) for a fork only
    the hooks saw. Stamped with the pid so that a child, which inherits them as
    they were at the fork, need not write to them: a page less to copy in every
    child. ``spare``: the crash file ``os.fork``'s wrapper opened for the child
    it is forking, None outside that fork: the child finds it here. ``decision``:
    that fork's decision (or the ``preexec_fn`` fork's), kept here across the
    fork: the child of a ``preexec_fn`` fork announces itself from it.
    ``after_fork_child``: what the child of this thread's fork runs (the at-fork
    hook calls it): ``_after_fork_child``, unless the wrapper set C calls for the
    child (``child_calls``).
    """

    busy = 0
    pending: Any = None
    spare: Any = None
    decision: Any = None
    after_fork_child: Callable[[], object]


_local = _Local()
#: The after_in_child hook: C, calling what this thread's fork chose (child_calls).
_child_hook = partial(methodcaller("after_fork_child"), _local)


# --- loading, at the first fork ----------------------------------------------------------


def load() -> None:
    """Import the check, the model and the followers before the first fork (never in a
    child), and hand the follower its link to the guard."""
    import time

    from forksafe._check import check, fork_check
    from forksafe._frames import LIBRARY_FILES, is_library_file
    from forksafe._report import ForkEvent, Report, Site

    Lazy.check = check
    Lazy.fork_check = fork_check
    Lazy.is_library_file = is_library_file
    Lazy.library_files = LIBRARY_FILES
    Lazy.time = time.time
    Lazy.ForkEvent = ForkEvent
    Lazy.Report = Report
    Lazy.Site = Site
    from forksafe import _accept, _grade

    Lazy.grade = _grade.grade
    Lazy.context = _grade.context
    Lazy.site_of = site_of
    _accept.on_change.append(forget_verdict)
    Lazy.loaded = True
    child: ChildSide | None = None
    outcome: FollowerSide | None = None
    try:
        from forksafe import _child

        child = _child
        _child.warm_up()
    except Exception as exc:
        report_failure("importing forksafe._child", exc)
    try:
        from forksafe import _outcome

        outcome = _outcome
        _outcome.attach(LINK)
        _outcome.tidy_at_exit()
    except Exception as exc:
        report_failure("importing forksafe._outcome", exc)
    _record.bind(ForkEvent, own_state())
    set_followers(child, outcome)
    if sys.version_info >= (3, 12):
        _quiet.install_filter()
    from forksafe import _forkaware

    # The interpreter's lists of fork hooks are found through ours (see _forkaware).
    _forkaware.GUARD_HOOKS = (_before_fork, _child_hook)


def set_followers(child: ChildSide | None, outcome: FollowerSide | None) -> None:
    """The followers the fork path and the record call (None: left out)."""
    global child_side, follower
    child_side, follower = child, outcome
    _record.set_followers(child, outcome)
    _exits.armed = child.armed if child is not None else None


class Link:
    """The guard as a follower sees it (``forksafe._seam.GuardLink``)."""

    def config(self) -> Config | None:
        return config

    def event_for_child(self, pid: int) -> ForkEvent | None:
        flush_pending()
        return own_state().children.get(pid)

    def attach_outcome(self, pid: int, outcome: Outcome) -> None:
        _record.attach_outcome(own_state(), pid, outcome)

    def flush(self) -> None:
        flush_pending()

    def emit(self, record: dict[str, Any]) -> None:
        _record.emit(record)

    def report_path(self) -> str | None:
        return _record.report_path()


LINK = Link()


# --- deciding ------------------------------------------------------------------------------


def judge(
    mechanism: str,
    caller: types.FrameType,
    *,
    refusable: bool = True,
    extra: Callable[[Report], tuple[Hazard, ...]] | None = None,
) -> Decision:
    """The verdict on a fork from ``caller``'s thread, now: check, then policy."""
    if not Lazy.loaded:
        load()
    st = _st  # own_state(), spelled out: a call less per fork
    if len((st if st.pid == os.getpid() else own_state()).queue) >= QUEUE_SIZE:
        flush_pending()
    lazy = Lazy
    cfg = config
    if cfg is None:
        from forksafe._config import Config

        cfg = Config()
    if lazy.library_files.get(caller.f_code.co_filename) is False:
        user = caller  # forked from the user's own code, seen before: a call less
    else:
        mechanism, user = locate(caller, mechanism)
    stamp = lazy.time()
    try:
        report = lazy.fork_check(watch=True)
        if extra is None:
            # The same report (an unchanged process, see forksafe._check) under the
            # same configuration from the same line: the same verdict and the same
            # Site object, rather than new objects for the same facts.
            last = _verdicts.get(id(report))
            code = user.f_code
            line = user.f_lineno
            if (last is not None and last[0] is report and last[1] is cfg
                    and last[2] == refusable and last[3] is code and last[4] == line
                    and last[7] is mechanism):
                return make(Decision, (mechanism, last[5], user, last[8], last[6], stamp,
                                       last[9]))
        else:
            more = extra(report)
            if more:
                import dataclasses

                report = dataclasses.replace(report, hazards=report.hazards + more)
        raw = report
        report, confirm = lazy.grade(report, lazy.context(mechanism, caller))
    except Exception as exc:  # the check must never stop a fork it was not asked to stop
        raw = report = failed_check(exc)
        confirm = ()
    verdict = action(report, cfg, refusable)
    site = lazy.site_of(user)
    if extra is None:
        if len(_verdicts) >= VERDICTS_SIZE:
            _verdicts.clear()
        _verdicts[id(raw)] = (raw, cfg, refusable, user.f_code, user.f_lineno, site, verdict,
                              mechanism, report, confirm or None)
    return make(Decision, (mechanism, site, user, report, verdict, stamp, confirm or None))


def _confirmed(decision: Decision) -> Decision:
    """After the fork: see ``forksafe._decide.confirmed``."""
    return confirmed(decision, config)


def forget_verdict() -> None:
    """The last verdict may not hold any more (the accepted hazards changed)."""
    _verdicts.clear()


def _announce(decision: Decision, *, refusable: bool) -> None:
    """Warn, or record the refused fork and refuse it."""
    cfg = config
    if cfg is None:
        return
    if decision.action == "refused":
        event = Lazy.ForkEvent(os.getpid(), None, decision.time, decision.mechanism,
                               decision.site, decision.action, decision.report)
        _record.record(own_state(), event)
    announce(decision, cfg, refusable=refusable)


def _forked(decision: Decision, pid: int | None, spare: CrashFile | None = None) -> None:
    """Parent side, right after a successful fork: record now, or queue (module docstring).

    ``spare`` is the crash file the parent opened for the child, to be named for it.
    """
    if decision.confirm is not None:
        decision = _confirmed(decision)
    st = own_state()
    if defer and (decision.action == "allowed" or not st.log_now):  # see State.log_now
        st.queue.append((decision, pid, spare))
        return
    _record.flush(st, config)
    _record.record_fork(st, config, decision, pid, spare)


# --- the wrappers --------------------------------------------------------------------------


def wrap_fork(original: Callable[[], int]) -> Callable[[], int]:
    """``os.fork``, guarded: the commonest fork, spelled out (judge, run, record inline).

    Every function called is a function and a code object written to (reference
    counts), each a page to copy after the fork (module docstring).
    """
    local = _local
    getpid = os.getpid

    def fork() -> int:
        if config is None or sys.is_finalizing():
            return original()
        try:
            decision = judge("os.fork", sys._getframe(1))
            if decision.action in ("warned", "refused"):
                _announce(decision, refusable=True)
        except (ForkSafetyError, ForkSafetyWarning):
            raise
        except Exception as exc:
            report_failure("the fork guard", exc)
            return original()
        # The child's crash file, opened here: the parent's pages cost less than the
        # child's, which every child copies (forksafe._child.arm).
        child = child_side
        spare = None
        cfg = config  # read once: another thread may uninstall meanwhile
        timeout = cfg.hang_timeout if cfg is not None else None
        me = getpid()
        if child is not None:
            try:
                spare = child.open_spare(timeout, me)
            except Exception as exc:
                report_failure("forksafe._child.open_spare", exc)
        calls: Callable[[], object] = _after_fork_child
        if timeout is not None:
            _hang_helper_before_fork(timeout)
        elif spare is not None and child is not None:
            cached = _calls_cache.get(id(spare))
            calls = (cached[1] if cached is not None and cached[0] is spare
                     else child_calls(spare, child))
            del cached
        local.after_fork_child = calls
        local.busy = me
        local.spare = spare
        local.decision = decision
        # A fork we warned about: CPython's own generic warning adds nothing now.
        quiet = decision.action == "warned"
        # In the child this frame ends with the fork, and every object it still
        # refers to is written to (released) there: a page copied for each. So
        # the thread-local keeps them for the parent.
        del decision, spare, child, cfg, timeout, calls
        try:
            pid: int = _quiet.call(original) if quiet else original()
        except BaseException:
            spare = local.spare
            local.busy = 0
            local.spare = local.decision = None
            local.after_fork_child = _after_fork_child
            child = child_side
            if spare is not None and child is not None:
                child.release_spare(spare)
            raise
        if pid:  # the child leaves .busy alone: it holds the parent's pid, not its own
            decision, spare = local.decision, local.spare
            local.busy = 0
            local.spare = local.decision = None
            local.after_fork_child = _after_fork_child
            if decision.confirm is not None:
                decision = _confirmed(decision)
            if defer and (decision.action == "allowed" or not _st.log_now):
                st = _st  # queued; a hazardous fork someone's logging waits for: now
                (st if st.pid == me else own_state(me)).queue.append((decision, pid, spare))
            else:
                _forked(decision, pid, spare)
        return pid

    return fork


def wrap_exit(original: Callable[[int], NoReturn]) -> Callable[[int], NoReturn]:
    """``os._exit``: the queued forks and reaps of this process are recorded first.

    Every forked worker ends with ``os._exit`` (multiprocessing's do), and no exit
    handler runs then: a worker's own children would be missing from the report.
    In a child that forked nothing itself (the inherited state is its parent's)
    this is a comparison and the real call.
    """
    getpid = os.getpid

    def _exit(status: int) -> NoReturn:
        st = _st
        if config is not None and st.pid == getpid() and st.queue:
            try:  # noqa: SIM105 - contextlib is not imported by the hot path
                flush_pending()
            except BaseException:  # leaving anyway: nothing may stop it
                pass
        original(status)

    return _exit


def wrap_forkpty(original: Callable[[], tuple[int, int]]) -> Callable[[], tuple[int, int]]:
    """``os.forkpty`` (and so ``pty.fork``), guarded."""

    def forkpty() -> tuple[int, int]:
        decision = _guarded("os.forkpty", sys._getframe(1))
        if decision is None:
            return original()
        result: tuple[int, int] = _run(original, decision)
        if result[0]:
            _forked(decision, result[0])
        return result

    return forkpty


def wrap_execute_child(original: Callable[..., None]) -> Callable[..., None]:
    """``subprocess.Popen._execute_child``, guarded when a ``preexec_fn`` is given."""

    def _execute_child(self: Any, args: Any, executable: Any, preexec_fn: Any,
                       *rest: Any, **kwargs: Any) -> None:
        decision = None
        if preexec_fn is not None:
            decision = _guarded("subprocess-preexec_fn", sys._getframe(1),
                                extra=lambda report: preexec_hazards(report, preexec_fn))
        if decision is None:
            return original(self, args, executable, preexec_fn, *rest, **kwargs)
        _run(lambda: original(self, args, executable, preexec_fn, *rest, **kwargs), decision)
        pid = getattr(self, "pid", None)
        if isinstance(pid, int):
            _forked(decision, pid)
        return None

    return _execute_child


def _guarded(
    mechanism: str,
    caller: types.FrameType,
    *,
    extra: Callable[[Report], tuple[Hazard, ...]] | None = None,
) -> Decision | None:
    """The decision for a wrapped fork, or None to fork as if forksafe were not there.

    None when the guard is off, at interpreter shutdown (where CPython itself
    refuses ``fork`` with its own error, and imports no longer work), and when
    forksafe itself fails: a bug of ours must never cost the program its fork.
    Only a refusal (``ForkSafetyError``) or the program's own choice to turn
    ``ForkSafetyWarning`` into an error stops it.
    """
    if config is None or sys.is_finalizing():
        return None
    try:
        decision = judge(mechanism, caller, extra=extra)
        if decision.action in ("warned", "refused"):
            _announce(decision, refusable=True)
        return decision
    except (ForkSafetyError, ForkSafetyWarning):
        raise
    except Exception as exc:
        report_failure("the fork guard", exc)
        return None


def _run(fork: Callable[[], Any], decision: Decision) -> Any:
    """Call the real fork with the hooks told to stand aside for this thread.

    The decision stays on the thread-local across the fork: a ``preexec_fn``
    child reads it there to announce itself (``_after_fork_child``).
    """
    _prepare_followers()
    _local.busy = os.getpid()
    _local.decision = decision
    try:
        if decision.action in ("warned", "refused"):
            return _quiet.call(fork)  # CPython's generic warning adds nothing now
        return fork()
    finally:
        _local.busy = 0
        _local.decision = None


# --- the at-fork hooks ------------------------------------------------------------------------


def register_hooks() -> None:
    """Once per process: hooks cannot be unregistered, so they check ``config``."""
    global _hooks_registered
    if _hooks_registered:
        return
    # The child's hook is C: what it runs is chosen per thread (see child_calls). The
    # parent's is registered by the first fork only the hooks see (_before_fork): a
    # Python call after every wrapped fork, for nothing, is pages written per fork.
    os.register_at_fork(before=_before_fork, after_in_child=_child_hook)
    _hooks_registered = True


#: Whether a fork only the hooks saw happened in this process (or its parent): until
#: then no hook runs after the fork in the parent, where there is nothing to do.
_parent_hook_registered = False


def _register_parent_hook() -> None:
    """Once per process, at the first fork no wrapper saw. Safe within a before-fork
    hook: the interpreter runs a copy of each hook list."""
    global _parent_hook_registered
    if not _parent_hook_registered:
        _parent_hook_registered = True
        os.register_at_fork(after_in_parent=_after_fork_parent)


def _children_of_this_thread() -> set[int] | None:
    try:
        with open(f"/proc/self/task/{get_native_id()}/children", "rb") as f:
            return {int(p) for p in f.read().split()}
    except (OSError, ValueError):
        return None


def _prepare_followers() -> None:
    """The followers' own before-fork work (they register no fork hooks of their own)."""
    cfg = config
    timeout = None if cfg is None else cfg.hang_timeout
    child = child_side
    if child is not None:
        child.prepare(timeout)
    if timeout is not None:
        _hang_helper_before_fork(timeout)


def _hang_helper_before_fork(timeout: float) -> None:
    side = follower
    if side is not None:
        side.before_fork(timeout)


def _before_fork() -> None:
    """A fork that no wrapper saw is about to happen in this thread."""
    if config is None or _local.busy == os.getpid() or sys.is_finalizing():
        return
    _local.after_fork_child = _after_fork_child  # in a child: not its own fork's calls
    try:
        try:
            caller: types.FrameType | None = sys._getframe(1)
        except ValueError:  # C code forking with no Python frame at all (uWSGI's master)
            caller = None
        decision = judge("unwrapped-fork", caller or sys._getframe(0), refusable=False)
        if caller is None:  # no line of the user's made this fork: its site is unknown
            decision = make(Decision, (decision.mechanism, None, None, decision.report,
                                       decision.action, decision.time, decision.confirm))
        _prepare_followers()
        _register_parent_hook()
        _local.pending = (os.getpid(), decision, _children_of_this_thread())
        _announce(decision, refusable=False)
    except Exception as exc:  # an exception here would only be printed as unraisable
        report_failure("the fork hook", exc)


def _after_fork_parent() -> None:
    pending = _local.pending
    if pending is None:
        return
    _local.pending = None
    pid, decision, before = pending
    if pid != os.getpid():  # set in the parent of this process, for its own fork
        return
    try:
        after = _children_of_this_thread()
        new = sorted(after - before) if before is not None and after is not None else []
        if new or before is None:
            _forked(decision, new[-1] if new else None)
    except Exception as exc:
        report_failure("the fork hook", exc)


def _after_fork_child() -> None:
    """In a child of a guarded fork: arm it, once (but see ``child_calls`` for the
    commonest child, which runs no Python at all).

    Nothing else, but for the child of a ``preexec_fn`` fork with a hang timeout,
    which announces itself (its parent learns its pid only once it execs). The
    child makes its own fork record when it needs one (``own_state``), and takes
    no lock here.
    """
    cfg = config
    if cfg is None:
        return
    child = child_side
    if child is not None:
        try:
            child.arm(os.getppid(), cfg.hang_timeout, _local.spare)
        except Exception as exc:
            write_fd2(FAILED.format(what="forksafe._child.arm", error=exc))
    decision = _local.decision
    side = follower
    if (cfg.hang_timeout is not None and side is not None and decision is not None
            and decision.mechanism == "subprocess-preexec_fn"):
        try:
            side.announce_pending(Lazy.ForkEvent(
                os.getppid(), os.getpid(), decision.time, decision.mechanism, decision.site,
                decision.action, decision.report))
        except Exception:  # never harm the child
            return


_Local.after_fork_child = staticmethod(_after_fork_child)

#: Consumes an iterator in C, keeping nothing.
_SINK: deque[object] = deque(maxlen=0)
_CALL = methodcaller("__call__")
#: id(spare) -> (spare, the calls its child runs); see child_calls.
_calls_cache: dict[int, tuple[Any, Callable[[], object]]] = {}


def child_calls(spare: CrashFile, child: ChildSide) -> Callable[[], object]:
    """What the child of ``os.fork``'s wrapper runs instead of ``_after_fork_child``,
    when the parent opened a memory file for it: the same work, as C calls.

    That child, the commonest of all, then runs no Python before it returns
    from ``os.fork``: ``_after_fork_child`` and the Python it calls wrote ~20
    pages in every child (each copied: a Python call writes its function and
    code objects, and each object it touches), ~70 us per fork of a 100 MB
    process. The calls arm the child (``forksafe._child.memory_armer``): they
    are ``functools.partial`` objects, run in order by a ``map`` that a
    zero-length ``deque`` consumes. The map is used up in each child's copy
    of memory only, never in the parent, so one serves every child forked
    with this spare (kept in ``_calls_cache``). The at-fork hook finds them
    per thread (``_local``), so a fork in another thread runs its own; the
    wrapper sets them right before the fork and puts ``_after_fork_child``
    back right after, and a fork in a child that no wrapper saw puts it back
    in ``_before_fork`` (in the child, the used-up map does nothing). When
    arming cannot be done this way (``memory_armer`` says None), the calls
    are just ``_after_fork_child``.
    """
    armer = child.memory_armer(spare)
    calls: Callable[[], object] = _after_fork_child
    if armer is not None:
        calls = partial(_SINK.extend, map(_CALL, armer))
    if len(_calls_cache) >= 64:  # spares are few: at most MAX_FREE + MAX_HELD at once
        _calls_cache.clear()
    _calls_cache[id(spare)] = (spare, calls)
    return calls
