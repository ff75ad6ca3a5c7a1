"""Replacing functions, and putting them back by identity; acting on a module's import.

``install()`` replaces ``os.fork`` and its kin with the guard's wrappers
(``forksafe._forkpath``) and ``uninstall()`` puts the originals back — but only
where our wrapper is still the one bound: another library may have wrapped ours
since, and rebinding would silently drop its wrapper (ours then passes through).
Two wrappers wait for their module (``ImportWatcher``): ``subprocess.Popen`` must
exist to be wrapped, and the observation layer starts when the program imports
``threading``; neither module is imported for a program that does not import it.
"""

from __future__ import annotations

import os
import sys

from forksafe._errors import report_failure

TYPE_CHECKING = False  # typing is not imported at every interpreter start for this
if TYPE_CHECKING:
    import types
    from typing import Any, Callable

#: "os.fork" -> the function our wrapper replaced, and -> our wrapper.
_originals: dict[str, Any] = {}
_wrappers: dict[str, Any] = {}


def owner(name: str) -> tuple[Any, str]:
    """The object holding the function ``name`` ("os.fork"), and the attribute."""
    module, _, attr = name.rpartition(".")
    if module == "os":
        return os, attr
    if module == "subprocess.Popen":
        sp = sys.modules.get("subprocess")
        return (sp.Popen if sp is not None else None), attr
    raise AssertionError(name)


def replace(name: str, make: Callable[[Any], Any]) -> None:
    """Bind ``make(original)`` in place of ``name``, remembering both."""
    holder, attr = owner(name)
    original = getattr(holder, attr)
    wrapper = copy_identity(make(original), original)
    _originals[name] = original
    _wrappers[name] = wrapper
    setattr(holder, attr, wrapper)


def restore_all() -> None:
    """Put every original back where our wrapper is still the one bound."""
    for name, original in list(_originals.items()):
        holder, attr = owner(name)
        if holder is not None and getattr(holder, attr, None) is _wrappers.get(name):
            setattr(holder, attr, original)
        # else someone wrapped our wrapper: leave theirs, ours now passes through
    _originals.clear()
    _wrappers.clear()


def copy_identity(wrapper: Any, original: Any) -> Any:
    """``wrapper`` named like ``original`` (name, qualified name, docstring, __wrapped__)."""
    for attr in ("__name__", "__qualname__", "__doc__"):
        value = getattr(original, attr, None)
        if isinstance(value, str):
            setattr(wrapper, attr, value)
    wrapper.__wrapped__ = original
    return wrapper


class ImportWatcher:
    """Runs a callback right after the program imports one of the watched modules.

    A meta path finder that answers only for those names, by asking the other
    finders and wrapping the loader they return; every other import costs one
    dictionary lookup. A module imported already gets its callback at once
    (``start``).
    """

    def __init__(self, callbacks: dict[str, Callable[[types.ModuleType], None]]) -> None:
        self.callbacks = callbacks
        # Names being looked up through the other finders: one of those may be a finder
        # like this one (the ledger's for sqlite3) that asks the others in turn.
        self._resolving: set[str] = set()

    def start(self) -> None:
        for name in list(self.callbacks):
            if name in sys.modules:
                self.callbacks.pop(name)(sys.modules[name])
        if self.callbacks:
            sys.meta_path.insert(0, self)

    def stop(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        callback = self.callbacks.get(fullname)
        if callback is None or fullname in self._resolving:
            return None
        self._resolving.add(fullname)
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None and spec.loader is not None:
                    spec.loader = _CallbackLoader(spec.loader, self, fullname)  # type: ignore[assignment]
                    return spec
        finally:
            self._resolving.discard(fullname)
        return None


class _CallbackLoader:
    def __init__(self, loader: Any, watcher: ImportWatcher, name: str) -> None:
        self._loader = loader
        self._watcher = watcher
        self._name = name

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        # The module's own loader goes back first, so that nothing else changes:
        # importlib.resources, reload() and pkgutil ask the loader.
        if getattr(module, "__loader__", None) is self:
            module.__loader__ = self._loader
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.loader is self:
            spec.loader = self._loader
        self._loader.exec_module(module)
        callback = self._watcher.callbacks.pop(self._name, None)
        if not self._watcher.callbacks:
            self._watcher.stop()
        if callback is not None:
            try:
                callback(module)
            except Exception as exc:  # the program's import must succeed regardless
                report_failure(f"wrapping {self._name}", exc)
