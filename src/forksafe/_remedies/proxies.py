"""``getproxies()`` / ``proxy_bypass()``: urllib's answers, system settings read out of process.

On macOS ``urllib.request.getproxies()`` asks the SystemConfiguration framework
(through ``_scproxy``) when no proxy environment variable is set. That call
runs libdispatch machinery, after which a forked child crashes on its own next
proxy lookup ("crashed on child side of fork pre-exec") — the failure behind
many hung or crashed Celery, gunicorn and Django test workers on macOS. The
remedy: never make that call in a process that may fork. forksafe reads the
system configuration in a short-lived helper process (``_proxy_helper.py``,
started with exec, never a bare fork), once, and caches the JSON answer, which
a forked child then inherits and uses without touching any framework. The
Windows registry is read the same way, for the same answers everywhere (Windows
itself has no fork).

The environment variables (``http_proxy``, ``no_proxy``, ...) are read
in-process on every call, exactly as urllib does and with urllib's own
functions, so their answers are urllib's by construction. On other platforms
urllib consults nothing else and neither does forksafe: no helper is started.

A helper that fails, prints something unusable or does not answer within
``TIMEOUT`` seconds is killed (its whole process group) and the lookup falls
back to the environment-only answer, with one ``ForkSafetyWarning`` per process;
the failure is cached, so it is never retried and never waited for again.

No lock guards the cache: two threads that race on the very first lookup both
run the helper and store the same answer. A lock would be one more thing a
child could inherit held.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import types
import warnings
from typing import Any, Callable, Sequence

from forksafe._errors import ForkSafetyWarning
from forksafe._interpreter import interpreter_problem

HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_proxy_helper.py")
#: Seconds the helper may take before the environment-only answer is used.
TIMEOUT = 5.0

HELPER_FAILED = (
    "forksafe: the system proxy settings could not be read ({reason}); using the proxy "
    "environment variables only. Set http_proxy/https_proxy/no_proxy to choose proxies "
    "explicitly, or make sure {executable} can run"
)
TIMED_OUT = "the helper process gave no answer within {timeout:g} seconds"
EXITED = "the helper process exited with status {code}{detail}"
UNUSABLE = "the helper process printed no usable answer"
NOT_STARTED = "the helper process could not be started: {error}"

#: Platforms whose urllib reads system settings besides the environment.
_SYSTEM_PLATFORMS = ("darwin", "win32")

_cache: dict[tuple[str, ...], dict[str, Any]] = {}
#: (module, name, urllib's function, forksafe's function) for each rebinding made.
_patched: list[tuple[Any, str, Any, Any]] = []


class Lookup:
    """Where the system proxy settings come from: a platform, the helper command that
    reads them (default: ``_proxy_helper.py`` under this Python) and how long it may
    take. The public functions use this machine's (``_HERE``); tests make others."""

    def __init__(self, platform: str = sys.platform, helper: Sequence[str] | None = None,
                 timeout: float = TIMEOUT) -> None:
        self.platform = platform
        self.helper = helper
        self.timeout = timeout

    def getproxies(self) -> dict[str, str]:
        """Scheme -> proxy URL, as ``urllib.request.getproxies()`` answers, fork-safely.

        Proxy environment variables win, as in urllib; otherwise the system
        configuration, read once in a helper process and cached.
        """
        import urllib.request

        environment: dict[str, str] = urllib.request.getproxies_environment()
        if environment:
            return environment
        system = _system(self.platform, self.helper, self.timeout)
        return dict(system["proxies"]) if system else {}

    def proxy_bypass(self, host: str) -> bool:
        """Whether ``host`` bypasses the proxy, as ``urllib.request.proxy_bypass()`` answers."""
        import urllib.request

        environment = urllib.request.getproxies_environment()
        if environment:
            check = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
            return bool(check(host, environment))
        system = _system(self.platform, self.helper, self.timeout)
        if not system:
            return False
        if system["kind"] == "macos":
            sysconf = urllib.request._proxy_bypass_macosx_sysconf  # type: ignore[attr-defined]
            return bool(sysconf(host, system.get("settings", {})))
        if system["kind"] == "windows":
            return _windows_bypass(host, str(system.get("override", "")))
        return False

    def patch_urllib(self) -> None:
        """Route ``urllib.request.getproxies``/``proxy_bypass`` through this lookup. Idempotent.

        Besides ``urllib.request`` itself, every imported module that holds
        urllib's very functions under those names (``requests.utils`` and
        ``requests.compat`` did ``from urllib.request import getproxies``) gets
        forksafe's, so that requests, httpx and aiohttp follow too; modules
        imported later pick them up from ``urllib.request``.
        """
        if _patched:
            return
        import urllib.request

        lookup = self

        def patched_getproxies() -> dict[str, str]:
            return lookup.getproxies()

        def patched_proxy_bypass(host: str) -> bool:
            return lookup.proxy_bypass(host)

        patched_getproxies.__doc__ = getproxies.__doc__
        patched_proxy_bypass.__doc__ = proxy_bypass.__doc__
        ours: dict[str, Callable[..., Any]] = {
            "getproxies": patched_getproxies, "proxy_bypass": patched_proxy_bypass}
        originals = {name: getattr(urllib.request, name) for name in ours}
        for module in list(sys.modules.values()):
            namespace = getattr(module, "__dict__", None)
            if not isinstance(namespace, dict):
                continue
            for name, original in originals.items():
                if namespace.get(name) is original:  # a plain dict read: no module __getattr__
                    setattr(module, name, ours[name])
                    _patched.append((module, name, original, ours[name]))


_HERE = Lookup()


def getproxies() -> dict[str, str]:
    """Scheme -> proxy URL, as ``urllib.request.getproxies()`` answers, fork-safely.

    Proxy environment variables win, as in urllib; otherwise the system
    configuration, read once in a helper process and cached.
    """
    return _HERE.getproxies()


def proxy_bypass(host: str) -> bool:
    """Whether ``host`` bypasses the proxy, as ``urllib.request.proxy_bypass()`` answers."""
    return _HERE.proxy_bypass(host)


def patch_urllib() -> None:
    """Route ``urllib.request.getproxies``/``proxy_bypass`` through forksafe. Idempotent.

    Every imported module that holds urllib's very functions under those names
    (``requests.utils``, ``requests.compat``) gets forksafe's too; modules
    imported later pick them up from ``urllib.request``.
    """
    _HERE.patch_urllib()


def unpatch_urllib() -> None:
    """Undo ``patch_urllib()``: urllib's functions are put back by identity."""
    while _patched:
        module, name, original, ours = _patched.pop()
        if module.__dict__.get(name) is ours:  # not rebound by someone else since
            setattr(module, name, original)


def _system(platform: str, helper: Sequence[str] | None, timeout: float) -> dict[str, Any] | None:
    """The system configuration, from the cache or a helper run; None where there is none."""
    if platform not in _SYSTEM_PLATFORMS:
        return None
    command = tuple(helper) if helper is not None else (sys.executable, "-I", HELPER)
    answer = _cache.get(command)
    if answer is None:
        failure: str | None = interpreter_problem() if helper is None else None
        if failure is not None:  # frozen or embedded: never run the program itself
            answer = {"kind": "none", "proxies": {}}
        else:
            answer, failure = _run_helper(command, timeout)
        _cache[command] = answer
        if failure is not None:
            warnings.warn(HELPER_FAILED.format(reason=failure, executable=command[0]),
                          ForkSafetyWarning, stacklevel=_caller_level())
    return answer


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside this module, seen from its caller.

    The lookup is reached through ``getproxies()`` directly or through the
    functions ``patch_urllib()`` installs: either way the warning should point
    at the program's line that asked for proxies.
    """
    level = 2
    frame: types.FrameType | None = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename == __file__:
        level += 1
        frame = frame.f_back
    return level


def _run_helper(command: tuple[str, ...], timeout: float) -> tuple[dict[str, Any], str | None]:
    """Run the helper; its answer, or the environment-only answer and why."""
    empty: dict[str, Any] = {"kind": "none", "proxies": {}}
    try:
        # start_new_session: on timeout the whole group goes, helpers of the helper too.
        # No preexec_fn: the child runs no Python code between fork and exec.
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
    except (OSError, ValueError) as exc:
        return empty, NOT_STARTED.format(error=exc.strerror if isinstance(exc, OSError)
                                         and exc.strerror else exc)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        return empty, TIMED_OUT.format(timeout=timeout)
    finally:
        if proc.poll() is None:
            _kill(proc)
    if proc.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines()
        detail = f": {lines[-1]}" if lines else ""
        return empty, EXITED.format(code=proc.returncode, detail=detail)
    try:
        answer = json.loads(out.decode(errors="replace"))
    except ValueError:
        return empty, UNUSABLE
    if not _valid(answer):
        return empty, UNUSABLE
    return answer, None


def _valid(answer: Any) -> bool:
    if not isinstance(answer, dict) or answer.get("kind") not in ("macos", "windows", "none"):
        return False
    proxies = answer.get("proxies")
    if not isinstance(proxies, dict):
        return False
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in proxies.items()):
        return False
    return isinstance(answer.get("settings", {}), dict)


#: Seconds to wait for a killed helper to be reaped (it normally takes microseconds).
_REAP_TIMEOUT = 1.0


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """Kill the helper's process group and reap the helper, never waiting on its pipes.

    Reading the pipes to their end (``communicate()``) would wait for every
    process holding them open — including a descendant that left the group
    with ``setsid`` and lives on, which would block the caller for as long.
    """
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        with contextlib.suppress(OSError):
            proc.kill()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    # If it is not reaped in time, subprocess does it later (Popen.__del__ keeps it listed).
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=_REAP_TIMEOUT)


def _windows_bypass(host: str, override: str) -> bool:
    """The Windows "ProxyOverride" match, as urllib does it on Windows.

    CPython 3.13 has it as ``_proxy_bypass_winreg_override``; older versions
    also resolve the host in DNS first, which forksafe does not do (it only
    matches the name as given). Not tested on Windows.
    """
    import urllib.request

    check = getattr(urllib.request, "_proxy_bypass_winreg_override", None)
    if check is not None:
        return bool(check(host, override))
    import fnmatch

    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    for entry in override.split(";"):
        test = entry.strip()
        if test == "<local>":
            if "." not in name:
                return True
        elif test and fnmatch.fnmatch(name.lower(), test.lower()):
            return True
    return False
