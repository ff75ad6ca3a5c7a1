"""Build hook: the environment hook's ``.pth`` in editable installs, and the optional
C speedups.

``force-include`` in pyproject.toml puts ``forksafe-hook.pth`` at the root of
the regular wheel (site-packages). Hatchling leaves force-included files out of
editable wheels, so this hook adds it there; its name sorts after hatchling's
``_forksafe.pth`` path file, so ``forksafe`` is importable when it runs.

``src/forksafe/_speedups.c`` (the observation layer's ``sqlite3.connect``
wrapper, the guard's stack and image readers; the ``_speedups_*.h`` parts are
included into it) is compiled with the compiler this Python was built with, when there
is one: into ``src/forksafe`` for an editable install (where the package is
imported from), into a temporary directory for a wheel. Without a compiler, or
if compiling fails, the wheel stays pure Python and forksafe uses its Python
wrapper instead: nothing else changes.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import sysconfig
import tempfile
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SOURCE = os.path.join("src", "forksafe", "_speedups.c")


class CustomBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if version == "editable":
            build_data.setdefault("force_include_editable", {})[
                "src/forksafe-hook.pth"] = "forksafe-hook.pth"
        if self.target_name != "wheel":
            return
        suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
        name = "_speedups" + suffix
        if version == "editable":
            target = os.path.join(self.root, "src", "forksafe", name)
        else:
            target = os.path.join(tempfile.mkdtemp(prefix="forksafe-build-"), name)
        if not _compile(os.path.join(self.root, SOURCE), target):
            return
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        if version != "editable":
            build_data["force_include"][target] = f"forksafe/{name}"


def _compile(source: str, target: str) -> bool:
    """Compile ``source`` into the extension module ``target``; False (said why) if not."""
    config = sysconfig.get_config_var
    cc, ccshared, ldshared = config("CC"), config("CCSHARED"), config("LDSHARED")
    if not (cc and ldshared):
        return _skipped("this Python does not say which compiler built it")
    include = sysconfig.get_paths()["include"]
    obj = target + ".o"
    steps = [
        [*shlex.split(cc), *shlex.split(ccshared or ""), "-O2", f"-I{include}",
         "-c", source, "-o", obj],
        [*shlex.split(ldshared), obj, "-o", target],
    ]
    try:
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                last = done.stderr.strip().splitlines()[-1:]
                return _skipped(last[0] if last else f"exit {done.returncode}")
    except (OSError, subprocess.SubprocessError) as exc:
        return _skipped(str(exc))
    finally:
        if os.path.exists(obj):
            os.remove(obj)
    return True


def _skipped(why: object) -> bool:
    print(f"forksafe: the optional C speedups were not built ({why}); "
          "the pure-Python fallback is used", file=sys.stderr)
    return False
