"""get_context(): fork when the check is clean, forkserver or spawn when it is not."""

from __future__ import annotations

import logging
import pathlib

import pytest

from conftest import run_scenario
from forksafe import Hazard, Report, Severity
from forksafe._remedies import context
from forksafe._remedies.context import (
    CHOSE_AFTER_ERROR,
    CHOSE_FORK,
    CHOSE_NO_FORK,
    CHOSE_OTHER,
    UNKNOWN_METHOD,
    context_with,
    get_context,
)

WARNING = Hazard("thread", Severity.WARNING, "a thread 'poller' is alive", "join it", {})
INFO = Hazard("native-runtime", Severity.INFO, "OpenBLAS is loaded", "nothing", {})
LINUX = ["fork", "spawn", "forkserver"]


def test_clean_check_gives_fork_and_logs_why(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing at warning level (info only) means fork, with the reason at debug level."""
    with caplog.at_level(logging.DEBUG, logger="forksafe"):
        ctx = context_with(check=lambda: Report(hazards=(INFO,)), methods=lambda: LINUX)
    assert ctx.get_start_method() == "fork"
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [(logging.DEBUG, CHOSE_FORK)]


def test_warning_gives_forkserver_and_names_the_hazard(caplog: pytest.LogCaptureFixture) -> None:
    """A warning-level hazard means forkserver, and the log says which hazard."""
    with caplog.at_level(logging.DEBUG, logger="forksafe"):
        ctx = context_with(check=lambda: Report(hazards=(WARNING,)), methods=lambda: LINUX)
    assert ctx.get_start_method() == "forkserver"
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]
    assert caplog.records[0].getMessage() == CHOSE_OTHER.format(
        method="forkserver", reasons="[warning] a thread 'poller' is alive")


def test_without_forkserver_spawn_is_chosen() -> None:
    """Where forkserver does not exist (as on Windows-like platforms), spawn is next."""
    ctx = context_with(check=lambda: Report(hazards=(WARNING,)),
                      methods=lambda: ["fork", "spawn"])
    assert ctx.get_start_method() == "spawn"


def test_without_fork_the_check_is_not_even_run(caplog: pytest.LogCaptureFixture) -> None:
    """With no fork start method, there is nothing to check: the safe method is used."""
    def check() -> Report:
        raise AssertionError("the check ran")

    with caplog.at_level(logging.DEBUG, logger="forksafe"):
        ctx = context_with(check=check, methods=lambda: ["spawn"])
    assert ctx.get_start_method() == "spawn"
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.DEBUG, CHOSE_NO_FORK.format(method="spawn"))]


def test_a_failing_check_means_the_safe_method(caplog: pytest.LogCaptureFixture) -> None:
    """If the check itself fails, fork is not risked: forkserver, and the log says why."""
    def check() -> Report:
        raise RuntimeError("probe exploded")

    with caplog.at_level(logging.DEBUG, logger="forksafe"):
        ctx = context_with(check=check, methods=lambda: LINUX)
    assert ctx.get_start_method() == "forkserver"
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.DEBUG, CHOSE_AFTER_ERROR.format(method="forkserver",
                                                 error="RuntimeError: probe exploded"))]


def test_given_method_is_honoured_even_when_unsafe() -> None:
    """An explicit method wins over the check, without running it."""
    def check() -> Report:
        raise AssertionError("the check ran")

    assert context_with("fork", check=check, methods=lambda: LINUX).get_start_method() == "fork"
    assert get_context("spawn").get_start_method() == "spawn"


@pytest.mark.parametrize("method", ["threads", "", 3])
def test_unknown_method_is_one_clear_error(method: object) -> None:
    """A method the platform lacks is a ValueError naming the valid ones."""
    with pytest.raises(ValueError) as info:
        context_with(method, methods=lambda: LINUX)  # type: ignore[arg-type]
    assert str(info.value) == UNKNOWN_METHOD.format(
        method=method, methods="'fork', 'spawn', 'forkserver'")


def test_real_check_chooses_by_live_threads(tmp_path: pathlib.Path) -> None:
    """In a real process: fork while clean, forkserver while a thread is alive."""
    s = run_scenario("""
        import logging, os, threading, time, forksafe
        logging.basicConfig(level=logging.DEBUG, format="%(name)s:%(message)s")
        clean = forksafe.get_context().get_start_method()
        stop = threading.Event()
        t = threading.Thread(target=stop.wait, name="poller")
        t.start()
        busy = forksafe.get_context().get_start_method()
        stop.set(); t.join()
        deadline = time.monotonic() + 5  # the OS thread may outlive join() for a moment
        while len(os.listdir("/proc/self/task")) > 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        again = forksafe.get_context().get_start_method()
        emit(clean=clean, busy=busy, again=again)
    """, tmp_path, timeout=30)
    assert (s.result["clean"], s.result["busy"], s.result["again"]) == (
        "fork", "forkserver", "fork")
    assert "forksafe:get_context: chose 'forkserver' instead of 'fork'" in s.stderr
    assert "poller" in s.stderr


POOL_SCENARIO = """
    import multiprocessing, threading, time
    from concurrent.futures import ProcessPoolExecutor
    import forksafe

    LOCK = threading.Lock()

    def worker(n):
        # In a forked child the lock is a copy of the parent's: locked forever.
        got = LOCK.acquire(timeout=0.5)
        if got:
            LOCK.release()
        return n * n, got

    def hold(ready, stop):
        with LOCK:
            ready.set()
            stop.wait()

    if __name__ == "__main__":
        ready, stop = threading.Event(), threading.Event()
        holder = threading.Thread(target=hold, args=(ready, stop), name="lock-holder")
        holder.start()
        ready.wait()
        ctx = {context}
        with ctx.Pool(2) as pool:
            pooled = pool.map(worker, range(4))
        with ProcessPoolExecutor(2, mp_context=ctx) as executor:
            executed = list(executor.map(worker, range(4)))
        stop.set(); holder.join()
        emit(method=ctx.get_start_method(), pooled=pooled, executed=executed)
"""


def test_pool_and_executor_work_while_a_thread_holds_a_lock(tmp_path: pathlib.Path) -> None:
    """Pool and ProcessPoolExecutor on get_context() get workers with a usable lock."""
    s = run_scenario(POOL_SCENARIO.format(context="forksafe.get_context()"), tmp_path,
                     timeout=60)
    expected = [[n * n, True] for n in range(4)]
    assert s.result["method"] == "forkserver"
    assert s.result["pooled"] == expected
    assert s.result["executed"] == expected


def test_forked_workers_inherit_the_held_lock(tmp_path: pathlib.Path) -> None:
    """The twin: with plain 'fork' the same workers find the lock held forever."""
    s = run_scenario(POOL_SCENARIO.format(context='multiprocessing.get_context("fork")'),
                     tmp_path, timeout=60)
    assert s.result["method"] == "fork"
    assert s.result["pooled"] == [[n * n, False] for n in range(4)]


def test_public_name_is_this_function() -> None:
    """forksafe.get_context (a lazy export) is this very function."""
    import forksafe

    assert forksafe.get_context is context.get_context


def test_active_gnu_openmp_pool_rules_out_fork(tmp_path: pathlib.Path,
                                               native_dir: pathlib.Path) -> None:
    """A GNU OpenMP pool that ran (native threads, no Python thread) means not fork."""
    s = run_scenario(f"""
        import ctypes, forksafe
        lib = ctypes.CDLL({str(native_dir / "libomp_pool.so")!r})
        loaded_only = forksafe.get_context().get_start_method()
        lib.omp_pool_run(100000)
        emit(loaded_only=loaded_only, active=forksafe.get_context().get_start_method())
    """, tmp_path, timeout=30, env={"OMP_NUM_THREADS": "2"})
    assert (s.result["loaded_only"], s.result["active"]) == ("fork", "forkserver")
