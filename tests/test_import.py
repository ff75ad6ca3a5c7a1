"""`import forksafe` changes nothing in the process it is imported into."""

from __future__ import annotations

import pathlib

from conftest import run_scenario


def test_import_has_no_side_effects(tmp_path: pathlib.Path) -> None:
    """No thread, no native library, no environment variable, no patched function."""
    s = run_scenario("""
        import os, sys, threading, json
        def libs():
            with open("/proc/self/maps") as f:
                return {line.split()[-1] for line in f if ".so" in line}
        env, before_libs, modules = dict(os.environ), libs(), set(sys.modules)
        originals = (os.fork, threading.Thread.start, getattr(os, "forkpty", None),
                     list(sys.meta_path), list(sys.path_hooks))
        tasks = len(os.listdir("/proc/self/task"))
        import forksafe
        after = (os.fork, threading.Thread.start, getattr(os, "forkpty", None),
                 list(sys.meta_path), list(sys.path_hooks))
        new_libs = sorted(libs() - before_libs)
        print("FORKSAFE-RESULT:" + json.dumps({
            "env_same": dict(os.environ) == env,
            "new_libs": new_libs,
            "threads": len(os.listdir("/proc/self/task")) - tasks,
            "patched": [i for i, (a, b) in enumerate(zip(originals, after)) if a != b],
            "ctypes": "ctypes" in sys.modules and "ctypes" not in modules,
        }))
    """, tmp_path)
    assert s.result == {"env_same": True, "new_libs": [], "threads": 0, "patched": [],
                        "ctypes": False}


def test_public_api_is_exported() -> None:
    """__all__ is sorted and every name in it exists."""
    import forksafe

    assert forksafe.__all__ == sorted(forksafe.__all__)
    for name in forksafe.__all__:
        assert hasattr(forksafe, name), name
