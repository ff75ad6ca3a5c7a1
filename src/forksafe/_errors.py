"""The exception and the warning forksafe raises, in their own module (no imports)."""

from __future__ import annotations

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
