"""The hazard check against real hazards on this machine, each with its safe twin.

Every scenario runs in its own interpreter (see ``conftest.run_scenario``): a
real GNU OpenMP pool, real grpcio, real threads holding real locks, real SQLite
connections, real event loops.
"""

from __future__ import annotations

import pathlib
import textwrap

import pytest

from conftest import run_scenario

SEVERITY = {"info": 1, "warning": 2, "error": 3}


def at_most_info(hazards: list[dict[str, object]]) -> bool:
    return all(h["severity"] == "info" for h in hazards)


# -- GNU OpenMP --------------------------------------------------------------------


def test_active_gnu_openmp_pool_is_an_error(
    tmp_path: pathlib.Path, native_dir: pathlib.Path
) -> None:
    """A libgomp pool that ran a parallel region is reported as an error naming OpenMP."""
    s = run_scenario(f"""
        import ctypes
        lib = ctypes.CDLL({str(native_dir / "libomp_pool.so")!r})
        lib.omp_pool_run(100000)
        emit()
    """, tmp_path)
    runtimes = [h for h in s.of_kind("native-runtime") if h["evidence"]["runtime"] == "gnu-openmp"]
    assert len(runtimes) == 1
    hazard = runtimes[0]
    assert hazard["severity"] == "error"
    assert "OpenMP" in hazard["summary"] and "libgomp" in hazard["summary"]
    assert hazard["evidence"]["active"] is True
    assert hazard["evidence"]["threads"], "the pool's worker threads are the evidence"
    assert any("libgomp" in path for path in hazard["evidence"]["libraries"])
    assert "spawn" in hazard["remedy"] or "forkserver" in hazard["remedy"]
    assert s.worst == "error"
    assert not s.of_kind("native-thread"), "pool threads are attributed, not unknown"


def test_loaded_but_unused_gnu_openmp_is_at_most_info(
    tmp_path: pathlib.Path, native_dir: pathlib.Path
) -> None:
    """libgomp loaded without a parallel region ever run is harmless: at most info."""
    s = run_scenario(f"""
        import ctypes
        lib = ctypes.CDLL({str(native_dir / "libomp_pool.so")!r})
        emit()
    """, tmp_path)
    assert at_most_info(s.hazards), s.hazards
    assert any(h["evidence"].get("runtime") == "gnu-openmp" for h in s.of_kind("native-runtime"))


# -- gRPC ---------------------------------------------------------------------------

GRPC_SERVER = textwrap.dedent("""
    import grpc
    from concurrent import futures
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(channel).result(timeout=20)
""")


def test_grpc_in_use_is_an_error_naming_its_threads(tmp_path: pathlib.Path) -> None:
    """A started gRPC server and a connected channel are an error naming gRPC's threads."""
    pytest.importorskip("grpc")
    s = run_scenario(GRPC_SERVER + "emit()\n", tmp_path, env={"GRPC_ENABLE_FORK_SUPPORT": ""})
    grpc = [h for h in s.of_kind("native-runtime") if h["evidence"]["runtime"] == "grpc"]
    assert len(grpc) == 1
    assert grpc[0]["severity"] == "error"
    assert "gRPC" in grpc[0]["summary"]
    names = {t["name"] for t in grpc[0]["evidence"]["threads"]}
    assert names, "gRPC's own threads are the evidence"
    assert any(n.startswith(("grpc", "event_engine", "default-executo")) for n in names), names
    assert "GRPC_ENABLE_FORK_SUPPORT" in grpc[0]["remedy"]


def test_grpc_with_fork_support_is_a_warning(tmp_path: pathlib.Path) -> None:
    """With GRPC_ENABLE_FORK_SUPPORT on, active gRPC drops to a warning that says so."""
    pytest.importorskip("grpc")
    s = run_scenario(GRPC_SERVER + "emit()\n", tmp_path, env={"GRPC_ENABLE_FORK_SUPPORT": "1"})
    grpc = [h for h in s.of_kind("native-runtime") if h["evidence"]["runtime"] == "grpc"]
    assert [h["severity"] for h in grpc] == ["warning"]
    assert grpc[0]["evidence"]["fork_support"]["enabled"] is True


def test_importing_grpc_alone_is_at_most_info(tmp_path: pathlib.Path) -> None:
    """`import grpc` starts nothing: at most info."""
    pytest.importorskip("grpc")
    s = run_scenario("import grpc\nemit()\n", tmp_path)
    assert at_most_info(s.hazards), s.hazards


# -- Python threads -------------------------------------------------------------------


def test_thread_holding_a_lock_is_a_warning_with_origin_and_line(tmp_path: pathlib.Path) -> None:
    """A thread inside `with lock:` is named, with where it started and where it is now."""
    s = run_scenario("""
        import threading, time, forksafe
        forksafe.observe()
        cache_lock = threading.Lock()
        held = threading.Event()
        def refresh():
            with cache_lock:  # TAKEN
                held.set()
                time.sleep(60)  # NOW
        t = threading.Thread(target=refresh, name="cache-refresher", daemon=True)
        t.start()  # STARTED
        held.wait(10)
        emit()
    """, tmp_path)
    threads = s.of_kind("thread")
    assert len(threads) == 1
    hazard = threads[0]
    assert hazard["severity"] == "warning"
    assert "cache-refresher" in hazard["summary"]
    assert f"scenario.py:{s.line_of('STARTED')}" in hazard["summary"]
    assert "cache_lock" in hazard["summary"]
    ev = hazard["evidence"]
    assert ev["started_at"][0]["line"] == s.line_of("STARTED")
    assert ev["current"][0]["line"] == s.line_of("NOW")
    assert ev["locks"] == [
        {"lock": "cache_lock", "at": f"{s.path}:{s.line_of('TAKEN')}", "locked": True}
    ]
    assert s.worst == "warning"


def test_thread_started_before_observation_has_unknown_origin(tmp_path: pathlib.Path) -> None:
    """Without observe(), the report says the origin is unknown and how to get it."""
    s = run_scenario("""
        import threading
        ev = threading.Event()
        t = threading.Thread(target=ev.wait, name="idle", daemon=True)
        t.start()
        emit()
        ev.set()
    """, tmp_path)
    [hazard] = s.of_kind("thread")
    assert "origin unknown" in hazard["evidence"]["started_at"]
    assert "observe()" in hazard["evidence"]["started_at"]
    assert hazard["evidence"]["state"] == "idle"


def test_idle_thread_is_classified_as_waiting(tmp_path: pathlib.Path) -> None:
    """A thread blocked in Event.wait is told apart from one that computes."""
    s = run_scenario("""
        import threading, forksafe
        forksafe.observe()
        ev, stop = threading.Event(), threading.Event()
        idle = threading.Thread(target=ev.wait, name="idle", daemon=True)
        def spin():
            n = 0
            while not stop.is_set():
                n += 1
        busy = threading.Thread(target=spin, name="busy", daemon=True)
        idle.start(); busy.start()
        emit()
        stop.set(); ev.set()
    """, tmp_path)
    states = {h["evidence"]["name"]: h["evidence"]["state"] for h in s.of_kind("thread")}
    assert states == {"idle": "idle", "busy": "running"}


def test_joined_threads_leave_nothing(tmp_path: pathlib.Path) -> None:
    """Threads that were all joined are not hazards: the report is clean."""
    s = run_scenario("""
        import threading, forksafe
        forksafe.observe()
        lock = threading.Lock()
        def work():
            with lock:
                pass
        threads = [threading.Thread(target=work) for _ in range(5)]
        for t in threads: t.start()
        for t in threads: t.join()
        emit()
    """, tmp_path)
    assert s.hazards == []
    assert s.worst is None


def test_check_from_a_worker_thread_reports_the_main_thread(tmp_path: pathlib.Path) -> None:
    """The caller is excluded, and the main thread counts as another thread."""
    s = run_scenario("""
        import threading
        out = []
        def worker():
            emit()
        t = threading.Thread(target=worker, name="forker")
        t.start(); t.join()
    """, tmp_path)
    names = [h["evidence"]["name"] for h in s.of_kind("thread")]
    assert names == ["MainThread"]
    assert s.result["thread"] == "forker"


# -- SQLite ---------------------------------------------------------------------------


def test_open_sqlite_connection_is_a_warning_with_its_line(tmp_path: pathlib.Path) -> None:
    """An open connection is reported with the line that opened it."""
    s = run_scenario("""
        import forksafe
        forksafe.observe()
        import sqlite3
        conn = sqlite3.connect("app.db")  # OPENED
        conn.execute("create table t(x)")
        emit()
    """, tmp_path)
    [hazard] = s.of_kind("sqlite-connection")
    assert hazard["severity"] == "warning"
    assert f"scenario.py:{s.line_of('OPENED')}" in hazard["summary"]
    assert "corrupt" in hazard["summary"]
    assert "new connection in the child" in hazard["remedy"]


def test_closed_sqlite_connection_is_not_a_hazard(tmp_path: pathlib.Path) -> None:
    """A connection that was closed before the check is nothing."""
    s = run_scenario("""
        import forksafe
        forksafe.observe()
        import sqlite3
        conn = sqlite3.connect("app.db")
        conn.execute("create table t(x)")
        conn.close()
        emit()
    """, tmp_path)
    assert s.hazards == []


@pytest.mark.parametrize(("database", "uri"), [
    (":memory:", False), ("", False), ("file::memory:", True),
    ("file:memorydb_default?mode=memory&cache=shared", True),  # Django's test database
])
def test_in_memory_sqlite_is_info(tmp_path: pathlib.Path, database: str, uri: bool) -> None:
    """An in-memory (or private temporary) database is each process's own after a fork:
    nothing shared, nothing to corrupt; its twin on disk stays a warning."""
    s = run_scenario(f"""
        import forksafe
        forksafe.observe()
        import sqlite3
        memory = sqlite3.connect({database!r}, uri={uri!r})  # MEMORY
        disk = sqlite3.connect(database="app.db")
        emit()
    """, tmp_path)
    kinds = sorted((h["severity"], h["evidence"].get("in_memory", False))
                   for h in s.of_kind("sqlite-connection"))
    assert kinds == [("info", True), ("warning", False)]
    [memory] = [h for h in s.of_kind("sqlite-connection") if h["severity"] == "info"]
    assert "in-memory" in memory["summary"] and f"scenario.py:{s.line_of('MEMORY')}" in \
        memory["summary"]


def test_sqlite_connection_opened_unobserved_is_still_found(tmp_path: pathlib.Path) -> None:
    """Without observation the connection is still found, its origin marked unknown."""
    s = run_scenario("""
        import sqlite3
        conn = sqlite3.connect(":memory:")
        emit()
    """, tmp_path)
    [hazard] = s.of_kind("sqlite-connection")
    assert "origin unknown" in hazard["summary"]


def test_finding_connections_writes_to_no_page_of_the_heap(tmp_path: pathlib.Path) -> None:
    """A process of 300,000 objects with connections (one of a subclass, one opened in a
    function that returned it) forks under the guard: each is found at every fork, and
    finding them takes no reference to every object (``gc.get_objects()`` did: 16,857
    pages copied per fork here, against 403-441 now)."""
    s = run_scenario("""
        import os, resource, sqlite3
        import forksafe
        heap = [{"k": i, "v": [i, str(i)]} for i in range(300_000)]
        class Logged(sqlite3.Connection):
            pass
        def open_db():
            return sqlite3.connect("app.db")
        plain, sub = open_db(), sqlite3.connect("sub.db", factory=Logged)
        forksafe.install("log")
        def forks(n):
            for _ in range(n):
                pid = os.fork()
                if pid == 0:
                    os._exit(0)
                os.waitpid(pid, 0)
        forks(5)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        forks(40)
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 40
        from forksafe._guard import history
        found = {len([h for h in e.report.hazards if h.kind == "sqlite-connection"])
                 for e in history()[-40:]}
        tracked = bool(sqlite3.Connection.__flags__ & (1 << 14))  # Py_TPFLAGS_HAVE_GC
        emit(faults=faults, found=sorted(found), tracked=tracked)
    """, tmp_path, timeout=120)
    assert s.result["found"] == [2], "both connections at every fork"
    if not s.result["tracked"]:
        return  # Python 3.9: connections are untracked, found from every object (README)
    # Objects are ~16,000 pages of this heap: writing them all would fault on each.
    assert s.result["faults"] < 3000, s.result["faults"]


# -- numpy / OpenBLAS -----------------------------------------------------------------


def test_numpy_with_openblas_threads_is_at_most_info(tmp_path: pathlib.Path) -> None:
    """OpenBLAS's live pool handles fork itself: at most info, and it is attributed."""
    pytest.importorskip("numpy")
    s = run_scenario("""
        import numpy as np
        a = np.random.rand(400, 400)
        for _ in range(3):
            a @ a
        emit()
    """, tmp_path, env={"OPENBLAS_NUM_THREADS": "2"})
    assert at_most_info(s.hazards), s.hazards
    blas = [h for h in s.of_kind("native-runtime") if h["evidence"]["runtime"] == "openblas"]
    assert blas and blas[0]["evidence"]["threads"], "the BLAS threads are accounted for"


# -- native threads, CUDA, libdispatch fakes -------------------------------------------


def test_unknown_native_thread_is_a_warning(
    tmp_path: pathlib.Path, native_dir: pathlib.Path
) -> None:
    """A C thread no runtime accounts for is reported with its name and owner library."""
    s = run_scenario(f"""
        import ctypes
        lib = ctypes.CDLL({str(native_dir / "libnative_mutex.so")!r})
        lib.native_mutex_hold(ctypes.c_double(30.0))
        lib.native_mutex_wait_held.argtypes = [ctypes.c_double]
        assert lib.native_mutex_wait_held(10.0) == 1
        emit()
    """, tmp_path)
    [hazard] = s.of_kind("native-thread")
    assert hazard["severity"] == "warning"
    assert hazard["evidence"]["name"] == "mutex-holder"
    assert hazard["evidence"]["owner"].endswith("libnative_mutex.so")


def test_native_thread_that_finished_is_not_a_hazard(
    tmp_path: pathlib.Path, native_dir: pathlib.Path
) -> None:
    """Once the C thread has exited, nothing is reported."""
    s = run_scenario(f"""
        import ctypes, os, time
        lib = ctypes.CDLL({str(native_dir / "libnative_mutex.so")!r})
        lib.native_mutex_hold(ctypes.c_double(0.05))
        deadline = time.time() + 10
        while len(os.listdir("/proc/self/task")) > 1 and time.time() < deadline:
            time.sleep(0.02)
        emit()
    """, tmp_path)
    assert s.hazards == []


def test_initialised_cuda_is_an_error(tmp_path: pathlib.Path, native_dir: pathlib.Path) -> None:
    """A CUDA driver (our fake) after cuInit, with its event thread, is an error."""
    s = run_scenario(f"""
        import ctypes, time
        lib = ctypes.CDLL({str(native_dir / "libcuda.so.1")!r})
        assert lib.cuInit(0) == 0
        time.sleep(0.2)
        emit()
    """, tmp_path)
    [cuda] = [h for h in s.of_kind("native-runtime") if h["evidence"]["runtime"] == "cuda"]
    assert cuda["severity"] == "error"
    assert {t["name"] for t in cuda["evidence"]["threads"]} == {"cuda-EvtHandlr"}


def test_loaded_cuda_without_init_is_at_most_info(
    tmp_path: pathlib.Path, native_dir: pathlib.Path
) -> None:
    """The CUDA driver merely loaded is harmless."""
    s = run_scenario(f"""
        import ctypes
        lib = ctypes.CDLL({str(native_dir / "libcuda.so.1")!r})
        emit()
    """, tmp_path)
    assert at_most_info(s.hazards), s.hazards


def test_multithreaded_libdispatch_is_an_error(
    tmp_path: pathlib.Path, native_dir: pathlib.Path
) -> None:
    """A libdispatch (our imitation) that says it is multithreaded is an error."""
    s = run_scenario(f"""
        import ctypes, time
        lib = ctypes.CDLL({str(native_dir / "libdispatch.so")!r})
        lib.fake_dispatch_start()
        time.sleep(0.1)
        emit()
    """, tmp_path)
    [hazard] = [
        h for h in s.of_kind("native-runtime") if h["evidence"]["runtime"] == "libdispatch"
    ]
    assert hazard["severity"] == "error"
    assert "_dispatch_is_multithreaded() is true" in hazard["evidence"]["signals"]


def test_unused_libdispatch_is_not_reported(
    tmp_path: pathlib.Path, native_dir: pathlib.Path
) -> None:
    """libdispatch is loaded in every macOS process: unused, it is not even info."""
    s = run_scenario(f"""
        import ctypes
        lib = ctypes.CDLL({str(native_dir / "libdispatch.so")!r})
        emit()
    """, tmp_path)
    assert s.hazards == []


# -- asyncio ----------------------------------------------------------------------------


def test_running_event_loop_in_caller_is_a_warning(tmp_path: pathlib.Path) -> None:
    """Checking from inside a running loop reports the loop."""
    s = run_scenario("""
        import asyncio
        async def main():
            emit()
        asyncio.run(main())
    """, tmp_path)
    [hazard] = s.of_kind("event-loop")
    assert hazard["severity"] == "warning"
    assert hazard["evidence"]["in_caller"] is True


def test_event_loop_in_another_thread_is_a_warning(tmp_path: pathlib.Path) -> None:
    """A loop run_forever in a thread is reported, naming the thread."""
    s = run_scenario("""
        import asyncio, threading, time
        loop = asyncio.new_event_loop()
        t = threading.Thread(target=loop.run_forever, name="loop-thread", daemon=True)
        t.start()
        time.sleep(0.2)
        emit()
        loop.call_soon_threadsafe(loop.stop)
    """, tmp_path)
    [hazard] = s.of_kind("event-loop")
    assert hazard["evidence"]["thread"] == "loop-thread"
    assert hazard["evidence"]["in_caller"] is False


def test_finished_event_loop_is_not_a_hazard(tmp_path: pathlib.Path) -> None:
    """After asyncio.run() returns, nothing is left to report."""
    s = run_scenario("""
        import asyncio
        async def main():
            await asyncio.sleep(0)
        asyncio.run(main())
        emit()
    """, tmp_path)
    assert s.hazards == []


# -- a clean process ----------------------------------------------------------------


def test_plain_interpreter_is_clean(tmp_path: pathlib.Path) -> None:
    """A process with nothing going on is reported safe with no hazard at all."""
    s = run_scenario("emit()\n", tmp_path)
    assert s.hazards == []
    assert s.worst is None
