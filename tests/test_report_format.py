"""The report format in docs/ is the one forksafe writes: real reports validate against it.

One real run exercises every hazard kind and every kind of fork record there is — an
active GNU OpenMP pool, a C thread holding a mutex, a Python thread holding a lock, an
open SQLite connection, an event loop in a thread, a ``preexec_fn``, a refused fork, a
crashed child — and its report, its event lines and a ``forksafe check --json`` are
validated against ``docs/report-format.schema.json``; every field the schema names is
described in ``docs/report-format.md``.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
from typing import Any

import jsonschema
import pytest

from conftest import ROOT

DOCS = ROOT / "docs"
SCHEMA: dict[str, Any] = json.loads((DOCS / "report-format.schema.json").read_text())
FORKSAFE = [sys.executable, "-m", "forksafe"]

APP = """
import asyncio, ctypes, os, sqlite3, subprocess, sys, threading, time
import forksafe

omp = ctypes.CDLL({omp!r})
omp.omp_pool_run(1000)  # an active GNU OpenMP pool
mutex = ctypes.CDLL({mutex!r})
mutex.native_mutex_hold(ctypes.c_double(30.0))  # a C thread holding a mutex
mutex.native_mutex_wait_held.argtypes = [ctypes.c_double]
mutex.native_mutex_wait_held(ctypes.c_double(5.0))
lock = threading.Lock()
def hold():
    with lock:
        time.sleep(30)
threading.Thread(target=hold, name="holder", daemon=True).start()
loop = asyncio.new_event_loop()
threading.Thread(target=loop.run_forever, name="loop", daemon=True).start()
db = sqlite3.connect(os.path.join({tmp!r}, "app.db"))
time.sleep(0.2)

pid = os.fork()  # a crash
if pid == 0:
    ctypes.string_at(0)
os.waitpid(pid, 0)
pid = os.fork()  # an exit
if pid == 0:
    os._exit(3)
os.waitpid(pid, 0)
for _ in range(2):  # alike, uneventful: one entry that counts them
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
subprocess.run(["true"], preexec_fn=lambda: None, check=True)
forksafe.install("raise", fail_on="warning", report=os.environ["FORKSAFE_REPORT"])
try:
    os.fork()
except forksafe.ForkSafetyError:
    pass
"""


@pytest.fixture(scope="module")
def real_run(native_dir: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A real ``forksafe run --report`` of APP, and the event lines its tree wrote."""
    tmp = tmp_path_factory.mktemp("report-format")
    script = tmp / "app.py"
    script.write_text(APP.format(omp=str(native_dir / "libomp_pool.so"),
                                 mutex=str(native_dir / "libnative_mutex.so"), tmp=str(tmp)))
    report = tmp / "report.json"
    proc = subprocess.run([*FORKSAFE, "run", "--policy", "warn", "--report", str(report),
                           "--", sys.executable, str(script)],
                          capture_output=True, text=True, timeout=120, cwd=tmp,
                          env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert proc.returncode == 0, proc.stderr
    # The same program with a report file of its own: the event lines.
    lines = tmp / "events.jsonl"
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, cwd=tmp,
                          env=dict(os.environ, OMP_NUM_THREADS="2", FORKSAFE_POLICY="log",
                                   FORKSAFE_REPORT=str(lines)))
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in lines.read_text().splitlines()]
    return json.loads(report.read_text()), events


def validator(definition: str | None = None) -> jsonschema.Draft202012Validator:
    schema = SCHEMA if definition is None else {**SCHEMA, "$ref": f"#/$defs/{definition}"}
    if definition is not None:
        schema = {key: value for key, value in schema.items() if key != "oneOf"}
    return jsonschema.Draft202012Validator(schema)


def test_the_schema_is_a_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_a_real_run_report_validates(
        real_run: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    """The report of a run with every hazard kind, a crash, a refusal validates; every
    kind and every outcome status of the run is there to be validated."""
    report, _ = real_run
    validator().validate(report)
    validator("run").validate(report)
    kinds = {h["kind"] for fork in report["forks"] for h in fork["hazards"]}
    assert {"native-runtime", "native-thread", "thread", "sqlite-connection", "event-loop",
            "preexec-fn"} <= kinds
    actions = {fork["action"] for fork in report["forks"]}
    assert {"warned", "refused"} <= actions
    statuses = {fork["outcome"]["status"] for fork in report["forks"] if "outcome" in fork}
    assert {"signaled", "exited"} <= statuses
    assert [fork["outcome"]["exit_code"] for fork in report["forks"]
            if fork.get("count") == 2] == [0], "the two alike forks are one counted entry"


def test_real_event_lines_validate(
        real_run: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    """Each line of a FORKSAFE_REPORT file is a valid event line."""
    _, events = real_run
    check = validator("event-line")
    for event in events:
        check.validate(event)
    assert {e["type"] for e in events} >= {"fork", "outcome"}


def test_a_real_check_validates(native_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """``forksafe check --json`` prints a valid check entry."""
    (tmp_path / "omp_app.py").write_text(
        f"import ctypes\nctypes.CDLL({str(native_dir / 'libomp_pool.so')!r})"
        ".omp_pool_run(1000)\n")
    proc = subprocess.run([*FORKSAFE, "check", "--import", "omp_app", "--json"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env=dict(os.environ, OMP_NUM_THREADS="2"))
    data = json.loads(proc.stdout)
    validator().validate(data)
    validator("check").validate(data)
    assert data["max_severity"] == "error"


def test_a_foreign_document_does_not_validate() -> None:
    """The schema has teeth: a wrong schema name, a bad action, a missing field fail."""
    good = {"schema": "forksafe-report/1", "command": ["x"], "exit_code": 0, "forks": []}
    validator().validate(good)
    for bad in ({**good, "schema": "other/1"}, {**good, "forks": [{"action": "maybe"}]},
                {key: value for key, value in good.items() if key != "exit_code"}):
        with pytest.raises(jsonschema.ValidationError):
            validator().validate(bad)


def _properties(node: object) -> set[str]:
    """Every property name the schema defines, anywhere in it."""
    found: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "properties" and isinstance(value, dict):
                found |= set(value)
            found |= _properties(value)
    elif isinstance(node, list):
        for item in node:
            found |= _properties(item)
    return found


def test_every_field_of_the_schema_is_described_in_the_document() -> None:
    """report-format.md names (in backticks) every field the schema defines."""
    text = (DOCS / "report-format.md").read_text()
    described = set(re.findall(r"`([a-z_]+)`", text))
    assert _properties(SCHEMA) - described == set()
