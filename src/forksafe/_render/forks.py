"""What the guard says about one fork: the warning, the refusal, the fork itself."""

from __future__ import annotations

from forksafe._render.hazards import counts, hazards_text
from forksafe._render.shapes import ReportLike, SiteLike
from forksafe._render.sites import site_text, where

FORK_WARNING = (
    "forksafe: {mechanism} at {where} forked (pid {pid}, thread {thread!r}) while that was "
    "unsafe: {counts}. Details and fixes below; docs/guard.md explains the policies.\n\n{hazards}"
)
FORK_REFUSED = (
    "forksafe refused {mechanism} at {where}: {count} hazard(s) at or above {level!r} would "
    "break the child (policy 'raise'); no child was created.\n\n{hazards}"
)
UNREFUSABLE_NOTE = (
    "\n(This fork bypassed forksafe's wrappers: C code calling fork(), or `fork` bound "
    "before install(). Such a fork cannot be refused, so policy 'raise' only warns.)"
)


def fork_warning(mechanism: str, site: SiteLike | None, report: ReportLike, *,
                 unrefusable: bool = False) -> str:
    """The ``ForkSafetyWarning`` for a fork made while that was unsafe."""
    message = FORK_WARNING.format(
        mechanism=mechanism, where=where(site), pid=report.pid, thread=report.thread,
        counts=counts(report.hazards), hazards=hazards_text(report.sorted_hazards()))
    return message + UNREFUSABLE_NOTE if unrefusable else message


def fork_refused(mechanism: str, site: SiteLike | None, report: ReportLike, *,
                 count: int, level: str) -> str:
    """The ``ForkSafetyError`` for a fork refused under policy 'raise'."""
    return FORK_REFUSED.format(
        mechanism=mechanism, where=where(site), count=count, level=level,
        hazards=hazards_text(report.sorted_hazards()))


def describe_fork(mechanism: str, site: SiteLike | None) -> str:
    """``forked at app.py:12 in main via os.fork``: how a child came to be."""
    if site is None:
        return f"forked via {mechanism}"
    return f"forked at {site_text(site)} via {mechanism}"
