"""The state directory cannot be hijacked: a planted one is never used, nothing is written
through a link, and crash capture and hang detection go on in a private directory.

As root (as these tests run), another local user is played by uid 65534: the planted
directories and links belong to it, as they would to an attacker on a shared machine.
"""

from __future__ import annotations

import os
import pathlib
import stat

import pytest

from conftest import run_scenario
from forksafe import _statedir
from forksafe._report import Outcome

OTHER_UID = 65534
PRECIOUS = "the victim's own data\n"

SCENARIO = """
import ctypes, json, os, threading, time
from forksafe import _statedir
_statedir.SHM = {root!r}  # where this machine's /dev/shm would be
shared = _statedir.state_dir()
planted = {plant!r}
if planted:  # links named after the pids to come, to the victim's file
    # "foreign": another uid's 0777 directory; "open": a 0777 one of the victim's own
    # uid, planted into by others; "symlink": a link to the attacker's own directory.
    target = {attacker!r} if planted == "symlink" else shared
    if planted == "symlink":
        os.symlink(target, shared)
    else:
        os.mkdir(target)
    os.chmod(target, 0o777)
    me = os.getpid()
    for pid in range(me, me + 300):
        for name in (f"{{pid}}.crash", f"{{pid}}.hung", f"{{pid}}.hung.tmp",
                     *(f"{{pid}}-{{n}}.spare" for n in range(1, 5))):
            os.symlink({victim!r}, os.path.join(target, name))
            if planted != "open":
                os.lchown(os.path.join(target, name), {uid}, {uid})
    if planted != "open":
        os.chown(target, {uid}, {uid})
before = sorted(os.listdir(shared)) if os.path.isdir(shared) else None
import forksafe
from forksafe._guard import event_for_child
forksafe.install("log", hang_timeout=0.3)
pid = os.fork()
if pid == 0:
    ctypes.string_at(0)  # crash-line
os.waitpid(pid, 0)
crash = event_for_child(pid).outcome.to_dict()
lock = threading.Lock()
def hold():
    with lock:
        time.sleep(30)
threading.Thread(target=hold, name="holder", daemon=True).start()
time.sleep(0.1)
pid = os.fork()
if pid == 0:
    with lock:
        pass
    os._exit(0)
os.waitpid(pid, 0)
hung = event_for_child(pid).outcome.to_dict()
after = sorted(os.listdir(shared)) if os.path.isdir(shared) else None
print("FORKSAFE-RESULT:" + json.dumps({{"crash": crash, "hung": hung,
      "same": before == after, "prefix": _statedir.current()}}))
"""


@pytest.mark.parametrize("plant", ["foreign", "open", "symlink"])
def test_a_planted_state_directory_is_not_used_and_nothing_is_lost(
        tmp_path: pathlib.Path, plant: str) -> None:
    """A state directory of another uid full of links named after the coming pids, a 0777
    one, and a link to the attacker's directory: the victim's file is untouched, the
    planted directory too, and a crash and a hang are still diagnosed, through a private
    directory, with one line saying why."""
    if os.getuid() != 0:
        pytest.skip("planting a directory of another uid needs root")
    root = tmp_path / "shm"
    root.mkdir()
    attacker = tmp_path / "attacker"
    attacker.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text(PRECIOUS)
    victim.chmod(0o640)
    s = run_scenario(SCENARIO.format(root=str(root), plant=plant, attacker=str(attacker),
                                     victim=str(victim), uid=OTHER_UID), tmp_path, timeout=60)
    assert victim.read_text() == PRECIOUS
    assert stat.S_IMODE(victim.stat().st_mode) == 0o640
    assert s.result["same"], "nothing in the planted directory was added, replaced or removed"
    crash, hung = s.result["crash"], s.result["hung"]
    assert crash["status"] == "signaled" and crash["signal"] == "SIGSEGV", crash
    assert f"line {s.line_of('crash-line')}" in crash["traceback"]
    assert hung["status"] == "hung", hung
    ours = [line for line in s.stderr.splitlines() if "state directory" in line]
    assert len(ours) == 1, s.stderr
    why = {"foreign": f"belongs to uid {OTHER_UID}", "open": "is open to other users",
           "symlink": "is a symbolic link"}[plant]
    assert ours[0].startswith(_statedir.NOT_OURS.split("{")[0]) and why in ours[0], ours
    private = s.result["prefix"]
    assert private.startswith(str(root / f"forksafe-{os.getuid()}-")), private
    assert not os.path.exists(private), "the private directory goes when its maker exits"


def test_a_directory_of_our_own_is_used_quietly(tmp_path: pathlib.Path) -> None:
    """Safe twin: no planted directory; the shared one is made 0700 and used, nothing said."""
    root = tmp_path / "shm"
    root.mkdir()
    s = run_scenario(SCENARIO.format(root=str(root), plant="", attacker="", victim="",
                                     uid=OTHER_UID), tmp_path, timeout=60)
    assert s.result["prefix"] == str(root / f"forksafe-{os.getuid()}") + os.sep
    assert s.result["crash"]["signal"] == "SIGSEGV" and s.result["hung"]["status"] == "hung"
    assert [ln for ln in s.stderr.splitlines() if "state directory" in ln] == []
    assert stat.S_IMODE(os.lstat(root / f"forksafe-{os.getuid()}").st_mode) == 0o700


def test_what_makes_a_directory_untrusted(tmp_path: pathlib.Path) -> None:
    """Each reason, checked with lstat; a missing directory is made 0700 and then trusted."""
    made = tmp_path / "made"
    assert _statedir._untrusted(str(made), create=True) is None
    assert stat.S_IMODE(made.stat().st_mode) == 0o700
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o700)
    loose.chmod(0o755)
    assert "open to other users (mode 755" in str(_statedir._untrusted(str(loose), create=False))
    link = tmp_path / "link"
    link.symlink_to(made)
    assert _statedir._untrusted(str(link), create=False) == "is a symbolic link"
    afile = tmp_path / "file"
    afile.write_text("")
    assert _statedir._untrusted(str(afile), create=True) == "is not a directory"
    swappable = tmp_path / "swappable"
    swappable.mkdir()
    swappable.chmod(0o777)  # writable by all, not sticky: our directory could be renamed
    inside = swappable / "state"
    inside.mkdir(mode=0o700)
    assert "others may rename" in str(_statedir._untrusted(str(inside), create=False))
    swappable.chmod(0o1777)  # sticky, like /tmp and /dev/shm: fine
    assert _statedir._untrusted(str(inside), create=False) is None


def test_files_are_created_new_and_never_through_a_link(tmp_path: pathlib.Path) -> None:
    """A link or a leftover where a file is to be made is replaced, never written through;
    a marker that is a link is not read."""
    victim = tmp_path / "victim.txt"
    victim.write_text(PRECIOUS)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "7.hung.tmp").symlink_to(victim)
    (state / "7.hung").symlink_to(victim)
    assert _statedir.take_hung_marker(7, directory=str(state)) is None, "a link is not read"
    (state / "7.hung").unlink()
    _statedir.write_hung_marker(7, Outcome("hung", signal="SIGKILL"), directory=str(state))
    assert victim.read_text() == PRECIOUS
    assert not (state / "7.hung.tmp").exists()
    assert stat.S_IMODE((state / "7.hung").stat().st_mode) == 0o600
    marker = _statedir.take_hung_marker(7, directory=str(state))
    assert marker is not None and marker.status == "hung"
    (state / "8.crash").symlink_to(victim)
    fd = _statedir.create(str(state / "8.crash"))
    os.write(fd, b"mine")
    os.close(fd)
    assert victim.read_text() == PRECIOUS
    assert not (state / "8.crash").is_symlink()
