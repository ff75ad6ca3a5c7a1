"""SQLite connections inherited across fork: refuse to use them in the child.

SQLite's documentation ("How To Corrupt An SQLite Database File", section 2.6)
says a connection must never be carried across ``fork()``: POSIX advisory locks
belong to a process, so the child's copy of the connection believes it holds
locks it does not, and a child that rolls back or closes a copy made in the
middle of a transaction plays the journal back into the file under the parent's
feet. The remedy is simple — open a new connection in the child — but the
mistake is silent until the database is corrupt.

With protection on, every connection ``sqlite3.connect`` opens remembers the
process and the line that opened it, and refuses, with a catchable
``ForkSafetyError`` naming both, to be used in any other process. Nothing is
sent to SQLite first: the file is not touched.

How use is intercepted, given that ``sqlite3.Connection`` is a C type:

* ``sqlite3.connect`` is wrapped (through ``_ledger.set_connect_layer``, which
  composes with ``forksafe.observe()`` in either order) to pass a
  ``factory``: a Python subclass of ``sqlite3.Connection`` (or of the
  program's own factory) whose every method first compares the opening pid
  with the current one. ``execute()`` and friends are replaced too: their C
  versions (3.11+) make plain cursors without calling ``cursor`` by name.
* ``cursor()`` returns a subclass of ``sqlite3.Cursor`` with the same check on
  ``execute``/``fetch*``/iteration, so a cursor made before the fork and used
  (executed again, or read further) in the child is refused as well.
* As a second line, for a child whose ``fork()`` ran no Python fork hooks
  (a C extension calling ``fork()`` directly, see below), an authorizer makes
  every statement *prepared* in another process fail with SQLite's "not
  authorized" before it runs (statements already prepared and cached are not
  seen by it). A progress handler was considered and rejected: SQLite answers
  an interrupted write statement by rolling the whole
  transaction back, which in the child is exactly the corruption to avoid.

The current pid is read from a one-element list that an
``os.register_at_fork`` hook refreshes in the child (one list store, no lock):
``os.getpid()`` is a system call on glibc >= 2.25 (~140 ns here), and
``execute()`` and ``fetchone()`` check it once per call. A child made by a
raw C ``fork()`` that runs no Python fork hooks is still caught by the authorizer, which calls
``os.getpid()`` itself (it runs only when a statement is prepared). ``connect()``
also reads the real pid (once per connection), so that such a child's own new
connections work, and refreshes the remembered one from it.

``close()`` on an inherited connection in the child does not close it — that
would run SQLite's close (and rollback) in the child — but detaches it: the
object is marked closed for this process and kept alive forever, so that
garbage collection never closes it either. That makes the common "close what
you inherited after fork" idiom (Django's ``connections.close_all()``) safe.

An in-memory database (``:memory:``, ``""``, ``file::memory:`` or a URI with
``mode=memory``) is left unprotected: it lives in the process's own memory, so
after a fork each process has its own copy and nothing is shared that could be
corrupted. Django's parallel test runner relies on exactly that: its forked
workers go on using the parent's in-memory test database (Django does not close
in-memory connections).
"""

from __future__ import annotations

import os
import sys
import types
import weakref
from typing import Any, Callable

from forksafe import _ledger
from forksafe._errors import ForkSafetyError

CONNECTION_INHERITED = (
    "this connection was opened in process {pid} at {site} and inherited across fork; "
    "open a new connection in the child"
)

#: Connection methods that do nothing to the database (or only to this object).
_HARMLESS = frozenset({"__init__", "__new__", "__del__", "__init_subclass__", "__subclasshook__"})
#: Properties whose setter may run SQL (isolation_level=None commits on <= 3.11).
_SETTERS = ("isolation_level", "autocommit")
_CURSOR_METHODS = ("execute", "executemany", "executescript", "fetchone", "fetchmany",
                   "fetchall")

#: This process's pid, refreshed in a forked child by an at-fork hook.
_current = [os.getpid()]
_hook_registered: list[bool] = []
_state: dict[str, Any] = {}
_classes: weakref.WeakKeyDictionary[type, type] = weakref.WeakKeyDictionary()
_cursor_classes: weakref.WeakKeyDictionary[type, type] = weakref.WeakKeyDictionary()
#: At most this many connection (and cursor) classes are cached; see ``_remember``.
_MAX_CLASSES = 64
#: A program's factory classes that cannot be subclassed (a metaclass or
#: ``__init_subclass__`` refuses): their connections and cursors go unprotected.
_unprotectable: weakref.WeakSet[type] = weakref.WeakSet()
#: Inherited objects kept alive in a child so that SQLite never closes them there.
_pinned: list[object] = []


def protect_sqlite() -> None:
    """Make connections opened from now on refuse to be used in a forked child.

    Idempotent. Does not import ``sqlite3``: when the program has not imported
    it yet, protection starts the moment it does. Connections opened before
    this call are not protected (they are still reported by ``forksafe.check()``).
    """
    if _state:
        return
    # This module may have been imported before a fork that its hook (not yet
    # registered) did not see: the remembered pid is then the parent's.
    _current[0] = os.getpid()
    if not _hook_registered and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_forked)
        _hook_registered.append(True)
    _state["on"] = True
    _ledger.set_connect_layer("protect", _protect_layer)


def unprotect_sqlite() -> None:
    """Stop protecting new connections; ``sqlite3.connect`` is restored by identity.

    Connections opened while protection was on stay protected.
    """
    if not _state:
        return
    _state.clear()
    _ledger.set_connect_layer("protect", None)


def protecting() -> bool:
    return bool(_state)


def _forked() -> None:
    # Runs in every forked child: one system call and one list store, no lock.
    _current[0] = os.getpid()


def _protect_layer(original: Callable[..., Any]) -> Callable[..., Any]:
    def connect(*args: Any, **kwargs: Any) -> Any:
        module = sys.modules.get("sqlite3")
        if module is None:  # taken out of sys.modules (a test harness): connect unprotected
            return original(*args, **kwargs)
        if _ledger.in_memory(args[0] if args else kwargs.get("database")):
            return original(*args, **kwargs)  # private to each process: nothing to protect
        if len(args) > 5:  # factory given positionally (deprecated, still allowed)
            factory = _protected_class(args[5], module)
            if factory is not None:
                args = (*args[:5], factory, *args[6:])
        else:
            factory = _protected_class(kwargs.get("factory", module.Connection), module)
            if factory is not None:
                kwargs["factory"] = factory
        connection = original(*args, **kwargs)
        if factory is not None:
            _arm(connection, module, _ledger.raw_frames(sys._getframe(1)))
        return connection

    connect.__wrapped__ = original  # type: ignore[attr-defined]
    connect.__doc__ = original.__doc__
    return connect


def _arm(connection: Any, module: types.ModuleType, frames: _ledger.RawFrames) -> None:
    getpid = os.getpid
    pid = getpid()  # one system call per connect (~0.1 us against ~11 us for connect)
    if pid != _current[0]:
        # A fork that ran no Python hooks (a C extension's fork()): the child's
        # own connections must carry its real pid, or the authorizer would refuse
        # them; and now that the pid is known, inherited ones refuse in Python too.
        _current[0] = pid
    connection._forksafe_pid = pid
    connection._forksafe_frames = frames
    deny: int = module.SQLITE_DENY
    ok: int = module.SQLITE_OK

    def authorizer(*_: Any) -> int:
        return deny if getpid() != pid else ok

    connection._forksafe_authorizer = authorizer
    module.Connection.set_authorizer(connection, authorizer)


def message(connection: Any) -> str:
    """The text of the error raised when ``connection`` is used in another process."""
    from forksafe import _frames
    from forksafe._render import sites

    frames = getattr(connection, "_forksafe_frames", None)
    site = _frames.user_site(_ledger.sites(frames)) if frames else None
    return CONNECTION_INHERITED.format(pid=getattr(connection, "_forksafe_pid", "?"),
                                       site=sites.where(site))


def _refuse(connection: Any) -> ForkSafetyError:
    return ForkSafetyError(message(connection))


def _pinner() -> Callable[[object], None]:
    """A function that keeps an object alive for the rest of this process.

    Used in a child on inherited connections and cursors, so that SQLite's
    close (and its rollback) never runs there. A list alone is not enough:
    interpreter shutdown clears module globals and collects cycles, which would
    free the object after all. A reference that nothing ever drops is: it is
    taken with ``Py_IncRef`` through ctypes, bound here in the parent when the
    first protected connection is opened, so that the child needs no import —
    possibly during interpreter shutdown — to use it.
    """
    pinned: list[object] = _pinned
    try:
        import ctypes

        incref = ctypes.pythonapi.Py_IncRef
        py_object = ctypes.py_object
    except Exception:  # no ctypes: the list still covers everything but shutdown
        return pinned.append

    def pin(obj: object) -> None:
        pinned.append(obj)
        incref(py_object(obj))

    return pin


def _protected_class(base: Any, module: types.ModuleType) -> type | None:
    """A subclass of the connection class ``base`` that refuses use in another process."""
    if not isinstance(base, type) or not issubclass(base, module.Connection):
        return None  # a factory that is not a class: leave it alone
    if getattr(base, "_forksafe_protected", False):
        return base
    cls = _classes.get(base)
    if cls is None:
        if base in _unprotectable:
            return None
        # No lock: two threads racing here make two equivalent classes, and a
        # lock would be one more thing a child could inherit held.
        try:
            cls = _make_connection_class(base, module)
        except Exception:  # a class that refuses subclasses: connect as without protection
            _unprotectable.add(base)
            return None
        _remember(_classes, base, cls)
    return cls


def _remember(cache: weakref.WeakKeyDictionary[type, type], base: type, cls: type) -> None:
    """Cache ``cls`` for ``base``, up to ``_MAX_CLASSES`` entries.

    An entry is never freed — the subclass refers to its base, so the weak key
    stays alive — which is right for the handful of classes a program has, but a
    program that makes a factory class per connection would grow the cache
    forever; past the bound such classes get a fresh subclass each time, which
    dies with them.
    """
    if len(cache) < _MAX_CLASSES:
        cache[base] = cls


def _static(cls: type, name: str) -> Any:
    """``name`` as stored in the class (or a base) dict: no descriptor is invoked."""
    for klass in cls.__mro__:
        if name in klass.__dict__:
            return klass.__dict__[name]
    return None


#: What a class may store that ``obj.name(...)`` calls with ``obj`` as first argument.
_METHOD_TYPES = (types.FunctionType, types.MethodDescriptorType, types.WrapperDescriptorType)


def _make_connection_class(base: type, module: types.ModuleType) -> type:
    pin = _pinner()
    # Same name, module and qualname as ``base``: repr() and logs of a protected
    # connection read exactly as without protection.
    namespace: dict[str, Any] = {"_forksafe_protected": True, "__doc__": base.__doc__,
                                 "__module__": base.__module__,
                                 "__qualname__": base.__qualname__,
                                 "_forksafe_pid": None, "_forksafe_frames": None}
    plain = module.Connection
    for name in dir(base):
        if name in _HARMLESS or name in _SETTERS or name == "total_changes":
            continue
        if name.startswith("__") and name not in ("__enter__", "__exit__", "__call__"):
            continue
        # Only what is called as a method with the connection first: a program's
        # factory may also hold static and class methods, nested classes or
        # other callables, which must reach its code exactly as they would.
        if not isinstance(_static(base, name), _METHOD_TYPES):
            continue
        namespace[name] = _guarded_method(name, getattr(base, name))
    for name in _SETTERS:
        if hasattr(base, name):
            namespace[name] = _guarded_property(name, base)
    namespace["total_changes"] = _total_changes(base, module)
    namespace["close"] = _connection_close(base, pin)
    # A factory that overrides cursor() or execute() gets its own method run
    # (guarded above, at the connection): calling our versions instead would
    # skip the program's code, and pass a cursor factory its cursor() may not take.
    if base.cursor is plain.cursor:  # type: ignore[attr-defined]
        namespace["cursor"] = _connection_cursor(base, module)
    for name in ("execute", "executemany", "executescript"):
        if getattr(base, name) is getattr(plain, name):
            namespace[name] = _connection_shortcut(name, base, module)
    namespace["set_authorizer"] = _connection_set_authorizer(base)
    if hasattr(base, "backup"):
        namespace["backup"] = _connection_backup(base)
    namespace["__del__"] = _finalizer(getattr(base, "__del__", None), pin)
    if base is not plain:
        # A program's own class can be changed after this one is made
        # (mock.patch.object(MyConnection, "commit") in its tests): each method
        # then defers to whatever the class holds at call time.
        made: list[type] = []
        for name, value in list(namespace.items()):
            if isinstance(value, types.FunctionType) and name != "__del__" \
                    and hasattr(base, name):
                namespace[name] = _late_bound(name, value, base, made)
        made.append(type(base.__name__, (base,), namespace))
        return made[0]
    return type(base.__name__, (base,), namespace)


def _late_bound(name: str, ours: Callable[..., Any], base: type,
                made: list[type]) -> Callable[..., Any]:
    """``ours``, unless ``base.name`` was rebound since: then that, still guarded."""
    captured = getattr(base, name)
    current = _current

    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(base, name) is captured:
            return ours(self, *args, **kwargs)
        if self._forksafe_pid != current[0] and self._forksafe_pid is not None:
            raise _refuse(self)
        return getattr(super(made[0], self), name)(*args, **kwargs)

    method.__name__ = method.__qualname__ = name
    method.__doc__ = ours.__doc__
    return method


def _guarded_method(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    current = _current

    def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self._forksafe_pid != current[0] and self._forksafe_pid is not None:
            raise _refuse(self)
        return method(self, *args, **kwargs)

    guarded.__name__ = guarded.__qualname__ = name
    guarded.__doc__ = method.__doc__
    return guarded


def _guarded_property(name: str, base: type) -> property:
    descriptor = getattr(base, name)

    def get(self: Any) -> Any:
        return descriptor.__get__(self, type(self))

    def set_(self: Any, value: Any) -> None:
        if self._forksafe_pid != _current[0] and self._forksafe_pid is not None:
            raise _refuse(self)
        descriptor.__set__(self, value)

    return property(get, set_, doc=descriptor.__doc__)


def _total_changes(base: type, module: types.ModuleType) -> property:
    descriptor = base.total_changes  # type: ignore[attr-defined]

    def get(self: Any) -> Any:
        # A connection detached in the child reads as closed, like a closed one,
        # so that forksafe.check() in the child does not report it again.
        if self.__dict__.get("_forksafe_detached"):
            raise module.ProgrammingError("Cannot operate on a closed database.")
        return descriptor.__get__(self, type(self))

    return property(get, doc=descriptor.__doc__)


def _connection_close(base: type, pin: Callable[[object], None]) -> Callable[..., Any]:
    close = base.close  # type: ignore[attr-defined]
    current = _current

    def close_(self: Any) -> None:
        """Close the connection; in a forked child, detach it without touching SQLite."""
        if self._forksafe_pid != current[0] and self._forksafe_pid is not None:
            if not self.__dict__.get("_forksafe_detached"):
                self._forksafe_detached = True
                pin(self)
            return
        close(self)

    close_.__name__ = close_.__qualname__ = "close"
    return close_


def _connection_cursor(base: type, module: types.ModuleType) -> Callable[..., Any]:
    cursor = base.cursor  # type: ignore[attr-defined]
    plain = module.Cursor
    default = _protected_cursor_class(plain, module)
    current = _current

    def cursor_(self: Any, factory: Any = None) -> Any:
        pid = self._forksafe_pid
        if pid != current[0] and pid is not None:
            raise _refuse(self)
        if factory is None or factory is plain:
            kind = default
        else:
            kind = _protected_cursor_class(factory, module)
            if kind is None:
                return cursor(self, factory)
        result = cursor(self, kind)
        result._forksafe_pid = pid
        return result

    cursor_.__name__ = cursor_.__qualname__ = "cursor"
    cursor_.__doc__ = cursor.__doc__
    return cursor_


def _connection_shortcut(name: str, base: type, module: types.ModuleType) -> Callable[..., Any]:
    """``conn.execute()`` and friends, made to return a protected cursor.

    The C implementations (3.11+) make their cursor without calling ``cursor``
    by name, so they would hand out plain cursors — and a plain cursor made
    before the fork runs its cached statements again in the child unchecked.
    This is the hottest path of a protected connection, hence the direct calls
    of the C methods rather than of our own wrappers.
    """
    cursor = base.cursor  # type: ignore[attr-defined]
    default = _protected_cursor_class(module.Cursor, module)
    run = getattr(module.Cursor, name)
    current = _current

    def shortcut(self: Any, sql: Any, *args: Any) -> Any:
        pid = self._forksafe_pid
        if pid != current[0] and pid is not None:
            raise _refuse(self)
        result = cursor(self, default)
        result._forksafe_pid = pid
        return run(result, sql, *args)

    shortcut.__name__ = shortcut.__qualname__ = name
    shortcut.__doc__ = getattr(base, name).__doc__
    return shortcut


def _connection_backup(base: type) -> Callable[..., Any]:
    backup = base.backup  # type: ignore[attr-defined]
    current = _current

    def backup_(self: Any, target: Any, *args: Any, **kwargs: Any) -> Any:
        """Back up into ``target``; both ends must belong to this process."""
        for end in (self, target):
            pid = getattr(end, "_forksafe_pid", None)
            if pid is not None and pid != current[0]:
                raise _refuse(end)  # backup writes pages into the target directly
        return backup(self, target, *args, **kwargs)

    backup_.__name__ = backup_.__qualname__ = "backup"
    return backup_


def _connection_set_authorizer(base: type) -> Callable[..., Any]:
    set_authorizer = base.set_authorizer  # type: ignore[attr-defined]

    def set_authorizer_(self: Any, authorizer_callback: Any) -> None:
        """Set the program's authorizer, keeping the refusal in other processes first."""
        if self._forksafe_pid != _current[0] and self._forksafe_pid is not None:
            raise _refuse(self)
        ours = self.__dict__.get("_forksafe_authorizer")
        if ours is None or (authorizer_callback is None and sys.version_info < (3, 11)):
            # Before 3.11 None does not remove the authorizer: it is called, fails
            # and so denies every statement. Keep that behaviour, odd as it is.
            set_authorizer(self, authorizer_callback)
        elif authorizer_callback is None:
            set_authorizer(self, ours)
        else:
            def composed(*args: Any) -> Any:
                denied = ours(*args)
                return denied if denied else authorizer_callback(*args)

            set_authorizer(self, composed)

    set_authorizer_.__name__ = set_authorizer_.__qualname__ = "set_authorizer"
    return set_authorizer_


def _finalizer(
    base_del: Callable[..., Any] | None, pin: Callable[[object], None]
) -> Callable[[Any], None]:
    # Only closure variables, no module globals: this may run during interpreter
    # shutdown, after this module's globals were cleared.
    current = _current

    def __del__(self: Any) -> None:
        pid = self.__dict__.get("_forksafe_pid")
        if pid is not None and pid != current[0]:
            if not self.__dict__.get("_forksafe_detached"):
                self.__dict__["_forksafe_detached"] = True
                pin(self)  # resurrected: SQLite's close never runs in the child
            return
        if base_del is not None:
            base_del(self)

    return __del__


def _protected_cursor_class(base: Any, module: types.ModuleType) -> type | None:
    if not isinstance(base, type) or not issubclass(base, module.Cursor):
        return None
    if getattr(base, "_forksafe_protected", False):
        return base
    cls = _cursor_classes.get(base)
    if cls is None:
        if base in _unprotectable:
            return None
        try:
            cls = _make_cursor_class(base)
        except Exception:  # as for connections: the program's class, unprotected
            _unprotectable.add(base)
            return None
        _remember(_cursor_classes, base, cls)
    return cls


def _make_cursor_class(base: type) -> type:
    pin = _pinner()
    # Slots, not a __dict__: one cursor is made per execute(), and a slot is
    # both cheaper to set there and cheaper to read on every fetch.
    namespace: dict[str, Any] = {"_forksafe_protected": True, "__doc__": base.__doc__,
                                 "__module__": base.__module__,
                                 "__qualname__": base.__qualname__,
                                 "__slots__": ("_forksafe_pid", "_forksafe_detached")}
    current = _current
    for name in _CURSOR_METHODS:
        method = getattr(base, name, None)
        if method is None:
            continue

        def guarded(self: Any, *args: Any, _method: Any = method, **kwargs: Any) -> Any:
            if self._forksafe_pid != current[0] and self._forksafe_pid is not None:
                raise _refuse(self.connection)
            return _method(self, *args, **kwargs)

        guarded.__name__ = guarded.__qualname__ = name
        guarded.__doc__ = method.__doc__
        namespace[name] = guarded
    iter_ = base.__iter__  # type: ignore[attr-defined]

    def __iter__(self: Any) -> Any:
        # Checked once per loop, not once per row (a Python __next__ would cost
        # ~100 ns a row, half again the time of iterating an in-memory table).
        # A loop begun before the fork and resumed in the child, or next(cursor)
        # called directly there, reads on unchecked; reading cannot corrupt.
        if self._forksafe_pid != current[0] and self._forksafe_pid is not None:
            raise _refuse(self.connection)
        return iter_(self)

    namespace["__iter__"] = __iter__
    close = base.close  # type: ignore[attr-defined]
    base_del = getattr(base, "__del__", None)

    def close_(self: Any) -> None:
        if self._forksafe_pid != current[0] and self._forksafe_pid is not None:
            if not getattr(self, "_forksafe_detached", False):
                self._forksafe_detached = True
                pin(self)  # resetting its statement would touch the parent's transaction
            return
        close(self)

    namespace["close"] = close_

    def __del__(self: Any) -> None:
        pid = getattr(self, "_forksafe_pid", None)
        if pid is not None and pid != current[0]:
            if not getattr(self, "_forksafe_detached", False):
                self._forksafe_detached = True
                pin(self)
            return
        if base_del is not None:
            base_del(self)

    namespace["__del__"] = __del__
    return type(base.__name__, (base,), namespace)
