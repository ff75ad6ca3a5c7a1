"""Parent side of following a forked child: what became of it, and why.

The guard calls ``on_forked`` right after each guarded fork and ``on_reaped``
when one of its wrappers of ``os.waitpid``/``os.wait``/``os.wait3``/``os.wait4``
reaps a guarded child (which covers ``multiprocessing``'s ``exitcode``/``join``
and ``ProcessPoolExecutor``'s workers, both of which reap through
``os.waitpid``). ``on_reaped`` turns the raw wait status into an ``Outcome``:

* exited, with its code;
* signaled, with the signal's name, the child's Python traceback from its crash
  file (written by ``faulthandler`` in the child, see ``_child.py``) and a
  diagnosis that links the death to the hazards recorded at that fork - or says
  plainly that the fork was clean, so fork is probably not the cause;
* hung, when a hang monitor reported the child (and then ended it).

Deaths by a crash signal (``CRASH_SIGNALS``) also raise a ``ForkSafetyWarning``
pointing at the user's line that reaped the child. Deaths by SIGKILL, SIGTERM,
SIGINT and the like are recorded but not warned about: they are how parents
stop children (``Pool.terminate``), and a warning per worker would be noise.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import sysconfig
import time
import warnings
from typing import Any, Callable, Iterable

from forksafe import _child
from forksafe._child import crash_path, hung_path, state_dir
from forksafe._errors import ForkSafetyWarning
from forksafe._report import ForkEvent, Hazard, Outcome, Severity, Site

#: Signals that mean the child crashed, as opposed to being stopped by someone.
CRASH_SIGNALS = frozenset({"SIGSEGV", "SIGBUS", "SIGILL", "SIGFPE", "SIGABRT", "SIGTRAP",
                           "SIGSYS"})

#: The environment variable ``forksafe run`` sets to its pid: it watches for hangs
#: itself, for the whole tree, so processes under it start no hang monitor of their own.
SUPERVISOR_VARIABLE = "FORKSAFE_SUPERVISOR"

KILLED = "child {pid} ({forked}) was killed by {signal}{where}"
AT_FORK = "at fork time: {hazards}"
AT_FORK_MAYBE = "at fork time (a possible cause, not a typical one for a crash): {hazards}"
CLEAN_FORK = (
    "the fork was clean (forksafe found no hazard at warning level or above), so the "
    "crash is probably not caused by fork; see the child's traceback"
)
FIX = "fix: {remedy}"
CALLED_FROM = ", called from {frame}"
NATIVE_THREAD = " in a thread running no Python code (the Python thread was at {frame})"
NO_TRACEBACK = (
    " before it wrote any traceback (it probably died inside fork itself, in a native "
    "library's at-fork handler, before Python code ran; or the program pointed "
    "faulthandler elsewhere)"
)
HUNG_THEN = "{diagnosis} (then ended by {signal})"
ECHO = "forksafe: child {pid}'s traceback (faulthandler is on in this program):\n{traceback}"
AS_ERROR = (
    "ForkSafetyWarning (an error in this program, shown rather than raised: the child is "
    "already reaped, and raising would lose its exit status): {message}"
)

#: The most of a crash file that is read: a traceback of every thread, bounded.
MAX_CRASH_BYTES = 64 * 1024

_STDLIB = tuple(sorted({os.path.join(p, "") for p in (
    sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"])}, key=len,
    reverse=True))

_FILE_LINE = re.compile(r'^\s+File "(?P<file>.*)", line (?P<line>\d+) in (?P<function>.*)$')


def on_forked(event: ForkEvent, hang_timeout: float | None) -> None:
    """Called in the parent after a guarded fork: after each one with a hang timeout,
    else after the first and every ``SWEEP_EVERY``-th (the guard counts: a call
    less on every other fork).

    Tidies the state directory now and then; with a hang timeout, hands the
    child to a hang monitor: ``forksafe run``'s own when the process runs under
    it, else a helper process started on first use (a process, not a thread,
    so that forksafe adds no thread - itself a fork hazard - to the program it
    watches).
    """
    global _forks
    _forks += 1
    if hang_timeout is None or _forks % SWEEP_EVERY == 1:
        sweep()
        _child.forget_gone_children()
        tidy_at_exit()
    if hang_timeout is None or event.child_pid is None or _supervised():
        return
    from forksafe import _hang

    _hang.client(hang_timeout).watch(event)


def before_fork(timeout: float) -> None:
    """With a hang timeout, have the hang helper running before the fork.

    ``on_forked`` starts it after a fork, which is too late for one case: a
    ``subprocess`` ``preexec_fn`` child that hangs before ``exec``. Its parent is
    stuck in ``Popen`` until the child execs, so ``on_forked`` never runs; the
    child can only announce itself (``_child._announce_from_preexec``) to a
    helper that already runs. The guard calls this before each fork it sees
    when a hang timeout is set.
    """
    try:
        hang = sys.modules.get("forksafe._hang")
        running = getattr(hang, "_client", None)
        if running is not None and running.owner == os.getpid() and (
                running._sock is not None or running.broken):
            return
        if _supervised():
            return
        from forksafe import _hang

        _hang.client(timeout).start()
    except Exception:  # a hook must never stop the fork
        return


#: Every this many forks, crash files of children that are gone and left nothing are removed.
SWEEP_EVERY = 256
_forks = 0
_tidy_at_exit = False


def sweep(directory: str | None = None, *, _now: float | None = None) -> int:
    """Remove leftovers of processes that no longer exist; how many were removed.

    A child reaped through the guard's wait wrappers has its file removed at
    once; this catches the others (children that exec'd, or that were reaped by
    code the guard does not wrap). An empty crash file goes at once. A crash
    file with a traceback, or a hang marker, is evidence that its parent may
    still be about to read: it goes once it is ``STALE_AFTER`` seconds old, so
    that the state directory, in RAM on ``/dev/shm``, never grows without bound.
    (Under ``forksafe run`` the state directory is private and removed whole.)
    """
    removed = 0
    now = time.time() if _now is None else _now
    try:
        entries = list(os.scandir(directory or state_dir()))
    except OSError:
        return 0
    for entry in entries:
        name, _, ext = entry.name.partition(".")
        if ext == "spare":  # <parent pid>-<n>.spare: a crash file not yet named for its child
            name = name.partition("-")[0]
        if ext not in _LEFTOVERS or not name.isdigit() or not _finished(name):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if (ext in ("crash", "spare") and info.st_size == 0) or (
                    now - info.st_mtime > STALE_AFTER):
                os.unlink(entry.path)
                removed += 1
        except OSError:
            continue
    return removed


def _finished(pid: str) -> bool:
    """True when process ``pid`` is gone or a zombie: it writes nothing any more."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[:1] in ([b"Z"], [b"X"])
    except OSError:
        return True


#: What a process leaves in the state directory: crash file, hang marker (and its temp file).
_LEFTOVERS = ("crash", "spare", "hung", "hung.tmp")
#: Seconds after which a dead process's traceback or hang marker is no longer awaited.
STALE_AFTER = 600.0


def tidy_at_exit() -> None:
    """Sweep the state directory when the process exits (once registered, idempotent):
    children that exec'd, or that subprocess reaped, are gone by then.

    The guard asks for it before its first fork, not at the first fork it
    records: it may record them in one go only at exit (``_sweep_at_exit``
    flushes its queue first), and an exit handler registered while the
    process exits never runs.
    """
    global _tidy_at_exit
    if not _tidy_at_exit:
        import atexit

        atexit.register(_sweep_at_exit)
        _tidy_at_exit = True


def _sweep_at_exit() -> None:
    with contextlib.suppress(Exception):
        # Queued forks first: their children's crash files get their names, so that
        # those of children gone unreaped (exec'd, say) are seen as leftovers.
        guard = sys.modules.get("forksafe._guard")
        if guard is not None:
            guard._flush_pending()
        sweep()


def on_reaped(
    pid: int,
    status: int,
    *,
    event: ForkEvent | None = None,
    _event_for_child: Callable[[int], ForkEvent | None] | None = None,
    _set_outcome: Callable[[int, Outcome], None] | None = None,
    _directory: str | None = None,
) -> None:
    """Called when the guarded child ``pid`` was reaped with raw wait ``status``.

    ``event`` is the fork's event, when the caller has it at hand.

    This runs for every child of a program that forks per request, so the
    common case (the child exited, no hang monitor) takes few steps: each
    function called and object made is a page written in the parent
    (copy-on-write, see ``forksafe._guard``).
    """
    if event is None:
        if _event_for_child is None:
            _event_for_child = sys.modules["forksafe._guard"].event_for_child
        event = _event_for_child(pid)
        if event is None:
            return
    if _set_outcome is None:
        _set_outcome = sys.modules["forksafe._guard"].set_outcome
    held = _child.take_memory_crash(pid, MAX_CRASH_BYTES) if _directory is None else None
    # A hang marker is written only by a hang monitor: `forksafe run`'s, or the
    # helper a hang timeout starts. Without either there is nothing to look for.
    watched = _hangs_watched()
    prefix = ""
    if held is None or watched:
        prefix = _state_prefix(_directory)
    traceback = _take_crash_text(prefix + str(pid) + ".crash") if held is None else held or None
    hung = take_hung_marker(pid, directory=prefix) if watched else None
    if hung is None and traceback is None and os.WIFEXITED(status):
        code = os.WEXITSTATUS(status)
        outcome = _EXITED.get(code) or _EXITED.setdefault(code, Outcome("exited", code))
    else:
        outcome = outcome_for(event, status, traceback, hung)
    _set_outcome(pid, outcome)
    if traceback is not None and _program_faulthandler():
        # Arming pointed the child's faulthandler at its crash file; the program had
        # it on (pytest does, so does PYTHONFAULTHANDLER), so it expects the
        # traceback where the child would have written it: the shared stderr.
        _stderr(ECHO.format(pid=pid, traceback=traceback))
    if (outcome.status == "hung" or outcome.signal in CRASH_SIGNALS) and _warns():
        warn(outcome.diagnosis or f"child {pid} {outcome.status}", event)


def _state_prefix(directory: str | None) -> str:
    """``directory``, else this process's state directory, with a trailing separator."""
    if directory is None:
        prepared = _child._prepared
        if prepared is not None and prepared[0] == os.getpid() and prepared[1]:
            return prepared[1]
        directory = state_dir()
    return os.path.join(directory, "")


def _hangs_watched() -> bool:
    guard = sys.modules.get("forksafe._guard")
    config = guard._config if guard is not None else None
    return getattr(config, "hang_timeout", None) is not None or _supervised()


def outcome_for(event: ForkEvent, status: int, traceback: str | None,
                hung: Outcome | None = None) -> Outcome:
    """The outcome of ``event``'s child from its raw wait status and what it left."""
    if os.WIFSIGNALED(status):
        name = signal_name(os.WTERMSIG(status))
        if hung is not None:
            text = HUNG_THEN.format(diagnosis=hung.diagnosis or "hung", signal=name)
            return Outcome("hung", None, name, hung.traceback or traceback, text)
        # Only a crash is diagnosed. SIGTERM, SIGKILL, SIGINT and the like are how
        # parents stop children (Pool.terminate, a timeout): blaming the fork for
        # them, or calling them a crash, would be a false diagnosis.
        diagnosis = diagnose_death(event, name, traceback) if name in CRASH_SIGNALS else None
        return Outcome("signaled", None, name, traceback, diagnosis)
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    if hung is not None:
        return Outcome("hung", code, None, hung.traceback or traceback, hung.diagnosis)
    return Outcome("exited", code, None, traceback, None)


def diagnose_death(event: ForkEvent, signame: str, traceback: str | None) -> str:
    """One paragraph: who died of what, where, and which fork-time hazard explains it."""
    sections = _sections(traceback or "")
    current = [frames for is_current, frames in sections if is_current and frames]
    where = ""
    if traceback is None:
        where = NO_TRACEBACK
    elif current:
        where = f" in {frame_text(_outside_forksafe(current[0]))}{_called_from(current[0])}"
    elif sections and sections[0][1]:
        # faulthandler marks no thread as current: the signal hit a thread that runs
        # no Python code (a native runtime's own thread).
        where = NATIVE_THREAD.format(frame=frame_text(_outside_forksafe(sections[0][1])))
    head = KILLED.format(pid=event.child_pid, forked=describe_fork(event), signal=signame,
                         where=where)
    blamed, typical = blame(event.report.hazards, traceback or "")
    if not blamed:
        return f"{head}; {CLEAN_FORK}"
    parts = [head, (AT_FORK if typical else AT_FORK_MAYBE).format(
        hazards="; ".join(hazard_text(h) for h in blamed[:3]))]
    parts.append(FIX.format(remedy=blamed[0].remedy))
    return "; ".join(parts[:2]) + ". " + parts[2]


def blame(hazards: Iterable[Hazard], traceback: str) -> tuple[list[Hazard], bool]:
    """The fork-time hazards that best explain a crash, best first, and whether typical.

    Error-level native runtimes are what crash forked children (gRPC, libdispatch,
    CUDA); one whose name or library appears in the child's traceback ranks
    first. Other live threads and open connections may deadlock or corrupt but
    rarely kill by a signal, so they are named only when nothing better exists,
    and marked as a possible, not a typical, cause.
    """
    text = traceback.lower()
    scored: list[tuple[int, int, Hazard]] = []
    for i, hazard in enumerate(hazards):
        if hazard.severity < Severity.WARNING:
            continue
        native = hazard.kind in ("native-runtime", "native-thread")
        score = (3 if hazard.severity >= Severity.ERROR else 2) if native else 1
        if native and _mentioned(hazard, text):
            score += 2
        scored.append((-score, i, hazard))
    scored.sort(key=lambda item: (item[0], item[1]))
    if not scored:
        return [], False
    best = -scored[0][0]
    return [h for s, _, h in scored if -s == best], best >= 2


def _mentioned(hazard: Hazard, text: str) -> bool:
    ev = hazard.evidence
    names = []
    runtime = ev.get("runtime")
    if isinstance(runtime, str):
        names.append(runtime.split("-")[-1] if "-" in runtime else runtime)
    for key in ("libraries", "stack_libraries"):
        value = ev.get(key)
        if isinstance(value, list):
            names.extend(_stem(str(p)) for p in value)
    owner = ev.get("owner")
    if isinstance(owner, str):
        names.append(_stem(owner))
    return any(len(n) >= 3 and n.lower() in text for n in names)


def _stem(path: str) -> str:
    base = os.path.basename(path)
    base = base[3:] if base.startswith("lib") else base
    return re.split(r"[.\-]", base, maxsplit=1)[0]


def hazard_text(hazard: Hazard) -> str:
    """A hazard's summary plus the library and thread names that prove it."""
    ev = hazard.evidence
    details = []
    libraries = ev.get("libraries")
    if isinstance(libraries, list) and libraries:
        details.append(f"library {short_file(str(libraries[0]))}")
    owner = ev.get("owner")
    if isinstance(owner, str) and owner:
        details.append(f"library {short_file(owner)}")
    threads = [t for t in ev.get("threads", ()) if isinstance(t, dict)]
    if threads:
        # A thread that never named itself is shown by its tid: still a thread, with an owner.
        shown = sorted({repr(str(t.get("name"))) if t.get("named", True) else
                        f"unnamed tid {t.get('tid')}" for t in threads})
        details.append("its thread" + ("s " if len(shown) > 1 else " ") + ", ".join(shown[:6]))
    if hazard.kind == "native-thread" and isinstance(ev.get("name"), str):
        details.append(f"thread {ev['name']!r}")
    return hazard.summary + (f" ({'; '.join(details)})" if details else "")


def describe_fork(event: ForkEvent) -> str:
    if event.site is None:
        return f"forked via {event.mechanism}"
    return f"forked at {site_text(event.site)} via {event.mechanism}"


def site_text(site: Site) -> str:
    return f"{short_file(site.file)}:{site.line} in {site.function}"


def frame_text(site: Site) -> str:
    return f"{short_file(site.file)}:{site.line} ({site.function})"


def short_file(path: str) -> str:
    """A library file from its package directory on (``grpc/_channel.py``), else relative."""
    marker = "-packages" + os.sep
    at = path.rfind(marker)
    if at != -1:
        return path[at + len(marker):]
    for prefix in _STDLIB:
        if path.startswith(prefix):
            return path[len(prefix):]
    from forksafe._frames import short_path

    return short_path(path)


def _called_from(frames: list[Site]) -> str:
    """", called from app.py:12 (main)" when the crash is inside the standard library."""
    from forksafe._frames import is_library_file

    if not is_library_file(_outside_forksafe(frames).file):
        return ""
    user = next((f for f in frames if not is_library_file(f.file)), None)
    return CALLED_FROM.format(frame=frame_text(user)) if user is not None else ""


def _outside_forksafe(frames: list[Site]) -> Site:
    """The innermost frame that is not forksafe's own (the guard's fork wrapper)."""
    own = os.sep + "forksafe" + os.sep
    return next((f for f in frames if own not in f.file), frames[0])


def parse_traceback(text: str) -> list[Site]:
    """The frames of the crashing thread in faulthandler output, innermost first.

    faulthandler writes one section per thread; the thread that received the
    signal is marked "Current thread" (or the only section is "Stack"). Without
    such a mark the first section is taken.
    """
    sections = _sections(text)
    for current, frames in sections:
        if current:
            return frames
    return sections[0][1] if sections else []


def parse_sections(text: str) -> list[list[Site]]:
    """Every thread's frames in faulthandler output, innermost first, current thread first."""
    sections = _sections(text)
    return [frames for current, frames in sections if current] + [
        frames for current, frames in sections if not current]


def _sections(text: str) -> list[tuple[bool, list[Site]]]:
    sections: list[tuple[bool, list[Site]]] = []
    for line in text.splitlines():
        if "(most recent call first)" in line:
            sections.append((line.startswith(("Current thread", "Stack")), []))
            continue
        match = _FILE_LINE.match(line)
        if match and sections:
            sections[-1][1].append(Site(match["file"], int(match["line"]), match["function"]))
    return sections


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def take_crash_text(pid: int, *, directory: str | None = None) -> str | None:
    """The child's crash file contents (bounded), removing the file; None if empty.

    Read through the descriptor, not a file object: this runs for every reaped
    child, and the objects of ``open()`` are pages written in the parent while
    it still shares them with its children (copy-on-write).
    """
    return _take_crash_text(crash_path(pid, directory=directory))


def _take_crash_text(path: str) -> str | None:
    try:
        fd = os.open(path, _READ_FLAGS)
    except OSError:
        return None
    try:
        data = os.read(fd, MAX_CRASH_BYTES)
    except OSError:
        data = b""
    finally:
        os.close(fd)
    try:  # noqa: SIM105 - contextlib.suppress is three Python calls on every reaped child
        os.unlink(path)
    except OSError:
        pass
    if not data:
        return None
    text = data.decode("utf-8", "replace").strip()
    return text or None


_READ_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)


def take_hung_marker(pid: int, *, directory: str | None = None) -> Outcome | None:
    """The outcome a hang monitor recorded for ``pid``, removing the marker."""
    path = hung_path(pid, directory=directory)
    try:
        with open(path, encoding="utf-8") as f:
            data: Any = json.load(f)
    except (OSError, ValueError):
        return None
    with contextlib.suppress(OSError):
        os.unlink(path)
    return Outcome.from_dict(data) if isinstance(data, dict) else None


def _program_faulthandler() -> bool:
    try:
        return _child.program_faulthandler()
    except Exception:
        return False


def _stderr(text: str) -> None:
    try:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    except Exception:  # no usable stderr: nothing else to tell it to
        return


def warn(message: str, event: ForkEvent | None = None) -> None:
    """A ForkSafetyWarning attributed to the user's line, not to forksafe or the stdlib.

    Children are often reaped on a thread with no user code on its stack at all
    (``ProcessPoolExecutor``'s manager thread). The warning then points at the
    line that forked the child - for a pool, the user's ``submit`` or ``map``.
    """
    level, found = user_stacklevel(sys._getframe(1))
    try:
        if not found and event is not None and event.site is not None:
            site = event.site
            module = os.path.splitext(os.path.basename(site.file))[0] or "forksafe"
            warnings.warn_explicit(ForkSafetyWarning(message), ForkSafetyWarning, site.file,
                                   site.line, module=module)
            return
        warnings.warn(ForkSafetyWarning(message), stacklevel=level + 1)
    except ForkSafetyWarning:
        # The program turned ForkSafetyWarning into an error. Raised here, inside
        # os.waitpid after the child was reaped, it would take the wait status
        # from the caller (multiprocessing would never learn the exit code, and
        # would wait for it again): so it is printed instead.
        _stderr(AS_ERROR.format(message=message))


_INTERNAL = (
    os.sep + "forksafe" + os.sep, os.sep + "multiprocessing" + os.sep,
    os.sep + "concurrent" + os.sep, os.sep + "subprocess.py", os.sep + "threading.py",
)


def user_stacklevel(frame: Any) -> tuple[int, bool]:
    """How many frames up from ``frame`` (1 = ``frame`` itself) the first one outside
    forksafe and the stdlib's process machinery is, and whether there is one at all."""
    level = 1
    while frame is not None and (
        frame.f_code.co_filename.startswith("<frozen") or
        any(part in frame.f_code.co_filename for part in _INTERNAL)
    ):
        if frame.f_back is None:
            return level, False
        frame = frame.f_back
        level += 1
    return level, frame is not None


def _warns() -> bool:
    """False under the guard's "log" policy, which records and says nothing."""
    guard = sys.modules.get("forksafe._guard")
    config = getattr(guard, "_config", None)
    return config is None or getattr(config, "policy", "warn") != "log"


_supervisor: tuple[int, str] | None = None
#: A plain exit's outcome, one per exit code: an object less per reaped child.
_EXITED: dict[int, Outcome] = {}


def _supervised() -> bool:
    """Whether ``forksafe run`` watches this process tree (and is still there).

    The variable is read once per process: ``forksafe run`` sets it for the
    whole tree before it starts, and reading ``os.environ`` is a dozen Python
    calls on a path that runs for every reaped child.
    """
    global _supervisor
    if _supervisor is None or _supervisor[0] != os.getpid():
        _supervisor = (os.getpid(), os.environ.get(SUPERVISOR_VARIABLE, ""))
    value = _supervisor[1]
    if not value.isdigit():
        return False
    try:
        os.kill(int(value), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True
