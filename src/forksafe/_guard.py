"""The guard: see every fork, decide by policy *before* it happens, record it.

``install()`` puts thin wrappers around the Python-level ways to fork
(``os.fork``, ``os.forkpty``, and ``subprocess.Popen._execute_child`` when a
``preexec_fn`` is given — wrapped when the program imports ``subprocess``) and
registers one set of ``os.register_at_fork`` hooks. Everything else is found
through those:

* ``multiprocessing``'s fork start method (``Process``, ``Pool``) and
  ``concurrent.futures.ProcessPoolExecutor`` look ``os.fork`` up at call time,
  so they go through the wrapper; ``pty.fork`` calls ``os.forkpty``. The
  mechanism is named from the library frames between the wrapper and the
  user's code, and the user's line is the first frame outside the standard
  library and forksafe — the ``Process.start()``, ``Pool(...)`` or
  ``executor.submit(...)`` the user wrote.
* Forks that bypass the wrappers — C code calling ``PyOS_BeforeFork()``
  (C extensions, ``_posixsubprocess``) or ``fork`` bound by ``from os import
  fork`` before ``install()`` — run the ``before`` hook. Such a fork cannot be
  refused (CPython ignores exceptions from fork hooks), so there ``raise``
  degrades to ``warn``. The child's pid is learnt from
  ``/proc/self/task/<tid>/children`` (the set before and after the fork).

A fork through a wrapper sets a thread-local flag so that the hooks, which run
inside the real ``fork()``, do not count it twice.

In the child, the ``after_in_child`` hook runs for *every* fork the guard
sees (wrapped or not) and is the only place the child side happens: it arms
``forksafe._child`` exactly once per fork — for ``os.fork``'s wrapper with a
memory crash file without running Python (``_child_calls``). It takes no
lock; the child makes its own fork record when it first needs one
(``_own_state``).

The policy decision lives in ``_judge`` (check, then policy) and
``_announce`` (warn or raise), both before the fork; the record of a fork is
a ``ForkEvent`` kept in a bounded history and, when a report file is
configured, appended as one JSON line (``_sink``). The parent also wraps the
``os.wait*`` family to tell the follower when a guarded child is reaped.

After the fork, the parent does as little as it can until the child is gone.
Parent and child share every page of memory copy-on-write until one of them
writes to it, and every Python statement writes (reference counts, allocator
pools): recording the event, handing it to the follower and freeing the
check's objects right after the fork cost ~300 page copies per fork, which
on a 100 MB process made a guarded fork 1.2x a bare one. So without a report
file or a hang timeout — when nobody outside this process waits for the event
— the parent only queues ``(decision, pid)``, and the ``wait*`` wrappers queue
the reaps of children that exited; both are recorded ``QUEUE_SIZE`` at a time
(a child killed by a signal at once, at its own wait), and whenever the
history or a child's event is asked for, and at exit. Before the fork, the
same reasoning: an unchanged process gets its last report back
(``forksafe._check.fork_check``), and a fork from the same line under the same
configuration reuses the last verdict and ``Site``; the ``os.fork`` wrapper
spells its steps out rather than calling helpers for them.

Anything that goes wrong inside forksafe is reported once and the fork goes
on unguarded; only a refusal under ``raise`` (or the program's own
``-W error::forksafe.ForkSafetyWarning``) ever stops one.
"""

from __future__ import annotations

import os
import sys
from _functools import partial  # type: ignore[import-not-found,unused-ignore]  # no stubs
from _operator import itemgetter, methodcaller
from _thread import RLock, get_native_id
from _thread import _local as thread_local

from forksafe import _quiet
from forksafe._errors import ForkSafetyError, ForkSafetyWarning

# Nothing else is imported at module level: the environment hook imports this
# module at the start of every Python process of a `forksafe run` tree, so its
# imports are paid by every one of them and show in their `sys.modules`
# (CPython's own tests check that `threading` is not imported behind their back).
# The check, the report model and the follower are imported at the first fork.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import types
    from collections import deque
    from typing import Any, Callable, NamedTuple, Optional, Tuple, Union

    from forksafe._report import ForkEvent, Hazard, Outcome, Report, Site
    from forksafe._sink import Sink

    WaitResult = Tuple[Any, ...]
    #: A queued fork, ``(decision, child pid, spare crash file)``, or a queued reap,
    #: ``(child pid, wait status)``; see ``_flush_pending``.
    Queued = Union[Tuple["_Decision", Optional[int], Any], Tuple[int, int]]
else:
    from _collections import deque  # the C deque, without importing `collections`

POLICIES = ("log", "warn", "raise")
FAIL_ON = ("warning", "error")
#: Fork events kept per process (``history()``), and children remembered by pid.
HISTORY_SIZE = 1000
CHILDREN_SIZE = 1000
#: Queued forks and reaps (two per child) recorded in one go, when nobody outside
#: the process waits for them (see ``_flush_pending``).
QUEUE_SIZE = 32

FORK_WARNING = (
    "forksafe: {mechanism} at {where} forked (pid {pid}, thread {thread!r}) while that was "
    "unsafe: {counts}. Details and fixes below; docs/guard.md explains the policies.\n\n{hazards}"
)
FORK_REFUSED = (
    "forksafe refused {mechanism} at {where}: {count} hazard(s) at or above {level!r} would "
    "break the child (policy 'raise'); no child was created.\n\n{hazards}"
)
UNREFUSABLE_NOTE = (
    "\n(This fork bypassed forksafe's wrappers: C code calling fork(), or `fork` bound "
    "before install(). Such a fork cannot be refused, so policy 'raise' only warns.)"
)
BAD_POLICY = "unknown fork policy {value!r}{source}; expected one of: log, warn, raise"
BAD_FAIL_ON = "unknown fail_on level {value!r}{source}; expected one of: warning, error"
BAD_HANG_TIMEOUT = "hang_timeout {value!r}{source} is not a positive number of seconds"
HOOK_FAILED = (
    "forksafe: {what} failed ({error}); forksafe goes on without it and the program is not "
    "affected. Please report this with the error above."
)
PREEXEC_SUMMARY = (
    "subprocess runs Python code (preexec_fn {name}) in the forked child while {count} other "
    "thread(s) are alive"
)
PREEXEC_REMEDY = (
    "use subprocess's own arguments instead of preexec_fn: start_new_session=True, "
    "process_group= (3.11+), user=/group=/umask=, pass_fds=; these run no Python code in "
    "the child"
)

#: Frames of these library files (suffix, function or None) name the mechanism;
#: the outermost match wins, so a Pool's Process.start() reads as the Pool.
_MECHANISMS = (
    (os.sep + os.path.join("concurrent", "futures", "process.py"), None, "concurrent.futures"),
    (os.sep + os.path.join("multiprocessing", "pool.py"), None, "multiprocessing.Pool"),
    (os.sep + os.path.join("multiprocessing", "popen_fork.py"), None, "multiprocessing"),
    (os.sep + "pty.py", "fork", "pty.fork"),
)

_WAIT_FUNCTIONS = ("waitpid", "wait", "wait3", "wait4")


class Config:
    """What ``install()`` was asked for, validated. ``fail_on`` is a severity value."""

    __slots__ = ("fail_on", "hang_timeout", "policy", "report")

    def __init__(self, policy: str = "warn", fail_on: int = 30,
                 hang_timeout: float | None = None, report: str | None = None) -> None:
        self.policy = policy
        self.fail_on = fail_on  # Severity.ERROR; an int so that no enum is imported here
        self.hang_timeout = hang_timeout
        self.report = report

    @classmethod
    def make(
        cls,
        policy: str,
        fail_on: str,
        hang_timeout: float | None,
        report: str | None,
        *,
        source: str = "",
    ) -> Config:
        """Validate the arguments; ValueError with a one-line message naming ``source``."""
        where = f" (from {source})" if source else ""
        if policy not in POLICIES:
            raise ValueError(BAD_POLICY.format(value=policy, source=where))
        if fail_on not in FAIL_ON:
            raise ValueError(BAD_FAIL_ON.format(value=fail_on, source=where))
        if hang_timeout is not None:
            ok = isinstance(hang_timeout, (int, float)) and not isinstance(hang_timeout, bool)
            if not ok or not 0 < hang_timeout < float("inf"):
                raise ValueError(BAD_HANG_TIMEOUT.format(value=hang_timeout, source=where))
            hang_timeout = float(hang_timeout)
        return cls(policy, _LEVELS[fail_on], hang_timeout, report)


_LEVELS = {"warning": 20, "error": 30}  # forksafe._report.Severity values


if TYPE_CHECKING:
    class _Decision(NamedTuple):
        """The guard's verdict on one fork, taken before the fork."""

        mechanism: str
        site: Site | None
        frame: types.FrameType | None  # the user's frame, for the warning's attribution
        report: Report
        action: str
        time: float
else:
    class _Decision(tuple):
        """The guard's verdict on one fork, taken before the fork.

        ``forksafe._child`` reads one from the ``decision`` local of the
        ``_execute_child`` wrapper in a ``preexec_fn`` child: keep the names.
        A tuple with C-level field getters, made with ``tuple.__new__``
        (``_decision``): an ``__init__`` or a named tuple's ``__new__`` is
        Python code, a function and a code object written to on every fork.
        (``typing`` and ``collections`` are not imported here at all.)
        """

        __slots__ = ()
        mechanism, site, frame, report, action, time = (
            property(itemgetter(i)) for i in range(6))

_decision = tuple.__new__


# --- state -----------------------------------------------------------------------
# ``_config`` is None when the guard is not installed: every wrapper and hook
# reads it once and passes straight through when it is None.
_config: Config | None = None
_sink: Sink | None = None
_originals: dict[str, Any] = {}  # "os.fork" -> the function our wrapper replaced
_owned: dict[str, bool] = {}  # what install() itself turned on: observe, sqlite, filter
_quiet_filter: Any = None
_hooks_registered = False
_failures: set[str] = set()

class _State:
    """The record of the forks of process ``pid``; read it through ``_own_state()``.

    ``history`` and ``children`` (the event of each child, by pid) change under
    ``lock``, an RLock (a signal handler that forks may interrupt its own
    thread inside it). ``queue`` holds forks and reaps not yet recorded (see
    the module docstring): a deque, whose append and popleft are atomic, so
    it needs no lock.

    A forked child inherits its parent's state, lock included, held perhaps
    by a thread that does not exist in the child. It makes its own when it
    first needs one (``_own_state``), not in an at-fork hook: most children
    never need one, and every object a child touches is a page it copies
    (module docstring). ``parent`` is then the inherited state, kept and not
    freed — freeing a thousand events would write to every page they live
    on — and ``successor``, on the inherited state in the child's memory,
    settles which new state wins if two threads of the child race to make it.
    """

    __slots__ = ("children", "history", "lock", "parent", "pid", "queue", "successor")

    def __init__(self, pid: int, parent: _State | None = None) -> None:
        self.pid = pid
        self.lock = RLock()
        self.history: deque[ForkEvent] = deque(maxlen=HISTORY_SIZE)
        self.children: dict[int, ForkEvent] = {}
        self.queue: deque[Queued] = deque()
        self.parent = parent
        self.successor: list[_State] = []


_st = _State(os.getpid())


def _own_state(pid: int | None = None) -> _State:
    """This process's state (``pid``: this process's pid, when the caller has it)."""
    global _st
    st = _st
    if pid is None:
        pid = os.getpid()
    if st.pid == pid:
        return st
    st.successor.append(_State(pid, st))  # atomic: the first one appended wins
    _st = st.successor[0]
    return _st


# Whether forks and reaps are queued rather than recorded at once: nobody outside
# this process waits for them (no report file, no hang timeout). Set by install().
_defer_records = False


class _Local(thread_local):
    """Per-thread fork state; class attributes are every thread's defaults.

    ``busy``: the pid of the process whose wrapper is inside the real fork on
    this thread; ``pending``: (pid, decision, children before) for a fork only
    the hooks saw. Stamped with the pid so that a child, which inherits them as
    they were at the fork, need not write to them: a page less to copy in every
    child. ``spare``: the crash file ``os.fork``'s wrapper opened for the child
    it is forking (``forksafe._child.open_spare``), None outside that fork: the
    child finds it here without a lookup that could be stale. ``decision``: that
    fork's decision, kept here across the fork (see the wrapper).
    ``after_fork_child``: what the child of this thread's fork runs (the
    at-fork hook calls it): ``_after_fork_child``, unless the wrapper set C
    calls for the child (``_child_calls``).
    """

    busy = 0
    pending: Any = None
    spare: Any = None
    decision: Any = None
    after_fork_child: Callable[[], object]


_local = _Local()
# Whether a fork only the hooks saw ever happened here: until then, the hook after
# every fork need not look at _local (one object less touched per fork).
_hooks_judged = False
_forks = 0  # forks recorded by this process (the follower wants every 256th)

_child_module: types.ModuleType | None = None
_outcome_module: types.ModuleType | None = None
_followers_loaded = False
_watcher: _ImportWatcher | None = None
# The last verdict _judge reached without ``extra`` hazards: (report, config,
# refusable, user code, user line, site, action); see _judge.
_last_judged: tuple[Report, Config, bool, types.CodeType, int, Site, str] | None = None


# --- public API --------------------------------------------------------------------


def install(
    policy: str = "warn",
    *,
    fail_on: str = "error",
    hang_timeout: float | None = None,
    report: str | None = None,
) -> None:
    """Guard every fork of this process from now on. Idempotent.

    Calling it again changes the configuration in place. ``policy``: ``"log"``
    records each fork; ``"warn"`` also issues a ``ForkSafetyWarning`` for every
    fork with a hazard at warning level or above; ``"raise"`` refuses, with a
    ``ForkSafetyError`` raised before the fork, when a hazard reaches
    ``fail_on`` (and warns below it). ``report`` names a file that gets one JSON
    line per fork event; ``hang_timeout`` is handed to the child follower.
    """
    _install(Config.make(policy, fail_on, hang_timeout, report))


def uninstall() -> None:
    """Undo ``install()``: every patched function is restored by identity. Idempotent."""
    global _config, _sink, _quiet_filter, _watcher, _defer_records
    if _config is None:
        return
    _flush_pending()
    _config = None
    _defer_records = False
    if _child_module is not None:
        _child_module.close_memory_files()
    check = sys.modules.get("forksafe._check")
    if check is not None:
        check.close_files()
    for name, original in list(_originals.items()):
        owner, attr = _owner(name)
        if owner is not None and getattr(owner, attr, None) is _wrappers.get(name):
            setattr(owner, attr, original)
        # else someone wrapped our wrapper: leave theirs, ours now passes through
    _originals.clear()
    _wrappers.clear()
    if _watcher is not None and _watcher in sys.meta_path:
        sys.meta_path.remove(_watcher)
    if _quiet_filter is not None:
        import warnings

        filters: list[Any] = warnings.filters  # type: ignore[assignment]
        try:
            filters.remove(_quiet_filter)
            warnings._filters_mutated()  # type: ignore[attr-defined]
        except ValueError:  # the program reset the filters itself
            pass
        _quiet_filter = None
    if _owned.pop("sqlite", False):
        _unprotect_sqlite()
    if _owned.pop("observe", False):
        from forksafe._ledger import unobserve

        unobserve()
    _watcher = None
    if _sink is not None:
        _sink.close()
        _sink = None


class guard:  # a class, not contextlib.contextmanager: contextlib stays unimported
    """``install()`` for the ``with`` block; afterwards the previous state is back."""

    def __init__(
        self,
        policy: str = "warn",
        *,
        fail_on: str = "error",
        hang_timeout: float | None = None,
        report: str | None = None,
    ) -> None:
        self._config = Config.make(policy, fail_on, hang_timeout, report)
        self._previous: Config | None = None

    def __enter__(self) -> None:
        self._previous = _config
        _install(self._config)

    def __exit__(self, *exc_info: object) -> None:
        if self._previous is None:
            uninstall()
        else:
            _install(self._previous)


def installed() -> Config | None:
    """The active configuration, or None when the guard is off."""
    return _config


def history() -> list[ForkEvent]:
    """This process's recent fork events, oldest first (at most ``HISTORY_SIZE``)."""
    _flush_pending()
    st = _own_state()
    with st.lock:
        return list(st.history)


def event_for_child(pid: int) -> ForkEvent | None:
    """The event of the fork that created child ``pid``, while it is remembered."""
    _flush_pending()
    return _own_state().children.get(pid)


def set_outcome(pid: int, outcome: Outcome) -> None:
    """Attach ``outcome`` to child ``pid``'s event and append it to the report file."""
    _flush_pending()
    _attach_outcome(pid, outcome)


def _attach_outcome(pid: int, outcome: Outcome) -> None:
    """``set_outcome`` for a queue being flushed, which must not flush it again."""
    st = _own_state()
    with st.lock:
        event = st.children.get(pid)
        if event is not None:
            # Spelled out rather than dataclasses.replace(), which reads every field's
            # Field object: pages written on every reaped child (module docstring).
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
    sink = _sink
    if sink is not None and not sink.write(record) and "sink" not in _failures:
        _report_failure("sink", OSError(f"cannot write to {sink.path!r}"))


# --- installing ----------------------------------------------------------------------

_wrappers: dict[str, Any] = {}


def _install(config: Config) -> None:
    global _config, _sink, _watcher, _defer_records
    # The report file first: if it cannot be opened, install() fails having
    # changed nothing (OSError: install(report=...) asked for it explicitly).
    wanted = os.path.abspath(config.report) if config.report else None
    if wanted is None:
        _sink = None
    elif _sink is None or _sink.path != wanted:
        from forksafe._sink import Sink

        _sink = Sink(wanted)
    if _config is None:
        _register_hooks()
        _patch()
        # Two wrappers wait for their module: the observation layer needs
        # `threading` (no thread can start before it is imported, so nothing is
        # missed), and `subprocess.Popen` must exist to be wrapped. Neither is
        # imported here for a program that does not import it itself.
        _watcher = _ImportWatcher({"threading": _start_observing,
                                   "subprocess": _patch_subprocess})
        for name in list(_watcher.callbacks):
            if name in sys.modules:
                _watcher.callbacks.pop(name)(sys.modules[name])
        if _watcher.callbacks:
            sys.meta_path.insert(0, _watcher)
    # SQLite protection comes with "raise" and goes with it, if we turned it on.
    if config.policy == "raise" and not _owned.get("sqlite"):
        _owned["sqlite"] = _protect_sqlite()
    elif config.policy != "raise" and _owned.pop("sqlite", False):
        _unprotect_sqlite()
    _config = config
    _defer_records = _sink is None and config.hang_timeout is None


def _start_observing(threading: types.ModuleType) -> None:
    from forksafe._ledger import observe, observing

    if not observing():
        observe()
        _owned["observe"] = True


class _Lazy:
    """What the fork path needs, imported once at the first fork and then bound here.

    An ``import`` statement on every fork is a lookup in ``sys.modules`` plus a
    look at the module's spec: small, but after a fork every page written costs a
    copy-on-write fault, so the hot path touches as few objects as it can.
    """

    check: Callable[..., Report]
    fork_check: Callable[..., Report]
    is_library_file: Callable[[str], bool]
    library_files: dict[str, bool]
    time: Callable[[], float]
    ForkEvent: type[ForkEvent]
    Report: type[Report]
    Site: type[Site]


def _load_followers() -> None:
    """Import the follower and the check before the first fork (never in a child)."""
    global _child_module, _outcome_module, _followers_loaded
    import time

    from forksafe._check import check, fork_check
    from forksafe._frames import _LIBRARY_FILES, is_library_file
    from forksafe._report import ForkEvent, Report, Site

    _Lazy.check = check
    _Lazy.fork_check = fork_check
    _Lazy.is_library_file = is_library_file
    _Lazy.library_files = _LIBRARY_FILES
    _Lazy.time = time.time
    _Lazy.ForkEvent = ForkEvent
    _Lazy.Report = Report
    _Lazy.Site = Site
    _followers_loaded = True
    _child_module = _optional("forksafe._child")
    _outcome_module = _optional("forksafe._outcome")
    if _child_module is not None:
        _child_module.warm_up()
    if _outcome_module is not None:
        _outcome_module.tidy_at_exit()
    if sys.version_info >= (3, 12):
        _silence_cpython_duplicate()


def _silence_cpython_duplicate() -> None:
    """Install the one filter that drops CPython's warning for forks we reported."""
    global _quiet_filter
    if _quiet_filter is not None:
        return
    import warnings

    warnings.filterwarnings("ignore", message=_quiet.MESSAGE, category=DeprecationWarning,
                            module=_quiet.MODULE)
    _quiet_filter = warnings.filters[0]


class _ImportWatcher:
    """Runs a callback right after the program imports one of the watched modules.

    A meta path finder that answers only for those names, by asking the other
    finders and wrapping the loader they return; every other import costs one
    dictionary lookup.
    """

    def __init__(self, callbacks: dict[str, Callable[[types.ModuleType], None]]) -> None:
        self.callbacks = callbacks

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        callback = self.callbacks.get(fullname)
        if callback is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _CallbackLoader(spec.loader, self, fullname)  # type: ignore[assignment]
                return spec
        return None


class _CallbackLoader:
    def __init__(self, loader: Any, watcher: _ImportWatcher, name: str) -> None:
        self._loader = loader
        self._watcher = watcher
        self._name = name

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self._loader.exec_module(module)
        callback = self._watcher.callbacks.pop(self._name, None)
        if not self._watcher.callbacks and self._watcher in sys.meta_path:
            sys.meta_path.remove(self._watcher)
        if callback is not None:
            try:
                callback(module)
            except Exception as exc:  # the program's import must succeed regardless
                _report_failure(f"wrapping {self._name}", exc)


def open_sink_or_warn(path: str, source: str) -> bool:
    """For the environment hook: try the report file, one line on stderr if unusable."""
    from forksafe._sink import SINK_UNWRITABLE, Sink

    try:
        Sink(path).close()
    except OSError as exc:
        sys.stderr.write(SINK_UNWRITABLE.format(path=path, error=exc.strerror or exc,
                                                source=source) + "\n")
        return False
    return True


def _optional(name: str) -> types.ModuleType | None:
    import importlib

    try:
        return importlib.import_module(name)
    except Exception as exc:
        _report_failure(f"importing {name}", exc)
        return None


def _protect_sqlite() -> bool:
    try:
        from forksafe._remedies import sqlite as remedy
    except ImportError:
        return False
    if remedy.protecting():
        return False  # the user turned it on; it stays theirs
    remedy.protect_sqlite()
    return True


def _unprotect_sqlite() -> None:
    try:
        from forksafe._remedies import sqlite as remedy
    except ImportError:
        return
    remedy.unprotect_sqlite()


def _owner(name: str) -> tuple[Any, str]:
    module, _, attr = name.rpartition(".")
    if module == "os":
        return os, attr
    if module == "subprocess.Popen":
        sp = sys.modules.get("subprocess")
        return (sp.Popen if sp is not None else None), attr
    raise AssertionError(name)


def _patch() -> None:
    targets: list[tuple[str, Callable[[Any], Any]]] = [("os.fork", _wrap_fork)]
    if hasattr(os, "forkpty"):
        targets.append(("os.forkpty", _wrap_forkpty))
    targets.extend((f"os.{name}", _wrap_wait) for name in _WAIT_FUNCTIONS if hasattr(os, name))
    if hasattr(os, "waitid"):
        targets.append(("os.waitid", _wrap_waitid))
    for name, make in targets:
        _replace(name, make)


def _patch_subprocess(subprocess: types.ModuleType) -> None:
    if hasattr(subprocess.Popen, "_execute_child"):
        _replace("subprocess.Popen._execute_child", _wrap_execute_child)


def _replace(name: str, make: Callable[[Any], Any]) -> None:
    owner, attr = _owner(name)
    original = getattr(owner, attr)
    wrapper = make(original)
    _originals[name] = original
    _wrappers[name] = wrapper
    setattr(owner, attr, wrapper)


def _copy_identity(wrapper: Any, original: Any) -> Any:
    for attr in ("__name__", "__qualname__", "__doc__"):
        value = getattr(original, attr, None)
        if isinstance(value, str):
            setattr(wrapper, attr, value)
    wrapper.__wrapped__ = original
    return wrapper


# --- the wrappers ----------------------------------------------------------------------


def _wrap_fork(original: Callable[[], int]) -> Callable[[], int]:
    # The commonest fork, spelled out: _guarded, _run and _forked inline. Every
    # function called is a function and a code object written to (reference
    # counts), each a page to copy after the fork (module docstring).
    local = _local
    getpid = os.getpid

    def fork() -> int:
        if _config is None or sys.is_finalizing():
            return original()
        try:
            decision = _judge("os.fork", sys._getframe(1))
            if decision.action in ("warned", "refused"):
                _announce(decision, refusable=True)
        except (ForkSafetyError, ForkSafetyWarning):
            raise
        except Exception as exc:
            _report_failure("the fork guard", exc)
            return original()
        # The child's crash file, opened here: the parent's pages cost less than the
        # child's, which every child copies (forksafe._child.arm).
        child = _child_module
        spare = None
        config = _config  # read once: another thread may uninstall meanwhile
        timeout = config.hang_timeout if config is not None else None
        me = getpid()
        if child is not None:
            try:
                spare = child.open_spare(timeout, me)
            except Exception as exc:
                _report_failure("forksafe._child.open_spare", exc)
        calls: Callable[[], object] = _after_fork_child
        if timeout is not None:
            _hang_helper_before_fork(timeout)
        elif spare is not None and child is not None:
            cached = _calls_cache.get(id(spare))
            calls = (cached[1] if cached is not None and cached[0] is spare
                     else _child_calls(spare, child))
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
        del decision, spare, child, config, timeout, calls
        try:
            pid: int = _quiet.call(original) if quiet else original()
        except BaseException:
            spare = local.spare
            local.busy = 0
            local.spare = local.decision = None
            local.after_fork_child = _after_fork_child
            child = _child_module
            if spare is not None and child is not None:
                child.release_spare(spare)
            raise
        if pid:  # the child leaves .busy alone: it holds the parent's pid, not its own
            decision, spare = local.decision, local.spare
            local.busy = 0
            local.spare = local.decision = None
            local.after_fork_child = _after_fork_child
            if _defer_records:
                st = _st
                (st if st.pid == me else _own_state(me)).queue.append((decision, pid, spare))
            else:
                _forked(decision, pid, spare)
        return pid

    return _copy_identity(fork, original)  # type: ignore[no-any-return]


def _wrap_forkpty(original: Callable[[], tuple[int, int]]) -> Callable[[], tuple[int, int]]:
    def forkpty() -> tuple[int, int]:
        decision = _guarded("os.forkpty", sys._getframe(1))
        if decision is None:
            return original()
        result: tuple[int, int] = _run(original, decision)
        if result[0]:
            _forked(decision, result[0])
        return result

    return _copy_identity(forkpty, original)  # type: ignore[no-any-return]


def _wrap_execute_child(original: Callable[..., None]) -> Callable[..., None]:
    def _execute_child(self: Any, args: Any, executable: Any, preexec_fn: Any,
                       *rest: Any, **kwargs: Any) -> None:
        decision = None
        if preexec_fn is not None:
            decision = _guarded("subprocess-preexec_fn", sys._getframe(1),
                                extra=lambda report: _preexec_hazards(report, preexec_fn))
        if decision is None:
            return original(self, args, executable, preexec_fn, *rest, **kwargs)
        _run(lambda: original(self, args, executable, preexec_fn, *rest, **kwargs), decision)
        pid = getattr(self, "pid", None)
        if isinstance(pid, int):
            _forked(decision, pid)
        return None

    return _copy_identity(_execute_child, original)  # type: ignore[no-any-return]


def _guarded(
    mechanism: str,
    caller: types.FrameType,
    *,
    extra: Callable[[Report], tuple[Hazard, ...]] | None = None,
) -> _Decision | None:
    """The decision for a wrapped fork, or None to fork as if forksafe were not there.

    None when the guard is off, at interpreter shutdown (where CPython itself
    refuses ``fork`` with its own error, and imports no longer work), and when
    forksafe itself fails: a bug of ours must never cost the program its fork.
    Only a refusal (``ForkSafetyError``) or the program's own choice to turn
    ``ForkSafetyWarning`` into an error stops it.
    """
    if _config is None or sys.is_finalizing():
        return None
    try:
        decision = _judge(mechanism, caller, extra=extra)
        if decision.action in ("warned", "refused"):
            _announce(decision, refusable=True)
        return decision
    except (ForkSafetyError, ForkSafetyWarning):
        raise
    except Exception as exc:
        _report_failure("the fork guard", exc)
        return None


def _wrap_wait(original: Callable[..., WaitResult]) -> Callable[..., WaitResult]:
    exited = os.WIFEXITED
    getpid = os.getpid

    def wait(*args: Any, **kwargs: Any) -> WaitResult:
        result = original(*args, **kwargs)
        pid = result[0]
        if pid > 0 and _config is not None:
            status = result[1]
            if _defer_records and exited(status):
                # A child that exited has nothing urgent to say: queued with its
                # fork, both recorded in one go (see _flush_pending).
                st = _st  # _own_state(), spelled out: a call less per child
                queue = (st if st.pid == getpid() else _own_state()).queue
                queue.append((pid, status))
                if len(queue) >= QUEUE_SIZE:
                    _flush_pending()
            else:
                _flush_pending()
                _reap(pid, status)
        return result

    return _copy_identity(wait, original)  # type: ignore[no-any-return]


def _wrap_waitid(original: Callable[..., Any]) -> Callable[..., Any]:
    """``os.waitid`` reports a child as a ``waitid_result``, not a wait status."""

    def waitid(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        if result is None or _config is None:
            return result
        options = args[2] if len(args) > 2 else kwargs.get("options", 0)
        pid = result.si_pid
        if options & getattr(os, "WNOWAIT", 0):  # only a peek: the child is reaped later
            return result
        _flush_pending()
        status = _wait_status(result.si_code, result.si_status)
        if status is not None:
            _reap(pid, status)
        return result

    return _copy_identity(waitid, original)  # type: ignore[no-any-return]


def _wait_status(code: int, value: int) -> int | None:
    """The ``wait()`` status that a ``waitid`` answer stands for (None: not an end)."""
    if code == os.CLD_EXITED:
        return (value & 0xFF) << 8
    if code == os.CLD_KILLED:
        return value & 0x7F
    if code == os.CLD_DUMPED:
        return (value & 0x7F) | 0x80
    return None


def _run(fork: Callable[[], Any], decision: _Decision) -> Any:
    """Call the real fork with the hooks told to stand aside for this thread."""
    _prepare_followers()
    _local.busy = os.getpid()
    try:
        if decision.action in ("warned", "refused"):
            return _quiet.call(fork)  # CPython's generic warning adds nothing now
        return fork()
    finally:
        _local.busy = 0


def _preexec_hazards(report: Report, preexec_fn: Any) -> tuple[Hazard, ...]:
    from forksafe._report import Hazard, Severity

    threads = [h for h in report.hazards if h.kind in ("thread", "native-thread")]
    if not threads:
        return ()
    name = getattr(preexec_fn, "__qualname__", None) or type(preexec_fn).__name__
    return (Hazard(
        "preexec-fn", Severity.WARNING,
        PREEXEC_SUMMARY.format(name=name, count=len(threads)), PREEXEC_REMEDY,
        {"preexec_fn": name, "threads": [h.evidence.get("name") for h in threads]},
    ),)


# --- deciding ---------------------------------------------------------------------------


def _judge(
    mechanism: str,
    caller: types.FrameType,
    *,
    refusable: bool = True,
    extra: Callable[[Report], tuple[Hazard, ...]] | None = None,
) -> _Decision:
    if not _followers_loaded:
        _load_followers()
    st = _st  # _own_state(), spelled out: a call less per fork
    if len((st if st.pid == os.getpid() else _own_state()).queue) >= QUEUE_SIZE:
        _flush_pending()
    global _last_judged
    lazy = _Lazy
    config = _config or Config()
    if lazy.library_files.get(caller.f_code.co_filename) is False:
        user = caller  # forked from the user's own code, seen before: a call less
    else:
        mechanism, user = _locate(caller, mechanism)
    stamp = lazy.time()
    try:
        report = lazy.fork_check(watch=True)
        if extra is None:
            # The same report (an unchanged process, see forksafe._check) under the
            # same configuration from the same line: the same verdict and the same
            # Site object, rather than new objects for the same facts.
            last = _last_judged
            code = user.f_code
            line = user.f_lineno
            if (last is not None and last[0] is report and last[1] is config
                    and last[2] == refusable and last[3] is code and last[4] == line):
                return _decision(_Decision, (mechanism, last[5], user, report, last[6], stamp))
        else:
            more = extra(report)
            if more:
                import dataclasses

                report = dataclasses.replace(report, hazards=report.hazards + more)
    except Exception as exc:  # the check must never stop a fork it was not asked to stop
        from forksafe._report import Hazard, Severity

        _report_failure("the fork-time check", exc)
        error = f"{type(exc).__name__}: {exc}"
        report = lazy.Report(hazards=(Hazard(
            "probe-error", Severity.INFO, f"the fork-time check failed: {error}",
            "the fork went on unchecked; please report the error", {"error": error},
        ),))
    worst = report.max_severity
    action = "allowed"
    if worst is not None and worst >= _LEVELS["warning"]:
        if config.policy == "raise" and refusable and worst >= config.fail_on:
            action = "refused"
        elif config.policy in ("warn", "raise"):
            action = "warned"
        else:
            action = "logged"
    site = lazy.Site(user.f_code.co_filename, user.f_lineno, user.f_code.co_name)
    if extra is None:
        _last_judged = (report, config, refusable, user.f_code, user.f_lineno, site, action)
    return _decision(_Decision, (mechanism, site, user, report, action, stamp))


def _announce(decision: _Decision, *, refusable: bool) -> None:
    config = _config or Config()
    if decision.action == "refused":
        from forksafe._report import Severity

        event = _event(decision, None)
        _record(event)
        count = len(decision.report.at_least(Severity(config.fail_on)))
        raise ForkSafetyError(FORK_REFUSED.format(
            mechanism=decision.mechanism, where=_where(decision.site), count=count,
            level=str(Severity(config.fail_on)), hazards=_hazards_text(decision.report),
        ), decision.report)
    if decision.action == "warned":
        report = decision.report
        message = FORK_WARNING.format(
            mechanism=decision.mechanism, where=_where(decision.site), pid=report.pid,
            thread=report.thread, counts=_counts(report), hazards=_hazards_text(report))
        if not refusable and config.policy == "raise":
            message += UNREFUSABLE_NOTE
        _warn_at(message, decision.frame)


def _hazards_text(report: Report) -> str:
    from forksafe._render import render_hazards

    return "\n".join(render_hazards(report.sorted_hazards())).rstrip()


def _counts(report: Report) -> str:
    """``"1 error, 2 warnings"``: the hazards at warning level and above."""
    from forksafe._report import Severity

    parts = []
    for severity in (Severity.ERROR, Severity.WARNING):
        n = sum(1 for h in report.hazards if h.severity == severity)
        if n:
            parts.append(f"{n} {severity}{'s' if n != 1 else ''}")
    return ", ".join(parts)


def _warn_at(message: str, target: types.FrameType | None) -> None:
    """``warnings.warn`` with the ``stacklevel`` that lands on ``target``."""
    import warnings

    level = 1
    frame: types.FrameType | None = sys._getframe(0)
    while frame is not None and frame is not target:
        frame = frame.f_back
        level += 1
    warnings.warn(message, ForkSafetyWarning, stacklevel=level if frame is not None else 2)


def _locate(caller: types.FrameType, mechanism: str) -> tuple[str, types.FrameType]:
    """The mechanism, named by the library frames above ``caller``, and the user's frame."""
    is_library_file = _Lazy.is_library_file
    known = _Lazy.library_files  # its answers so far: a call less on every fork
    frame: types.FrameType | None = caller
    while frame is not None:
        filename = frame.f_code.co_filename
        library = known.get(filename)
        if library is None:
            library = is_library_file(filename)
        if not library:
            return mechanism, frame
        for suffix, function, name in _MECHANISMS:
            if filename.endswith(suffix) and function in (None, frame.f_code.co_name):
                mechanism = name
                break
        frame = frame.f_back
    return mechanism, caller  # no user code at all (a library's own thread): the caller


def _where(site: Site | None) -> str:
    from forksafe._frames import where

    return "an unknown place" if site is None else where(site)


# --- recording ---------------------------------------------------------------------------


def _event(decision: _Decision, child_pid: int | None) -> ForkEvent:
    return _Lazy.ForkEvent(
        parent_pid=os.getpid(), child_pid=child_pid, time=decision.time,
        mechanism=decision.mechanism, site=decision.site, action=decision.action,
        report=decision.report,
    )


def _record(event: ForkEvent) -> None:
    st = _own_state()
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


def _forked(decision: _Decision, pid: int | None, spare: Any = None) -> None:
    """Parent side, right after a successful fork: record now, or queue (module docstring).

    ``spare`` is the crash file the parent opened for the child, to be named
    for it (``forksafe._child.open_spare``).
    """
    if _defer_records:
        _own_state().queue.append((decision, pid, spare))
        return
    _flush_pending()
    _record_fork(decision, pid, spare)


def _flush_pending() -> None:
    """Record the queued forks and reaps, oldest first; safe from any thread.

    Queued by the dozen, recorded in one go: the code that records them, and
    the objects it touches, are then written to once per flush rather than
    once per fork — pages the parent copies when it writes to them while a
    child lives (module docstring).
    """
    queue = _own_state().queue
    while queue:
        try:
            item = queue.popleft()
        except IndexError:
            return
        if len(item) == 3:
            _record_fork(*item)
        else:
            _reap(*item)


def _record_fork(decision: _Decision, pid: int | None, spare: Any = None) -> None:
    """Record a fork, then hand it over to the follower."""
    if spare is not None and pid is not None:
        child = _child_module
        if child is not None:
            child.adopt_spare(spare, pid)
    event = _Lazy.ForkEvent(os.getpid(), pid, decision.time, decision.mechanism, decision.site,
                            decision.action, decision.report)
    _record(event)
    global _forks
    _forks += 1
    config = _config
    follower = _outcome_module
    if follower is not None and pid is not None and config is not None and (
            config.hang_timeout is not None or _forks % follower.SWEEP_EVERY == 1):
        try:
            follower.on_forked(event, config.hang_timeout)
        except Exception as exc:
            _report_failure("forksafe._outcome.on_forked", exc)


def _reap(pid: int, status: int) -> None:
    """Child ``pid`` was reaped with wait ``status``: the follower says how it ended."""
    follower = _outcome_module
    if follower is None or not (os.WIFEXITED(status) or os.WIFSIGNALED(status)):
        return
    event = _own_state().children.get(pid)
    if event is None:
        return
    try:
        follower.on_reaped(pid, status, event=event, _set_outcome=_attach_outcome)
    except Exception as exc:
        _report_failure("forksafe._outcome.on_reaped", exc)


def _report_failure(what: str, exc: BaseException) -> None:
    """Say once per process that a part of forksafe failed; never raise."""
    if what in _failures:
        return
    _failures.add(what)
    message = HOOK_FAILED.format(what=what, error=f"{type(exc).__name__}: {exc}")
    try:
        import warnings

        warnings.warn(message, ForkSafetyWarning, stacklevel=3)
    except Exception:  # warnings turned into errors: the program must still go on
        _stderr(message)


def _stderr(line: str) -> None:
    try:
        sys.stderr.write(line + "\n")
    except Exception:  # no usable stderr: nothing else to tell it to
        return


# --- the at-fork hooks --------------------------------------------------------------------


def _register_hooks() -> None:
    """Once per process: hooks cannot be unregistered, so they check ``_config``."""
    global _hooks_registered
    if _hooks_registered:
        return
    # The child's hook is C: what it runs is chosen per thread (see _child_calls).
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_parent,
                        after_in_child=partial(methodcaller("after_fork_child"), _local))
    _hooks_registered = True


def _children_of_this_thread() -> set[int] | None:
    try:
        with open(f"/proc/self/task/{get_native_id()}/children", "rb") as f:
            return {int(p) for p in f.read().split()}
    except (OSError, ValueError):
        return None


def _prepare_followers() -> None:
    """The follower's own before-fork work (it registers no fork hooks of its own)."""
    config = _config
    timeout = None if config is None else config.hang_timeout
    child = _child_module
    if child is not None:
        child.prepare(timeout)
    if timeout is not None:
        _hang_helper_before_fork(timeout)


def _hang_helper_before_fork(timeout: float) -> None:
    follower = _outcome_module
    if follower is not None:
        follower.before_fork(timeout)


def _before_fork() -> None:
    """A fork that no wrapper saw is about to happen in this thread."""
    if _config is None or _local.busy == os.getpid() or sys.is_finalizing():
        return
    _local.after_fork_child = _after_fork_child  # in a child: not its own fork's calls
    try:
        caller = sys._getframe(1)
        decision = _judge("unwrapped-fork", caller, refusable=False)
        _prepare_followers()
        global _hooks_judged
        _hooks_judged = True
        _local.pending = (os.getpid(), decision, _children_of_this_thread())
        _announce(decision, refusable=False)
    except Exception as exc:  # an exception here would only be printed as unraisable
        _report_failure("the fork hook", exc)


def _after_fork_parent() -> None:
    if not _hooks_judged:
        return
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
        _report_failure("the fork hook", exc)


def _after_fork_child() -> None:
    """In a child of a guarded fork: arm it, once (but see ``_child_calls`` for the
    commonest child, which runs no Python at all).

    Nothing else: the child makes its own fork record when it needs one
    (``_own_state``), and takes no lock here.
    """
    config = _config
    if config is None:
        return
    child = _child_module
    if child is not None:
        try:
            child.arm(os.getppid(), config.hang_timeout, _local.spare)
        except Exception as exc:
            _write_fd2(HOOK_FAILED.format(what="forksafe._child.arm", error=exc))


_Local.after_fork_child = staticmethod(_after_fork_child)

#: Consumes an iterator in C, keeping nothing.
_SINK: deque[object] = deque(maxlen=0)
_CALL = methodcaller("__call__")
#: id(spare) -> (spare, the calls its child runs); see _child_calls.
_calls_cache: dict[int, tuple[Any, Callable[[], object]]] = {}


def _child_calls(spare: Any, child: types.ModuleType) -> Callable[[], object]:
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


def _write_fd2(line: str) -> None:
    """One line on file descriptor 2, without Python's stderr object (in a child)."""
    try:
        os.write(2, (line + "\n").encode())
    except OSError:
        return
