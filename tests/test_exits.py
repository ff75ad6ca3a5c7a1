"""Deaths a child brings on itself, and failing exits, linked to the fork when they
involve it — and said plainly when they do not.

Real reproductions: a native library (a C fixture) that finds itself in a forked
child, says so on stderr and ends the child with SIGTERM; an inherited SQLite
connection whose use in the child raises ``database is locked``, in a bare
``os.fork`` child and in a ``multiprocessing.Process``. Their twins: a parent that
stops its child with SIGTERM, a child failing for a reason of its own.
"""

from __future__ import annotations

import pathlib

from conftest import Scenario, run_scenario

WRAPPER = '''
"""The Python side of libforkcheck, as a package wraps its native library."""
import ctypes, os
_lib = ctypes.CDLL(os.environ["FORKCHECK_LIBRARY"])
def start():
    return _lib.fc_start()
def work(value):
    return _lib.fc_work(value)  # work-line
'''

FORKCHECK = """
import json, os, signal, sys, time
import forksafe
from forksafe._guard import event_for_child
forksafe.install("log")
import forkcheck
forkcheck.start()
time.sleep(0.1)
pid = os.fork()
if pid == 0:
    if sys.argv[1:] == []:
        forkcheck.work(1)  # child-line
    else:
        time.sleep(30)
    os._exit(0)
if sys.argv[1:]:
    time.sleep(0.5)
    os.kill(pid, signal.SIGTERM)  # the parent stops its child
_, status = os.waitpid(pid, 0)
print("FORKSAFE-RESULT:" + json.dumps({"outcome": event_for_child(pid).outcome.to_dict()}))
"""


def forkcheck(tmp_path: pathlib.Path, native_dir: pathlib.Path, *args: str) -> Scenario:
    (tmp_path / "forkcheck.py").write_text(WRAPPER)
    code = FORKCHECK if not args else FORKCHECK.replace("sys.argv[1:]", repr(list(args)))
    return run_scenario(code, tmp_path, timeout=60,
                        env={"FORKCHECK_LIBRARY": str(native_dir / "libforkcheck.so")})


def test_a_runtime_ending_its_forked_child_with_sigterm_is_linked_to_it(
        tmp_path: pathlib.Path, native_dir: pathlib.Path) -> None:
    s = forkcheck(tmp_path, native_dir)
    outcome = s.result["outcome"]
    assert outcome["status"] == "signaled" and outcome["signal"] == "SIGTERM", outcome
    diagnosis = outcome["diagnosis"]
    assert diagnosis is not None, s.stderr
    line = next(n for n, text in enumerate(WRAPPER.splitlines(), 1) if "# work-line" in text)
    assert f"was ended by SIGTERM in forkcheck.py:{line} (work)" in diagnosis
    assert "'fc-events'" in diagnosis and "libforkcheck.so" in diagnosis
    assert f"line {s.line_of('child-line')} in <module>" in outcome["traceback"]
    assert "forkcheck: fork() detected" in s.stderr  # its own last words, on the shared stderr


def test_a_child_its_parent_stops_with_sigterm_is_not_blamed_on_the_fork(
        tmp_path: pathlib.Path, native_dir: pathlib.Path) -> None:
    """Twin: the same runtime active at fork; the parent ends its sleeping child."""
    s = forkcheck(tmp_path, native_dir, "stop")
    outcome = s.result["outcome"]
    assert outcome["status"] == "signaled" and outcome["signal"] == "SIGTERM", outcome
    assert outcome["diagnosis"] is None


SQLITE = """
import json, os, sqlite3, sys
import forksafe
from forksafe._guard import event_for_child
forksafe.install("log")
db = sqlite3.connect("shop.db", timeout=0.2, isolation_level=None)  # open-line
db.execute("create table if not exists items (name)")
db.execute("begin immediate")
db.execute("insert into items values ('parent')")  # the parent is in a write transaction
pid = os.fork()
if pid == 0:
    {child}
    os._exit(0)
_, status = os.waitpid(pid, 0)
print("FORKSAFE-RESULT:" + json.dumps({{"outcome": event_for_child(pid).outcome.to_dict()}}))
"""


def test_an_inherited_sqlite_connection_raising_in_the_child_is_linked_to_it(
        tmp_path: pathlib.Path) -> None:
    s = run_scenario(SQLITE.format(child="db.execute(\"insert into items values ('child')\")\n"
                                         "    db.execute('commit')  # child-line"),
                     tmp_path, timeout=60)
    outcome = s.result["outcome"]
    assert outcome["status"] == "exited" and outcome["exit_code"] == 1, outcome
    assert f"exited 1 with sqlite3.OperationalError: database is locked in " \
        f"scenario.py:{s.line_of('child-line')} (<module>)" in outcome["diagnosis"]
    assert "it involves what was wrong at fork time: an open SQLite connection (opened at " \
        f"scenario.py:{s.line_of('open-line')})" in outcome["diagnosis"]
    assert "ForkSafetyWarning: child" not in s.stderr  # policy log


def test_a_child_failing_for_its_own_reason_is_said_plainly(tmp_path: pathlib.Path) -> None:
    """Twin: the same hazard at fork time; the child fails on something else."""
    s = run_scenario(SQLITE.format(child='int("not a number")  # child-line'), tmp_path,
                     timeout=60)
    outcome = s.result["outcome"]
    assert outcome["exit_code"] == 1, outcome
    assert "exited 1 with ValueError: invalid literal" in outcome["diagnosis"]
    assert "nothing at fork time is involved in it, so fork is probably not the cause" in \
        outcome["diagnosis"]
    assert "SQLite" not in outcome["diagnosis"]


PROCESS = """
import json, multiprocessing as mp, sqlite3
import forksafe
from forksafe._guard import event_for_child
forksafe.install("log")
db = sqlite3.connect("shop.db", timeout=0.2, isolation_level=None)
db.execute("create table if not exists items (name)")
db.execute("begin immediate")
db.execute("insert into items values ('parent')")
def work():
    db.execute("insert into items values ('child')")
    db.execute("commit")  # child-line
if __name__ == "__main__":
    p = mp.get_context("fork").Process(target=work)
    p.start()
    p.join(30)
    print("FORKSAFE-RESULT:" + json.dumps({"exitcode": p.exitcode,
                                           "outcome": event_for_child(p.pid).outcome.to_dict()}))
"""


def test_a_multiprocessing_child_failing_on_the_inherited_connection_is_linked(
        tmp_path: pathlib.Path) -> None:
    """multiprocessing catches the exception of a Process's target itself (no excepthook
    runs): forksafe reads it where multiprocessing prints it."""
    s = run_scenario(PROCESS, tmp_path, timeout=60)
    assert s.result["exitcode"] == 1
    diagnosis = s.result["outcome"]["diagnosis"]
    assert "sqlite3.OperationalError: database is locked in " \
        f"scenario.py:{s.line_of('child-line')} (work)" in diagnosis
    assert "an open SQLite connection" in diagnosis
    assert "Traceback" in s.stderr  # multiprocessing still prints it, as always
