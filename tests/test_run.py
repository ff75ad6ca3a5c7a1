"""`forksafe run`: the whole tree guarded, one report, COMMAND's exit code, nothing left behind.

Every test runs the real command line in a child process with a hard timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from typing import Any, Iterator

import pytest

from forksafe._render.outcomes import CLEAN_FORK
from forksafe._render.runs import OMITTED
from forksafe._run import CANNOT_RUN, NO_COMMAND, exit_code
from forksafe._runreport import (
    MAX_FORKS,
    REPORT_UNWRITABLE,
    EventTail,
    Merger,
    merge,
    render_run,
)


def run(tmp_path: pathlib.Path, script: str, *options: str, timeout: float = 60,
        command: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "app.py").write_text(script)
    argv = command or [sys.executable, "app.py"]
    return subprocess.run([sys.executable, "-m", "forksafe", "run", *options, "--", *argv],
                          cwd=tmp_path, capture_output=True, text=True, timeout=timeout,
                          start_new_session=True)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        return False


# -- exit codes and signals ---------------------------------------------------------------


def test_exit_code_is_the_commands_own(tmp_path: pathlib.Path) -> None:
    """COMMAND's exit status comes back unchanged, and its stdout is untouched."""
    proc = run(tmp_path, "print('hello from app'); raise SystemExit(3)\n")
    assert proc.returncode == 3
    assert proc.stdout == "hello from app\n", "the summary goes to stderr, not stdout"
    assert "0 forks seen" in proc.stderr


def test_death_by_signal_follows_the_shell_convention(tmp_path: pathlib.Path) -> None:
    """A COMMAND killed by signal N makes forksafe run exit 128+N."""
    proc = run(tmp_path, "import os, signal\nos.kill(os.getpid(), signal.SIGUSR1)\n")
    assert proc.returncode == 128 + signal.SIGUSR1
    assert exit_code(signal.SIGKILL) == 137 and exit_code(5 << 8) == 5


@pytest.mark.parametrize(("sig", "expected"), [(signal.SIGTERM, 7), (signal.SIGINT, 130)])
def test_signals_are_passed_to_the_command(tmp_path: pathlib.Path, sig: int,
                                           expected: int) -> None:
    """SIGTERM and Ctrl-C sent to forksafe run reach COMMAND, whose own exit code results."""
    (tmp_path / "app.py").write_text(
        "import signal, sys, time, pathlib\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(7))\n"
        "pathlib.Path('ready').write_text('1')\n"
        "time.sleep(30)\n")
    proc = subprocess.Popen([sys.executable, "-m", "forksafe", "run", "--", sys.executable,
                             "app.py"], cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "ready").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == expected, err


def test_no_process_is_left_behind(tmp_path: pathlib.Path) -> None:
    """A forked child and a daemon in its own session are both gone when run returns."""
    proc = run(tmp_path, """
import os, subprocess, time
daemon = subprocess.Popen(["sleep", "60"], start_new_session=True)
pid = os.fork()
if pid == 0:
    time.sleep(60)
    os._exit(0)
print(daemon.pid, pid)
""")
    assert proc.returncode == 0, proc.stderr
    pids = [int(p) for p in proc.stdout.split()]
    assert len(pids) == 2
    time.sleep(0.1)
    assert not any(alive(p) for p in pids), "forksafe run ended what COMMAND left running"


KILLED = """
import json, os, subprocess, sys, time
daemon = subprocess.Popen(["sleep", "60"], start_new_session=True)  # leaves the group
pid = os.fork()
if pid == 0:
    time.sleep(60)
    os._exit(0)
ready = {"command": os.getpid(), "daemon": daemon.pid, "child": pid,
         "state": os.environ["FORKSAFE_STATE_DIR"],
         "events": os.path.dirname(os.environ["FORKSAFE_REPORT"])}
with open("ready.tmp", "w") as f:
    json.dump(ready, f)
os.rename("ready.tmp", "ready.json")
time.sleep(60)
"""


def _children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found += [int(p) for p in f.read().split()]
    return found


def test_sigkill_of_forksafe_run_leaves_nothing_behind(tmp_path: pathlib.Path) -> None:
    """SIGKILL forksafe run while COMMAND, its forked child and a grandchild in a session of
    its own run: its watchdog ends all three and removes both temporary directories, then
    exits itself, within a few seconds."""
    (tmp_path / "app.py").write_text(KILLED)
    run_proc = subprocess.Popen([sys.executable, "-m", "forksafe", "run", "--", sys.executable,
                                 "app.py"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "ready.json").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        ready = json.loads((tmp_path / "ready.json").read_text())
        [watchdog] = [p for p in _children(run_proc.pid)
                      if pathlib.Path(f"/proc/{p}/comm").read_text().strip() == "forksafe-watch"]
        pids = [ready["command"], ready["child"], ready["daemon"], watchdog]
        assert all(alive(p) for p in pids)
        assert os.path.isdir(ready["state"]) and os.path.isdir(ready["events"])
        run_proc.kill()
        run_proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (
                any(alive(p) for p in pids) or os.path.exists(ready["state"])
                or os.path.exists(ready["events"])):
            time.sleep(0.05)
        assert [p for p in pids if alive(p)] == [], "every process of the tree is gone"
        assert not os.path.exists(ready["state"]) and not os.path.exists(ready["events"])
    finally:
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if run_proc.poll() is None:
            run_proc.kill()
            run_proc.wait()


# -- the report --------------------------------------------------------------------------


CRASH = """
import ctypes, os, threading, time
lock = threading.Lock()
def hold():
    with lock:
        time.sleep(30)
threading.Thread(target=hold, name="holder", daemon=True).start()
time.sleep(0.1)
for i in range(3):
    pid = os.fork()  # fork-line
    if pid == 0:
        if i == 1:
            ctypes.string_at(0)
        os._exit(0)
    os.waitpid(pid, 0)
"""


def test_report_merges_outcomes_into_forks(tmp_path: pathlib.Path) -> None:
    """The report has the documented keys, one fork per child, each child's outcome merged in."""
    proc = run(tmp_path, CRASH, "--policy", "log", "--report", "r.json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["schema"] == "forksafe-report/1"
    assert report["command"] == [sys.executable, "app.py"]
    assert report["exit_code"] == 0
    forks = report["forks"]
    assert sum(f.get("count", 1) for f in forks) == 3
    for fork in forks:
        assert {"parent_pid", "child_pid", "time", "mechanism", "site", "action", "hazards",
                "outcome"} <= set(fork)
        assert fork["site"]["file"].endswith("app.py") and fork["site"]["line"] == 10
    statuses = sorted((f["outcome"]["status"], f["outcome"]["signal"], f.get("count"))
                      for f in forks)
    assert statuses == [("exited", None, 2), ("signaled", "SIGSEGV", None)], \
        "the two children that exited 0 are one entry that counts them; the crash is kept"
    assert "forksafe: report written to r.json" in proc.stderr


def test_summary_groups_identical_forks_and_fates(tmp_path: pathlib.Path) -> None:
    """Three identical forks are one finding x3; the crashed child is shown with its diagnosis."""
    proc = run(tmp_path, CRASH, "--policy", "log")
    err = proc.stderr
    assert "forksafe: 3 forks seen in" in err and "1 child crashed" in err
    assert err.count("fork via os.fork at app.py:10 in <module> x3: logged") == 1
    assert "children: 2 exited 0, 1 killed by SIGSEGV" in err
    assert "killed by SIGSEGV in" in err and "'holder'" in err


POOL = """
import os, subprocess, sys, threading, time
if len(sys.argv) == 1:
    procs = [subprocess.Popen([sys.executable, __file__, "worker"]) for _ in range(4)]
    sys.exit(max(p.wait() for p in procs))
stop = threading.Event()
threading.Thread(target=stop.wait, name="idler", daemon=True).start()
children = []
for _ in range(250):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    children.append(pid)
for pid in children:
    os.waitpid(pid, 0)
"""


def test_many_concurrent_writers_lose_nothing(tmp_path: pathlib.Path) -> None:
    """Four processes forking 250 children each: 1,000 intact forks, outcomes, one finding."""
    proc = run(tmp_path, POOL, "--policy", "log", "--report", "r.json", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    forks = json.loads((tmp_path / "r.json").read_text())["forks"]
    assert sum(f.get("count", 1) for f in forks) == 1000
    assert len({f["parent_pid"] for f in forks}) == 4, "grandchildren are guarded too"
    assert len(forks) == 4, "each worker's 250 identical forks are one entry with a count"
    assert all(f["outcome"]["status"] == "exited" for f in forks)
    assert "x1000: logged" in proc.stderr, proc.stderr[-2000:]
    assert "children: 1000 exited 0" in proc.stderr


def test_event_tail_skips_a_torn_last_line_and_garbage(tmp_path: pathlib.Path) -> None:
    """A writer that died mid-line loses only that line; a foreign line is skipped too."""
    path = tmp_path / "events.jsonl"
    path.write_text('{"type": "fork", "child_pid": 1}\nnot json\n{"type": "fork", "chi')
    tail = EventTail(str(path))
    assert [r["child_pid"] for r in tail.read()] == [1]
    with open(path, "a") as f:
        f.write('ld_pid": 2}\n{"type": "fork", "child_pid": 3')  # completes; a new one tears
    records = tail.read(final=True)
    assert [r["child_pid"] for r in records] == [2]
    assert tail.skipped == 2


def test_merge_prefers_hung_and_uses_a_childs_own_record_only_as_a_fallback() -> None:
    """'hung' is not overwritten by the SIGKILL that ended it; fork-pending fills gaps only."""
    fork = {"type": "fork", "parent_pid": 1, "child_pid": 2, "mechanism": "os.fork"}
    pending = {"type": "fork-pending", "parent_pid": 1, "child_pid": 2, "mechanism": "x"}
    lone = {"type": "fork-pending", "parent_pid": 1, "child_pid": 3, "mechanism": "preexec"}
    hung = {"type": "outcome", "parent_pid": 1, "child_pid": 2, "outcome": {"status": "hung"}}
    killed = {"type": "outcome", "parent_pid": 1, "child_pid": 2,
              "outcome": {"status": "signaled", "signal": "SIGKILL"}}
    report = merge(["x"], 0, [pending, fork, lone, hung, killed])
    assert [(f["child_pid"], f["mechanism"]) for f in report["forks"]] == [(2, "os.fork"),
                                                                          (3, "preexec")]
    assert report["forks"][0]["outcome"]["status"] == "hung"
    assert report["forks"][1]["outcome"]["status"] == "unknown", "never reaped where we saw it"


def fork(parent: int, child: int, **extra: object) -> dict[str, object]:
    return {"type": "fork", "parent_pid": parent, "child_pid": child, "mechanism": "os.fork",
            "site": None, "action": "logged", "hazards": [], "time": 0, **extra}


def outcome(parent: int, child: int, **fields: object) -> dict[str, object]:
    return {"type": "outcome", "parent_pid": parent, "child_pid": child, "outcome": fields}


def test_a_long_run_keeps_bounded_memory_and_every_crash() -> None:
    """Past the limit, children that exited (non-zero here: those are not folded into a
    count) are dropped (counted); crashes are all kept."""
    merger = Merger(limit=10)
    for child in range(1000, 1100):
        merger.add(fork(1, child))
        if child == 1042:
            merger.add(outcome(1, child, status="signaled", signal="SIGSEGV", diagnosis="x"))
        else:
            merger.add(outcome(1, child, status="exited", exit_code=1))
    report = merger.report(["app"], 0)
    assert len(report["forks"]) <= 10
    assert report["forks_omitted"] == 100 - len(report["forks"])
    assert 1042 in [f["child_pid"] for f in report["forks"]]
    assert OMITTED.format(count=report["forks_omitted"]) in render_run(report)
    assert MAX_FORKS >= 10_000, "a normal run keeps every fork"


def test_children_without_an_outcome_are_dropped_only_long_after_they_are_gone() -> None:
    """A fork whose child nobody reaped through the guard is kept while its child may live."""
    now = [0.0]
    merger = Merger(limit=2, clock=lambda: now[0])
    gone = 2**22 + 77  # never a live pid
    merger.add(fork(1, gone))
    merger.add(fork(1, os.getpid()))  # alive: this very process
    merger.add(fork(1, gone + 1))
    assert merger.omitted == 0, "too recent to be given up on"
    now[0] = 1000.0
    merger.add(fork(1, gone + 2))
    merger.add(fork(1, gone + 3))  # the next scan waits for some growth, not every fork
    assert merger.omitted == 2
    kept = [f["child_pid"] for f in merger.report(["app"], 0)["forks"]]
    assert kept == [os.getpid(), gone + 2, gone + 3]


def test_a_reused_pid_is_a_new_fork() -> None:
    """The same parent getting the same child pid again makes two entries; outcomes go to
    the one that is current."""
    report = merge(["app"], 0, [fork(1, 5), outcome(1, 5, status="exited", exit_code=0),
                                fork(1, 5), outcome(1, 5, status="signaled", signal="SIGILL")])
    assert [f["outcome"]["status"] for f in report["forks"]] == ["exited", "signaled"]


def test_the_watcher_keeps_bounded_memory_over_100k_forks() -> None:
    """100,000 forks and their outcomes (children reaped 32 forks later, every 1,000th
    crashing), as EventTail hands them on, through Merger under tracemalloc: identical
    uneventful forks fold into one entry with a count, so the watcher stays far under
    50 MB (it kept every event, ~3.4 KB each with its hazards: ~340 MB)."""
    import tracemalloc

    hazard = {"kind": "thread", "severity": "warning",
              "summary": "thread 'refresher' (started at app.py:41) holds `lock`",
              "remedy": "join it", "evidence": {"name": "refresher", "state": "idle"}}

    def records(forks: int = 100_000, in_flight: int = 32) -> Iterator[dict[str, Any]]:
        for number in range(forks + in_flight):
            if number < forks:  # fresh objects, as json.loads makes them for each line
                yield {"type": "fork", "parent_pid": 7, "child_pid": 10_000 + number,
                       "time": "2026-11-25T10:00:00Z", "mechanism": "os.fork",
                       "site": {"file": "app.py", "line": 66, "function": "serve"},
                       "action": "logged", "hazards": [dict(hazard)], "command": ["app.py"]}
            if number >= in_flight:
                child = 10_000 + number - in_flight
                fate = {"status": "exited", "exit_code": 0} if child % 1000 else {
                    "status": "signaled", "signal": "SIGSEGV", "diagnosis": f"child {child}"}
                yield {"type": "outcome", "parent_pid": 7, "child_pid": child, "outcome": fate}

    tracemalloc.start()
    try:
        merger = Merger()
        for record in records():
            merger.add(record)
        report = merger.report(["app.py"], 0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    forks = report["forks"]
    assert peak < 50e6, f"{peak / 1e6:.1f} MB"
    assert sum(f.get("count", 1) for f in forks) == 100_000 and "forks_omitted" not in report
    assert len(forks) == 101, "one entry counts the 99,900 alike; the 100 crashes are kept"
    assert forks[1]["count"] == 99_900 and forks[1]["child_pid"] == 10_001
    text = render_run(report)
    assert text.startswith("forksafe: 100000 forks seen in `app.py` (exit code 0): "
                           "100 children crashed")
    assert "children: 100 killed by SIGSEGV, 99900 exited 0" in text


def test_the_event_tail_reads_a_backlog_a_burst_at_a_time(tmp_path: pathlib.Path) -> None:
    """A poll reads at most BURST bytes (the rest at the next one); the final read, all."""
    class Small(EventTail):
        CHUNK, BURST = 100, 300

    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(fork(1, child)) + "\n" for child in range(40)))
    tail = Small(str(path))
    first = [r["child_pid"] for r in tail.read()]
    assert 0 < len(first) < 40 and first == list(range(len(first)))
    rest = [r["child_pid"] for r in tail.read(final=True)]
    assert first + rest == list(range(40)) and tail.skipped == 0


def test_a_refused_or_crashed_fork_is_never_folded() -> None:
    """Safe twin of the folding: evidence stays one entry per fork; alike clean ones fold."""
    records = [fork(1, 2), outcome(1, 2, status="exited", exit_code=0),
               fork(1, 3), outcome(1, 3, status="exited", exit_code=0),
               fork(1, 4), outcome(1, 4, status="signaled", signal="SIGSEGV"),
               fork(1, 5), outcome(1, 5, status="signaled", signal="SIGSEGV"),
               fork(1, 6), outcome(1, 6, status="exited", exit_code=3),
               fork(1, None, action="refused"), fork(1, None, action="refused"),
               fork(1, 7, hazards=[{"kind": "thread", "severity": "warning",
                                    "summary": "t", "remedy": "r", "evidence": {}}]),
               outcome(1, 7, status="exited", exit_code=0), fork(1, 8)]
    forks = merge(["app"], 0, records)["forks"]
    assert [(f["child_pid"], f.get("count")) for f in forks] == [
        (2, 2), (4, None), (5, None), (6, None), (None, None), (None, None), (7, None),
        (8, None)]
    assert forks[-1]["outcome"]["status"] == "unknown", "still running: kept as it is"


def test_counting_alike_events_leaves_the_summary_as_it_was() -> None:
    """Runs (each kind of fork once, with a count) renders the very text the events one by
    one do, in whatever order they came: it must stay at least as fine as the summary's
    own grouping."""
    import random

    from forksafe._render.runs import render_events
    from forksafe._report import ForkEvent
    from forksafe._runreport import Runs

    rng = random.Random(14)
    events = []
    for i in range(400):
        hazards = [] if rng.random() < 0.3 else [
            {"kind": "thread", "severity": rng.choice(["warning", "error"]),
             "summary": f"thread 'Thread-{rng.randint(1, 3)}' holds `lock` at app.py:{i % 2}",
             "remedy": "join it", "evidence": {"name": f"Thread-{i}"}}]
        outcome = rng.choice([
            None, {"status": "exited", "exit_code": rng.choice([0, 1])},
            {"status": "signaled", "signal": rng.choice(["SIGSEGV", "SIGTERM"]),
             "diagnosis": rng.choice([None, f"child {i} died. fix: join it"]),
             "traceback": f"trace {i}"},
            {"status": "hung", "diagnosis": f"child {i} hung"}, {"status": "unknown"}])
        events.append(ForkEvent.from_dict({
            "parent_pid": rng.randint(1, 3), "child_pid": 100 + i, "time": i,
            "mechanism": rng.choice(["os.fork", "multiprocessing"]),
            "site": {"file": "app.py", "line": rng.randint(1, 2), "function": "main"},
            "action": rng.choice(["logged", "warned"]), "thread": "MainThread",
            "hazards": hazards, **({"outcome": outcome} if outcome else {})}))
    runs = Runs()
    for event in events:
        runs.add(event)
    assert runs.distinct < len(events) == len(runs)
    assert render_events(["app"], 0, runs) == render_events(["app"], 0, events)
    assert list(runs)[7] is runs[7] and runs[-1] is list(runs)[-1]


# -- usage errors -------------------------------------------------------------------------


def test_usage_errors_are_one_line_exit_2(tmp_path: pathlib.Path) -> None:
    """No command, a missing program, an unwritable report: one line each, exit 2."""
    def forksafe(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "forksafe", "run", *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)

    none = forksafe("--")
    assert (none.returncode, none.stderr.strip()) == (2, NO_COMMAND)
    missing = forksafe("--", "no-such-program-forksafe")
    assert missing.returncode == 2
    assert missing.stderr.strip().startswith(
        CANNOT_RUN.format(command="no-such-program-forksafe", error="").rstrip(": "))
    assert len(missing.stderr.strip().splitlines()) == 1
    bad = forksafe("--report", str(tmp_path / "nope" / "r.json"), "--", "touch", "ran")
    assert bad.returncode == 2
    assert bad.stderr.startswith(REPORT_UNWRITABLE.split("{")[0])
    assert not (tmp_path / "ran").exists(), "the command does not run when its report cannot"


def test_crash_of_a_child_nobody_reaped_is_still_reported(tmp_path: pathlib.Path) -> None:
    """A child left to die unreaped by its parent: its crash file becomes its outcome."""
    proc = run(tmp_path, """
import ctypes, os, time
pid = os.fork()
if pid == 0:
    ctypes.string_at(0)  # crash-line
time.sleep(0.5)  # the parent exits without waiting for it
""", "--policy", "log", "--report", "r.json")
    assert proc.returncode == 0, proc.stderr
    [fork] = json.loads((tmp_path / "r.json").read_text())["forks"]
    assert fork["outcome"]["status"] == "signaled"
    assert fork["outcome"]["signal"] == "SIGSEGV"
    assert "app.py\", line 5" in fork["outcome"]["traceback"]
    assert CLEAN_FORK in fork["outcome"]["diagnosis"], "nothing was wrong at that fork"


def test_spawn_children_are_guarded_too(tmp_path: pathlib.Path) -> None:
    """A 'spawn' child (a fresh interpreter) forks and its child crashes: in the report."""
    proc = run(tmp_path, """
import ctypes, multiprocessing, os
def work():
    pid = os.fork()
    if pid == 0:
        ctypes.string_at(0)
    os.waitpid(pid, 0)
if __name__ == "__main__":
    p = multiprocessing.get_context("spawn").Process(target=work)
    p.start()
    p.join()
    print(p.pid)
""", "--policy", "log", "--report", "r.json")
    assert proc.returncode == 0, proc.stderr
    spawned = int(proc.stdout.split()[-1])
    forks = json.loads((tmp_path / "r.json").read_text())["forks"]
    [crash] = [f for f in forks if f["parent_pid"] == spawned]
    assert crash["outcome"]["signal"] == "SIGSEGV"


def test_forkserver_children_are_guarded_too(tmp_path: pathlib.Path) -> None:
    """The forkserver process is guarded: the worker it forks crashes, and the report says so."""
    proc = run(tmp_path, """
import ctypes, multiprocessing, os
def work():
    print(os.getpid(), os.getppid(), flush=True)
    ctypes.string_at(0)
if __name__ == "__main__":
    p = multiprocessing.get_context("forkserver").Process(target=work)
    p.start()
    p.join()
    print(p.exitcode)
""", "--policy", "log", "--report", "r.json")
    assert proc.returncode == 0, proc.stderr
    worker, server, exitcode = (int(x) for x in proc.stdout.split())
    assert exitcode == -signal.SIGSEGV
    forks = json.loads((tmp_path / "r.json").read_text())["forks"]
    [fork] = [f for f in forks if f["child_pid"] == worker]
    assert fork["parent_pid"] == server, "forked by the forkserver, a process of the tree"
    assert fork["outcome"]["signal"] == "SIGSEGV", fork["outcome"]
    assert 'app.py", line 5 in work' in fork["outcome"]["traceback"]
