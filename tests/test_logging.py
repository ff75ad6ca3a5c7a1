"""forksafe's events as ``logging`` records (``forksafe._logsink``).

Every hazardous or refused fork and every noteworthy child outcome (crash, hang,
stall, failure) is one record of the logger ``forksafe`` with ``forksafe_*`` fields,
pointing at the fork's line; clean forks and plain exits make none (their safe
twins). Nothing is printed twice: without logging configuration the program's stderr
is what it was (``NullHandler``), and with ``logging.captureWarnings(True)`` a warned
event is logged once. Every scenario runs in its own interpreter with a hard timeout.
"""

from __future__ import annotations

import pathlib
import textwrap
from typing import Any

from conftest import Scenario, run_scenario
from forksafe._logsink import FIELDS

#: Keeps every record of the process; ``kept()`` gives those of one logger as JSON.
CAPTURE = """
import logging
class Keep(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []
    def emit(self, record):
        self.records.append(record)
keep = Keep()
logging.getLogger().addHandler(keep)
logging.getLogger().setLevel(logging.DEBUG)
def kept(name="forksafe"):
    out = []
    for r in keep.records:
        if r.name != name:
            continue
        d = {"level": r.levelname, "message": r.getMessage(), "pathname": r.pathname,
             "lineno": r.lineno, "process": r.process}
        d.update({k: v for k, v in vars(r).items() if k.startswith("forksafe_")})
        out.append(d)
    return out
"""

#: A thread that holds ``lock`` for a minute: every fork meanwhile is hazardous.
HOLDER = """
import threading, time
lock = threading.Lock()
def hold():
    with lock:
        time.sleep(60)
threading.Thread(target=hold, name="holder", daemon=True).start()
time.sleep(0.1)
"""


def script(*parts: str) -> str:
    """The parts of a scenario, each dedented on its own, as one script."""
    return "\n".join(textwrap.dedent(part) for part in parts)


def records(s: Scenario) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = s.result["records"]
    return found


def test_a_hazardous_fork_is_one_record_with_its_fields_at_the_fork_line(
        tmp_path: pathlib.Path) -> None:
    """Policy log: no warning at all, one WARNING record naming the child, pointing at the
    fork's line, with the hazards as data."""
    s = run_scenario(script(CAPTURE, """
        import os, forksafe
        forksafe.install("log")
    """, HOLDER, """
        pid = os.fork()  # fork-line
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        emit(records=kept(), pid=pid, me=os.getpid())
    """), tmp_path, timeout=60)
    [record] = records(s)
    line = s.line_of("fork-line")
    assert record["level"] == "WARNING"
    assert record["pathname"] == str(s.path) and record["lineno"] == line
    assert record["process"] == s.result["me"]
    assert record["forksafe_kind"] == "fork" and record["forksafe_action"] == "logged"
    assert record["forksafe_severity"] == "warning"
    assert record["forksafe_mechanism"] == "os.fork"
    assert record["forksafe_site"] == f"scenario.py:{line} in <module>"
    assert record["forksafe_child_pid"] == s.result["pid"]
    assert record["forksafe_parent_pid"] == s.result["me"]
    assert record["forksafe_repeat"] == 1
    assert {k for k in record if k.startswith("forksafe_")} <= set(FIELDS), "documented"
    [hazard] = record["forksafe_hazards"]
    assert hazard["kind"] == "thread" and "holder" in hazard["summary"]
    assert record["message"].startswith(
        f"forksafe: os.fork at scenario.py:{line} forked child {s.result['pid']} (parent pid "
        f"{s.result['me']}, thread 'MainThread') while that was unsafe: 1 warning.")
    assert "fix: do not fork while 'holder' is inside `with lock:`" in record["message"]
    assert "ForkSafetyWarning" not in s.stderr


def test_alike_forks_after_the_first_are_one_line_each(tmp_path: pathlib.Path) -> None:
    """A server re-forking with the same hazards: the full text once, then one line that
    says where the full text is and counts."""
    s = run_scenario(script(CAPTURE, """
        import os, forksafe
        forksafe.install("log")
    """, HOLDER, """
        pids = []
        for _ in range(3):
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
            pids.append(pid)
        emit(records=kept(), pids=pids)
    """), tmp_path, timeout=60)
    first, second, third = records(s)
    assert "fix:" in first["message"] and first["forksafe_repeat"] == 1
    for record, count, pid in ((second, 2, s.result["pids"][1]), (third, 3, s.result["pids"][2])):
        assert "\n" not in record["message"]
        assert f"forked child {pid} " in record["message"]
        assert "the same hazards as logged in full at " in record["message"]
        assert record["message"].endswith(f"(forks with them so far: {count})")
        assert record["forksafe_repeat"] == count and record["forksafe_hazards"]


def test_clean_forks_and_plain_exits_make_no_record(tmp_path: pathlib.Path) -> None:
    """The safe twin: 200 clean forks, children exiting 0 or 3 (no exception) or stopped
    by their parent's SIGTERM, under DEBUG: not one record."""
    s = run_scenario(script(CAPTURE, """
        import os, signal, time, forksafe
        forksafe.install("warn")
        for i in range(200):
            pid = os.fork()
            if pid == 0:
                if i == 0:
                    time.sleep(30)
                os._exit(3 if i == 1 else 0)
            if i == 0:
                os.kill(pid, signal.SIGTERM)
            os.waitpid(pid, 0)
        emit(records=kept(), history=len(forksafe._guard.history()))
    """), tmp_path, timeout=120)
    assert s.result["history"] == 200, "the forks were seen"
    assert records(s) == []


def test_a_refused_fork_is_an_error_record(tmp_path: pathlib.Path) -> None:
    s = run_scenario(script(CAPTURE, """
        import os, forksafe
        forksafe.install("raise", fail_on="warning")
    """, HOLDER, """
        try:
            os.fork()  # fork-line
        except forksafe.ForkSafetyError:
            pass
        emit(records=kept())
    """), tmp_path, timeout=60)
    [record] = records(s)
    assert record["level"] == "ERROR"
    assert record["forksafe_action"] == "refused" and record["forksafe_child_pid"] is None
    assert record["lineno"] == s.line_of("fork-line")
    assert record["message"].startswith(
        f"forksafe refused os.fork at scenario.py:{s.line_of('fork-line')} (pid ")
    assert "no child was created (policy 'raise')" in record["message"]


def test_a_crash_is_an_error_record_with_the_diagnosis_and_the_childs_stacks(
        tmp_path: pathlib.Path) -> None:
    s = run_scenario(script(CAPTURE, """
        import os, signal, forksafe
        forksafe.install("log")
    """, HOLDER, """
        pid = os.fork()  # fork-line
        if pid == 0:
            os.kill(os.getpid(), signal.SIGSEGV)  # crash-line
        os.waitpid(pid, 0)
        emit(records=kept(), pid=pid)
    """), tmp_path, timeout=60)
    fork, crash = records(s)
    assert fork["forksafe_kind"] == "fork"
    assert crash["level"] == "ERROR" and crash["forksafe_kind"] == "crash"
    assert crash["forksafe_status"] == "signaled" and crash["forksafe_signal"] == "SIGSEGV"
    assert crash["forksafe_child_pid"] == s.result["pid"]
    assert crash["lineno"] == s.line_of("fork-line"), "where the child came from"
    assert crash["message"].startswith(f"forksafe: child {s.result['pid']} (forked at "
                                       f"scenario.py:{s.line_of('fork-line')} in <module> via "
                                       "os.fork) was killed by SIGSEGV")
    assert crash["forksafe_diagnosis"] in crash["message"]
    assert f'line {s.line_of("crash-line")} in <module>' in crash["forksafe_traceback"]
    assert "\nchild's stacks:\n  " in crash["message"]


def test_a_hang_is_an_error_record_with_its_diagnosis(tmp_path: pathlib.Path) -> None:
    """A child that takes the lock a vanished thread held: ended after the hang timeout,
    and its diagnosis is a record."""
    s = run_scenario(script(CAPTURE, """
        import os, forksafe
        forksafe.install("log", hang_timeout=1)
    """, HOLDER, """
        pid = os.fork()
        if pid == 0:
            with lock:  # hang-line
                pass
            os._exit(0)
        os.waitpid(pid, 0)
        emit(records=kept(), pid=pid)
    """), tmp_path, timeout=60)
    _, hang = records(s)
    assert hang["level"] == "ERROR" and hang["forksafe_kind"] == "hang"
    assert hang["forksafe_status"] == "hung" and hang["forksafe_blames_fork"] is True
    assert f"it is blocked taking `lock` at scenario.py:{s.line_of('hang-line')}" in \
        hang["message"]
    assert "thread 'holder'" in hang["forksafe_diagnosis"]


def test_a_stall_then_an_outside_kill_is_a_warning_record(tmp_path: pathlib.Path) -> None:
    """Stuck on a lock it took itself, after a clean fork: nothing explains it, so it is
    left running; its parent kills it, and the record is a warning that says so."""
    s = run_scenario(script(CAPTURE, """
        import os, signal, threading, time, forksafe
        forksafe.install("log", hang_timeout=0.5)
        pid = os.fork()
        if pid == 0:
            mine = threading.Lock()
            mine.acquire()
            mine.acquire()
            os._exit(0)
        from forksafe._statedir import stall_path
        deadline = time.monotonic() + 30  # the monitor's note, however loaded the machine
        while not os.path.exists(stall_path(pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        emit(records=kept())
    """), tmp_path, timeout=60)
    [stall] = records(s)
    assert stall["level"] == "WARNING" and stall["forksafe_kind"] == "stall"
    assert stall["forksafe_blames_fork"] is False and stall["forksafe_signal"] == "SIGKILL"
    assert "no fork-time hazard explains it" in stall["message"]


def test_a_failure_the_fork_does_not_explain_is_debug_only(tmp_path: pathlib.Path) -> None:
    """An uncaught exception of the child's own: a debug record, so silent in a log at
    the usual levels; the fork that preceded it was clean."""
    s = run_scenario(script(CAPTURE, """
        import os, sys, forksafe
        forksafe.install("log")
        pid = os.fork()
        if pid == 0:
            raise ValueError("the child's own bug")
        os.waitpid(pid, 0)
        emit(records=kept())
    """), tmp_path, timeout=60)
    [failure] = records(s)
    assert failure["level"] == "DEBUG" and failure["forksafe_kind"] == "failure"
    assert failure["forksafe_exit_code"] == 1 and failure["forksafe_blames_fork"] is False
    assert "ValueError: the child's own bug" in failure["message"]


def test_without_logging_configuration_only_the_warning_is_printed(
        tmp_path: pathlib.Path) -> None:
    """``warnings`` users see what they saw before: one warning per event, and nothing
    from logging's last resort, whether or not the program imported logging."""
    s = run_scenario(script("""
        import os, signal, sys, forksafe
        if sys.argv[1:] != ["bare"]:
            import logging
        forksafe.install("warn")
    """, HOLDER, """
        pid = os.fork()
        if pid == 0:
            os.kill(os.getpid(), signal.SIGSEGV)
        os.waitpid(pid, 0)
        emit(logging="logging" in sys.modules)
    """), tmp_path, timeout=60)
    assert s.result["logging"], "the program imported logging"
    assert s.stderr.count("ForkSafetyWarning: forksafe: os.fork at") == 1
    assert s.stderr.count("ForkSafetyWarning: child ") == 1
    assert "forked child" not in s.stderr, "no record printed by logging's last resort"
    assert "forksafe: child " not in s.stderr


def test_a_program_that_never_imports_logging_is_not_made_to(tmp_path: pathlib.Path) -> None:
    s = run_scenario(script("""
        import os, signal, sys
        import forksafe
        forksafe.install("log")
        import threading, time
        lock = threading.Lock()
        def hold():
            with lock:
                time.sleep(60)
        threading.Thread(target=hold, daemon=True).start()
        time.sleep(0.1)
        pid = os.fork()
        if pid == 0:
            os.kill(os.getpid(), signal.SIGSEGV)
        os.waitpid(pid, 0)
        print("FORKSAFE-RESULT:" + __import__("json").dumps(
            {"logging": "logging" in sys.modules,
             "actions": [e.action for e in forksafe._guard.history()]}))
    """), tmp_path, timeout=60)
    assert s.result == {"logging": False, "actions": ["logged"]}
    assert s.stderr == ""


def test_captured_warnings_make_one_record_per_event(tmp_path: pathlib.Path) -> None:
    """With ``logging.captureWarnings(True)`` a warned event is in the log once, as the
    warning's own record; under policy log (no warning) forksafe's record is that one."""
    s = run_scenario(script(CAPTURE, """
        import os, signal, sys, forksafe
        logging.captureWarnings(True)
        forksafe.install(sys.argv[1] if len(sys.argv) > 1 else "warn")
    """, HOLDER, """
        pid = os.fork()
        if pid == 0:
            os.kill(os.getpid(), signal.SIGSEGV)
        os.waitpid(pid, 0)
        emit(warnings=kept("py.warnings"), records=kept())
    """), tmp_path, timeout=60)
    assert len(s.result["warnings"]) == 2, "the fork's warning and the crash's"
    assert records(s) == [], "and no second record of either"
    assert "ForkSafetyWarning" not in s.stderr


#: forksafe's hooks registered before logging's, and forks only those hooks see. (The
#: hooks' after_in_parent is registered at the first fork only they see: here as if
#: that had been before logging was imported.)
IN_THE_WINDOW = """
import os, sys
from os import fork as raw_fork  # bound before install(): only the hooks see it
import forksafe
from forksafe import _forkpath
forksafe.install("log")
_forkpath._register_parent_hook()
import logging  # now: logging's at-fork hooks run inside forksafe's
logging.basicConfig(level=logging.INFO, format="RECORD %(forksafe_child_pid)s",
                    stream=sys.stdout)
"""
FORK_RAW = """
pids = []
for _ in range(int(os.environ["FORKS"])):
    pid = raw_fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    pids.append(pid)
    print("FORKED", pid, flush=True)
print("FORKSAFE-RESULT:" + __import__("json").dumps({"pids": pids}), flush=True)
"""


def test_records_of_forks_inside_loggings_fork_window_wait_and_are_not_lost(
        tmp_path: pathlib.Path) -> None:
    """logging holds its lock from before a fork until after it: a record made in there
    waits. The first comes out at the next fork (a hook registered after logging's
    runs once logging let go), later ones at their own fork; nothing deadlocks."""
    s = run_scenario(script(IN_THE_WINDOW, HOLDER, FORK_RAW), tmp_path, timeout=60,
                     env={"FORKS": "3"})
    first, second, third = s.result["pids"]
    lines = [line for line in s.stdout.splitlines() if line.startswith(("RECORD", "FORKED"))]
    assert lines == [f"FORKED {first}", f"RECORD {first}", f"RECORD {second}",
                     f"FORKED {second}", f"RECORD {third}", f"FORKED {third}"], s.stdout


def test_a_lone_fork_inside_loggings_fork_window_is_logged_at_exit(
        tmp_path: pathlib.Path) -> None:
    s = run_scenario(script(IN_THE_WINDOW, HOLDER, FORK_RAW), tmp_path, timeout=60,
                     env={"FORKS": "1"})
    [pid] = s.result["pids"]
    lines = [line for line in s.stdout.splitlines() if line.startswith(("RECORD", "FORKED"))]
    assert lines == [f"FORKED {pid}", f"RECORD {pid}"], s.stdout


def test_hazardous_forks_nobody_listens_to_keep_the_batch(tmp_path: pathlib.Path) -> None:
    """Logging imported but no handler: a hazardous fork is queued like a clean one (the
    batch's cost, not a recording per fork), and its record is not lost: a handler added
    later gets it when the batch is recorded. With a handler from the start, the record
    is made right after the fork."""
    s = run_scenario(script("""
        import logging, os
        import forksafe
        from forksafe import _forkpath
        keep = []
        class Keep(logging.Handler):
            def emit(self, record):
                keep.append(record.forksafe_child_pid)
        forksafe.install("log")
    """, HOLDER, """
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        queued = len(_forkpath.own_state().queue)
        before = list(keep)
        logging.getLogger().addHandler(Keep())  # someone listens from now on
        os.waitpid(pid, 0)
        forksafe._guard.history()  # records the batch
        emit(queued=queued, before=before, after=keep, pid=pid)
    """), tmp_path, timeout=60)
    assert s.result["queued"] == 1 and s.result["before"] == []
    assert s.result["after"] == [s.result["pid"]], "recorded with the batch, not lost"
    s = run_scenario(script("""
        import logging, os
        import forksafe
        from forksafe import _forkpath
        keep = []
        class Keep(logging.Handler):
            def emit(self, record):
                keep.append(record.forksafe_child_pid)
        logging.getLogger().addHandler(Keep())
        forksafe.install("log")
    """, HOLDER, """
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        emit(queued=len(_forkpath.own_state().queue), before=list(keep), pid=pid)
        os.waitpid(pid, 0)
    """), tmp_path, timeout=60)
    assert s.result["queued"] == 0 and s.result["before"] == [s.result["pid"]]


def test_a_fork_only_the_hooks_see_is_logged_at_once_when_logging_came_first(
        tmp_path: pathlib.Path) -> None:
    """The hooks' after_in_parent is registered at the first fork only they see, so when
    logging was imported before it, it runs after logging let go: the record comes at
    the fork, not at the next one or at exit."""
    setup = IN_THE_WINDOW.replace("_forkpath._register_parent_hook()\n", "")
    s = run_scenario(script(setup, HOLDER, FORK_RAW), tmp_path, timeout=60,
                     env={"FORKS": "2"})
    first, second = s.result["pids"]
    lines = [line for line in s.stdout.splitlines() if line.startswith(("RECORD", "FORKED"))]
    assert lines == [f"RECORD {first}", f"FORKED {first}", f"RECORD {second}",
                     f"FORKED {second}"], s.stdout
