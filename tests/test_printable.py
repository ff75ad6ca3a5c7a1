"""Every human output escapes what a terminal would obey (issue 14, item 3)."""

from __future__ import annotations

import pytest

from forksafe._render.text import printable


@pytest.mark.parametrize(("raw", "shown"), [
    ("plain text, tabs\tand\nnewlines stay", "plain text, tabs\tand\nnewlines stay"),
    ("\x1b]0;owned\x07title", "\\x1b]0;owned\\x07title"),
    ("\x1b[2Jclear", "\\x1b[2Jclear"),
    ("overwrite\rme", "overwrite\\x0dme"),
    ("c1\x9bcsi and del\x7f", "c1\\x9bcsi and del\\x7f"),
    ("bidi \u202eevil\u202c and \u2066isolate\u2069",
     "bidi \\u202eevil\\u202c and \\u2066isolate\\u2069"),
    ("unicode names stay: Zoë 線程", "unicode names stay: Zoë 線程"),
])
def test_printable_escapes_only_what_a_terminal_obeys(raw: str, shown: str) -> None:
    assert printable(raw) == shown


def test_printable_text_is_returned_as_it_is() -> None:
    text = "thread 'x' holds `lock` at app.py:3"
    assert printable(text) is text
