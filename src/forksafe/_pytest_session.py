"""forksafe in one pytest process: the session's settings, and what it installs and undoes.

``forksafe.pytest_plugin`` holds the hooks; this module holds what they act on.
``settings`` reads the options, the ini file and the accept rules, and turns a bad
value into pytest's one-line usage error. ``Session`` starts forksafe in the
process (observation, the labels of ``forksafe._labels``, the accept rules, the
guard with the session's policy), takes each step's forks (``forksafe._suite``),
applies a test's ``forksafe`` marker for that test only, and undoes all of it by
identity at the end: pytester runs sessions inside a session, and what the outer
one had installed (perhaps the environment hook's guard) must come back as it was.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from forksafe._accept import Rule
    from forksafe._config import Config
    from forksafe._suite import ForkLog, Step

#: The bare ``--forksafe``.
BARE = "warn"
#: Labels of the steps that are no test (``forksafe._labels``).
START_UP = "pytest start-up"
#: When ``--forksafe`` took a path for its policy (``pytest --forksafe tests/``).
PATH_HINT = "a bare --forksafe takes the next word as its policy: write --forksafe=warn"
PROBLEM = "forksafe: {what} failed ({error}); the session goes on without it"
NO_TOML = "forksafe: {path}: [tool.forksafe] not read (neither tomllib nor tomli is available)"


class Settings:
    """What the session asked of forksafe, validated (``settings``)."""

    __slots__ = ("hang_timeout", "policy", "report", "rules")

    def __init__(self, policy: str | None, hang_timeout: float | None, report: str | None,
                 rules: list[Rule]) -> None:
        #: None: the session is not guarded (a marker may still guard a test).
        self.policy = policy
        self.hang_timeout = hang_timeout
        self.report = report
        self.rules = rules

    def text(self) -> str:
        if self.policy is None:
            return "tests marked forksafe only"
        timeout = (f", hang timeout {self.hang_timeout:g} s"
                   if self.hang_timeout is not None else "")
        return f"policy {self.policy}{timeout}"


def settings(config: pytest.Config, namespace: Any) -> Settings:
    """The session's settings from the command line (``namespace``) and the ini file;
    ``pytest.UsageError`` (one line) for a bad value."""
    from forksafe import _config

    option = _config.Source({"policy": "--forksafe", "hang_timeout": "--forksafe-hang-timeout",
                             "fail_on": "-", "report": "--forksafe-report"},
                            text=True, off=True, blank=False)
    ini = _config.Source({"policy": "forksafe (ini)", "hang_timeout":
                          "forksafe_hang_timeout (ini)", "fail_on": "-", "report": "-"},
                         text=True, off=True)
    policy_opt = getattr(namespace, "forksafe", None)
    timeout_opt = getattr(namespace, "forksafe_hang_timeout", None)
    report = getattr(namespace, "forksafe_report", None)
    try:
        if policy_opt is not None:
            policy = _policy(policy_opt, option, hint=PATH_HINT)
        elif str(config.getini("forksafe")).strip():
            policy = _policy(config.getini("forksafe"), ini)
        elif timeout_opt is not None or report is not None:
            policy = "log"  # a hang timeout or a report asks for the guard; log says nothing
        else:
            policy = None
        timeout: Any = (_config.validate("hang_timeout", timeout_opt, option)
                        if timeout_opt is not None else
                        _config.validate("hang_timeout", config.getini("forksafe_hang_timeout"),
                                         ini))
        if report is not None:
            _config.validate("report", report, option)
            report = os.path.join(str(config.invocation_params.dir), report)
    except _config.ConfigError as exc:
        raise pytest.UsageError(f"forksafe: {exc}") from None
    return Settings(policy, timeout, report, rules(config) if policy is not None else [])


def _policy(value: object, source: Any, hint: str = "") -> str | None:
    from forksafe import _config

    if str(value).strip().lower() == "off":
        return None
    try:
        return str(_config.validate("policy", value, source))
    except _config.ConfigError as exc:
        text = str(value)
        if hint and ("::" in text or os.sep in text or text.endswith(".py")
                     or os.path.exists(text)):
            raise _config.ConfigError(f"{exc} ({hint})", exc.field) from None
        raise


def rules(config: pytest.Config) -> list[Rule]:
    """The accept rules: ``[tool.forksafe]`` of the nearest ``pyproject.toml`` (from the
    rootdir up), then the ``forksafe_accept`` ini lines."""
    from forksafe import _accept

    rules: list[Rule] = []
    try:
        path = _accept.find_pyproject(str(config.rootpath))
        if path is not None:
            if sys.version_info < (3, 11) and not _have_tomli():
                say(config, NO_TOML.format(path=path))
            else:
                rules.extend(_accept.project_rules(path))
        for line in config.getini("forksafe_accept"):
            rules.extend(_accept.parse(str(line), "forksafe_accept (ini)"))
    except _accept.AcceptError as exc:
        raise pytest.UsageError(f"forksafe: {exc}") from None
    return rules


def _have_tomli() -> bool:
    import importlib.util

    return importlib.util.find_spec("tomli") is not None


class Session:
    """forksafe in this process for this session: the guard it installed (and what it
    replaced), the labels, the fork log; undone exactly by ``stop``."""

    def __init__(self, config: pytest.Config, chosen: Settings) -> None:
        self.config = config
        self.settings = chosen
        self.previous: Config | None = None
        self.installed = False
        self.observed = False
        self.log: ForkLog | None = None
        self.problems: set[str] = set()
        #: Payloads of steps that are no test (collection), for the session's gatherer.
        self.outside: list[tuple[str, dict[str, Any]]] = []
        #: The test whose protocol runs now ("" between tests).
        self.current = ""
        #: Whether any collected test carries the ``forksafe`` marker (else none is looked
        #: for, test by test).
        self.marked = False
        self._accepted: list[Rule] = []
        self._marked: Config | None = None
        self._label: str | None = None
        self._recording = False
        #: Whether the ``forksafe`` logger was disabled before the session (``start``).
        self._disabled: bool | None = None

    def start(self) -> None:
        """Observe, label, and (with a policy) install the guard for the session."""
        from forksafe import _accept, _guard, _labels, _ledger
        from forksafe._attribution import RuntimeWatch
        from forksafe._suite import ForkLog

        if not _ledger.observing():
            _ledger.observe()
            self.observed = True
        _labels.record_connections(True)
        self._recording = True
        self._label = _labels.set_during(START_UP)
        self._accepted = list(self.settings.rules)
        if self._accepted:
            _accept.add(self._accepted)
        self.previous = _guard.installed()
        if self.settings.policy is not None:
            _guard.apply(self.session_config())
            self.installed = True
        watch = RuntimeWatch()
        self.log = ForkLog(watch)
        self.guarded("noting active runtimes", watch.note, START_UP)
        # The session tells each fork and outcome itself, at the test they belong to;
        # the same records through pytest's log capture (which also hooks loggers that
        # do not propagate) would tell it all twice more: none is made meanwhile.
        import logging

        quiet = logging.getLogger("forksafe")
        self._disabled = quiet.disabled
        quiet.disabled = True

    def session_config(self) -> Config:
        from forksafe._config import Config

        previous = self.previous
        return Config.make(self.settings.policy or "log",
                           "warning" if previous is not None and previous.fail_on <= 20
                           else "error",
                           self.settings.hang_timeout,
                           previous.report if previous is not None else None)

    def stop(self) -> None:
        from forksafe import _accept, _guard, _labels, _ledger

        if self._disabled is not None:
            import logging

            logging.getLogger("forksafe").disabled = self._disabled
            self._disabled = None
        self.restore_marked()
        if self.installed:
            if self.previous is None:
                _guard.uninstall()
            else:
                _guard.apply(self.previous)
            self.installed = False
        if self._accepted:
            mine = {id(rule) for rule in self._accepted}
            others = [rule for rule in _accept.rules() if id(rule) not in mine]
            _accept.clear()
            _accept.add(others)
            self._accepted = []
        if self._recording:
            _labels.set_during(self._label)  # an outer session's, when sessions nest
            _labels.record_connections(False)
            self._recording = False
        if self.observed:
            _ledger.unobserve()
            self.observed = False

    def guarded(self, what: str, call: Any, *args: Any) -> Any:
        """``call(*args)``, or None when it fails: said once, never raised into pytest."""
        if what in self.problems:
            return None
        try:
            return call(*args)
        except Exception as exc:
            self.problems.add(what)
            say(self.config, PROBLEM.format(what=what, error=f"{type(exc).__name__}: {exc}"))
            return None

    def step(self, test: str, phase: str, label: str, *, last: bool = False) -> Step | None:
        """The forks of the step ``label`` that has just ended (``forksafe._suite``); None
        when it forked nothing and no child's fate is awaited, the usual case.

        What became active natively is looked at (``forksafe._attribution``) when the step
        forked, so that its forks' runtimes are labelled, and at the ``last`` step of a
        test, labelled with the test: a runtime started in a test that does not fork is
        named by that test (a look per test, not per step, is what it costs).
        """
        log = self.log
        if log is None:
            return None
        pending = self.guarded("following the forks of tests", log.pending)
        if log.watch is not None and (pending or last):
            self.guarded("noting active runtimes", log.watch.note, test if last else label)
        if not pending:
            return None
        step: Step | None = self.guarded("following the forks of tests", log.take, test, phase)
        return step

    # -- a marker's settings, for one test ----------------------------------------------

    def apply_marker(self, item: pytest.Item) -> str | None:
        """Guard ``item`` as its ``forksafe`` marker says; the problem, if it cannot."""
        marker = item.get_closest_marker("forksafe")
        if marker is None:
            return None
        from forksafe import _config, _guard

        source = _config.Source({"policy": "policy", "hang_timeout": "hang_timeout",
                                 "fail_on": "fail_on", "report": "report"}, text=True)
        kwargs = dict(marker.kwargs)
        if marker.args:
            kwargs.setdefault("policy", marker.args[0])
        unknown = set(kwargs) - {"policy", "hang_timeout", "fail_on"}
        if unknown:
            return (f"forksafe marker: unknown argument(s) {', '.join(sorted(unknown))}; "
                    "expected policy=, hang_timeout=, fail_on=")
        base = _guard.installed()
        try:
            config = _config.Config.make(
                kwargs.get("policy", base.policy if base is not None else BARE),
                kwargs.get("fail_on", "warning" if base is not None and base.fail_on <= 20
                           else "error"),
                kwargs.get("hang_timeout", base.hang_timeout if base is not None
                           else self.settings.hang_timeout),
                base.report if base is not None else None, source=source)
        except _config.ConfigError as exc:
            return f"forksafe marker: {exc}"
        self._marked = base if base is not None else _NOT_INSTALLED
        _guard.apply(config)
        return None

    def restore_marked(self) -> None:
        previous, self._marked = self._marked, None
        if previous is None:
            return
        from forksafe import _guard

        if previous is _NOT_INSTALLED:
            _guard.uninstall()
        else:
            _guard.apply(previous)


#: Stands for "the guard was not installed" where None means "nothing to restore".
_NOT_INSTALLED: Any = object()


def say(config: pytest.Config, line: str) -> None:
    """One line on the terminal (or stderr before there is one)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(line, yellow=True)
    else:
        sys.stderr.write(line + "\n")
