"""Build the small C fixtures in ``tests/native/`` with gcc, at test time.

The fixtures reproduce real fork hazards: a GNU OpenMP pool, a C thread
holding a pthread mutex, a CUDA driver stand-in with its event thread, an
imitation of libdispatch that traps in a forked child, a library that does its
work on its own worker and I/O threads, and one that ends a child it finds forked.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess

HERE = pathlib.Path(__file__).resolve().parent / "native"
SKIP_REASON = "gcc is not installed: the native fixtures (tests/native/*.c) cannot be built"

# fixture name -> (output file name, extra gcc flags)
FIXTURES = {
    "omp_pool": ("libomp_pool.so", ["-fopenmp"]),
    "native_mutex": ("libnative_mutex.so", ["-pthread"]),
    "fake_cuda": ("libcuda.so.1", ["-pthread"]),
    "fake_dispatch": ("libdispatch.so", ["-pthread"]),
    "worker_pool": ("libworker_pool.so", ["-pthread"]),
    "forkcheck": ("libforkcheck.so", ["-pthread"]),
}


def gcc_available() -> bool:
    return shutil.which("gcc") is not None


def build(name: str, out_dir: pathlib.Path) -> pathlib.Path:
    """Compile fixture ``name`` into ``out_dir``; raise with gcc's output on failure."""
    output, flags = FIXTURES[name]
    target = out_dir / output
    proc = subprocess.run(
        ["gcc", "-shared", "-fPIC", "-O1", "-Wall", *flags, "-o", str(target),
         str(HERE / f"{name}.c")],
        capture_output=True, text=True, timeout=120,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"gcc failed to build {name}:\n{proc.stderr}")
    return target
