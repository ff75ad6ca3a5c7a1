"""Many threads forking at once through the guard: no deadlock, no lost event, no leak.

The regular suite runs 8 threads x 40 forks; ``.ci/run`` runs the long variant
(``FORKSAFE_STRESS_FORKS=200``) on its own.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib

from conftest import MARK, run_scenario
from forksafe import _child

THREADS = 8
FORKS = int(os.environ.get("FORKSAFE_STRESS_FORKS", "40"))

STRESS = f"""
import json, os, threading
import forksafe
from forksafe import _guard

def fds():
    return sorted(os.listdir("/proc/self/fd"))

def links(numbers):
    found = []
    for fd in numbers:
        try:
            found.append(os.readlink(f"/proc/self/fd/{{fd}}"))
        except OSError:
            pass
    return found

report = REPORT_PATH
forksafe.install("log", report=report)
before = fds()
start = threading.Barrier({THREADS})
pids = {{}}
errors = []

def worker(n):
    mine = pids[n] = []
    start.wait()
    try:
        for _ in range({FORKS}):
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            mine.append(pid)
            _, status = os.waitpid(pid, 0)
            if status != 0:
                errors.append(status)
    except BaseException as exc:
        errors.append(repr(exc))

threads = [threading.Thread(target=worker, args=(n,), name=f"forker-{{n}}")
           for n in range({THREADS})]
for t in threads:
    t.start()
for t in threads:
    t.join()
after = fds()
forksafe.uninstall()
print({MARK!r} + json.dumps({{
    "pids": pids, "errors": errors, "kept": links(sorted(set(after) - set(before))),
    "history": len(_guard.history()), "me": os.getpid(),
    "after_uninstall": sorted(set(fds()) - set(before)),
}}))
"""


def test_eight_threads_forking_together(tmp_path: pathlib.Path) -> None:
    """8 threads forking at once: every fork is one event in the file, and no fd leaks."""
    report = tmp_path / "stress.jsonl"
    s = run_scenario(STRESS.replace("REPORT_PATH", repr(str(report))), tmp_path, timeout=240)
    r = s.result
    assert r["errors"] == []
    forked = [pid for pids in r["pids"].values() for pid in pids]
    assert len(forked) == THREADS * FORKS
    records = [json.loads(line) for line in report.read_text().splitlines()]
    forks = [rec for rec in records if rec["type"] == "fork"]
    assert sorted(rec["child_pid"] for rec in forks) == sorted(forked)  # none lost, none twice
    assert all(rec["parent_pid"] == r["me"] for rec in forks)
    per_thread = collections.Counter(rec["thread"] for rec in forks)
    assert per_thread == {f"forker-{n}": FORKS for n in range(THREADS)}
    assert r["history"] == min(THREADS * FORKS, 1000)
    # Only the empty crash files kept for the next children (a bounded pool) and the
    # check's view of the address-space size, and none of them once the guard is gone.
    statm = [link for link in r["kept"] if link == f"/proc/{r['me']}/statm"]
    crash_files = [link for link in r["kept"] if link not in statm]
    assert len(statm) <= 1
    assert len(crash_files) <= _child.MAX_FREE
    assert all(link.startswith("/memfd:forksafe-crash") for link in crash_files), r["kept"]
    assert r["after_uninstall"] == []
