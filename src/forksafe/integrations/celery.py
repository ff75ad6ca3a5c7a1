"""forksafe in Celery's prefork pool (billiard), wired through Celery's signals.

::

    # proj/celery.py, the module that makes the app
    from celery import Celery
    from forksafe.integrations import celery as forksafe_celery

    app = Celery("proj")
    forksafe_celery.configure(policy="log")

* ``configure`` (when the app module is imported, in the worker's main process,
  before the pool exists) validates the settings, starts observation - so that the
  report can say which line started each thread - and connects the receivers:
* ``worker_init`` (main process, before the pool is made): the guard is installed,
  so every fork of a pool process is checked, and a hazardous one is one record of
  the ``forksafe`` logger, which Celery's logging (it configures the root logger)
  writes to the worker's log. The hang timeout defaults to half of the hard task
  time limit (``task_time_limit``), else 10 s: a pool process stuck in a wait its
  fork explains is ended by forksafe with that diagnosis in the log, and billiard
  fails its task at once (``WorkerLostError``) instead of waiting forever.
* ``celeryd_after_setup`` (main process, once Celery's logging is set up and before
  the pool forks its processes): the process is checked and the verdict logged - the
  hazards at warning or error level, or one debug line. (``worker_init`` comes before
  Celery configures logging, where the verdict would reach no handler.) A worker not
  started by the ``celery worker`` program, which sends no ``celeryd_after_setup``,
  gets the verdict at ``worker_before_create_process``, right before the first fork
  of its event-loop pool.

``worker_process_init`` is deliberately not used: it runs in each pool process right
after its fork, which is where the fixes belong (start the thread, open the
connection there: the remedies name it), not the diagnosis - the parent has
recorded the fork already, and what the child inherited is known only there.
"""

from __future__ import annotations

import importlib
from typing import Any

from forksafe import integrations

SUBJECT = "the worker's main process (Celery's prefork pool forks its processes from it)"
TOO_LONG = (
    "forksafe: hang timeout {hang:g} s is not shorter than the hard task time limit "
    "{limit:g} s: billiard may end a hung pool process before forksafe can say why"
)
_UID = "forksafe.integrations.celery"

_settings: dict[str, Any] = {"policy": "log", "fail_on": "error", "hang_timeout": None,
                             "report": None}
_checked = False


def configure(policy: str = "log", *, fail_on: str = "error",
              hang_timeout: float | None = None, report: str | None = None) -> None:
    """Settings checked now (``ValueError`` on a bad one), observation started, and the
    receivers connected (once, however often this is called).

    ``policy``: "log" (the default: records only), "warn" (also a
    ``ForkSafetyWarning``) or "raise" (a fork of a pool process the guard would refuse
    raises ``ForkSafetyError`` instead: at start, the worker stops with it).
    ``hang_timeout``: seconds; default half of ``task_time_limit``, else 10 s.
    """
    from forksafe._config import Config
    from forksafe._ledger import observe

    Config.make(policy, fail_on, hang_timeout, report)
    _settings.update(policy=policy, fail_on=fail_on, hang_timeout=hang_timeout,
                     report=report)
    observe()
    signals = importlib.import_module("celery.signals")
    signals.worker_init.connect(worker_init, weak=False, dispatch_uid=_UID)
    signals.celeryd_after_setup.connect(check, weak=False, dispatch_uid=_UID)
    signals.worker_before_create_process.connect(check, weak=False, dispatch_uid=_UID)


def worker_init(sender: Any = None, **_: Any) -> None:
    """The ``worker_init`` receiver: the guard, with a hang timeout below the hard task
    time limit."""
    from forksafe._guard import install

    limit = _time_limit(sender)
    hang = integrations.hang_timeout_below(limit, _settings["hang_timeout"])
    install(_settings["policy"], fail_on=_settings["fail_on"], hang_timeout=hang,
            report=_settings["report"])
    if integrations.too_long(hang, limit):
        import logging

        logging.getLogger(integrations.LOGGER).warning(
            TOO_LONG.format(hang=hang, limit=limit or 0))


def check(sender: Any = None, **_: Any) -> None:
    """The ``celeryd_after_setup`` and ``worker_before_create_process`` receiver: the
    verdict, logged once, before the first pool process is forked."""
    global _checked
    if _checked:
        return
    _checked = True
    integrations.check_before_forking("celery", SUBJECT)


def _time_limit(worker: Any) -> float | None:
    """The hard task time limit (``task_time_limit``, ``--time-limit``), if any."""
    for value in (getattr(worker, "time_limit", None),
                  getattr(getattr(getattr(worker, "app", None), "conf", None),
                          "task_time_limit", None)):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return float(value)
    return None
