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
else:
    class Decision(tuple):
        """The guard's verdict on one fork, taken before the fork.

        A tuple with C-level field getters, made with ``tuple.__new__``
        (``make``): an ``__init__`` or a named tuple's ``__new__`` is Python
        code, a function and a code object written to on every fork.
        (``typing`` and ``collections`` are not imported here at all.)
        """

        __slots__ = ()
        mechanism, site, frame, report, action, time = (
            property(itemgetter(i)) for i in range(6))

#: ``make(Decision, (mechanism, site, frame, report, action, time))``.
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
        message = forks.fork_warning(
            decision.mechanism, decision.site, decision.report,
            unrefusable=not refusable and config.policy == "raise")
        warn_at(message, decision.frame)


def warn_at(message: str, target: types.FrameType | None) -> None:
    """``warnings.warn`` with the ``stacklevel`` that lands on ``target``."""
    import warnings

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
