"""A place in code, as people read it: one rule for paths, one for sites.

``path`` shortens every file name the same way wherever it is shown: a file of an
installed package from its package directory on (``grpc/_channel.py``), a file of
the standard library from there (``threading.py``), anything else relative to the
working directory when it lies below it (``app.py``), else in full. Every site is
``where`` (``app.py:12``) plus, by context, the function: ``in main`` in prose
about a fork or a thread, ``(main)`` inside a sentence that already says "in".
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import Iterator, Mapping

from forksafe._render.shapes import SiteLike
from forksafe._stdlib import PLATSTDLIB, STDLIB

_PACKAGES = "-packages" + os.sep  # site-packages, dist-packages
_STDLIB = tuple(sorted({os.path.join(p, "") for p in (STDLIB, PLATSTDLIB)}, key=len,
                      reverse=True))


def path(filename: str) -> str:
    """``filename`` as it is shown (see the module docstring)."""
    at = filename.rfind(_PACKAGES)
    if at != -1:
        return filename[at + len(_PACKAGES):]
    for prefix in _STDLIB:
        if filename.startswith(prefix):
            return filename[len(prefix):]
    try:
        return _relative(filename, working_directory())
    except OSError:  # the working directory was removed
        return filename


def working_directory() -> str:
    """The directory texts are made against: pinned by ``one_working_directory``, else
    the current one (OSError when it was removed)."""
    return getattr(_pinned, "cwd", None) or os.getcwd()


#: The working directory a thread's texts are made against, while it makes many at
#: once (``one_working_directory``).
_pinned = threading.local()


@contextlib.contextmanager
def one_working_directory(known: object = None) -> Iterator[None]:
    """Within: ``path`` reads the working directory once (or takes ``known``, a path
    read just before), not once per path. A check makes a text for every site of
    every thread; a fork storm made that a dozen ``getcwd`` calls per fork."""
    if getattr(_pinned, "cwd", None) is not None:
        yield  # already pinned by an enclosing check
        return
    if isinstance(known, str):
        _pinned.cwd = known
    else:
        try:
            _pinned.cwd = os.getcwd()
        except OSError:
            _pinned.cwd = None
    try:
        yield
    finally:
        _pinned.cwd = None


@functools.lru_cache(maxsize=4096)
def _relative(filename: str, cwd: str) -> str:
    if not os.path.isabs(filename):
        return filename
    try:
        relative = os.path.relpath(filename, cwd)
    except ValueError:
        return filename
    return filename if relative.startswith(os.pardir) else relative


def where(site: SiteLike | None) -> str:
    """``app.py:12``; "an unknown place" for a fork whose site is not known."""
    if site is None:
        return "an unknown place"
    return _where(site.file, site.line)


def site_text(site: SiteLike) -> str:
    """``app.py:12 in main``."""
    return f"{_where(site.file, site.line)} in {site.function}"


def frame_text(site: SiteLike) -> str:
    """``app.py:12 (main)``: for a sentence that says "in" already."""
    return f"{_where(site.file, site.line)} ({site.function})"


def evidence_site(data: object) -> str:
    """A site as a report's evidence holds it (a JSON object, perhaps with its source
    line): ``app.py:12 in main: pool.map(f, xs)``."""
    if not isinstance(data, Mapping):
        return str(data)
    text = f"{_where(str(data.get('file')), data.get('line'))} in {data.get('function')}"
    code = data.get("code")
    return f"{text}: {code}" if code else text


def evidence_where(at: str) -> str:
    """``"/srv/app.py:29"`` (where a lock was taken, in the evidence) as ``app.py:29``."""
    file, _, line = at.rpartition(":")
    return _where(file, line) if file else at


def _where(file: str, line: object) -> str:
    return f"{path(file)}:{line}"
