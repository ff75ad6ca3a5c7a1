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

#: C0 controls but tab and newline, DEL, C1 controls, and Unicode's bidirectional
#: embedding, override and isolate controls: each to its escape (a table for
#: ``str.translate``, so that importing this costs no regular expression).
_UNSAFE = {code: (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
           for code in [*range(0x00, 0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0),
                        0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F),
                        *range(0x2066, 0x206A)]}


def printable(text: str) -> str:
    """``text`` with every character a terminal would obey, rather than show, escaped."""
    shown = text.translate(_UNSAFE)
    return text if shown == text else shown
