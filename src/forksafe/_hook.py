"""The environment activation hook: the guard for processes you do not control.

``forksafe-hook.pth``, installed next to the package in site-packages, holds
one line that ``site`` runs at every interpreter start. It reads
``os.environ`` (already imported by ``site``) and does nothing else unless
``FORKSAFE_POLICY`` or ``FORKSAFE_REPORT`` is set, so a Python without those
variables pays one dictionary lookup. Only then is this module imported and
``activate()`` called.

Why a ``.pth`` file and not a ``sitecustomize`` module: there is only one
``sitecustomize`` per interpreter (Debian and many distributions ship their
own), so ours would either shadow theirs or be shadowed; ``.pth`` files
compose, are installed and removed by pip with the package, and work the same
for ``pip install .`` and ``pip install -e .`` (see ``hatch_build.py``).
The price: only interpreters that process *this* site-packages directory pick
the hook up — the same environment (or a venv with
``--system-site-packages`` over it), started without ``-S``. ``-E``/``-I``
do not matter: these are not ``PYTHON*`` variables and isolated mode still
processes site-packages.

A bad value never stops the program: it gets one line on stderr naming the
variable and the accepted values, and the program runs on (unguarded if the
policy itself is bad).
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing is not imported at every interpreter start for this
if TYPE_CHECKING:
    from typing import Mapping, TextIO

ENV_POLICY = "FORKSAFE_POLICY"
ENV_REPORT = "FORKSAFE_REPORT"
ENV_HANG_TIMEOUT = "FORKSAFE_HANG_TIMEOUT"
ENV_FAIL_ON = "FORKSAFE_FAIL_ON"

ENV_POLICIES = ("log", "warn", "raise", "off")

BAD_POLICY = (
    "forksafe: ignoring {name}={value!r}: expected one of log, warn, raise, off; "
    "the fork guard is off in this process"
)
BAD_HANG_TIMEOUT = (
    "forksafe: ignoring {name}={value!r}: expected a positive number of seconds; "
    "hung children are not watched in this process"
)
BAD_FAIL_ON = (
    "forksafe: ignoring {name}={value!r}: expected warning or error; using error"
)
ACTIVATION_FAILED = (
    "forksafe: the environment hook could not install the fork guard ({error}); "
    "the program runs unguarded"
)


_ran = False


def from_pth() -> None:
    """The ``.pth`` entry point: ``activate()`` once per process.

    ``site`` may process the same site-packages directory twice (seen on a
    pyenv-built 3.11 venv: once from ``venv()``, once from ``main()``), which
    would otherwise print every complaint twice.
    """
    global _ran
    if not _ran:
        _ran = True
        activate()


def _shown(value: str) -> str:
    """A bad value, shortened: it is echoed to stderr, never into a report."""
    return value if len(value) <= 40 else value[:37] + "..."


def activate(environ: Mapping[str, str] | None = None, *, stderr: TextIO | None = None) -> bool:
    """Install the guard as the environment asks; True if it was installed.

    ``FORKSAFE_POLICY`` is ``log``, ``warn``, ``raise`` or ``off``; when only
    ``FORKSAFE_REPORT`` is set the policy is ``log`` (recording was asked for).
    Never raises.
    """
    env = os.environ if environ is None else environ
    out = sys.stderr if stderr is None else stderr

    def say(line: str) -> None:
        try:
            out.write(line + "\n")
            out.flush()
        except Exception:  # no usable stderr: stay silent rather than fail
            pass

    try:
        raw_policy = env.get(ENV_POLICY, "").strip()
        report = env.get(ENV_REPORT, "").strip() or None
        if not raw_policy and report is None:
            return False
        policy = raw_policy.lower() or "log"
        if policy not in ENV_POLICIES:
            say(BAD_POLICY.format(name=ENV_POLICY, value=_shown(raw_policy)))
            return False
        if policy == "off":
            return False
        hang_timeout: float | None = None
        raw_hang = env.get(ENV_HANG_TIMEOUT, "").strip()
        if raw_hang:
            try:
                hang_timeout = float(raw_hang)
            except ValueError:
                hang_timeout = None
            if hang_timeout is None or not 0 < hang_timeout < float("inf"):
                say(BAD_HANG_TIMEOUT.format(name=ENV_HANG_TIMEOUT, value=_shown(raw_hang)))
                hang_timeout = None
        fail_on = env.get(ENV_FAIL_ON, "").strip().lower() or "error"
        if fail_on not in ("warning", "error"):
            say(BAD_FAIL_ON.format(name=ENV_FAIL_ON, value=_shown(fail_on)))
            fail_on = "error"
        from forksafe import _guard

        if report is not None and not _guard.open_sink_or_warn(report, ENV_REPORT):
            report = None
        _guard.install(policy, fail_on=fail_on, hang_timeout=hang_timeout, report=report)
        return True
    except Exception as exc:  # the hook runs inside every Python of the tree
        say(ACTIVATION_FAILED.format(error=f"{type(exc).__name__}: {exc}"))
        return False
