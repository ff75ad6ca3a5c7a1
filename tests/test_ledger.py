"""The observation layer: what it records, and that it undoes itself exactly."""

from __future__ import annotations

import pathlib
import threading

from conftest import run_scenario
from forksafe import _ledger


def test_observe_is_idempotent_and_unobserve_restores_identity() -> None:
    """observe() twice wraps once; unobserve() puts back the very same function."""
    original = threading.Thread.start
    try:
        _ledger.observe()
        wrapped = threading.Thread.start
        _ledger.observe()
        assert threading.Thread.start is wrapped
        assert wrapped is not original
    finally:
        _ledger.unobserve()
    assert threading.Thread.start is original
    assert not _ledger.observing()


def test_thread_origin_records_the_start_line() -> None:
    """A thread started while observing knows the file and line of its start() call."""
    try:
        _ledger.observe()
        t = threading.Thread(target=lambda: None)
        t.start(); line = _current_line()  # noqa: E702 - same line on purpose
        t.join()
    finally:
        _ledger.unobserve()
    frames = _ledger.thread_origin(t)
    assert frames is not None
    site = _ledger.sites(frames)[0]
    assert (site.file, site.line) == (__file__, line)


def _current_line() -> int:
    import sys

    return sys._getframe(1).f_lineno


def test_sqlite_imported_after_observe_is_wrapped(tmp_path: pathlib.Path) -> None:
    """observe() does not import sqlite3, but wraps connect when the program does."""
    s = run_scenario("""
        import sys, forksafe
        forksafe.observe()
        assert "sqlite3" not in sys.modules
        import sqlite3
        assert sqlite3.connect.__wrapped__ is not None
        conn = sqlite3.connect(":memory:")
        from forksafe import _ledger
        emit(opened=_ledger.sqlite_used())
        forksafe.unobserve()
        assert not hasattr(sqlite3.connect, "__wrapped__")
    """, tmp_path)
    assert s.returncode == 0, s.stderr
    assert s.result["opened"] is True


def test_connection_origins_stay_bounded(tmp_path: pathlib.Path) -> None:
    """Connections opened forever: a bounded table that keeps the live connections' origins."""
    s = run_scenario("""
        import forksafe, sqlite3, sys
        from forksafe import _ledger
        _ledger.MAX_CONNECTIONS = 64  # the real bound (4096) works alike, only slower to fill
        forksafe.observe()  # which reads the bound
        main = sqlite3.connect(":memory:")  # long-lived, like an app's main connection
        keep = [sqlite3.connect(":memory:") for _ in range(10)]
        closed, sizes = [], []
        for _ in range(300):
            conn = sqlite3.connect(":memory:")
            conn.close()
            closed.append(conn)  # kept, so every one has an address of its own
            sizes.append(len(_ledger._connection_origins))
        emit(size=max(sizes), grew=len(set(map(id, closed))),
             main=_ledger.connection_origin(main) is not None,
             kept=sum(_ledger.connection_origin(c) is not None for c in keep),
             validated=sys.version_info >= (3, 11))
    """, tmp_path)
    assert s.result["grew"] == 300
    assert s.result["size"] <= 64
    if s.result["validated"]:  # closed connections are dropped first: live origins stay
        assert (s.result["main"], s.result["kept"]) == (True, 10)


REUSED_ADDRESS = """
    import gc, sqlite3, sys, forksafe
    from forksafe import _ledger
    forksafe.observe()

    class Mine(sqlite3.Connection):
        pass

    def reused(kind):
        # Open one through the observed connect, free it, then make connections around
        # the wrapper until one lands at the freed address (the allocator reuses it).
        kwargs = {{}} if kind is sqlite3.Connection else {{"factory": kind}}
        first = sqlite3.connect(":memory:", **kwargs)  # OBSERVED
        address = id(first)
        recorded = _ledger.connection_origin(first) is not None
        first.close()
        del first
        gc.collect()
        keep = []
        for _ in range(200):
            other = kind(":memory:")  # not through sqlite3.connect: no origin of its own
            if id(other) == address:
                return [recorded, True, _ledger.connection_origin(other) is not None]
            keep.append(other)
        return [recorded, False, None]

    still = sqlite3.connect(":memory:")
    gc.collect()
    emit(plain=reused(sqlite3.Connection), subclass=reused(Mine),
         alive=_ledger.connection_origin(still) is not None, version=sys.version_info[:2])
"""


def test_a_reused_address_does_not_inherit_a_dead_connections_origin(
    tmp_path: pathlib.Path,
) -> None:
    """A connection made around the wrapper at a freed one's address gets no origin."""
    s = run_scenario(REUSED_ADDRESS.format(), tmp_path, timeout=30)
    assert s.result["alive"] is True  # a live connection keeps its origin through gc
    assert s.result["subclass"] == [True, True, False]
    if tuple(s.result["version"]) >= (3, 11):  # plain connections are validated from 3.11
        assert s.result["plain"] == [True, True, False]


def test_a_check_forgets_connections_it_finds_gone(tmp_path: pathlib.Path) -> None:
    """Opened and freed before any check looked: the next check drops the entry.

    So no connection made around the wrapper at that address afterwards can
    be given its origin, on every Python, including those where no liveness
    token can be made (3.9, 3.10); a live connection keeps its origin.
    """
    s = run_scenario("""
        import gc, sqlite3, forksafe
        from forksafe import _ledger
        forksafe.observe()
        kept = sqlite3.connect(":memory:")
        first = sqlite3.connect(":memory:")
        gone = id(first)
        first.close()
        del first
        gc.collect()
        table = _ledger._connection_origins
        before = [gone in table, id(kept) in table]
        report = forksafe.check()
        after = [gone in table, id(kept) in table]
        wheres = [h.summary for h in report.hazards if h.kind == "sqlite-connection"]
        emit(before=before, after=after, wheres=wheres, used=_ledger.sqlite_used())
    """, tmp_path, timeout=30)
    assert s.returncode == 0, s.stderr
    assert s.result["before"] == [True, True]
    assert s.result["after"] == [False, True]
    assert len(s.result["wheres"]) == 1
    assert "opened at scenario.py:" in s.result["wheres"][0]
    assert s.result["used"] is True


def test_another_librarys_wrapper_of_connect_is_never_removed(tmp_path: pathlib.Path) -> None:
    """A wrapper put over ours (as OpenTelemetry does) survives unobserve and unprotect."""
    s = run_scenario("""
        import sqlite3, forksafe
        from forksafe import _ledger
        original = sqlite3.connect
        forksafe.protect_sqlite()
        forksafe.observe()
        ours = sqlite3.connect
        calls = []
        def instrumented(*args, **kwargs):
            calls.append(args[0])
            return ours(*args, **kwargs)
        sqlite3.connect = instrumented
        forksafe.unobserve()
        forksafe.unprotect_sqlite()
        kept = sqlite3.connect is instrumented
        conn = sqlite3.connect("x.db")
        forksafe.observe()  # a new chain starts from what is bound now
        again = sqlite3.connect("y.db")
        origin = _ledger.connection_origin(again) is not None
        forksafe.unobserve()
        emit(kept=kept, calls=calls, works=conn.execute("select 1").fetchone()[0],
             origin=origin, restored=sqlite3.connect is instrumented)
    """, tmp_path)
    assert s.result == {**s.result, "kept": True, "calls": ["x.db", "y.db"], "works": 1,
                        "origin": True, "restored": True}


def test_another_librarys_wrapper_of_thread_start_is_never_removed(
    tmp_path: pathlib.Path,
) -> None:
    """A Thread.start wrapper put over ours (as Sentry does) survives unobserve; ours idles."""
    s = run_scenario("""
        import threading, forksafe
        from forksafe import _ledger
        forksafe.observe()
        ours = threading.Thread.start
        starts = []
        def sentry_start(self, *args, **kwargs):
            starts.append(self.name)
            return ours(self, *args, **kwargs)
        threading.Thread.start = sentry_start
        forksafe.unobserve()
        t = threading.Thread(target=int, name="after")
        t.start(); t.join()
        emit(kept=threading.Thread.start is sentry_start, starts=starts,
             recorded=_ledger.thread_origin(t) is not None)
    """, tmp_path)
    assert s.result == {**s.result, "kept": True, "starts": ["after"], "recorded": False}


def test_sqlite3_imported_while_observing_keeps_its_own_loader(tmp_path: pathlib.Path) -> None:
    """Only connect changes: the module's loader, resources and reload() are as without us."""
    s = run_scenario("""
        import importlib, importlib.resources, forksafe
        forksafe.observe()
        import sqlite3
        loaders = [type(sqlite3.__loader__).__name__, type(sqlite3.__spec__.loader).__name__]
        files = type(importlib.resources.files("sqlite3")).__name__
        importlib.reload(sqlite3)
        emit(loaders=loaders, files=files, wrapped=hasattr(sqlite3.connect, "__wrapped__"))
    """, tmp_path)
    assert s.result["loaders"] == ["SourceFileLoader", "SourceFileLoader"]
    assert s.result["files"] == "PosixPath"
    assert s.result["wrapped"] is True


def test_the_c_recorder_is_built_here_and_records_what_the_python_wrapper_does(
    tmp_path: pathlib.Path,
) -> None:
    """The test install compiles forksafe._speedups; with it and without it (the Python
    wrapper), connections get the same origins, from the first file and the next ones,
    and a connect that fails records nothing."""
    import shutil
    import sysconfig

    import pytest

    compiler = (sysconfig.get_config_var("CC") or "").split()[:1]
    if not compiler or shutil.which(compiler[0]) is None:
        pytest.skip(f"no C compiler ({compiler}): the Python wrapper is the only one")
    results = {}
    for speedups in (True, False):
        s = run_scenario(f"""
            import sqlite3, forksafe
            from forksafe import _ledger
            _ledger.SPEEDUPS = {speedups}
            forksafe.observe()
            def open_two():
                first = sqlite3.connect(":memory:")  # FIRST
                second = sqlite3.connect(":memory:", timeout=1.0)  # SECOND
                return first, second
            first, second = open_two()
            try:
                sqlite3.connect(":memory:", no_such_argument=1)
                failed = False
            except TypeError:
                failed = True
            lines = [[(site.line, site.function) for site in _ledger.sites(
                _ledger.connection_origin(c))] for c in (first, second)]
            emit(kind=type(sqlite3.connect).__name__, lines=lines, failed=failed,
                 entries=len(_ledger._connection_origins),
                 wrapped=sqlite3.connect.__wrapped__ is _ledger._chain["original"])
        """, tmp_path)
        results[speedups] = s.result
        expected = [[[s.line_of("FIRST"), "open_two"]], [[s.line_of("SECOND"), "open_two"]]]
        assert s.result["lines"] == expected
        assert s.result["failed"] and s.result["entries"] == 2 and s.result["wrapped"]
    assert results[True]["kind"] == "Recorder"
    assert results[False]["kind"] == "function"
