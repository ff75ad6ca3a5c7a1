"""forksafe: know what breaks in a forked child before you fork.

Importing forksafe changes nothing in the process: it starts no thread, loads
no native library, sets no variable and patches nothing. Every public name
below other than the two exception types lives in a private module that is imported
only when the name is first used (PEP 562 ``__getattr__``), so the import
itself stays cheap and inert.

PYTEST_DONT_REWRITE: pytest rewrites the asserts of every package that ships a
pytest plugin (``forksafe.pytest_plugin``), and warns when the package was imported
before it could; the environment hook imports this one at interpreter start.
"""

from __future__ import annotations

from forksafe._errors import ForkSafetyError, ForkSafetyWarning

# Not typing.TYPE_CHECKING: importing typing (with dataclasses, the report
# model's cost) would triple this module's import time; mypy honours the name.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from forksafe._accept import accept
    from forksafe._check import check
    from forksafe._doctor import doctor
    from forksafe._guard import guard, install, uninstall
    from forksafe._ledger import observe, unobserve
    from forksafe._remedies.context import get_context
    from forksafe._remedies.proxies import getproxies, patch_urllib, proxy_bypass, unpatch_urllib
    from forksafe._remedies.sqlite import protect_sqlite, unprotect_sqlite
    from forksafe._report import ForkEvent, Hazard, Outcome, Report, Severity, Site

__all__ = [
    "ForkEvent",
    "ForkSafetyError",
    "ForkSafetyWarning",
    "Hazard",
    "Outcome",
    "Report",
    "Severity",
    "Site",
    "accept",
    "check",
    "doctor",
    "get_context",
    "getproxies",
    "guard",
    "install",
    "observe",
    "patch_urllib",
    "protect_sqlite",
    "proxy_bypass",
    "uninstall",
    "unobserve",
    "unpatch_urllib",
    "unprotect_sqlite",
]

__version__ = "0.1.0"

# Where each lazily imported public name lives.
_LAZY = {
    "ForkEvent": "forksafe._report",
    "Hazard": "forksafe._report",
    "Outcome": "forksafe._report",
    "Report": "forksafe._report",
    "Severity": "forksafe._report",
    "Site": "forksafe._report",
    "accept": "forksafe._accept",
    "check": "forksafe._check",
    "doctor": "forksafe._doctor",
    "get_context": "forksafe._remedies.context",
    "getproxies": "forksafe._remedies.proxies",
    "guard": "forksafe._guard",
    "install": "forksafe._guard",
    "observe": "forksafe._ledger",
    "patch_urllib": "forksafe._remedies.proxies",
    "protect_sqlite": "forksafe._remedies.sqlite",
    "proxy_bypass": "forksafe._remedies.proxies",
    "uninstall": "forksafe._guard",
    "unobserve": "forksafe._ledger",
    "unpatch_urllib": "forksafe._remedies.proxies",
    "unprotect_sqlite": "forksafe._remedies.sqlite",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'forksafe' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
