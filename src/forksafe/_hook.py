"""The environment activation hook: the guard for processes you do not control.

``forksafe-hook.pth``, installed next to the package in site-packages, holds
one line that ``site`` runs at every interpreter start. It reads
``os.environ`` (already imported by ``site``) and does nothing else unless one of
the four user variables (``forksafe._config.USER_VARIABLES``) is set, so a Python
without them pays four dictionary lookups. Only then is this module imported and
``activate()`` called (which may only say that ``FORKSAFE_FAIL_ON`` alone does
nothing).

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


def activate(environ: Mapping[str, str] | None = None, *, stderr: TextIO | None = None) -> bool:
    """Install the guard as the environment asks (``forksafe._config.from_environment``);
    True if it was installed. Never raises.
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
        from forksafe import _config

        config, problems = _config.from_environment(env)
        for problem in problems:
            say(problem)
        if config is None:
            return False
        accepted = env.get(_config.ENV_ACCEPT, "").strip()
        if accepted:
            from forksafe import _accept

            try:
                _accept.add(_accept.parse(accepted, _config.ENV_ACCEPT))
            except _accept.AcceptError as exc:
                say(f"forksafe: ignoring {_config.ENV_ACCEPT}: {exc}")
        if config.report is not None:
            from forksafe._sink import unusable

            trouble = unusable(config.report, _config.ENV_REPORT)
            if trouble is not None:
                say(trouble)
                config = config.replace(report=None)
        from forksafe import _guard

        _guard.apply(config)
        return True
    except Exception as exc:  # the hook runs inside every Python of the tree
        say(ACTIVATION_FAILED.format(error=f"{type(exc).__name__}: {exc}"))
        return False
