"""glibc's loader lock: a check must never wait for it while holding what a loader waits for.

``dl_iterate_phdr`` calls its callback with glibc's loader lock held. The image
list was once read with a ctypes callback, which needs the GIL in there; a
thread importing an extension module holds the GIL while ``dlopen`` waits for
that lock, and the two waited for each other for good (found in a fork storm:
a thread imported forksafe's own extension while others forked). Here a thread
loads ~1,500 real images (copies of a small extension module of the standard
library, each a new ``dlopen``) while the main thread checks, and forks under
the guard, as fast as it can: with either image reader, both finish.
"""

from __future__ import annotations

import pathlib

import pytest

from conftest import run_scenario

LOADER = """
import glob, importlib.machinery, importlib.util, os, shutil, sys, threading, time
import forksafe
from forksafe import _check
from forksafe._platform import _linux
_linux.C_IMAGES = {c_images}
source = glob.glob(os.path.join(os.path.dirname(os.__file__), "lib-dynload", "_bisect*.so"))[0]
paths = []
for i in range({copies}):
    path = f"copy{{i}}.so"
    shutil.copy(source, path)
    paths.append(os.path.abspath(path))
done = threading.Event()
def load():
    for i, path in enumerate(paths):
        loader = importlib.machinery.ExtensionFileLoader(f"copy{{i}}", path)
        try:  # dlopen with the GIL held, as every import of an extension module
            loader.create_module(importlib.util.spec_from_loader(f"copy{{i}}", loader))
        except ImportError:
            pass  # no PyInit_copy<i>: the image was loaded all the same
        time.sleep(0.0002)
    done.set()
forksafe.install("log")
threading.Thread(target=load, daemon=True).start()
checks = forks = 0
while not done.is_set():
    _check.check_with(reuse=False)  # every probe, the image list included
    checks += 1
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    forks += 1
emit(checks=checks, forks=forks, native=_linux._reader() is not None)
"""


@pytest.mark.parametrize("c_images", [True, False], ids=["c-reader", "maps-reader"])
def test_images_loaded_in_one_thread_never_deadlock_checks_and_forks_in_another(
        tmp_path: pathlib.Path, c_images: bool) -> None:
    s = run_scenario(LOADER.format(c_images=c_images, copies=1500), tmp_path, timeout=90)
    assert s.result["checks"] > 0 and s.result["forks"] > 0
    assert s.result["native"] is c_images, "the C reader is built with the package"


READERS = """
import glob, os, shutil, ctypes
from forksafe._platform import _linux
from forksafe._platform._linux import LinuxPlatform
source = glob.glob(os.path.join(os.path.dirname(os.__file__), "lib-dynload", "_bisect*.so"))[0]
def look(c_images):
    _linux.C_IMAGES = c_images
    platform = LinuxPlatform()
    read = platform.images_version_reader()
    before = read()
    again = read()
    names = {os.path.realpath(lib.path) for lib in platform.loaded_libraries()
             if lib.path.startswith("/") and lib.text}
    copy = os.path.abspath(f"fresh-{c_images}.so")
    shutil.copy(source, copy)
    ctypes.CDLL(copy)
    after = read()
    found = any(os.path.realpath(lib.path) == copy for lib in platform.loaded_libraries())
    return {"stable": before == again > 0, "changed": after != before, "found": found,
            "names": sorted(names)}
c, maps = look(True), look(False)
emit(c=c, maps=maps)
"""


def test_both_image_readers_see_the_same_libraries_and_every_load(
        tmp_path: pathlib.Path) -> None:
    """The C reader (glibc's list) and the fallback (/proc/self/maps) agree on the
    libraries with code, and each one's version changes when an image is loaded."""
    s = run_scenario(READERS, tmp_path)
    c, maps = s.result["c"], s.result["maps"]
    for reader in (c, maps):
        assert reader["stable"] and reader["changed"] and reader["found"], reader
    # The fallback sees the first copy the C look loaded, and nothing else differs.
    assert set(c["names"]) <= set(maps["names"])
    assert {pathlib.Path(n).name for n in set(maps["names"]) - set(c["names"])} == \
        {"fresh-True.so"}
