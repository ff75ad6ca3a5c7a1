"""What became of a child, in words: a death, a hang, and how each links to its fork.

The diagnosis modules (``forksafe._diagnose``, ``forksafe._hang``) decide *what*
explains an outcome; the sentences are made here, from what they found.
"""

from __future__ import annotations

import os
from typing import Sequence

from forksafe._render.hazards import hazard_text
from forksafe._render.shapes import HazardLike, OutcomeLike, SiteLike
from forksafe._render.sites import evidence_where, frame_text, path

# -- deaths --------------------------------------------------------------------------

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


def crash_place(frame: SiteLike, caller: SiteLike | None = None) -> str:
    """`` in grpc/_channel.py:1152 (_blocking), called from app.py:12 (main)``."""
    called = CALLED_FROM.format(frame=frame_text(caller)) if caller is not None else ""
    return f" in {frame_text(frame)}{called}"


def native_place(python_frame: SiteLike) -> str:
    """Where a signal hit a thread that runs no Python code."""
    return NATIVE_THREAD.format(frame=frame_text(python_frame))


def death(pid: int | None, forked: str, signal: str, place: str, *,
          blamed: Sequence[HazardLike], typical: bool) -> str:
    """One paragraph: who died of what, where, and which fork-time hazard explains it."""
    head = KILLED.format(pid=pid, forked=forked, signal=signal, where=place)
    if not blamed:
        return f"{head}; {CLEAN_FORK}"
    hazards = "; ".join(hazard_text(h) for h in blamed[:3])
    cause = (AT_FORK if typical else AT_FORK_MAYBE).format(hazards=hazards)
    return f"{head}; {cause}. " + FIX.format(remedy=blamed[0].remedy)


EXITED = "child {pid} ({forked}) exited {code} with {exception}{where}"
#: Marks a failed exit's diagnosis that links it to the fork (``blames_fork``).
INVOLVED_MARK = "it involves what was wrong at fork time"
INVOLVED = INVOLVED_MARK + ": {hazards}"
NOT_INVOLVED = "nothing at fork time is involved in it, so fork is probably not the cause"
CLEAN_EXIT = "the fork was clean, so fork is probably not the cause"


def failed_exit(pid: int | None, forked: str, code: int, exception: str, place: str, *,
                blamed: Sequence[HazardLike], clean: bool) -> str:
    """A child that failed with an uncaught exception, and what at fork time it involves."""
    head = EXITED.format(pid=pid, forked=forked, code=code, exception=exception, where=place)
    if not blamed:
        return f"{head}; {CLEAN_EXIT if clean else NOT_INVOLVED}"
    hazards = "; ".join(hazard_text(h) for h in blamed[:3])
    return f"{head}; {INVOLVED.format(hazards=hazards)}. " + FIX.format(remedy=blamed[0].remedy)


def blames_fork(outcome: OutcomeLike) -> bool:
    """Whether an outcome is one the fork explains, and so worth a warning: a hang, a
    crash, a failure or a self-inflicted end linked to what was wrong at fork time."""
    diagnosis = outcome.diagnosis or ""
    return outcome.status == "hung" or outcome.crashed or (
        outcome.status == "exited" and INVOLVED_MARK in diagnosis) or (
        outcome.status == "signaled" and ENDED_ITSELF_MARK in diagnosis)


#: Marks the diagnosis of a child that ended itself (``blames_fork``).
ENDED_ITSELF_MARK = "runtimes that find themselves in a forked child end it so"
ENDED_ITSELF = (
    "child {pid} ({forked}) was ended by {signal}{where}, inside code that was active at "
    "fork time (" + ENDED_ITSELF_MARK + "): {hazards}"
)


def ended_itself(pid: int | None, forked: str, signal: str, place: str,
                 involved: Sequence[HazardLike]) -> str:
    """A child ended by SIGTERM inside the code of a runtime active at fork time."""
    hazards = "; ".join(hazard_text(h) for h in involved[:3])
    head = ENDED_ITSELF.format(pid=pid, forked=forked, signal=signal, where=place,
                               hazards=hazards)
    return f"{head}. " + FIX.format(remedy=involved[0].remedy)


def hung_then(diagnosis: str | None, signal: str) -> str:
    """A hang, then the signal that ended the child."""
    return HUNG_THEN.format(diagnosis=diagnosis or "hung", signal=signal)


def echo(pid: int, traceback: str) -> str:
    """A crashed child's traceback, for a program that has faulthandler on itself."""
    return ECHO.format(pid=pid, traceback=traceback)


def as_error(message: str) -> str:
    """A warning the program made an error, printed because it cannot be raised."""
    return AS_ERROR.format(message=message)


# -- hangs ---------------------------------------------------------------------------

HUNG = "child {pid} ({forked}) made no progress for {seconds:g} s"
LOCK_LINK = (
    "it is blocked taking `{lock}` at {where}; at fork time thread {holder!r}{started} held "
    "`{lock}` (taken at {taken}), and that thread does not exist in the child, so the lock "
    "is never released"
)
RUNTIME_LINK = (
    "{who} is blocked ({call}) inside {library}: {runtime} was active at fork time "
    "({signals}), and its threads do not exist in the child"
)
THREAD_LINK = (
    "{who} is blocked ({call}) inside {library}, whose own {threads} alive at fork time and "
    "{exist} in the child: a lock {they} held stays held, and work {they} would have done "
    "is never done"
)
ENDED = "forksafe: {diagnosis} [ended with SIGKILL]"
HUNG_LIVE = (
    "forksafe: child {pid} made no progress for {seconds:g} s in a wait its fork explains; "
    "ended it with SIGKILL (diagnosis in the summary at the end)"
)


def lock_link(lock: str, frame: SiteLike, holder: str, started: SiteLike | None,
              taken: str) -> str:
    """A child blocked on a lock that a thread held at fork time."""
    since = f" (started at {path(started.file)}:{started.line})" if started else ""
    return LOCK_LINK.format(lock=lock, where=frame_text(frame), holder=holder, started=since,
                            taken=evidence_where(taken))


def runtime_link(who: str, call: str, library: str, runtime: str, signals: str) -> str:
    """A child blocked inside a runtime that was active at fork time."""
    return RUNTIME_LINK.format(who=who, call=call, library=os.path.basename(library),
                               runtime=runtime, signals=signals)


def thread_link(who: str, call: str, library: str, holders: Sequence[str]) -> str:
    """A child blocked inside a library whose own threads were alive at fork time."""
    names = ", ".join(repr(h) for h in holders)
    one = len(holders) == 1
    return THREAD_LINK.format(who=who, call=call, library=os.path.basename(library),
                              threads=f"thread {names} was" if one else f"threads {names} were",
                              exist="does not exist" if one else "do not exist",
                              they="it" if one else "they")


RUNTIME_CODE_LINK = (
    "{who} waits in {where} ({package}), the Python side of {runtime}, which was active at "
    "fork time ({signals}) and whose threads do not exist in the child"
)
THREAD_CODE_LINK = (
    "{who} waits in {where} ({package}), the code of thread {holder!r}{started}, which ran "
    "at fork time and does not exist in the child: what it would have done is never done"
)
STALLED = (
    "stalled: no progress for at least {seconds:g} s{where}; no fork-time hazard explains "
    "it (so forksafe left it running)"
)


def runtime_code_link(who: str, frame: SiteLike, package: str, runtime: str,
                      signals: str) -> str:
    """A child waiting in the Python code of a runtime that was active at fork time."""
    return RUNTIME_CODE_LINK.format(who=who, where=frame_text(frame), package=package,
                                    runtime=runtime, signals=signals or "active")


def thread_code_link(who: str, frame: SiteLike, package: str, holder: str,
                     started: SiteLike | None) -> str:
    """A child waiting in the code of a thread that did not survive the fork."""
    since = f" (started at {path(started.file)}:{started.line})" if started else ""
    return THREAD_CODE_LINK.format(who=who, where=frame_text(frame), package=package,
                                   holder=holder, started=since)


def frame_place(frame: SiteLike) -> str:
    """`` in threading.py:331 (wait)``."""
    return f" in {frame_text(frame)}"


def stalled(seconds: float, where: str) -> str:
    """A child stuck for no reason forksafe can tell."""
    return STALLED.format(seconds=round(seconds, 1), where=where)


def blocked_thread(tid: int, name: str, several: bool) -> str:
    """Who is blocked: "it", or one thread of several."""
    return f"its thread {tid} ({name})" if several else "it"


def hang(pid: int | None, forked: str, seconds: float, links: Sequence[str],
         remedy: str) -> str:
    """One paragraph: a child that made no progress, and what its fork explains of it."""
    head = HUNG.format(pid=pid, forked=forked, seconds=round(seconds, 1))
    return f"{head}: " + "; ".join(links[:3]) + ". " + FIX.format(remedy=remedy)


def native_thread(tid: int, name: str, blocked_in: str | None, wchan: str | None,
                  libraries: Sequence[str]) -> str:
    """One thread of a stuck child, as read from outside."""
    text = f"thread {tid} ({name}): {blocked_in or 'running'}"
    if wchan and wchan != "0":
        text += f" in {wchan}"
    if libraries:
        text += f"; native code: {', '.join(os.path.basename(p) for p in libraries)}"
    return text


def ended(diagnosis: str | None) -> str:
    """What the hang helper prints when it ends a hung child."""
    return ENDED.format(diagnosis=diagnosis)


def hung_live(pid: int | None, seconds: float) -> str:
    """What ``forksafe run`` prints the moment it ends a hung child."""
    return HUNG_LIVE.format(pid=pid, seconds=seconds)
