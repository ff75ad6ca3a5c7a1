"""Shared test machinery: native fixtures built once, and scenarios run in children.

Every test that starts threads, loads native runtimes or forks runs its
scenario in a fresh interpreter (``run_scenario``) with a hard timeout, so the
test runner's own process never inherits the hazards it is testing.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
from typing import Any

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

# A suite started in the background by a shell without job control (`cmd &` in a
# script) inherits SIGINT ignored, and so does every `forksafe run` it starts, which
# rightly keeps it ignored (as under nohup): the tests of Ctrl-C need it delivered.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
MARK = "FORKSAFE-RESULT:"

# Importing this in a scenario prints the check's JSON on its last line.
EMIT = f"""
import json as _json, forksafe as _forksafe
def emit(report=None, **extra):
    data = (report or _forksafe.check()).to_dict()
    data.update(extra)
    print({MARK!r} + _json.dumps(data), flush=True)
"""


@pytest.fixture(scope="session")
def native_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A directory holding every native fixture, compiled once per session."""
    import _native

    if not _native.gcc_available():
        pytest.skip(_native.SKIP_REASON)
    out = tmp_path_factory.mktemp("native")
    for name in _native.FIXTURES:
        _native.build(name, out)
    return out


class Scenario:
    """The outcome of a scenario script run in a child interpreter."""

    def __init__(self, path: pathlib.Path, proc: subprocess.CompletedProcess[str]) -> None:
        self.path = path
        self.returncode = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
        self.result: dict[str, Any] = json.loads(lines[-1][len(MARK):]) if lines else {}

    @property
    def hazards(self) -> list[dict[str, Any]]:
        hazards: list[dict[str, Any]] = self.result.get("hazards", [])
        return hazards

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [h for h in self.hazards if h["kind"] == kind]

    @property
    def worst(self) -> str | None:
        worst: str | None = self.result.get("max_severity")
        return worst

    def line_of(self, marker: str) -> int:
        """The 1-based line of the script that carries ``# marker``."""
        for number, line in enumerate(self.path.read_text().splitlines(), 1):
            if line.rstrip().endswith(f"# {marker}"):
                return number
        raise AssertionError(f"no line marked {marker!r} in the scenario")


def run_scenario(
    code: str,
    tmp_path: pathlib.Path,
    *,
    timeout: float = 60,
    env: dict[str, str] | None = None,
    name: str = "scenario.py",
) -> Scenario:
    """Run ``code`` (with ``emit`` predefined) in a new interpreter; kill it on timeout."""
    path = tmp_path / name
    path.write_text(EMIT + textwrap.dedent(code))
    full_env = dict(os.environ)
    full_env.setdefault("OMP_NUM_THREADS", "2")
    full_env.update(env or {})
    proc = subprocess.Popen(
        [sys.executable, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=full_env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"scenario timed out after {timeout}s\n{out}\n{err}") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    completed = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    scenario = Scenario(path, completed)
    if not scenario.result and proc.returncode != 0:
        raise AssertionError(f"scenario failed with {proc.returncode}:\n{out}\n{err}")
    return scenario
