"""The runtime catalog: each entry recognises its libraries, and only those."""

from __future__ import annotations

import pytest

from forksafe import _catalog
from forksafe._report import Severity

MATCHES = {
    "gnu-openmp": ["/usr/lib/x86_64-linux-gnu/libgomp.so.1",
                   "/venv/site-packages/scikit_learn.libs/libgomp-a34b3233.so.1.0.0"],
    "llvm-openmp": [
        "/usr/lib/llvm-14/lib/libomp.so.5", "/opt/homebrew/opt/libomp/lib/libomp.dylib",
    ],
    "intel-openmp": ["/opt/intel/lib/libiomp5.so"],
    "openblas": ["/venv/numpy.libs/libscipy_openblas64_-32a4b2a6.so",
                 "/venv/numpy.libs/libopenblas64_p-r0-0cf96a72.3.23.dev.so"],
    "mkl": ["/opt/conda/lib/libmkl_rt.so.2"],
    "tbb": ["/opt/conda/lib/libtbb.so.12"],
    "grpc": ["/venv/grpc/_cython/cygrpc.cpython-311-x86_64-linux-gnu.so", "/usr/lib/libgrpc.so.37"],
    "cuda": ["/usr/lib/x86_64-linux-gnu/libcuda.so.1"],
    "jvm": ["/usr/lib/jvm/java-17/lib/server/libjvm.so"],
    "libdispatch": ["/usr/lib/system/libdispatch.dylib", "/usr/lib/swift/linux/libdispatch.so"],
    "apple-frameworks": [
        "/System/Library/Frameworks/CoreFoundation.framework/Versions/A/CoreFoundation"],
    "objc": ["/usr/lib/libobjc.A.dylib"],
    "apple-sqlite": ["/usr/lib/libsqlite3.dylib"],
    "apple-systemconfiguration": [
        "/System/Library/Frameworks/SystemConfiguration.framework/Versions/A/SystemConfiguration"],
    "rocm": ["/opt/rocm/lib/libamdhip64.so.6"],
    "mpi": ["/usr/lib/x86_64-linux-gnu/libmpi.so.40", "/usr/lib/libmpich.so.12"],
}

NOT_RUNTIMES = [
    "/usr/lib/x86_64-linux-gnu/libc.so.6",
    "/usr/lib/x86_64-linux-gnu/libsqlite3.so.0.8.6",
    "/opt/homebrew/lib/libsqlite3.dylib",  # Homebrew's SQLite does not use libdispatch
    "/usr/lib/libgompish.so",
    "/venv/grpc_tools/_protoc_compiler.cpython-311-x86_64-linux-gnu.so",
    "/usr/lib/x86_64-linux-gnu/libcudart.so.12",
]


@pytest.mark.parametrize(("key", "path"), [(k, p) for k, ps in MATCHES.items() for p in ps])
def test_runtime_matches_its_libraries(key: str, path: str) -> None:
    """Each runtime's pattern matches system and wheel-bundled copies of its library."""
    matching = [r.key for r in _catalog.RUNTIMES if r.matches_library(path)]
    assert matching == [key]


@pytest.mark.parametrize("path", NOT_RUNTIMES)
def test_other_libraries_match_no_runtime(path: str) -> None:
    """Look-alike and unrelated libraries match nothing."""
    assert [r.key for r in _catalog.RUNTIMES if r.matches_library(path)] == []


def test_every_runtime_explains_itself() -> None:
    """Every entry has a why, a remedy, and an active severity at least its loaded one."""
    keys = [r.key for r in _catalog.RUNTIMES]
    assert len(keys) == len(set(keys))
    for runtime in _catalog.RUNTIMES:
        assert len(runtime.why) > 40 and len(runtime.remedy) > 20, runtime.key
        assert runtime.loaded is None or runtime.loaded <= runtime.active
        for signal in runtime.activity:
            assert signal in ("threads", "sqlite-used") or signal.startswith("flag:")


def test_design_md_error_runtimes_are_errors_when_active() -> None:
    """The runtimes documented to crash or hang a forked child are errors when active."""
    for key in ("gnu-openmp", "grpc", "cuda", "libdispatch", "apple-frameworks", "apple-sqlite"):
        assert _catalog.find(key).active is Severity.ERROR, key
    assert _catalog.find("openblas").active is Severity.INFO


def test_thread_name_patterns() -> None:
    """Runtimes that name their threads are recognised by name alone."""
    assert _catalog.find("grpc").matches_thread_name("grpc_global_tim")
    assert _catalog.find("cuda").matches_thread_name("cuda-EvtHandlr")
    assert not _catalog.find("cuda").matches_thread_name("python3")
    with pytest.raises(KeyError, match="known: gnu-openmp"):
        _catalog.find("nope")


def test_known_threads_are_found_by_their_index_as_by_a_full_search() -> None:
    """``known_thread`` looks functions up in an index (every fork checks every thread):
    it finds, for every stack, the entry a search of the whole catalog finds first."""
    from forksafe._catalog import THREADS, known_thread

    stacks = [[("/x/" + suffix, function)] for known in THREADS for suffix, function in known.code]
    stacks += [[("/x/other.py", "run"), *stack] for stack in stacks]
    stacks += [[(f"/x/{a[0][0]}", b[0][1])] for a, b in zip(stacks, stacks[1:])]  # mismatched
    stacks.append([("/x/app.py", "main")])
    for stack in stacks:
        first = next((known for known in THREADS if known.matches(stack)), None)
        assert known_thread(stack) is first, stack
