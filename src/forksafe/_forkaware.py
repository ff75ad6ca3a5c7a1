"""Who handles fork itself: the fork handlers a process registered, and what they own.

A library that keeps a thread can make it fork-safe on its own: stop it before
every fork and start it again after (gunicorn's control-socket server, in an
``os.register_at_fork(before=...)`` hook), or start a new one in every child
(OpenTelemetry's batch processors, in ``after_in_child``), or reset it in the
children of multiprocessing's fork context only (a ``multiprocessing.Queue``'s
feeder thread, through ``multiprocessing.util.register_after_fork``). Such a
thread is not the unknown thread a fork hazard is; it is graded ``info`` —
"handles fork itself" — for the mechanisms its handler covers
(``forksafe._grade``).

The handlers registered with ``os.register_at_fork`` live in three lists of the
interpreter that Python does not expose. They are plain lists that the garbage
collector tracks, found once per process as the list that holds a callable
known to be registered there (``gc.get_referrers``): the guard's own hooks, or a
no-op marker registered for the purpose, and ``threading``'s own
``after_in_child`` hook. The lists are never replaced, so the references stay
good, in forked children too.

A handler is matched to a thread by what both belong to: the same object (the
thread's target is a bound method of the object a handler is bound to, or closes
over through a weak reference), else the same module (the handler's function is
defined where the thread's target or class is). ``threading``'s own handler
(which tidies thread objects) and forksafe's are not owners of anything.
"""

from __future__ import annotations

import functools
import gc
import os
import sys
import threading
import types
import weakref
from typing import Any, Callable, Iterable

from forksafe._frames import instance_dict

#: When a handler runs: before every fork; in every child; in the children of
#: multiprocessing's fork context only.
BEFORE, CHILD, MULTIPROCESSING = "before", "child", "multiprocessing"
#: The mechanisms (``forksafe._decide.MECHANISMS``) whose children run
#: multiprocessing's after-fork registry.
MULTIPROCESSING_MECHANISMS = frozenset({"multiprocessing", "multiprocessing.Pool",
                                        "concurrent.futures"})
#: Handlers from these modules own no thread: they tidy the interpreter's own state
#: (``threading`` forgets the threads that did not survive; ``random`` reseeds).
_NOT_OWNERS = frozenset({"threading", "_thread", "random", "os", "posix"})


class Handler:
    """A registered fork handler: when it runs, its name, and what it belongs to."""

    __slots__ = ("modules", "name", "objects", "when")

    def __init__(self, when: str, name: str, modules: frozenset[str],
                 objects: frozenset[int]) -> None:
        self.when = when
        self.name = name
        self.modules = modules
        self.objects = objects


def _marker() -> None:
    """Registered as a ``before`` hook once, when no hook of the guard's is there to
    find the interpreter's list by; it does nothing."""


#: The guard's own ``before`` and ``after_in_child`` hooks, once it registered them
#: (``forksafe._forkpath.load``): the lists are found through them, no marker needed.
GUARD_HOOKS: tuple[Callable[[], object], Callable[[], object]] | None = None
#: (before list, after_in_child list) once found; (None, None) when they cannot be.
_lists: tuple[list[Any] | None, list[Any] | None] | None = None
_marker_registered = False


def _hook_lists(guard_hooks: tuple[Callable[[], object], Callable[[], object]] | None
                ) -> tuple[list[Any] | None, list[Any] | None]:
    global _lists, _marker_registered
    if _lists is not None:
        return _lists
    before_known: object | None = guard_hooks[0] if guard_hooks else None
    if before_known is None:
        if not _marker_registered:
            os.register_at_fork(before=_marker)
            _marker_registered = True
        before_known = _marker
    child_known: object = guard_hooks[1] if guard_hooks else threading._after_fork  # type: ignore[attr-defined]
    _lists = (_list_holding(before_known), _list_holding(child_known))
    return _lists


def _list_holding(item: object) -> list[Any] | None:
    found = [r for r in gc.get_referrers(item) if type(r) is list and any(x is item for x in r)]
    return found[0] if len(found) == 1 else None


#: The last answer of ``handlers``: (what it was read from, the handlers, its version).
_answer: tuple[tuple[Any, ...], list[Handler], int] | None = None


def handlers(guard_hooks: tuple[Callable[[], object], Callable[[], object]] | None = None
             ) -> list[Handler]:
    """Every fork handler of this process that may own something.

    ``guard_hooks``: the guard's own ``before`` and ``after_in_child`` hooks, when
    it registered them (they are in the lists already: no marker is needed).
    Every check asks; the answer is made again only when a hook was registered (the
    interpreter's lists only grow) or multiprocessing's registry changed.
    """
    return versioned(guard_hooks)[0]


def versioned(guard_hooks: tuple[Callable[[], object], Callable[[], object]] | None = None
              ) -> tuple[list[Handler], int]:
    """``handlers`` and a number that changes whenever their answer may have."""
    global _answer
    before, child = _hook_lists(guard_hooks)
    seen = (len(before or ()), len(child or ()), _registry_keys())
    answer = _answer
    if answer is not None and answer[0] == seen:
        return answer[1], answer[2]
    found = _read_handlers(before, child)
    number = (answer[2] + 1) if answer is not None else 1
    _answer = (seen, found, number)
    return found, number


def _registry_keys() -> tuple[Any, ...]:
    util = sys.modules.get("multiprocessing.util")
    registry = getattr(util, "_afterfork_registry", None)
    if registry is None:
        return ()
    try:
        return tuple(registry.keys())
    except RuntimeError:  # changed size while we looked
        return (object(),)  # unlike any other: read it all again


def _read_handlers(before: list[Any] | None, child: list[Any] | None) -> list[Handler]:
    found: list[Handler] = []
    for when, hooks in ((BEFORE, before), (CHILD, child)):
        for hook in list(hooks or ()):
            handler = _describe(when, hook)
            if handler is not None:
                found.append(handler)
    found.extend(_multiprocessing_handlers())
    return found


def _multiprocessing_handlers() -> list[Handler]:
    """``multiprocessing.util.register_after_fork`` entries: (counter, id, func) -> obj."""
    util = sys.modules.get("multiprocessing.util")
    registry = getattr(util, "_afterfork_registry", None)
    if registry is None:
        return []
    found = []
    try:
        items = list(registry.items())
    except RuntimeError:  # changed size while we looked: try at the next check
        return []
    for key, obj in items:
        func = key[2] if isinstance(key, tuple) and len(key) == 3 else None
        if func is None:
            continue
        modules, objects = _owners(func)
        objects.add(id(obj))
        modules.add(type(obj).__module__)
        found.append(Handler(MULTIPROCESSING, _name(func), frozenset(modules),
                             frozenset(objects)))
    return found


def _describe(when: str, hook: Any) -> Handler | None:
    name = _name(hook)
    if name.startswith("forksafe.") or name.rpartition(".")[0] in _NOT_OWNERS:
        return None
    modules, objects = _owners(hook)
    modules = {m for m in modules if m not in _NOT_OWNERS and m.split(".")[0] != "forksafe"}
    if not modules and not objects:
        return None
    return Handler(when, name, frozenset(modules), frozenset(objects))


def _owners(obj: Any, depth: int = 0) -> tuple[set[str], set[int]]:
    """The modules and objects a callable belongs to, read without calling it (but for
    dereferencing weak references, which runs no code of theirs)."""
    modules: set[str] = set()
    objects: set[int] = set()
    if depth > 3:
        return modules, objects
    if isinstance(obj, functools.partial):
        m, o = _owners(obj.func, depth + 1)
        modules |= m
        objects |= o
        for arg in obj.args:
            objects.add(id(arg))
        return modules, objects
    if isinstance(obj, types.MethodType):
        owner = obj.__self__
        objects.add(id(owner))
        modules.add(type(owner).__module__)
        m, o = _owners(obj.__func__, depth + 1)
        return modules | m, objects | o
    if isinstance(obj, types.BuiltinMethodType):
        owner = obj.__self__
        if owner is not None and not isinstance(owner, types.ModuleType):
            objects.add(id(owner))
            modules.add(type(owner).__module__)
        return modules, objects
    if isinstance(obj, types.FunctionType):
        if isinstance(obj.__module__, str):
            modules.add(obj.__module__)
        for cell in obj.__closure__ or ():
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if isinstance(value, weakref.ref):  # WeakMethod too: dereferencing runs no code
                value = value()
                if value is None:
                    continue
            if isinstance(value, (types.MethodType, types.FunctionType, functools.partial)):
                m, o = _owners(value, depth + 1)
                modules |= m
                objects |= o
            elif not isinstance(value, (type, types.ModuleType, str, int, float, bool)):
                objects.add(id(value))
    return modules, objects


def _name(obj: Any) -> str:
    func = obj.func if isinstance(obj, functools.partial) else obj
    name = getattr(func, "__qualname__", None) or type(func).__name__
    module = getattr(func, "__module__", None)
    if isinstance(func, types.MethodType):
        module = getattr(func.__func__, "__module__", module)
    return f"{module}.{name}" if isinstance(module, str) else str(name)


def thread_owners(thread: threading.Thread) -> tuple[set[str], set[int]]:
    """The modules and objects a thread belongs to: its target's, and its class's when
    that is not ``threading.Thread`` itself."""
    namespace = instance_dict(thread) or {}
    target = namespace.get("_target")
    modules: set[str] = set()
    objects: set[int] = {id(thread)}
    if target is not None:
        m, o = _owners(target)
        modules |= m
        objects |= o
    kind = type(thread)
    if kind.__module__ != "threading":
        modules.add(kind.__module__)
    return modules, objects


def handled_by(owners: tuple[set[str], set[int]], found: Iterable[Handler]) -> list[Handler]:
    """The handlers that belong to what ``owners`` names: by object first, then module."""
    modules, objects = owners
    by_object = [h for h in found if h.objects & objects]
    if by_object:
        return by_object
    return [h for h in found if h.modules & modules]
