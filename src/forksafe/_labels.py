"""What the program is doing now, as a label its driver sets: "during" in a report.

"Started at conftest.py:12" names a line; a test suite also wants to know
*when*: "started during tests/test_a.py::test_y" names the test that left a
thread behind for a later test's fork. Whoever drives the program and knows
what it is doing (forksafe's pytest plugin, at each test phase, fixture and
collection step) sets a label here. The observation layer records it, as it is,
with every thread started while it is set (``forksafe._ledger``, whose wrapper
reads it: one list index, all a label may cost a program whose driver sets
none), and, while ``record_connections(True)``, with every SQLite connection
opened (a ``connect`` layer of its own). The probes show it next to the start
site.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable

from forksafe import _ledger


def set_during(label: str | None) -> str | None:
    """Record ``label`` with every thread started and connection opened from now on
    (None: nothing); returns the label it replaces, for the caller to put back.

    Any thread of the process gets it: a thread started by another thread during a
    test was started during that test.
    """
    cell = _ledger.LABEL
    previous = cell[0]
    cell[0] = label
    return previous


def during() -> str | None:
    """The label set now."""
    return _ledger.LABEL[0]


#: How many drivers asked for connections to be labelled (sessions nest: pytester runs
#: a pytest session inside a pytest session); labelled while any does.
_recording = [0]


def record_connections(on: bool) -> None:
    """Record the label with each SQLite connection opened (``on``), or stop asking to."""
    _recording[0] = max(0, _recording[0] + (1 if on else -1))
    recording = _recording[0] > 0
    _ledger.set_connect_layer("during", _layer if recording else None)
    if not recording:
        _ledger.CONNECTION_LABELS.clear()


def connection_during(connection: object) -> str | None:
    """The label that was set when ``connection`` was opened, if any.

    A label is kept by the connection's address, which a freed connection's successor
    may reuse: it counts only while the ledger knows the connection's origin (its
    entry, validated as the ledger validates it). A successor opened through
    ``connect`` replaced the label anyway (``_layer``).
    """
    label = _ledger.CONNECTION_LABELS.get(id(connection))
    if label is None or not _ledger.origin_known(connection):
        return None
    return label


def _layer(original: Callable[..., Any]) -> Callable[..., Any]:
    """``original`` wrapped to record the label set when each connection is opened.

    Inside the observation layer (``forksafe._ledger.LAYER_ORDER``), whose caller must
    be the program's line, and around the protection layer, whose connection is the
    very object the program gets.
    """
    labels, cell = _ledger.CONNECTION_LABELS, _ledger.LABEL
    limit = _ledger.MAX_CONNECTIONS

    def connect(*args: Any, **kwargs: Any) -> Any:
        connection = original(*args, **kwargs)
        label = cell[0]
        if label is None:
            labels.pop(id(connection), None)  # a freed connection's label at this address
            return connection
        labels[id(connection)] = label
        if len(labels) > limit:
            _prune(labels, limit)
        return connection

    connect.__wrapped__ = original  # type: ignore[attr-defined]
    connect.__doc__ = original.__doc__
    return connect


def _prune(labels: dict[int, str], limit: int) -> None:
    """Labels of connections whose origin is forgotten go first, then the oldest."""
    known = _ledger.recorded_connections()
    for key in [k for k in labels if k not in known]:
        labels.pop(key, None)
    for key in list(itertools.islice(labels, max(0, len(labels) - limit // 2))):
        labels.pop(key, None)
