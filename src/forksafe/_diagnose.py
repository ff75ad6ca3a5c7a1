"""Why a child ended as it did, in terms of what was wrong when it was forked.

``outcome_for`` turns a raw wait status, the child's crash file and a hang
monitor's marker into an ``Outcome``. Only a crash is diagnosed
(``diagnose_death``): SIGTERM, SIGKILL, SIGINT and the like are how parents stop
children (``Pool.terminate``, a timeout), and blaming the fork for them would be
a false diagnosis. A crash is linked to the fork-time hazards that best explain
it (``blame``), or said plainly to come after a clean fork. The sentences are
``forksafe._render.outcomes``'s.
"""

from __future__ import annotations

import os
import re
import signal
from typing import Any, Iterable

from forksafe import _catalog
from forksafe._exits import HEADER
from forksafe._render import forks, outcomes
from forksafe._report import CRASH_SIGNALS, ForkEvent, Hazard, Outcome, Severity, Site
from forksafe._stdlib import PLATSTDLIB, STDLIB
from forksafe._tracebacks import sections


def outcome_for(event: ForkEvent, status: int, traceback: str | None,
                hung: Outcome | None = None, stall: Outcome | None = None) -> Outcome:
    """The outcome of ``event``'s child from its raw wait status and what it left
    (its crash file's ``traceback``, a hang monitor's ``hung`` marker or ``stall`` note)."""
    if os.WIFSIGNALED(status):
        name = signal_name(os.WTERMSIG(status))
        if hung is not None:
            return Outcome("hung", None, name, hung.traceback or traceback,
                           outcomes.hung_then(hung.diagnosis, name))
        if name in CRASH_SIGNALS:
            return Outcome("signaled", None, name, traceback,
                           diagnose_death(event, name, traceback))
        if stall is not None:
            # Stalled for no reason forksafe could tell, then ended from outside (its
            # parent's timeout): the stall is what there is to say.
            return Outcome("signaled", None, name, stall.traceback or traceback,
                           outcomes.hung_then(stall.diagnosis, name))
        return Outcome("signaled", None, name, traceback,
                       ended_itself(event, name, traceback))
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    if hung is not None:
        return Outcome("hung", code, None, hung.traceback or traceback, hung.diagnosis)
    diagnosis = None
    if code and traceback is not None and HEADER in traceback:
        diagnosis = diagnose_exit(event, code, traceback)
    return Outcome("exited", code, None, traceback, diagnosis)


#: Signals a runtime ends a child with when it finds itself forked (besides SIGABRT,
#: a crash signal): diagnosed only when the child was inside such a runtime's code.
SELF_ENDING = frozenset({"SIGTERM"})


def ended_itself(event: ForkEvent, signame: str, traceback: str | None) -> str | None:
    """A child ended by SIGTERM while inside the code of a fork-time hazard (a runtime's
    package or library on its stack): runtimes that detect an unsafe fork end the child
    so. Anywhere else, SIGTERM is how parents stop children: no diagnosis."""
    if signame not in SELF_ENDING or not traceback:
        return None
    parsed = sections(traceback)
    current = next((frames for is_current, frames in parsed if is_current and frames),
                   parsed[0][1] if parsed else [])
    packages = {p for p in (package_of(f.file) for f in current) if p}
    involved = [h for h in event.report.hazards if h.severity >= Severity.WARNING and (
        (h.kind == "native-runtime" and set(_catalog.modules_of(h.evidence.get("runtime")))
         & packages) or (h.kind in ("native-runtime", "native-thread")
                         and _mentioned(h, traceback.lower())))]
    if not involved or not current:
        return None
    frame = _outside_forksafe(current)
    return outcomes.ended_itself(event.child_pid,
                                 forks.describe_fork(event.mechanism, event.site), signame,
                                 outcomes.crash_place(frame, _caller(current)), involved)


def diagnose_exit(event: ForkEvent, code: int, text: str) -> str:
    """A child that exited non-zero after an uncaught exception (``forksafe._exits``):
    the exception, where, and the fork-time hazard it involves — or plainly none."""
    record = text[text.index(HEADER) + len(HEADER):].strip()
    lines = [line for line in record.splitlines() if line.strip()]
    exception = lines[-1].strip() if lines else "an exception"
    frames = [Site(m["file"], int(m["line"]), m["function"])
              for m in _TRACEBACK_LINE.finditer(record)]
    place = ""
    if frames:
        frame = _outside_forksafe(frames[::-1])
        place = outcomes.crash_place(frame, _caller(frames[::-1]))
    blamed = involved(event.report.hazards, exception, frames)
    return outcomes.failed_exit(event.child_pid, forks.describe_fork(event.mechanism, event.site),
                                code, exception, place, blamed=blamed,
                                clean=not any(h.severity >= Severity.WARNING
                                              for h in event.report.hazards))


_TRACEBACK_LINE = re.compile(r'^\s+File "(?P<file>.*)", line (?P<line>\d+), in (?P<function>.*)$',
                             re.MULTILINE)


def involved(hazards: Iterable[Hazard], exception: str, frames: list[Site]) -> list[Hazard]:
    """The fork-time hazards a child's failure involves: the inherited SQLite connection
    behind an ``sqlite3`` error, the runtime or the vanished thread whose package raised
    it or is on its stack. Empty when none does: the failure is not blamed on the fork."""
    kind = exception.partition(":")[0].strip()
    packages = {kind.partition(".")[0]} if "." in kind else set()
    packages |= {p for p in (package_of(f.file) for f in frames) if p}
    found = []
    for hazard in hazards:
        if hazard.severity < Severity.WARNING:
            continue
        ev = hazard.evidence
        if hazard.kind == "sqlite-connection":
            if kind.startswith("sqlite3.") or "inherited across fork" in exception:
                found.append(hazard)
        elif hazard.kind == "native-runtime":
            if set(_catalog.modules_of(ev.get("runtime"))) & packages:
                found.append(hazard)
        elif hazard.kind == "thread" and thread_packages(ev) & packages:
            found.append(hazard)
    return found


def thread_packages(evidence: Any, *, libraries: bool = False) -> set[str]:
    """The top-level packages a fork-time thread's code lives in (its target's, and its
    frames'), but for the standard library's plumbing and the program's own scripts;
    ``libraries``: only installed packages and the standard library, from its frames."""
    found = set()
    target = evidence.get("target")
    if not libraries and isinstance(target, str) and "." in target and \
            not target.startswith("__main__"):
        found.add(target.partition(".")[0])
    for site in evidence.get("current") or ():
        if isinstance(site, dict):
            file = str(site.get("file", ""))
            if libraries and not library_code(file):
                continue
            package = package_of(file)
            if package:
                found.add(package)
    return found - _PLUMBING


_STDLIB = tuple(os.path.join(p, "") for p in {STDLIB, PLATSTDLIB})


def library_code(path: str) -> bool:
    """Code of an installed package or of the standard library, not the program's own."""
    return f"-packages{os.sep}" in path or path.startswith(_STDLIB)


#: Packages every thread passes through: no evidence of who owns it.
_PLUMBING = {"threading", "selectors", "socket", "queue", "time", "ssl", "asyncio"}


def package_of(path: str) -> str | None:
    """The top-level package a source file belongs to (``concurrent`` for
    ``.../concurrent/futures/thread.py``, ``grpc`` for an installed gRPC); None for a
    script outside any package search path."""
    from forksafe._accept import module_of

    module = module_of(path)
    return module.partition(".")[0] if module else None


def diagnose_death(event: ForkEvent, signame: str, traceback: str | None) -> str:
    """One paragraph: who died of what, where, and which fork-time hazard explains it."""
    parsed = sections(traceback or "")
    current = [frames for is_current, frames in parsed if is_current and frames]
    place = ""
    if traceback is None:
        place = outcomes.NO_TRACEBACK
    elif current:
        frame = _outside_forksafe(current[0])
        place = outcomes.crash_place(frame, _caller(current[0]))
    elif parsed and parsed[0][1]:
        # faulthandler marks no thread as current: the signal hit a thread that runs
        # no Python code (a native runtime's own thread).
        place = outcomes.native_place(_outside_forksafe(parsed[0][1]))
    blamed, typical = blame(event.report.hazards, traceback or "")
    return outcomes.death(event.child_pid, forks.describe_fork(event.mechanism, event.site),
                          signame, place, blamed=blamed, typical=typical)


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


def _caller(frames: list[Site]) -> Site | None:
    """The user's frame, when the crash is inside the standard library."""
    from forksafe._frames import is_library_file

    if not is_library_file(_outside_forksafe(frames).file):
        return None
    return next((f for f in frames if not is_library_file(f.file)), None)


def _outside_forksafe(frames: list[Site]) -> Site:
    """The innermost frame that is not forksafe's own (the guard's fork wrapper)."""
    own = os.sep + "forksafe" + os.sep
    return next((f for f in frames if own not in f.file), frames[0])


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
