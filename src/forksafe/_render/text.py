"""Text that came from outside, made safe to show on a terminal.

forksafe prints what other code chose: thread names, file paths, exception
messages, tracebacks, and whatever a report file holds (``forksafe explain``
reads files anyone may have written). A control character in any of them is a
command to the terminal: ``ESC ] 0 ;`` retitles the window, ``ESC [ 2 J`` clears
it, a carriage return overwrites the line just printed, and Unicode's
bidirectional overrides reorder what the reader sees. So every human output
passes through ``printable`` where it leaves forksafe (a warning, a line on
stderr, the CLI's output): control characters other than newline and tab, and
the bidirectional controls, are shown escaped (``\\x1b``, ``\\u202e``) instead of
obeyed. JSON output needs nothing: ``json`` escapes control characters itself.
"""

from __future__ import annotations

import re

#: C0 controls but tab and newline, DEL, C1 controls, and Unicode's bidirectional
#: embedding, override and isolate controls.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` with every character a terminal would obey, rather than show, escaped."""
    if _UNSAFE.search(text) is None:
        return text
    return _UNSAFE.sub(_escaped, text)


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
