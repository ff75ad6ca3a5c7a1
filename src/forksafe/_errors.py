"""What forksafe raises, and how it says that a part of itself failed.

Only ``os`` and ``sys`` (loaded before any program runs) at module level:
``import forksafe`` imports this module, and the environment hook imports it at
every interpreter start of a guarded tree.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing itself is not imported: see __init__.py
if TYPE_CHECKING:
    from forksafe._report import Report


class ForkSafetyWarning(RuntimeWarning):
    """A fork that may break the child. A RuntimeWarning, so it is shown by default."""


class ForkSafetyError(Exception):
    """A fork refused before it happened, or an inherited object used in a child.

    ``report`` holds the hazards that made the fork unsafe (``None`` when the
    error is not about a whole process, such as an inherited SQLite connection).
    """

    def __init__(self, message: str, report: Report | None = None) -> None:
        super().__init__(message)
        self.report = report


# Shown and pickled under the name users import them by (a pool's result queue
# carries a ForkSafetyError from one process to another).
ForkSafetyWarning.__module__ = ForkSafetyError.__module__ = "forksafe"


class UsageError(Exception):
    """A user error that the command line reports as one line with exit status 2."""


FAILED = (
    "forksafe: {what} failed ({error}); forksafe goes on without it and the program is not "
    "affected. Please report this with the error above."
)

#: The parts of forksafe that failed in this process, each said once.
failures: set[str] = set()


def report_failure(what: str, exc: BaseException, *, stacklevel: int = 3) -> None:
    """Say once per process that a part of forksafe failed; never raise.

    forksafe runs inside other people's programs: a bug of ours is told, once,
    as a ``ForkSafetyWarning`` (or on stderr when warnings are errors there),
    and the program goes on as if forksafe were not there.
    """
    if what in failures:
        return
    failures.add(what)
    message = FAILED.format(what=what, error=f"{type(exc).__name__}: {exc}")
    try:
        import warnings

        from forksafe._render.text import printable

        message = printable(message)
        warnings.warn(message, ForkSafetyWarning, stacklevel=stacklevel)
    except Exception:  # warnings turned into errors: the program must still go on
        write_stderr(message)


def write_stderr(line: str) -> None:
    """One line on ``sys.stderr`` (escaped: ``forksafe._render.text``), or nothing when
    there is no usable stderr."""
    try:
        from forksafe._render.text import printable

        sys.stderr.write(printable(line) + "\n")
        sys.stderr.flush()
    except Exception:  # no usable stderr: nothing else to tell it to
        return


def write_fd2(line: str) -> None:
    """One line on file descriptor 2, without Python's stderr object (in a forked child,
    whose ``sys.stderr`` lock may be held by a thread that does not exist there)."""
    try:
        os.write(2, (line + "\n").encode())
    except OSError:
        return
