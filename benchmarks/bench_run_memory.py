"""How much memory does ``forksafe run``'s watcher need for a long run?

A server forks the same way from the same line again and again; before issue 14
the watcher kept every fork event (~3.4 KB each, with its hazards) until the end
of the run. This writes the event file such a run leaves - 100,000 forks of a
process with one idle thread holding a lock (a warning-level hazard), children
reaped ~32 forks later, every 1,000th crashing with a diagnosis - and feeds it
through ``EventTail`` and ``Merger`` as ``forksafe run`` does, then renders the
summary. Reported: the peak of Python's allocations while doing so
(``tracemalloc``), the entries the report keeps, and the time; then, for a real
``forksafe run`` of a program forking 2,000 times, the peak resident memory of the
watcher (its Python and all) or of COMMAND, whichever is higher (``wait4``).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import tracemalloc

from forksafe._runreport import EventTail, Merger, render_run

FORKS = 100_000
#: Children alive at once: each one's outcome comes this many forks after its fork.
IN_FLIGHT = 32
CRASH_EVERY = 1000


def write_events(path: str, forks: int = FORKS) -> int:
    """The event file of a run that forked ``forks`` times; its size in bytes."""
    hazard = {
        "kind": "thread", "severity": "warning",
        "summary": "thread 'cache-refresher' (started at app.py:41) holds `_cache_lock` "
                   "(taken at app.py:29) at app.py:23 in _fetch_rates",
        "remedy": "do not fork while 'cache-refresher' is inside `with _cache_lock:`; the "
                  "child would wait forever for that lock. Join or stop this thread before "
                  "forking, or fork before starting it",
        "evidence": {"name": "cache-refresher", "ident": 139624458823360, "native_id": 4242,
                     "daemon": True, "state": "idle", "doing": "blocked in `time.sleep(...)`",
                     "current": [{"file": "/srv/app.py", "line": 23, "function": "_fetch_rates",
                                  "code": "time.sleep(0.5)"}],
                     "target": "app._refresh",
                     "started_at": [{"file": "/srv/app.py", "line": 41,
                                     "function": "<module>", "code": "refresher.start()"}],
                     "locks": [{"lock": "_cache_lock", "at": "/srv/app.py:29",
                                "locked": True}]}}
    def fork(child: int) -> str:
        return json.dumps({
            "type": "fork", "parent_pid": 4000, "child_pid": child,
            "time": "2026-11-25T10:00:00Z", "mechanism": "os.fork",
            "site": {"file": "/srv/app.py", "line": 66, "function": "serve"},
            "action": "logged", "thread": "MainThread", "hazards": [hazard],
            "command": ["app.py", "--serve"]}, separators=(",", ":"))

    def outcome(child: int) -> str:
        if child % CRASH_EVERY == 0:
            fate = {"status": "signaled", "exit_code": None, "signal": "SIGSEGV",
                    "traceback": "Fatal Python error: Segmentation fault\n",
                    "diagnosis": f"child {child} was killed by SIGSEGV"}
        else:
            fate = {"status": "exited", "exit_code": 0, "signal": None, "traceback": None,
                    "diagnosis": None}
        return json.dumps({"type": "outcome", "parent_pid": 4000, "child_pid": child,
                           "outcome": fate}, separators=(",", ":"))

    with open(path, "w") as f:
        for number in range(forks + IN_FLIGHT):
            if number < forks:
                f.write(fork(10_000 + number) + "\n")
            if number >= IN_FLIGHT:
                f.write(outcome(10_000 + number - IN_FLIGHT) + "\n")
        return f.tell()


def measure(path: str) -> dict[str, float]:
    """Read ``path`` as ``forksafe run`` does, under tracemalloc."""
    tracemalloc.start()
    start = time.perf_counter()
    tail = EventTail(path)
    merger = Merger()
    while True:  # polls, as the supervisor's loop makes them
        before = tail.position
        for record in tail.read():
            merger.add(record)
        if tail.position == before:
            break
    for record in tail.read(final=True):
        merger.add(record)
    after_merge = tracemalloc.get_traced_memory()
    report = merger.report(["app.py", "--serve"], 0)
    text = render_run(report)
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    forks = report["forks"]
    return {"peak_mb": peak / 1e6, "merged_mb": after_merge[0] / 1e6,
            "entries": len(forks), "forks": sum(f.get("count", 1) for f in forks),
            "seconds": elapsed, "summary_lines": len(text.splitlines())}


#: The real run: a program that forks this many times under ``forksafe run``.
REAL_FORKS = 2000
REAL_APP = """
import os, sys, threading
lock = threading.Lock()
def hold():
    with lock:
        threading.Event().wait()
threading.Thread(target=hold, name="holder", daemon=True).start()
for _ in range(int(sys.argv[1])):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
"""


def real_run(workdir: str, forks: int) -> tuple[float, float, int]:
    """``forksafe run --policy log`` of a program forking ``forks`` times with a thread
    holding a lock: the watcher's peak resident memory (MB), seconds, report entries."""
    import json
    import subprocess

    app = os.path.join(workdir, "app.py")
    with open(app, "w") as f:
        f.write(REAL_APP)
    report = os.path.join(workdir, "report.json")
    # Peak memory through wait4, asked by a fresh interpreter in between: on Linux a child
    # inherits its parent's peak at exec, and this process has been busy (see measure).
    # It is the watcher's peak or COMMAND's (waited for by it), whichever is higher.
    between = ("import os, subprocess, sys\np = subprocess.Popen(sys.argv[1:], "
               "stderr=subprocess.DEVNULL)\nprint(os.wait4(p.pid, 0)[2].ru_maxrss)\n")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", between, sys.executable, "-m", "forksafe",
                          "run", "--policy", "log", "--report", report, "--",
                          sys.executable, app, str(forks)],
                         capture_output=True, text=True, check=True).stdout
    elapsed = time.perf_counter() - start
    with open(report) as f:
        entries = len(json.load(f)["forks"])
    return int(out) / 1024, elapsed, entries


def main() -> int:
    forks = int(sys.argv[1]) if len(sys.argv) > 1 else FORKS
    with tempfile.TemporaryDirectory() as workdir:
        path = os.path.join(workdir, "events.jsonl")
        size = write_events(path, forks)
        got = measure(path)
        rss, seconds, entries = real_run(workdir, REAL_FORKS)
    print(f"{forks:,} forks ({size / 1e6:.0f} MB of event lines) through EventTail and Merger, "
          f"then the summary")
    print(f"  peak traced memory {got['peak_mb']:.1f} MB (target <= 50 MB: "
          f"{'ok' if got['peak_mb'] <= 50 else 'MISSED'}); held after merging "
          f"{got['merged_mb']:.2f} MB")
    print(f"  report entries kept {got['entries']:,} for {got['forks']:,.0f} forks; "
          f"{got['seconds']:.1f} s (under tracemalloc)")
    print(f"a real forksafe run of {REAL_FORKS:,} forks: peak resident memory {rss:.0f} MB "
          f"(the watcher or COMMAND), {entries} report entries, {seconds:.1f} s")
    return 0 if got["peak_mb"] <= 50 and got["forks"] == forks else 1


if __name__ == "__main__":
    sys.exit(main())
