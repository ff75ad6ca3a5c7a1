"""forksafe's pytest plugin: every fork of a test suite guarded, and the polluter named.

A test suite is where most people meet a fork hang: a test run that never ends,
because one test left a thread holding a lock behind and a later test forked a
child that needed that lock. ``pytest --forksafe`` (a ``pytest11`` entry point,
inactive unless asked) installs the guard for the session, and:

* labels what the session is doing — each test phase, fixture set-up, module
  import at collection (``forksafe._labels``) — so that every hazard at an unsafe
  fork names the test during which its thread was started, its connection
  opened, its runtime became active (``forksafe._attribution``): "thread
  'refresher' (started at test_a.py:9 during tests/test_a.py::test_y)";
* with ``--forksafe-hang-timeout``, fails the test during which a forked child
  was found hung (the hang monitor ended it) with the diagnosis, where the
  session would otherwise wait forever; the rest of the session goes on;
* gathers the forks of every test (``forksafe._suite``), from pytest-xdist's
  workers too, into a ``forksafe`` section of the terminal summary and, with
  ``--forksafe-report``, a JSON report;
* offers the ``@pytest.mark.forksafe(policy=..., hang_timeout=...)`` marker and
  the ``forksafety`` fixture (``with forksafety.assert_safe(): ...``).

Importing this module costs what importing pytest's own hooks costs: forksafe's
machinery is imported when the plugin is asked for. A failure of forksafe's own
is said once and the session goes on without that part. docs/pytest.md tells
the whole of it.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import TYPE_CHECKING, Any, Iterator

import pytest

from forksafe._pytest_session import (
    BARE,
    PROBLEM,
    START_UP,
    Session,
    Settings,
    rules,
    say,
    settings,
)

if TYPE_CHECKING:
    from forksafe._config import Config
    from forksafe._report import ForkEvent, Report
    from forksafe._suite import Step, SuiteForks

#: Labels of the steps that are no test (``forksafe._labels``).
INITIAL_CONFTESTS = "start-up (initial conftest.py import)"
SESSION_END = "session finish"
#: The marker, as ``--strict-markers`` wants it registered.
MARKER = ("forksafe(policy=None, hang_timeout=..., fail_on=None): guard this test's forks "
          "with this policy (log, warn, raise) and hang timeout, whatever the session's "
          "(see forksafe's docs/pytest.md)")


# -- options and settings --------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("forksafe", "fork safety (forksafe)")
    group.addoption(
        "--forksafe", dest="forksafe", nargs="?", const=BARE, default=None, metavar="POLICY",
        help="guard every fork of the tests: 'log' records, 'warn' (a bare --forksafe) also "
             "warns, 'raise' refuses hazardous forks; 'off' overrides the ini. "
             "Write --forksafe=POLICY before paths.")
    group.addoption(
        "--forksafe-hang-timeout", dest="forksafe_hang_timeout", default=None,
        metavar="SECONDS",
        help="end a forked child that hangs for SECONDS and fail the test it hung in, with "
             "the diagnosis (implies --forksafe=log when given alone)")
    group.addoption(
        "--forksafe-report", dest="forksafe_report", default=None, metavar="FILE",
        help="write the session's forks to FILE as a JSON report (docs/report-format.md; "
             "implies --forksafe=log when given alone)")
    parser.addini("forksafe", "forksafe's policy for every fork of the tests: log, warn, "
                  "raise, or off (the default)", default="")
    parser.addini("forksafe_hang_timeout", "forksafe: seconds after which a hung forked "
                  "child is ended and its test failed", default="")
    parser.addini("forksafe_accept", "forksafe: accepted hazards, one rule a line: "
                  "KIND[/FIELD=GLOB]...: REASON", type="linelist", default=[])


# -- the session, in this process --------------------------------------------------------------

_STATE = pytest.StashKey["Session"]()
_SUITE = pytest.StashKey["SuiteForks"]()
_TRIED = pytest.StashKey[bool]()


def _activate(config: pytest.Config, namespace: Any) -> None:
    """Start forksafe in this process if the session asks for it (once: a start that
    failed, and said so, is not tried again by the next hook)."""
    if _STATE in config.stash or _TRIED in config.stash:
        return
    chosen = settings(config, namespace)
    config.stash[_TRIED] = True
    if chosen.policy is None:
        return
    _start(config, chosen)


def _start(config: pytest.Config, chosen: Settings) -> None:
    state = Session(config, chosen)
    try:
        state.start()
    except Exception as exc:  # never the host's problem: the session goes on without us
        say(config, PROBLEM.format(what="starting", error=f"{type(exc).__name__}: {exc}"))
        state.guarded("restoring the process", state.stop)
        return
    config.stash[_STATE] = state
    config.pluginmanager.register(_Tracker(state), "forksafe-tracker")


# -- hooks of the plugin module: always registered, inert unless asked -----------------------


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser: pytest.Parser,
                                  args: list[str]) -> Iterator[None]:
    """As early as a plugin can: threads started by the initial conftests are labelled."""
    _activate(early_config, early_config.known_args_namespace)
    from_here = _STATE in early_config.stash
    previous = _during(INITIAL_CONFTESTS) if from_here else None
    yield
    if from_here:
        _during(previous or START_UP)


def _during(label: str | None) -> str | None:
    from forksafe._labels import set_during

    return set_during(label)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER)
    _activate(config, config.option)  # a plugin loaded too late for the hook above
    if not hasattr(config, "workerinput"):
        gatherer = _Gatherer(config)
        config.pluginmanager.register(gatherer, "forksafe-gatherer")
        if _STATE in config.stash:
            gatherer.suite()


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(_STATE, None)
    if state is not None:
        state.guarded("restoring the process", state.stop)
        del config.stash[_STATE]


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    """A marked test asks for forksafe in an otherwise unguarded session: from here on,
    forks are labelled and followed; the guard itself is on only in marked tests."""
    marked = any(i.get_closest_marker("forksafe") for i in items)
    if _STATE not in config.stash and marked:
        _start(config, Settings(None, settings(config, config.option).hang_timeout, None,
                                rules(config)))
    state = config.stash.get(_STATE, None)
    if state is not None:
        state.marked = marked
        if marked and not config.pluginmanager.has_plugin("forksafe-marker-check"):
            config.pluginmanager.register(_MarkerCheck(), "forksafe-marker-check")


class _Gatherer:
    """Gathers each step's forks where the session is reported: in this process, or,
    with pytest-xdist, in the controller, from its workers' reports (it learns only from
    them that a worker ran forksafe: it collects no test itself). Registered for every
    session: a dictionary look-up per report is all it costs one without forksafe."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    def suite(self) -> SuiteForks:
        suite = self.config.stash.get(_SUITE, None)
        if suite is None:
            from forksafe._suite import SuiteForks

            suite = self.config.stash[_SUITE] = SuiteForks()
        return suite

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        payload = report.__dict__.get("forksafe")
        if payload is not None:
            self.suite().add(payload, report.nodeid)

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: object) -> None:
        """An xdist worker is done: the forks of its steps that were no test."""
        output = getattr(node, "workeroutput", None)
        items = output.get("forksafe") if isinstance(output, dict) else None
        for item in items if isinstance(items, list) else ():
            if isinstance(item, list) and len(item) == 2:
                self.suite().add(item[1], str(item[0]), is_test=False)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    state = config.stash.get(_STATE, None)
    if state is not None:
        step = state.step("", "session", SESSION_END)
        payload = step.payload() if step is not None else None
        if payload is not None:
            state.outside.append(("", payload))
        if hasattr(config, "workerinput"):
            config.workeroutput["forksafe"] = [list(i) for i in state.outside]  # type: ignore[attr-defined]
        else:
            suite = config.stash.get(_SUITE, None)
            for test, item in state.outside:
                if suite is not None:
                    suite.add(item, test, is_test=False)
            state.outside.clear()
    suite = config.stash.get(_SUITE, None)
    if suite is None or hasattr(config, "workerinput"):
        return
    path = state.settings.report if state is not None else None
    if path is not None and state is not None:
        state.guarded("writing the JSON report", _write_report, config, suite, path,
                      int(exitstatus))


def _write_report(config: pytest.Config, suite: SuiteForks, path: str, exit_code: int) -> None:
    command = ["pytest", *config.invocation_params.args]
    data = suite.report(command, exit_code)
    directory = os.path.dirname(path) or "."
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, default=str)
            f.write("\n")
        os.replace(temporary, path)
        config.stash[_WRITTEN] = path
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        config.stash[_WRITTEN] = f"not written ({exc.strerror or exc}): {path}"


_WRITTEN = pytest.StashKey[str]()


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int,
                            config: pytest.Config) -> None:
    suite = config.stash.get(_SUITE, None)
    if suite is None:
        return
    try:
        _summary(terminalreporter, config, suite)
    except Exception as exc:  # the session's own summary above is what matters
        say(config, PROBLEM.format(what="the summary", error=f"{type(exc).__name__}: {exc}"))


def _summary(terminalreporter: Any, config: pytest.Config, suite: SuiteForks) -> None:
    from forksafe._render.suite import summary

    state = config.stash.get(_STATE, None)
    chosen = state.settings if state is not None else None
    troubled = suite.events(suite.hazardous())
    lines = summary(troubled, settings=chosen.text() if chosen else "tests marked forksafe",
                    total=suite.forks, tests=len(suite.tests), omitted=suite.omitted)
    written = config.stash.get(_WRITTEN, None)
    if written is not None:
        lines.append("")
        lines.append(f"JSON report: {written}")
    hung = any(e.outcome is not None and e.outcome.status == "hung" for e, _, _ in troubled)
    terminalreporter.write_sep("-", "forksafe")
    for i, line in enumerate(lines):
        terminalreporter.write_line(line, red=hung and i == 0,
                                    yellow=bool(troubled) and not hung and i == 0)


# -- per test: registered only while forksafe is on -------------------------------------------


class _Tracker:
    """The hooks that run for every test, registered only when the session asked for
    forksafe: an unguarded session pays nothing per test."""

    def __init__(self, state: Session) -> None:
        from forksafe._labels import set_during

        self.state = state
        self.during = set_during

    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_make_collect_report(self, collector: pytest.Collector) -> Iterator[None]:
        nodeid = collector.nodeid or "."
        label = f"import of {nodeid}" if isinstance(collector, pytest.Module) else (
            f"collection of {nodeid}")
        previous = self.during(label)
        yield
        self.during(previous)
        step = self.state.step(nodeid, "collect", label, last=True)
        payload = step.payload() if step is not None else None
        if payload is not None and payload["records"]:
            self.state.outside.append((nodeid, payload))

    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: object) -> Iterator[None]:
        state = self.state
        state.current = item.nodeid
        if state.marked:
            problem = state.guarded("applying the forksafe marker", state.apply_marker, item)
            if problem:
                item.stash[_MARKER_PROBLEM] = problem
        self.during(f"setup of {item.nodeid}")
        try:
            yield
        finally:
            if state.marked:
                state.guarded("restoring after the forksafe marker", state.restore_marked)
            state.current = ""
            self.during(SESSION_END if nextitem is None else "between tests")

    # The phases follow each other: each plain hook labels the phase it starts (cheaper,
    # test after test, than wrappers that would put the previous label back).

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_call(self, item: pytest.Item) -> None:
        self.during(item.nodeid)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> None:
        self.during(f"teardown of {item.nodeid}")

    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_fixture_setup(self, fixturedef: Any, request: Any) -> Iterator[None]:
        scope = str(getattr(fixturedef, "scope", "function"))
        kind = "fixture" if scope == "function" else f"{scope}-scoped fixture"
        test = self.state.current
        label = f"{kind} {fixturedef.argname!r}" + (f" (set up for {test})" if test else "")
        previous = self.during(label)
        yield
        self.during(previous)

    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]
                                  ) -> Iterator[None]:
        """Each phase's forks, on its report before anyone sees it (the session's count of
        failures, the terminal, xdist's worker sending it on); a test whose phase found a
        child hung fails."""
        outcome = yield
        report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
        when = call.when
        test = item.nodeid
        step = self.state.step(test, when, test if when == "call" else f"{when} of {test}",
                               last=when == "teardown")
        if step is None:
            return
        payload = step.payload()
        if payload is not None:
            report.forksafe = payload  # type: ignore[attr-defined]
        if step.hung or step.outcomes:
            self.state.guarded("reporting the fate of children", _fates, self.state, report,
                               step)


_MARKER_PROBLEM = pytest.StashKey[str]()


class _MarkerCheck:
    """A test whose ``forksafe`` marker cannot be applied fails its set-up with the
    reason, before any fixture runs (a plain hook: a wrapper that raises would keep
    pytest's own wrappers from setting up)."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        problem = item.stash.get(_MARKER_PROBLEM, None)
        if problem:
            pytest.fail(problem, pytrace=False)


def _fates(state: Session, report: pytest.TestReport, step: Step) -> None:
    """Fail the test in whose step a child was found hung (the hang monitor ended it),
    with the diagnosis; say in the report what else became of children."""
    from forksafe._render.suite import fates_section, hung_failure
    from forksafe._report import ForkEvent
    from forksafe._suite import noteworthy

    config = _installed_config()
    timeout = config.hang_timeout if config is not None else state.settings.hang_timeout
    texts = []
    hung_pids = set()
    for entry in step.hung:
        event = ForkEvent.from_dict(entry)
        hung_pids.add(event.child_pid)
        texts.append(hung_failure(event, forked_in=str(entry.get("test", "")), timeout=timeout,
                                  this_test=report.nodeid))
    others = []
    for late in step.outcomes:
        if late.get("child_pid") in hung_pids or not noteworthy(late.get("outcome")):
            continue
        earlier = _event_for(late)
        if earlier is not None:
            others.append((earlier, str(late.get("test", ""))))
    if others:
        report.sections.append(("forksafe: children of earlier tests", fates_section(others)))
    if not texts:
        return
    text = "\n\n".join(texts)
    if report.passed and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = text
    else:
        report.sections.append(("forksafe: a child hung", text))


def _event_for(late: dict[str, Any]) -> ForkEvent | None:
    from forksafe import _guard

    pid = late.get("child_pid")
    return _guard.event_for_child(pid) if isinstance(pid, int) else None


def _installed_config() -> Config | None:
    from forksafe import _guard

    return _guard.installed()


# -- the fixture --------------------------------------------------------------------------------


class ForkSafety:
    """The ``forksafety`` fixture: assert that a block forks safely, or look at this
    test's forks. Works whether or not the session runs with ``--forksafe``."""

    def __init__(self, nodeid: str) -> None:
        from forksafe._suite import mark_now

        self.nodeid = nodeid
        self._mark = mark_now()

    @contextlib.contextmanager
    def assert_safe(self, *, fail_on: str = "warning",
                    hang_timeout: float | None = None) -> Iterator[None]:
        """Every fork in the block must be safe: no hazard at ``fail_on`` or above (after
        the accept rules), no child that hung or crashed (by the end of the block).

        The guard as the session installed it stays (a refusal under ``raise`` ends the
        block with its ``ForkSafetyError``); without one, the block is guarded with
        policy ``log``. The test fails with what each unsafe fork met.
        """
        from forksafe import _config, _guard
        from forksafe._render.suite import unsafe_block
        from forksafe._report import Severity
        from forksafe._suite import events_since, mark_now, unsafe

        level = Severity(_config.LEVELS[str(_config.validate("fail_on", fail_on,
                                                              _config.ARGUMENTS))])
        if hang_timeout is not None:
            _config.validate("hang_timeout", hang_timeout, _config.ARGUMENTS)
        base = _guard.installed()
        config = (base or _config.Config.make("log")).replace(
            hang_timeout=hang_timeout if hang_timeout is not None else (
                base.hang_timeout if base is not None else None))
        _guard.apply(config)
        mark = mark_now()
        try:
            yield
        finally:
            if base is None:
                _guard.uninstall()
            else:
                _guard.apply(base)
        bad = unsafe(events_since(mark), level)
        if bad:
            pytest.fail(unsafe_block(bad, str(level)), pytrace=False)

    def check(self) -> Report:
        """What a fork now would meet (``forksafe.check()``), with the labels that name
        the tests that started each thread."""
        from forksafe._check import check

        return check()

    @property
    def forks(self) -> list[ForkEvent]:
        """This test's forks so far (seen by the guard), oldest first."""
        from forksafe._suite import events_since

        return list(events_since(self._mark))


@pytest.fixture
def forksafety(request: pytest.FixtureRequest) -> ForkSafety:
    """Assert that a block forks safely: ``with forksafety.assert_safe(): ...``."""
    return ForkSafety(request.node.nodeid)
