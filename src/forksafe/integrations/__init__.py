"""forksafe inside pre-forking servers and test runners, through their own hooks.

One module per framework (``gunicorn``, ``celery``, ``django``, ``uwsgi``), each the
code of a recipe in docs/integrations.md: it installs the guard before the server's
first fork, checks the process the workers will be forked from and logs the verdict
through the server's own log, and sets a hang timeout shorter than the server's own
(so that forksafe explains a hung worker before the server kills it unexplained).
Importing any of them changes nothing; their functions act when the framework calls
them. What they share is here:

* ``send_logs_to``: the ``forksafe`` logger's records handed to another logger's
  handlers (gunicorn's error log), honouring that logger's level;
* ``worker_fork_report`` and ``check_before_forking``: the check a server's worker
  fork would meet, graded as the guard grades that server's forks, and its verdict
  logged;
* ``hang_timeout_below``: a hang timeout that fires before a server's own timeout.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from forksafe import _logsink

if TYPE_CHECKING:
    from forksafe._config import Config
    from forksafe._report import Report

#: The logger forksafe's records go to (``forksafe._logsink``).
LOGGER = _logsink.LOGGER

#: The hang timeout when the server has no timeout of its own to stay under.
DEFAULT_HANG_TIMEOUT = 10.0


class _Forward(logging.Handler):
    """Hands each record to another logger's handlers, as that logger would: only at
    or above its level, through its filters (``logging.Logger.handle``)."""

    def __init__(self, target: logging.Logger) -> None:
        super().__init__(logging.NOTSET)
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        target = self.target
        if target.isEnabledFor(record.levelno):
            target.handle(record)


def send_logs_to(target: logging.Logger, *, propagate: bool = False) -> None:
    """Send the ``forksafe`` logger's records to ``target``'s handlers.

    ``target``'s level decides, whatever it is later set to (gunicorn's
    ``--log-level``, a reload): the ``forksafe`` logger itself lets everything
    through to it. ``propagate=False`` (the default) also stops the records from
    reaching the root logger's handlers, as gunicorn stops its own: an application
    that logs its root to the same stream would print each record twice. Calling
    it again with another target replaces the first.
    """
    log = logging.getLogger(LOGGER)
    for handler in [h for h in log.handlers if isinstance(h, _Forward)]:
        log.removeHandler(handler)
    log.addHandler(_Forward(target))
    log.setLevel(logging.DEBUG)
    log.propagate = propagate
    _logsink.logger()  # its NullHandler, in case every other handler goes


def worker_fork_report(framework: str) -> Report:
    """What a worker forked now by ``framework``'s own code would meet: the check,
    graded as the guard grades that framework's forks (its fixes: a gunicorn hook, a
    Celery signal). Called in the process that will fork."""
    from forksafe._check import fork_check
    from forksafe._grade import ForkContext, grade

    return grade(fork_check(), ForkContext("os.fork", framework=framework))[0]


def check_before_forking(framework: str, subject: str) -> Report:
    """Check this process as ``framework`` is about to fork its workers from it, and
    log the verdict (``forksafe._logsink.verdict``): the hazards at the level of the
    worst, or one debug line when nothing reaches warning level."""
    report = worker_fork_report(framework)
    _logsink.verdict(report, subject)
    return report


def refusal(report: Report, config: Config | None) -> str | None:
    """The refusal the guard would make of a fork meeting ``report`` under ``config``
    (policy "raise" and a hazard at ``fail_on``), as its ``ForkSafetyError`` says it;
    None when it would let the fork happen."""
    from forksafe._decide import action
    from forksafe._render.forks import fork_refused
    from forksafe._report import Severity

    if config is None or action(report, config, True) != "refused":
        return None
    level = Severity(config.fail_on)
    return fork_refused("os.fork", None, report, count=len(report.at_least(level)),
                        level=str(level))


def hang_timeout_below(limit: float | None, wanted: float | None = None) -> float:
    """The hang timeout to use under a server's own timeout ``limit`` (seconds; None or
    0 when it has none): ``wanted`` when given, else half of ``limit``, else
    ``DEFAULT_HANG_TIMEOUT``. Half, so that forksafe has looked (the hang monitor
    needs the whole timeout without progress) and ended the worker with its
    diagnosis well before the server ends it without one."""
    if wanted is not None:
        return wanted
    if limit:
        return limit / 2
    return DEFAULT_HANG_TIMEOUT


def too_long(hang_timeout: float, limit: float | None) -> bool:
    """Whether ``hang_timeout`` leaves the server's own ``limit`` no time to be second."""
    return bool(limit) and hang_timeout >= float(limit or 0)
