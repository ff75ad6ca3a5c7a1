"""Ship the environment hook's ``.pth`` file in editable installs too.

``force-include`` in pyproject.toml puts ``forksafe-hook.pth`` at the root of
the regular wheel (site-packages). Hatchling leaves force-included files out of
editable wheels, so this hook adds it there; its name sorts after hatchling's
``_forksafe.pth`` path file, so ``forksafe`` is importable when it runs.
"""

from __future__ import annotations

from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class CustomBuildHook(BuildHookInterface):
    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if version == "editable":
            build_data.setdefault("force_include_editable", {})[
                "src/forksafe-hook.pth"] = "forksafe-hook.pth"
