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
sees (wrapped or not) and is the only place the child side happens: it
replaces forksafe's own lock, forgets the parent's history and arms
``forksafe._child`` exactly once per fork. It takes no lock.

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
— the parent only queues ``(decision, pid)`` and records it later, when it is
cheap and still in time: after a ``wait*`` call returns, before the next fork,
and whenever the history or a child's event is asked for. Before the fork, the
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
from _operator import itemgetter
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
    from typing import Any, Callable, NamedTuple, Tuple

    from forksafe._report import ForkEvent, Hazard, Outcome, Report, Site
    from forksafe._sink import Sink

    WaitResult = Tuple[Any, ...]
else:
    from _collections import deque  # the C deque, without importing `collections`

POLICIES = ("log", "warn", "raise")
FAIL_ON = ("warning", "error")
#: Fork events kept per process (``history()``), and children remembered by pid.
HISTORY_SIZE = 1000
CHILDREN_SIZE = 1000

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

# History and the child map are changed under ``_lock``, an RLock (a signal
# handler that forks may interrupt its own thread inside it). The child gets a
# fresh one: whatever thread held the parent's is gone.
_lock = RLock()
_history: deque[ForkEvent] = deque(maxlen=HISTORY_SIZE)
_children: dict[int, ForkEvent] = {}
# Forks not yet recorded (see the module docstring). A deque: append and popleft
# are atomic, so it needs no lock. Bounded by the flush before every fork.
_pending: deque[tuple[_Decision, int | None, Any]] = deque()
# Whether forks are queued rather than recorded at once: nobody outside this
# process waits for them (no report file, no hang timeout). Set by install().
_defer_records = False
_inherited: Any = None  # in a child: the parent's history, kept unfreed (see below)
# A child's own lock, history, child map and queue, made in the parent before it
# forks, so that the child only swaps them in (see _after_fork_child).
_fresh: list[Any] | None = None
# .busy: the pid of the process whose wrapper is inside the real fork on this
# thread; .pending: (pid, decision, children before) for a fork only the hooks
# saw. Stamped with the pid so that a child, which inherits them as they were
# at the fork, need not write to them: a page less to copy in every child.
_local = thread_local()
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
    with _lock:
        return list(_history)


def event_for_child(pid: int) -> ForkEvent | None:
    """The event of the fork that created child ``pid``, while it is remembered."""
    if _pending:
        _flush_pending()
    return _children.get(pid)


def set_outcome(pid: int, outcome: Outcome) -> None:
    """Attach ``outcome`` to child ``pid``'s event and append it to the report file."""
    if _pending:
        _flush_pending()
    with _lock:
        event = _children.get(pid)
        if event is not None:
            # Spelled out rather than dataclasses.replace(), which reads every field's
            # Field object: pages written on every reaped child (module docstring).
            updated = type(event)(event.parent_pid, event.child_pid, event.time,
                                  event.mechanism, event.site, event.action,
                                  event.report, outcome)
            _children[pid] = updated
            for i in range(len(_history) - 1, -1, -1):
                if _history[i] is event:
                    _history[i] = updated
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
        if child is not None:
            try:
                spare = child.open_spare(timeout)
            except Exception as exc:
                _report_failure("forksafe._child.open_spare", exc)
        if timeout is not None:
            _hang_helper_before_fork(timeout)
        local.busy = getpid()
        try:
            # A fork we warned about: CPython's own generic warning adds nothing now.
            pid: int = (_quiet.call(original) if decision.action == "warned"
                        else original())
        except BaseException:
            local.busy = 0
            if spare is not None and child is not None:
                child.release_spare(spare)
            raise
        if pid:  # the child leaves .busy alone: it holds the parent's pid, not its own
            local.busy = 0
            if _defer_records:
                _pending.append((decision, pid, spare))
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
    def wait(*args: Any, **kwargs: Any) -> WaitResult:
        result = original(*args, **kwargs)
        pid = result[0]
        if pid > 0 and _config is not None:
            if _pending:
                _flush_pending()
            event = _children.get(pid)
            if event is not None:
                _reaped(event, result[1])
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
        if _pending:
            _flush_pending()
        event = _children.get(pid)
        if event is not None:
            status = _wait_status(result.si_code, result.si_status)
            if status is not None:
                _reaped(event, status)
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
    if _pending:
        _flush_pending()
    global _last_judged, _fresh
    if _fresh is None:
        _fresh = [RLock(), deque(maxlen=HISTORY_SIZE), {}, deque()]
    lazy = _Lazy
    config = _config or Config()
    mechanism, user = _locate(caller, mechanism)
    stamp = lazy.time()
    try:
        report = lazy.fork_check()
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
    with _lock:
        _history.append(event)
        if event.child_pid is not None:
            _children.pop(event.child_pid, None)  # a recycled pid moves to the end
            _children[event.child_pid] = event
            while len(_children) > CHILDREN_SIZE:
                del _children[next(iter(_children))]
    if _sink is not None:
        emit({"type": "fork", **event.to_dict(), "command": list(getattr(sys, "argv", []))})


def _forked(decision: _Decision, pid: int | None, spare: Any = None) -> None:
    """Parent side, right after a successful fork: record now, or queue (module docstring).

    ``spare`` is the crash file the parent opened for the child, to be named
    for it (``forksafe._child.open_spare``).
    """
    if _defer_records:
        _pending.append((decision, pid, spare))
        return
    _flush_pending()
    _record_fork(decision, pid, spare)


def _flush_pending() -> None:
    """Record the queued forks, oldest first; safe from any thread."""
    while True:
        try:
            decision, pid, spare = _pending.popleft()
        except IndexError:
            return
        _record_fork(decision, pid, spare)


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


def _reaped(event: ForkEvent, status: int) -> None:
    follower = _outcome_module
    if follower is None or not (os.WIFEXITED(status) or os.WIFSIGNALED(status)):
        return
    try:
        follower.on_reaped(event.child_pid, status, event=event)
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
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_parent,
                        after_in_child=_after_fork_child)
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
    if _config is None or getattr(_local, "busy", 0) == os.getpid() or sys.is_finalizing():
        return
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
    pending = getattr(_local, "pending", None)
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
    """In every child of a guarded fork: reset our state, then arm the child once.

    Every page the child writes is copied (copy-on-write) and a new object is a
    page written, so the child makes none: it swaps in the lock, history, child
    map and queue the parent made for it (``_judge``), and keeps the parent's
    in their place, unfreed — freeing a thousand events would write to every
    page they live on. Whatever thread held the parent's lock is gone; the
    fresh one was never taken.
    """
    global _lock, _history, _children, _pending, _inherited, _fresh
    config = _config
    if config is None:
        return
    fresh = _fresh
    if fresh is None:  # a fork no wrapper or hook judged: make them here
        fresh = [RLock(), deque(maxlen=HISTORY_SIZE), {}, deque()]
    (_lock, _history, _children, _pending, fresh[0], fresh[1], fresh[2], fresh[3]) = (
        fresh[0], fresh[1], fresh[2], fresh[3], _lock, _history, _children, _pending)
    _inherited, _fresh = fresh, None
    child = _child_module
    if child is not None:
        try:
            child.arm(os.getppid(), config.hang_timeout)
        except Exception as exc:
            _write_fd2(HOOK_FAILED.format(what="forksafe._child.arm", error=exc))


def _write_fd2(line: str) -> None:
    """One line on file descriptor 2, without Python's stderr object (in a child)."""
    try:
        os.write(2, (line + "\n").encode())
    except OSError:
        return
