"""The native probe's precision around threads that are just exiting."""

from __future__ import annotations

import pathlib

from conftest import run_scenario
from forksafe._platform import OSThread
from forksafe._probes import native

LIBPYTHON = "/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0"


def test_checks_right_after_join_report_no_native_thread(tmp_path: pathlib.Path) -> None:
    """A joined thread whose OS thread has not quite exited is not an unknown native thread."""
    s = run_scenario("""
        import threading, forksafe
        found = []
        for _ in range(60):
            t = threading.Thread(target=sum, args=([1, 2],))
            t.start()
            t.join()
            found += [h.summary for h in forksafe.check().hazards]
        print("FORKSAFE-RESULT:" + __import__("json").dumps({"hazards": found}))
    """, tmp_path)
    assert s.result == {"hazards": []}


def test_interpreter_thread_that_vanishes_is_dropped() -> None:
    """A thread owned by libpython that disappears within the grace period is not reported."""
    polls: list[str] = []

    def exists(path: str) -> bool:
        polls.append(path)
        return len(polls) < 3  # gone on the third look

    thread = OSThread(tid=41, name="python", state="running", owner=LIBPYTHON)
    assert native._without_exiting([thread], grace=1.0, _exists=exists) == []
    assert polls == ["/proc/self/task/41"] * 3


def test_live_interpreter_thread_is_kept_after_the_grace() -> None:
    """A thread the interpreter runs that stays alive (say _thread.start_new_thread) is kept."""
    thread = OSThread(tid=42, name="python", state="sleeping", owner=None)
    assert native._without_exiting([thread], grace=0.001, _exists=lambda p: True) == [thread]


def test_other_libraries_threads_are_never_waited_for() -> None:
    """A thread of any other library is reported at once: the probe does not poll for it."""
    def exists(path: str) -> bool:
        raise AssertionError(f"polled {path}")

    thread = OSThread(tid=43, name="mutex-holder", owner="/tmp/libnative_mutex.so")
    assert native._without_exiting([thread], grace=1.0, _exists=exists) == [thread]
