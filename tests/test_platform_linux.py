"""The Linux backend: procfs parsing and stack attribution, on recorded and live inputs."""

from __future__ import annotations

import array
import os
import pathlib
import sys

import pytest

from conftest import run_scenario
from forksafe._platform import LoadedLibrary
from forksafe._platform import _linux as linux

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux backend")


def test_state_reads_past_a_comm_with_parentheses() -> None:
    """A thread named 'a) (b' does not confuse the state and start-time fields."""
    stat = "123 (a) (b) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 4242 20 21"
    assert linux._state(stat) == ("sleeping", "4242")
    assert linux._state("") == ("unknown", "")


def test_stack_pointer_only_while_in_a_syscall() -> None:
    """The syscall file gives a stack pointer when blocked, none when running."""
    blocked = "202 0x1 0x2 0x3 0x4 0x5 0x6 0x7ffd1000 0x7f0000001234"
    assert linux._stack_pointer(blocked) == 0x7FFD1000
    assert linux._stack_pointer("running") is None
    assert linux._stack_pointer("-1 0x7ffd1000 0x7f0000001234") is None


def test_parse_maps_keeps_permissions_and_paths() -> None:
    """Mappings are sorted, with anonymous ones marked by an empty path."""
    maps = ("7f0000002000-7f0000003000 r-xp 00000000 08:01 42 /usr/lib/libfoo.so\n"
            "7f0000000000-7f0000001000 rw-p 00000000 00:00 0 \n"
            "garbage line\n")
    assert linux._parse_maps(maps) == [
        (0x7F0000000000, 0x7F0000001000, "rw-p", ""),
        (0x7F0000002000, 0x7F0000003000, "r-xp", "/usr/lib/libfoo.so"),
    ]


def test_locator_finds_the_outermost_owner() -> None:
    """Scanning from the top of a stack stops at the first non-plumbing library."""
    libs = [LoadedLibrary("/lib/libc.so.6", ((0x1000, 0x2000),)),
            LoadedLibrary("/lib/libgomp.so.1", ((0x5000, 0x6000),)),
            LoadedLibrary("/app/libdeep.so", ((0x9000, 0xA000),))]
    # Bottom (innermost) to top (outermost): deep frame, gomp frame, noise, libc start.
    words = array.array("Q", [0x9010, 0x5010, 0x3, 0x7777, 0x1010])
    assert linux._Locator(libs).scan(words.tobytes()) == ("/lib/libc.so.6", "/lib/libgomp.so.1")
    assert linux._Locator(libs).scan(b"") == ()
    assert linux._Locator([]).scan(words.tobytes()) == ()


def test_live_threads_are_listed_and_attributed(
    tmp_path: pathlib.Path, native_dir: pathlib.Path
) -> None:
    """A real C thread is found in /proc with its name and its library as owner."""
    s = run_scenario(f"""
        import ctypes, threading
        from forksafe._platform import current
        lib = ctypes.CDLL({str(native_dir / "libnative_mutex.so")!r})
        lib.native_mutex_hold(ctypes.c_double(30.0))
        lib.native_mutex_wait_held.argtypes = [ctypes.c_double]
        assert lib.native_mutex_wait_held(10.0) == 1
        p = current()
        libs = p.loaded_libraries()
        again = p.loaded_libraries()
        threads = p.threads(frozenset([threading.get_native_id()]), libs)
        import json
        print("FORKSAFE-RESULT:" + json.dumps({{
            "same": [l.path for l in libs] == [l.path for l in again],
            "threads": [[t.name, t.owner, t.named] for t in threads]}}))
    """, tmp_path)
    assert s.result["same"] is True
    [[name, owner, named]] = s.result["threads"]
    assert name == "mutex-holder" and named is True
    assert owner.endswith("libnative_mutex.so")


def test_loaded_libraries_include_this_interpreter() -> None:
    """dl_iterate_phdr lists the main program and libc, each with code ranges."""
    libs = linux.LinuxPlatform().loaded_libraries()
    paths = [lib.path for lib in libs]
    assert os.path.realpath(sys.executable) in paths
    assert any(os.path.basename(p).startswith("libc.so") for p in paths)
    assert all(start < end for lib in libs for start, end in lib.text)


def test_call_flag_never_loads_a_library() -> None:
    """A library that is not loaded gives None and stays unloaded."""
    platform = linux.LinuxPlatform()
    assert platform.call_flag("libforksafe-does-not-exist.so", "anything") is None
    assert platform.call_flag("libc.so.6", "no_such_symbol_here") is None
    assert platform.call_flag("libc.so.6", "getpid") == os.getpid()
