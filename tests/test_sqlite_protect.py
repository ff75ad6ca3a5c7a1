"""protect_sqlite(): a connection inherited across fork refuses to be used in the child."""

from __future__ import annotations

import pathlib

import pytest

from conftest import run_scenario
from forksafe._remedies.sqlite import CONNECTION_INHERITED


def test_inherited_connection_refuses_every_use_in_the_child(tmp_path: pathlib.Path) -> None:
    """Connection and pre-fork cursor uses raise ForkSafetyError naming pid and site."""
    s = run_scenario("""
        import os, sqlite3, json, forksafe
        forksafe.protect_sqlite()
        conn = sqlite3.connect("app.db")  # OPEN
        conn.execute("create table t(x)")
        conn.commit()
        cur = conn.cursor()
        cur.execute("select 1 union all select 2")
        shortcut = conn.execute("select 3")  # a cursor made by the execute() shortcut
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            results = {}
            uses = {
                "execute": lambda: conn.execute("insert into t values (1)"),
                "cursor": lambda: conn.cursor(),
                "commit": lambda: conn.commit(),
                "rollback": lambda: conn.rollback(),
                "executescript": lambda: conn.executescript("select 1;"),
                "with": lambda: conn.__enter__(),
                "isolation_level": lambda: setattr(conn, "isolation_level", None),
                "cursor.execute": lambda: cur.execute("select 1 union all select 2"),
                "cursor.fetchone": lambda: cur.fetchone(),
                "cursor.iter": lambda: next(iter(cur)),
                "shortcut.execute": lambda: shortcut.execute("select 3"),
                "shortcut.loop": lambda: [row for row in shortcut],
                "call": lambda: conn("select 5"),
            }
            for name, use in uses.items():
                try:
                    use()
                    results[name] = "allowed"
                except forksafe.ForkSafetyError as exc:
                    results[name] = str(exc)
            own = sqlite3.connect("app.db")
            try:
                own.backup(conn)  # the inherited one as the target of a child's backup
                results["backup-target"] = "allowed"
            except forksafe.ForkSafetyError as exc:
                results["backup-target"] = str(exc)
            own.execute("insert into t values (42)")
            own.commit()
            results["own"] = own.execute("select x from t").fetchall()
            own.close()
            os.write(w, json.dumps(results).encode())
            os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            child = json.loads(f.read())
        os.waitpid(pid, 0)
        conn.execute("insert into t values (7)")
        conn.commit()
        emit(child=child, parent_pid=os.getpid(), fetched=cur.fetchall(),
             rows=conn.execute("select x from t order by x").fetchall(),
             ok=conn.execute("pragma integrity_check").fetchone()[0])
    """, tmp_path, timeout=30)
    expected = CONNECTION_INHERITED.format(pid=s.result["parent_pid"],
                                           site=f"scenario.py:{s.line_of('OPEN')}")
    child = s.result["child"]
    assert child.pop("own") == [[42]]
    assert child == dict.fromkeys(child, expected)
    assert len(child) == 14
    # The parent's own use goes on undisturbed, its cursor included.
    assert s.result["fetched"] == [[1], [2]]
    assert s.result["rows"] == [[7], [42]]
    assert s.result["ok"] == "ok"


CLOSE_IN_CHILD = """
    import gc, os, sys, sqlite3
    if {protect}:
        import forksafe
        forksafe.protect_sqlite()
    conn = sqlite3.connect("big.db")
    conn.execute("pragma cache_size=5")  # small cache: the transaction spills into the file
    conn.execute("create table t(x)")
    conn.commit()
    for i in range(2000):
        conn.execute("insert into t values (?)", ("row %d " % i * 30,))
    pid = os.fork()
    if pid == 0:
        {child}
        sys.exit(0)  # a normal exit: interpreter shutdown frees what is left
    os.waitpid(pid, 0)
    try:
        conn.commit()
        committed = True
    except sqlite3.Error:
        committed = False
    check = sqlite3.connect("big.db")
    try:
        verdict = check.execute("pragma integrity_check").fetchone()[0]
        rows = check.execute("select count(*) from t").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        verdict, rows = str(exc), None
    emit(committed=committed, verdict=verdict, rows=rows)
"""


@pytest.mark.parametrize("child", ["conn.close()", "del conn; gc.collect()", "pass"])
def test_child_letting_go_mid_transaction_leaves_the_database_intact(
    tmp_path: pathlib.Path, child: str
) -> None:
    """Closing, freeing or just exiting in the child never rolls back the parent's work."""
    s = run_scenario(CLOSE_IN_CHILD.format(protect=True, child=child), tmp_path, timeout=30)
    assert s.result == {**s.result, "committed": True, "verdict": "ok", "rows": 2000}


def test_without_protection_the_same_child_corrupts_the_database(
    tmp_path: pathlib.Path,
) -> None:
    """The twin: unprotected, the child's close() rolls the parent's journal back."""
    s = run_scenario(CLOSE_IN_CHILD.format(protect=False, child="conn.close()"), tmp_path,
                     timeout=30)
    assert (s.result["committed"], s.result["verdict"]) != (True, "ok")


def test_concurrent_parent_and_child_writers_keep_the_database_intact(
    tmp_path: pathlib.Path,
) -> None:
    """Children refused the inherited connection write through their own, alongside the parent."""
    s = run_scenario("""
        import os, sqlite3, forksafe
        forksafe.protect_sqlite()
        conn = sqlite3.connect("shared.db", timeout=20)
        conn.execute("create table t(who, n)")
        conn.commit()
        conn.execute("insert into t values ('parent', -1)")
        conn.commit()  # see docs/remedies.md: a child cannot write while this is open
        children = []
        for c in range(2):
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    conn.execute("insert into t values ('inherited', 0)")
                    code = 3
                except forksafe.ForkSafetyError:
                    pass
                conn.close()  # detaches: SQLite's close does not run in the child
                own = sqlite3.connect("shared.db", timeout=20)
                for n in range(100):
                    with own:
                        own.execute("insert into t values (?, ?)", ("child%d" % c, n))
                own.close()
                os._exit(code)
            children.append(pid)
        for n in range(100):
            with conn:
                conn.execute("insert into t values ('parent', ?)", (n,))
        codes = [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1])
                 if hasattr(os, "waitstatus_to_exitcode") else os.waitpid(p, 0)[1] >> 8
                 for p in children]
        counts = dict(conn.execute("select who, count(*) from t group by who"))
        emit(codes=codes, counts=counts,
             ok=conn.execute("pragma integrity_check").fetchone()[0])
    """, tmp_path, timeout=60)
    assert s.result["codes"] == [0, 0]
    assert s.result["counts"] == {"parent": 101, "child0": 100, "child1": 100}
    assert s.result["ok"] == "ok"


def test_detached_connection_is_not_reported_again_in_the_child(
    tmp_path: pathlib.Path,
) -> None:
    """After close() in the child, check() there no longer sees an open connection."""
    s = run_scenario("""
        import os, sqlite3, json, forksafe
        forksafe.protect_sqlite()
        conn = sqlite3.connect("protected1.db")
        before = len(forksafe.check().at_least(forksafe.Severity.WARNING))
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            conn.close()
            kinds = [h.kind for h in forksafe.check().hazards]
            os.write(w, json.dumps(kinds).encode())
            os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            kinds = json.loads(f.read())
        os.waitpid(pid, 0)
        emit(before=before, child_kinds=kinds)
    """, tmp_path, timeout=30)
    assert s.result["before"] == 1
    assert "sqlite-connection" not in s.result["child_kinds"]


def test_authorizer_refuses_statements_when_no_fork_hook_ran(tmp_path: pathlib.Path) -> None:
    """A child whose fork ran no Python hooks is still stopped at prepare time by SQLite."""
    s = run_scenario("""
        import os, sqlite3, json
        import forksafe
        from forksafe._remedies import sqlite as protection
        forksafe.protect_sqlite()
        conn = sqlite3.connect("raw.db")
        seen = []
        conn.set_authorizer(lambda *a: seen.append(a[0]) or sqlite3.SQLITE_OK)
        conn.execute("create table t(x)")
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            protection._current[0] = os.getppid()  # as after a C-level fork()
            try:
                conn.execute("insert into t values (1)")
                result = "allowed"
            except sqlite3.DatabaseError as exc:
                result = str(exc)
            os.write(w, result.encode())
            os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            child = f.read()
        os.waitpid(pid, 0)
        conn.execute("insert into t values (2)")
        emit(child=child, user_authorizer_ran=bool(seen),
             rows=conn.execute("select x from t").fetchall())
    """, tmp_path, timeout=30)
    assert s.result["child"] == "not authorized"
    assert s.result["user_authorizer_ran"] is True
    assert s.result["rows"] == [[2]]


def test_factories_are_kept_and_protected(tmp_path: pathlib.Path) -> None:
    """A program's own Connection and Cursor subclasses still come back, protected."""
    s = run_scenario("""
        import os, sqlite3, forksafe
        class MyConnection(sqlite3.Connection):
            mine = True
        class MyCursor(sqlite3.Cursor):
            mine = True
        forksafe.protect_sqlite()
        conn = sqlite3.connect("protected2.db", factory=MyConnection)
        positional = sqlite3.connect("protected3.db", 5.0, 0, "", True, MyConnection)
        cur = conn.cursor(factory=MyCursor)
        pid = os.fork()
        if pid == 0:
            code = 0
            for use in (lambda: cur.execute("select 1"), lambda: positional.execute("select 1")):
                try:
                    use()
                    code = 1
                except forksafe.ForkSafetyError:
                    pass
            os._exit(code)
        status = os.waitpid(pid, 0)[1]
        emit(conn=isinstance(conn, MyConnection), positional=isinstance(positional, MyConnection),
             cur=isinstance(cur, MyCursor), status=status,
             works=cur.execute("select 3").fetchone()[0])
    """, tmp_path, timeout=30)
    assert s.result == {**s.result, "conn": True, "positional": True, "cur": True,
                        "status": 0, "works": 3}


def test_protect_and_observe_compose_in_either_order(tmp_path: pathlib.Path) -> None:
    """Both wrappers stack in any order and unwrap to the original connect by identity."""
    s = run_scenario("""
        import sys, forksafe
        from forksafe import _ledger
        forksafe.protect_sqlite()
        imported_early = "sqlite3" in sys.modules
        import sqlite3
        original = sqlite3.connect.__wrapped__
        alive = []  # the ledger keys origins by id(): keep ids from being reused
        def state():
            conn = sqlite3.connect("protected4.db")
            alive.append(conn)
            return [hasattr(type(conn), "_forksafe_protected"),
                    _ledger.connection_origin(conn) is not None]
        steps = [state()]
        forksafe.observe();      steps.append(state())
        forksafe.unprotect_sqlite(); steps.append(state())
        forksafe.protect_sqlite();   steps.append(state())
        forksafe.unobserve();    steps.append(state())
        forksafe.unprotect_sqlite()
        emit(imported_early=imported_early, steps=steps,
             restored=sqlite3.connect is original and sqlite3.dbapi2.connect is original)
    """, tmp_path, timeout=30)
    assert s.result["imported_early"] is False
    assert s.result["steps"] == [[True, False], [True, True], [False, True], [True, True],
                                 [True, False]]
    assert s.result["restored"] is True


def test_protect_imports_neither_sqlite3_nor_threading(tmp_path: pathlib.Path) -> None:
    """Turning protection on loads nothing the program did not import (the guard relies on it)."""
    s = run_scenario("""
        import sys, forksafe
        import sysconfig  # forksafe needs it; on 3.13 it imports threading itself
        before = {"sqlite3", "threading"} & set(sys.modules)
        forksafe.protect_sqlite()
        after = {"sqlite3", "threading"} & set(sys.modules)
        forksafe.unprotect_sqlite()
        print("FORKSAFE-RESULT:" + __import__("json").dumps(
            {"before": sorted(before), "after": sorted(after), "meta_path_restored":
             not any("forksafe" in type(f).__module__ for f in sys.meta_path)}))
    """, tmp_path, timeout=30)
    assert s.result["after"] == s.result["before"]
    assert "sqlite3" not in s.result["after"]
    assert s.result["meta_path_restored"] is True


TRANSPARENCY = """
    import sqlite3, sys, threading, forksafe
    if {protect}:
        forksafe.protect_sqlite()
    seen = {{}}
    log = []

    class Logging(sqlite3.Connection):
        def execute(self, sql, *args):
            log.append(sql)
            return super().execute(sql, *args)
        def cursor(self):  # takes no factory, as many programs' overrides do
            return super().cursor(Rows)
        @staticmethod
        def double(x):
            return 2 * x
        @classmethod
        def kind(cls):
            return cls.__name__
        helper = staticmethod(len)

    class Rows(sqlite3.Cursor):
        pass

    mine = sqlite3.connect("protected5.db", factory=Logging)
    seen["override"] = [mine.execute("select 1").fetchone()[0], log,
                        type(mine.cursor()).__name__, mine.double(4), mine.kind(),
                        mine.helper("abc"), isinstance(mine, Logging)]
    from unittest import mock

    class Patched(sqlite3.Connection):
        pass

    patched = sqlite3.connect("protected6.db", factory=Patched)
    with mock.patch.object(Patched, "commit", return_value="mocked") as commit, \
            mock.patch.object(Patched, "execute", return_value="mocked too"):
        seen["mock"] = [patched.commit(), patched.execute("select 1"), commit.call_count]
    seen["mock"].append(patched.execute("select 2").fetchone()[0])  # unpatched again
    conn = sqlite3.connect("protected7.db")
    seen["repr"] = [repr(conn).split(" at ")[0], repr(conn.cursor()).split(" at ")[0],
                    isinstance(conn, sqlite3.Connection), type(conn).__name__]
    with conn:
        conn.execute("create table t(a, b)")
        conn.executemany("insert into t values (?, ?)", [(1, "x"), (2, "y")])
    try:
        with conn:
            conn.execute("insert into t values (3, 'z')")
            raise KeyError("roll back")
    except KeyError:
        pass
    conn.row_factory = sqlite3.Row
    row = conn.execute("select a, b from t where a = 2").fetchone()
    seen["row"] = [row["b"], list(row.keys()), conn.execute("select count(*) from t").fetchone()[0]]
    conn.row_factory = None
    seen["dump"] = list(conn.iterdump())
    target = sqlite3.connect("protected8.db")
    conn.backup(target)
    seen["backup"] = target.execute("select a from t order by a").fetchall()
    conn.create_function("twice", 1, lambda v: 2 * v)
    seen["function"] = conn.execute("select twice(a) from t order by a").fetchall()
    uri = sqlite3.connect("file:mem1?mode=memory&cache=shared", uri=True,
                          check_same_thread=False)
    out = []
    worker = threading.Thread(target=lambda: out.append(uri.execute("select 7").fetchone()))
    worker.start(); worker.join()
    seen["uri-thread"] = out
    try:
        sqlite3.connect("protected9.db").cursor().execute("select 1").connection.cursor().execute(
            "no such statement")
    except sqlite3.OperationalError as exc:
        seen["error"] = str(exc)
    guarded = sqlite3.connect("protected10.db")
    guarded.execute("create table d(x, secret)")
    guarded.execute("insert into d values (1, 'hidden')")
    def policy(action, arg1, arg2, database, trigger):
        if action == sqlite3.SQLITE_DROP_TABLE:
            raise RuntimeError("no drops")  # an authorizer that raises denies the statement
        if action == sqlite3.SQLITE_READ and arg2 == "secret":
            return sqlite3.SQLITE_IGNORE  # reads as NULL
        return sqlite3.SQLITE_OK
    guarded.set_authorizer(policy)
    seen["authorizer"] = [guarded.execute("select x, secret from d").fetchall()]
    try:
        guarded.execute("drop table d")
    except sqlite3.DatabaseError as exc:
        seen["authorizer"].append([type(exc).__name__, str(exc)])
    guarded.set_authorizer(None)  # removes it from 3.11; before, denies everything
    try:
        guarded.execute("drop table d")
        seen["authorizer"].append("dropped once allowed")
    except sqlite3.DatabaseError as exc:
        seen["authorizer"].append(str(exc))
    if sys.version_info >= (3, 12):
        auto = sqlite3.connect("protected11.db", autocommit=False)
        seen["autocommit"] = [auto.autocommit, auto.in_transaction]
        auto.autocommit = True
        seen["autocommit"].append(auto.in_transaction)
    conn.close()
    try:
        conn.execute("select 1")
    except sqlite3.ProgrammingError as exc:
        seen["closed"] = str(exc)
    emit(seen=seen)
"""


def test_protection_changes_nothing_for_a_program_that_does_not_fork(
    tmp_path: pathlib.Path,
) -> None:
    """Factories with overrides, static methods, rows, dumps, backup, uri: as unprotected."""
    (tmp_path / "plain").mkdir()
    (tmp_path / "protected").mkdir()  # each its own database files
    plain = run_scenario(TRANSPARENCY.format(protect=False), tmp_path / "plain", timeout=30)
    protected = run_scenario(TRANSPARENCY.format(protect=True), tmp_path / "protected",
                             timeout=30)
    assert plain.returncode == 0, plain.stderr
    assert protected.returncode == 0, protected.stderr
    assert protected.result["seen"] == plain.result["seen"]
    assert plain.result["seen"]["override"] == [1, ["select 1"], "Rows", 8, "Logging", 3, True]
    assert plain.result["seen"]["repr"][0] == "<sqlite3.Connection object"
    assert plain.result["seen"]["mock"] == ["mocked", "mocked too", 1, 2]
    assert plain.result["seen"]["authorizer"][:2] == [
        [[1, None]], ["DatabaseError", "not authorized"]]


def test_factory_overriding_execute_is_still_refused_in_the_child(
    tmp_path: pathlib.Path,
) -> None:
    """A factory's own execute()/cursor() run in the parent, and are refused in the child."""
    s = run_scenario("""
        import os, sqlite3, json, forksafe
        forksafe.protect_sqlite()
        class Logging(sqlite3.Connection):
            def execute(self, sql, *args):
                return super().execute(sql, *args)
            def cursor(self):
                return super().cursor()
        conn = sqlite3.connect("app.db", factory=Logging)
        conn.execute("create table t(x)")
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            results = {}
            from unittest import mock
            patched = mock.patch.object(Logging, "commit")
            for name, use in (("execute", lambda: conn.execute("insert into t values (1)")),
                              ("cursor", lambda: conn.cursor()),
                              ("patched", lambda: patched.start() and conn.commit())):
                try:
                    use()
                    results[name] = "allowed"
                except forksafe.ForkSafetyError:
                    results[name] = "refused"
            os.write(w, json.dumps(results).encode())
            os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            child = json.loads(f.read())
        os.waitpid(pid, 0)
        emit(child=child, rows=conn.execute("select count(*) from t").fetchone()[0])
    """, tmp_path, timeout=30)
    assert s.result["child"] == {"execute": "refused", "cursor": "refused",
                                 "patched": "refused"}
    assert s.result["rows"] == 0


GUARDED = """
    import json, os, sqlite3, warnings, forksafe
    warnings.simplefilter("ignore")  # the guard's own warning about the fork is not the point
    forksafe.install(policy={policy!r})
    conn = sqlite3.connect("guarded.db")
    conn.execute("create table if not exists t(x)")
    conn.commit()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            conn.execute("select count(*) from t").fetchone()
            result = "allowed"
        except forksafe.ForkSafetyError:
            result = "refused"
        os.write(w, result.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        child = f.read()
    os.waitpid(pid, 0)
    forksafe.uninstall()
    emit(child=child, protected_after_uninstall=hasattr(sqlite3.connect, "__wrapped__"))
"""


@pytest.mark.parametrize(("policy", "child"), [("raise", "refused"), ("warn", "allowed")])
def test_guard_with_policy_raise_turns_protection_on(
    tmp_path: pathlib.Path, policy: str, child: str
) -> None:
    """install(policy="raise") protects connections (and uninstall() undoes it); "warn" does not."""
    s = run_scenario(GUARDED.format(policy=policy), tmp_path, timeout=30)
    assert s.result["child"] == child
    assert s.result["protected_after_uninstall"] is False


def test_memory_stays_flat_over_many_protected_connections(tmp_path: pathlib.Path) -> None:
    """Protection and observation together keep nothing per closed connection."""
    s = run_scenario("""
        import gc, sqlite3, tracemalloc, forksafe
        forksafe.observe()
        forksafe.protect_sqlite()

        def churn(n):
            for i in range(n):
                conn = sqlite3.connect("protected12.db")
                conn.execute("select ?", (i,)).fetchone()
                with conn:
                    conn.cursor().execute("select 1").fetchall()
                conn.close()
            gc.collect()

        churn(500)  # warm up: classes, caches, interned code
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        churn(5000)
        after = tracemalloc.get_traced_memory()[0]
        emit(growth=after - before)
    """, tmp_path, timeout=60)
    assert s.result["growth"] < 100_000, s.result["growth"]  # 5000 x 20 bytes would show


def test_sqlite3_taken_out_of_sys_modules_still_connects(tmp_path: pathlib.Path) -> None:
    """A harness that removes sqlite3 from sys.modules does not break connect()."""
    s = run_scenario("""
        import sys, sqlite3, forksafe
        forksafe.protect_sqlite()
        connect = sqlite3.connect
        del sys.modules["sqlite3"]
        emit(answer=connect("protected13.db").execute("select 42").fetchone()[0])
    """, tmp_path, timeout=30)
    assert s.result["answer"] == 42


def test_factory_that_refuses_subclasses_connects_unprotected(tmp_path: pathlib.Path) -> None:
    """A factory class whose __init_subclass__ refuses subclasses still connects, as before."""
    s = run_scenario("""
        import sqlite3, forksafe
        class Sealed(sqlite3.Connection):
            def __init_subclass__(cls, **kwargs):
                raise TypeError("Sealed cannot be subclassed")
        class SealedCursor(sqlite3.Cursor):
            def __init_subclass__(cls, **kwargs):
                raise TypeError("SealedCursor cannot be subclassed")
        forksafe.protect_sqlite()
        conn = sqlite3.connect("protected14.db", factory=Sealed)
        cur = sqlite3.connect("protected15.db").cursor(SealedCursor)
        emit(kind=type(conn).__name__, answer=conn.execute("select 5").fetchone()[0],
             cursor=type(cur).__name__, fetched=cur.execute("select 6").fetchone()[0])
    """, tmp_path, timeout=30)
    assert s.result == {**s.result, "kind": "Sealed", "answer": 5, "cursor": "SealedCursor",
                        "fetched": 6}


def test_a_factory_class_per_connection_does_not_grow_memory(tmp_path: pathlib.Path) -> None:
    """Programs that make a factory class per connection keep a bounded class cache."""
    s = run_scenario("""
        import gc, sqlite3, forksafe
        from forksafe._remedies import sqlite as protection
        forksafe.protect_sqlite()
        for i in range(300):
            kind = type("PerConnection%d" % i, (sqlite3.Connection,), {})
            cursor = type("PerCursor%d" % i, (sqlite3.Cursor,), {})
            conn = sqlite3.connect("protected16.db", factory=kind)
            conn.cursor(cursor).execute("select 1")
            conn.close()
            del conn, kind, cursor
        gc.collect()
        alive = sum(1 for obj in gc.get_objects()
                    if isinstance(obj, type) and obj.__name__.startswith("PerConnection"))
        emit(classes=len(protection._classes), cursors=len(protection._cursor_classes),
             alive=alive, limit=protection._MAX_CLASSES)
    """, tmp_path, timeout=30)
    assert s.result["classes"] <= s.result["limit"]
    assert s.result["cursors"] <= s.result["limit"]
    assert s.result["alive"] <= 2 * s.result["limit"]  # the rest were freed with their users


def test_protection_turned_on_in_a_forked_worker_knows_its_own_pid(
    tmp_path: pathlib.Path,
) -> None:
    """Imported in the parent, turned on in the worker (a post_fork hook): queries still work."""
    s = run_scenario("""
        import json, os, sqlite3
        from forksafe import protect_sqlite  # imports the module in the parent, hook-less
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            protect_sqlite()  # as in gunicorn's post_fork or Celery's worker_process_init
            conn = sqlite3.connect("worker.db")
            try:
                conn.execute("create table t(x)")
                result = "works"
            except sqlite3.DatabaseError as exc:
                result = str(exc)
            os.write(w, result.encode())
            os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            child = f.read()
        os.waitpid(pid, 0)
        emit(child=child)
    """, tmp_path, timeout=30)
    assert s.result["child"] == "works"


def test_child_of_a_hookless_fork_can_open_its_own_connections(tmp_path: pathlib.Path) -> None:
    """After a fork that ran no Python hooks, the child's new connections work; old ones refuse."""
    s = run_scenario("""
        import json, os, sqlite3, forksafe
        from forksafe._remedies import sqlite as protection
        forksafe.protect_sqlite()
        inherited = sqlite3.connect("raw.db")
        inherited.execute("create table t(x)")
        inherited.commit()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            protection._current[0] = os.getppid()  # as after a C-level fork()
            results = {}
            own = sqlite3.connect("raw.db")
            try:
                own.execute("insert into t values (1)")
                own.commit()
                results["own"] = "works"
            except sqlite3.DatabaseError as exc:
                results["own"] = str(exc)
            try:
                inherited.execute("select 1")
                results["inherited"] = "allowed"
            except forksafe.ForkSafetyError:
                results["inherited"] = "refused"
            os.write(w, json.dumps(results).encode())
            os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            child = json.loads(f.read())
        os.waitpid(pid, 0)
        emit(child=child, rows=inherited.execute("select count(*) from t").fetchone()[0])
    """, tmp_path, timeout=30)
    assert s.result["child"] == {"own": "works", "inherited": "refused"}
    assert s.result["rows"] == 1


def test_in_memory_databases_are_usable_in_the_child(tmp_path: pathlib.Path) -> None:
    """Protection leaves in-memory databases alone: after the fork each process has its
    own copy (Django's parallel test workers use the parent's in-memory test database);
    a file database opened alongside is still refused."""
    s = run_scenario("""
        import os, sqlite3, json, forksafe
        forksafe.protect_sqlite()
        memory = sqlite3.connect(":memory:")
        shared = sqlite3.connect("file:memorydb_default?mode=memory&cache=shared", uri=True)
        disk = sqlite3.connect("disk.db")
        for conn in (memory, shared, disk):
            conn.execute("create table t(x)")
            conn.execute("insert into t values (1)")
            conn.commit()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            out = {}
            for name, conn in (("memory", memory), ("shared", shared), ("disk", disk)):
                try:
                    conn.execute("insert into t values (2)")
                    out[name] = conn.execute("select count(*) from t").fetchone()[0]
                except forksafe.ForkSafetyError:
                    out[name] = "refused"
            os.write(w, json.dumps(out).encode())
            os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            child = json.loads(f.read())
        os.waitpid(pid, 0)
        emit(child=child, parent=memory.execute("select count(*) from t").fetchone()[0])
    """, tmp_path, timeout=30)
    assert s.result["child"] == {"memory": 2, "shared": 2, "disk": "refused"}
    assert s.result["parent"] == 1, "the child's copy is its own"

