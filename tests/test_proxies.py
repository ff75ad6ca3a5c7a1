"""getproxies()/proxy_bypass(): urllib's answers, system settings read in a helper process."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from typing import Iterator

import pytest

import forksafe
from conftest import run_scenario
from forksafe._interpreter import FROZEN, NOT_PYTHON, interpreter_problem
from forksafe._remedies import proxies
from forksafe._remedies.proxies import (
    EXITED,
    HELPER,
    HELPER_FAILED,
    NOT_STARTED,
    TIMED_OUT,
    UNUSABLE,
    getproxies,
    proxy_bypass,
)

PROXY_VARS = ("http_proxy", "https_proxy", "ftp_proxy", "no_proxy", "all_proxy",
              "HTTP_PROXY", "HTTPS_PROXY", "FTP_PROXY", "NO_PROXY", "ALL_PROXY",
              "REQUEST_METHOD")

FAKE_SCPROXY = '''
import os
def _record():
    with open(os.path.join(os.path.dirname(__file__), "calls.txt"), "a") as f:
        f.write("%d\\n" % os.getpid())
def _get_proxies():
    _record()
    return {"http": "http://proxy.example:3128", "https": "http://proxy.example:3129"}
def _get_proxy_settings():
    return {"exclude_simple": True, "exceptions": ["*.internal", "10.0.0.0/8"]}
'''


@pytest.fixture(autouse=True)
def clean(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No proxy variables from the machine, and an empty helper cache, for every test."""
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    proxies._cache.clear()
    yield
    proxies._cache.clear()
    proxies.unpatch_urllib()


def fake_darwin(tmp_path: pathlib.Path) -> tuple[pathlib.Path, list[str]]:
    """A directory with a fake _scproxy, and the real helper command that uses it."""
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "_scproxy.py").write_text(FAKE_SCPROXY)
    return fake, [sys.executable, "-I", HELPER, "--platform", "darwin", "--path", str(fake)]


@pytest.mark.parametrize("env", [
    {},
    {"http_proxy": "http://p:1", "no_proxy": "localhost,.corp.example,10.1.2.3"},
    {"HTTPS_PROXY": "http://p:2", "NO_PROXY": "*"},
    {"all_proxy": "socks5://p:3", "no_proxy": "example.org:8080"},
])
def test_environment_answers_are_urllibs(monkeypatch: pytest.MonkeyPatch,
                                         env: dict[str, str]) -> None:
    """With the proxy variables alone, both functions answer exactly as urllib does."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert getproxies() == urllib.request.getproxies()
    for host in ("localhost", "www.corp.example", "corp.example", "10.1.2.3", "example.org",
                 "example.org:8080", "python.org"):
        assert proxy_bypass(host) == bool(urllib.request.proxy_bypass(host)), host
    assert proxies._cache == {}  # on Linux urllib reads nothing else: no helper ran


def test_helper_reads_system_settings_out_of_process(tmp_path: pathlib.Path) -> None:
    """Forced onto the macOS path, the real helper reads _scproxy once; the parent never does."""
    fake, command = fake_darwin(tmp_path)
    s = run_scenario(f"""
        import os, sys, forksafe
        sys.path.insert(0, {str(fake)!r})  # importing _scproxy here would succeed and show
        from forksafe._remedies.proxies import Lookup
        lookup = Lookup(platform="darwin", helper={command!r})
        python_forks = []  # Python-level fork hooks run for os.fork, not for fork+exec
        os.register_at_fork(before=lambda: python_forks.append(1))
        found = lookup.getproxies()
        bypass = {{h: lookup.proxy_bypass(h)
                   for h in ("db.internal", "intranet", "python.org")}}
        again = lookup.getproxies()
        forks_by_lookup = len(python_forks)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child uses the inherited answer: no helper, no framework
            os.write(w, repr(lookup.getproxies()).encode())
            os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            child = f.read()
        os.waitpid(pid, 0)
        os.environ["http_proxy"] = "http://env:1"
        env_wins = lookup.getproxies()
        with open({str(fake / "calls.txt")!r}) as f:
            callers = [int(line) for line in f]
        emit(found=found, bypass=bypass, same=again == found, child=child,
             env_wins=env_wins, callers=callers, parent=os.getpid(),
             imported="_scproxy" in sys.modules, forks_by_lookup=forks_by_lookup,
             forks_in_all=len(python_forks))
    """, tmp_path, timeout=30)
    expected = {"http": "http://proxy.example:3128", "https": "http://proxy.example:3129"}
    assert s.result["found"] == expected
    assert s.result["same"] is True
    assert s.result["child"] == repr(expected)
    assert s.result["bypass"] == {"db.internal": True, "intranet": True, "python.org": False}
    assert s.result["env_wins"] == {"http": "http://env:1"}
    assert len(s.result["callers"]) == 1  # once, cached, also across the fork
    assert s.result["callers"][0] != s.result["parent"]
    assert s.result["imported"] is False
    assert (s.result["forks_by_lookup"], s.result["forks_in_all"]) == (0, 1)  # exec'd helper


def test_helper_timeout_falls_back_with_one_warning(tmp_path: pathlib.Path) -> None:
    """A helper that hangs is killed after the timeout; one warning, environment answer."""
    pidfile = tmp_path / "helper.pid"
    command = ["/bin/sh", "-c", f"echo $$ > {pidfile}; exec sleep 30"]
    start = time.monotonic()
    with pytest.warns(forksafe.ForkSafetyWarning) as caught:
        lookup = proxies.Lookup(platform="darwin", helper=command, timeout=1.0)
        assert lookup.getproxies() == {}
        assert lookup.proxy_bypass("example.org") is False
    assert time.monotonic() - start < 10  # never the helper's 30 seconds
    assert [str(w.message) for w in caught] == [HELPER_FAILED.format(
        reason=TIMED_OUT.format(timeout=1.0), executable="/bin/sh")]
    assert caught[0].filename == __file__
    # The shell writes its pid within milliseconds; on a machine so loaded that it did
    # not within the second, it was killed before it could start anything.
    if pidfile.exists() and pidfile.read_text().strip():
        assert not os.path.exists(f"/proc/{pidfile.read_text().strip()}")  # reaped, no zombie


def test_helper_whose_descendant_keeps_the_pipes_open_still_times_out(
    tmp_path: pathlib.Path,
) -> None:
    """A helper's descendant that left its process group and holds stdout open is no hang."""
    pidfile = tmp_path / "escaped.pid"
    command = ["/bin/sh", "-c", f"setsid sleep 30 & echo $! > {pidfile}; exec sleep 30"]
    start = time.monotonic()
    try:
        with pytest.warns(forksafe.ForkSafetyWarning) as caught:
            assert proxies.Lookup(platform="darwin", helper=command, timeout=0.3).getproxies() == {}
        assert time.monotonic() - start < 10  # not the 30 seconds the descendant lives
        assert [str(w.message) for w in caught] == [HELPER_FAILED.format(
            reason=TIMED_OUT.format(timeout=0.3), executable="/bin/sh")]
    finally:
        escaped = pidfile.read_text().strip() if pidfile.exists() else ""
        if escaped:
            os.kill(int(escaped), signal.SIGKILL)


@pytest.mark.parametrize(("code", "reason"), [
    ("import sys; sys.exit('no configd here')",
     EXITED.format(code=1, detail=": no configd here")),
    ("print('this is not JSON')", UNUSABLE),
    ("print('{\"kind\": \"macos\", \"proxies\": {\"http\": 3}}')", UNUSABLE),
])
def test_helper_failure_falls_back_with_one_warning(code: str, reason: str) -> None:
    """A helper that fails or answers nonsense yields the environment answer and one warning."""
    command = [sys.executable, "-c", code]
    with pytest.warns(forksafe.ForkSafetyWarning) as caught:
        for _ in range(3):
            assert proxies.Lookup(platform="darwin", helper=command).getproxies() == {}
    assert [str(w.message) for w in caught] == [
        HELPER_FAILED.format(reason=reason, executable=sys.executable)]


def test_helper_that_cannot_start_falls_back(tmp_path: pathlib.Path) -> None:
    """A missing interpreter (an embedded Python) is a warning, not an exception."""
    missing = str(tmp_path / "no-such-python")
    with pytest.warns(forksafe.ForkSafetyWarning) as caught:
        assert proxies.Lookup(platform="darwin", helper=[missing]).getproxies() == {}
    assert str(caught[0].message) == HELPER_FAILED.format(
        reason=NOT_STARTED.format(error="No such file or directory"), executable=missing)


def test_windows_answer_is_used_for_proxies_and_bypass(tmp_path: pathlib.Path) -> None:
    """A Windows-style answer gives its proxies and matches ProxyOverride like urllib."""
    answer = ('{"kind": "windows", "proxies": {"http": "http://corp:80"}, '
              '"override": "<local>;*.corp.example; 192.168.*"}')
    command = [sys.executable, "-c", f"print({answer!r})"]
    lookup = proxies.Lookup(platform="win32", helper=command)
    assert lookup.getproxies() == {"http": "http://corp:80"}
    results = {h: lookup.proxy_bypass(h)
               for h in ("printer", "www.corp.example", "192.168.1.5", "python.org")}
    assert results == {"printer": True, "www.corp.example": True, "192.168.1.5": True,
                       "python.org": False}


def test_patch_urllib_routes_lookups_and_restores_by_identity(tmp_path: pathlib.Path) -> None:
    """urllib and modules holding its functions (as requests.utils does) go through forksafe."""
    _, command = fake_darwin(tmp_path)
    (tmp_path / "fakerequests.py").write_text(textwrap.dedent("""
        from urllib.request import getproxies, proxy_bypass
        def environ_proxies(host):
            return {} if proxy_bypass(host) else getproxies()
    """))
    s = run_scenario(f"""
        import sys, urllib.request, forksafe
        sys.path.insert(0, ".")
        import fakerequests
        originals = (urllib.request.getproxies, urllib.request.proxy_bypass)
        from forksafe._remedies.proxies import Lookup
        Lookup(platform="darwin", helper={command!r}).patch_urllib()
        forksafe.patch_urllib()  # idempotent: the first patch stays
        handler = urllib.request.ProxyHandler().proxies
        via_module = fakerequests.environ_proxies("python.org")
        bypassed = fakerequests.environ_proxies("db.internal")
        forksafe.unpatch_urllib()
        restored = ((urllib.request.getproxies, urllib.request.proxy_bypass) == originals
                    and fakerequests.getproxies is originals[0]
                    and fakerequests.proxy_bypass is originals[1])
        emit(handler=handler, via_module=via_module, bypassed=bypassed, restored=restored,
             after=urllib.request.getproxies())
    """, tmp_path, timeout=30)
    expected = {"http": "http://proxy.example:3128", "https": "http://proxy.example:3129"}
    assert s.result["handler"] == expected
    assert s.result["via_module"] == expected
    assert s.result["bypassed"] == {}
    assert s.result["restored"] is True
    assert s.result["after"] == {}  # urllib's own answer on Linux: the environment only


def test_default_helper_runs_on_this_interpreter() -> None:
    """The real helper, run as forksafe runs it, answers for this platform."""
    answer, failure = proxies._run_helper((sys.executable, "-I", HELPER), proxies.TIMEOUT)
    assert failure is None
    assert answer == {"kind": "none", "proxies": {}}


def test_warning_through_patched_urllib_points_at_the_callers_line() -> None:
    """urllib.request.getproxies(), once patched, warns at the line that called it."""
    command = [sys.executable, "-c", "raise SystemExit(3)"]
    proxies.Lookup(platform="darwin", helper=command).patch_urllib()
    with pytest.warns(forksafe.ForkSafetyWarning) as caught:
        assert urllib.request.getproxies() == {}; line = _current_line()  # noqa: E702
    assert (caught[0].filename, caught[0].lineno) == (__file__, line)


def _current_line() -> int:
    return sys._getframe(1).f_lineno


@pytest.mark.parametrize(("executable", "frozen", "problem"), [
    ("/usr/bin/python3.11", False, None),
    ("/opt/venv/bin/python", False, None),
    ("/usr/bin/pypy3", False, None),
    ("/opt/app/MyApp", True, FROZEN),
    ("/usr/bin/python3", True, FROZEN),
    ("/usr/local/bin/uwsgi", False, NOT_PYTHON.format(executable="/usr/local/bin/uwsgi")),
    ("", False, NOT_PYTHON.format(executable="")),
])
def test_which_executables_may_run_a_helper(executable: str, frozen: bool,
                                            problem: str | None) -> None:
    """Only a Python interpreter runs helpers: a frozen app or embedding host is never re-run."""
    assert interpreter_problem(executable, frozen=frozen) == problem


def test_frozen_application_is_never_run_as_a_helper(monkeypatch: pytest.MonkeyPatch) -> None:
    """With sys.frozen set no process is started; one warning, the environment answer."""
    started: list[object] = []

    def popen(*args: object, **kwargs: object) -> None:
        started.append(args)
        raise AssertionError("a helper was started")

    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(subprocess, "Popen", popen)
    with pytest.warns(forksafe.ForkSafetyWarning) as caught:
        lookup = proxies.Lookup(platform="darwin")
        assert lookup.getproxies() == {}
        assert lookup.proxy_bypass("example.org") is False
    assert started == []
    assert [str(w.message) for w in caught] == [
        HELPER_FAILED.format(reason=FROZEN, executable=sys.executable)]
