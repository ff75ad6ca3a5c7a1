"""Why a guarded child failed: its uncaught exception, kept where its parent looks.

A forked child that fails with an uncaught exception prints its traceback on the
stderr it shares with everyone and exits 1; its parent sees "exited 1" and no
more. The guard keeps the exception for the parent: written into the child's
crash file (``forksafe._child``), which the parent reads when it reaps the child
and turns into the outcome's traceback and diagnosis (``forksafe._diagnose``).

A child dies of an exception in one of two places:

* a child of a plain ``os.fork`` whose code falls through to the top level: the
  interpreter calls ``sys.excepthook``, which the guard wraps;
* a ``multiprocessing`` process: its ``_bootstrap`` catches the exception, prints
  it and returns 1, so the guard wraps ``BaseProcess._bootstrap`` to run the
  process's ``run`` through a wrapper that records what it raises.

Nothing of this runs until an exception reaches those points, and only a process
armed as a guarded child writes anything (a parent's own exceptions are its own).
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # the guard imports this at interpreter start: no typing
if TYPE_CHECKING:
    import types
    from typing import Any, Callable

#: The first line of an exception record in a crash file.
HEADER = "forksafe: uncaught exception in the child"

#: The crash file this process is armed with, if any (``forksafe._child.armed``, set
#: by the guard when it loads the followers; None before, or without them).
armed: Callable[[], Any] | None = None

_state: dict[str, Any] = {}


def install() -> None:
    """Wrap ``sys.excepthook`` (now) and multiprocessing's process start (when imported)."""
    if "excepthook" in _state:
        return
    original = sys.excepthook

    def excepthook(kind: type[BaseException], value: BaseException,
                   tb: types.TracebackType | None) -> Any:
        if _state.get("excepthook") is excepthook:
            record(kind, value, tb)
        return original(kind, value, tb)

    _state["excepthook"] = excepthook
    _state["original_excepthook"] = original
    sys.excepthook = excepthook


def wrap_multiprocessing(process: types.ModuleType) -> None:
    """Wrap ``BaseProcess._bootstrap`` of ``multiprocessing.process`` (import watcher)."""
    base = getattr(process, "BaseProcess", None)
    original = getattr(base, "_bootstrap", None)
    if base is None or original is None or "bootstrap" in _state:
        return

    def _bootstrap(self: Any, *args: Any, **kwargs: Any) -> Any:
        if _state.get("bootstrap") is _bootstrap:
            run = self.run

            def recorded_run() -> Any:
                try:
                    return run()
                except (SystemExit, KeyboardInterrupt):
                    raise
                except BaseException as exc:
                    record(type(exc), exc, exc.__traceback__)
                    raise

            self.run = recorded_run  # this child's copy of the object only
        return original(self, *args, **kwargs)

    _bootstrap.__wrapped__ = original  # type: ignore[attr-defined]
    _state.update(bootstrap=_bootstrap, original_bootstrap=original, base=base)
    base._bootstrap = _bootstrap


def uninstall() -> None:
    """Put back what ``install`` and ``wrap_multiprocessing`` replaced, by identity."""
    if sys.excepthook is _state.get("excepthook"):
        sys.excepthook = _state["original_excepthook"]
    base = _state.get("base")
    if base is not None and base.__dict__.get("_bootstrap") is _state.get("bootstrap"):
        base._bootstrap = _state["original_bootstrap"]
    _state.clear()


def record(kind: type[BaseException], value: BaseException,
           tb: types.TracebackType | None) -> None:
    """Write the exception into this child's crash file, if it is an armed child. Never
    raises: the child is failing already."""
    try:
        crash = armed() if armed is not None else None  # None: not a guarded child
        if crash is None:
            return
        import traceback

        text = "".join(traceback.format_exception(kind, value, tb))
        os.write(crash[0], f"{HEADER}\n{text}\n".encode("utf-8", "replace"))
    except Exception:
        return
