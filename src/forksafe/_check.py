"""``check()``: run every probe over one snapshot and bundle the hazards.

A probe that fails must not take the host program down with it: its failure
becomes an info-level ``probe-error`` hazard in the report, and a
``ForkSafetyWarning`` naming the probe is emitted once per process, not on every
fork.
"""

from __future__ import annotations

import sys
import types
import warnings
from typing import Callable

from forksafe._errors import ForkSafetyWarning
from forksafe._platform import Platform, current
from forksafe._probes import Probe, probes
from forksafe._report import Hazard, Report, Severity
from forksafe._snapshot import Snapshot

PROBE_FAILED = (
    "forksafe: the {probe!r} probe failed ({error}); its hazards are missing from fork "
    "reports, the program goes on. Please report this with the error above."
)

_reported_failures: set[str] = set()


def check(
    *,
    _platform: Platform | None = None,
    _current_frames: Callable[[], dict[int, types.FrameType]] = sys._current_frames,
    _probes: list[tuple[str, Probe]] | None = None,
) -> Report:
    """Hazards if the calling thread called ``fork()`` now."""
    snapshot = Snapshot(_platform or current(), _current_frames)
    hazards: list[Hazard] = []
    for name, probe in probes() if _probes is None else _probes:
        try:
            hazards.extend(probe(snapshot))
        except Exception as exc:  # a probe bug must never break the host program
            error = f"{type(exc).__name__}: {exc}"
            hazards.append(Hazard(
                "probe-error", Severity.INFO, f"the {name} probe failed: {error}",
                "the check went on without this probe; please report the error",
                {"probe": name, "error": error},
            ))
            if name not in _reported_failures:
                _reported_failures.add(name)
                warnings.warn(PROBE_FAILED.format(probe=name, error=error),
                              ForkSafetyWarning, stacklevel=2)
    return Report(hazards=tuple(hazards), thread=snapshot.caller.name)
