"""forksafe's events as ``logging`` records, so that the application's own handlers
(gunicorn's error log, Celery's worker log, a log shipper) see them.

Every fork the guard logged, warned about or refused, and every child outcome that
is worth a line - a crash, a hang, a stall, an exit its fork explains - becomes one
record of the logger ``forksafe``, with structured fields in ``extra`` (all named
``forksafe_*``, see ``FIELDS``) for formatters and log shippers that keep them. The
record's ``pathname``, ``lineno`` and ``funcName`` are the fork's site, not this
module's lines: a format with ``%(pathname)s:%(lineno)d`` points at the user's fork.

The rules, and why:

* **Nothing is printed by forksafe itself.** The logger carries a ``NullHandler``,
  so logging's last-resort handler (which prints WARNING and above to stderr when
  no handler is configured) never fires: a program that configured no logging sees
  exactly what it saw before (the ``ForkSafetyWarning`` only). A program that never
  imported ``logging`` gets no record at all: no handler could receive one, and
  forksafe does not import logging into a program behind its back.
* **Each event reaches the log once.** When the program routes warnings into
  logging (``logging.captureWarnings(True)``), an event forksafe warned about is
  in the log already, as the ``py.warnings`` record of its ``ForkSafetyWarning``,
  and gets no second record here.
* **Never on a child's fork path, never per clean fork.** Records are made where
  the parent records a fork (``forksafe._record``) and where it learns a child's
  fate (``forksafe._outcome``), only for hazardous forks and noteworthy outcomes:
  a server forking millions of clean workers logs nothing. A fork whose hazards
  were logged in full already is one line after that (``FORK_AGAIN``), with the
  full text again at most once an hour.
* **Never inside logging's own fork window.** ``logging`` holds its module lock
  from before a fork until after it in the parent (its at-fork hooks). A fork
  only forksafe's at-fork hooks saw (C code forking) is recorded inside that
  window when forksafe's hooks were registered first; a handler waiting there on
  another thread that waits for that lock would never return. Such a record waits
  (``_pending``) for the next record, the next fork (an after-fork hook registered
  after logging's own, so run once logging has let go), or the exit.

The sentences live here, not in ``forksafe._render``, for now: they are records of
this module's one job, built from the text layer's pieces (hazards, sites).
"""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING, Any, Callable

from forksafe._render.hazards import counts, hazards_text
from forksafe._render.outcomes import blames_fork
from forksafe._render.runs import shape
from forksafe._render.sites import site_text, where

if TYPE_CHECKING:
    import logging
    from typing import Dict, Optional, Tuple

    from forksafe._report import ForkEvent, Hazard, Outcome, Report, Site

    #: What a record is made of: level, message, the fork's site, the fields.
    Made = Optional[Tuple[int, str, Optional[Site], Dict[str, Any]]]

#: The logger every record goes to; its children are not used.
LOGGER = "forksafe"

#: The structured fields a record may carry (in ``extra``), for formatters and shippers.
FIELDS = (
    "forksafe_kind",         # fork | check | crash | hang | stall | failure
    "forksafe_severity",     # the worst hazard at that fork: error | warning | info | None
    "forksafe_action",       # the fork's: allowed | logged | warned | refused
    "forksafe_mechanism",    # os.fork, multiprocessing, ...
    "forksafe_site",         # "app.py:12 in main": where the fork was made
    "forksafe_parent_pid",
    "forksafe_child_pid",    # None for a refused fork
    "forksafe_hazards",      # [{"kind", "severity", "summary"}], warning and above
    "forksafe_repeat",       # forks with these hazards logged so far in this process
    "forksafe_status",       # outcomes: exited | signaled | hung
    "forksafe_exit_code",
    "forksafe_signal",
    "forksafe_diagnosis",
    "forksafe_blames_fork",  # outcomes: whether the fork explains it
    "forksafe_traceback",    # outcomes: the child's stacks, when it left them
)

FORK = (
    "forksafe: {mechanism} at {where} forked child {child} (parent pid {parent}, thread "
    "{thread!r}) while that was unsafe: {counts}.\n\n{hazards}"
)
FORK_AGAIN = (
    "forksafe: {mechanism} at {where} forked child {child} (parent pid {parent}) while that "
    "was unsafe: {counts}; the same hazards as logged in full at {when} (forks with them so "
    "far: {count})"
)
REFUSED = (
    "forksafe refused {mechanism} at {where} (pid {parent}, thread {thread!r}): {counts}; "
    "no child was created (policy 'raise').\n\n{hazards}"
)
CHECK_UNSAFE = "forksafe: {subject} is not safe to fork: {counts}.\n\n{hazards}"
CHECK_SAFE = "forksafe: {subject} is safe to fork ({notes})."
OUTCOME = "forksafe: {diagnosis}"
STACKS = "\nchild's stacks:\n{stacks}"
NO_HAZARD = "no hazards"

#: The full text of alike forks is logged again after this many seconds.
FULL_AGAIN = 3600.0
#: Kinds of fork remembered as logged in full (then forgotten all at once).
MAX_REMEMBERED = 256
#: Records waiting for logging's fork window to close (oldest dropped past this).
MAX_PENDING = 64

_WARNING = 20  # forksafe's Severity.WARNING, without importing the model here
_ERROR = 30
#: logging's levels (fixed by its documentation), without importing logging here: a
#: program that never imported it is not made to.
DEBUG, WARNING, ERROR = 10, 30, 40

#: shape of the hazards -> (time logged in full, forks so far); for process ``_owner``.
_full: dict[tuple[Any, ...], list[float]] = {}
_owner = 0
#: (pid, send) of records that wait (``_defer``); a forked child drops its parent's.
_pending: list[tuple[int, Callable[[], None]]] = []
_drain_hook = False
_prepared: logging.Logger | None = None


def logger() -> logging.Logger | None:
    """The ``forksafe`` logger, with its ``NullHandler``; None when the program never
    imported ``logging`` (then nobody could have configured a handler for it)."""
    global _prepared
    if _prepared is not None:
        return _prepared
    if "logging" not in sys.modules:
        return None
    import logging

    log = logging.getLogger(LOGGER)
    if not any(isinstance(h, logging.NullHandler) for h in log.handlers):
        log.addHandler(logging.NullHandler())
    _prepared = log
    return log


def active() -> bool:
    """Whether a WARNING record of the ``forksafe`` logger would reach anyone now. The
    guard asks this once per batch of forks (``forksafe._record.State.log_now``), never
    per fork; it takes no lock, so it may run anywhere, inside fork hooks too."""
    return listening(WARNING)


def listening(level: int) -> bool:
    """Whether a record of the ``forksafe`` logger at ``level`` would reach anyone: a
    handler other than a ``NullHandler`` on its way up, or a library that hooks
    ``Logger.callHandlers`` itself (Sentry's logging integration). No record is made
    for nobody: a program that imported logging but configured none pays nothing."""
    logging = sys.modules.get("logging")
    if logging is None:
        return False
    # Not getLogger(): a logger made before the program's dictConfig runs would be
    # disabled by it (disable_existing_loggers), and its records lost.
    found = logging.Logger.manager.loggerDict.get(LOGGER)
    log = found if isinstance(found, logging.Logger) else logging.getLogger()
    if log.disabled or log.getEffectiveLevel() > level:
        return False
    if getattr(logging.Logger.callHandlers, "__module__", "logging") != "logging":
        return True
    current = log
    while current is not None:
        if any(not isinstance(h, logging.NullHandler) and level >= h.level
               for h in current.handlers):
            return True
        current = current.parent if current.propagate else None
    return False


def fork(event: ForkEvent) -> None:
    """A fork the guard logged, warned about or refused (never an allowed one)."""
    if event.action == "allowed":
        return
    worst = event.report.max_severity
    level = ERROR if event.action == "refused" or (worst is not None and worst >= _ERROR) \
        else WARNING
    _emit(lambda: _fork_record(event), level, warned=event.action == "warned")


def outcome(event: ForkEvent, outcome: Outcome, *, stalled: bool = False,
            warned: bool = False) -> None:
    """A child's fate, when it is worth a line: crash, hang, stall, failure.

    ``stalled``: a hang monitor saw the child stalled (no progress, nothing at its
    fork explains it) before it died; ``warned``: forksafe warned about it too.
    """
    kind_level = classify(outcome, stalled)
    if kind_level is None:
        return
    _emit(lambda: _outcome_record(event, outcome, stalled), kind_level[1], warned=warned)


def verdict(report: Report, subject: str, site: Site | None = None) -> None:
    """A server's check of its process before it forks workers (the integrations):
    the hazards at warning level or above at the level of the worst, else one line at
    debug level. ``subject`` names what was checked ("the preloaded app")."""
    worst = report.max_severity
    level = DEBUG if worst is None or worst < _WARNING else \
        ERROR if worst >= _ERROR else WARNING
    _emit(lambda: _verdict_record(report, subject, site), level, warned=False)


def classify(outcome: Outcome, stalled: bool = False) -> tuple[str, int] | None:
    """``(kind, level)`` of an outcome's record, or None when it is not worth one.

    A hang, a crash and an exit or death the fork explains are errors; a stall
    (no progress that nothing at fork time explains, then ended from outside) is a
    warning; a failing exit the fork does not explain is debug (the application
    logs its own exceptions). An exit, or a child its parent stopped, is nothing.
    """
    if outcome.status == "hung":
        return "hang", ERROR
    if outcome.crashed:
        return "crash", ERROR
    blamed = blames_fork(outcome)
    if outcome.status == "signaled":
        if blamed:
            return "crash", ERROR
        return ("stall", WARNING) if stalled else None
    if outcome.status == "exited" and outcome.diagnosis:
        return "failure", ERROR if blamed else DEBUG
    return None


def drain() -> None:
    """Emit the records that waited for logging's fork window to close, if it has."""
    if _pending and not _in_fork_window():
        waiting = _pending[:]
        del _pending[:]
        me = os.getpid()
        for pid, send in waiting:
            if pid == me:
                send()


# --- making records --------------------------------------------------------------------------


def _emit(make: Callable[[], Made], level: int, *, warned: bool) -> None:
    """Send the record ``make`` builds at ``level``, now or once logging's fork window
    is closed; build none that nobody would receive."""
    log = logger()
    if log is None or not listening(level):
        return
    if warned and _warnings_captured():
        return  # the warning is this event's record (module docstring)
    if _in_fork_window():
        _defer(lambda: _send(make))
        return
    drain()
    _send(make)


def _send(make: Callable[[], Made]) -> None:
    log = logger()
    if log is None:
        return
    made = make()
    if made is None:
        return
    level, message, site, fields = made
    if not log.isEnabledFor(level):
        return
    from forksafe._render.text import printable

    message = printable(message)  # a log is read on terminals too: shown, never obeyed
    if site is not None:
        record = log.makeRecord(log.name, level, site.file, site.line, message, (), None,
                                site.function, fields)
    else:
        record = log.makeRecord(log.name, level, "(unknown file)", 0, message, (), None,
                                None, fields)
    log.handle(record)


def _fork_record(event: ForkEvent) -> Made:
    report = event.report
    worst = report.max_severity
    severe = [h for h in report.sorted_hazards() if h.severity >= _WARNING]
    fields = _fork_fields(event)
    how = {"mechanism": event.mechanism, "where": where(event.site), "parent": event.parent_pid,
           "child": event.child_pid, "thread": report.thread,
           "counts": counts(report.hazards) or NO_HAZARD}
    if event.action == "refused":
        fields["forksafe_repeat"] = 1
        message = REFUSED.format(hazards=hazards_text(report.sorted_hazards()), **how)
        return ERROR, message, event.site, fields
    level = ERROR if worst is not None and worst >= _ERROR else WARNING
    first, count = _remember(severe, event.time)
    fields["forksafe_repeat"] = count
    if first is None:
        message = FORK.format(hazards=hazards_text(report.sorted_hazards()), **how)
    else:
        when = time.strftime("%H:%M:%S", time.localtime(first))
        message = FORK_AGAIN.format(when=when, count=count, **how)
    return level, message, event.site, fields


def _outcome_record(event: ForkEvent, outcome: Outcome, stalled: bool) -> Made:
    kind_level = classify(outcome, stalled)
    if kind_level is None:
        return None
    kind, level = kind_level
    message = OUTCOME.format(diagnosis=outcome.diagnosis or
                             f"child {event.child_pid} {outcome.status}")
    if outcome.traceback and kind != "failure":
        message += STACKS.format(stacks=_indent(outcome.traceback))
    fields = _fork_fields(event)
    fields.update({
        "forksafe_kind": kind, "forksafe_status": outcome.status,
        "forksafe_exit_code": outcome.exit_code, "forksafe_signal": outcome.signal,
        "forksafe_diagnosis": outcome.diagnosis, "forksafe_blames_fork": blames_fork(outcome),
        "forksafe_traceback": outcome.traceback,
    })
    return level, message, event.site, fields


def _verdict_record(report: Report, subject: str, site: Site | None) -> Made:
    worst = report.max_severity
    severe = [h for h in report.sorted_hazards() if h.severity >= _WARNING]
    fields: dict[str, Any] = {
        "forksafe_kind": "check", "forksafe_severity": _severity(report),
        "forksafe_action": None, "forksafe_mechanism": "check",
        "forksafe_site": None if site is None else site_text(site),
        "forksafe_parent_pid": report.pid, "forksafe_child_pid": None,
        "forksafe_hazards": _hazard_fields(report),
    }
    if not severe:
        notes = f"{len(report.hazards)} note{'s' if len(report.hazards) != 1 else ''}"
        return DEBUG, CHECK_SAFE.format(subject=subject, notes=notes), site, fields
    _remember(severe, time.time(), count=False)
    level = ERROR if worst is not None and worst >= _ERROR else WARNING
    message = CHECK_UNSAFE.format(subject=subject, counts=counts(report.hazards),
                                  hazards=hazards_text(report.sorted_hazards()))
    return level, message, site, fields


def _fork_fields(event: ForkEvent) -> dict[str, Any]:
    return {
        "forksafe_kind": "fork", "forksafe_severity": _severity(event.report),
        "forksafe_action": event.action, "forksafe_mechanism": event.mechanism,
        "forksafe_site": None if event.site is None else site_text(event.site),
        "forksafe_parent_pid": event.parent_pid, "forksafe_child_pid": event.child_pid,
        "forksafe_hazards": _hazard_fields(event.report),
    }


def _hazard_fields(report: Report) -> list[dict[str, str]]:
    return [{"kind": h.kind, "severity": str(h.severity), "summary": h.summary}
            for h in report.sorted_hazards() if h.severity >= _WARNING]


def _severity(report: Report) -> str | None:
    worst = report.max_severity
    return None if worst is None else str(worst)


def _remember(severe: list[Hazard], stamp: float, *, count: bool = True
              ) -> tuple[float | None, int]:
    """Whether hazards of this shape were logged in full in this process (when, and how
    many forks with them so far), and remember them."""
    global _owner
    if _owner != os.getpid():  # a forked child: its own log lines, its own memory
        _full.clear()
        _owner = os.getpid()
    key = tuple((h.kind, int(h.severity), shape(h.summary)) for h in severe)
    seen = _full.get(key)
    if seen is None or stamp - seen[0] >= FULL_AGAIN:
        if len(_full) >= MAX_REMEMBERED:
            _full.clear()
        _full[key] = [stamp, (seen[1] if seen else 0) + count]
        return None, int(_full[key][1])
    seen[1] += count
    return seen[0], int(seen[1])


def _indent(text: str) -> str:
    return "\n".join("  " + line if line else line for line in text.rstrip().splitlines())


# --- the program's logging, as it stands ---------------------------------------------------


def _warnings_captured() -> bool:
    """Whether the program routes warnings into logging (``logging.captureWarnings``)."""
    import warnings

    show = warnings.showwarning
    return getattr(show, "__module__", None) == "logging" and \
        getattr(show, "__name__", None) == "_showwarning"


def _in_fork_window() -> bool:
    """Whether this thread holds logging's module lock: inside logging's at-fork window
    (module docstring), or inside logging's own configuration code."""
    import logging

    lock = getattr(logging, "_lock", None)
    owned = getattr(lock, "_is_owned", None)
    if owned is None:
        return False
    try:
        return bool(owned())
    except Exception:
        return False


def _defer(send: Callable[[], None]) -> None:
    """Keep ``send`` for later, and have the next fork of this process send it."""
    global _drain_hook
    if len(_pending) >= MAX_PENDING:
        del _pending[0]
    _pending.append((os.getpid(), send))
    if not _drain_hook:
        # Registered now, after logging's own hooks (logging is imported, or nothing
        # would be logged): in the parent it runs once logging let go of its lock. It
        # is registered only by a process that had a record wait, so a process that
        # never did pays no call per fork for it.
        os.register_at_fork(after_in_parent=drain)
        _drain_hook = True
        import atexit

        atexit.register(drain)
