"""Every human output escapes what a terminal would obey (issue 14, item 3)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from forksafe._render.text import printable


@pytest.mark.parametrize(("raw", "shown"), [
    ("plain text, tabs\tand\nnewlines stay", "plain text, tabs\tand\nnewlines stay"),
    ("\x1b]0;owned\x07title", "\\x1b]0;owned\\x07title"),
    ("\x1b[2Jclear", "\\x1b[2Jclear"),
    ("overwrite\rme", "overwrite\\x0dme"),
    ("c1\x9bcsi and del\x7f", "c1\\x9bcsi and del\\x7f"),
    ("bidi \u202eevil\u202c and \u2066isolate\u2069",
     "bidi \\u202eevil\\u202c and \\u2066isolate\\u2069"),
    ("unicode names stay: Zoë 線程", "unicode names stay: Zoë 線程"),
])
def test_printable_escapes_only_what_a_terminal_obeys(raw: str, shown: str) -> None:
    assert printable(raw) == shown


def test_printable_text_is_returned_as_it_is() -> None:
    text = "thread 'x' holds `lock` at app.py:3"
    assert printable(text) is text


ESC = "\x1b]0;owned\x07\x1b[2J"


def run(*args: str, cwd: pathlib.Path, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def test_explain_escapes_a_hostile_report(tmp_path: pathlib.Path) -> None:
    """Every text field of a report may hold escape sequences: none reaches the terminal."""
    report = {"schema": "forksafe-report/1", "command": ["app" + ESC], "exit_code": 0,
              "forks": [{"parent_pid": 1, "child_pid": 2, "time": 0,
                         "mechanism": "os.fork" + ESC,
                         "site": {"file": "/srv/app" + ESC + ".py", "line": 3,
                                  "function": "main" + ESC},
                         "action": "warned", "thread": "MainThread" + ESC,
                         "hazards": [{"kind": "thread", "severity": "warning",
                                      "summary": "thread holds a lock" + ESC,
                                      "remedy": "join it" + ESC, "evidence": {}}],
                         "outcome": {"status": "signaled", "exit_code": None,
                                     "signal": "SIGSEGV", "traceback": "File x" + ESC,
                                     "diagnosis": "child 2 died" + ESC}}]}
    (tmp_path / "r.json").write_text(json.dumps(report))
    proc = run("-m", "forksafe", "explain", "r.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout and "\x07" not in proc.stdout
    assert "\\x1b]0;owned\\x07" in proc.stdout  # shown, escaped


def test_run_and_fork_warnings_escape_what_came_from_outside(tmp_path: pathlib.Path) -> None:
    """A script whose file name holds an escape sequence, forking while a thread holds a
    lock, under ``forksafe run``: the fork warning and the summary show it escaped."""
    script = tmp_path / ("app" + ESC.replace("/", "") + ".py")
    script.write_text(textwrap.dedent("""
        import os, threading, time
        lock = threading.Lock()
        def hold():
            with lock:
                time.sleep(30)
        threading.Thread(target=hold, name="holder\\x1b[31m", daemon=True).start()
        time.sleep(0.1)
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
    """))
    proc = run("-m", "forksafe", "run", "--", sys.executable, script.name, ESC, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "ForkSafetyWarning" in proc.stderr and "1 fork seen" in proc.stderr
    assert "\x1b" not in proc.stderr and "\x07" not in proc.stderr
    assert "\\x1b[2J" in proc.stderr
