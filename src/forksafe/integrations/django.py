"""forksafe in Django's test runner: ``manage.py test --parallel`` with the guard on.

::

    # settings.py
    TEST_RUNNER = "forksafe.integrations.django.DiscoverRunner"
    FORKSAFE = {"policy": "warn", "hang_timeout": 10}   # optional; these are the defaults

``DiscoverRunner`` is Django's own runner with the guard installed around the run
(and the previous state restored after it): every fork of the parallel runner's
workers is checked, a hazardous one is a ``ForkSafetyWarning`` in the test output
(policy "warn") or refused (policy "raise", with ``"fail_on"``), and a worker that
hangs in a wait its fork explains is ended after ``hang_timeout`` seconds: forksafe
then fails the test that worker was running with the diagnosis, and the run goes on
in the replacement worker (``forksafe._unstick``), ending ``FAILED (errors=1)``
instead of never. ``--forksafe-policy`` and ``--forksafe-hang-timeout`` override the
setting for one run (``--forksafe-policy off``: Django's runner as it is).

The runner is imported after Django has loaded the apps, so threads started while
the apps load have no known origin in the report; ``forksafe.observe()`` at the top of
``settings.py`` (cheap: it wraps ``Thread.start`` and ``sqlite3.connect``) names the
line that started each.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Django's runner; Django ships no type information, so it is Any here.
_django_runner: Any = importlib.import_module("django.test.runner")

DEFAULTS: dict[str, Any] = {"policy": "warn", "hang_timeout": 10.0, "fail_on": "error"}
SETTING = "FORKSAFE"
POLICIES = ("log", "warn", "raise", "off")


class DiscoverRunner(_django_runner.DiscoverRunner):  # type: ignore[misc,unused-ignore]
    """Django's ``DiscoverRunner``, run with forksafe's guard (see the module docstring)."""

    def __init__(self, *args: Any, forksafe_policy: str | None = None,
                 forksafe_hang_timeout: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.forksafe = settings(forksafe_policy, forksafe_hang_timeout)

    @classmethod
    def add_arguments(cls, parser: Any) -> None:
        super().add_arguments(parser)
        parser.add_argument(
            "--forksafe-policy", choices=POLICIES, default=None,
            help="forksafe's policy for this run's forks (default: the FORKSAFE setting's, "
                 "else warn; off: no guard)")
        parser.add_argument(
            "--forksafe-hang-timeout", type=float, default=None, metavar="SECONDS",
            help="end a forked worker that makes no progress for this long in a wait its "
                 "fork explains, and fail its test with the diagnosis (default 10)")

    def run_tests(self, test_labels: Any, *args: Any, **kwargs: Any) -> Any:
        options = self.forksafe
        if options["policy"] == "off":
            return super().run_tests(test_labels, *args, **kwargs)
        from forksafe._guard import guard

        with guard(options["policy"], fail_on=options["fail_on"],
                   hang_timeout=options["hang_timeout"]):
            return super().run_tests(test_labels, *args, **kwargs)


def settings(policy: str | None = None, hang_timeout: float | None = None) -> dict[str, Any]:
    """The runner's forksafe options: the command line's, else the ``FORKSAFE``
    setting's, else ``DEFAULTS``; checked now, so that a bad one stops the run before
    any test with the value named."""
    from forksafe._config import Config

    django_settings = importlib.import_module("django.conf").settings
    given = getattr(django_settings, SETTING, None) or {}
    if not isinstance(given, dict):
        raise ValueError(f"settings.{SETTING} must be a dict, not {type(given).__name__}")
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"settings.{SETTING}: unknown key(s) {', '.join(unknown)}; "
                         f"expected: {', '.join(DEFAULTS)}")
    options = {**DEFAULTS, **given}
    if policy is not None:
        options["policy"] = policy
    if hang_timeout is not None:
        options["hang_timeout"] = hang_timeout
    if options["policy"] != "off":
        Config.make(options["policy"], options["fail_on"], options["hang_timeout"], None)
    return options
