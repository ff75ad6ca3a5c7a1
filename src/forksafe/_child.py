"""The little that runs in a forked child right after a guarded fork.

A forked child may inherit locks held by threads that do not exist in it, so
everything here is a handful of system calls: point ``faulthandler`` at a crash
file (opened by the parent before an ``os.fork``, by the child itself after
other kinds of fork; see ``open_spare``). ``faulthandler`` is the right tool
because its handlers are C signal handlers that write the Python traceback of
every thread without taking the GIL or any lock, so they work in a child that
crashed inside C code, or that is stuck in C code holding the GIL.

The file survives the child's death. It is ``<state dir>/<child pid>.crash``
(``forksafe._statedir``) when a hang monitor or ``forksafe run`` may look for
it, which reads and removes it, else a memory file the parent reads when it
reaps the child (``forksafe._outcome.on_reaped``). Four signals write into it:

* the fatal signals ``faulthandler.enable`` covers (SIGSEGV, SIGBUS, SIGILL,
  SIGFPE, SIGABRT): traceback, then the signal's default action, so the child
  still dies by the same signal and its parent sees the true wait status;
* SIGTRAP, which ``faulthandler.enable`` does not cover but which Apple's
  libdispatch raises (``brk``) on arm64 when used in a forked child. It is
  registered with ``chain=True``: faulthandler then restores the previous
  disposition (the default: terminate with a core) and re-raises, so the child
  dies by SIGTRAP instead of returning to the trapping instruction and looping;
* SIGTERM, when it has its default action, the same way (``chain=True``): some
  runtimes that find themselves in a forked child end it so, and its stacks then
  show where (``forksafe._diagnose.ended_itself``); the child dies as it would;
* ``DUMP_SIGNAL``, only when a hang timeout is set: the hang monitor, which runs
  in another process, sends it to a child that made no progress to get the
  Python stacks of all its threads. ``chain=False``: the handler writes and
  returns, and the interrupted system call is restarted (SA_RESTART).
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found,unused-ignore]  # no stubs; signal.getsignal wraps it
import faulthandler
import os
import signal
from functools import partial
from typing import TYPE_CHECKING, Callable

from forksafe import _config, _statedir

if TYPE_CHECKING:
    from forksafe._seam import CrashFile

try:  # imported here, in the parent: a forked child must not load extension modules
    import fcntl as _fcntl
except ImportError:  # pragma: no cover - not POSIX
    _fcntl = None  # type: ignore[assignment]

#: The signal the hang monitor sends for a stack dump. A real-time signal, because
#: applications use SIGUSR1/SIGUSR2 (gunicorn does) and real-time signals are rarely
#: claimed; the monitor checks the child's caught-signal mask before sending it,
#: since the default action of a real-time signal is to terminate.
DUMP_SIGNAL: int | None = (
    int(signal.SIGRTMAX) - 3 if hasattr(signal, "SIGRTMAX") else None  # type: ignore[attr-defined,unused-ignore]
)

#: A crash file by name is always a new file (``O_EXCL``), reached without following a
#: link (``O_NOFOLLOW``), in a directory ``forksafe._statedir`` checked is ours.
_FLAGS = _statedir.CREATE_FLAGS | os.O_APPEND
_create = _statedir.create


#: The crash file this process's faulthandler writes to, once armed (``armed()``),
#: in a box that a C call can fill in the child (``memory_armer``). A child that
#: forks again inherits it; its own child closes it after re-arming.
_armed_box: list[CrashFile | None] = [None]
_spare_count = 0
#: Whether faulthandler was on before forksafe armed this process (the program's own
#: choice, e.g. pytest's or PYTHONFAULTHANDLER): None until armed.
_program_faulthandler: bool | None = None


def armed() -> CrashFile | None:
    """The crash file this process is armed with, if any."""
    return _armed_box[0]


def program_faulthandler() -> bool:
    """Did the program itself turn faulthandler on (before forksafe pointed it at a file)?

    A parent that reaps a crashed child echoes the child's traceback to stderr
    when so, since arming redirected what the child would have printed there.
    """
    if _program_faulthandler is not None:
        return _program_faulthandler
    return faulthandler.is_enabled()


def prepare(hang_timeout: float | None = None) -> None:
    """Parent side, before every guarded fork: work out what ``arm`` will need.

    Right after a fork, parent and child share every page copy-on-write, and
    each object the child's Python code touches copies a page: deciding the
    state directory in the child (the environment, ``os.path``, ``lstat``)
    cost ~80 page copies per fork, a tenth of a bare fork of a 100 MB process.
    So the parent decides once per process, and the child inherits the answer.
    The guard calls this before each fork it sees (this module registers no
    fork hook of its own: those would run on every fork, guarded or not).
    Never raises.
    """
    global _prepared, _program_faulthandler, _dump_free
    try:
        pid = os.getpid()
        if _prepared is None or _prepared[0] != pid:
            _prepared = (pid, _statedir.checked_prefix(), bool(_config.state_dir_override()))
            if _program_faulthandler is None:
                _program_faulthandler = faulthandler.is_enabled()
        elif hang_timeout is None:
            return
        # Never take the dump signal from a program that handles it itself; looked
        # at again before each fork that will use it (with a hang timeout).
        _dump_free = DUMP_SIGNAL is not None and _getsignal(DUMP_SIGNAL) == _SIG_DFL
    except Exception:  # a fork hook must never fail the fork
        return


def crash_prefix() -> str | None:
    """``<state dir>/`` as ``prepare`` checked it in this process, if it did."""
    prepared = _prepared
    if prepared is not None and prepared[0] == os.getpid():
        return prepared[1]
    return None


def warm_up() -> None:
    """Parent side, once before the first guarded fork: make ``faulthandler`` allocate
    what arming a child makes it allocate, so that children do not.

    ``faulthandler.enable`` allocates its alternate signal stack on first use,
    and ``register`` its table of user signals; in a child that is ~25 pages
    written, each copied (copy-on-write), about 75 us of every fork of a 100
    MB process. Enabling and disabling once here leaves both allocated, and
    leaves the program as it was otherwise: ``disable`` puts back the signal
    handlers ``enable`` replaced, and ``is_enabled()`` is False again. (The
    alternate stack stays registered for this thread, as CPython up to 3.9
    registered it at start-up in every process.) Nothing is done when the
    program turned faulthandler on itself, and the dump signal is only
    borrowed while nobody handles it. Never raises.
    """
    global _warm
    if _warm:
        return
    _warm = True
    try:
        if not faulthandler.is_enabled():
            faulthandler.enable(2, False)
            faulthandler.disable()
        if DUMP_SIGNAL is not None and _getsignal(DUMP_SIGNAL) == _SIG_DFL:
            faulthandler.register(DUMP_SIGNAL, 2, False, False)
            faulthandler.unregister(DUMP_SIGNAL)
    except Exception:  # a missing signal, say: children then allocate for themselves
        return


_warm = False


#: (pid, crash file prefix) decided by ``prepare`` in the process that forks.
#: Also whether the state directory was set for this process tree (``forksafe run``
#: does): then crash files are looked for by name from outside.
_prepared: tuple[int, str | None, bool] | None = None
#: Whether the dump signal is free for us (the program has no handler for it).
_dump_free = False
_SIGTRAP: int | None = getattr(signal, "SIGTRAP", None)
_SIGTERM: int | None = getattr(signal, "SIGTERM", None)
# The C functions, without signal's enum conversion: fewer objects touched per fork.
_getsignal = _signal.getsignal
_SIG_DFL = _signal.SIG_DFL


def arm(parent_pid: int, hang_timeout: float | None, spare: CrashFile | None = None) -> None:
    """Prepare this freshly forked child so that its death or hang can be explained.

    Called by the guard in the child (unless ``memory_armer``'s calls do it).
    When the parent opened the crash file for it (``open_spare``; the guard
    passes it as ``spare``), only ``faulthandler`` is pointed at it; otherwise
    the child opens its own, on what the parent prepared (``prepare``). Every
    page the child writes is copied, and a file opened in Python is a few
    dozen of them: a tenth of a bare fork of a 100 MB process. Never raises: a
    child that cannot be armed runs exactly as it would without us.
    """
    crash = spare
    try:
        if crash is not None and crash[4] == parent_pid:
            fd = crash[0]
        else:
            prepared = _prepared
            if prepared is None or prepared[0] != parent_pid:
                prepare(hang_timeout)  # a fork the guard did not see coming: decide here
                prepared = _prepared
            if prepared is None or prepared[1] is None:
                return
            path = prepared[1] + str(os.getpid()) + ".crash"
            fd = _out_of_the_way(_create(path, _FLAGS))
            crash = (fd, None, None, path, parent_pid, prepared[1])
        inherited, _armed_box[0] = _armed_box[0], None
        faulthandler.enable(fd, True)
        if _SIGTRAP is not None:
            faulthandler.register(_SIGTRAP, fd, True, True)
        term = _default_term()
        if term is not None:
            faulthandler.register(term, fd, True, True)
        # A child of a child without a hang timeout drops the dump handler it
        # inherited, which would write to its parent's crash file.
        if _dump_free:
            if hang_timeout is not None:
                faulthandler.register(DUMP_SIGNAL, fd, True, False)  # type: ignore[arg-type]
            elif inherited is not None:
                faulthandler.unregister(DUMP_SIGNAL)  # type: ignore[arg-type]
        _armed_box[0] = crash
        if inherited is not None and inherited[0] != fd:
            _close_if_ours(inherited)
    except (OSError, ValueError, RuntimeError):
        pass


def memory_armer(crash: CrashFile) -> tuple[Callable[[], object], ...] | None:
    """Parent side: ``arm`` for the child about to be forked with memory file ``crash``,
    as calls the child can make without running Python (``forksafe._guard``
    runs them there: see its ``_child_calls``); None when ``arm`` must do it.

    That is: point ``faulthandler`` at the file, and mark it armed, as ``arm``
    does for such a file. Not for a named file, nor in a process that is
    itself an armed child: its child has an inherited file to close first.
    """
    if crash[3] or _armed_box[0] is not None:
        return None
    fd = crash[0]
    calls: list[Callable[[], object]] = [partial(faulthandler.enable, fd, True)]
    if _SIGTRAP is not None:
        calls.append(partial(faulthandler.register, _SIGTRAP, fd, True, True))
    term = _default_term()
    if term is not None:
        calls.append(partial(faulthandler.register, term, fd, True, True))
    calls.append(partial(_armed_box.__setitem__, 0, crash))
    return tuple(calls)


def _default_term() -> int | None:
    """SIGTERM, when it has its default action, so that a child ended by it may leave its
    stacks (``chain=True``: written, then the default action, the same death); None for
    a program that handles or ignores it, which keeps it as it is."""
    if _SIGTERM is not None and _getsignal(_SIGTERM) == _SIG_DFL:
        return _SIGTERM
    return None


def open_spare(hang_timeout: float | None, pid: int | None = None) -> CrashFile | None:
    """Parent side, right before a fork whose child's pid it will learn: its crash file.

    Opening the file in the parent spares the child the work (see ``arm``).
    A crash file needs a name (``<child pid>.crash``) only when someone other
    than the parent may look for it: a hang monitor (with a hang timeout) or
    ``forksafe run`` (which sets the state directory for the tree). Otherwise
    it is a memory file (``memfd``) that the parent reads when it reaps the
    child and, left empty, hands to the next child: creating, renaming and
    removing a file cost ~100 us around every fork here, 2% of the fork of a
    100 MB process. A named one is ``<pid>-<n>.spare`` until ``adopt_spare``
    names it for the child. None when crash files are off.
    """
    global _spare_count, _memory
    if pid is None:
        pid = os.getpid()
    prepared = _prepared
    if prepared is None or prepared[0] != pid or hang_timeout is not None:
        prepare(hang_timeout)
        prepared = _prepared
    if prepared is None:
        return None
    crash: CrashFile | None = None
    if hang_timeout is None and not prepared[2] and _memfd_create is not None:
        memory = _memory
        if memory is None or memory[0] != pid:  # a child starts its own
            if memory is not None:
                _close_inherited(memory)
            memory = _memory = (pid, [], {})
        if len(memory[2]) < MAX_HELD:
            try:
                crash = memory[1].pop()  # atomic: two forking threads never share one
            except IndexError:
                crash = _opened(lambda: _memfd_create("forksafe-crash", _MFD_CLOEXEC),
                                "", pid, "")
    if crash is None:
        prefix = prepared[1]
        if prefix is None:
            return None
        _spare_count += 1
        path = f"{prefix}{pid}-{_spare_count}.spare"
        crash = _opened(lambda: _create(path, _FLAGS), path, pid, prefix)
        if crash is None:
            return None
    return crash


def _close_inherited(memory: tuple[int, list[CrashFile], dict[int, CrashFile]]) -> None:
    """In a child that forks in turn: close its parent's memory files, all but its own."""
    armed_now = _armed_box[0]
    own = armed_now[0] if armed_now is not None else -1
    for crash in [*memory[1], *memory[2].values()]:
        if crash[0] != own:
            _close(crash[0])


def _opened(opener: Callable[[], int], path: str, pid: int, prefix: str) -> CrashFile | None:
    """A crash file from ``opener``, moved out of the program's way and known by inode."""
    try:
        fd = _out_of_the_way(opener())
    except OSError:
        return None
    try:
        info = os.fstat(fd)
    except OSError:
        os.close(fd)
        return None
    return (fd, info.st_dev, info.st_ino, path, pid, prefix)


def release_spare(crash: CrashFile) -> None:
    """Parent side, when the fork failed: nobody will write to ``crash``."""
    if not crash[3]:
        _recycle(crash)
        return
    try:
        os.close(crash[0])
        os.unlink(crash[3])
    except OSError:
        return


def adopt_spare(crash: CrashFile, child_pid: int) -> None:
    """Parent side, after the fork: ``crash`` is child ``child_pid``'s now.

    A named file gets the child's name, and the parent's descriptor closes; the
    parent keeps a memory file's descriptor, to read it when it reaps the
    child (``take_memory_crash``). Done when the guard records the fork.
    """
    if not crash[3]:
        memory = _memory
        if memory is not None and memory[0] == crash[4]:
            memory[2][child_pid] = crash
        return
    try:
        os.close(crash[0])
        os.rename(crash[3], crash[5] + str(child_pid) + ".crash")
    except OSError:
        return


def take_memory_crash(child_pid: int, limit: int) -> str | None:
    """What child ``child_pid`` left in its memory file (up to ``limit`` bytes), if it had one.

    None when it had none (its crash file has a name); "" when it left nothing.
    An empty file is kept for the next child; a written one is closed, never
    reused (a grandchild that inherited it could still write to it).
    """
    memory = _memory
    if memory is None or memory[0] != os.getpid():
        return None
    crash = memory[2].pop(child_pid, None)
    if crash is None:
        return None
    fd = crash[0]
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        if not size:
            _recycle(crash)
            return ""
        data = os.pread(fd, min(size, limit), 0)
    except OSError:
        data = b""
    _close(fd)
    return data.decode("utf-8", "replace").strip()


def _recycle(crash: CrashFile) -> None:
    memory = _memory
    if memory is not None and memory[0] == crash[4] and len(memory[1]) < MAX_FREE:
        memory[1].append(crash)
        return
    _close(crash[0])


def forget_gone_children() -> int:
    """Close the memory files of children gone unseen (reaped by code the guard does not
    wrap); how many. Called now and then (``forksafe._outcome.on_forked``).

    A child is closed for only when it was already gone the time before: one
    just reaped through the guard is being read by the thread that reaped it.
    """
    global _gone
    memory = _memory
    if memory is None or memory[0] != os.getpid():
        return 0
    gone = {pid for pid in list(memory[2]) if not os.path.exists(f"/proc/{pid}")}
    closed = 0
    for pid in gone & _gone:
        crash = memory[2].pop(pid, None)
        if crash is not None:
            _close(crash[0])
            closed += 1
    _gone = gone - _gone
    return closed


def close_memory_files() -> None:
    """Close every memory file this process holds (``uninstall``: no reaped child is read
    after it)."""
    global _memory
    memory = _memory
    if memory is None or memory[0] != os.getpid():
        return
    _memory = None
    for crash in [*memory[1], *memory[2].values()]:
        _close(crash[0])


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        return


_memfd_create: Callable[[str, int], int] | None = getattr(os, "memfd_create", None)
_MFD_CLOEXEC: int = getattr(os, "MFD_CLOEXEC", 0)
#: Children whose memory file the parent holds at once; beyond that, named files.
#: Every child inherits these descriptors (close-on-exec, above HIGH_FD) and
#: closes them only if it forks in turn, so both bounds are small.
MAX_HELD = 32
#: Empty memory files kept for the next children. The guard hands back the files of
#: exited children by the batch (``forksafe._forkpath.QUEUE_SIZE``: two entries per
#: child), so this holds a batch with room to spare.
MAX_FREE = 20
#: (owner pid, empty memory files, child pid -> its memory file). A child that forks
#: starts its own: the inherited ones are its parent's.
_memory: tuple[int, list[CrashFile], dict[int, CrashFile]] | None = None
#: Children found gone by the last ``forget_gone_children``.
_gone: set[int] = set()


#: The crash file's descriptor is moved to this number or above. faulthandler
#: writes to a descriptor *number*: if the program closes ours (daemons close "all
#: other" descriptors) and opens a file that gets the same number, a crash would
#: write its traceback into that file. New descriptors take the lowest free
#: number, so one up here is rarely reused.
HIGH_FD = 256


def _out_of_the_way(fd: int) -> int:
    """``fd`` moved to ``HIGH_FD`` or above (close-on-exec kept); as it is if that fails."""
    if _fcntl is None or fd >= HIGH_FD:
        return fd
    try:
        high: int = _fcntl.fcntl(fd, _fcntl.F_DUPFD_CLOEXEC, HIGH_FD)
    except (OSError, AttributeError, ValueError):  # e.g. RLIMIT_NOFILE below HIGH_FD
        return fd
    os.close(fd)
    return high


def _close_if_ours(armed: CrashFile) -> None:
    """Close the crash file descriptor inherited from the parent, if it still is that file.

    A child of a child would otherwise carry one more descriptor per generation.
    If the program closed ours and the number now names one of its files, the
    inode differs from the parent's crash file and the descriptor is left alone
    (as it is when that file is gone already and its inode was not recorded:
    then it cannot be told apart).
    """
    fd, device, inode, path = armed[:4]
    try:
        now = os.fstat(fd)
        if device is None:
            mine = os.stat(path)
            device, inode = mine.st_dev, mine.st_ino
        if (device, inode) == (now.st_dev, now.st_ino):
            os.close(fd)
    except OSError:
        return
