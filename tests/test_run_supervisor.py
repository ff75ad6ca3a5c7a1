"""`forksafe run` as a supervisor: the terminal kept, signals to the main process, no
endless wait, nothing left behind.

Every test runs the real command line in a child process with a hard timeout, in a
session of its own (or, for the terminal tests, in a session led by `forksafe run` on
a pseudo-terminal), and kills what it started on the way out, whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from typing import Any, Iterator

import pytest

from forksafe._run import KILLED_AFTER_GRACE, KILLED_ON_SECOND_INTERRUPT, SCHEMA, TIME_FORMAT

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="procfs and the pty tests are Linux's")

#: COMMAND for the signal tests: forks two children, then records in files
#: `got-<role>-<pid>` every signal each process gets. On SIGTERM the main process stops
#: its children itself (SIGUSR1), as a Celery master stops its pool, and exits 7.
FAMILY = """
import json, os, signal, sys, time
IGNORE = {ignore!r}
def record(role):
    def handler(sig, frame):
        with open(f"got-{{role}}-{{os.getpid()}}", "a") as f:
            f.write(signal.Signals(sig).name + "\\n")
        if role == "child" and sig == signal.SIGUSR1:
            os._exit(0)
        if role == "main" and sig == signal.SIGTERM and not IGNORE:
            for kid in kids:
                os.kill(kid, signal.SIGUSR1)
            for kid in kids:
                os.waitpid(kid, 0)
            sys.exit(7)
    return handler
def listen(role):
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN if IGNORE and sig != signal.SIGUSR1
                      else record(role))
kids = []
for _ in range(2):
    pid = os.fork()
    if pid == 0:
        listen("child")
        open(f"ready-{{os.getpid()}}", "w").close()
        while True:
            time.sleep(0.2)
    kids.append(pid)
listen("main")
while not all(os.path.exists(f"ready-{{kid}}") for kid in kids):
    time.sleep(0.01)  # signals may come once pids.json is there: the children listen
with open("pids.tmp", "w") as f:
    json.dump([os.getpid(), *kids], f)
os.rename("pids.tmp", "pids.json")
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    time.sleep(0.05)
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        return False


def wait_for(path: pathlib.Path, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path.name} never appeared")
        time.sleep(0.02)


def got(tmp_path: pathlib.Path, role: str) -> list[list[str]]:
    """The signals each process of ``role`` recorded, one list per process."""
    return [sorted(p.read_text().split()) for p in sorted(tmp_path.glob(f"got-{role}-*"))]


@contextlib.contextmanager
def supervised(tmp_path: pathlib.Path, script: str, *options: str,
               env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[str]]:
    """`forksafe run [options] -- python app.py` in a session of its own; on the way out
    everything it and COMMAND started is killed, and none of it may be left alive."""
    (tmp_path / "app.py").write_text(script)
    proc = subprocess.Popen([sys.executable, "-m", "forksafe", "run", *options, "--",
                             sys.executable, "app.py"], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, env=env)
    pids: list[int] = []
    try:
        wait_for(tmp_path / "pids.json")
        pids = json.loads((tmp_path / "pids.json").read_text())
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [p for p in pids if alive(p)] == [], "nothing of the tree is left behind"


def taken(pid: int, seconds: float = 10) -> None:
    """Wait until ``pid`` has no signal pending: the one just sent was taken (two sent
    before the first is taken would be one: standard signals do not queue)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        if int(fields["SigPnd"], 16) == 0 and int(fields["ShdPnd"], 16) == 0:
            return
        time.sleep(0.01)
    raise AssertionError("the signal was never taken")


def finish(proc: subprocess.Popen[str], timeout: float = 30) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


# -- where signals go --------------------------------------------------------------------


def test_sigterm_reaches_only_commands_main_process(tmp_path: pathlib.Path) -> None:
    """A supervisor signals the main process; its children hear from it (SIGUSR1 here),
    never SIGTERM directly: the Celery master stops its pool, the pool is not shot."""
    with supervised(tmp_path, FAMILY.format(ignore=False), "--policy", "log") as proc:
        proc.send_signal(signal.SIGTERM)
        code, err = finish(proc)
    assert code == 7, err
    assert got(tmp_path, "main") == [["SIGTERM"]]
    assert got(tmp_path, "child") == [["SIGUSR1"], ["SIGUSR1"]], \
        "the children got only what their parent sent them"


@pytest.mark.parametrize("session", [[], ["--new-session"]], ids=["shared", "new-session"])
def test_signal_group_passes_it_to_every_process(tmp_path: pathlib.Path,
                                                 session: list[str]) -> None:
    """--signal-group: the whole group gets it, as a terminal would deliver it (its own
    group with --new-session; every process of COMMAND's tree when the group is shared
    with forksafe run)."""
    with supervised(tmp_path, FAMILY.format(ignore=False), "--policy", "log",
                    "--signal-group", *session) as proc:
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while len(got(tmp_path, "child")) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        code, err = finish(proc)
    assert code == 7, err
    assert got(tmp_path, "main") == [["SIGHUP", "SIGTERM"]]
    children = got(tmp_path, "child")
    assert len(children) == 2 and all("SIGHUP" in c for c in children), children


def test_a_signal_ignored_at_the_start_stays_ignored(tmp_path: pathlib.Path) -> None:
    """`nohup forksafe run ...`: SIGHUP stays ignored, by forksafe run and by COMMAND."""
    script = ("import signal\nopen('hup', 'w').write(repr(signal.getsignal(signal.SIGHUP)))\n"
              + FAMILY.format(ignore=False))
    (tmp_path / "nohup.py").write_text(
        "import os, signal, sys\nsignal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
        "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n")
    (tmp_path / "app.py").write_text(script)
    proc = subprocess.Popen([sys.executable, "nohup.py", "-m", "forksafe", "run", "--policy",
                             "log", "--", sys.executable, "app.py"], cwd=tmp_path, text=True,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_for(tmp_path / "pids.json")
        pids = json.loads((tmp_path / "pids.json").read_text())
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.3)
        assert proc.poll() is None, "forksafe run ignores SIGHUP, as it was told"
        proc.send_signal(signal.SIGTERM)
        code, err = finish(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert code == 7, err
    assert all("SIGHUP" not in signals for signals in got(tmp_path, "main"))
    assert "Handlers.SIG_IGN" in (tmp_path / "hup").read_text()
    assert not any(alive(p) for p in pids)


# -- no endless wait ---------------------------------------------------------------------


def test_a_command_that_ignores_sigterm_is_killed_after_the_grace_period(
        tmp_path: pathlib.Path) -> None:
    """COMMAND and its children ignore SIGTERM: the whole tree is killed (SIGKILL) once
    --grace has passed, said in one line; exit 128+9."""
    with supervised(tmp_path, FAMILY.format(ignore=True), "--policy", "log",
                    "--grace", "0.5") as proc:
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code, err = finish(proc)
        took = time.monotonic() - start
    assert code == 128 + signal.SIGKILL, err
    assert KILLED_AFTER_GRACE.format(grace=0.5) in err
    assert 0.4 < took < 15, took


def test_a_second_interrupt_kills_the_tree(tmp_path: pathlib.Path) -> None:
    """Ctrl-C twice (SIGINT sent to forksafe run here) to a COMMAND that ignores it:
    the tree is killed at once, long before the grace period would end."""
    with supervised(tmp_path, FAMILY.format(ignore=True), "--policy", "log",
                    "--grace", "30") as proc:
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        taken(proc.pid)
        time.sleep(0.2)
        assert proc.poll() is None, "one Ctrl-C is passed on, nothing more"
        proc.send_signal(signal.SIGINT)
        code, err = finish(proc)
    assert code == 128 + signal.SIGKILL, err
    assert KILLED_ON_SECOND_INTERRUPT.format(grace=30) in err
    assert time.monotonic() - start < 15


def test_interrupts_further_apart_than_the_grace_period_are_only_passed_on(
        tmp_path: pathlib.Path) -> None:
    """Safe twin: two Ctrl-C 1 s apart with --grace 0.3 (a debugger session) kill
    nothing: COMMAND gets both and ends as it chooses."""
    script = FAMILY.format(ignore=False).replace(
        "deadline = time.monotonic() + 60",
        "signal.signal(signal.SIGINT, lambda *a: (seen.append(1), open('seen', 'w')))\n"
        "seen = []\ndeadline = time.monotonic() + 60", 1).replace(
        "    time.sleep(0.05)\n", "    time.sleep(0.05)\n    if len(seen) == 2:\n"
        "        for kid in kids:\n            os.kill(kid, signal.SIGUSR1)\n"
        "            os.waitpid(kid, 0)\n        sys.exit(5)\n")
    with supervised(tmp_path, script, "--policy", "log", "--grace", "0.3") as proc:
        proc.send_signal(signal.SIGINT)
        wait_for(tmp_path / "seen")  # taken and passed on: its time is behind us
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        code, err = finish(proc)
    assert code == 5, err
    assert "killing" not in err


# -- the terminal ------------------------------------------------------------------------


#: Runs `forksafe run` as the session leader of a new pseudo-terminal (as a login shell
#: runs what it starts), answers what it prints with keys, and reports what it showed.
ON_A_TERMINAL = """
import json, os, pty, select, signal, sys, time
argv, steps = json.loads(sys.argv[1]), json.loads(sys.argv[2])
pid, master = pty.fork()
if pid == 0:
    os.execv(argv[0], argv)
with open("run.pid", "w") as f:
    f.write(str(pid))
out, deadline = b"", time.monotonic() + 40
while time.monotonic() < deadline:
    if select.select([master], [], [], 0.05)[0]:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: every process on the terminal closed it
            data = b""
        if not data:
            break
        out += data
    while steps and steps[0][0].encode() in out:
        time.sleep(steps[0][2])
        os.write(master, steps.pop(0)[1].encode())
        for _ in range(500):  # until forksafe run took the signal the key sent
            with open(f"/proc/{pid}/status") as f:
                pending = [line.split()[1] for line in f if line[:6] in ("SigPnd", "ShdPnd")]
            if len(pending) == 2 and not any(int(mask, 16) for mask in pending):
                break
            time.sleep(0.01)
else:
    os.killpg(pid, signal.SIGKILL)
_, status = os.waitpid(pid, 0)
print(json.dumps({"code": os.waitstatus_to_exitcode(status),
                  "out": out.decode(errors="replace")}))
"""


def on_a_terminal(tmp_path: pathlib.Path, script: str, *options: str,
                  steps: tuple[tuple[str, str, float], ...] = ()) -> dict[str, Any]:
    """`forksafe run [options] -- python app.py`, session leader on a pseudo-terminal."""
    (tmp_path / "app.py").write_text(script)
    (tmp_path / "terminal.py").write_text(ON_A_TERMINAL)
    argv = [sys.executable, "-m", "forksafe", "run", *options, "--", sys.executable, "app.py"]
    helper = subprocess.Popen([sys.executable, "terminal.py", json.dumps(argv),
                               json.dumps(list(steps))], cwd=tmp_path, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              start_new_session=True)
    try:
        out, err = helper.communicate(timeout=60)
    finally:
        if helper.poll() is None:
            os.killpg(helper.pid, signal.SIGKILL)
            helper.communicate()
        with contextlib.suppress(OSError, ValueError):
            os.killpg(int((tmp_path / "run.pid").read_text()), signal.SIGKILL)
    assert helper.returncode == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


TTY = """
import os
try:
    tty = os.open("/dev/tty", os.O_RDWR)
except OSError as exc:
    print("no-tty", exc.errno)
else:
    os.write(tty, b"tty-ok\\n")
    print("foreground" if os.tcgetpgrp(tty) == os.getpgrp() else "background")
"""


def test_command_keeps_the_controlling_terminal(tmp_path: pathlib.Path) -> None:
    """/dev/tty opens in COMMAND, which is in the terminal's foreground group: password
    prompts and pdb work under forksafe run."""
    result = on_a_terminal(tmp_path, TTY)
    assert result["code"] == 0, result["out"]
    assert "tty-ok" in result["out"] and "foreground" in result["out"], result["out"]


def test_new_session_gives_command_no_terminal(tmp_path: pathlib.Path) -> None:
    """Safe twin: --new-session does what it says (ENXIO: no controlling terminal)."""
    result = on_a_terminal(tmp_path, TTY, "--new-session")
    assert "no-tty 6" in result["out"], result["out"]


CTRL_C = """
import signal, sys, time
seen = []
signal.signal(signal.SIGINT, lambda *a: seen.append(1))
print("ready", flush=True)
deadline = time.monotonic() + 2
while time.monotonic() < deadline:
    time.sleep(0.05)
print(f"interrupts {len(seen)}", flush=True)
"""


def test_ctrl_c_on_the_terminal_reaches_command_once(tmp_path: pathlib.Path) -> None:
    """The terminal delivers Ctrl-C to COMMAND's group itself: forksafe run must not send
    it a second time (COMMAND counts one), nor die of it."""
    result = on_a_terminal(tmp_path, CTRL_C, steps=(("ready", "\x03", 0.2),))
    assert "interrupts 1" in result["out"], result["out"]
    assert result["code"] == 0, result["out"]


def test_ctrl_c_twice_on_the_terminal_kills_a_deaf_command(tmp_path: pathlib.Path) -> None:
    """COMMAND ignores SIGINT: the second Ctrl-C kills its tree."""
    deaf = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n" \
           "print('ready', flush=True)\ntime.sleep(30)\n"
    result = on_a_terminal(tmp_path, deaf, "--grace", "20",
                           steps=(("ready", "\x03", 0.2), ("ready", "\x03", 0.5)))
    assert result["code"] == 128 + signal.SIGKILL, result["out"]
    assert "second interrupt" in result["out"]


# -- the machinery -----------------------------------------------------------------------


def test_a_signal_before_command_starts_is_passed_on_once_it_does(
        tmp_path: pathlib.Path) -> None:
    """A SIGTERM that arrives while COMMAND is being started is kept pending, and taken
    once the supervisor waits; the signal mask is as it was afterwards."""
    from conftest import run_scenario

    s = run_scenario("""
import json, os, signal
from forksafe._run import _Signals
before = signal.pthread_sigmask(signal.SIG_BLOCK, ())
with _Signals() as signals:
    os.kill(os.getpid(), signal.SIGTERM)  # blocked: kept
    got = signals.wait(5)
after = signal.pthread_sigmask(signal.SIG_BLOCK, ())
print("FORKSAFE-RESULT:" + json.dumps({"got": got, "mask": before == after,
      "default": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL}))
""", tmp_path, timeout=30)
    assert s.result == {"got": [[signal.SIGTERM, False]], "mask": True, "default": True}


def test_without_sigtimedwait_signals_still_reach_command(tmp_path: pathlib.Path) -> None:
    """The handler way (macOS has no sigtimedwait), forced here: SIGTERM still reaches
    COMMAND's main process only, and its exit still wakes the supervisor."""
    (tmp_path / "fallback.py").write_text(
        "import sys\nfrom forksafe import _run\n_run._Signals.synchronous = False\n"
        "from forksafe._cli import main\nsys.exit(main(sys.argv[1:]))\n")
    (tmp_path / "app.py").write_text(FAMILY.format(ignore=False))
    proc = subprocess.Popen([sys.executable, "fallback.py", "run", "--policy", "log", "--",
                             sys.executable, "app.py"], cwd=tmp_path, text=True,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_for(tmp_path / "pids.json")
        proc.send_signal(signal.SIGTERM)
        code, err = finish(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert code == 7, err
    assert got(tmp_path, "child") == [["SIGUSR1"], ["SIGUSR1"]]


def test_a_run_without_forks_is_reported_without_the_model(tmp_path: pathlib.Path) -> None:
    """The report of a run without a fork is made without importing the report model;
    it is the same document (the schema and the time format are the model's)."""
    import jsonschema

    from forksafe._report import SCHEMA as MODEL_SCHEMA
    from forksafe._report import format_time

    assert SCHEMA == MODEL_SCHEMA and time.strftime(TIME_FORMAT, time.gmtime(0)) == \
        format_time(0)
    proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "forksafe", "run",
                             "--report", "r.json", "--", "true"], cwd=tmp_path, text=True,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        code, err = finish(proc, timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert code == 0, err
    imported = {row.rsplit("|", 1)[-1].strip() for row in err.splitlines()
                if row.startswith("import time:")}
    assert "forksafe._run" in imported and "forksafe._report" not in imported
    report = json.loads((tmp_path / "r.json").read_text())
    schema = json.loads((pathlib.Path(__file__).parent.parent / "docs" /
                         "report-format.schema.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(report)
    assert report["forks"] == [] and isinstance(report["pid"], int)
    assert report["duration"] >= 0 and report["started"].endswith("Z")
