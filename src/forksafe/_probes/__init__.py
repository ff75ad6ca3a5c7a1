"""One module per hazard source; each exposes ``probe(snapshot) -> list[Hazard]``.

``PROBES`` fixes their order, which is also the order of kinds within a
severity in the rendered report. A probe only reads the snapshot and the
process; deciding what to do about its hazards is the guard's job.
"""

from __future__ import annotations

from typing import Callable

from forksafe._report import Hazard
from forksafe._snapshot import Snapshot

Probe = Callable[[Snapshot], "list[Hazard]"]


def probes() -> list[tuple[str, Probe]]:
    """The probes by name, imported on first use."""
    from forksafe._probes import eventloop, native, sqlite, threads

    return [
        ("native", native.probe),
        ("threads", threads.probe),
        ("sqlite", sqlite.probe),
        ("eventloop", eventloop.probe),
    ]
