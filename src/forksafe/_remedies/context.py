"""``get_context()``: a multiprocessing start method chosen by what forking would break.

``fork`` is the fastest start method and the only one that shares the parent's
memory copy-on-write, so it is worth keeping — when it is safe. Whether it is
safe is exactly what ``forksafe.check()`` answers, so the choice is made per
call, at the moment the pool or process is created: ``fork`` when the check
finds nothing at warning level or above, otherwise ``forkserver`` where the
platform has it (a clean, single-threaded server process forks the workers,
and it was itself started with fork+exec), otherwise ``spawn``.

The choice is never a silent global switch (``multiprocessing.set_start_method``
is left alone): ``forkserver`` and ``spawn`` change what the program must do —
guard its entry point with ``if __name__ == "__main__":`` and pass picklable
targets and arguments — so the caller opts in by calling ``get_context()``
where it creates its pool (see docs/remedies.md).
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.context
from typing import Callable

from forksafe._report import Report, Severity

UNKNOWN_METHOD = (
    "forksafe.get_context(): unknown start method {method!r}; this platform offers {methods} "
    "(or pass no method to let forksafe choose)"
)
CHOSE_FORK = "get_context: chose 'fork': forksafe.check() found nothing at warning level or above"
CHOSE_OTHER = "get_context: chose {method!r} instead of 'fork' because: {reasons}"
CHOSE_GIVEN = "get_context: using {method!r} as asked by the caller"
CHOSE_NO_FORK = "get_context: chose {method!r}: this platform has no 'fork' start method"
CHOSE_AFTER_ERROR = (
    "get_context: chose {method!r} instead of 'fork' because forksafe.check() failed ({error})"
)

#: Safe alternatives to fork, in order of preference.
_FALLBACKS = ("forkserver", "spawn")
#: At most this many hazard summaries in the debug message.
_MAX_REASONS = 3

log = logging.getLogger("forksafe")


def get_context(method: str | None = None) -> multiprocessing.context.BaseContext:
    """A multiprocessing context: ``fork`` only when forking now would break nothing.

    With ``method`` given, that start method is used (after checking that the
    platform has it). Otherwise ``forksafe.check()`` decides: ``fork`` when it
    finds nothing at warning level or above, else ``forkserver`` where
    available, else ``spawn``. The reason is logged at debug level on the
    ``forksafe`` logger. Use it where the pool is made::

        with forksafe.get_context().Pool(4) as pool: ...
        ProcessPoolExecutor(mp_context=forksafe.get_context())
    """
    return context_with(method)


def context_with(
    method: str | None = None,
    *,
    check: Callable[[], Report] | None = None,
    methods: Callable[[], list[str]] = multiprocessing.get_all_start_methods,
) -> multiprocessing.context.BaseContext:
    """``get_context()`` with the check and the platform's start methods given (tests)."""
    available = methods()
    if method is not None:
        if not isinstance(method, str) or method not in available:
            names = ", ".join(repr(m) for m in available)
            raise ValueError(UNKNOWN_METHOD.format(method=method, methods=names))
        log.debug(CHOSE_GIVEN.format(method=method))
        return multiprocessing.get_context(method)
    fallback = next((m for m in _FALLBACKS if m in available), available[0])
    if "fork" not in available:
        log.debug(CHOSE_NO_FORK.format(method=fallback))
        return multiprocessing.get_context(fallback)
    try:
        if check is None:
            from forksafe._check import check_for

            report = check_for("multiprocessing")  # what a multiprocessing child meets
        else:
            report = check()
    except Exception as exc:  # unsure whether fork is safe: do not risk it
        log.debug(CHOSE_AFTER_ERROR.format(method=fallback,
                                           error=f"{type(exc).__name__}: {exc}"))
        return multiprocessing.get_context(fallback)
    hazards = report.at_least(Severity.WARNING)
    if not hazards:
        log.debug(CHOSE_FORK)
        return multiprocessing.get_context("fork")
    reasons = "; ".join(f"[{h.severity}] {h.summary}" for h in hazards[:_MAX_REASONS])
    if len(hazards) > _MAX_REASONS:
        reasons += f"; and {len(hazards) - _MAX_REASONS} more"
    log.debug(CHOSE_OTHER.format(method=fallback, reasons=reasons))
    return multiprocessing.get_context(fallback)
