"""Operating-system facts behind one small interface.

The probes ask three questions of the OS: which native libraries are loaded,
which OS threads exist (and, where it can be seen, which library's code each
one is running), and — for runtimes that can tell us themselves — what a
zero-argument C flag function of an *already loaded* library returns. Each OS
answers them its own way (procfs and ``dl_iterate_phdr`` on Linux, the dyld
image list and the Mach thread list on macOS); everything above this package is
OS-neutral.

Backends are imported lazily so that ``import forksafe`` loads no ctypes
library and touches no OS interface.
"""

from __future__ import annotations

import sys

from forksafe._platform._types import LoadedLibrary, OSThread, Platform

__all__ = ["LoadedLibrary", "OSThread", "Platform", "current"]


class _Unsupported:
    """A platform we know nothing about: no libraries, no threads, no flags."""

    name = sys.platform

    def loaded_libraries(self) -> list[LoadedLibrary]:
        return []

    def threads(self, skip: frozenset[int], libraries: list[LoadedLibrary]) -> list[OSThread]:
        return []

    def call_flag(self, library: str, symbol: str) -> int | None:
        return None

    def native_id(self, ident: int) -> int | None:
        return None


_current: Platform | None = None


def current() -> Platform:
    """The backend for this OS, created on first use."""
    global _current
    if _current is None:
        if sys.platform.startswith("linux"):
            from forksafe._platform._linux import LinuxPlatform

            _current = LinuxPlatform()
        elif sys.platform == "darwin":
            from forksafe._platform._darwin import DarwinPlatform

            _current = DarwinPlatform()
        else:
            _current = _Unsupported()
    return _current
