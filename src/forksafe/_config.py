"""The configuration contract: every ``FORKSAFE_*`` name, and the one path that validates.

Three doors lead to a configuration of the guard, and all go through ``make``:

* ``install()`` / ``guard()`` arguments (``ARGUMENTS``): a bad value raises
  ``ValueError``;
* the environment (``ENVIRONMENT``), read by the ``.pth`` hook at the start of
  every interpreter of a guarded tree (``from_environment``): a bad value is one
  line on stderr, and the program runs on with that setting at its default (or
  unguarded, for a bad policy);
* ``forksafe run``'s options (``OPTIONS``), which become the environment of its
  tree (``tree_environment``).

Errors name the value as the user wrote it: ``policy=``, ``FORKSAFE_POLICY``,
``--policy``. The other variables here are forksafe's own, set by ``forksafe
run`` for its tree.

Cheap to import (nothing beyond ``os``): the hook imports it at every start.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing is not imported at every interpreter start for this
if TYPE_CHECKING:
    from typing import Mapping, MutableMapping

#: What the guard does at a hazardous fork; "off" (environment only) installs nothing.
ENV_POLICY = "FORKSAFE_POLICY"
#: A JSON-lines file that gets one line per fork event and child outcome.
ENV_REPORT = "FORKSAFE_REPORT"
#: Seconds: report (and end) a forked child that makes no progress for that long.
ENV_HANG_TIMEOUT = "FORKSAFE_HANG_TIMEOUT"
#: The level policy "raise" refuses at: "warning" or "error".
ENV_FAIL_ON = "FORKSAFE_FAIL_ON"
#: Accepted hazards, with their reasons (``forksafe._accept``'s text form, ``;``-separated).
ENV_ACCEPT = "FORKSAFE_ACCEPT"
#: Set by ``forksafe run``: the private directory where children leave crash files.
ENV_STATE_DIR = "FORKSAFE_STATE_DIR"
#: Set by ``forksafe run`` to its pid: it watches the whole tree for hangs itself, so
#: processes under it start no hang helper of their own.
ENV_SUPERVISOR = "FORKSAFE_SUPERVISOR"
#: Set for the hang helper only: its first process exits at once (see ``forksafe._helper``).
ENV_HELPER_DETACH = "FORKSAFE_HELPER_DETACH"

#: The variables that ask for the guard, in the order the README lists them: the
#: ``.pth`` hook looks at exactly these (``FORKSAFE_ACCEPT`` alone asks for nothing).
USER_VARIABLES = (ENV_POLICY, ENV_REPORT, ENV_HANG_TIMEOUT, ENV_FAIL_ON)

POLICIES = ("log", "warn", "raise")
FAIL_ON = ("warning", "error")
#: ``fail_on`` as a severity value (``forksafe._report.Severity``): no enum imported here.
LEVELS = {"warning": 20, "error": 30}

BAD_CHOICE = "{name}={value!r}: expected one of: {choices}"
BAD_SECONDS = "{name}={value!r} is not a finite positive number of seconds"
IGNORED = "forksafe: ignoring {problem}; {consequence}"
#: ``FORKSAFE_FAIL_ON`` without a policy: it is ``raise``'s threshold, and nothing raises.
FAIL_ON_ALONE = "{name}={value!r}: it only applies with {policy}=raise, which is not set"
#: What the environment hook does instead of a bad value.
CONSEQUENCES = {
    "policy": "the fork guard is off in this process",
    "fail_on": "using error",
    "hang_timeout": "hung children are not watched in this process",
    "fail_on_alone": "the fork guard is off in this process",
    "fail_on_implied": "forks are only logged (policy log)",
}


class Source:
    """One door in (see the module docstring): how each setting is spelled there, and
    whether its values arrive as text to parse."""

    __slots__ = ("blank", "names", "off", "text")

    def __init__(self, names: dict[str, str], *, text: bool, off: bool = False,
                 blank: bool = True) -> None:
        self.names = names
        self.text = text
        self.off = off  # whether the policy "off" is accepted here
        # Whether a blank report name means "no report" (an unset variable reads as
        # ""), or is an error (``--report ''``: a file was asked for, and none named).
        self.blank = blank


ARGUMENTS = Source({"policy": "policy", "fail_on": "fail_on", "hang_timeout": "hang_timeout",
                    "report": "report"}, text=False)
ENVIRONMENT = Source({"policy": ENV_POLICY, "fail_on": ENV_FAIL_ON,
                      "hang_timeout": ENV_HANG_TIMEOUT, "report": ENV_REPORT},
                     text=True, off=True)
OPTIONS = Source({"policy": "--policy", "fail_on": "--fail-on",
                  "hang_timeout": "--hang-timeout", "report": "--report"}, text=True,
                 blank=False)


class ConfigError(ValueError):
    """A bad setting; the message names it as its source spells it. ``field`` says which."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


class Config:
    """The guard's configuration, validated (by ``make``). ``fail_on`` is a severity value."""

    __slots__ = ("fail_on", "hang_timeout", "policy", "report")

    def __init__(self, policy: str = "warn", fail_on: int = 30,
                 hang_timeout: float | None = None, report: str | None = None) -> None:
        self.policy = policy
        self.fail_on = fail_on
        self.hang_timeout = hang_timeout
        self.report = report

    @classmethod
    def make(cls, policy: object, fail_on: object = "error", hang_timeout: object = None,
             report: object = None, *, source: Source = ARGUMENTS) -> Config:
        """Validate settings from ``source``: a ``Config``, or ``ConfigError``."""
        return cls(_policy(policy, source), LEVELS[_fail_on(fail_on, source)],
                   _hang_timeout(hang_timeout, source), _report(report, source))

    def replace(self, **changes: object) -> Config:
        """A copy with some fields changed (already validated values)."""
        values = {name: getattr(self, name) for name in self.__slots__}
        values.update(changes)
        return Config(**values)

    def __repr__(self) -> str:
        return (f"Config(policy={self.policy!r}, fail_on={self.fail_on!r}, "
                f"hang_timeout={self.hang_timeout!r}, report={self.report!r})")


def validate(field: str, value: object, source: Source) -> object:
    """One setting (``policy``, ``fail_on``, ``hang_timeout``, ``report``) checked as
    ``Config.make`` checks it: its value (``fail_on`` as its name), or ``ConfigError``."""
    return {"policy": _policy, "fail_on": _fail_on, "hang_timeout": _hang_timeout,
            "report": _report}[field](value, source)


def _policy(value: object, source: Source) -> str:
    text = value.strip().lower() if source.text and isinstance(value, str) else value
    if not isinstance(text, str) or text not in POLICIES:
        choices = ", ".join((*POLICIES, "off") if source.off else POLICIES)
        raise ConfigError(_problem(source, "policy", value, choices), "policy")
    return text


def _fail_on(value: object, source: Source) -> str:
    text = value.strip().lower() if source.text and isinstance(value, str) else value
    if not isinstance(text, str) or text not in FAIL_ON:
        raise ConfigError(_problem(source, "fail_on", value, ", ".join(FAIL_ON)), "fail_on")
    return text


def _hang_timeout(value: object, source: Source) -> float | None:
    if value is None or (source.text and isinstance(value, str) and not value.strip()):
        return None
    seconds: object = value
    if source.text and isinstance(value, str):
        try:
            seconds = float(value)
        except ValueError:
            seconds = None
    ok = isinstance(seconds, (int, float)) and not isinstance(seconds, bool)
    if not ok or not 0 < seconds < float("inf"):  # type: ignore[operator]
        name = source.names["hang_timeout"]
        raise ConfigError(BAD_SECONDS.format(name=name, value=shown(value)), "hang_timeout")
    return float(seconds)  # type: ignore[arg-type]


def _report(value: object, source: Source) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or (not source.blank and not value.strip()):
        raise ConfigError(f"{source.names['report']}={value!r} is not a file name", "report")
    return value.strip() or None if source.text else value or None


def _problem(source: Source, field: str, value: object, choices: str) -> str:
    return BAD_CHOICE.format(name=source.names[field], value=shown(value), choices=choices)


def shown(value: object) -> object:
    """A bad value as it is echoed (shortened: it came from outside, and goes to stderr)."""
    if isinstance(value, str) and len(value) > 40:
        return value[:37] + "..."
    return value


def from_environment(environ: Mapping[str, str]) -> tuple[Config | None, list[str]]:
    """The configuration the environment asks for (None: no guard), and the lines to say.

    Nothing is asked for unless ``FORKSAFE_POLICY``, ``FORKSAFE_REPORT`` or
    ``FORKSAFE_HANG_TIMEOUT`` is set; the latter two alone mean policy "log"
    (recording, or watching for hangs, was asked for: both need the guard, and
    "log" changes nothing the program sees). ``FORKSAFE_FAIL_ON`` only matters
    under policy "raise": set without ``FORKSAFE_POLICY`` it would be silently
    ignored, so it gets one line saying so. A bad value is dropped for its
    default, with one line saying so; a bad policy leaves the process unguarded.
    """
    policy = environ.get(ENV_POLICY, "").strip()
    report = environ.get(ENV_REPORT, "").strip() or None
    hang = environ.get(ENV_HANG_TIMEOUT, "").strip() or None
    fail_on = environ.get(ENV_FAIL_ON, "").strip()
    problems: list[str] = []
    if fail_on and not policy:
        problems.append(IGNORED.format(
            problem=FAIL_ON_ALONE.format(name=ENV_FAIL_ON, value=shown(fail_on),
                                         policy=ENV_POLICY),
            consequence=CONSEQUENCES["fail_on_alone"] if report is None and hang is None
            else CONSEQUENCES["fail_on_implied"]))
    if not policy and report is None and hang is None:
        return None, problems
    if policy.lower() == "off":
        return None, []
    values: dict[str, object] = {
        "policy": policy or "log",
        "fail_on": fail_on or "error",
        "hang_timeout": hang,
        "report": report,
    }
    while True:
        try:
            return Config.make(**values, source=ENVIRONMENT), problems
        except ConfigError as exc:
            problems.append(IGNORED.format(problem=exc, consequence=CONSEQUENCES[exc.field]))
            if exc.field == "policy" or (exc.field == "hang_timeout" and not policy
                                         and report is None):
                return None, problems  # nothing else asked for the guard
            values[exc.field] = {"fail_on": "error", "hang_timeout": None}[exc.field]


def tree_environment(base: Mapping[str, str], *, policy: str, hang_timeout: float | None,
                     report: str, state_dir: str, supervisor: int,
                     accept: str = "") -> dict[str, str]:
    """The environment of a ``forksafe run`` tree: ``base`` plus the guard's settings
    (``accept``: accept rules in their text form, added to those ``base`` has)."""
    env: MutableMapping[str, str] = dict(base)
    if accept:
        env[ENV_ACCEPT] = "; ".join(part for part in (env.get(ENV_ACCEPT, ""), accept) if part)
    env.update({
        ENV_POLICY: policy,
        ENV_REPORT: report,
        ENV_STATE_DIR: state_dir,
        ENV_SUPERVISOR: str(supervisor),
    })
    env.pop(ENV_HANG_TIMEOUT, None)
    if hang_timeout is not None:
        env[ENV_HANG_TIMEOUT] = repr(hang_timeout)
    return dict(env)


def state_dir_override(environ: Mapping[str, str] | None = None) -> str | None:
    """The state directory ``forksafe run`` set for this tree, if any."""
    return (os.environ if environ is None else environ).get(ENV_STATE_DIR) or None


def supervisor(environ: Mapping[str, str] | None = None) -> int | None:
    """The pid of the ``forksafe run`` that watches this tree, if any."""
    value = (os.environ if environ is None else environ).get(ENV_SUPERVISOR, "")
    return int(value) if value.isdigit() else None
