"""What SQLite protection (forksafe.protect_sqlite()) costs the parent that never forks.

Four workloads run alternately without (baseline) and with protection, in the
same process: 20k one-row inserts through ``conn.execute()`` into an in-memory
table (the worst case: SQLite does almost nothing, so our per-call frame shows),
iterating 100k rows, 2k connect/close, and 200 transactions of 20 inserts into
a file database (a realistic case). No targets: the numbers go into
docs/remedies.md.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import interleaved, line

from forksafe._remedies import sqlite as protection


def inserts() -> None:
    conn = sqlite3.connect(":memory:")  # looked up at call time: protection wraps it
    conn.execute("create table t(a, b)")
    for i in range(20_000):
        conn.execute("insert into t values (?, ?)", (i, "x"))
    conn.close()


def make_rows() -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:")
    conn.execute("create table t(a, b)")
    conn.executemany("insert into t values (?, ?)", ((i, "x") for i in range(100_000)))
    return conn


def iterate() -> None:
    conn = make_rows()
    for _ in conn.execute("select a, b from t"):
        pass
    conn.close()


def connections() -> None:
    for _ in range(2000):
        sqlite3.connect(":memory:").close()


def file_transactions(path: str) -> None:
    conn = sqlite3.connect(path)
    conn.execute("create table if not exists u(a, b, c, d)")
    for i in range(200):
        with conn:
            for j in range(20):
                conn.execute("insert into u values (?, ?, ?, ?)", (i, j, f"name {j}", 3.5))
    with conn:
        conn.execute("delete from u")
    conn.close()


def main() -> None:
    rounds = int(os.environ.get("BENCH_ROUNDS", "7"))
    with tempfile.TemporaryDirectory() as tmp:
        db = os.path.join(tmp, "bench.db")
        workloads = [
            ("20k execute() inserts (:memory:)", inserts),
            ("iterate 100k rows (:memory:)", iterate),
            ("2k connect/close (:memory:)", connections),
            ("200 tx x 20 inserts (file)", lambda: file_transactions(db)),
        ]
        print(f"SQLite protection off vs on, {rounds} interleaved rounds, medians:")
        for name, work in workloads:
            base, cand = interleaved(work, work, rounds, protection.protect_sqlite,
                                     protection.unprotect_sqlite)
            print(line(name, base, cand))


if __name__ == "__main__":
    main()
