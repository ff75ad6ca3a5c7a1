"""The ``forksafe`` command line.

Every user error ends in one line on stderr and exit status 2 — a bad option, a
module that fails to import, an unreadable report file — never a traceback,
unless ``--debug`` asks for one. Message texts are constants so that the tests
check the very words users see.

Cheap to import: ``forksafe run`` starts COMMAND after this module and little
else is loaded (its start-up cost is COMMAND's wait), so what only ``check`` or
``explain`` need is imported where they run.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

from forksafe import _config
from forksafe._errors import UsageError
from forksafe._render.text import printable

TYPE_CHECKING = False  # typing costs a few milliseconds of every `forksafe run`
if TYPE_CHECKING:
    from typing import Any, Callable, NoReturn, Sequence

    from forksafe._report import Report

IMPORT_FAILED = "forksafe: cannot import {module!r}: {error}"

EXIT_CLEAN, EXIT_HAZARDS, EXIT_USAGE = 0, 1, 2


class _Formatter(argparse.HelpFormatter):
    """argparse's help, its width read without ``shutil`` (whose import, with the
    compression modules it loads, argparse would add to every ``forksafe run``: it
    makes a formatter for each option it is given)."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        if width is None:
            width = _columns() - 2
        super().__init__(prog, indent_increment, max_help_position, width)


@functools.cache
def _columns() -> int:
    """The terminal's width, as ``shutil.get_terminal_size`` finds it (80 by default);
    asked once, not for each of the options a formatter is made for."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns or 80  # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError):
        return 80


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the fix, still exit 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="forksafe",
        description="Know what breaks in a forked child before you fork.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    check = commands.add_parser(
        "check",
        help="report what would break if this process forked now",
        description=(
            "Import the given modules (as a preloading server such as gunicorn --preload "
            "would), then report the hazards of forking at that point. Exit 0 when clean, "
            "1 when a hazard reaches --fail-on, 2 on usage errors."
        ),
    )
    check.add_argument("--import", dest="imports", action="append", default=[],
                       metavar="MODULE", help="import MODULE first (repeatable, in order)")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.add_argument("--fail-on", type=_option("fail_on"), default="error",
                       metavar="{warning,error}",
                       help="exit 1 when a hazard reaches this level (default: error)")
    check.add_argument("--accept", action="append", default=[], metavar="RULE",
                       help="accept a hazard, with its reason: 'KIND[/FIELD=GLOB]...: REASON' "
                            "(repeatable; [tool.forksafe] accept in pyproject.toml too)")
    check.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks for errors")

    run = commands.add_parser(
        "run",
        help="run COMMAND with the fork guard in every Python process it starts",
        description=(
            "Run COMMAND (a script, pytest, gunicorn, celery, ...) with the fork guard "
            "active in every Python process of its tree; print one summary at the end and "
            "optionally write the JSON report. The exit status is COMMAND's own."
        ),
    )
    run.add_argument("--policy", type=_option("policy"), default="warn",
                     metavar="{log,warn,raise}",
                     help="what the guard does at a hazardous fork (default: warn)")
    run.add_argument("--report", type=_option("report"), metavar="FILE",
                     help="write the JSON report to FILE (a FIFO or device is written to "
                          "as it is)")
    run.add_argument("--hang-timeout", type=_option("hang_timeout"), metavar="SECONDS",
                     default=None,
                     help="report a forked child that makes no progress for this long")
    run.add_argument("--accept", action="append", default=[], metavar="RULE",
                     help="accept a hazard in the whole tree, with its reason (as for check)")
    run.add_argument("--new-session", action="store_true",
                     help="start COMMAND in a session of its own, without the controlling "
                          "terminal (by default it keeps it: /dev/tty, prompts, pdb work)")
    run.add_argument("--signal-group", action="store_true",
                     help="pass SIGTERM, SIGINT, SIGHUP and SIGQUIT sent to forksafe run to "
                          "COMMAND's whole process group (default: its main process only, "
                          "as a supervisor does)")
    run.add_argument("--grace", type=_seconds, default=None, metavar="SECONDS",
                     help="after SIGTERM, kill COMMAND's whole tree (SIGKILL) if it still "
                          "runs this long later; a second Ctrl-C within this time does it "
                          "at once (default: 10)")
    run.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                     help="show tracebacks for errors")
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARG]...",
                     help="the command to run, after '--'")

    doctor = commands.add_parser(
        "doctor",
        help="report how this Python and environment stand towards fork",
        description=(
            "Check which SQLite library sqlite3 uses, the default start method, CPython's "
            "fork warning, fork-related environment variables and installed fork-unsafe "
            "runtimes; each line gets a verdict (ok / note / problem) and a fix. Exit 0 "
            "when there is no problem, 1 when there is one, 2 on usage errors."
        ),
    )
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    doctor.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks for errors")

    explain = commands.add_parser(
        "explain",
        help="render a saved JSON report as text, or as one HTML page",
        description=(
            "Render a report written by 'forksafe check --json' or 'forksafe run' (or the "
            "event lines of a FORKSAFE_REPORT file). With --html: one self-contained HTML "
            "page (no network, nothing external) with the process tree, a timeline of "
            "forks and outcomes, and every finding with its evidence."
        ),
    )
    explain.add_argument("file", metavar="FILE", help="the JSON report ('-' for stdin)")
    explain.add_argument("--html", action="store_true",
                         help="write one self-contained HTML page instead of text")
    explain.add_argument("-o", "--output", metavar="OUT", default=None,
                         help="write to OUT instead of stdout (replaced whole, atomically)")
    explain.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="show tracebacks for errors")
    return parser


def _seconds(text: str) -> float:
    """A ``--grace`` value: seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"--grace must be a number of seconds >= 0, "
                                         f"not {text!r}")
    return value


_seconds.__name__ = "seconds"  # argparse names the type in some messages


def _option(field: str) -> Callable[[str], Any]:
    """An argparse type for a guard setting, validated by ``forksafe._config`` (the one
    validation path of ``install()``, the environment and these options)."""

    def parse(text: str) -> Any:
        try:
            return _config.validate(field, text, _config.OPTIONS)
        except _config.ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = field  # argparse names the type in some messages
    return parse


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except BrokenPipeError:
        # `forksafe doctor --json | head`: the reader left; say nothing more. Point
        # stdout at /dev/null so the interpreter's final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_CLEAN


def _dispatch(args: argparse.Namespace) -> int:
    try:
        if args.command == "check":
            return _leave_despite_threads(_check(args))
        if args.command == "explain":
            from forksafe._explain import cli as explain_cli

            return explain_cli(args)
        if args.command == "run":
            from forksafe._run import cli as run_cli

            return run_cli(args)
        if args.command == "doctor":
            from forksafe._doctor import cli as doctor_cli

            return doctor_cli(args)
    except UsageError as exc:
        if args.debug:
            import traceback

            traceback.print_exc()
        print(printable(str(exc)), file=sys.stderr)
        if args.command == "check":  # a module may have started a thread, then failed
            _leave_despite_threads(EXIT_USAGE)
        return EXIT_USAGE
    raise AssertionError(f"unhandled command {args.command!r}")


def _check(args: argparse.Namespace) -> int:
    import json

    from forksafe import _accept
    from forksafe._check import check
    from forksafe._ledger import observe

    try:
        _accept.add(_accept.command_rules(args.accept))
    except _accept.AcceptError as exc:
        raise UsageError(f"forksafe: {exc}") from exc
    observe()  # so that threads and connections the imports create have origins
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: the project's own modules
    for module in args.imports:
        _import(module)
    report = check()
    if args.json:
        print(json.dumps(check_json(report), indent=2))
    else:
        print(printable(str(report)))
    from forksafe._report import Severity

    worst = report.max_severity
    return EXIT_HAZARDS if worst is not None and worst >= Severity.parse(args.fail_on) else 0


def _leave_despite_threads(code: int) -> int:
    """``code``, or exit with it right now when an imported module left a non-daemon
    thread running.

    ``check --import`` imports the user's modules only to look at the process;
    a module that starts a non-daemon thread (a scheduler, a server loop) would
    otherwise keep the interpreter in its shutdown, joining that thread, forever,
    after the report is printed. So the report is flushed and the process ends
    with ``os._exit``, as ``forksafe check`` is done. Only then: a normal exit
    runs the modules' ``atexit`` handlers, which ``os._exit`` skips.
    """
    import threading

    main = threading.main_thread()
    if not any(t is not main and not t.daemon and t.is_alive() for t in threading.enumerate()):
        return code
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed or broken stream: nothing more can be said there
            continue
    os._exit(code)


def check_json(report: Report) -> dict[str, Any]:
    """A fork-like entry of the report format (docs/report-format.md) without child data:
    what forking now would meet."""
    from forksafe._report import SCHEMA

    data = {"schema": SCHEMA, "command": ["forksafe", *sys.argv[1:]],
            "mechanism": "check", "site": None, "action": "allowed"}
    data.update(report.to_dict())
    return data


def _import(module: str) -> None:
    import importlib

    try:
        importlib.import_module(module)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise UsageError(IMPORT_FAILED.format(module=module, error=what)) from exc
