"""Where the standard library is: the directories ``sysconfig`` names ``stdlib`` and
``platstdlib``, told without asking it.

``sysconfig.get_paths()`` loads the interpreter's build variables (a module of
some thousand entries, ~330 kB): memory that every guarded fork then copies the
page tables of, for two paths. Under the schemes an interpreter uses by default
(``posix_prefix``, ``venv``) they are ``<base prefix>/<platlibdir>/pythonX.Y``
and ``<exec prefix>/<platlibdir>/pythonX.Y``; the first is where ``os`` was
loaded from. When it is not (another scheme), ``sysconfig`` is asked after all.
"""

from __future__ import annotations

import os
import sys


def _directories() -> tuple[str, str]:
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    libdir = getattr(sys, "platlibdir", "lib")
    stdlib = os.path.join(sys.base_prefix, libdir, version)
    platstdlib = os.path.join(sys.exec_prefix, libdir, version)
    loaded_from = getattr(os, "__file__", None)
    if loaded_from is None or os.path.dirname(loaded_from) != stdlib:
        import sysconfig

        paths = sysconfig.get_paths()
        return paths["stdlib"], paths["platstdlib"]
    return stdlib, platstdlib


#: ``sysconfig.get_paths()["stdlib"]`` and ``["platstdlib"]``.
STDLIB, PLATSTDLIB = _directories()
