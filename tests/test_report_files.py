"""Report files a hostile neighbour cannot turn against us, and that never cost COMMAND's
exit code: FORKSAFE_REPORT's event file and ``forksafe run --report``.

Real FIFOs, real /dev/null, real links and files of another uid (65534, as root).
"""

from __future__ import annotations

import json
import os
import pathlib
import stat
import subprocess
import sys
import threading

import pytest

from conftest import run_scenario
from forksafe._run import REPORT_LOST, REPORT_WRITTEN
from forksafe._runreport import REPORT_UNWRITABLE
from forksafe._sink import NOT_OURS, SINK_UNWRITABLE, Sink

OTHER_UID = 65534
PRECIOUS = "the victim's own data\n"
HOOK_UNSET = {"FORKSAFE_POLICY": "", "FORKSAFE_HANG_TIMEOUT": "", "FORKSAFE_FAIL_ON": ""}
FORKS = """
import os
pid = os.fork()
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
print("FORKSAFE-RESULT:{}")
"""

needs_root = pytest.mark.skipif(os.getuid() != 0, reason="files of another uid need root")


def run(tmp_path: pathlib.Path, *options: str, script: str = "raise SystemExit(3)\n",
        args: tuple[str, ...] = (), preexec: str = "") -> subprocess.CompletedProcess[str]:
    """``forksafe run OPTIONS -- python app.py ARGS``; ``preexec`` is Python run first in a
    wrapper that then execs forksafe (for limits)."""
    (tmp_path / "app.py").write_text(script)
    argv = [sys.executable, "-m", "forksafe", "run", *options, "--", sys.executable, "app.py",
            *args]
    if preexec:
        argv = [sys.executable, "-c", preexec + "\nimport os, sys\nos.execv(sys.argv[1], "
                "sys.argv[1:])", *argv]
    return subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          start_new_session=True)


def one_line(stderr: str, start: str) -> str:
    [line] = [ln for ln in stderr.splitlines() if ln.startswith(start)]
    return line


# -- FORKSAFE_REPORT ----------------------------------------------------------------------


def test_the_event_file_is_created_0600(tmp_path: pathlib.Path) -> None:
    """Fork events are nobody else's business: a new event file is readable by its owner only."""
    report = tmp_path / "events.jsonl"
    run_scenario(FORKS, tmp_path, env={**HOOK_UNSET, "FORKSAFE_REPORT": str(report)})
    assert stat.S_IMODE(report.stat().st_mode) == 0o600
    assert [json.loads(ln)["type"] for ln in report.read_text().splitlines()] == ["fork",
                                                                                  "outcome"]


@needs_root
@pytest.mark.parametrize("planted", ["link", "file", "fifo"])
def test_a_planted_event_file_gets_nothing(tmp_path: pathlib.Path, planted: str) -> None:
    """A link to the victim's file, or a file or FIFO of another user's, where the event file
    is to be: nothing is written there, one line says why, and the program runs guarded."""
    victim = tmp_path / "victim.txt"
    victim.write_text(PRECIOUS)
    report = tmp_path / "events.jsonl"
    if planted == "link":
        report.symlink_to(victim)
        os.lchown(report, OTHER_UID, OTHER_UID)
    elif planted == "file":
        report.write_text("")
        report.chmod(0o666)
        os.chown(report, OTHER_UID, OTHER_UID)
    else:
        os.mkfifo(report, 0o666)
        os.chown(report, OTHER_UID, OTHER_UID)
    # The other user listens on their FIFO (held open, so that writes would stay in it).
    listener = os.open(report, os.O_RDONLY | os.O_NONBLOCK) if planted == "fifo" else None
    try:
        s = run_scenario(FORKS, tmp_path, env={**HOOK_UNSET, "FORKSAFE_REPORT": str(report)})
        heard = os.read(listener, 65536) if listener is not None else b""
    finally:
        if listener is not None:
            os.close(listener)
    assert s.result == {}
    assert victim.read_text() == PRECIOUS
    assert heard == b""
    if planted == "file":
        assert report.read_text() == ""
    line = one_line(s.stderr, SINK_UNWRITABLE.split("{")[0])
    why = {"link": "symbolic link", "file": f"belongs to uid {OTHER_UID}",
           "fifo": f"belongs to uid {OTHER_UID}"}[planted]
    assert why in line and "FORKSAFE_REPORT" in line


def test_a_fifo_nobody_reads_never_blocks_the_program(tmp_path: pathlib.Path) -> None:
    """FORKSAFE_REPORT naming our own FIFO with no reader: one line, no hang (the hard
    timeout of the scenario would fail the test)."""
    report = tmp_path / "events.fifo"
    os.mkfifo(report, 0o600)
    s = run_scenario(FORKS, tmp_path, env={**HOOK_UNSET, "FORKSAFE_REPORT": str(report)},
                     timeout=30)
    assert "FIFO that nobody reads" in one_line(s.stderr, SINK_UNWRITABLE.split("{")[0])


@needs_root
def test_a_sink_refuses_another_users_file_but_takes_roots(tmp_path: pathlib.Path) -> None:
    """The owner check itself: another uid's file is refused in words; /dev/null (root's)
    is fine."""
    theirs = tmp_path / "theirs.jsonl"
    theirs.write_text("")
    os.chown(theirs, OTHER_UID, OTHER_UID)
    with pytest.raises(OSError) as caught:
        Sink(str(theirs))
    assert caught.value.strerror == NOT_OURS.format(uid=OTHER_UID, me=0)
    assert Sink(os.devnull).write({"type": "fork"})


# -- forksafe run --report ----------------------------------------------------------------


def test_report_to_a_fifo_is_written_into_it(tmp_path: pathlib.Path) -> None:
    """A FIFO stays a FIFO: its reader gets the whole report; COMMAND's code is kept."""
    fifo = tmp_path / "r.fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []

    def reader() -> None:
        with open(fifo, "rb") as f:
            got.append(f.read())

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    proc = run(tmp_path, "--report", str(fifo))
    thread.join(30)
    assert proc.returncode == 3, proc.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert json.loads(got[0])["exit_code"] == 3
    assert REPORT_WRITTEN.format(path=fifo) in proc.stderr


def test_report_to_a_fifo_nobody_reads_keeps_the_exit_code(tmp_path: pathlib.Path) -> None:
    """No reader: one line, COMMAND's exit code, the FIFO untouched, no temporary file."""
    fifo = tmp_path / "r.fifo"
    os.mkfifo(fifo)
    proc = run(tmp_path, "--report", str(fifo))
    assert proc.returncode == 3
    line = one_line(proc.stderr, REPORT_UNWRITABLE.split("{")[0])
    assert "FIFO that nobody reads" in line and REPORT_LOST.format(code=3) in line
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".forksafe")] == []


def test_report_to_dev_null_leaves_it_a_device(tmp_path: pathlib.Path) -> None:
    """As root, the old rename replaced /dev/null with a regular file: never again."""
    before = os.lstat(os.devnull)
    proc = run(tmp_path, "--report", os.devnull)
    after = os.lstat(os.devnull)
    assert proc.returncode == 3, proc.stderr
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev
    assert (after.st_ino, stat.S_IMODE(after.st_mode)) == (before.st_ino,
                                                           stat.S_IMODE(before.st_mode))
    assert REPORT_WRITTEN.format(path=os.devnull) in proc.stderr


@needs_root
def test_a_planted_link_as_report_path_is_not_followed(tmp_path: pathlib.Path) -> None:
    """Another user's link at the report path, to the victim's file: refused before COMMAND
    runs (exit 2, one line); planted while it runs: refused then, COMMAND's code kept."""
    victim = tmp_path / "victim.txt"
    victim.write_text(PRECIOUS)
    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    link = shared / "r.json"
    link.symlink_to(victim)
    os.lchown(link, OTHER_UID, OTHER_UID)
    proc = run(tmp_path, "--report", str(link), script="open('ran', 'w').close()\n")
    assert proc.returncode == 2
    assert "symbolic link" in one_line(proc.stderr, REPORT_UNWRITABLE.split("{")[0])
    assert not (tmp_path / "ran").exists()
    link.unlink()
    proc = run(tmp_path, "--report", str(link), script=f"""
import os
os.symlink({str(victim)!r}, {str(link)!r})
os.lchown({str(link)!r}, {OTHER_UID}, {OTHER_UID})
raise SystemExit(3)
""")
    assert proc.returncode == 3
    assert "symbolic link" in one_line(proc.stderr, REPORT_UNWRITABLE.split("{")[0])
    assert victim.read_text() == PRECIOUS and link.is_symlink()


@needs_root
def test_another_users_file_is_not_replaced(tmp_path: pathlib.Path) -> None:
    """A report path holding another uid's file: refused before COMMAND runs."""
    theirs = tmp_path / "r.json"
    theirs.write_text(PRECIOUS)
    os.chown(theirs, OTHER_UID, OTHER_UID)
    proc = run(tmp_path, "--report", str(theirs))
    assert proc.returncode == 2
    assert f"belongs to uid {OTHER_UID}" in one_line(proc.stderr,
                                                     REPORT_UNWRITABLE.split("{")[0])
    assert theirs.read_text() == PRECIOUS and theirs.stat().st_uid == OTHER_UID


def test_a_directory_gone_after_command_ran_keeps_the_exit_code(tmp_path: pathlib.Path) -> None:
    """COMMAND removes the report's directory: one line, COMMAND's exit code."""
    out = tmp_path / "out"
    out.mkdir()
    proc = run(tmp_path, "--report", str(out / "r.json"),
               script=f"import shutil\nshutil.rmtree({str(out)!r})\nraise SystemExit(5)\n")
    assert proc.returncode == 5
    line = one_line(proc.stderr, REPORT_UNWRITABLE.split("{")[0])
    assert REPORT_LOST.format(code=5) in line
    assert not out.exists()


def test_a_report_cut_short_leaves_no_temporary_file(tmp_path: pathlib.Path) -> None:
    """Writing fails half-way (file size limit, as a full disk would): one line, COMMAND's
    exit code, and no .forksafe-* temporary file holding part of the report."""
    proc = run(tmp_path, "--report", "r.json", args=("x" * 6000,),
               preexec="import resource, signal\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
                       "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))")
    assert proc.returncode == 3, proc.stderr
    line = one_line(proc.stderr, REPORT_UNWRITABLE.split("{")[0])
    assert "too large" in line.lower(), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.py"]


def test_an_empty_report_name_is_a_usage_error(tmp_path: pathlib.Path) -> None:
    """``--report ''`` used to write nothing, silently: now one line, exit 2, nothing run."""
    proc = run(tmp_path, "--report", "", script="open('ran', 'w').close()\n")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "--report='' is not a file name" in proc.stderr
    assert not (tmp_path / "ran").exists()
