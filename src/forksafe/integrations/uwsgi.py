"""forksafe in uWSGI: the guard in a master that loads the app before forking workers.

::

    # wsgi.py, the module uWSGI loads (in the master, unless lazy-apps)
    from forksafe.integrations import uwsgi as forksafe_uwsgi

    forksafe_uwsgi.setup(policy="log")
    application = ...

    ; uwsgi.ini
    master = true
    enable-threads = true            ; the app's threads run; needed by the next line too
    py-call-uwsgi-fork-hooks = true  ; uWSGI runs Python's fork hooks: forksafe sees its forks
    py-sys-executable = /srv/venv/bin/python  ; an interpreter for forksafe's hang monitor
    harakiri = 30                    ; the hang timeout defaults to half of it

uWSGI forks its workers in C. Unless ``py-call-uwsgi-fork-hooks`` is on (it needs
``enable-threads``), it runs none of Python's at-fork hooks there, and no Python code
can see those forks at all. With it, the guard sees each one through its hooks (as
``unwrapped-fork``: such a fork can be logged or warned about, never refused), and
each hazardous one is one record of the ``forksafe`` logger. uWSGI's log is what the
app writes to stderr, so when nothing handles that logger (no root handler either),
``setup`` gives it a handler on stderr: the records land in uWSGI's log.

The hang monitor is a helper process started with ``sys.executable``, which under
uWSGI is the ``uwsgi`` binary unless ``py-sys-executable`` names a Python; without
one, hangs are not watched (``setup`` says so in the log). With one, a worker stuck
in a wait its fork explains is ended after the hang timeout, and the monitor's line
with the diagnosis goes to uWSGI's log (uWSGI reaps its workers in C, so the
outcome is not a record of the ``forksafe`` logger).

The fix for a hazardous preloaded app is ``lazy-apps = true`` (each worker loads the
app after its fork, so inherits nothing of it), or starting its threads in a
``uwsgidecorators.postfork`` function. ``setup`` outside uWSGI does nothing.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Any

from forksafe import integrations

NEEDS = "forksafe: uWSGI option {option} is off: {why}"
WHY_HOOKS = (
    "uWSGI forks its workers in C without running Python's fork hooks, so forksafe cannot "
    "see those forks; set py-call-uwsgi-fork-hooks = true (and enable-threads = true)"
)
WHY_THREADS = (
    "without it uWSGI runs no Python fork hooks even with py-call-uwsgi-fork-hooks, and "
    "the app's threads do not run; set enable-threads = true"
)
NO_HELPER = (
    "forksafe: hung workers are not watched: sys.executable is {executable!r}, not a Python "
    "interpreter; set py-sys-executable = {python}"
)
TOO_LONG = (
    "forksafe: hang timeout {hang:g} s is not shorter than uWSGI's harakiri {limit:g} s: "
    "uWSGI may end a hung worker before forksafe can say why"
)
FORMAT = "%(asctime)s [pid %(process)d] %(levelname)s %(message)s"


def setup(policy: str = "log", *, fail_on: str = "error", hang_timeout: float | None = None,
          report: str | None = None) -> bool:
    """Install the guard in this uWSGI process with a hang timeout below ``harakiri``,
    make sure its records reach uWSGI's log, and say in that log which needed option
    is off. False (and nothing done) outside uWSGI."""
    try:
        uwsgi: Any = importlib.import_module("uwsgi")
    except ImportError:
        return False
    from forksafe._guard import install
    from forksafe._interpreter import interpreter_problem

    options = dict(getattr(uwsgi, "opt", {}) or {})
    log = _log_to_stderr()
    limit = _seconds(options.get("harakiri"))
    hang = integrations.hang_timeout_below(limit, hang_timeout)
    if interpreter_problem() is not None:
        log.warning(NO_HELPER.format(executable=sys.executable, python=_python_guess()))
    install(policy, fail_on=fail_on, hang_timeout=hang, report=report)
    lazy = _on(options.get("lazy-apps")) or _on(options.get("lazy"))
    if not lazy and _on(options.get("master")):
        if not _on(options.get("enable-threads")):
            log.warning(NEEDS.format(option="enable-threads", why=WHY_THREADS))
        if not _on(options.get("py-call-uwsgi-fork-hooks")):
            log.warning(NEEDS.format(option="py-call-uwsgi-fork-hooks", why=WHY_HOOKS))
    if integrations.too_long(hang, limit):
        log.warning(TOO_LONG.format(hang=hang, limit=limit or 0))
    return True


def _log_to_stderr() -> logging.Logger:
    """The ``forksafe`` logger, given a handler on stderr (uWSGI's log) when none of its
    records would reach one otherwise."""
    from forksafe import _logsink

    log = _logsink.logger() or logging.getLogger(integrations.LOGGER)
    if not _handled(log):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        log.addHandler(handler)
        if log.level == logging.NOTSET or log.level > logging.INFO:
            log.setLevel(logging.INFO)
    return log


def _handled(log: logging.Logger) -> bool:
    """Whether a record of ``log`` reaches a handler that writes somewhere."""
    current: logging.Logger | None = log
    while current is not None:
        if any(not isinstance(h, logging.NullHandler) for h in current.handlers):
            return True
        current = current.parent if current.propagate else None
    return False


def _on(value: Any) -> bool:
    """An option of ``uwsgi.opt`` (True, bytes, or a list when repeated) as a switch."""
    if isinstance(value, list):
        value = value[-1] if value else None
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    if isinstance(value, str):
        return value.strip().lower() not in ("", "0", "false", "no", "off")
    return bool(value)


def _seconds(value: Any) -> float | None:
    if isinstance(value, list):
        value = value[-1] if value else None
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    try:
        seconds = float(value) if value is not None and value is not True else None
    except ValueError:
        return None
    return seconds if seconds and seconds > 0 else None


def _python_guess() -> str:
    """The Python this environment most likely runs (for the hint only)."""
    for name in (f"python{sys.version_info[0]}.{sys.version_info[1]}", "python3", "python"):
        candidate = os.path.join(sys.prefix, "bin", name)
        if os.access(candidate, os.X_OK):
            return candidate
    return "/path/to/python"
