"""forksafe: know what breaks in a forked child before you fork.

Importing forksafe changes nothing in the process: it starts no thread, loads
no native library, sets no variable and patches nothing. The work happens only
when a function below is called, and its modules are imported then.
"""

from __future__ import annotations

from forksafe._errors import ForkSafetyError, ForkSafetyWarning
from forksafe._report import ForkEvent, Hazard, Outcome, Report, Severity, Site

__all__ = [
    "ForkEvent",
    "ForkSafetyError",
    "ForkSafetyWarning",
    "Hazard",
    "Outcome",
    "Report",
    "Severity",
    "Site",
    "check",
    "observe",
    "unobserve",
]

__version__ = "0.1.0"


def check() -> Report:
    """Report what would break in the child if the calling thread forked now.

    Cheap enough to call before every fork (see ``benchmarks/``). For the
    origins of threads and SQLite connections, call ``observe()`` (or
    ``install()``) early, before they are created.
    """
    from forksafe._check import check as _check

    return _check()


def observe() -> None:
    """Record where threads are started and SQLite connections opened, from now on.

    Costs well under a microsecond per thread start or connection; idempotent.
    """
    from forksafe._ledger import observe as _observe

    _observe()


def unobserve() -> None:
    """Stop recording; restores ``threading.Thread.start`` and ``sqlite3.connect``."""
    from forksafe._ledger import unobserve as _unobserve

    _unobserve()
