"""Reading what ``faulthandler`` wrote: one section per thread, its frames as sites.

``faulthandler`` writes, for each thread, a header ("Current thread 0x... (most
recent call first):", "Thread 0x...", or "Stack (most recent call first):") and
one ``File "...", line N in function`` line per frame, innermost first. The
thread that received the signal is marked "Current thread" (or is the only
"Stack").
"""

from __future__ import annotations

import re

from forksafe._report import Site

_FILE_LINE = re.compile(r'^\s+File "(?P<file>.*)", line (?P<line>\d+) in (?P<function>.*)$')


def sections(text: str) -> list[tuple[bool, list[Site]]]:
    """Each thread's section: whether it is the current thread, and its frames."""
    found: list[tuple[bool, list[Site]]] = []
    for line in text.splitlines():
        if "(most recent call first)" in line:
            found.append((line.startswith(("Current thread", "Stack")), []))
            continue
        match = _FILE_LINE.match(line)
        if match and found:
            found[-1][1].append(Site(match["file"], int(match["line"]), match["function"]))
    return found


def parse_traceback(text: str) -> list[Site]:
    """The frames of the crashing thread, innermost first (without a mark: the first)."""
    parsed = sections(text)
    for current, frames in parsed:
        if current:
            return frames
    return parsed[0][1] if parsed else []


def parse_sections(text: str) -> list[list[Site]]:
    """Every thread's frames, innermost first, current thread first."""
    parsed = sections(text)
    return [frames for current, frames in parsed if current] + [
        frames for current, frames in parsed if not current]
