"""forksafe in gunicorn: server hooks for ``gunicorn.conf.py``.

::

    # gunicorn.conf.py
    from forksafe.integrations import gunicorn as forksafe_gunicorn

    forksafe_gunicorn.configure(policy="log")  # before --preload imports the app
    when_ready = forksafe_gunicorn.when_ready
    pre_fork = forksafe_gunicorn.pre_fork

* ``configure`` (in the config file, which gunicorn runs before it imports a
  ``--preload`` app) validates the settings and starts observation, so that the
  report can say which line of the app started each thread.
* ``when_ready`` (in the arbiter, before it forks the first worker) sends the
  ``forksafe`` logger's records to gunicorn's error log, installs the guard - every
  worker fork is then checked, and a hazardous one is one record in that log - and
  checks the preloaded app, logging the verdict: the hazards at warning or error
  level, or one debug line (silent at gunicorn's default ``--log-level info``).
* ``pre_fork`` (in the arbiter, right before each worker's fork): under policy
  "raise", a fork the guard would refuse stops the server cleanly instead - gunicorn
  halts with the refusal as its reason, before any child exists - rather than as an
  "Unhandled exception in main loop". Under "log" and "warn" it does nothing: the
  guard sees the fork itself.

The hang timeout defaults to half of gunicorn's ``--timeout``: a worker stuck in a
wait its fork explains (a lock a vanished thread held) is ended by forksafe with
that diagnosis, in the error log, before gunicorn would end it as a plain
"WORKER TIMEOUT". A user's own hooks call these first::

    def when_ready(server):
        forksafe_gunicorn.when_ready(server)
        ...
"""

from __future__ import annotations

import importlib
from typing import Any

from forksafe import integrations

SUBJECT_PRELOADED = "the preloaded app (gunicorn --preload)"
SUBJECT_ARBITER = "gunicorn's arbiter"
TOO_LONG = (
    "forksafe: hang timeout {hang:g} s is not shorter than gunicorn's --timeout {limit:g} s: "
    "gunicorn may end a hung worker as a WORKER TIMEOUT before forksafe can say why"
)
HALT = "forksafe refused to fork a worker: {refusal}"

#: What ``configure`` was given (its defaults until it is called).
_settings: dict[str, Any] = {"policy": "log", "fail_on": "error", "hang_timeout": None,
                             "report": None}
_ready = False


def configure(policy: str = "log", *, fail_on: str = "error",
              hang_timeout: float | None = None, report: str | None = None) -> None:
    """Settings for the hooks, checked now (a bad value stops gunicorn at start, with
    its message), and observation started: call it in ``gunicorn.conf.py``.

    ``policy``: "log" (the default: each hazardous worker fork is one record in
    gunicorn's error log, nothing else), "warn" (also a ``ForkSafetyWarning`` on
    stderr) or "raise" (the server stops instead of forking a worker the guard would
    refuse). ``hang_timeout``: seconds; default half of gunicorn's ``--timeout``.
    ``report``: a file for one JSON line per fork event, as ``install()`` takes it.
    """
    from forksafe._config import Config
    from forksafe._ledger import observe

    Config.make(policy, fail_on, hang_timeout, report)  # raises on a bad value
    _settings.update(policy=policy, fail_on=fail_on, hang_timeout=hang_timeout,
                     report=report)
    observe()


def when_ready(server: Any) -> None:
    """gunicorn's ``when_ready(server)`` hook: logs to gunicorn's error log, the guard
    on, the preloaded app checked (see the module docstring). Idempotent."""
    global _ready
    if _ready:
        return
    from forksafe._guard import install

    error_log = getattr(getattr(server, "log", None), "error_log", None)
    if error_log is not None:
        integrations.send_logs_to(error_log)
    limit = _gunicorn_timeout(server)
    hang = integrations.hang_timeout_below(limit, _settings["hang_timeout"])
    install(_settings["policy"], fail_on=_settings["fail_on"], hang_timeout=hang,
            report=_settings["report"])
    _ready = True
    if integrations.too_long(hang, limit):
        _warn(server, TOO_LONG.format(hang=hang, limit=limit or 0))
    preloaded = bool(getattr(getattr(server, "cfg", None), "preload_app", False))
    integrations.check_before_forking(
        "gunicorn", SUBJECT_PRELOADED if preloaded else SUBJECT_ARBITER)


def pre_fork(server: Any, worker: Any) -> None:
    """gunicorn's ``pre_fork(server, worker)`` hook: under policy "raise", halt the
    server instead of forking a worker the guard would refuse."""
    when_ready(server)  # for a config that set only this hook
    if _settings["policy"] != "raise":
        return
    from forksafe._guard import installed

    refusal = integrations.refusal(integrations.worker_fork_report("gunicorn"), installed())
    if refusal is not None:
        halt = importlib.import_module("gunicorn.errors").HaltServer
        raise halt(HALT.format(refusal=refusal), 1)


def _gunicorn_timeout(server: Any) -> float | None:
    """gunicorn's ``--timeout`` (0: none), from the arbiter or its config."""
    for value in (getattr(server, "timeout", None),
                  getattr(getattr(server, "cfg", None), "timeout", None)):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _warn(server: Any, message: str) -> None:
    log = getattr(server, "log", None)
    if log is not None and hasattr(log, "warning"):
        log.warning(message)
