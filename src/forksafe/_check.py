"""``check()``: run every probe over one snapshot and bundle the hazards.

A probe that fails must not take the host program down with it: its failure
becomes an info-level ``probe-error`` hazard in the report, and a
``ForkSafetyWarning`` naming the probe is emitted once per process, not on every
fork.

The guard calls ``check()`` before every fork, and on a process that forks
thousands of times nothing changes between two forks. So the last report's
hazards are kept with a *fingerprint* of everything they were computed from
(``_fingerprint``), and reused while the fingerprint is equal: the same process
and calling thread, the same working directory, the same set of loaded images,
as many OS threads as Python threads (so no native thread to look at), the
same Python threads with the same names and every frame of their stacks at
the same line. Anything a probe reads that the fingerprint cannot see — a lock
inside a ``with`` block, a runtime's own activity flag, SQLite connections, an
event loop — makes that probe mark the snapshot ``volatile``, and a volatile
report is never reused. Neither is a report a probe failed in, nor one whose
fingerprint changed while it was being computed.

Threads forking at once (a fork storm) never find the process as it was: after
``MISSES`` misses in a row the check goes by the fingerprint's facts and a token
per thread instead (``_storm_check``): reports are kept by those, and a new
combination of places the threads were met at before is composed from known
parts (``_compose``), without running a probe.
"""

from __future__ import annotations

import os
import sys
import threading
import types
import warnings
from _thread import allocate_lock, get_ident
from _weakref import ref
from typing import Any, Callable, Literal, Sequence, Tuple

from forksafe._errors import ForkSafetyWarning
from forksafe._frames import outside_forksafe
from forksafe._platform import Platform, current
from forksafe._probes import Probe, probes
from forksafe._probes.threads import by_tokens
from forksafe._render.sites import one_working_directory
from forksafe._render.text import printable
from forksafe._report import Hazard, Report, Severity
from forksafe._snapshot import ACTIVE, LIMBO, Snapshot, read_tokens, same_tokens

PROBE_FAILED = (
    "forksafe: the {probe!r} probe failed ({error}); its hazards are missing from fork "
    "reports, the program goes on. Please report this with the error above."
)

#: Deeper stacks than this are not fingerprinted (the report is not reused).
MAX_STACK = 256

_reported_failures: set[str] = set()

Fingerprint = Tuple[object, ...]
#: The last reusable check: its fingerprint, and its report.
_last: tuple[Fingerprint, Report] | None = None


def check() -> Report:
    """Hazards if the calling thread called ``fork()`` now."""
    return _check(None, sys._current_frames, None, True, 4)


def check_for(mechanism: str) -> Report:
    """``check()`` for a fork made through ``mechanism`` (``"multiprocessing"``: what a
    multiprocessing child would meet, for ``forksafe.get_context()``)."""
    from forksafe._grade import ForkContext, grade

    return grade(_check(None, sys._current_frames, None, True, 4, graded=False),
                 ForkContext(mechanism))[0]


def check_with(
    *,
    platform: Platform | None = None,
    current_frames: Callable[[], dict[int, types.FrameType]] = sys._current_frames,
    probes: list[tuple[str, Probe]] | None = None,
    reuse: bool = True,
) -> Report:
    """``check()`` with its inputs given: another platform backend, other stacks, other
    probes, or no reuse of an unchanged process's report (for tests)."""
    return _check(platform, current_frames, probes, reuse, 4)


def _check(
    platform: Platform | None,
    current_frames: Callable[[], dict[int, types.FrameType]],
    probes: list[tuple[str, Probe]] | None,
    reuse: bool,
    stacklevel: int,
    *,
    graded: bool = True,
) -> Report:
    if reuse and platform is None and probes is None:
        report = fork_check(current_frames, _stacklevel=stacklevel)
        if report is _last_report() or any(r is report for r in _storm.values()):
            # The same hazards, as a report of its own, made now.
            report = Report(hazards=report.hazards, thread=report.thread)
    else:
        report = _run_probes(platform or current(), current_frames, probes, None, stacklevel)
    if not graded:
        return report
    from forksafe._grade import GENERIC, grade

    return grade(report, GENERIC)[0]


def fork_check(
    current_frames: Callable[[], dict[int, types.FrameType]] = sys._current_frames,
    *,
    watch: bool = False,
    _stacklevel: int = 2,
) -> Report:
    """``check()`` for the guard: an unchanged process gets the very same ``Report`` back.

    Its ``time`` is then that of the check that computed it, whose answer
    still holds; the guard keeps the time of each fork in its own event. One
    object less per fork is a page less to copy (see ``forksafe._guard``).
    ``watch``: keep a descriptor open to watch the address-space size, which
    spares most forks a ctypes call (``_fingerprint``); the guard does, until
    ``uninstall()`` closes it (``close_files``).
    """
    global _misses
    platform = _current or current()
    seen: list[dict[int, types.FrameType]] = []
    # Threads forking at once find each other elsewhere at every fork: then no report
    # is ever reused, and reading every stack for a key is work for nothing. After
    # MISSES misses in a row only one check in RETRY reads the stacks; the others
    # take the facts the fingerprint has without them (see ``_run_probes``).
    stacks = _misses < MISSES or _misses % RETRY == 0
    try:
        key = _fingerprint(platform, current_frames, watch, seen, stacks=stacks)
    except Exception:  # an odd thread object, say: then simply no reuse
        key = None
    if not stacks:
        _misses += 1
        return _storm_check(platform, current_frames, key, _stacklevel + 1)
    last = _last
    if key is not None and last is not None and last[0] == key:
        if _misses:  # only then: a store per fork is a page written per fork
            _misses = 0
        return last[1]
    _misses += 1
    if seen:  # the probes look at the very stacks the fingerprint saw
        frames = seen[0]
        return _run_probes(platform, lambda: dict(frames), None, key, _stacklevel + 1)
    return _run_probes(platform, current_frames, None, key, _stacklevel + 1)


#: Misses in a row after which the stacks are read only at every RETRY-th check.
MISSES = 8
RETRY = 16
_misses = 0

#: Reports of a fork storm, by what each was made of: the facts of the fingerprint
#: and every other thread's token (``forksafe._snapshot.read_tokens``). The process as
#: a whole never looks the same twice, but each thread stands at one of a few places,
#: and the same few combinations come back: their report is made once. Bounded:
#: cleared when full.
_storm: dict[Fingerprint, Report] = {}
STORM_SIZE = 256


def _storm_check(platform: Platform,
                 current_frames: Callable[[], dict[int, types.FrameType]],
                 facts: Fingerprint | None, stacklevel: int) -> Report:
    """``fork_check`` while threads fork at once: the report of the same facts and
    thread tokens, if one was made, else the probes' (kept when nothing moved)."""
    tokens = None
    if facts is not None and current_frames is _CURRENT_FRAMES:
        tokens = read_tokens()
    if tokens is None or facts is None:
        return _run_probes(platform, current_frames, None, None, stacklevel + 1, facts=facts)
    key = (*facts, *tokens)
    known = _storm.get(key)
    if known is not None:
        return known
    composed = _compose(facts, tokens)
    if composed is not None:
        if len(_storm) >= STORM_SIZE:
            _storm.clear()
        _storm[key] = composed
        return composed
    return _run_probes(platform, current_frames, None, None, stacklevel + 1, facts=facts,
                       tokens=tokens)


#: For the facts of a storm's check (``_storm_check``): the hazards the probes other
#: than the thread probe found, those before it and those after it, when nothing they
#: read could change unseen (no probe marked the snapshot volatile). Bounded.
_others: dict[Fingerprint, tuple[tuple[Hazard, ...], tuple[Hazard, ...]]] = {}


def _compose(facts: Fingerprint, tokens: list[object]) -> Report | None:
    """A storm's report made of known parts, without running the probes: the other
    probes' hazards for the same facts, and each thread's hazard by its token. Every
    combination of places the forking threads stand at is a new report, but not new
    parts (a fork storm of 8 threads meets hundreds of combinations)."""
    parts = _others.get(facts)
    if parts is None:
        return None
    hazards = by_tokens(tokens, facts[4])  # type: ignore[arg-type]
    if hazards is None:
        return None
    return Report(hazards=(*parts[0], *hazards, *parts[1]), thread=facts[2])  # type: ignore[arg-type]


def _last_report() -> Report | None:
    last = _last
    return None if last is None else last[1]


def _run_probes(
    platform: Platform,
    _current_frames: Callable[[], dict[int, types.FrameType]],
    _probes: Sequence[tuple[str, Probe]] | None,
    key: Fingerprint | None,
    stacklevel: int,
    *,
    facts: Fingerprint | None = None,
    tokens: list[object] | None = None,
) -> Report:
    """Run the probes; keep the report for reuse when ``key`` allows it (``facts``: a
    key made without the stacks, whose facts the probes can use; with the threads'
    ``tokens``, the report is kept for the same facts and tokens, ``_storm_check``).

    ``key`` was computed once, from the stacks ``_current_frames`` gives (the guard
    passes the very table the fingerprint read). The report is kept only if nothing
    moved while the probes looked (``_unmoved``): computing the fingerprint a second
    time to tell, as this once did, was a third of a fork's check in a fork storm.
    """
    global _last, _current
    if key is not None:
        _current = platform
    snapshot = Snapshot(platform, _current_frames)
    known = key if key is not None else facts
    if known is not None:
        # The fingerprint found as many OS threads as Python threads, and read the
        # images version: facts the probes need not look up again.
        snapshot.images, snapshot.python_only = known[3], True  # type: ignore[assignment]
    if tokens is not None:
        snapshot.tokens = tokens
    tops = _tops(snapshot.frames) if key is not None else ()
    hazards: list[Hazard] = []
    failed = False
    # The fingerprint read the working directory: every site's text is made against it.
    threads_at = threads_end = -1  # where the thread probe's hazards are in the report
    with one_working_directory(known[4] if known is not None else None):
        for name, probe in _all_probes() if _probes is None else _probes:
            if name == "threads":
                threads_at = len(hazards)
            failed |= _run_probe(name, probe, snapshot, hazards, stacklevel)
            if name == "threads":
                threads_end = len(hazards)
    report = Report(hazards=tuple(hazards), thread=snapshot.caller.name)
    if key is not None:
        try:
            still = not failed and not snapshot.volatile and _unmoved(key, tops)
        except Exception:
            still = False
        _last = (key, report) if still else None
    elif tokens is not None and facts is not None and not failed and not snapshot.volatile:
        others = None if threads_at < 0 else (
            tuple(hazards[:threads_at]), tuple(hazards[threads_end:]))
        _keep_storm(facts, tokens, report, others)
    return report


def _keep_storm(facts: Fingerprint, tokens: list[object], report: Report,
                others: tuple[tuple[Hazard, ...], tuple[Hazard, ...]] | None) -> None:
    """Keep a storm's report, and the other probes' hazards for its facts (``others``),
    if no thread moved while the probes looked (the tokens read again are the same),
    none is starting, and no native one started."""
    try:
        if _LIMBO or not same_tokens(tokens, read_tokens()) or \
                _lstat("/proc/self/task").st_nlink - 2 != len(_ACTIVE):
            return
    except OSError:
        return
    if len(_storm) >= STORM_SIZE:
        _storm.clear()
    key = (*facts, *tokens)
    _storm[key] = report
    if others is not None:
        if len(_others) >= STORM_SIZE:
            _others.clear()
        _others[facts] = others


Tops = Tuple[Tuple[int, types.FrameType, "int | None"], ...]
#: The length of a key made for a process with one thread (no stacks in it).
_ALONE = 5


def _tops(frames: dict[int, types.FrameType]) -> Tops:
    """Each thread's innermost frame outside forksafe and its line, as the probes are
    about to see them."""
    tops = []
    for ident, frame in frames.items():
        outside = outside_forksafe(frame)
        if outside is not None:
            tops.append((ident, outside, outside.f_lineno))
    return tuple(tops)


def _unmoved(key: Fingerprint, tops: Tops) -> bool:
    """Nothing the report depends on moved since ``key``: the same threads (Python and
    OS), each still in the same innermost frame at the same line — and while that frame
    is on top, every frame below it is as it was. A library loaded meanwhile changes
    the images version, so the key is never met again: no need to look."""
    if _LIMBO or (len(key) == _ALONE and tops):
        return False  # a thread is starting, or one started after a key made alone
    me = get_ident()
    read = _stacks_reader() if len(key) == _ALONE + 1 else None
    if read is not None and read(_ACTIVE, me, _DUMMY, "_name", "_daemonic",
                                 MAX_STACK) != key[-1]:
        return False  # the stacks the key was read from are not the ones now
    if {ident for ident in _ACTIVE if ident != me} != {ident for ident, _, _ in tops}:
        return False
    try:
        if _lstat("/proc/self/task").st_nlink - 2 != len(_ACTIVE):
            return False
    except OSError:
        return False
    now = sys._current_frames()
    return all(outside_forksafe(now.get(ident)) is frame and frame.f_lineno == line
               for ident, frame, line in tops)


def _run_probe(name: str, probe: Probe, snapshot: Snapshot, hazards: list[Hazard],
               stacklevel: int) -> bool:
    """Add one probe's hazards; True if it failed (its failure is an info hazard, and a
    warning once per process: a probe bug must never break the host program)."""
    try:
        hazards.extend(probe(snapshot))
        return False
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        hazards.append(Hazard(
            "probe-error", Severity.INFO, f"the {name} probe failed: {error}",
            "the check went on without this probe; please report the error",
            {"probe": name, "error": error},
        ))
        if name not in _reported_failures:
            _reported_failures.add(name)
            warnings.warn(printable(PROBE_FAILED.format(probe=name, error=error)),
                          ForkSafetyWarning, stacklevel=stacklevel + 1)
        return True


#: (platform, its ``images_version_reader()``): looked up once, not on every fork.
_reader: tuple[Platform, Callable[[], int]] | None = None
#: [pid, its /proc/<pid>/statm descriptor, the address-space size that was read
#: there as b"<pages> ", the images version read right after]: see _fingerprint.
#: pid 0: nothing read (or /proc unusable), the version is read every time.
_vm: list[Any] = [0, -1, b"", 0]
_MODULES = sys.modules
_ACTIVE, _LIMBO = ACTIVE, LIMBO
_lstat, _getpid, _pread, _getcwd = os.lstat, os.getpid, os.pread, os.getcwd
#: pid -> the lock under which _read_images updates _vm: taken without waiting (a
#: fork path must never block), and made anew by a child, whose copy may be held.
_vm_locks: dict[int, Any] = {}


def _read_images(read: Callable[[], int], pid: int) -> int:
    """The images version, and the address-space size it goes with (see ``_fingerprint``).

    The size is read first: an image loaded in between then shows as a
    changed size at the next look, which reads the version again.
    """
    lock = _vm_locks.get(pid) or _vm_locks.setdefault(pid, allocate_lock())
    if not lock.acquire(False):  # never waits: another thread is at it, read directly
        return read()
    try:
        vm = _vm
        if vm[0] != pid:
            vm[0] = 0
            for other in [p for p in _vm_locks if p != pid]:  # inherited from the parent
                _vm_locks.pop(other, None)
            if vm[1] >= 0:  # the parent's, inherited: ours reads the parent's numbers
                os.close(vm[1])
                vm[1] = -1
            vm[1] = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
        data = os.pread(vm[1], 32, 0)
        size = data[: data.index(b" ") + 1]
        images = read()
        vm[:] = [pid, vm[1], size, images]
        return images
    except (OSError, ValueError):
        _vm[0] = 0
        return read()
    finally:
        lock.release()


def close_files() -> None:
    """Close the descriptor ``_fingerprint`` keeps open (``forksafe.uninstall()``)."""
    fd = _vm[1]
    _vm[:] = [0, -1, b"", 0]
    if fd < 0:
        return
    try:
        os.close(fd)
    except OSError:  # closed behind our back: nothing left to do
        return


#: Whether the stacks may be read in C (``forksafe._speedups.stacks``); off: in Python
#: (tests of both ways).
C_STACKS = True
#: The C reader once looked up; False: there is none (not built, or not for this Python).
_stacks: Callable[..., object] | Literal[False] | None = None
_CURRENT_FRAMES = sys._current_frames
_DUMMY = threading._DummyThread


def _stacks_reader() -> Callable[..., object] | None:
    """``forksafe._speedups.stacks``, when built for this Python and allowed.

    Reading 100 threads' stacks in Python writes to every thread, name, frame and
    code object it touches (reference counts): after a fork each of those pages is
    a copy-on-write fault in the parent, ~180 pages and ~0.9 ms per fork of a
    100 MB process with 100 idle threads. The C reader only reads, and answers
    with a token: the same object while every thread (its identity, name, daemon
    flag) and every frame (code, instruction) is as the last call found them. It
    is looked up at the first fork, never by ``import forksafe``.
    """
    global _stacks
    found = _stacks
    if found is None:
        try:
            from forksafe import _speedups

            found = _stacks = getattr(_speedups, "stacks", None) or False
        except ImportError:  # not built (no compiler)
            found = _stacks = False
    return found if C_STACKS and found is not False else None


#: The probes, once built: published whole by one assignment, never extended in place.
_probe_list: tuple[tuple[str, Probe], ...] | None = None
#: The platform, once known: one call less per fork than asking current().
_current: Platform | None = None


def _all_probes() -> tuple[tuple[str, Probe], ...]:
    """The probe list. Threads forking at once may each build it the first time (no
    lock: a forked child must never find one held), but each publishes a whole list
    and every check runs one list: each probe once, each hazard once."""
    global _probe_list
    found = _probe_list
    if found is None:
        found = _probe_list = tuple(probes())
    return found


def _fingerprint(
    platform: Platform,
    current_frames: Callable[[], dict[int, types.FrameType]],
    watch: bool = False,
    seen: list[dict[int, types.FrameType]] | None = None,
    *,
    stacks: bool = True,
) -> Fingerprint | None:
    """What a reusable report depends on, or None when it cannot be told cheaply.

    A thread is recognised by a weak
    reference (equal while the same object lives; no thread is kept alive),
    and its stack by the code object and line of every frame (from the first frame
    outside forksafe's own code). ``seen`` gets the table of stacks it read (none for
    a process with one thread); ``stacks=False``: the key without the stacks, only
    for the facts in it (``fork_check``).
    """
    global _reader
    reader = _reader
    if reader is None or reader[0] is not platform:
        make = getattr(platform, "images_version_reader", None)
        if make is None:
            return None
        reader = _reader = (platform, make())
    # Module attributes bound once (_MODULES, _lstat, ...): each module object
    # looked up is one more object written to (its reference count) per fork.
    modules = _MODULES
    if "sqlite3" in modules:
        return None
    events = modules.get("asyncio.events")
    if events is not None and events._get_running_loop() is not None:
        return None
    active = _ACTIVE
    if _LIMBO:
        return None  # a thread is starting
    try:
        os_threads = _lstat("/proc/self/task").st_nlink - 2  # procfs: 2 + one per thread
    except OSError:
        return None
    if os_threads != len(active):
        return None  # a thread Python does not know: a native one, to be looked at
    me = get_ident()
    caller = active.get(me)
    pid = _getpid()
    # The images version is a ctypes call, ~17 pages written per fork (each a
    # copy-on-write fault; forksafe._guard); the size of the address space, read
    # from /proc into a buffer, ~3. Loading or unloading an image maps or unmaps
    # it, so while the size stays the same, so does the version read with it.
    if not watch:
        images = reader[1]()
    else:
        vm = _vm
        try:
            # Its own bytes, not a shared buffer: other threads read it too.
            same = vm[0] == pid and _pread(vm[1], 32, 0).startswith(vm[2])
        except OSError:
            same = False
        images = vm[3] if same else _read_images(reader[1], pid)
    if caller is None or images <= 0:
        return None
    try:
        cwd = _getcwd()
    except OSError:
        return None
    # _name, not the name property: a Python call less on every fork (forksafe._guard)
    name = caller._name  # type: ignore[attr-defined]
    if len(active) == 1 or not stacks:  # the caller alone: no stacks to look at
        return (pid, me, name, images, cwd)
    read = None
    if current_frames is _CURRENT_FRAMES and C_STACKS:
        read = _stacks if _stacks is not None else _stacks_reader()
    if read:  # found once, then a global read per fork rather than a call
        # Read in C without a write to any Python object (see ``_stacks_reader``).
        token = read(active, me, _DUMMY, "_name", "_daemonic", MAX_STACK)
        return None if token is None else (pid, me, name, images, cwd, token)
    frames = current_frames()
    frames.pop(me, None)  # our own frame would refer back to this table
    if seen is not None:
        seen.append(frames)
    parts: list[object] = [pid, me, name, images, cwd]
    dummy = threading._DummyThread
    for ident, thread in list(active.items()):
        if ident == me:
            continue
        if isinstance(thread, dummy):
            return None  # a native thread running Python code
        # No is_alive(): a thread is put in _active after it started and taken out
        # before it can stop (the main thread stops in place only at shutdown, which
        # changes its stack), so in _active means alive, as the probes see it.
        parts += (ref(thread), thread.name, thread.daemon)
        # From its caller on, for a thread inside forksafe's own code (its own guarded
        # fork or wait): where the program put it, as the probes describe it.
        frame = outside_forksafe(frames.get(ident))
        depth = 0
        while frame is not None:
            depth += 1
            if depth > MAX_STACK:
                return None
            parts += (frame.f_code, frame.f_lineno)
            frame = frame.f_back
        parts.append(None)
    return tuple(parts)
