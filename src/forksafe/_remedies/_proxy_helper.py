"""Print this machine's system proxy configuration as one JSON object, then exit.

forksafe runs this file as a script in a fresh interpreter
(``python -I _proxy_helper.py``), started with exec, never by a bare fork: the
system proxy lookup on macOS (``_scproxy``, the SystemConfiguration framework)
talks to configd through libdispatch, and a process that has done that must
not fork afterwards (CPython bpo-13829, bpo-27126). Here the lookup happens in
a process that never forks and ends right away, and the parent only parses
JSON.

It imports nothing but the standard library, so it runs even where forksafe is
not importable by the interpreter. Output::

    {"kind": "macos", "proxies": {"http": "http://proxy:3128"},
     "settings": {"exclude_simple": true, "exceptions": ["*.local"]}}
    {"kind": "windows", "proxies": {...}, "override": "<local>;*.corp"}
    {"kind": "none", "proxies": {}}

Options, for tests on machines without these frameworks: ``--platform NAME``
answers as on that platform (``darwin``, ``win32``); ``--path DIR`` puts DIR
first on ``sys.path`` (where a test keeps its fake ``_scproxy`` or ``winreg``).
"""

from __future__ import annotations

import json
import sys
from typing import Any


def read(platform: str) -> dict[str, Any]:
    if platform == "darwin":
        import _scproxy  # type: ignore[import-not-found]  # macOS only

        return {"kind": "macos", "proxies": dict(_scproxy._get_proxies()),
                "settings": dict(_scproxy._get_proxy_settings())}
    if platform == "win32":
        return _windows()
    return {"kind": "none", "proxies": {}}


def _windows() -> dict[str, Any]:
    import importlib
    import urllib.request

    winreg: Any = importlib.import_module("winreg")  # Windows only
    proxies = getattr(urllib.request, "getproxies_registry")()  # noqa: B009 - Windows only
    override = ""
    try:
        key = winreg.OpenKey(winreg.HKEY_CURRENT_USER,
                             r"Software\Microsoft\Windows\CurrentVersion\Internet Settings")
        if winreg.QueryValueEx(key, "ProxyEnable")[0]:
            override = str(winreg.QueryValueEx(key, "ProxyOverride")[0])
    except OSError:
        pass
    return {"kind": "windows", "proxies": dict(proxies), "override": override}


def main(argv: list[str]) -> int:
    platform = sys.platform
    args = list(argv)
    while args:
        option = args.pop(0)
        if option == "--platform" and args:
            platform = args.pop(0)
        elif option == "--path" and args:
            sys.path.insert(0, args.pop(0))
        else:
            print(f"_proxy_helper: unknown argument {option!r}", file=sys.stderr)
            return 2
    sys.stdout.write(json.dumps(read(platform)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
