"""The verdict on one fork, taken before it: which mechanism, whose line, what to do.

The guard's hot path (``forksafe._forkpath.judge``) checks the process and asks
this module what the policy makes of the report (``action``), names the mechanism
and the user's line from the frames above the fork (``locate``), and says it
(``announce``): a ``ForkSafetyWarning`` at the user's line, or a
``ForkSafetyError`` before any child exists. What the check, the report model and
the follower provide is bound here once, at the first fork (``Lazy``): an import
statement on every fork would be a lookup, and after a fork every page written
costs a copy-on-write fault.
"""

from __future__ import annotations

import os
import sys
from _operator import itemgetter

from forksafe._config import LEVELS
from forksafe._errors import ForkSafetyError, ForkSafetyWarning

TYPE_CHECKING = False
if TYPE_CHECKING:
    import types
    from typing import Any, Callable, NamedTuple

    from forksafe._config import Config
    from forksafe._report import ForkEvent, Hazard, Report, Site

    class Decision(NamedTuple):
        """The guard's verdict on one fork, taken before the fork."""

        mechanism: str
        site: Site | None
        frame: types.FrameType | None  # the user's frame, for the warning's attribution
        report: Report
        action: str
        time: float
        #: (ident, native id) of threads whose owner stops them before every fork, to
        #: confirm gone after the fork (``forksafe._grade``); None when there are none.
        confirm: tuple[tuple[int, int], ...] | None
else:
    class Decision(tuple):
        """The guard's verdict on one fork, taken before the fork.

        A tuple with C-level field getters, made with ``tuple.__new__``
        (``make``): an ``__init__`` or a named tuple's ``__new__`` is Python
        code, a function and a code object written to on every fork.
        (``typing`` and ``collections`` are not imported here at all.)
        """

        __slots__ = ()
        mechanism, site, frame, report, action, time, confirm = (
            property(itemgetter(i)) for i in range(7))

#: ``make(Decision, (mechanism, site, frame, report, action, time, confirm))``.
make = tuple.__new__

#: Frames of these library files (suffix, function or None) name the mechanism;
#: the outermost match wins, so a Pool's Process.start() reads as the Pool.
MECHANISMS = (
    (os.sep + os.path.join("concurrent", "futures", "process.py"), None, "concurrent.futures"),
    (os.sep + os.path.join("multiprocessing", "pool.py"), None, "multiprocessing.Pool"),
    (os.sep + os.path.join("multiprocessing", "popen_fork.py"), None, "multiprocessing"),
    (os.sep + "pty.py", "fork", "pty.fork"),
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

_WARNING = LEVELS["warning"]


class Lazy:
    """What the fork path needs from the check, the model and the frames reader,
    imported once at the first fork (``forksafe._forkpath.load``) and bound here."""

    loaded = False
    check: Callable[..., Report]
    fork_check: Callable[..., Report]
    is_library_file: Callable[[str], bool]
    library_files: dict[str, bool]
    time: Callable[[], float]
    grade: Callable[..., tuple[Report, tuple[Any, ...]]]
    context: Callable[..., Any]
    site_of: Callable[[types.FrameType], Site]
    ForkEvent: type[ForkEvent]
    Report: type[Report]
    Site: type[Site]


def action(report: Report, config: Config, refusable: bool) -> str:
    """What the policy does with a fork that would meet ``report``."""
    worst = report.max_severity
    if worst is None or worst < _WARNING:
        return "allowed"
    if config.policy == "raise" and refusable and worst >= config.fail_on:
        return "refused"
    if config.policy in ("warn", "raise"):
        return "warned"
    return "logged"


def locate(caller: types.FrameType, mechanism: str) -> tuple[str, types.FrameType]:
    """The mechanism, named by the library frames above ``caller``, and the user's frame.

    The user's line is the first frame outside the standard library and
    forksafe: the ``Process.start()`` or ``Pool(...)`` the user wrote, not a
    line of ``multiprocessing/popen_fork.py``.
    """
    is_library_file = Lazy.is_library_file
    known = Lazy.library_files  # its answers so far: a call less on every fork
    frame: types.FrameType | None = caller
    while frame is not None:
        filename = frame.f_code.co_filename
        library = known.get(filename)
        if library is None:
            library = is_library_file(filename)
        if not library:
            return mechanism, frame
        for suffix, function, name in MECHANISMS:
            if filename.endswith(suffix) and function in (None, frame.f_code.co_name):
                mechanism = name
                break
        frame = frame.f_back
    return mechanism, caller  # no user code at all (a library's own thread): the caller


def announce(decision: Decision, config: Config, *, refusable: bool) -> None:
    """Warn about a fork, or refuse it: raise ``ForkSafetyError`` with its report
    (the caller has recorded the refused fork already)."""
    from forksafe._render import forks

    if decision.action == "refused":
        from forksafe._report import Severity

        level = Severity(config.fail_on)
        raise ForkSafetyError(forks.fork_refused(
            decision.mechanism, decision.site, decision.report,
            count=len(decision.report.at_least(level)), level=str(level)), decision.report)
    if decision.action == "warned":
        global _last_warning
        unrefusable = not refusable and config.policy == "raise"
        # A process forking again as it was gets the same hazards again: its warning is
        # the same text too, made once rather than at every fork.
        report = decision.report
        key = (decision.mechanism, decision.site, unrefusable, os.getpid(), report.thread,
               tuple((h.kind, h.severity, h.summary, h.remedy, repr(h.evidence))
                     for h in report.hazards))
        last = _last_warning
        if last is not None and last[0] == key:
            message = last[1]
        else:
            message = forks.fork_warning(decision.mechanism, decision.site, report,
                                         unrefusable=unrefusable)
            _last_warning = (key, message)
        warn_at(message, decision.frame, decision.site)


#: The last fork warning's text, with what it was made from (see ``announce``).
_last_warning: tuple[tuple[Any, ...], str] | None = None


def announce_late(decision: Decision, config: Config) -> None:
    """Warn about a fork that happened already (a hazard confirmed only after it): the
    warning is printed, never raised, even where the program made warnings errors —
    raised after the fork, it would leave a child the program never learns about."""
    from forksafe._render import forks

    message = forks.fork_warning(decision.mechanism, decision.site, decision.report)
    try:
        warn_at(message, decision.frame, decision.site)
    except ForkSafetyWarning:
        from forksafe._errors import write_stderr

        write_stderr(f"{message}\n(printed, not raised: the child exists already)")


def warn_at(message: str, target: types.FrameType | None, site: Site | None = None) -> None:
    """``warnings.warn`` with the ``stacklevel`` that lands on ``target``; at ``site``
    instead when ``target`` is no code of the user's (a pool's own thread forking)."""
    import warnings

    from forksafe._render.text import printable

    message = printable(message)  # thread names, paths: a terminal shows them, obeys none

    if site is not None and target is not None and \
            Lazy.is_library_file(target.f_code.co_filename) and \
            not Lazy.is_library_file(site.file):
        module = os.path.splitext(os.path.basename(site.file))[0] or "forksafe"
        warnings.warn_explicit(message, ForkSafetyWarning, printable(site.file), site.line,
                               module=module)
        return
    if target is not None and printable(target.f_code.co_filename) != target.f_code.co_filename:
        # warnings prints the file name as it is: one a terminal would obey is escaped.
        warnings.warn_explicit(message, ForkSafetyWarning,
                               printable(target.f_code.co_filename), target.f_lineno or 0,
                               module=target.f_globals.get("__name__", "forksafe"))
        return
    level = 1
    frame: types.FrameType | None = sys._getframe(0)
    while frame is not None and frame is not target:
        frame = frame.f_back
        level += 1
    warnings.warn(message, ForkSafetyWarning, stacklevel=level if frame is not None else 2)


def preexec_hazards(report: Report, preexec_fn: Any) -> tuple[Hazard, ...]:
    """A ``preexec_fn`` runs Python in the child: a hazard of its own while threads live."""
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


def site_of(user: types.FrameType) -> Site:
    """The user's line that forked; for a fork with no user code on the stack at all (a
    pool's own thread replacing a worker), where the forking thread was started."""
    code = user.f_code
    if Lazy.is_library_file(code.co_filename):
        import threading

        from forksafe import _frames, _ledger

        raw = _ledger.thread_origin(threading.current_thread())
        site = _frames.user_site(_ledger.sites(raw)) if raw else None
        if site is not None and not Lazy.is_library_file(site.file):
            return site
    return Lazy.Site(code.co_filename, user.f_lineno, code.co_name)


def confirmed(decision: Decision, cfg: Config | None) -> Decision:
    """After the fork: the threads graded info because their owner's hook stops them
    before every fork, confirmed gone. One still running was there at the fork after
    all: the fork is judged again with it, and warned about (too late to refuse)."""
    import threading

    active = threading._active  # type: ignore[attr-defined]
    alive = set()
    for ident, native_id in decision.confirm or ():
        thread = active.get(ident)
        if thread is not None and thread.native_id == native_id and thread.is_alive():
            alive.add((ident, native_id))
    if not alive:
        return decision
    from forksafe._grade import unconfirmed

    report = unconfirmed(decision.report, alive)
    verdict = action(report, cfg, False) if cfg is not None else decision.action
    late = make(Decision, (decision.mechanism, decision.site, decision.frame, report, verdict,
                           decision.time, None))
    if verdict == "warned" and cfg is not None:
        announce_late(late, cfg)
    return late


def failed_check(exc: Exception) -> Report:
    """The report of a fork whose check failed: one info hazard saying so."""
    from forksafe._errors import report_failure
    from forksafe._report import Hazard, Severity

    report_failure("the fork-time check", exc)
    error = f"{type(exc).__name__}: {exc}"
    return Lazy.Report(hazards=(Hazard(
        "probe-error", Severity.INFO, f"the fork-time check failed: {error}",
        "the fork went on unchecked; please report the error", {"error": error},
    ),))
