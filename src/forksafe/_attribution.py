"""When each native runtime became active, and each unexplained native thread appeared.

A Python thread and an SQLite connection carry the label that was set when they
were started or opened (``forksafe._labels``, recorded by the ledger at that very
moment). A native runtime has no such moment that forksafe sees: GNU OpenMP
starts its pool inside a C call, gRPC its pollers inside a channel. So the
driver that sets the labels (the pytest plugin) asks here at the end of each
step — a test phase, the collection of a module — and what is active now and
was not at the previous step became so during the step that just ended.

Cheap when nothing native changed, which is almost always: the loaded images'
counters and the number of OS threads that run no Python code (one ``lstat`` of
``/proc/self/task``) are compared with those of the last look, and only a change
runs the native probe (about a millisecond). A runtime that stops being active
(its pool shut down) is forgotten, so that becoming active again later is
attributed to that later step. Outside Linux the threads cannot be counted this
cheaply, and the probe runs when the loaded images change.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Iterable, Mapping

from forksafe._report import Hazard

#: The evidence key of the label (as the probes of threads and connections write it).
DURING = "during"


class RuntimeWatch:
    """The label of the step during which each active runtime and native thread appeared."""

    def __init__(self, *, look: Callable[[], Iterable[Hazard]] | None = None,
                 key: Callable[[], object] | None = None) -> None:
        self._look = look or _native_hazards
        self._key_of = key or _native_key
        self._key: object = None
        #: Runtime catalog key -> the label of the step it became active in.
        self.runtimes: dict[str, str] = {}
        #: OS thread id of a native thread no runtime accounts for -> the label.
        self.threads: dict[int, str] = {}

    def note(self, label: str) -> None:
        """The step ``label`` has just ended: see what became active during it.

        Raises what the look raises (the caller decides how a failure is told).
        """
        key = self._key_of()
        if key is not None and key == self._key:
            return
        # Taken before the look: a change while looking shows as a change next time.
        self._key = key
        runtimes: dict[str, str] = {}
        threads: dict[int, str] = {}
        for hazard in self._look():
            ev = hazard.evidence
            if hazard.kind == "native-runtime" and ev.get("active"):
                runtime = ev.get("runtime")
                if isinstance(runtime, str):
                    runtimes[runtime] = self.runtimes.get(runtime, label)
            elif hazard.kind == "native-thread":
                tid = ev.get("tid")
                if isinstance(tid, int):
                    threads[tid] = self.threads.get(tid, label)
        self.runtimes, self.threads = runtimes, threads

    def label_of(self, kind: str, evidence: Mapping[str, Any]) -> str | None:
        """The label for a native hazard's evidence, if this watch knows one."""
        if kind == "native-runtime":
            runtime = evidence.get("runtime")
            return self.runtimes.get(runtime) if isinstance(runtime, str) else None
        if kind == "native-thread":
            tid = evidence.get("tid")
            return self.threads.get(tid) if isinstance(tid, int) else None
        return None

    def annotate(self, hazards: Iterable[dict[str, Any]]) -> None:
        """Add the label to the evidence of native hazards in their JSON form (dicts of
        the caller's own: a report's evidence is shared by the reports that reuse it)."""
        for hazard in hazards:
            evidence = hazard.get("evidence")
            if not isinstance(evidence, dict) or DURING in evidence:
                continue
            label = self.label_of(str(hazard.get("kind")), evidence)
            if label is not None:
                evidence[DURING] = label


def _native_hazards() -> list[Hazard]:
    """What the native probe finds now (its report is never the guard's to reuse)."""
    from forksafe._check import check_with
    from forksafe._probes import probes

    native = [(name, probe) for name, probe in probes() if name == "native"]
    return list(check_with(probes=native, reuse=False).hazards)


#: The loaded images' version reader (``forksafe._platform``), once found: (reader,).
_reader: list[Callable[[], int] | None] = []


def _native_key() -> object:
    """What changes when a runtime may have become active: the loaded images, and the
    number of OS threads that run no Python code. None when neither can be read."""
    if not _reader:
        from forksafe._platform import current

        make = getattr(current(), "images_version_reader", None)
        _reader.append(make() if make is not None else None)
    reader = _reader[0]
    images = reader() if reader is not None else None
    try:
        native = os.lstat("/proc/self/task").st_nlink - 2 - len(sys._current_frames())
    except OSError:  # no procfs: the images alone
        native = None
    if images is None and native is None:
        return None
    return (images, native)
