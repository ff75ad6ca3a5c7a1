"""The observation layer must cost nothing measurable on code that never forks.

Three workloads run alternately with observation off (baseline) and on,
in the same process: 100k logging calls, starting and joining 2,000 threads,
10k sqlite3 connect/close (a file database and ``:memory:``). Target: <= 1.02x.

Two last lines put the connection numbers in proportion: the same in-memory loop
with ``connect`` wrapped by a Python function that only passes the call on, the
floor of any Python-level wrapper, before it records anything; and with the
observation layer's Python wrapper, used where the C recorder
(``forksafe._speedups``) was not built.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import sys
import tempfile
import threading
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import interleaved, line

from forksafe import _ledger

#: Each workload runs in this many slices, alternating observation off and on slice
#: by slice: drifts of the machine then hit both sides alike (one slice lasts
#: ~5-50 ms), and the ratio is that of the medians of the slices.
SLICES = 10


def logging_calls() -> None:
    log = logging.getLogger("bench")
    for i in range(100_000 // SLICES):
        log.info("request %d served", i)


def threads() -> None:
    for _ in range(2000 // SLICES):
        t = threading.Thread(target=int)
        t.start()
        t.join()


def connections(database: str) -> None:
    # Looked up at call time: observation replaces sqlite3.connect.
    for _ in range(10_000 // SLICES):
        sqlite3.connect(database).close()


def _pass_through() -> None:
    original = sqlite3.connect

    def connect(*args: Any, **kwargs: Any) -> Any:
        return original(*args, **kwargs)

    connect.__wrapped__ = original  # type: ignore[attr-defined]
    sqlite3.connect = connect


def _restore() -> None:
    sqlite3.connect = sqlite3.connect.__wrapped__  # type: ignore[attr-defined]


def main() -> None:
    logging.basicConfig(stream=open(os.devnull, "w"), level=logging.INFO)  # noqa: SIM115
    rounds = int(os.environ.get("BENCH_ROUNDS", "9")) * SLICES
    with tempfile.TemporaryDirectory() as tmp:
        db = os.path.join(tmp, "bench.db")
        sqlite3.connect(db).close()
        workloads = [
            ("100k logging calls", logging_calls),
            ("start+join 2,000 threads", threads),
            ("10k sqlite3 connect/close (file)", lambda: connections(db)),
            ("10k sqlite3 connect/close (:memory:)", lambda: connections(":memory:")),
        ]
        print(f"observation layer off vs on, {rounds // SLICES} rounds of {SLICES} interleaved "
              "slices, times of a whole workload (slice medians x slices):")
        for name, work in workloads:
            base, cand = interleaved(work, work, rounds, _ledger.observe, _ledger.unobserve)
            print(line(name, base * SLICES, cand * SLICES, target=1.02))
        base, cand = interleaved(
            lambda: connections(":memory:"), lambda: connections(":memory:"), rounds,
            _pass_through, _restore)
        print(line("  the same, a pass-through wrapper only", base * SLICES, cand * SLICES))
        _ledger.observe()
        kind = type(sqlite3.connect).__name__
        _ledger.unobserve()
        built = kind == "Recorder"
        print("(connect recorded by " + ("the C recorder, forksafe._speedups)" if built else
                                         "the Python wrapper: forksafe._speedups not built)"))
        _ledger.SPEEDUPS = False
        base, cand = interleaved(
            lambda: connections(":memory:"), lambda: connections(":memory:"), rounds,
            _ledger.observe, _ledger.unobserve)
        _ledger.SPEEDUPS = True
        print(line("  the same, the Python wrapper", base * SLICES, cand * SLICES))


if __name__ == "__main__":
    main()
