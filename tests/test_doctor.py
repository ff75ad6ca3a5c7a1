"""forksafe doctor: a verdict per line, a fix per problem, nothing imported or leaked."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import warnings
from typing import Any

import pytest

from conftest import ROOT, run_scenario
from forksafe import _doctor
from forksafe._doctor import (
    ENV_GRPC_FIX,
    ENV_GRPC_OFF,
    ENV_NO_PROXY_MAC_FIX,
    ENV_NO_PROXY_MAC_UNSET,
    ENV_OBJC_FIX,
    ENV_OBJC_OTHER,
    ENV_OBJC_SET,
    ENV_POLL_FIX,
    ENV_POLL_MISSING,
    GC_FIX,
    NOTE,
    OK,
    PROBLEM,
    RUNTIMES_NONE,
    SCHEMA,
    SQLITE_APPLE,
    SQLITE_APPLE_FIX,
    SQLITE_MISSING,
    START_FORK,
    START_FORK_FIX,
    START_FORK_MACOS_FIX,
    WARN_ERROR,
    WARN_FIX,
    WARN_OLD,
    WARN_PARTLY,
    WARN_VISIBLE,
    Distribution,
    doctor_with,
    expected_default,
    fork_warning_line,
    sqlite_line,
)

DEFAULT_FILTERS_312 = [
    ("default", None, DeprecationWarning, "__main__", 0),
    ("ignore", None, DeprecationWarning, None, 0),
    ("ignore", None, PendingDeprecationWarning, None, 0),
]
FAKES: dict[str, Any] = {
    "sqlite": {"version": "3.45.0", "module": "/py/_sqlite3.so", "images": ["/py/_sqlite3.so"]},
    "distributions": [],
    "start_method": ("fork", None),
    "filters": DEFAULT_FILTERS_312,
    "frozen": lambda: 0,
    "environ": {},
}


def checks(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["id"]: c for c in report["checks"]}


def test_report_shape_is_the_documented_one() -> None:
    """schema, python, platform, counts and checks with id/title/verdict/summary/fix/data."""
    report = doctor_with(**FAKES)
    assert report["schema"] == SCHEMA == "forksafe-doctor/1"
    assert set(report) == {"schema", "forksafe", "python", "platform", "counts", "checks"}
    assert set(report["python"]) == {"version", "implementation", "executable"}
    for check in report["checks"]:
        assert set(check) == {"id", "title", "verdict", "summary", "fix", "data"}
        assert check["verdict"] in (OK, NOTE, PROBLEM)
        assert check["fix"] or check["verdict"] != PROBLEM, check["id"]
    counted = {v: sum(c["verdict"] == v for c in report["checks"]) for v in (OK, NOTE, PROBLEM)}
    assert report["counts"] == counted
    assert json.loads(json.dumps(report)) == report
    ids = list(checks(report))
    assert ids[:3] == ["sqlite-library", "start-method", "fork-warning"]
    assert {"env:OBJC_DISABLE_INITIALIZE_FORK_SAFETY", "env:no_proxy", "env:OMP_NUM_THREADS",
            "env:GRPC_ENABLE_FORK_SUPPORT", "env:GRPC_POLL_STRATEGY", "runtimes",
            "gc-freeze"} <= set(ids)


#: The documented (docs/remedies.md) keys of each check's data: pinned for forksafe-doctor/1.
DATA_KEYS = {
    "sqlite-library": {"version", "module", "library", "bundled", "kind"},
    "start-method": {"default", "set_by_program", "effective", "default_in_3_14"},
    "fork-warning": {"emitted", "action_in_main", "action_in_libraries"},
    "env:OBJC_DISABLE_INITIALIZE_FORK_SAFETY": {"set"},
    "env:no_proxy": {"set", "no_proxy", "NO_PROXY", "proxy_variables"},
    "env:OMP_NUM_THREADS": {"set"},
    "env:GRPC_ENABLE_FORK_SUPPORT": {"set", "enabled"},
    "env:GRPC_POLL_STRATEGY": {"set"},
    "runtime:": {"distribution", "imports", "runtime", "severity_when_active", "files"},
    "runtimes": set(),
    "gc-freeze": {"frozen"},
}


@pytest.mark.parametrize("variant", [
    {},
    {"sqlite": {"missing": True}, "version": (3, 11), "platform": "darwin"},
    {"sqlite": {"error": "exit status 1"}, "version": (3, 13),
     "environ": {"OBJC_DISABLE_INITIALIZE_FORK_SAFETY": "YES", "GRPC_ENABLE_FORK_SUPPORT": "1",
                  "https_proxy": "http://p:1"},
     "distributions": [Distribution("grpcio", ("grpc",), ("grpc/_cython/cygrpc.so",))]},
    {"sqlite": None, "distributions": None, "start_method": None, "filters": None,
     "frozen": None, "environ": None},
], ids=["fakes", "old-python-no-sqlite", "problems", "this-machine"])
def test_json_keys_are_pinned(variant: dict[str, Any]) -> None:
    """Every check's keys and data keys are exactly the documented ones, whatever is found."""
    report = doctor_with(**{**FAKES, **variant})
    assert set(report) == {"schema", "forksafe", "python", "platform", "counts", "checks"}
    assert set(report["counts"]) == {OK, NOTE, PROBLEM}
    for check in report["checks"]:
        assert set(check) == {"id", "title", "verdict", "summary", "fix", "data"}
        key = "runtime:" if check["id"].startswith("runtime:") else check["id"]
        assert set(check["data"]) == DATA_KEYS[key], check["id"]
        assert isinstance(check["summary"], str) and isinstance(check["title"], str)
        assert check["fix"] is None or isinstance(check["fix"], str)
    documented = (ROOT / "docs" / "remedies.md").read_text()
    for key, names in DATA_KEYS.items():
        assert f"`{key.rstrip(':')}" in documented, key
        for name in names:
            assert f"`{name}`" in documented, (key, name)


@pytest.mark.parametrize("args", [["--bogus"], ["extra"], ["--json=yes"]])
def test_bad_arguments_exit_2_with_one_line(args: list[str]) -> None:
    """A bad argument is one line on stderr naming it, exit 2, and no report."""
    bad = cli(*args)
    assert bad.returncode == 2
    assert bad.stdout == ""
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("forksafe") and "error" in lines[0]


def test_no_value_of_any_variable_reaches_the_output() -> None:
    """Secrets in fork-relevant and unrelated variables: neither output form shows one."""
    secrets = {"OBJC_DISABLE_INITIALIZE_FORK_SAFETY": "SECRET-1", "no_proxy": "SECRET-2",
               "HTTPS_PROXY": "http://user:SECRET-3@proxy:1", "OMP_NUM_THREADS": "SECRET-4",
               "GRPC_ENABLE_FORK_SUPPORT": "SECRET-5", "GRPC_POLL_STRATEGY": "SECRET-6",
               "FORKSAFE_TEST_TOKEN": "SECRET-7"}
    text, as_json = cli(env=secrets), cli("--json", env=secrets)
    assert (text.returncode, as_json.returncode) == (0, 0), text.stderr + as_json.stderr
    for out in (text.stdout, as_json.stdout):
        assert "SECRET" not in out
        assert "FORKSAFE_TEST_TOKEN" not in out
    by_id = checks(json.loads(as_json.stdout))
    assert all(by_id[f"env:{name}"]["data"]["set"] for name in
               ("OBJC_DISABLE_INITIALIZE_FORK_SAFETY", "OMP_NUM_THREADS",
                "GRPC_ENABLE_FORK_SUPPORT", "GRPC_POLL_STRATEGY"))
    assert {"HTTPS_PROXY", "no_proxy"} <= set(by_id["env:no_proxy"]["data"]["proxy_variables"])


def test_doctor_loads_nothing_it_reports_on(tmp_path: pathlib.Path) -> None:
    """Installed grpcio and numpy are found without importing them, sqlite3 or any library."""
    s = run_scenario("""
        import sys, multiprocessing, forksafe
        def libs():
            with open("/proc/self/maps") as f:
                return {line.split()[-1] for line in f if ".so" in line}
        modules, before = set(sys.modules), libs()
        report = forksafe.doctor()
        new_modules = sorted(set(sys.modules) - modules)
        emit(new_libs=sorted(libs() - before), new_modules=new_modules,
             method_fixed=multiprocessing.get_start_method(allow_none=True),
             ids=[c["id"] for c in report["checks"]])
    """, tmp_path, timeout=60)
    unsafe = re.compile(r"^(grpc|numpy|sqlite3|_sqlite3|scipy|sklearn|torch)(\.|$)")
    assert [m for m in s.result["new_modules"] if unsafe.match(m)] == []
    assert [p for p in s.result["new_libs"] if re.search(r"sqlite|openblas|cygrpc|gomp", p)] == []
    assert s.result["method_fixed"] is None
    assert "runtime:grpcio:grpc" in s.result["ids"]
    assert "runtime:numpy:openblas" in s.result["ids"]


def test_sqlite_on_this_machine_matches_the_module() -> None:
    """The helper reports the very SQLite version and library that sqlite3 has here."""
    import sqlite3

    info = _doctor.inspect_sqlite()
    assert info["version"] == sqlite3.sqlite_version
    line = sqlite_line(info, sys.platform)
    assert line.verdict == OK
    library = line.data["library"]
    assert library is None or os.path.exists(library)


@pytest.mark.parametrize(("images", "platform", "verdict", "kind"), [
    (["/py/_sqlite3.so", "/usr/lib/libsqlite3.dylib"], "darwin", PROBLEM, "apple-system"),
    (["/py/_sqlite3.so", "/opt/homebrew/opt/sqlite/lib/libsqlite3.0.dylib"], "darwin", OK,
     "system"),
    (["/py/_sqlite3.so"], "darwin", OK, "bundled"),
    (["/py/_sqlite3.so", "/py/lib/libsqlite3.0.dylib"], "darwin", OK, "python"),
    (["/py/_sqlite3.so", "/usr/lib/x86_64-linux-gnu/libsqlite3.so.0"], "linux", OK, "system"),
])
def test_sqlite_library_verdicts(images: list[str], platform: str, verdict: str,
                                 kind: str) -> None:
    """Apple's /usr/lib/libsqlite3.dylib is the problem; bundled and other builds are fine."""
    info = {"version": "3.43.2", "module": "/py/_sqlite3.so", "images": images}
    line = sqlite_line(info, platform, prefixes=("/py",))
    assert (line.verdict, line.data["kind"]) == (verdict, kind)
    if verdict == PROBLEM:
        assert line.summary == SQLITE_APPLE.format(library=images[1], version="3.43.2")
        assert line.fix == SQLITE_APPLE_FIX
        assert "pysqlite3-binary" in SQLITE_APPLE_FIX


def test_sqlite_helper_failures_are_notes() -> None:
    """A Python without sqlite3, or a helper that fails or hangs, is a note, not a crash."""
    assert sqlite_line({"missing": True}, "linux").summary == SQLITE_MISSING
    failed = _doctor.inspect_sqlite(_command=[sys.executable, "-c", "raise SystemExit('x')"])
    assert failed == {"error": "exit status 1: x"}
    hung = _doctor.inspect_sqlite(_command=[sys.executable, "-c", "import time; time.sleep(9)"],
                                  _timeout=0.3)
    assert hung == {"error": "no answer within 0.3 seconds"}
    assert sqlite_line(hung, "linux").verdict == NOTE


def test_frozen_application_is_never_run_to_inspect_sqlite(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In a frozen app sys.executable is the app: the doctor says so instead of running it."""
    from forksafe._interpreter import FROZEN

    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(subprocess, "run",
                        lambda *a, **k: pytest.fail("the application was started"))
    info = _doctor.inspect_sqlite()
    assert info == {"error": FROZEN}
    line = sqlite_line(info, "darwin")
    assert (line.verdict, line.summary) == (NOTE, _doctor.SQLITE_UNKNOWN.format(reason=FROZEN))


@pytest.mark.parametrize(("version", "platform", "method"), [
    ((3, 13), "linux", "fork"), ((3, 14), "linux", "forkserver"),
    ((3, 14), "freebsd14", "forkserver"), ((3, 14), "darwin", "spawn"),
    ((3, 8), "darwin", "spawn"), ((3, 7), "darwin", "fork"), ((3, 13), "win32", "spawn"),
])
def test_expected_default_start_methods(version: tuple[int, int], platform: str,
                                        method: str) -> None:
    """CPython's defaults: fork until 3.14 on POSIX, forkserver from 3.14, spawn on macOS."""
    assert expected_default(version, platform) == method


def test_start_method_verdicts() -> None:
    """fork is a note explaining 3.14; fork forced on macOS is a problem; spawn is fine."""
    report = checks(doctor_with(**FAKES))["start-method"]
    assert (report["verdict"], report["fix"]) == (NOTE, START_FORK_FIX)
    assert report["summary"] == START_FORK.format(how=" (this platform's default)")
    assert report["data"]["default_in_3_14"] == expected_default((3, 14), sys.platform)
    forced = doctor_with(**{**FAKES, "start_method": ("spawn", "fork"), "platform": "darwin"})
    assert (checks(forced)["start-method"]["verdict"],
            checks(forced)["start-method"]["fix"]) == (PROBLEM, START_FORK_MACOS_FIX)
    spawn = doctor_with(**{**FAKES, "start_method": ("spawn", None), "platform": "darwin"})
    assert checks(spawn)["start-method"]["verdict"] == OK


def test_fork_warning_verdicts_follow_the_filters() -> None:
    """Default 3.12 filters show it in __main__ only; a global default shows it; error errs."""
    assert fork_warning_line((3, 11), [], "default").summary == WARN_OLD.format(version="3.11")
    partly = fork_warning_line((3, 12), DEFAULT_FILTERS_312, "default")
    assert (partly.verdict, partly.summary, partly.fix) == (NOTE, WARN_PARTLY, WARN_FIX)
    shown = fork_warning_line(
        (3, 13), [("default", None, DeprecationWarning, None, 0), *DEFAULT_FILTERS_312],
        "default")
    assert (shown.verdict, shown.summary) == (OK, WARN_VISIBLE)
    erring = fork_warning_line(
        (3, 12), [("error", re.compile("This process"), Warning, None, 0)], "default")
    assert erring.summary == WARN_ERROR


def test_fork_warning_prediction_matches_what_python_does(tmp_path: pathlib.Path) -> None:
    """The doctor's verdict agrees with the warnings a real threaded fork emits here."""
    (tmp_path / "forkinglib.py").write_text(
        "import os\ndef fork():\n    pid = os.fork()\n"
        "    if pid == 0:\n        os._exit(0)\n    os.waitpid(pid, 0)\n")
    s = run_scenario("""
        import os, sys, threading, warnings, forksafe
        sys.path.insert(0, ".")
        import forkinglib
        report = {c["id"]: c for c in forksafe.doctor()["checks"]}["fork-warning"]
        stop = threading.Event()
        t = threading.Thread(target=stop.wait)
        t.start()
        seen = {}
        for where, fork in (("main", None), ("library", forkinglib.fork)):
            with warnings.catch_warnings(record=True) as caught:
                warnings.filters[:] = warnings.filters  # the process's filters, unchanged
                if fork is None:
                    pid = os.fork()
                    if pid == 0:
                        os._exit(0)
                    os.waitpid(pid, 0)
                else:
                    fork()
            seen[where] = any("multi-threaded" in str(w.message) for w in caught)
        stop.set(); t.join()
        emit(data=report["data"], seen=seen)
    """, tmp_path, timeout=30)
    data, seen = s.result["data"], s.result["seen"]
    if not data["emitted"]:
        assert seen == {"main": False, "library": False}
    else:
        assert seen == {"main": data["action_in_main"] != "ignore",
                        "library": data["action_in_libraries"] != "ignore"}


def test_environment_is_reported_by_name_never_by_value() -> None:
    """Set variables show up as set, with their meaning, and their values never appear."""
    environ = {"OBJC_DISABLE_INITIALIZE_FORK_SAFETY": "SECRET-1", "OMP_NUM_THREADS": "SECRET-2",
               "GRPC_ENABLE_FORK_SUPPORT": "true", "no_proxy": "SECRET-3",
               "HTTPS_PROXY": "http://user:SECRET-4@proxy:1", "AWS_SECRET_ACCESS_KEY": "SECRET-5"}
    report = doctor_with(**{**FAKES, "environ": environ, "platform": "darwin"})
    assert "SECRET" not in json.dumps(report)
    assert "AWS_SECRET_ACCESS_KEY" not in json.dumps(report)
    by_id = checks(report)
    objc = by_id["env:OBJC_DISABLE_INITIALIZE_FORK_SAFETY"]
    assert (objc["verdict"], objc["summary"], objc["fix"]) == (PROBLEM, ENV_OBJC_SET, ENV_OBJC_FIX)
    assert by_id["env:OMP_NUM_THREADS"]["data"] == {"set": True}
    assert by_id["env:no_proxy"]["data"]["proxy_variables"] == ["HTTPS_PROXY", "no_proxy"]
    poll = by_id["env:GRPC_POLL_STRATEGY"]
    assert (poll["verdict"], poll["summary"], poll["fix"]) == (
        PROBLEM, ENV_POLL_MISSING, ENV_POLL_FIX)
    linux = checks(doctor_with(**{**FAKES, "environ": environ, "platform": "linux"}))
    assert linux["env:OBJC_DISABLE_INITIALIZE_FORK_SAFETY"]["summary"] == ENV_OBJC_OTHER


def test_macos_without_proxy_variables_points_at_patch_urllib() -> None:
    """On macOS urllib would ask the system in-process: the doctor says so and names the fix."""
    proxy = checks(doctor_with(**{**FAKES, "platform": "darwin"}))["env:no_proxy"]
    assert (proxy["summary"], proxy["fix"]) == (ENV_NO_PROXY_MAC_UNSET, ENV_NO_PROXY_MAC_FIX)


def test_grpc_without_fork_support_is_a_note_only_when_installed() -> None:
    """GRPC_ENABLE_FORK_SUPPORT matters only where grpcio is installed."""
    grpcio = Distribution("grpcio", ("grpc",), ("grpc/_cython/cygrpc.cpython-311-x86_64.so",))
    with_grpc = checks(doctor_with(**{**FAKES, "distributions": [grpcio]}))
    line = with_grpc["env:GRPC_ENABLE_FORK_SUPPORT"]
    assert (line["verdict"], line["summary"], line["fix"]) == (
        NOTE, ENV_GRPC_OFF.format(state="not set"), ENV_GRPC_FIX)
    assert checks(doctor_with(**FAKES))["env:GRPC_ENABLE_FORK_SUPPORT"]["verdict"] == OK


def test_installed_runtimes_are_judged_by_the_catalog() -> None:
    """gRPC and GNU OpenMP are notes with the catalog's remedy; OpenBLAS is fine."""
    dists = [
        Distribution("grpcio", ("grpc",), ("grpc/__init__.py",
                                           "grpc/_cython/cygrpc.cpython-311-x86_64.so")),
        Distribution("scikit-learn", ("sklearn",), ("sklearn/__init__.py",
                                                    "scikit_learn.libs/libgomp-a34b3233.so.1.0.0")),
        Distribution("numpy", ("numpy",), ("numpy.libs/libscipy_openblas64_-ff651d7f.so",)),
        Distribution("requests", ("requests",), ("requests/__init__.py",)),
    ]
    by_id = checks(doctor_with(**{**FAKES, "distributions": dists}))
    from forksafe._catalog import find

    assert by_id["runtime:grpcio:grpc"]["verdict"] == NOTE
    assert by_id["runtime:grpcio:grpc"]["fix"] == find("grpc").remedy
    assert by_id["runtime:scikit-learn:gnu-openmp"]["data"]["imports"] == ["sklearn"]
    assert by_id["runtime:numpy:openblas"]["verdict"] == OK
    assert not [i for i in by_id if i.startswith("runtime:requests")]
    assert checks(doctor_with(**FAKES))["runtimes"]["summary"] == RUNTIMES_NONE


def test_real_installed_distributions_are_read_from_metadata() -> None:
    """This venv's grpcio and numpy are found from their RECORD files, with import names."""
    dists = {d.name.lower(): d for d in _doctor.installed_distributions()}
    assert "grpc" in dists["grpcio"].imports
    assert any("cygrpc" in f for f in dists["grpcio"].files)


def test_gc_freeze_advice_and_detection(tmp_path: pathlib.Path) -> None:
    """Without gc.freeze() the doctor advises it; after it, the line is ok with the count."""
    assert checks(doctor_with(**FAKES))["gc-freeze"]["fix"] == GC_FIX
    s = run_scenario("""
        import gc, forksafe
        gc.freeze()
        line = {c["id"]: c for c in forksafe.doctor()["checks"]}["gc-freeze"]
        emit(verdict=line["verdict"], frozen=line["data"]["frozen"])
    """, tmp_path, timeout=60)
    assert s.result["verdict"] == OK
    assert s.result["frozen"] > 0


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in _doctor.ENVIRONMENT}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "forksafe", "doctor", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env=full_env)


def test_cli_text_json_and_exit_codes() -> None:
    """Text and JSON agree; exit 0 without problems, 1 with one."""
    clean = {"GRPC_ENABLE_FORK_SUPPORT": "0"}
    text = cli(env=clean)
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith("forksafe doctor: Python ")
    assert re.search(r"^\d+ ok, \d+ notes?, 0 problems$", text.stdout, re.MULTILINE)
    as_json = cli("--json", env=clean)
    report = json.loads(as_json.stdout)
    assert report["schema"] == SCHEMA
    for check in report["checks"]:
        assert f"{check['verdict']:<8} {check['title']}: " in text.stdout
    problem = cli(env={"GRPC_ENABLE_FORK_SUPPORT": "1"})
    assert problem.returncode == 1
    assert "problem  GRPC_POLL_STRATEGY" in problem.stdout
    assert "fix: set GRPC_POLL_STRATEGY=poll" in problem.stdout


def test_doctor_warns_about_nothing(recwarn: pytest.WarningsRecorder) -> None:
    """Running the doctor in-process emits no warning of its own."""
    warnings.simplefilter("always")
    doctor_with(**{**FAKES, "sqlite": None})
    assert [str(w.message) for w in recwarn] == []


def test_packages_without_record_are_found_on_disk(tmp_path: pathlib.Path) -> None:
    """Without a RECORD, find_spec and a bounded walk find the libraries, importing nothing."""
    s = run_scenario("""
        import sys
        from forksafe import _doctor
        files = _doctor._files_on_disk(["grpc", "numpy", "no_such_package_here"])
        found = _doctor.runtime_lines([_doctor.Distribution("grpcio", ("grpc",), files)])
        emit(ids=[line.id for line in found],
             imported=[m for m in ("grpc", "numpy") if m in sys.modules],
             cygrpc=[f for f in files if "cygrpc" in f],
             openblas=[f for f in files if "openblas" in f])
    """, tmp_path, timeout=60)
    assert s.result["imported"] == []
    assert s.result["cygrpc"][0].startswith("grpc/_cython/cygrpc.")
    assert s.result["openblas"][0].startswith("numpy.libs/")
    assert "runtime:grpcio:grpc" in s.result["ids"]
