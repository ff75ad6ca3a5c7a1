"""Following a guarded child from its parent: told of each fork and reap, it records
what became of the child and warns when it crashed or hung.

The guard (``forksafe._record``) calls ``on_forked`` after a fork and ``on_reaped``
when one of its ``os.wait*`` wrappers reaps a guarded child (which covers
``multiprocessing``'s ``exitcode``/``join`` and ``ProcessPoolExecutor``'s workers,
both of which reap through ``os.waitpid``). Everything this module needs of the
guard comes through the ``GuardLink`` it is handed when loaded (``attach``).

``on_reaped`` reads what the child left (its crash file, a hang monitor's
marker), asks ``forksafe._diagnose`` for the outcome, attaches it to the fork's
event, hands a crash, hang, stall or failure to the ``forksafe`` logger
(``forksafe._logsink``), and, for a crash or a hang, raises a
``ForkSafetyWarning`` at the user's line that reaped the child. Deaths by
SIGKILL, SIGTERM and the like are recorded but not warned about: they are how
parents stop children.

With a hang timeout, children are handed to a hang monitor (``forksafe._hang``):
``forksafe run``'s, when the process runs under it, else a helper process
started on first use (``forksafe._helper``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from typing import TYPE_CHECKING, Any

from forksafe import _child, _config, _statedir
from forksafe._diagnose import outcome_for
from forksafe._errors import ForkSafetyWarning, report_failure, write_stderr
from forksafe._render import outcomes
from forksafe._render.text import printable
from forksafe._report import ForkEvent, Outcome

if TYPE_CHECKING:
    from forksafe._helper import Client
    from forksafe._seam import GuardLink

#: Every this many forks, leftovers of gone children are swept (and memory files
#: of children reaped unseen are closed).
SWEEP_EVERY = 256

_link: GuardLink | None = None
_forks = 0
_tidy_at_exit = False
#: The hang helper this process started, if any (a child inherits its parent's).
_client: Client | None = None
#: A plain exit's outcome, one per exit code: an object less per reaped child.
_EXITED: dict[int, Outcome] = {}


def attach(link: GuardLink) -> None:
    """The guard that loaded this module: everything asked of it goes through ``link``."""
    global _link
    _link = link


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
        _statedir.sweep()
        _child.forget_gone_children()
        tidy_at_exit()
    if hang_timeout is None or event.child_pid is None or supervised():
        return
    _helper_client(hang_timeout).watch(event)


def before_fork(timeout: float) -> None:
    """With a hang timeout, have the hang helper running before the fork.

    ``on_forked`` starts it after a fork, which is too late for one case: a
    ``subprocess`` ``preexec_fn`` child that hangs before ``exec``. Its parent is
    stuck in ``Popen`` until the child execs, so ``on_forked`` never runs; the
    child can only announce itself (``announce_pending``) to a helper that
    already runs. The guard calls this before each fork it sees when a hang
    timeout is set.
    """
    try:
        client = _client
        if client is not None and client.owner == os.getpid() and client.ready():
            return
        if supervised():
            return
        _helper_client(timeout).start()
    except Exception:  # a hook must never stop the fork
        return


def _helper_client(timeout: float) -> Client:
    """This process's hang helper client (a forked child gets its own, not its parent's)."""
    global _client
    from forksafe import _helper

    client = _client
    if client is None or client.owner != os.getpid() or client.timeout != timeout:
        report = _link.report_path() if _link is not None else None
        client = _client = _helper.Client(
            timeout, report or os.environ.get(_config.ENV_REPORT) or None)
    return client


def announce_pending(event: ForkEvent) -> None:
    """In a ``preexec_fn`` child: make this fork known from inside the child.

    ``subprocess`` returns the child's pid to its parent only once the child has
    called ``exec`` (the parent blocks reading the error pipe until then), so a
    child that hangs in its ``preexec_fn`` is never announced by the parent,
    which hangs with it. The child writes its own fork record (``"type":
    "fork-pending"``) to the inherited report file, one ``O_APPEND`` write, and
    to its parent's hang helper if one runs. Nothing here takes a lock.
    """
    record = {"type": "fork-pending", **event.to_dict(), "command": list(sys.argv)}
    if _link is not None:
        _link.emit(record)
    client = _client
    if client is not None and client.owner == event.parent_pid:
        client.send_now(b"\n" + json.dumps(record, default=str).encode() + b"\n")


def tidy_at_exit() -> None:
    """Sweep the state directory when the process exits (once registered, idempotent):
    children that exec'd, or that subprocess reaped, are gone by then.

    The guard asks for it before its first fork, not at the first fork it
    records: it may record them in one go only at exit (``_sweep_at_exit``
    records its queue first), and an exit handler registered while the
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
        if _link is not None:
            _link.flush()
        _statedir.sweep()


def on_reaped(pid: int, status: int, *, event: ForkEvent | None = None,
              link: GuardLink | None = None, directory: str | None = None) -> None:
    """Called when the guarded child ``pid`` was reaped with raw wait ``status``.

    ``event`` is the fork's event, when the caller has it at hand; ``link`` and
    ``directory`` stand in for the guard and the state directory (tests).

    This runs for every child of a program that forks per request, so the
    common case (the child exited, no hang monitor) takes few steps: each
    function called and object made is a page written in the parent
    (copy-on-write, see ``forksafe._forkpath``).
    """
    guard = _link if link is None else link
    if guard is None:
        return
    if event is None:
        event = guard.event_for_child(pid)
        if event is None:
            return
    held = _child.take_memory_crash(pid, _statedir.MAX_CRASH_BYTES) if directory is None \
        else None
    # A hang marker is written only by a hang monitor: `forksafe run`'s, or the
    # helper a hang timeout starts. Without either there is nothing to look for.
    watched = _hangs_watched(guard)
    prefix = _state_prefix(directory) if held is None or watched else None
    # No state directory at all (none of ours could be made): nothing was left by name.
    traceback = held or None if held is not None else \
        _statedir.take_crash_file(prefix + str(pid) + ".crash") if prefix else None
    hung = _statedir.take_hung_marker(pid, directory=prefix) if watched and prefix else None
    stall = _statedir.take_stall_marker(pid, directory=prefix) if watched and prefix else None
    noteworthy = False
    if hung is None and traceback is None and stall is None and os.WIFEXITED(status):
        code = os.WEXITSTATUS(status)
        outcome = _EXITED.get(code) or _EXITED.setdefault(code, Outcome("exited", code))
    else:
        outcome = outcome_for(event, status, traceback, hung, stall)
        noteworthy = True
    guard.attach_outcome(pid, outcome)
    warns = outcomes.blames_fork(outcome) and _warns(guard)
    if noteworthy:  # never for a plain exit: a record nobody wants costs every child
        _tell_log(event, outcome, stalled=stall is not None, warned=warns)
    if outcome.status == "hung":
        # A pool waiting for the task this child held would wait forever.
        from forksafe._unstick import worker_hung

        worker_hung(pid, outcome.diagnosis or f"child {pid} hung", outcome.traceback)
    if traceback is not None and _program_faulthandler():
        # Arming pointed the child's faulthandler at its crash file; the program had
        # it on (pytest does, so does PYTHONFAULTHANDLER), so it expects the
        # traceback where the child would have written it: the shared stderr.
        write_stderr(outcomes.echo(pid, traceback))
    if warns:
        warn(outcome.diagnosis or f"child {pid} {outcome.status}", event)


def _tell_log(event: ForkEvent, outcome: Outcome, *, stalled: bool, warned: bool) -> None:
    """A crash, hang, stall or failure, for the ``forksafe`` logger (``forksafe._logsink``)."""
    if "logging" not in sys.modules:  # no handler anywhere: nobody to tell
        return
    try:
        from forksafe import _logsink

        _logsink.outcome(event, outcome, stalled=stalled, warned=warned)
    except Exception as exc:
        report_failure("forksafe._logsink", exc)


def _state_prefix(directory: str | None) -> str | None:
    """``directory``, else this process's state directory (as ``forksafe._statedir``
    checked it), with a trailing separator; None when there is none."""
    if directory is None:
        return _child.crash_prefix() or _statedir.current()
    return os.path.join(directory, "")


def _hangs_watched(guard: GuardLink) -> bool:
    config = guard.config()
    return (config is not None and config.hang_timeout is not None) or supervised()


def _warns(guard: GuardLink) -> bool:
    """False under the guard's "log" policy, which records and says nothing."""
    config = guard.config()
    return config is None or config.policy != "log"


def _program_faulthandler() -> bool:
    try:
        return _child.program_faulthandler()
    except Exception:
        return False


def warn(message: str, event: ForkEvent | None = None) -> None:
    """A ForkSafetyWarning attributed to the user's line, not to forksafe or the stdlib.

    Children are often reaped on a thread with no user code on its stack at all
    (``ProcessPoolExecutor``'s manager thread). The warning then points at the
    line that forked the child - for a pool, the user's ``submit`` or ``map``.
    """
    level, found = user_stacklevel(sys._getframe(1))
    message = printable(message)  # exception texts, paths: shown, never obeyed
    try:
        if not found and event is not None and event.site is not None:
            site = event.site
            module = os.path.splitext(os.path.basename(site.file))[0] or "forksafe"
            warnings.warn_explicit(ForkSafetyWarning(message), ForkSafetyWarning,
                                   printable(site.file), site.line, module=module)
            return
        warnings.warn(ForkSafetyWarning(message), stacklevel=level + 1)
    except ForkSafetyWarning:
        # The program turned ForkSafetyWarning into an error. Raised here, inside
        # os.waitpid after the child was reaped, it would take the wait status
        # from the caller (multiprocessing would never learn the exit code, and
        # would wait for it again): so it is printed instead.
        write_stderr(outcomes.as_error(message))


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


_supervisor: tuple[int, int | None] | None = None


def supervised() -> bool:
    """Whether ``forksafe run`` watches this process tree (and is still there).

    The variable is read once per process: ``forksafe run`` sets it for the
    whole tree before it starts, and reading ``os.environ`` is a dozen Python
    calls on a path that runs for every reaped child.
    """
    global _supervisor
    if _supervisor is None or _supervisor[0] != os.getpid():
        _supervisor = (os.getpid(), _config.supervisor())
    value = _supervisor[1]
    if value is None:
        return False
    try:
        os.kill(value, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True
