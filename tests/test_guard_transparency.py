"""The transparency script itself, on one small CPython test module (the full run is manual)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPT = ROOT / "scripts" / "transparency.py"


@pytest.mark.skipif(importlib.util.find_spec("test.test_pty") is None,
                    reason="this Python ships without its test suite")
def test_script_compares_a_module_with_and_without_the_guard() -> None:
    """test_pty gives the same results guarded, and the guard really saw its forks."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--module", "test_pty"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    match = re.search(r"^test_pty\s+same\s+(\d+) tests.*forks seen by the guard: (\d+)$",
                      proc.stdout, re.MULTILINE)
    assert match, proc.stdout
    assert int(match.group(1)) > 0
    assert int(match.group(2)) > 0


def test_compare_names_every_test_that_changed() -> None:
    """A test that passes plain and fails guarded is listed; equal ones are not."""
    spec = importlib.util.spec_from_file_location("transparency", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    lines = module.compare("test_x", {"a": "passed", "b": "passed"},
                           {"a": "passed", "b": "failed", "c": "skipped"})
    assert lines == ["  test_x: b: passed without the guard, failed with it",
                     "  test_x: c: missing without the guard, skipped with it"]
