"""The guard's public face: ``install()``, ``uninstall()``, ``guard()``, and its record.

``install()`` validates its arguments (``forksafe._config``), puts the fork
wrappers in place (``forksafe._patching``, wrappers from ``forksafe._forkpath``)
and registers the at-fork hooks once. It changes nothing else until the program
imports ``threading`` (observation starts then) or ``subprocess`` (its
``preexec_fn`` path is wrapped then), and loads the check and the followers only
at the first fork. ``uninstall()`` undoes all of it by identity. Under policy
"raise" SQLite protection comes with the guard, and goes with it if the guard
turned it on.

``history()`` and ``event_for_child()`` read this process's fork record
(``forksafe._record``).
"""

from __future__ import annotations

import os

from forksafe import _exits, _forkpath, _patching, _quiet, _reaping, _record
from forksafe._config import Config
from forksafe._decide import Lazy
from forksafe._forkpath import flush_pending, own_state

TYPE_CHECKING = False  # typing is not imported at every interpreter start for this
if TYPE_CHECKING:
    import types

    from forksafe._report import ForkEvent, Outcome

#: What install() itself turned on: "observe", "sqlite".
_owned: dict[str, bool] = {}
_watcher: _patching.ImportWatcher | None = None

_WAIT_FUNCTIONS = ("waitpid", "wait", "wait3", "wait4")


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
    apply(Config.make(policy, fail_on, hang_timeout, report))


def uninstall() -> None:
    """Undo ``install()``: every patched function is restored by identity. Idempotent."""
    global _watcher
    if _forkpath.config is None:
        return
    flush_pending()
    _forkpath.config = None
    _forkpath.defer = False
    if _forkpath.child_side is not None:
        _forkpath.child_side.close_memory_files()
    if Lazy.loaded:
        from forksafe._check import close_files

        close_files()
    _patching.restore_all()
    _exits.uninstall()
    if _watcher is not None:
        _watcher.stop()
        _watcher = None
    _quiet.remove_filter()
    if _owned.pop("sqlite", False):
        _unprotect_sqlite()
    if _owned.pop("observe", False) or _owned.pop("connections", False):
        from forksafe._ledger import unobserve

        unobserve()
    _owned.pop("connections", None)
    _record.set_sink(None)


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
        self._previous = _forkpath.config
        apply(self._config)

    def __exit__(self, *exc_info: object) -> None:
        if self._previous is None:
            uninstall()
        else:
            apply(self._previous)


def installed() -> Config | None:
    """The active configuration, or None when the guard is off."""
    return _forkpath.config


def history() -> list[ForkEvent]:
    """This process's recent fork events, oldest first (at most ``HISTORY_SIZE``)."""
    flush_pending()
    st = own_state()
    with st.lock:
        return list(st.history)


def event_for_child(pid: int) -> ForkEvent | None:
    """The event of the fork that created child ``pid``, while it is remembered."""
    return _forkpath.LINK.event_for_child(pid)


def set_outcome(pid: int, outcome: Outcome) -> None:
    """Attach ``outcome`` to child ``pid``'s event and append it to the report file."""
    flush_pending()
    _record.attach_outcome(own_state(), pid, outcome)


def emit(record: dict[str, object]) -> None:
    """Append ``record`` as one JSON line to the report file, if one is configured."""
    _record.emit(record)


def apply(config: Config) -> None:
    """Install the guard with an already validated configuration (or change it in place).

    The report file first: if it cannot be opened, nothing has changed (OSError:
    ``install(report=...)`` asked for it explicitly).
    """
    global _watcher
    wanted = os.path.abspath(config.report) if config.report else None
    if wanted is None:
        _record.set_sink(None)
    elif _record.report_path() != wanted:
        from forksafe._sink import Sink

        _record.set_sink(Sink(wanted))
    if _forkpath.config is None:
        _forkpath.register_hooks()
        _patch()
        # Two wrappers wait for their module (forksafe._patching): neither is
        # imported here for a program that does not import it itself.
        _watcher = _patching.ImportWatcher({"threading": _start_observing,
                                            "sqlite3": _observe_connections,
                                            "subprocess": _patch_subprocess,
                                            "multiprocessing.process":
                                                _exits.wrap_multiprocessing})
        _watcher.start()
        _exits.install()  # a failing child's exception is kept for its parent
    if config.policy == "raise" and not _owned.get("sqlite"):
        _owned["sqlite"] = _protect_sqlite()
    elif config.policy != "raise" and _owned.pop("sqlite", False):
        _unprotect_sqlite()
    _forkpath.config = config
    # Only a hang monitor needs each fork recorded while its child lives. A report
    # file gets its lines by the batch, flushed at exit and at os._exit too (issue 14:
    # writing each fork's line at once cost ~130 more page faults per fork).
    _forkpath.defer = config.hang_timeout is None


def _patch() -> None:
    _patching.replace("os.fork", _forkpath.wrap_fork)
    _patching.replace("os._exit", _forkpath.wrap_exit)
    if hasattr(os, "forkpty"):
        _patching.replace("os.forkpty", _forkpath.wrap_forkpty)
    for name in _WAIT_FUNCTIONS:
        if hasattr(os, name):
            _patching.replace(f"os.{name}", _reaping.wrap_wait)
    if hasattr(os, "waitid"):
        _patching.replace("os.waitid", _reaping.wrap_waitid)


def _patch_subprocess(subprocess: types.ModuleType) -> None:
    if hasattr(subprocess.Popen, "_execute_child"):
        _patching.replace("subprocess.Popen._execute_child", _forkpath.wrap_execute_child)


def _observe_connections(sqlite3: types.ModuleType) -> None:
    """Record where connections open from the program's first ``import sqlite3`` on,
    whether or not it imported ``threading`` first (thread origins wait for that)."""
    from forksafe._ledger import observe_connections, observing

    if not observing():
        observe_connections()
        _owned["connections"] = True


def _start_observing(threading: types.ModuleType) -> None:
    from forksafe._ledger import observe, observing

    if not observing():
        observe()
        _owned["observe"] = True


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

