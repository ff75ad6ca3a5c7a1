"""The code stays ruff- and mypy-strict-clean: part of the one test command."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_ruff_is_clean() -> None:
    """`ruff check` finds nothing in the sources, tests, benchmarks and examples."""
    proc = run("ruff", "check", "src", "tests", "benchmarks", "examples", "scripts")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_strict_is_clean() -> None:
    """`mypy --strict` (configured in pyproject.toml) finds nothing in the package."""
    proc = run("mypy")
    assert proc.returncode == 0, proc.stdout + proc.stderr
