"""The observation layer must cost nothing measurable on code that never forks.

Three workloads run alternately with observation off (baseline) and on,
in the same process: 100k logging calls, starting and joining 2,000 threads,
10k sqlite3 connect/close (a file database and ``:memory:``). Target: <= 1.02x.

A last line puts the connection numbers in proportion: the same in-memory loop
with ``connect`` wrapped by a Python function that only passes the call on, the
floor of any Python-level wrapper, before it records anything.
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


def logging_calls() -> None:
    log = logging.getLogger("bench")
    for i in range(100_000):
        log.info("request %d served", i)


def threads() -> None:
    for _ in range(2000):
        t = threading.Thread(target=int)
        t.start()
        t.join()


def connections(database: str) -> None:
    # Looked up at call time: observation replaces sqlite3.connect.
    for _ in range(10_000):
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
    rounds = int(os.environ.get("BENCH_ROUNDS", "7"))
    with tempfile.TemporaryDirectory() as tmp:
        db = os.path.join(tmp, "bench.db")
        sqlite3.connect(db).close()
        workloads = [
            ("100k logging calls", logging_calls),
            ("start+join 2,000 threads", threads),
            ("10k sqlite3 connect/close (file)", lambda: connections(db)),
            ("10k sqlite3 connect/close (:memory:)", lambda: connections(":memory:")),
        ]
        print(f"observation layer off vs on, {rounds} interleaved rounds, medians:")
        for name, work in workloads:
            base, cand = interleaved(work, work, rounds, _ledger.observe, _ledger.unobserve)
            print(line(name, base, cand, target=1.02))
        base, cand = interleaved(
            lambda: connections(":memory:"), lambda: connections(":memory:"), rounds,
            _pass_through, _restore)
        print(line("  the same, a pass-through wrapper only", base, cand))


if __name__ == "__main__":
    main()
