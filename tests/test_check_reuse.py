"""The check's reuse of an unchanged process's report never serves a stale one.

``forksafe._check`` keeps the last report with a fingerprint of the process and
hands it out again while the fingerprint is equal (the guard does this on every
fork). Each scenario below changes one thing a report depends on and asserts
that the reused answer equals a fresh check's, hazard for hazard — and, in the
unchanged states, that reuse really happened, so that the test can fail.
Every scenario runs in its own interpreter with real threads, real locks, real
native libraries and real SQLite connections, once with the threads and stacks read
in C (``forksafe._speedups.stacks`` and ``thread_tokens``, as the guard does) and once
in Python (the way without the extension).
"""

from __future__ import annotations

import pathlib

import pytest

from conftest import run_scenario


@pytest.fixture(autouse=True, params=["c", "python"])
def stacks_read_in(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which reader the scenario's check uses (LOOK reads this variable)."""
    monkeypatch.setenv("FORKSAFE_TEST_STACKS", request.param)
    return str(request.param)

#: Defines ``look(label)``: a fresh check against the reusing ones, recorded.
LOOK = """
import os, sys, threading, time
from forksafe import _check, _snapshot
_check.C_STACKS = _snapshot.C_TOKENS = os.environ["FORKSAFE_TEST_STACKS"] == "c"
assert _check.C_STACKS is (_check._stacks_reader() is not None), "the C reader is built"
looks = {}
def look(label):
    fresh = _check.check_with(reuse=False)
    public = _check.check()
    first = _check.fork_check(watch=True)  # as the guard calls it
    second = _check.fork_check(watch=True)
    looks[label] = {
        "summaries": sorted(h.summary for h in fresh.hazards),
        "kinds": sorted(h.kind for h in fresh.hazards),
        "public_equal": public.hazards == fresh.hazards and public.thread == fresh.thread,
        "fork_equal": first.hazards == fresh.hazards and second.hazards == fresh.hazards,
        "reused": second is first,
        "pid": second.pid,
    }
def settle(n=1):
    # A joined thread's OS thread may linger a moment after join() returns.
    deadline = time.monotonic() + 10
    while len(os.listdir("/proc/self/task")) > n and time.monotonic() < deadline:
        time.sleep(0.01)
def park_at(event, reached):
    reached.set()
    event.wait()
"""


def check_all_equal(looks: dict[str, dict[str, object]]) -> None:
    for label, seen in looks.items():
        assert seen["public_equal"], label
        assert seen["fork_equal"], label


def test_threads_starting_moving_renamed_and_ending_are_never_served_stale(
    tmp_path: pathlib.Path,
) -> None:
    """A thread that starts, moves to another line, is renamed or ends changes the reused report."""
    s = run_scenario(LOOK + """
look("clean")
go, reached, done = threading.Event(), threading.Event(), threading.Event()
def worker():
    park_at(go, reached)
    time.sleep(0.0)
    done.wait()
t = threading.Thread(target=worker, name="worker-a")
look("before start")
t.start(); reached.wait()
look("parked")
go.set()
while t.is_alive() and sys._current_frames()[t.ident].f_code.co_name != "wait":
    time.sleep(0.01)
time.sleep(0.05)
look("moved")
t.name = "renamed"
look("renamed")
done.set(); t.join(); settle()
look("ended")
os.chdir("/")
look("cwd changed")
emit(looks=looks)
""", tmp_path)
    looks = s.result["looks"]
    check_all_equal(looks)
    assert looks["clean"]["reused"] and looks["clean"]["kinds"] == []
    assert looks["parked"]["kinds"] == ["thread"] and looks["parked"]["reused"]
    assert looks["moved"]["summaries"] != looks["parked"]["summaries"]
    assert looks["moved"]["reused"]
    assert "renamed" in looks["renamed"]["summaries"][0]
    assert looks["ended"]["kinds"] == [] and looks["ended"]["reused"]


def test_ten_idle_threads_are_reused_and_an_eleventh_is_seen(tmp_path: pathlib.Path) -> None:
    """Idle threads keep the report reusable; one more thread invalidates it."""
    s = run_scenario(LOOK + """
stop = threading.Event()
threads = [threading.Thread(target=stop.wait, daemon=True) for _ in range(10)]
for t in threads: t.start()
time.sleep(0.1)
look("ten")
look("ten again")
more = threading.Thread(target=stop.wait, daemon=True); more.start(); time.sleep(0.05)
look("eleven")
stop.set()
for t in threads + [more]: t.join()
settle()
look("none")
emit(looks=looks)
""", tmp_path)
    looks = s.result["looks"]
    check_all_equal(looks)
    assert looks["ten"]["reused"] and looks["ten again"]["reused"]
    assert looks["ten"]["kinds"] == ["thread"] * 10
    assert looks["eleven"]["kinds"] == ["thread"] * 11
    assert looks["none"]["kinds"] == []


def test_a_lock_taken_or_released_while_its_thread_stands_still_is_seen(
    tmp_path: pathlib.Path,
) -> None:
    """Inside ``with sem:``, the semaphore's state changes the report; such a one is not reused."""
    s = run_scenario(LOOK + """
sem = threading.Semaphore(2)
inside, leave = threading.Event(), threading.Event()
def worker():
    with sem:
        inside.set()
        leave.wait()
t = threading.Thread(target=worker, name="holder"); t.start(); inside.wait(); time.sleep(0.05)
look("one of two taken")
sem.acquire()
look("both taken")
sem.release()
look("one again")
leave.set(); t.join()
emit(looks=looks)
""", tmp_path)
    looks = s.result["looks"]
    check_all_equal(looks)
    assert "holds" not in looks["one of two taken"]["summaries"][0]
    assert "holds `sem`" in looks["both taken"]["summaries"][0]
    assert "holds" not in looks["one again"]["summaries"][0]
    assert not looks["both taken"]["reused"], "a report with a lock in it is never reused"


def test_libraries_native_threads_and_a_forked_child_invalidate(
    tmp_path: pathlib.Path, native_dir: pathlib.Path
) -> None:
    """A library loaded, a native thread started, a runtime's pool started, and a new pid."""
    s = run_scenario(LOOK + f"""
import ctypes
look("clean")
omp = ctypes.CDLL({str(native_dir / "libomp_pool.so")!r})
look("libgomp loaded")
mutex = ctypes.CDLL({str(native_dir / "libnative_mutex.so")!r})
look("mutex library loaded")
mutex.native_mutex_hold.argtypes = [ctypes.c_double]
mutex.native_mutex_hold(30.0)
mutex.native_mutex_wait_held.argtypes = [ctypes.c_double]
mutex.native_mutex_wait_held(10.0)
look("native thread")
omp.omp_pool_run(100000)
look("pool started")
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    look("child")
    os.write(w, repr(looks["child"]).encode()); os._exit(0)
os.close(w)
child = eval(os.read(r, 100000).decode())
os.waitpid(pid, 0)
looks["child"] = child
emit(looks=looks, parent=os.getpid(), child=pid)
""", tmp_path)
    looks = s.result["looks"]
    check_all_equal(looks)
    assert looks["clean"]["reused"]
    assert "native-runtime" in looks["libgomp loaded"]["kinds"]
    assert looks["libgomp loaded"]["reused"], "a loaded, idle runtime is a stable fact"
    assert looks["native thread"]["kinds"].count("native-thread") == 1
    assert not looks["native thread"]["reused"], "native threads are always looked at"
    pool = [k for k in looks["pool started"]["summaries"] if "OpenMP" in k and "is active" in k]
    assert pool, looks["pool started"]["summaries"]
    assert looks["child"]["pid"] == s.result["child"] != s.result["parent"]


def test_sqlite_connections_and_a_running_event_loop_are_always_looked_at(
    tmp_path: pathlib.Path,
) -> None:
    """An opened or closed connection, and a loop running in the caller, change the report."""
    s = run_scenario(LOOK + """
import asyncio
look("asyncio imported")
async def inside():
    look("in a running loop")
asyncio.run(inside())
look("loop done")
import sqlite3
look("sqlite3 imported")
db = sqlite3.connect(":memory:")
look("connection open")
db.close()
look("connection closed")
emit(looks=looks)
""", tmp_path)
    looks = s.result["looks"]
    check_all_equal(looks)
    assert looks["asyncio imported"]["reused"]
    assert looks["in a running loop"]["kinds"] == ["event-loop"]
    assert looks["loop done"]["kinds"] == [] and looks["loop done"]["reused"]
    assert looks["connection open"]["kinds"] == ["sqlite-connection"]
    assert looks["connection closed"]["kinds"] == []
    assert not looks["sqlite3 imported"]["reused"]


def test_a_thread_threading_does_not_know_is_always_looked_at(tmp_path: pathlib.Path) -> None:
    """A ``_thread.start_new_thread`` thread (in no ``threading`` table) is never reused away."""
    s = run_scenario(LOOK + """
import _thread
look("clean")
gate, started = _thread.allocate_lock(), _thread.allocate_lock()
gate.acquire(); started.acquire()
def raw():
    started.release()
    gate.acquire()
_thread.start_new_thread(raw, ())
started.acquire()
time.sleep(0.05)
look("raw thread")
look("raw thread again")
gate.release()
emit(looks=looks)
""", tmp_path)
    looks = s.result["looks"]
    check_all_equal(looks)
    assert looks["clean"]["reused"]
    assert looks["raw thread"]["kinds"], "the unknown thread is reported"
    assert not looks["raw thread"]["reused"] and not looks["raw thread again"]["reused"]


def test_the_images_version_is_read_again_only_when_the_address_space_changed(
    tmp_path: pathlib.Path,
) -> None:
    """The guard's fingerprint skips its ctypes call while the address-space size is the
    same; mapping memory (as loading a library does) makes it read the version again."""
    s = run_scenario("""
import json, mmap, sys
from forksafe import _check
from forksafe._platform import current
platform = current()
real = platform.images_version_reader()
calls = []
def counting():
    calls.append(1)
    return real()
_check._reader = (platform, counting)
def fingerprint():
    return _check._fingerprint(platform, sys._current_frames, True)
first, second = fingerprint(), fingerprint()
unchanged = len(calls)
block = mmap.mmap(-1, 64 << 20)
third = fingerprint()
mapped = len(calls)
fourth = fingerprint()
unwatched = _check._fingerprint(platform, sys._current_frames)
_check.close_files()
print("FORKSAFE-RESULT:" + json.dumps({"unchanged": unchanged, "mapped": mapped,
      "after": len(calls), "same": first == second == third == fourth == unwatched,
      "closed": _check._vm[1]}))
""", tmp_path)
    assert s.result["unchanged"] == 1, "one read, then the size vouched for it"
    assert s.result["mapped"] == 2, "a new mapping: read again"
    assert s.result["after"] == 3, "without watching, always read"
    assert s.result["same"] and s.result["closed"] == -1


def test_a_report_is_kept_only_if_nothing_moved_while_the_probes_looked(
        tmp_path: pathlib.Path) -> None:
    """The fingerprint is computed once per check: what tells that the stacks it saw
    still hold after the probes (``_unmoved``) must see a thread that moved to another
    line, one that started, and one that ended."""
    s = run_scenario(LOOK + """
from forksafe._platform import current
def key_now():
    seen = []
    key = _check._fingerprint(current(), sys._current_frames, True, seen)
    if not seen:  # read in C: the probes take their own table, as fork_check's do
        seen.append(sys._current_frames())
        seen[0].pop(threading.get_ident())
    return key, _check._tops(seen[0])
go, reached, done = threading.Event(), threading.Event(), threading.Event()
def worker():
    park_at(go, reached)
    done.wait()
t = threading.Thread(target=worker, name="worker-a")
t.start(); reached.wait()
key, tops = key_now()
got = {"still": _check._unmoved(key, tops)}
go.set()
def names(ident):
    frame, found = sys._current_frames()[ident], []
    while frame is not None:
        found.append(frame.f_code.co_name)
        frame = frame.f_back
    return found
while "park_at" in names(t.ident) or names(t.ident)[0] != "wait":
    time.sleep(0.01)
time.sleep(0.05)
got["moved"] = _check._unmoved(key, tops)
key, tops = key_now()
other = threading.Thread(target=done.wait, name="worker-b")
other.start()
got["started"] = _check._unmoved(key, tops)
key, tops = key_now()
done.set(); other.join(); t.join(); settle()
got["ended"] = _check._unmoved(key, tops)
key, tops = key_now()
got["alone"] = _check._unmoved(key, tops)
emit(**got)
""", tmp_path)
    assert s.result["still"] and s.result["alone"]
    assert not s.result["moved"] and not s.result["started"] and not s.result["ended"]
