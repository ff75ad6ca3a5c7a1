"""Whether ``sys.executable`` can run forksafe's helper processes.

The proxy lookup, the doctor's SQLite inspection and the hang helper run a small
script in a fresh interpreter, ``sys.executable ...``. That is only harmless when
``sys.executable`` is a Python interpreter. In a frozen application
(PyInstaller, cx_Freeze, py2app: ``sys.frozen`` is set) it is the application
itself, and in an embedding server (uWSGI, some plugin hosts) it can be the
host program: running it with our arguments would start a second copy of the
user's program. So the helper is not run there, and the caller falls back.
"""

from __future__ import annotations

import os
import sys

FROZEN = (
    "this is a frozen application (sys.frozen is set): sys.executable is the application "
    "itself, not a Python interpreter that could run the helper"
)
NOT_PYTHON = (
    "sys.executable ({executable!r}) does not look like a Python interpreter (an embedded "
    "Python?), so no helper is run with it"
)
#: What a Python interpreter's file name contains (python3.11, pythonw.exe, pypy3, graalpy).
_NAMES = ("python", "pypy", "graalpy")


def interpreter_problem(
    executable: str | None = None, *, frozen: bool | None = None
) -> str | None:
    """Why ``executable`` (default ``sys.executable``) must not run a helper, or None."""
    if executable is None:
        executable = sys.executable
    if frozen is None:
        frozen = bool(getattr(sys, "frozen", False))
    if frozen:
        return FROZEN
    name = os.path.basename(executable or "").lower()
    if not any(part in name for part in _NAMES):
        return NOT_PYTHON.format(executable=executable or "")
    return None
