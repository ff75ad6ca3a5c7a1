"""A place in code, as people read it: one rule for paths, one for sites.

``path`` shortens every file name the same way wherever it is shown: a file of an
installed package from its package directory on (``grpc/_channel.py``), a file of
the standard library from there (``threading.py``), anything else relative to the
working directory when it lies below it (``app.py``), else in full. Every site is
``where`` (``app.py:12``) plus, by context, the function: ``in main`` in prose
about a fork or a thread, ``(main)`` inside a sentence that already says "in".
"""

from __future__ import annotations

import functools
import os
import sysconfig
from typing import Mapping

from forksafe._render.shapes import SiteLike

_PACKAGES = "-packages" + os.sep  # site-packages, dist-packages
_STDLIB = tuple(sorted({os.path.join(p, "") for p in (
    sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"])}, key=len,
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
        return _relative(filename, os.getcwd())
    except OSError:  # the working directory was removed
        return filename


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
