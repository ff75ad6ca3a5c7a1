"""The observation layer: cheap, always-on provenance once the user turns it on.

A fork-time report is only as useful as its "who did this": the thread that
holds the lock was started *where*, the connection that will be inherited was
opened *where*. That can only be recorded when it happens, so ``observe()``
wraps exactly two entry points:

* ``threading.Thread.start`` — the start site is stored on the thread object
  itself (no global table to grow, freed with the thread);
* ``sqlite3.connect`` — ``sqlite3.Connection`` supports no weak references, so
  the origin is kept in a small bounded table keyed by ``id()``; the check finds
  the live connections itself and looks their origins up there.

The connect wrapper is the hot path of a program that connects per request, so
it stores only the caller's code object and instruction offset (the line is
worked out when a report needs it), and is C when the package was built with
its optional extension (``forksafe._speedups``, see ``_origin_layer``). An
address is reused once its connection is freed, so entries are validated
*when a check looks at them*, not when they are made: the first lookup of a
live connection binds its entry to a weak reference that dies with that
connection (see ``_token_maker``), and each
check drops the entries of connections that are gone. A connection made later
at the same address without going through the wrapper is therefore not given
a dead one's origin — unless the dead one was both opened and freed since the
last check, the one window this leaves open.

With each thread, the label the program's driver set is recorded too ("during
tests/test_a.py::test_y", ``forksafe._labels``, which records it with connections).

The thread wrapper costs a frame pointer and a tuple (and one list read for the
label); ``benchmarks/`` measures both against unobserved code in the same run.
Nothing here runs at fork time or in a child, and nothing here takes a lock.

``sqlite3`` is not imported by ``observe()`` — a diagnostic tool must not load
the library it diagnoses — so when it is not imported yet a one-shot import hook
wraps ``connect`` the moment the program imports it. SQLite protection
(``forksafe.protect_sqlite()``) wraps ``connect`` too; both go through
``set_connect_layer`` below so that either can be undone in any order.
"""

from __future__ import annotations

import itertools
import sys
import types
from typing import TYPE_CHECKING, Any, Callable, Collection, Optional, Sequence, cast

from forksafe._report import Site

if TYPE_CHECKING:
    import importlib.abc
    import importlib.machinery
    import threading

# ``threading`` is imported only by observe()/unobserve(), and ``_frames``
# (which may import ``sysconfig``, which imports ``threading`` on 3.13) only when
# a wrapper is installed, never by importing this module: SQLite protection
# imports it for ``set_connect_layer``, and the guard starts observing on the
# program's first ``import threading`` — which must not happen while this
# module is only half imported.


def _bind_library_test(filename: str) -> bool:
    """Stands in for ``_frames.is_library_file`` until the real one can be bound."""
    _bind()
    if _is_library is _bind_library_test:
        return False  # _frames is still being imported further up this stack
    return _is_library(filename)


_is_library: Callable[[str], bool] = _bind_library_test
#: ``is_library_file``'s answers so far, read directly by the connect wrapper.
_known_files: dict[str, bool] = {}


def _bind() -> None:
    """Bind ``_frames.is_library_file``, unless ``_frames`` is only half imported.

    That happens when importing ``_frames`` itself imports ``threading``
    (through ``sysconfig`` on 3.13, see ``forksafe._stdlib``) and the guard's import hook starts
    observing right then; the stand-in binds on a later call instead.
    """
    global _is_library, _known_files
    if _is_library is _bind_library_test:
        try:
            from forksafe._frames import LIBRARY_FILES, is_library_file
        except ImportError:
            return
        _is_library = is_library_file
        _known_files.update(LIBRARY_FILES)
        _known_files = LIBRARY_FILES

#: Frames kept per start site: enough to see past a thread pool to the user's call.
DEPTH = 8
#: At most this many connection origins are remembered (see ``_prune``).
MAX_CONNECTIONS = 4096

RawFrames = tuple[tuple[types.CodeType, int], ...]

_ORIGIN_ATTR = "_forksafe_started_at"
_DURING_ATTR = "_forksafe_started_during"
#: The label the program's driver set (``forksafe._labels``), in a list the wrappers
#: hold (one index read); None records nothing.
LABEL: list[str | None] = [None]
#: id(connection) -> the label when it was opened: see ``forksafe._labels``.
CONNECTION_LABELS: dict[int, str] = {}

#: Where a connection was opened: the caller's code object and instruction offset
#: (the common case, offset >= 0), or frames out to the user's code (offset -1);
#: then, once a check has seen the connection alive, a weak reference that dies
#: with it (None until then, and for good where none can be made); and the
#: ``database`` argument it was opened with (an in-memory database is private to
#: each process after a fork, see ``forksafe._probes.sqlite``).
Entry = tuple[Any, int, Optional[Callable[[], object]], object]

_state: dict[str, Any] = {}
#: id(connection) -> its entry.
_connection_origins: dict[int, Entry] = {}
#: Whether entries were ever dropped (so the table being empty says nothing).
_forgotten: list[bool] = []
#: Connection type -> how to make its liveness token (decided once per type).
_token_makers: dict[type, Callable[[Any], Callable[[], object] | None]] = {}
#: At most this many connection types get a cached token maker.
_MAX_TYPES = 64


def observing() -> bool:
    return bool(_state)


def observe() -> None:
    """Start recording thread start sites and SQLite connection sites. Idempotent."""
    if _state:
        return
    _bind()
    import threading

    if _state:  # observe() ran meanwhile, from the import of threading above
        return
    original_start = threading.Thread.start
    state = _state
    getframe = sys._getframe
    during = LABEL

    def start(self: threading.Thread) -> None:
        if state.get("thread_wrapper") is start:  # left in place by unobserve(): a no-op
            frame = getframe(1)
            code = frame.f_code
            if _known_files.get(code.co_filename) is False:  # the user's code, seen before
                # raw_frames(frame), spelled out for the commonest case: a call less.
                setattr(self, _ORIGIN_ATTR, ((code, frame.f_lineno),))
            else:
                setattr(self, _ORIGIN_ATTR, raw_frames(frame))
            label = during[0]
            if label is not None:
                setattr(self, _DURING_ATTR, label)
        original_start(self)

    start.__wrapped__ = original_start  # type: ignore[attr-defined]
    start.__doc__ = original_start.__doc__
    _state.update(thread_start=original_start, thread_wrapper=start)
    threading.Thread.start = start  # type: ignore[method-assign]
    _observe_raw_threads(state)
    set_connect_layer("observe", _origin_layer)


def _observe_raw_threads(state: dict[str, Any]) -> None:
    """Record where threads started with ``_thread.start_new_thread`` start.

    Such a thread has no ``threading.Thread`` object (execnet, which pytest-xdist
    runs on, starts its channel reader so); it shows only in
    ``sys._current_frames()``. The wrapper is looked up at call time by such
    code; ``threading`` bound the original at its import and is not affected.
    """
    import _thread

    original = _thread.start_new_thread
    getframe = sys._getframe
    raw = _raw_threads
    during = LABEL

    def start_new_thread(function: Any, args: Any, *kwargs: Any) -> int:
        ident: int = original(function, args, *kwargs)
        if state.get("raw_wrapper") is start_new_thread:
            name = getattr(function, "__qualname__", None) or type(function).__name__
            module = getattr(function, "__module__", None)
            raw[ident] = (raw_frames(getframe(1)), f"{module}.{name}" if module else name,
                          during[0])
            if len(raw) > MAX_RAW_THREADS:
                _prune_raw_threads()
        return ident

    start_new_thread.__wrapped__ = original  # type: ignore[attr-defined]
    start_new_thread.__doc__ = original.__doc__
    state.update(raw_start=original, raw_wrapper=start_new_thread)
    _thread.start_new_thread = start_new_thread


#: ident -> (start site, target, label) of threads started with
#: ``_thread.start_new_thread``.
_raw_threads: dict[int, tuple[RawFrames, str, str | None]] = {}
#: At most this many are remembered; the entries of threads that are gone go first.
MAX_RAW_THREADS = 512


def _prune_raw_threads() -> None:
    alive = sys._current_frames()
    for ident in [i for i in _raw_threads if i not in alive]:
        _raw_threads.pop(ident, None)
    while len(_raw_threads) > MAX_RAW_THREADS:  # all alive: the oldest go
        _raw_threads.pop(next(iter(_raw_threads)), None)


def raw_thread_origin(ident: int) -> tuple[RawFrames, str, str | None] | None:
    """Where the ``_thread`` thread ``ident`` was started, its function, and the label
    set when it started (``forksafe._labels``), if observed."""
    return _raw_threads.get(ident)


def observe_connections() -> None:
    """Record where SQLite connections open (the connection half of ``observe()``, which
    needs no ``threading``: for a program that imports ``sqlite3`` before it)."""
    set_connect_layer("observe", _origin_layer)


def unobserve() -> None:
    """Undo ``observe()`` exactly: the original functions are restored by identity.

    Only where forksafe's wrapper is still the one bound: a library that wrapped
    ``Thread.start`` over ours since (Sentry's threading integration does)
    keeps its wrapper, and ours inside it stops recording.
    """
    if not _state:
        set_connect_layer("observe", None)  # observe_connections() alone, perhaps
        return
    import threading

    if threading.Thread.__dict__.get("start") is _state["thread_wrapper"]:
        threading.Thread.start = _state["thread_start"]  # type: ignore[method-assign]
    import _thread

    if _thread.start_new_thread is _state.get("raw_wrapper"):
        _thread.start_new_thread = _state["raw_start"]
    _state.clear()
    set_connect_layer("observe", None)


def thread_origin(thread: threading.Thread) -> RawFrames | None:
    """The raw start site recorded for ``thread``, or None if it started unobserved."""
    frames: RawFrames | None = getattr(thread, _ORIGIN_ATTR, None)
    return frames


def connection_origin(connection: object) -> RawFrames | None:
    """Where ``connection`` was opened, if it was opened through the observed ``connect``.

    The caller holds ``connection``, so it is alive: an entry not yet bound to
    a liveness token is bound to this connection now, and an entry whose token
    died belongs to a freed connection that had this address before.
    """
    entry = _live_entry(connection)
    if entry is None:
        return None
    where, offset = entry[0], entry[1]
    if offset < 0:
        frames: RawFrames = where
        return frames
    return ((where, _line_at(where, offset)),)


def thread_during(thread: threading.Thread) -> str | None:
    """The label that was set when ``thread`` started (``forksafe._labels``), if any."""
    label: str | None = getattr(thread, _DURING_ATTR, None)
    return label


def origin_known(connection: object) -> bool:
    """Whether ``connection`` has a live origin entry (it was opened through the observed
    ``connect``, and is not a freed connection's successor at its address)."""
    return _live_entry(connection) is not None


def connection_database(connection: object) -> tuple[bool, object]:
    """The ``database`` argument ``connection`` was opened with, and whether it is known
    (False for a connection opened unobserved)."""
    entry = _live_entry(connection)
    return (False, None) if entry is None else (True, entry[3])


def in_memory(database: object) -> bool:
    """Whether ``sqlite3.connect``'s ``database`` argument names a private database: one
    in memory (``:memory:``, a URI with ``mode=memory`` or ``file::memory:``), or the
    private temporary one of ``""``. The same name as a file path is not one.
    """
    if isinstance(database, bytes):
        database = database.decode("utf-8", "replace")
    if not isinstance(database, str):
        return False
    if database in (":memory:", ""):
        return True
    if not database.startswith("file:"):
        return False
    path, _, query = database[len("file:"):].partition("?")
    params = {key: value for key, _, value in (p.partition("=") for p in query.split("&"))}
    return path == ":memory:" or params.get("mode") == "memory"


def _live_entry(connection: object) -> Entry | None:
    """``connection``'s entry, bound to a liveness token the first time it is seen."""
    key = id(connection)
    entry = _connection_origins.get(key)
    if entry is None:
        return None
    token = entry[2]
    if token is None:
        token = _token_for(connection)
        if token is not None:
            entry = (entry[0], entry[1], token, entry[3])
            _connection_origins[key] = entry
    elif token() is None:
        return None
    return entry


def has_connections() -> bool:
    """Whether any connection's origin is recorded."""
    return bool(_connection_origins)


def recorded_connections() -> dict[int, Entry]:
    """A copy of the table, to take before looking for live connections."""
    return dict(_connection_origins)


def forget_closed(before: dict[int, Entry], open_now: Collection[object]) -> None:
    """Drop the entries of connections that a check found closed or gone.

    ``before`` was copied before the search: an entry written since (by a
    connect in another thread, perhaps at a reused address) is a different
    object and stays. Closed connections need no origin: they are no hazard.
    """
    alive = {id(connection) for connection in open_now}
    table = _connection_origins
    labels = CONNECTION_LABELS
    for key, entry in before.items():
        if key not in alive and table.get(key) is entry:
            table.pop(key, None)
            labels.pop(key, None)
            if not _forgotten:
                _forgotten.append(True)


def _line_at(code: types.CodeType, offset: int) -> int:
    """The line of the instruction at byte ``offset``, as ``frame.f_lineno`` gives it."""
    if sys.version_info >= (3, 10):
        for start, end, line in code.co_lines():
            if start <= offset < end and line is not None:
                return line
        return code.co_firstlineno
    import dis

    line = code.co_firstlineno
    for start, number in dis.findlinestarts(code):
        if start > offset:
            break
        line = number
    return line


def _no_token(connection: object) -> None:
    return None


def _token_maker(kind: type) -> Callable[[Any], Callable[[], object] | None]:
    """How to get a weak reference that lives exactly as long as a ``kind`` instance.

    * A type with weak reference support (forksafe's protected connections, a
      program's factory subclasses without ``__slots__``): the connection itself.
    * The plain C type, from CPython 3.11: it supports no weak references, but
      each connection owns a statement cache, a ``functools.lru_cache``
      wrapper that does, that nothing else refers to, and that is freed with
      it (found among the connection's references: cheap at check time, and
      too dear for ``connect()`` itself, where it was 1% of a connection).
    * Otherwise (Python 3.9 and 3.10): no token; the entry is trusted until a
      check finds its connection gone.
    """
    import gc
    import weakref

    if kind.__weakrefoffset__:
        return weakref.ref
    if not kind.__flags__ & (1 << 14):  # Py_TPFLAGS_HAVE_GC: no referents to look at
        return _no_token
    import functools

    lru = type(functools.lru_cache(maxsize=1)(_no_token))
    get_referents, ref = gc.get_referents, weakref.ref

    def statement_cache(connection: object) -> Callable[[], object] | None:
        for referent in get_referents(connection):
            if type(referent) is lru:
                return ref(referent)
        return None

    return statement_cache


def _token_for(connection: object) -> Callable[[], object] | None:
    kind = type(connection)
    make = _token_makers.get(kind)
    if make is None:
        make = _token_maker(kind)
        if len(_token_makers) < _MAX_TYPES:
            _token_makers[kind] = make
    try:
        return make(connection)
    except Exception:  # an odd subclass: keep the origin, unvalidated
        return None


def sqlite_used() -> bool:
    """Whether a connection was opened while observing (for 'SQLite was used')."""
    return bool(_connection_origins) or bool(_forgotten)


def sites(frames: RawFrames) -> list[Site]:
    """Turn recorded frames into sites, innermost first."""
    return [Site(code.co_filename, line, code.co_name) for code, line in frames]


def raw_frames(frame: types.FrameType | None) -> RawFrames:
    """Frames from ``frame`` outwards, up to and including the first in user code.

    Code objects and line numbers only: holding frames would keep locals alive.
    Stopping at the user's frame keeps the common case (the user calls
    ``start()`` or ``connect()`` directly) to one frame: on CPython 3.11+ every
    further ``f_back`` materialises a frame object, which is most of the cost.
    """
    out: list[tuple[types.CodeType, int]] = []
    while frame is not None and len(out) < DEPTH:
        code = frame.f_code
        out.append((code, frame.f_lineno))
        if not _is_library(code.co_filename):
            break
        frame = frame.f_back
    return tuple(out)


# -- sqlite3.connect, shared by several layers ---------------------------------
#
# Three features wrap ``sqlite3.connect``: the origin recording above ("observe"),
# the label recording ("during", in forksafe._labels) and the protection of
# connections inherited across fork ("protect", in forksafe._remedies.sqlite).
# Each may be turned on and off at any time and in
# any order, so neither may simply put back "the function it found": that would
# drop the other's wrapper or resurrect a removed one. Instead the layers live
# in one table and the chain is rebuilt from the true original whenever a layer
# comes or goes, always in the same order (protect innermost, so that the
# ledger records the very object the program gets). With no layer left, the
# original function is back by identity.

#: Inner to outer: "observe" outermost, so that its caller is the program's line.
LAYER_ORDER = ("protect", "during", "observe")

ConnectLayer = Callable[[Callable[..., Any]], Callable[..., Any]]

_layers: dict[str, ConnectLayer] = {}
#: "original": the true sqlite3.connect, "modules": where it was found,
#: "installed": the function last bound there.
_chain: dict[str, Any] = {}
_finder: list[_SqliteImportHook] = []


def set_connect_layer(name: str, make: ConnectLayer | None) -> None:
    """Add (``make(inner) -> wrapper``) or remove (``None``) a layer around ``connect``.

    ``sqlite3`` is never imported here: when the program has not imported it
    yet, a one-shot import hook builds the chain the moment it does.
    """
    if name not in LAYER_ORDER:
        raise ValueError(f"unknown connect layer {name!r}")
    _bind()  # first: it may import threading, and so run observe() right here
    if make is not None and _layers.get(name) is make:
        return
    if make is None:
        _layers.pop(name, None)
    else:
        _layers[name] = make
    module = sys.modules.get("sqlite3")
    if module is not None:
        _remove_finder()
        _rebuild(module)
    elif _layers and not _finder:
        finder = _SqliteImportHook()
        _finder.append(finder)
        sys.meta_path.insert(0, finder)
    elif not _layers:
        _remove_finder()


def _remove_finder() -> None:
    while _finder:
        finder = _finder.pop()
        if finder in sys.meta_path:
            sys.meta_path.remove(finder)


def _rebuild(sqlite3: types.ModuleType) -> None:
    if not _chain:
        if not _layers:
            return
        original = sqlite3.connect
        modules = [sqlite3]
        dbapi2 = getattr(sqlite3, "dbapi2", None)
        if isinstance(dbapi2, types.ModuleType) and dbapi2.connect is original:
            modules.append(dbapi2)
        _chain.update(original=original, modules=modules)
    func: Callable[..., Any] = _chain["original"]
    for name in LAYER_ORDER:
        make = _layers.get(name)
        if make is not None:
            func = make(func)
    installed = _chain.get("installed", _chain["original"])
    for module in _chain["modules"]:
        current = module.__dict__.get("connect")
        # Another library may have wrapped connect over ours since (OpenTelemetry's
        # sqlite3 instrumentation does): rebinding would silently drop its wrapper,
        # so it stays, calling the chain it captured.
        if current is installed or current is _chain["original"]:
            module.connect = func
    _chain["installed"] = func
    if not _layers:
        _chain.clear()


#: Whether observation may use the C recorder (``forksafe._speedups``) when it was
#: built; tests turn it off to check the Python wrapper gives the same answers.
SPEEDUPS = True


def _origin_layer(original: Callable[..., Any]) -> Callable[..., Any]:
    """``original`` wrapped to record where each connection is opened.

    The hot path of a program that connects per request. The C recorder
    (``forksafe._speedups``, built with the package when a compiler is there)
    costs ~1% of an in-memory connect; this Python wrapper ~3.5%, of which
    ~1% is any Python function that merely passes the call on
    (``benchmarks/bench_observe.py``). Both store the same entries; what is
    not the user's code seen before goes to ``_record_slow``.
    """
    recorder = _speedups_recorder(original) if SPEEDUPS else None
    if recorder is not None:
        return recorder
    origins = _connection_origins
    getframe = sys._getframe

    def connect(*args: Any, **kwargs: Any) -> Any:
        connection = original(*args, **kwargs)
        frame = getframe(1)
        code = frame.f_code
        database = args[0] if args else kwargs.get("database")
        if _known_files.get(code.co_filename) is False:  # the user's code, seen before
            origins[id(connection)] = (code, frame.f_lasti, None, database)
        else:
            _record_slow(connection, frame, database)
        if len(origins) > MAX_CONNECTIONS:
            _prune(origins)
        return connection

    connect.__wrapped__ = original  # type: ignore[attr-defined]
    connect.__doc__ = original.__doc__
    return connect


def _speedups_recorder(original: Callable[..., Any]) -> Callable[..., Any] | None:
    """The C recorder around ``original``, or None when it was not built (or fails).

    It holds ``_known_files`` as it is now: should ``_bind`` replace that dict
    later, the recorder only sends every connect to ``_record_slow``, which
    reads the current one (slower, never wrong).
    """
    try:
        from forksafe._speedups import Recorder
    except ImportError:
        return None
    try:
        recorder: Callable[..., Any] = Recorder(original, _connection_origins, _known_files,
                                                _record_slow, _prune, MAX_CONNECTIONS)
        recorder.__wrapped__ = original  # type: ignore[attr-defined]
        recorder.__doc__ = original.__doc__
    except Exception:  # an odd build: the Python wrapper does the same
        return None
    return recorder


def _record_slow(connection: object, frame: types.FrameType, database: object) -> None:
    """A connection opened from a file not seen before, or from a library: a library's
    caller is not where the user opened it, so the frames above it are kept too."""
    code = frame.f_code
    if _is_library(code.co_filename):
        _connection_origins[id(connection)] = (raw_frames(frame), -1, None, database)
    else:
        _connection_origins[id(connection)] = (code, frame.f_lasti, None, database)


def _prune(origins: dict[int, Entry]) -> None:
    """Make room in a full table, keeping the origins most likely to be asked for.

    Entries known dead go first. Then, since most entries of a program that
    opens a connection per request were never seen by a check, the oldest go —
    except the first quarter: the connections opened at start-up, the
    long-lived ones most likely to be inherited by a fork. Left at most three
    quarters full, so the scan runs at most once per ``MAX_CONNECTIONS // 4``
    new connections.
    """
    for key, (_, _, token, _) in list(origins.items()):
        if token is not None and token() is None:
            origins.pop(key, None)
    excess = len(origins) - MAX_CONNECTIONS // 2
    if len(origins) > MAX_CONNECTIONS * 3 // 4:
        first = MAX_CONNECTIONS // 4
        for key in list(itertools.islice(origins, first, first + excess)):
            origins.pop(key, None)
    if not _forgotten:
        _forgotten.append(True)


class _SqliteImportHook:
    """Wraps ``sqlite3.connect`` right after the program imports ``sqlite3``.

    A meta path finder by its ``find_spec`` alone, not a subclass of
    ``importlib.abc.MetaPathFinder``: importing ``importlib.abc`` imports
    ``importlib.resources``, ``pathlib``, ``tempfile`` and ``shutil`` (eight
    megabytes of a guarded process's memory, copied at every fork, were forksafe's
    imports).

    It answers ``None`` for every other module, so the import system's cost is
    one string comparison per import. While it asks the other finders it answers
    ``None`` to itself: one of them may be a finder like it (the guard's) that asks
    the others in turn.
    """

    resolving = False

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "sqlite3" or self.resolving:
            return None
        self.resolving = True
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec: importlib.machinery.ModuleSpec | None = finder.find_spec(
                    fullname, path, target)
                if spec is not None and spec.loader is not None:
                    spec.loader = cast("importlib.abc.Loader", _WrappingLoader(spec.loader))
                    return spec
        finally:
            self.resolving = False
        return None


class _WrappingLoader:
    """The ``sqlite3`` module's loader, wrapped (a loader by its methods, as above)."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        # The module's own loader goes back first, so that nothing but connect
        # is changed: importlib.resources, reload() and pkgutil ask the loader.
        if getattr(module, "__loader__", None) is self:
            module.__loader__ = self._loader
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.loader is self:
            spec.loader = self._loader
        self._loader.exec_module(module)
        _remove_finder()
        _rebuild(module)
