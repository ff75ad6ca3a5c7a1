"""Parent side of following a forked child: reaping, crash and hang diagnosis.

Work in progress: the interface is firm (the guard calls these), the bodies grow.
"""

from __future__ import annotations

from forksafe._report import ForkEvent


def on_forked(event: ForkEvent, hang_timeout: float | None) -> None:
    """Called in the parent right after a successful guarded fork."""


def on_reaped(pid: int, status: int) -> None:
    """Called when a guarded child ``pid`` was reaped with raw wait ``status``."""
