"""``forksafe doctor``: how this Python and its environment stand towards fork.

``check()`` looks at a running program; the doctor looks at what every program
started here will inherit: which SQLite library ``sqlite3`` links, which start
method multiprocessing uses by default (and what CPython 3.14 changes), whether
CPython's own fork warning is visible, which fork-related environment
variables are set, which fork-unsafe native runtimes are installed, and
whether ``gc.freeze()`` is in use. Each line gets a verdict — ``ok``, ``note``
(worth knowing) or ``problem`` (fix it) — and every problem carries its fix.

The doctor must not change what it diagnoses, and ``forksafe.doctor()`` may be
called inside a user's process: it imports none of the packages it reports on
(installed runtimes are found from package metadata, ``RECORD`` files, on
disk), never loads ``sqlite3`` in-process (a short-lived helper interpreter,
started with exec, reports the library it loaded), never fixes
multiprocessing's start method by asking for it, and reports environment
variables by name only, never their values.

The JSON form (``forksafe doctor --json``, ``forksafe.doctor()``) is stable and
documented in docs/remedies.md; its ``schema`` is ``forksafe-doctor/1``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from forksafe._render.text import printable

SCHEMA = "forksafe-doctor/1"
OK, NOTE, PROBLEM = "ok", "note", "problem"
VERDICTS = (OK, NOTE, PROBLEM)
#: Seconds the SQLite helper interpreter may take.
HELPER_TIMEOUT = 10.0
#: At most this many files of one distribution's RECORD are looked at.
MAX_FILES = 50_000

# -- messages (tests import these) --------------------------------------------

SQLITE_APPLE = (
    "sqlite3 uses Apple's system SQLite ({library}, SQLite {version}); it starts libdispatch "
    "work from sqlite3_initialize, and a child forked after the first connection crashes "
    "on its first SQLite call"
)
SQLITE_APPLE_FIX = (
    "use a Python that bundles its own SQLite (the python.org installer, Homebrew, conda, "
    "pyenv/uv builds linked against Homebrew's sqlite), or install pysqlite3-binary (or "
    "pysqlite3 built against Homebrew's SQLite) and import it as sqlite3"
)
SQLITE_BUNDLED = "sqlite3 uses SQLite {version} compiled into Python's own {module}"
SQLITE_PYTHON = "sqlite3 uses SQLite {version} from {library}, shipped with this Python"
SQLITE_SYSTEM = (
    "sqlite3 uses the system SQLite {version} ({library}); it keeps no threads, so it is not "
    "itself a fork hazard (connections carried across fork are: see forksafe.protect_sqlite())"
)
SQLITE_MISSING = "this Python has no sqlite3 module"
SQLITE_UNKNOWN = "could not inspect sqlite3 in a helper interpreter: {reason}"

START_FORK = (
    "multiprocessing's default start method here is 'fork'{how}; CPython 3.14 changes the "
    "default to 'forkserver' on Linux and the other POSIX systems (macOS has used 'spawn' since "
    "3.8), where targets must be picklable and the entry point guarded by "
    "`if __name__ == \"__main__\":`"
)
START_FORK_FIX = (
    "choose per pool: forksafe.get_context() (fork only when safe) or "
    "multiprocessing.get_context('forkserver'); test the program with 'forkserver' now"
)
START_SAFE = (
    "multiprocessing's default start method here is {method!r}{how}: workers do not inherit "
    "the parent's threads or locks (targets must be picklable; guard the entry point with "
    "`if __name__ == \"__main__\":`)"
)
START_FORK_MACOS = (
    "this program set multiprocessing's start method to 'fork' on macOS, where system "
    "frameworks (proxy lookup, Apple's SQLite, Objective-C) crash forked children"
)
START_FORK_MACOS_FIX = "remove set_start_method('fork'), or use forksafe.get_context()"

WARN_OLD = (
    "CPython {version} does not warn when a multi-threaded process forks (3.12 and later "
    "emit a DeprecationWarning)"
)
WARN_OLD_FIX = (
    "forksafe.install() (or `forksafe run`) warns with the threads and libraries involved"
)
WARN_VISIBLE = (
    "CPython's fork DeprecationWarning is shown under the current warning filters, both for "
    "os.fork() in __main__ and in libraries"
)
WARN_PARTLY = (
    "CPython's fork DeprecationWarning is shown for os.fork() called from __main__ only; a "
    "fork inside a library (multiprocessing, concurrent.futures, a server) is silent"
)
WARN_HIDDEN = "CPython's fork DeprecationWarning is hidden by the current warning filters"
WARN_ERROR = (
    "CPython's fork DeprecationWarning is turned into an error by the current warning filters"
)
WARN_FIX = (
    "run with -W default::DeprecationWarning (or PYTHONWARNINGS=default::DeprecationWarning), "
    "or use forksafe.install(), which names the threads and libraries involved"
)

ENV_OBJC_SET = (
    "OBJC_DISABLE_INITIALIZE_FORK_SAFETY is set: it only stops the Objective-C runtime from "
    "aborting a child forked while another thread ran a class's +initialize; the child then "
    "deadlocks or misbehaves instead of crashing loudly"
)
ENV_OBJC_FIX = (
    "unset it and remove the unsafe fork instead: forksafe.get_context(), or fork before "
    "any thread or system framework is used"
)
ENV_OBJC_OTHER = "OBJC_DISABLE_INITIALIZE_FORK_SAFETY is set; it has no effect outside macOS"
ENV_OBJC_UNSET = "OBJC_DISABLE_INITIALIZE_FORK_SAFETY is not set (good: it hides, never fixes)"
ENV_NO_PROXY_MAC_SET = (
    "{names} set: urllib (and requests) skip the macOS system proxy lookup, the call that "
    "crashes forked children, but the system's proxy settings are then ignored"
)
ENV_NO_PROXY_MAC_UNSET = (
    "no proxy variable is set: urllib and requests will ask macOS's SystemConfiguration for "
    "proxies in-process, after which a forked child can crash on its own lookup"
)
ENV_NO_PROXY_MAC_FIX = (
    "forksafe.patch_urllib() reads the system settings in a helper process instead"
)
ENV_NO_PROXY_OTHER = (
    "{names}; urllib reads only environment variables here, so proxy lookups are fork-safe"
)
ENV_OMP_SET = (
    "OMP_NUM_THREADS is set: it sizes OpenMP thread pools (1 means GNU OpenMP starts no pool, "
    "so a fork after numerical code cannot hang on one)"
)
ENV_OMP_UNSET = (
    "OMP_NUM_THREADS is not set: OpenMP pools get one thread per core (a fork after GNU "
    "OpenMP's first parallel region hangs the child; see the runtimes below)"
)
ENV_GRPC_ON = "GRPC_ENABLE_FORK_SUPPORT is set to a true value: gRPC prepares itself for fork"
ENV_GRPC_OFF = (
    "GRPC_ENABLE_FORK_SUPPORT is {state}: a child forked after gRPC started its threads "
    "crashes or hangs on its first RPC"
)
ENV_GRPC_FIX = (
    "create channels only after forking; or set GRPC_ENABLE_FORK_SUPPORT=1 and "
    "GRPC_POLL_STRATEGY=poll before importing grpc"
)
ENV_GRPC_NA = "GRPC_ENABLE_FORK_SUPPORT is {state}; grpcio is not installed"
ENV_POLL_SET = (
    "GRPC_POLL_STRATEGY is set: gRPC's fork support works only with the 'poll' strategy"
)
ENV_POLL_MISSING = (
    "GRPC_POLL_STRATEGY is not set while GRPC_ENABLE_FORK_SUPPORT is on: gRPC's fork support "
    "needs the 'poll' strategy"
)
ENV_POLL_FIX = "set GRPC_POLL_STRATEGY=poll next to GRPC_ENABLE_FORK_SUPPORT=1"
ENV_POLL_UNSET = "GRPC_POLL_STRATEGY is not set"

RUNTIME_FOUND = "{dist} (import {imports}) ships {runtime}: {files}"
RUNTIMES_NONE = "no installed package ships a fork-unsafe native runtime"

GC_FROZEN = "gc.freeze() has been called in this process ({count} objects frozen)"
GC_ADVICE = (
    "pre-forking servers (gunicorn --preload, Celery prefork, uWSGI) keep memory shared with "
    "their workers only if the workers' garbage collector leaves inherited objects alone"
)
GC_FIX = (
    "call gc.disable() early in the parent and gc.freeze() right before forking the workers "
    "(then gc.enable() in them), so that collections in the children do not write to, and "
    "un-share, every inherited object"
)

#: The fork-relevant environment variables the doctor reports (by name only).
ENVIRONMENT = ("OBJC_DISABLE_INITIALIZE_FORK_SAFETY", "no_proxy", "NO_PROXY", "OMP_NUM_THREADS",
               "GRPC_ENABLE_FORK_SUPPORT", "GRPC_POLL_STRATEGY")

FORK_WARNING_TEXT = (
    "This process (pid=1) is multi-threaded, use of fork() may lead to deadlocks in the child."
)
_TRUE = ("1", "true", "yes", "on")


@dataclass
class Line:
    """One diagnosis: a verdict, what was found, and the fix when it is a problem."""

    id: str
    title: str
    verdict: str
    summary: str
    fix: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "title": self.title, "verdict": self.verdict,
                "summary": self.summary, "fix": self.fix, "data": self.data}


# -- SQLite -------------------------------------------------------------------

_SQLITE_SCRIPT = r"""
import json, sys
try:
    import sqlite3, _sqlite3
except ImportError:
    print(json.dumps({"missing": True})); sys.exit(0)
images = []
try:
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[5].startswith("/") and parts[5] not in images:
                images.append(parts[5])
except OSError:
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        libc._dyld_get_image_name.restype = ctypes.c_char_p
        for i in range(libc._dyld_image_count()):
            images.append(libc._dyld_get_image_name(i).decode(errors="replace"))
    except Exception:
        pass
print(json.dumps({"version": sqlite3.sqlite_version, "module": getattr(_sqlite3, "__file__", None),
                  "images": [p for p in images if "sqlite" in p.lower()]}))
"""


def inspect_sqlite(*, _command: Sequence[str] | None = None,
                   _timeout: float = HELPER_TIMEOUT) -> dict[str, Any]:
    """What ``import sqlite3`` loads, asked of a fresh interpreter (never this process)."""
    if _command is None:
        from forksafe._interpreter import interpreter_problem

        problem = interpreter_problem()
        if problem is not None:  # frozen or embedded: never run the program itself
            return {"error": problem}
    command = list(_command) if _command is not None else [sys.executable, "-I", "-c",
                                                           _SQLITE_SCRIPT]
    try:
        proc = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no answer within {_timeout:g} seconds"}
    except OSError as exc:
        return {"error": exc.strerror or str(exc)}
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return {"error": f"exit status {proc.returncode}" + (f": {lines[-1]}" if lines else "")}
    try:
        info = json.loads(proc.stdout)
    except ValueError:
        return {"error": "unreadable answer"}
    return info if isinstance(info, dict) else {"error": "unreadable answer"}


#: The ``data`` of an SQLite line when nothing could be inspected: same keys, no facts.
_NO_SQLITE: dict[str, Any] = {"version": None, "module": None, "library": None,
                              "bundled": None}


def sqlite_line(info: Mapping[str, Any], platform: str,
                prefixes: Sequence[str] = (sys.base_prefix, sys.prefix)) -> Line:
    """Judge the SQLite library that ``inspect_sqlite`` found."""
    from forksafe._catalog import find

    title = "SQLite library"
    if info.get("missing"):
        return Line("sqlite-library", title, NOTE, SQLITE_MISSING, None,
                    {**_NO_SQLITE, "kind": "missing"})
    if "error" in info:
        return Line("sqlite-library", title, NOTE, SQLITE_UNKNOWN.format(reason=info["error"]),
                    None, {**_NO_SQLITE, "kind": "unknown"})
    version = str(info.get("version", "?"))
    module = info.get("module")
    module_path = os.path.realpath(module) if isinstance(module, str) else None
    libraries = [p for p in info.get("images", []) if isinstance(p, str)
                 and os.path.realpath(p) != module_path and p != module]
    library = libraries[0] if libraries else None
    data: dict[str, Any] = {"version": version, "module": module, "library": library,
                            "bundled": library is None}
    apple = find("apple-sqlite")
    if library is not None and platform == "darwin" and apple.matches_library(library):
        data["kind"] = "apple-system"
        return Line("sqlite-library", title, PROBLEM,
                    SQLITE_APPLE.format(library=library, version=version), SQLITE_APPLE_FIX, data)
    if library is None:
        data["kind"] = "bundled"
        name = os.path.basename(module) if isinstance(module, str) else "_sqlite3 module"
        return Line("sqlite-library", title, OK,
                    SQLITE_BUNDLED.format(version=version, module=name), None, data)
    real = os.path.realpath(library)
    roots = [os.path.realpath(p) + os.sep for p in prefixes]
    if any(real.startswith(root) for root in roots):
        data["kind"] = "python"
        return Line("sqlite-library", title, OK,
                    SQLITE_PYTHON.format(version=version, library=library), None, data)
    data["kind"] = "system"
    return Line("sqlite-library", title, OK,
                SQLITE_SYSTEM.format(version=version, library=library), None, data)


# -- multiprocessing start method --------------------------------------------

def start_method_facts() -> tuple[str, str | None]:
    """(platform default, method set by the program or None), without fixing either.

    ``multiprocessing.get_start_method()`` without ``allow_none`` would *set*
    the default for the rest of the process, so the default is read from the
    default context's own record (stable since Python 3.4).
    """
    import multiprocessing
    import multiprocessing.context

    actual = multiprocessing.get_start_method(allow_none=True)
    inner = getattr(multiprocessing.context._default_context, "_default_context", None)
    if inner is not None:
        default = str(inner.get_start_method())
    else:
        default = expected_default((sys.version_info[0], sys.version_info[1]), sys.platform)
    return default, actual


def expected_default(version: tuple[int, int], platform: str) -> str:
    """CPython's default start method for a version and platform."""
    if platform in ("win32", "cygwin"):
        return "spawn"
    if platform == "darwin" and version >= (3, 8):
        return "spawn"
    return "forkserver" if version >= (3, 14) else "fork"


def start_method_line(default: str, actual: str | None, platform: str) -> Line:
    method = actual or default
    how = " (set by this program)" if actual else " (this platform's default)"
    data = {"default": default, "set_by_program": actual, "effective": method,
            "default_in_3_14": expected_default((3, 14), platform)}
    title = "Start method"
    if method == "fork" and platform == "darwin" and actual:
        return Line("start-method", title, PROBLEM, START_FORK_MACOS, START_FORK_MACOS_FIX, data)
    if method == "fork":
        return Line("start-method", title, NOTE, START_FORK.format(how=how), START_FORK_FIX,
                    data)
    return Line("start-method", title, OK, START_SAFE.format(method=method, how=how), None,
                data)


# -- CPython's own fork warning ----------------------------------------------

def filter_action(filters: Iterable[tuple[Any, ...]], category: type[Warning], message: str,
                  module: str, default: str) -> str:
    """The action ``warnings`` would take, found without emitting anything.

    Mirrors the matching in CPython's ``_warnings.c``: ``None`` matches
    anything, a plain string (the built-in default filters are) must be equal,
    a compiled pattern must ``match``.
    """
    for action, msg, cat, mod, lineno in filters:
        if lineno:  # filters for one line of one file cannot apply to every fork
            continue
        if not _filter_matches(msg, message) or not _filter_matches(mod, module):
            continue
        if not issubclass(category, cat):
            continue
        return str(action)
    return default


def _filter_matches(pattern: Any, text: str) -> bool:
    if pattern is None:
        return True
    if isinstance(pattern, str):
        return pattern == text
    return bool(pattern.match(text))


def fork_warning_line(version: tuple[int, int], filters: Sequence[tuple[Any, ...]],
                      default_action: str) -> Line:
    title = "CPython fork warning"
    if version < (3, 12):
        text = WARN_OLD.format(version=f"{version[0]}.{version[1]}")
        return Line("fork-warning", title, NOTE, text, WARN_OLD_FIX,
                    {"emitted": False, "action_in_main": None, "action_in_libraries": None})
    actions = {
        where: filter_action(filters, DeprecationWarning, FORK_WARNING_TEXT, where,
                             default_action)
        for where in ("__main__", "multiprocessing.popen_fork")
    }
    data: dict[str, Any] = {"emitted": True, "action_in_main": actions["__main__"],
                            "action_in_libraries": actions["multiprocessing.popen_fork"]}
    if "error" in actions.values():
        return Line("fork-warning", title, NOTE, WARN_ERROR, None, data)
    shown = {where: action != "ignore" for where, action in actions.items()}
    if all(shown.values()):
        return Line("fork-warning", title, OK, WARN_VISIBLE, None, data)
    if shown["__main__"]:
        return Line("fork-warning", title, NOTE, WARN_PARTLY, WARN_FIX, data)
    return Line("fork-warning", title, NOTE, WARN_HIDDEN, WARN_FIX, data)


# -- environment variables (names only) ---------------------------------------

def environment_lines(environ: Mapping[str, str], platform: str,
                      grpc_installed: bool) -> list[Line]:
    """One line per fork-relevant variable; values are never reported."""
    lines = []
    is_set = {name: name in environ for name in ENVIRONMENT}

    def line(name: str, verdict: str, summary: str, fix: str | None = None) -> Line:
        return Line(f"env:{name}", name, verdict, summary, fix, {"set": is_set[name]})

    name = "OBJC_DISABLE_INITIALIZE_FORK_SAFETY"
    if not is_set[name]:
        lines.append(line(name, OK, ENV_OBJC_UNSET))
    elif platform == "darwin":
        lines.append(line(name, PROBLEM, ENV_OBJC_SET, ENV_OBJC_FIX))
    else:
        lines.append(line(name, NOTE, ENV_OBJC_OTHER))

    proxy_vars = sorted(n for n in environ if n.lower().endswith("_proxy"))
    names = ", ".join(proxy_vars) + (" is" if len(proxy_vars) == 1 else " are")
    proxy = Line("env:no_proxy", "no_proxy / NO_PROXY", OK, "", None,
                 {"set": is_set["no_proxy"] or is_set["NO_PROXY"],
                  "no_proxy": is_set["no_proxy"], "NO_PROXY": is_set["NO_PROXY"],
                  "proxy_variables": proxy_vars})
    if platform == "darwin":
        if proxy_vars:
            proxy.verdict, proxy.summary = NOTE, ENV_NO_PROXY_MAC_SET.format(names=names)
        else:
            proxy.verdict, proxy.summary = NOTE, ENV_NO_PROXY_MAC_UNSET
        proxy.fix = ENV_NO_PROXY_MAC_FIX
    else:
        what = f"{names} set" if proxy_vars else "no proxy variable is set"
        proxy.summary = ENV_NO_PROXY_OTHER.format(names=what)
    lines.append(proxy)

    name = "OMP_NUM_THREADS"
    lines.append(line(name, NOTE if is_set[name] else OK,
                      ENV_OMP_SET if is_set[name] else ENV_OMP_UNSET))

    name = "GRPC_ENABLE_FORK_SUPPORT"
    enabled = environ.get(name, "").strip().lower() in _TRUE
    state = "not set" if not is_set[name] else "set to a false value"
    grpc = line(name, OK, ENV_GRPC_ON if enabled else ENV_GRPC_NA.format(state=state))
    grpc.data["enabled"] = enabled
    if not enabled and grpc_installed:
        grpc.verdict, grpc.summary, grpc.fix = NOTE, ENV_GRPC_OFF.format(state=state), ENV_GRPC_FIX
    lines.append(grpc)

    name = "GRPC_POLL_STRATEGY"
    if is_set[name]:
        lines.append(line(name, OK, ENV_POLL_SET))
    elif enabled:
        lines.append(line(name, PROBLEM, ENV_POLL_MISSING, ENV_POLL_FIX))
    else:
        lines.append(line(name, OK, ENV_POLL_UNSET))
    return lines


# -- installed fork-unsafe runtimes -------------------------------------------

@dataclass(frozen=True)
class Distribution:
    """What the doctor needs of an installed distribution: its name, imports and files."""

    name: str
    imports: tuple[str, ...]
    files: tuple[str, ...]


def installed_distributions() -> list[Distribution]:
    """Installed distributions from their metadata: nothing is imported or loaded."""
    import importlib.metadata

    found: dict[str, Distribution] = {}
    for dist in importlib.metadata.distributions():
        try:
            name = dist.metadata["Name"] or "?"
            recorded = dist.files
            files = tuple(str(f) for f in (recorded or ())[:MAX_FILES])
            top = dist.read_text("top_level.txt")
        except Exception:  # a broken installation must not break the doctor
            continue
        if name.lower() in found:  # the first on sys.path wins, as for imports
            continue
        imports = tuple(t for t in (top or "").split() if t) or _top_level(files)
        if recorded is None:  # no RECORD (some distro and conda packages): look on disk
            files = _files_on_disk(imports)
        found[name.lower()] = Distribution(name, imports, files)
    return list(found.values())


def _files_on_disk(imports: Iterable[str], *, max_depth: int = 3) -> tuple[str, ...]:
    """Shared libraries under the packages ``imports`` name, found without importing them.

    ``importlib.util.find_spec`` of a top-level name only searches the path;
    the package directory and an auditwheel-style ``<name>.libs`` next to it
    are then listed, a few levels deep, up to ``MAX_FILES`` entries.
    """
    import importlib.util

    out: list[str] = []
    for name in imports:
        if not name.isidentifier():  # find_spec("a.b") would import "a"
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.submodule_search_locations:
            continue
        for location in spec.submodule_search_locations:
            root = os.path.dirname(location)
            for top in (location, location + ".libs"):
                for directory, dirs, names in os.walk(top):
                    depth = directory[len(top):].count(os.sep)
                    if depth >= max_depth:
                        dirs[:] = []
                    out.extend(os.path.relpath(os.path.join(directory, n), root)
                               for n in names if ".so" in n or n.endswith(".dylib"))
                    if len(out) >= MAX_FILES:
                        return tuple(out)
    return tuple(out)


def _top_level(files: Iterable[str]) -> tuple[str, ...]:
    names = set()
    for path in files:
        head, sep, _ = path.partition("/")
        if sep and not head.endswith((".dist-info", ".libs", ".data", ".egg-info")) \
                and head not in ("__pycache__", "..", "bin") and head.isidentifier():
            names.add(head)
        elif not sep and path.endswith(".py"):
            names.add(path[:-3])
    return tuple(sorted(names))


def runtime_lines(distributions: Iterable[Distribution]) -> list[Line]:
    """Installed packages that ship a runtime from the catalog, judged by its severity."""
    from forksafe._catalog import RUNTIMES
    from forksafe._report import Severity

    lines = []
    for dist in sorted(distributions, key=lambda d: d.name.lower()):
        hits: dict[str, list[str]] = {}
        for path in dist.files:
            base = path.rsplit("/", 1)[-1]
            if ".so" not in base and not base.endswith(".dylib"):
                continue
            for runtime in RUNTIMES:
                if runtime.matches_library("/" + path):
                    hits.setdefault(runtime.key, []).append(path)
                    break
        for key, paths in hits.items():
            runtime = next(r for r in RUNTIMES if r.key == key)
            imports = ", ".join(dist.imports) or "?"
            summary = RUNTIME_FOUND.format(dist=dist.name, imports=imports,
                                           runtime=runtime.name, files=", ".join(paths[:3]))
            harmful = runtime.active >= Severity.WARNING
            lines.append(Line(
                f"runtime:{dist.name.lower()}:{key}", runtime.name,
                NOTE if harmful else OK,
                summary + ("; " + runtime.why if harmful else ""),
                runtime.remedy if harmful else None,
                {"distribution": dist.name, "imports": list(dist.imports), "runtime": key,
                 "severity_when_active": str(runtime.active), "files": paths[:10]},
            ))
    if not lines:
        lines.append(Line("runtimes", "Fork-unsafe runtimes", OK, RUNTIMES_NONE))
    return lines


# -- gc.freeze ------------------------------------------------------------------

def gc_line(frozen: int) -> Line:
    if frozen:
        return Line("gc-freeze", "gc.freeze()", OK, GC_FROZEN.format(count=frozen), None,
                    {"frozen": frozen})
    return Line("gc-freeze", "gc.freeze()", NOTE, GC_ADVICE, GC_FIX, {"frozen": 0})


# -- the report -----------------------------------------------------------------

def doctor() -> dict[str, Any]:
    """The environment report as a JSON-ready dict (schema ``forksafe-doctor/1``)."""
    return doctor_with()


def doctor_with(
    *,
    environ: Mapping[str, str] | None = None,
    platform: str = sys.platform,
    version: tuple[int, int] = (sys.version_info[0], sys.version_info[1]),
    sqlite: Mapping[str, Any] | None = None,
    distributions: Iterable[Distribution] | None = None,
    start_method: tuple[str, str | None] | None = None,
    filters: Sequence[tuple[Any, ...]] | None = None,
    frozen: Callable[[], int] | None = None,
) -> dict[str, Any]:
    """``doctor()`` with the facts it reads given instead (for tests): the environment,
    platform, Python version, SQLite facts, installed distributions, start methods,
    warning filters and the gc freeze count."""
    env = os.environ if environ is None else environ
    installed = list(installed_distributions() if distributions is None else distributions)
    grpc_installed = any(d.name.lower() == "grpcio" for d in installed)
    default, actual = start_method_facts() if start_method is None else start_method
    active = list(warnings.filters) if filters is None else list(filters)
    frozen_count: Callable[[], int] = (
        frozen if frozen is not None else getattr(gc, "get_freeze_count", lambda: 0))
    lines = [
        sqlite_line(inspect_sqlite() if sqlite is None else sqlite, platform),
        start_method_line(default, actual, platform),
        fork_warning_line(version, active, getattr(warnings, "defaultaction", "default")),
        *environment_lines(env, platform, grpc_installed),
        *runtime_lines(installed),
        gc_line(frozen_count()),
    ]
    counts = {verdict: sum(1 for line in lines if line.verdict == verdict)
              for verdict in VERDICTS}
    from forksafe import __version__

    return {
        "schema": SCHEMA,
        "forksafe": __version__,
        "python": {"version": ".".join(str(v) for v in sys.version_info[:3]),
                   "implementation": sys.implementation.name,
                   "executable": sys.executable},
        "platform": platform,
        "counts": counts,
        "checks": [line.to_dict() for line in lines],
    }


def render(report: Mapping[str, Any]) -> str:
    """The report as text: one line per check, its verdict first, fixes indented below."""
    import textwrap

    python = report["python"]
    out = [f"forksafe doctor: Python {python['version']} ({python['implementation']}) "
           f"on {report['platform']}", ""]
    for check in report["checks"]:
        head = f"{check['verdict']:<8} {check['title']}: "
        out.extend(textwrap.wrap(check["summary"], 100, initial_indent=head,
                                 subsequent_indent=" " * 9, break_on_hyphens=False,
                                 break_long_words=False))
        if check.get("fix"):
            out.extend(textwrap.wrap(check["fix"], 100, initial_indent=" " * 9 + "fix: ",
                                     subsequent_indent=" " * 14, break_on_hyphens=False,
                                     break_long_words=False))
    counts = report["counts"]
    out.append("")
    out.append(f"{counts[OK]} ok, {counts[NOTE]} note{'s' if counts[NOTE] != 1 else ''}, "
               f"{counts[PROBLEM]} problem{'s' if counts[PROBLEM] != 1 else ''}")
    return "\n".join(out)


def cli(args: argparse.Namespace) -> int:
    """``forksafe doctor [--json]``: exit 1 when a problem was found, else 0."""
    report = doctor()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(printable(render(report)))
    return 1 if report["counts"][PROBLEM] else 0
