"""Threads told apart by token, and a fork storm's reports kept by them.

``forksafe._speedups.thread_tokens`` gives each Python thread but the caller a
token: the same object while the thread stands where it stood (its object, name,
daemon flag, OS id and stack outside forksafe), a new one as soon as any of those
changes, and the old one again when the thread comes back. The thread probe keeps
hazards by token, and a fork storm's check keeps whole reports by the tokens of
every thread (``forksafe._check._storm``). Each scenario runs in its own
interpreter with real threads parked at real lines; each stale answer it could
serve is checked against a fresh check, and each reuse it claims is asserted, so
that the test can fail both ways.
"""

from __future__ import annotations

import pathlib

import pytest

from conftest import run_scenario

READER = """
import os, sys, threading, time, _thread
from forksafe import _snapshot
from forksafe._speedups import thread_tokens
def tokens():
    return _snapshot.read_tokens()
def park(event, reached):
    reached.set()
    event.wait()  # parked-here
"""


def test_a_token_stays_while_its_thread_stands_and_changes_when_it_moves(
        tmp_path: pathlib.Path) -> None:
    s = run_scenario(READER + """
go, reached, done = threading.Event(), threading.Event(), threading.Event()
second = threading.Event()
def worker():
    park(go, reached)
    second.set()
    done.wait()  # second-place
t = threading.Thread(target=worker, name="w")
t.start(); reached.wait(); time.sleep(0.05)
first, again = tokens(), tokens()
go.set(); second.wait(); time.sleep(0.05)
moved = tokens()
t.name = "renamed"
renamed = tokens()
t.name = "w"
back = tokens()
t.daemon  # a read changes nothing
same_again = tokens()
done.set(); t.join()
own = _snapshot.OWN  # forksafe's frames are passed over by this prefix
emit(own=os.path.exists(own + "_snapshot.py"), n=len(first), same=first[0] is again[0],
     moved=moved[0] is not first[0], renamed=renamed[0] is not moved[0], back=back[0] is moved[0],
     still=same_again[0] is back[0], after=tokens())
""", tmp_path)
    r = s.result
    assert r["own"], "the prefix of forksafe's own files"
    assert r["n"] == 1
    assert r["same"], "a thread standing still keeps its token"
    assert r["moved"], "a thread that moved gets another token"
    assert r["renamed"], "a renamed thread gets another token"
    assert r["back"], "a thread back where it stood gets its old token back"
    assert r["still"]
    assert r["after"] == []


def test_no_tokens_for_a_dummy_thread_or_one_threading_does_not_list(
        tmp_path: pathlib.Path) -> None:
    s = run_scenario(READER + """
stop = threading.Event()
started = threading.Event()
def raw():
    started.set()
    stop.wait()
_thread.start_new_thread(raw, ())
started.wait(); time.sleep(0.05)
with_raw = tokens()
stop.set(); time.sleep(0.2)
without = tokens()
# A dummy thread: a thread threading did not start, asking for current_thread().
stop2, seen = threading.Event(), threading.Event()
def dummy():
    threading.current_thread()
    seen.set()
    stop2.wait()
_thread.start_new_thread(dummy, ())
seen.wait(); time.sleep(0.05)
with_dummy = tokens()
stop2.set()
deep = threading.Event()
def recurse(n):
    if n:
        return recurse(n - 1)
    deep.wait()
t = threading.Thread(target=recurse, args=(200,)); t.start(); time.sleep(0.1)
too_deep = _snapshot.read_tokens()
deep.set(); t.join()
emit(with_raw=with_raw is None, without=without, with_dummy=with_dummy is None,
     too_deep=too_deep is None)
""", tmp_path)
    r = s.result
    assert r["with_raw"], "a thread started with _thread is the probe's to look at"
    assert r["without"] == []
    assert r["with_dummy"], "a dummy thread is the probe's to look at"
    assert r["too_deep"], "a stack deeper than the limit has no token"


STORM = """
import json, os, sys, threading, time
from forksafe import _check, _snapshot
_check.C_STACKS = _snapshot.C_TOKENS = os.environ["FORKSAFE_TEST_STACKS"] == "c"
def storm_check():
    _check._misses = _check.MISSES + 1  # a storm: no whole-process key is read
    return _check.fork_check(watch=True)
looks = {}
def look(label):
    fresh = _check.check_with(reuse=False)
    first, second = storm_check(), storm_check()
    looks[label] = {
        "summaries": sorted(h.summary for h in fresh.hazards),
        "equal": first.hazards == fresh.hazards and second.hazards == fresh.hazards,
        "reused": second is first,
    }
def park(event, reached):
    reached.set()
    event.wait()
"""


@pytest.mark.parametrize("reader", ["c", "python"])
def test_a_storms_reports_are_kept_by_tokens_and_never_served_stale(
        tmp_path: pathlib.Path, reader: str) -> None:
    """The storm path's report equals a fresh check's as threads move, are renamed,
    hold a lock and come back; it is reused only with the C reader, and not while a
    thread holds a lock in a ``with`` block (whose state no token sees)."""
    s = run_scenario(STORM + """
go, reached, done = threading.Event(), threading.Event(), threading.Event()
lock = threading.Lock()
release, out = threading.Event(), threading.Event()
def worker():
    park(go, reached)
    with lock:
        release.wait()
    out.set()
    done.wait()
t = threading.Thread(target=worker, name="w")
t.start(); reached.wait(); time.sleep(0.05)
look("parked")
go.set()
while not lock.locked():
    time.sleep(0.01)
time.sleep(0.05)
look("holding")
release.set(); out.wait(); time.sleep(0.05)
look("released")
t.name = "renamed"
look("renamed")
done.set(); t.join()
look("alone")
emit(looks=looks)
""", tmp_path, env={"FORKSAFE_TEST_STACKS": reader})
    looks = s.result["looks"]
    for label, seen in looks.items():
        assert seen["equal"], (label, seen)
    assert "holds `lock`" in looks["holding"]["summaries"][0]
    assert "holds" not in looks["released"]["summaries"][0]
    assert "renamed" in looks["renamed"]["summaries"][0]
    assert looks["alone"]["summaries"] == []
    assert not looks["holding"]["reused"], "a lock's state is not in any token"
    if reader == "c":
        assert looks["parked"]["reused"] and looks["released"]["reused"]
        assert looks["renamed"]["reused"]


def test_a_new_combination_of_known_places_is_composed_not_probed(
        tmp_path: pathlib.Path) -> None:
    """Two threads each met at two places, in two combinations: the other two
    combinations are made of the parts already known (no probe runs), and each
    equals a fresh check."""
    s = run_scenario(STORM + """
import queue
runs = []
real = _check._run_probes
def counted(*args, **kwargs):
    runs.append(1)
    return real(*args, **kwargs)
_check._run_probes = counted
orders = {n: queue.Queue() for n in "ab"}
here = {n: threading.Event() for n in "ab"}
go = {n: threading.Event() for n in "ab"}
def worker(name):
    while True:
        place = orders[name].get()
        if place is None:
            return
        if place == "x":
            here[name].set(); go[name].wait()  # place-x
        else:
            here[name].set(); go[name].wait()  # place-y
        go[name].clear()
threads = [threading.Thread(target=worker, args=(n,), name=n) for n in "ab"]
for t in threads: t.start()
def put(name, place, first=False):
    here[name].clear()
    orders[name].put(place)
    if not first:
        go[name].set()
    here[name].wait(); time.sleep(0.05)
def storm_look(label):
    before = len(runs)
    got = storm_check()
    probed = len(runs) > before
    fresh = _check.check_with(reuse=False)
    looks[label] = {"equal": got.hazards == fresh.hazards, "probed": probed,
                    "summaries": sorted(h.summary for h in fresh.hazards)}
put("a", "x", True); put("b", "x", True)
storm_look("ax bx")
put("a", "y"); put("b", "y")
storm_look("ay by")
put("a", "x")
storm_look("ax by")
put("a", "y"); put("b", "x")
storm_look("ay bx")
for n in "ab":
    orders[n].put(None); go[n].set()
for t in threads: t.join()
emit(looks=looks)
""", tmp_path, env={"FORKSAFE_TEST_STACKS": "c"})
    looks = s.result["looks"]
    for label, seen in looks.items():
        assert seen["equal"], (label, seen)
    assert looks["ax bx"]["probed"] and looks["ay by"]["probed"]
    assert looks["ax by"]["summaries"] != looks["ay by"]["summaries"]
    assert not looks["ax by"]["probed"], "both places known: composed"
    assert not looks["ay bx"]["probed"], "both places known: composed"
