"""``forksafe explain FILE``: any file in, the summary (or ``--html``, a page) or one line out.

A report comes from outside: a file saved weeks ago, one another tool wrote, one
cut short, ``/dev/zero``, a hundred megabytes of a long run. Whatever it is,
``explain`` prints the summary (exit 0) or one line saying what is wrong (exit
2), never a traceback; ``--debug`` adds the traceback to that line.

It reads three kinds of file: a run report (``forksafe run --report``), a check
(``forksafe check --json``), and the JSON lines a ``FORKSAFE_REPORT`` file gets,
which are merged as ``forksafe run`` merges them (``forksafe._runreport.Merger``).
With ``--html`` the same reading ends in one self-contained HTML page
(``forksafe._render.html``) instead of the text, written whole (``-o OUT``) or
to stdout; the same limits hold, and bad input is still one line, exit 2.

A run report is read as a stream: its ``forks`` array one entry at a time
(``json``'s own decoder on each, so no parser of our own and nothing to add to
the dependencies), each entry checked, made an event and counted in with the
ones the summary cannot tell apart (``forksafe._runreport.Picture``: the
process tree keeps a few numbers per entry, to a bound). Memory then grows with
the kinds of fork, not with the file: limits bound the file
(``MAX_BYTES``) and one entry (``MAX_ENTRY``), and a file that is not JSON fails
at its first bad byte. On a terminal, a large file shows its progress on stderr.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import re
import sys
import time
from typing import IO, Any, Callable, Iterator, TextIO

from forksafe._errors import UsageError
from forksafe._render.text import printable
from forksafe._report import SCHEMA, ForkEvent, Report

REPORT_UNREADABLE = "forksafe: cannot read report {path!r}: {error}"
REPORT_FOREIGN = "forksafe: {path!r} is not a forksafe report (expected schema {schema!r})"
#: Said when ``-o OUT`` cannot be written (before the report is read, when that can be told).
OUTPUT_UNWRITABLE = "forksafe explain: cannot write {path!r}: {error}"
#: Said on stderr once ``-o OUT`` is written.
OUTPUT_WRITTEN = "forksafe: {what} written to {path}"
#: Said (exit 0) when an event-lines file had lines that are not events (a torn last one).
LINES_SKIPPED = "forksafe: {count} line(s) of {path!r} skipped: not forksafe events"

#: The most of a file that is read: a report of a very long run is far below this.
MAX_BYTES = 1024 * 1024 * 1024
#: The most one entry (a fork, a top-level value, an event line) may take.
MAX_ENTRY = 64 * 1024 * 1024
#: Forks a report may claim in all (entries' ``count`` added up).
MAX_FORKS = 100_000_000
#: On a terminal, files larger than this show their progress while read.
PROGRESS_FROM = 4 * 1024 * 1024

#: The outcome statuses this version knows (docs/report-format.md); any other would be
#: silently summarised as a clean fork.
STATUSES = ("exited", "signaled", "hung", "stalled", "unknown")

_CHUNK = 1024 * 1024
_SPACE = re.compile(r"[ \t\n\r]*")
_EVENT_LINES = re.compile(r'\s*\{\s*"type"\s*:')
_DECODER = json.JSONDecoder()


class Corrupt(Exception):
    """What is wrong with the file, as the words after "cannot read report ...: "."""


class Foreign(Exception):
    """Valid JSON, but not a forksafe report."""


def cli(args: Any) -> int:
    """The ``forksafe explain`` subcommand (arguments parsed by ``forksafe._cli``)."""
    path: str = args.file
    html: bool = getattr(args, "html", False)
    output: str | None = getattr(args, "output", None)
    if output is not None:
        from forksafe._reportfile import check_writable

        check_writable(output, message=OUTPUT_UNWRITABLE)
    try:
        if path == "-":
            stdin = getattr(sys.stdin, "buffer", None)  # None when stdin was closed
            if stdin is None:
                raise OSError(0, "there is no standard input")
            source: IO[bytes] = stdin
            size = None
        else:
            source = open(path, "rb")  # noqa: SIM115 - closed below, after streaming
            size = _size(source)
    except OSError as exc:
        raise UsageError(REPORT_UNREADABLE.format(path=path, error=_reason(exc))) from exc
    progress = Progress(path, size, sys.stderr)
    try:
        text, skipped = explain(source, on_read=progress.update, html=html)
    except Corrupt as exc:
        raise UsageError(REPORT_UNREADABLE.format(path=path, error=str(exc))) from exc
    except Foreign as exc:
        raise UsageError(REPORT_FOREIGN.format(path=path, schema=SCHEMA)) from exc
    except OSError as exc:
        raise UsageError(REPORT_UNREADABLE.format(path=path, error=_reason(exc))) from exc
    except MemoryError as exc:
        raise UsageError(REPORT_UNREADABLE.format(path=path, error="out of memory")) from exc
    except Exception as exc:  # whatever a hostile file provokes: one line, not a traceback
        error = f"corrupt: {type(exc).__name__}: {exc}"
        raise UsageError(REPORT_UNREADABLE.format(path=path, error=error[:300])) from exc
    finally:
        progress.done()
        if path != "-":
            source.close()
    if output is not None:
        from forksafe._reportfile import write_file

        write_file(output, (printable(text) + "\n").encode("utf-8", "backslashreplace"),
                   message=OUTPUT_UNWRITABLE)
        print(OUTPUT_WRITTEN.format(what="page" if html else "summary", path=output),
              file=sys.stderr)
    else:
        _print(text, sys.stdout)
    if skipped:
        print(LINES_SKIPPED.format(count=skipped, path=path), file=sys.stderr)
    return 0


def explain(source: IO[bytes], *, on_read: Callable[[int], None] | None = None,
            html: bool = False) -> tuple[str, int]:
    """The text (``html``: the page) for the report in ``source``, and how many event
    lines were skipped.

    Raises ``Corrupt`` or ``Foreign`` (or ``OSError``) for a file it cannot render.
    """
    reader = _Reader(source, on_read)
    reader.fill()
    if _EVENT_LINES.match(reader.head()):
        return _event_lines(reader, html)
    return _document(reader, html), 0


def _document(reader: _Reader, html: bool) -> str:
    """A run report or a check: one JSON object, its ``forks`` streamed."""
    from forksafe._runreport import Picture

    reader.space()
    if reader.peek() != "{":
        if reader.peek() == "":
            raise Corrupt("it is empty")
        reader.value()  # valid JSON that is not an object is foreign; anything else, corrupt
        raise Foreign
    reader.take("{")
    top: dict[str, Any] = {}
    picture: Picture | None = None
    first = True
    while True:
        reader.space()
        if first and reader.peek() == "}":
            reader.take("}")
            break
        first = False
        key = reader.value()
        if not isinstance(key, str):
            raise Corrupt(reader.invalid("Expecting property name enclosed in double quotes"))
        reader.space()
        reader.take(":")
        reader.space()
        if key == "forks" and reader.peek() == "[":
            if picture is not None:
                raise Corrupt("corrupt: 'forks' appears twice")
            picture = _forks(reader)
        else:
            value = reader.value()
            if key in _KEPT:
                top[key] = value
        reader.space()
        if reader.peek() == ",":
            reader.take(",")
            continue
        reader.take("}")
        break
    reader.space()
    if reader.peek():
        raise Corrupt(reader.invalid("Extra data"))
    if top.get("schema") != SCHEMA:
        raise Foreign
    if picture is not None:
        from forksafe._runreport import started_of

        _check_run(top)
        omitted = top.get("forks_omitted", 0)
        # The run's own facts may come after its forks in a file of another writer.
        picture.tree.command_pid = top.get("pid")
        picture.timeline.started = started_of(top.get("started"))
        picture.timeline.duration = top.get("duration")  # checked: a number, or None
        if html:
            from forksafe._runreport import facts_of

            return picture.page(top["command"], top["exit_code"], omitted, facts_of(top))
        return picture.text(top["command"], top["exit_code"], omitted)
    if "forks" in top:
        raise Corrupt("corrupt: 'forks' must be a list")
    if "hazards" not in top:
        raise Corrupt("corrupt: it has neither 'forks' (a run report) nor 'hazards' (a check)")
    _check_check(top)
    _check_hazards(top["hazards"], "the check")
    try:
        report = Report.from_dict(top)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise Corrupt(f"corrupt: {exc}") from exc
    if html:
        from forksafe._render.html import check_page

        facts = {"command": " ".join(map(str, top["command"])) if isinstance(
            top.get("command"), list) else None, "checked (UTC)": top.get("time")}
        return check_page(top.get("command"), report, facts)
    return str(report)


#: The top-level keys kept (others are read and let go: a reader ignores what it does
#: not know, and must not keep it).
_KEPT = frozenset({"schema", "command", "exit_code", "forks", "forks_omitted", "hazards",
                   "parent_pid", "thread", "time", "max_severity", "mechanism", "site",
                   "action", "pid", "started", "duration"})


def _forks(reader: _Reader) -> Any:
    """The ``forks`` array, entry by entry, into what the summary and the page need."""
    from forksafe._runreport import Picture

    picture = Picture()
    reader.take("[")
    number = 0
    while True:
        reader.space()
        if reader.peek() == "]" and number == 0:
            reader.take("]")
            return picture
        number += 1
        if reader.peek() != "{":
            reader.value()  # a syntax error is said as such
            raise Corrupt(f"corrupt: fork entry {number} is not an object")
        entry = reader.value()
        count = _check_fork(entry, number)
        try:
            event = ForkEvent.from_dict(entry)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise Corrupt(f"corrupt: fork entry {number}: {exc}") from exc
        picture.add(event, count, entry.get("process_command"))
        if len(picture.runs) > MAX_FORKS:
            raise Corrupt(f"corrupt: it claims more than {MAX_FORKS:,} forks")
        reader.space()
        if reader.peek() == ",":
            reader.take(",")
            continue
        reader.take("]")
        return picture


def _check_run(top: dict[str, Any]) -> None:
    from forksafe._runreport import started_of

    command = top.get("command")
    if "command" not in top or "exit_code" not in top:
        missing = "command" if "command" not in top else "exit_code"
        raise Corrupt(f"corrupt: a run report without {missing!r}")
    if not isinstance(command, list) or not all(isinstance(c, str) for c in command):
        raise Corrupt("corrupt: 'command' must be a list of strings")
    if not _is_int(top["exit_code"]):
        raise Corrupt("corrupt: 'exit_code' must be an integer")
    omitted = top.get("forks_omitted", 0)
    if not _is_int(omitted) or omitted < 0:
        raise Corrupt("corrupt: 'forks_omitted' must be a whole number")
    if top.get("pid") is not None and not _is_int(top["pid"]):
        raise Corrupt("corrupt: 'pid' must be an integer")
    if top.get("started") is not None and started_of(top["started"]) is None:
        raise Corrupt("corrupt: 'started' must be a time such as 2026-11-25T10:00:00Z")
    duration = top.get("duration")
    if duration is not None and not ((_is_int(duration) or isinstance(duration, float))
                                     and 0 <= duration < float("inf")):
        raise Corrupt("corrupt: 'duration' must be a number of seconds")


def _check_check(top: dict[str, Any]) -> None:
    """A check must say whose fork it judged: else it would read "if pid 0 forked now
    (from thread '')"."""
    for key, kind, test in (("parent_pid", "an integer", _is_int),
                            ("thread", "a string", _is_str),
                            ("hazards", "a list", _is_list)):
        if key not in top:
            raise Corrupt(f"corrupt: a check without {key!r}")
        if not test(top[key]):
            raise Corrupt(f"corrupt: {key!r} must be {kind}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_str(value: object) -> bool:
    return isinstance(value, str)


def _is_list(value: object) -> bool:
    return isinstance(value, list)


#: A fork entry's fields: (name, required, what it must be, the test).
_FORK_FIELDS: tuple[tuple[str, bool, str, Callable[[Any], bool]], ...] = (
    ("parent_pid", True, "an integer", _is_int),
    ("mechanism", True, "a string", _is_str),
    ("action", True, "a string", _is_str),
    ("hazards", True, "a list", _is_list),
    ("child_pid", False, "an integer or null", lambda v: v is None or _is_int(v)),
    ("site", False, "an object or null", lambda v: v is None or isinstance(v, dict)),
    ("thread", False, "a string", _is_str),
    ("time", False, "a time", lambda v: _is_str(v) or _is_int(v) or isinstance(v, float)),
    ("outcome", False, "an object", lambda v: isinstance(v, dict)),
    ("count", False, "a positive integer", lambda v: _is_int(v) and v > 0),
)


def _check_fork(entry: dict[str, Any], number: int) -> int:
    """Check fork entry ``number``; how many forks it stands for."""
    for key, required, kind, test in _FORK_FIELDS:
        if key not in entry:
            if required:
                raise Corrupt(f"corrupt: fork entry {number} has no {key!r}")
            continue
        if not test(entry[key]):
            raise Corrupt(f"corrupt: fork entry {number}: {key!r} must be {kind}")
    _check_hazards(entry["hazards"], f"fork entry {number}")
    outcome = entry.get("outcome")
    if outcome is not None:
        status = outcome.get("status")
        if status not in STATUSES:
            raise Corrupt(f"corrupt: fork entry {number} has an outcome status {status!r} this "
                          f"version does not know (it knows {', '.join(STATUSES)})")
    count: int = entry.get("count", 1)
    return count


#: Evidence the summary reads, by the shape it must have (docs/report-format.md): texts
#: (or null), lists (or null), and sites given as a list or as a sentence.
_TEXTS = ("name", "state", "target", "owner", "why", "doing", "runtime", "loop", "thread",
          "error", "probe", "preexec_fn", "code")
_LISTS = ("current", "libraries", "stack_libraries", "signals", "threads", "locks")
_SITES = ("started_at", "opened_at")


def _check_hazards(hazards: list[Any], where: str) -> None:
    """Each hazard an object whose evidence has the shapes the summary reads: a value
    of another shape would make the summary fail (or say something false)."""
    for index, hazard in enumerate(hazards, 1):
        if not isinstance(hazard, dict):
            raise Corrupt(f"corrupt: {where}, hazard {index} is not an object")
        evidence = hazard.get("evidence", {})
        if not isinstance(evidence, dict):
            raise Corrupt(f"corrupt: {where}, hazard {index}: 'evidence' must be an object")
        for key, value in evidence.items():
            if value is None:
                continue
            if (key in _TEXTS and not _is_str(value)) or (
                    key in _LISTS and not _is_list(value)) or (
                    key in _SITES and not (_is_str(value) or _is_list(value))):
                raise Corrupt(f"corrupt: {where}, hazard {index}: evidence {key!r} has the "
                              f"wrong type ({type(value).__name__})")


def _event_lines(reader: _Reader, html: bool) -> tuple[str, int]:
    """A ``FORKSAFE_REPORT`` file: its lines merged into a run report, as ``forksafe run``
    merges them; lines that are not events (a torn last one) are skipped and counted."""
    from forksafe._runreport import Merger, facts_of, picture_of

    merger = Merger()
    skipped = 0
    command: list[str] | None = None
    for line in reader.lines():
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            record = None
        if not isinstance(record, dict) or record.get("type") not in _EVENT_TYPES:
            skipped += 1
            continue
        if record["type"] != "outcome":
            try:
                _check_fork({k: v for k, v in record.items() if k not in ("type", "command")},
                            0)
            except Corrupt:
                skipped += 1
                continue
            if command is None and isinstance(record.get("command"), list):
                command = [str(c) for c in record["command"]]
        elif not isinstance(record.get("outcome"), dict) or \
                record["outcome"].get("status") not in STATUSES:
            skipped += 1
            continue
        merger.add(record)
    report = merger.report(command or [], 0)
    picture = picture_of(report)
    omitted = report.get("forks_omitted", 0)
    if html:
        facts = facts_of(report)
        facts.pop("exit code", None)  # event lines do not know COMMAND's
        return picture.page(command, None, omitted, facts), skipped
    return picture.text(command, None, omitted), skipped


_EVENT_TYPES = ("fork", "fork-pending", "outcome")


class _Reader:
    """UTF-8 text from a byte stream, a chunk at a time, decoded value by value.

    ``value()`` hands the buffer to ``json``'s decoder at the current place; when
    the value runs past what has been read, more is read (at least as much again,
    so a large value costs linear time) and it is decoded again. A decoding
    error well before the end of what was read is the file's fault, at once.
    """

    def __init__(self, source: IO[bytes], on_read: Callable[[int], None] | None) -> None:
        self.source = source
        self.on_read = on_read
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.buf = ""
        self.pos = 0
        self.eof = False
        self.read_bytes = 0
        self.lines_before = 0  # newlines in the text already let go (for error lines)

    def head(self) -> str:
        return self.buf[self.pos:self.pos + 4096]

    def fill(self, at_least: int = _CHUNK) -> bool:
        """Read ``at_least`` more bytes (or to the end); False at the end."""
        if self.eof:
            return False
        if self.pos:
            self.lines_before += self.buf.count("\n", 0, self.pos)
            self.buf, self.pos = self.buf[self.pos:], 0
        wanted = max(at_least, _CHUNK)
        data = b""
        while len(data) < wanted:
            chunk = self.source.read(min(wanted - len(data), 16 * _CHUNK))
            if not chunk:
                self.eof = True
                break
            data += chunk
        self.read_bytes += len(data)
        if self.read_bytes > MAX_BYTES:
            raise Corrupt(f"it is larger than {MAX_BYTES // (1024 * 1024)} MB")
        if self.on_read is not None:
            self.on_read(self.read_bytes)
        try:
            self.buf += self.decoder.decode(data, final=self.eof)
        except UnicodeDecodeError as exc:
            raise Corrupt(f"it is not UTF-8 text ({exc.reason})") from None
        return bool(data)

    def space(self) -> None:
        while True:
            match = _SPACE.match(self.buf, self.pos)
            self.pos = match.end() if match else self.pos
            if self.pos < len(self.buf) or not self.fill():
                return

    def peek(self) -> str:
        if self.pos >= len(self.buf):
            self.fill()
        return self.buf[self.pos:self.pos + 1]

    def take(self, char: str) -> None:
        if self.peek() != char:
            expected = {"{": "'{'", "}": "',' or '}'", "]": "',' or ']'", ":": "':'"}
            raise Corrupt(self.invalid(f"Expecting {expected.get(char, repr(char))}"))
        self.pos += 1

    def value(self) -> Any:
        """The JSON value that starts here."""
        while True:
            try:
                value, end = _DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as exc:
                if self.eof or not self._may_continue(exc):
                    raise Corrupt(self.invalid(exc.msg, exc.pos)) from None
                self._more()
                continue
            except RecursionError:
                raise Corrupt("corrupt: nested too deeply") from None
            if end == len(self.buf) and not self.eof:
                self._more()  # a number, or a literal, may go on in the next chunk
                continue
            self.pos = end
            return value

    def _may_continue(self, exc: json.JSONDecodeError) -> bool:
        """Whether the value may be whole once more is read (else the file is at fault)."""
        return exc.pos >= len(self.buf) - 16 or exc.msg.startswith("Unterminated string")

    def _more(self) -> None:
        pending = len(self.buf) - self.pos
        if pending > MAX_ENTRY:
            raise Corrupt(f"corrupt: an entry larger than {MAX_ENTRY // (1024 * 1024)} MB")
        self.fill(pending)

    def lines(self) -> Iterator[str]:
        """The lines that follow, each without its newline; an overlong one as ''."""
        while True:
            end = self.buf.find("\n", self.pos)
            while end < 0:
                if len(self.buf) - self.pos > MAX_ENTRY:
                    self.pos = len(self.buf)  # an overlong line: let go of what was read
                    yield ""
                    self._skip_to_newline()
                    break
                if not self.fill():
                    if self.pos < len(self.buf):
                        yield self.buf[self.pos:]
                        self.pos = len(self.buf)
                    return
                end = self.buf.find("\n", self.pos)
            else:
                line = self.buf[self.pos:end]
                self.pos = end + 1
                if line.strip():
                    yield line

    def _skip_to_newline(self) -> None:
        while True:
            end = self.buf.find("\n", self.pos)
            if end >= 0:
                self.pos = end + 1
                return
            self.pos = len(self.buf)
            if not self.fill():
                return

    def invalid(self, message: str, at: int | None = None) -> str:
        at = self.pos if at is None else at
        line = self.lines_before + self.buf.count("\n", 0, at) + 1
        return f"not valid JSON ({message} at line {line})"


class Progress:
    """How much of a large file was read, on a terminal's stderr; nothing elsewhere."""

    def __init__(self, path: str, size: int | None, out: TextIO) -> None:
        self.path = path
        self.size = size
        self.out = out
        self.shown = False
        self.last = 0.0
        try:
            self.on = out.isatty() and (size is None or size > PROGRESS_FROM)
        except (AttributeError, ValueError):
            self.on = False

    def update(self, done: int) -> None:
        if not self.on or done < PROGRESS_FROM or time.monotonic() - self.last < 0.2:
            return
        self.last = time.monotonic()
        mb = done / (1024 * 1024)
        text = f"forksafe: reading {self.path}: {mb:.0f} MB"
        if self.size:
            text += f" of {self.size / (1024 * 1024):.0f} MB ({100 * done // self.size}%)"
        self._write("\r" + text)
        self.shown = True

    def done(self) -> None:
        if self.shown:
            self._write("\r" + " " * 79 + "\r")
            self.shown = False

    def _write(self, text: str) -> None:
        try:
            self.out.write(text)
            self.out.flush()
        except (OSError, ValueError):
            self.on = False


def _size(source: IO[bytes]) -> int | None:
    """The size of a regular file (None for a pipe, a device, a terminal)."""
    import stat

    try:
        info = os.fstat(source.fileno())
    except (OSError, ValueError):
        return None
    return info.st_size if stat.S_ISREG(info.st_mode) else None


def _print(text: str, out: TextIO) -> None:
    """Print ``text`` whatever the output's encoding: what it cannot show is escaped
    (``PYTHONIOENCODING=ascii`` with a report naming a non-ASCII path)."""
    reconfigure = getattr(out, "reconfigure", None)
    if reconfigure is not None:
        with contextlib.suppress(ValueError, OSError):
            reconfigure(errors="backslashreplace")
    out.write(printable(text) + "\n")


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__
