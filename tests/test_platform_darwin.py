"""The macOS backend's logic, driven on Linux through a fake ``MachAPI``.

Nothing here calls a macOS API: the fake stands in for dyld, the Mach thread
list and our own memory, and the tests prove what ``DarwinPlatform`` and the
catalog make of those answers. The real ctypes layer (``_darwin._Mach``) is
not verified on macOS; docs/macos.md says so.
"""

from __future__ import annotations

import gc
import json
import pathlib
import sqlite3
import struct
import subprocess
import sys
import warnings
from collections import Counter
from typing import Any, Iterator

import pytest

import _native
from conftest import run_scenario
from forksafe import ForkSafetyWarning, _catalog, _check, _ledger
from forksafe._platform import LoadedLibrary, OSThread
from forksafe._platform import _darwin as darwin
from forksafe._probes import native
from forksafe._probes.sqlite import open_connections
from forksafe._report import Hazard, Severity

# -- a fake macOS ----------------------------------------------------------------------------

CLT = "/Library/Developer/CommandLineTools/Library/Frameworks/Python3.framework/Versions/3.9"
DYNLOAD = f"{CLT}/lib/python3.9/lib-dynload"
DISPATCH = "/usr/lib/system/libdispatch.dylib"
SYSTEM_SQLITE = "/usr/lib/libsqlite3.dylib"
COREFOUNDATION = "/System/Library/Frameworks/CoreFoundation.framework/Versions/A/CoreFoundation"

#: The image list of Apple's python3 (Command Line Tools, 3.9, arm64) after
#: ``import sqlite3``, in dyld order, written after the shape of lldb's
#: ``image list`` on macOS 13/14 (abridged: libSystem pulls in ~40
#: /usr/lib/system images). Not captured on this machine: there is no Mac here.
#: The second field says whether dyld maps it from the shared cache.
APPLE_PYTHON_IMAGES: list[tuple[str, bool]] = [
    (f"{CLT}/Resources/Python.app/Contents/MacOS/Python", False),
    (f"{CLT}/Python3", False),
    ("/usr/lib/libSystem.B.dylib", True),
    ("/usr/lib/system/libcache.dylib", True),
    ("/usr/lib/system/libcommonCrypto.dylib", True),
    ("/usr/lib/system/libcompiler_rt.dylib", True),
    ("/usr/lib/system/libcorecrypto.dylib", True),
    (DISPATCH, True),
    ("/usr/lib/system/libdyld.dylib", True),
    ("/usr/lib/system/libsystem_c.dylib", True),
    ("/usr/lib/system/libsystem_kernel.dylib", True),
    ("/usr/lib/system/libsystem_malloc.dylib", True),
    ("/usr/lib/system/libsystem_platform.dylib", True),
    ("/usr/lib/system/libsystem_pthread.dylib", True),
    ("/usr/lib/system/libsystem_trace.dylib", True),
    ("/usr/lib/system/libxpc.dylib", True),
    ("/usr/lib/libobjc.A.dylib", True),
    ("/usr/lib/libc++abi.dylib", True),
    ("/usr/lib/libc++.1.dylib", True),
    (COREFOUNDATION, True),
    ("/usr/lib/libicucore.A.dylib", True),
    ("/usr/lib/libz.1.dylib", True),
    (f"{DYNLOAD}/_heapq.cpython-39-darwin.so", False),
    (f"{DYNLOAD}/_sqlite3.cpython-39-darwin.so", False),
    (SYSTEM_SQLITE, True),
]

#: The same program under the python.org framework build, which bundles its own SQLite.
PYTHON_ORG = "/Library/Frameworks/Python.framework/Versions/3.12"
BUNDLED_SQLITE_IMAGES: list[tuple[str, bool]] = [
    (f"{PYTHON_ORG}/Resources/Python.app/Contents/MacOS/Python", False),
    (f"{PYTHON_ORG}/Python", False),
    *[(p, c) for p, c in APPLE_PYTHON_IMAGES[2:22]],
    (f"{PYTHON_ORG}/lib/python3.12/lib-dynload/_sqlite3.cpython-312-darwin.so", False),
    (f"{PYTHON_ORG}/lib/libsqlite3.0.dylib", False),
]

TEXT_VMADDR = 0x1_8000_0000
TEXT_SIZE = 0x4000
SLIDE = 0x2000_0000
LABEL_OFFSET = 0x48  # dqo_label in a recent dispatch_queue_offsets
OFFSETS_ADDRESS = 0x7000_0000


def macho(flags: int = 0, *, segments: tuple[bytes, ...] = (b"__PAGEZERO", b"__TEXT", b"__DATA"),
          extra: bytes = b"") -> bytes:
    """A mach_header_64 and its load commands: segments plus an LC_UUID to skip over."""
    commands = []
    for i, name in enumerate(segments):
        vmaddr = TEXT_VMADDR + i * TEXT_SIZE
        commands.append(struct.pack("<II16sQQQQiiII", darwin.LC_SEGMENT_64, 72,
                                    name, vmaddr, TEXT_SIZE, 0, TEXT_SIZE, 5, 5, 0, 0))
    commands.append(struct.pack("<II16s", 0x1B, 24, b"u" * 16))  # LC_UUID
    body = b"".join(commands) + extra
    header = struct.pack("<IiiIIIII", darwin.MH_MAGIC_64, 0x0100000C, 0, 6,
                         len(commands) + (1 if extra else 0), len(body), flags, 0)
    return header + body


class FakeMach:
    """dyld, the task's threads and its memory, as plain data; counts every call."""

    def __init__(
        self,
        images: list[tuple[str, bool]] = APPLE_PYTHON_IMAGES,
        threads: list[darwin.RawThread] | None = None,
        *,
        memory: dict[int, bytes] | None = None,
        flags: dict[tuple[str, str], int] | None = None,
        label_offset: int | None = LABEL_OFFSET,
    ) -> None:
        self.images: list[tuple[str | None, int]] = []
        self.memory: dict[int, bytes] = dict(memory or {})
        for path, cached in images:
            self.add_image(path, cached=cached)
        self.raw_threads = list(threads or [])
        self.flags = dict(flags or {})
        self.symbols: dict[tuple[str, str], int] = {}
        if label_offset is not None:
            self.symbols[(DISPATCH, darwin.QUEUE_OFFSETS_SYMBOL)] = OFFSETS_ADDRESS
            self.memory[OFFSETS_ADDRESS] = struct.pack("<HHHH", 6, label_offset, 8, 0)
        self.calls: Counter[str] = Counter()
        self.call_args: list[tuple[str, str, bool]] = []
        self.thread_error: OSError | None = None

    def add_image(self, path: str | None, *, cached: bool = True, header: bytes | None = None
                  ) -> int:
        address = 0x1_0000_0000 + len(self.images) * 0x10_0000
        self.memory[address] = macho(darwin.MH_DYLIB_IN_CACHE if cached else 0
                                     ) if header is None else header
        self.images.append((path, address))
        return address

    # MachAPI
    def image_count(self) -> int:
        self.calls["image_count"] += 1
        return len(self.images)

    def image(self, index: int) -> darwin.RawImage:
        self.calls["image"] += 1
        path, address = self.images[index]
        return darwin.RawImage(path, address, SLIDE)

    def threads(self) -> list[darwin.RawThread]:
        self.calls["threads"] += 1
        if self.thread_error is not None:
            raise self.thread_error
        return list(self.raw_threads)

    def read(self, address: int, size: int) -> bytes:
        """Like mach_vm_read_overwrite: all of the range is mapped, or nothing is read."""
        self.calls["read"] += 1
        for start, blob in self.memory.items():
            if start <= address and address + size <= start + len(blob):
                return blob[address - start: address - start + size]
        return b""

    def symbol(self, library: str, symbol: str) -> int | None:
        self.calls["symbol"] += 1
        return self.symbols.get((library, symbol))

    def call(self, library: str, symbol: str, *, boolean: bool) -> int | None:
        self.call_args.append((library, symbol, boolean))
        if not any(path == library for path, _ in self.images):
            return None  # RTLD_NOLOAD: not loaded, not opened
        return self.flags.get((library, symbol))


def worker(tid: int, label: str | None, *, name: str = "", slot: int | None = None,
           memory: dict[int, bytes], state: int = 3) -> darwin.RawThread:
    """A thread whose dispatch slot points at a queue labelled ``label`` (None: idle)."""
    slot = slot if slot is not None else 0x5000_0000 + tid * 0x100
    if label is None:
        memory[slot] = b"\0" * 8
    else:
        queue = 0x6000_0000 + tid * 0x1000
        text = 0x6800_0000 + tid * 0x1000
        memory[slot] = queue.to_bytes(8, "little")
        memory[queue] = b"\xaa" * LABEL_OFFSET + text.to_bytes(8, "little")
        memory[text] = label.encode().ljust(darwin.MAX_LABEL, b"\0")  # rest of the page
    return darwin.RawThread(tid, state, 0, name, slot)


def platform_for(fake: FakeMach) -> darwin.DarwinPlatform:
    return darwin.DarwinPlatform(api=fake)


# -- images ------------------------------------------------------------------------------


def test_images_in_dyld_order_with_slid_text_and_shared_cache_flag() -> None:
    """Each image becomes a library with its slid __TEXT range; cache membership is kept."""
    fake = FakeMach()
    platform = platform_for(fake)
    libs = platform.loaded_libraries()
    assert [lib.path for lib in libs] == [p for p, _ in APPLE_PYTHON_IMAGES]
    text = (TEXT_VMADDR + TEXT_SIZE + SLIDE, TEXT_VMADDR + 2 * TEXT_SIZE + SLIDE)
    assert {lib.text for lib in libs} == {(text,)}
    assert platform.in_shared_cache(SYSTEM_SQLITE)
    assert platform.in_shared_cache(DISPATCH)
    assert not platform.in_shared_cache(f"{DYNLOAD}/_sqlite3.cpython-39-darwin.so")
    assert not platform.in_shared_cache("/not/loaded.dylib")


def test_image_list_is_reread_only_when_it_changed() -> None:
    """An unchanged count and last image cost two calls; a new image is parsed alone."""
    fake = FakeMach()
    platform = platform_for(fake)
    first = platform.loaded_libraries()
    fake.calls.clear()
    assert platform.loaded_libraries() == first
    assert fake.calls == Counter({"image_count": 1, "image": 1})
    fake.add_image("/opt/homebrew/lib/libomp.dylib", cached=False)
    fake.calls.clear()
    again = platform.loaded_libraries()
    assert [lib.path for lib in again] == [*[lib.path for lib in first],
                                           "/opt/homebrew/lib/libomp.dylib"]
    assert fake.calls["read"] == 2  # the new image's header and load commands, nothing else


def test_unload_and_load_of_another_image_is_noticed() -> None:
    """Same count, different last image: the list is read again."""
    fake = FakeMach()
    platform = platform_for(fake)
    platform.loaded_libraries()
    fake.images.pop(3)
    fake.add_image("/usr/local/lib/libgomp.1.dylib", cached=False)
    paths = [lib.path for lib in platform.loaded_libraries()]
    assert "/usr/local/lib/libgomp.1.dylib" in paths
    assert "/usr/lib/system/libcache.dylib" not in paths


def test_image_unloaded_while_listing_is_skipped() -> None:
    """dyld answering NULL for a name (image just unloaded) drops that image only."""
    fake = FakeMach(images=[("/a.dylib", True), ("/b.dylib", True)])
    fake.images.insert(1, (None, 0))
    assert [lib.path for lib in platform_for(fake).loaded_libraries()] == ["/a.dylib", "/b.dylib"]


@pytest.mark.parametrize(
    "header",
    [b"", b"\xce\xfa\xed\xfe" + bytes(28), macho(segments=()),
     macho(segments=(b"__TEXT",))[:40]],
    ids=["unreadable", "32-bit", "no-text", "truncated-commands"],
)
def test_odd_headers_still_list_the_library(header: bytes) -> None:
    """An unreadable, foreign or malformed header yields the path without a text range."""
    fake = FakeMach(images=[])
    fake.add_image("/odd.dylib", header=header)
    if not header:
        del fake.memory[fake.images[0][1]]
    [lib] = platform_for(fake).loaded_libraries()
    assert lib.path == "/odd.dylib"
    assert lib.text == ()


def test_malformed_commands_after_text_keep_the_text() -> None:
    """A zero cmdsize stops parsing without losing what came before or looping."""
    fake = FakeMach(images=[])
    fake.add_image("/x.dylib", header=macho(segments=(b"__TEXT",), extra=struct.pack("<II", 7, 0)))
    [lib] = platform_for(fake).loaded_libraries()
    assert lib.text == ((TEXT_VMADDR + SLIDE, TEXT_VMADDR + SLIDE + TEXT_SIZE),)


# -- threads -----------------------------------------------------------------------------


def test_threads_skip_python_threads_and_map_run_states() -> None:
    """Skipped tids are dropped; Mach run states and suspension read like Linux states."""
    memory: dict[int, bytes] = {}
    raws = [
        darwin.RawThread(0x30, 1, 0, "cpu-bound", 0),
        darwin.RawThread(0x10, 3, 0, "", 0),
        darwin.RawThread(0x20, 3, 0, "python-thread", 0),
        darwin.RawThread(0x40, 3, 2, "suspended", 0),
        darwin.RawThread(0x50, 4, 0, "in-io", 0),
        darwin.RawThread(0x60, 99, 0, "odd", 0),
    ]
    fake = FakeMach(threads=raws, memory=memory)
    platform = platform_for(fake)
    found = platform.threads(frozenset({0x20}), platform.loaded_libraries())
    assert found == [
        OSThread(0x10, "", "sleeping", (), None, False),
        OSThread(0x30, "cpu-bound", "running", (), None, True),
        OSThread(0x40, "suspended", "stopped", (), None, True),
        OSThread(0x50, "in-io", "disk-wait", (), None, True),
        OSThread(0x60, "odd", "unknown", (), None, True),
    ]


def test_unnamed_worker_is_named_by_its_queue_and_owned_by_libdispatch() -> None:
    """A GCD worker serving a global queue carries that queue's label and libdispatch as owner."""
    memory: dict[int, bytes] = {}
    raws = [worker(0x1001, "com.apple.root.default-qos", memory=memory),
            worker(0x1002, "com.apple.root.user-initiated-qos.overcommit", memory=memory)]
    fake = FakeMach(threads=raws, memory=memory)
    platform = platform_for(fake)
    found = platform.threads(frozenset(), platform.loaded_libraries())
    assert [(t.name, t.owner, t.named) for t in found] == [
        ("com.apple.root.default-qos", DISPATCH, True),
        ("com.apple.root.user-initiated-qos.overcommit", DISPATCH, True),
    ]
    assert fake.calls["symbol"] == 1  # the label offset is looked up once per process


def test_idle_worker_and_named_thread_are_left_alone() -> None:
    """An idle slot gives no label; a named thread inside dispatch_sync keeps its name."""
    memory: dict[int, bytes] = {}
    raws = [worker(0x2001, None, memory=memory),
            worker(0x2002, "com.example.serial", name="app-io", memory=memory)]
    fake = FakeMach(threads=raws, memory=memory)
    platform = platform_for(fake)
    found = platform.threads(frozenset(), platform.loaded_libraries())
    assert [(t.name, t.owner, t.named) for t in found] == [("", None, False),
                                                            ("app-io", None, True)]


@pytest.mark.parametrize("missing", ["slot", "queue", "label", "offsets"])
def test_unreadable_dispatch_memory_gives_no_label(missing: str) -> None:
    """Any read that fails (freed queue, unknown layout) leaves the thread unnamed, no error."""
    memory: dict[int, bytes] = {}
    raw = worker(0x3001, "com.apple.root.default-qos", memory=memory)
    queue = int.from_bytes(memory[raw.dispatch_qaddr], "little")
    text = int.from_bytes(memory[queue][LABEL_OFFSET:], "little")
    fake = FakeMach(threads=[raw], memory=memory)
    unmapped = {"slot": raw.dispatch_qaddr, "queue": queue, "label": text,
                "offsets": OFFSETS_ADDRESS}[missing]
    del fake.memory[unmapped]
    platform = platform_for(fake)
    [thread] = platform.threads(frozenset(), platform.loaded_libraries())
    assert (thread.name, thread.owner, thread.named) == ("", None, False)


def test_label_read_does_not_cross_into_an_unmapped_page() -> None:
    """A label ending a page is read up to the page end, and completed from the next if mapped."""
    memory: dict[int, bytes] = {}
    raw = worker(0x4001, "x", memory=memory)
    queue = int.from_bytes(memory[raw.dispatch_qaddr], "little")
    text = 0x6900_0000 - 10  # 10 bytes before a page boundary
    memory[queue] = b"\xaa" * LABEL_OFFSET + text.to_bytes(8, "little")
    memory[text] = b"com.apple."
    fake = FakeMach(threads=[raw], memory=memory)
    platform = platform_for(fake)
    assert [t.name for t in platform.threads(frozenset(), platform.loaded_libraries())] == [
        "com.apple."]
    fake.memory[0x6900_0000] = b"root.utility-qos\0" + bytes(60)
    platform = platform_for(fake)
    assert [t.name for t in platform.threads(frozenset(), platform.loaded_libraries())] == [
        "com.apple.root.utility-qos"]


def test_no_libdispatch_image_means_no_label_lookup() -> None:
    """Without libdispatch among the images nothing is read through dispatch slots."""
    memory: dict[int, bytes] = {}
    fake = FakeMach(images=[("/bin/tool", False)], memory=memory,
                    threads=[worker(0x5001, "com.apple.root.default-qos", memory=memory)])
    platform = platform_for(fake)
    [thread] = platform.threads(frozenset(), platform.loaded_libraries())
    assert thread.name == ""
    assert fake.calls["symbol"] == 0


@pytest.fixture
def fresh_failures() -> Iterator[None]:
    """check() warns once per probe per process: forget the native probe's failure."""
    _check._reported_failures.discard("native")
    yield
    _check._reported_failures.discard("native")


def test_failing_thread_list_becomes_one_probe_error(fresh_failures: None) -> None:
    """task_threads failing is reported by check() as a probe error, once, and the check goes on."""
    fake = FakeMach()
    fake.thread_error = OSError(darwin.THREADS_FAILED.format(code=5))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = _check.check_with(platform=platform_for(fake), probes=[("native", native.probe)])
        _check.check_with(platform=platform_for(fake), probes=[("native", native.probe)])
    [hazard] = report.hazards
    assert hazard.kind == "probe-error"
    assert darwin.THREADS_FAILED.format(code=5) in hazard.summary
    assert len(caught) == 1


# -- flags -------------------------------------------------------------------------------


def test_call_flag_reads_dispatch_flag_as_bool_and_never_loads() -> None:
    """_dispatch_is_multithreaded is called as a bool function; an absent library gives None."""
    fake = FakeMach(flags={(DISPATCH, "_dispatch_is_multithreaded"): 1})
    platform = platform_for(fake)
    assert platform.call_flag(DISPATCH, "_dispatch_is_multithreaded") == 1
    assert platform.call_flag("/usr/lib/libnope.dylib", "_dispatch_is_multithreaded") is None
    assert platform.call_flag(DISPATCH, "some_int_flag") is None
    assert fake.call_args == [(DISPATCH, "_dispatch_is_multithreaded", True),
                              ("/usr/lib/libnope.dylib", "_dispatch_is_multithreaded", True),
                              (DISPATCH, "some_int_flag", False)]


def test_backend_is_lazy() -> None:
    """Creating the platform calls nothing: ctypes is set up on the first question."""
    platform = darwin.DarwinPlatform()
    assert platform._api is None


@pytest.mark.skipif(sys.platform == "darwin", reason="needs a machine without libSystem")
def test_missing_macos_interfaces_fail_once_with_a_clear_error(fresh_failures: None) -> None:
    """Off macOS the real set-up fails with one clear error, kept rather than retried."""
    platform = darwin.DarwinPlatform()
    with pytest.raises(OSError, match="macOS interfaces forksafe needs are unavailable") as first:
        platform.loaded_libraries()
    with pytest.raises(OSError) as second:
        platform.threads(frozenset(), [])
    assert second.value is first.value
    with pytest.warns(ForkSafetyWarning, match="macOS interfaces"):
        report = _check.check_with(platform=platform, probes=[("native", native.probe)])
    assert [h.kind for h in report.hazards] == ["probe-error"]


# -- the catalog and the native probe over a fake Mac ---------------------------------------


@pytest.fixture
def no_sqlite_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """Isolate from connections other tests opened while observing."""
    monkeypatch.setattr(_ledger, "_connection_origins", {})
    gc.collect()
    assert open_connections() == [], "a test left a sqlite3 connection open"


def native_hazards(fake: FakeMach) -> list[Hazard]:
    report = _check.check_with(platform=platform_for(fake), probes=[("native", native.probe)])
    return list(report.hazards)


def runtime(hazards: list[Hazard], key: str) -> Hazard:
    [hazard] = [h for h in hazards if h.evidence.get("runtime") == key]
    return hazard


WITHOUT_SQLITE = [i for i in APPLE_PYTHON_IMAGES if "sqlite" not in i[0]]


def test_quiet_mac_process_has_no_hazards(no_sqlite_use: None) -> None:
    """Safe twin: libSystem, libobjc and CoreFoundation loaded but unused are not reported."""
    assert native_hazards(FakeMach(images=WITHOUT_SQLITE)) == []


def test_multithreaded_libdispatch_is_an_error_that_claims_its_workers(
    no_sqlite_use: None,
) -> None:
    """_dispatch_is_multithreaded true is an error; GCD workers are its threads, not unknown."""
    memory: dict[int, bytes] = {}
    raws = [worker(0x7001, "com.apple.root.default-qos", memory=memory),
            worker(0x7002, "com.apple.root.utility-qos", memory=memory),
            darwin.RawThread(0x7003, 3, 0, "com.apple.libdispatch-manager", 0)]
    fake = FakeMach(images=WITHOUT_SQLITE, threads=raws, memory=memory,
                    flags={(DISPATCH, "_dispatch_is_multithreaded"): 1})
    hazards = native_hazards(fake)
    assert [h.kind for h in hazards] == ["native-runtime"]
    hazard = runtime(hazards, "libdispatch")
    assert hazard.severity is Severity.ERROR
    assert hazard.evidence["signals"] == ["_dispatch_is_multithreaded() is true",
                                          "3 live threads"]
    assert {t["tid"] for t in hazard.evidence["threads"]} == {0x7001, 0x7002, 0x7003}
    assert "com.apple.root.default-qos" in hazard.summary


def test_foundation_thread_makes_corefoundation_active(no_sqlite_use: None) -> None:
    """A Foundation-named thread is CoreFoundation's (an error); GCD workers are not."""
    memory: dict[int, bytes] = {}
    raws = [darwin.RawThread(0x8001, 3, 0, "com.apple.NSURLConnectionLoader", 0),
            worker(0x8002, "com.apple.root.default-qos", memory=memory)]
    fake = FakeMach(images=WITHOUT_SQLITE, threads=raws, memory=memory)
    hazards = native_hazards(fake)
    frameworks = runtime(hazards, "apple-frameworks")
    assert frameworks.severity is Severity.ERROR
    assert [t["name"] for t in frameworks.evidence["threads"]] == [
        "com.apple.NSURLConnectionLoader"]
    dispatch = runtime(hazards, "libdispatch")
    assert [t["tid"] for t in dispatch.evidence["threads"]] == [0x8002]
    assert [h for h in hazards if h.kind == "native-thread"] == []


def test_unknown_native_threads_on_mac_are_warnings(no_sqlite_use: None) -> None:
    """A named non-Apple thread and an idle unnamed one are reported as unknown native threads."""
    memory: dict[int, bytes] = {}
    raws = [darwin.RawThread(0x9001, 3, 0, "tokio-runtime-w", 0),
            worker(0x9002, None, memory=memory)]
    fake = FakeMach(images=WITHOUT_SQLITE, threads=raws, memory=memory)
    hazards = native_hazards(fake)
    assert [(h.kind, h.severity) for h in hazards] == [("native-thread", Severity.WARNING)] * 2
    assert "'tokio-runtime-w'" in hazards[0].summary
    assert "(unnamed)" in hazards[1].summary


def test_apple_sqlite_loaded_is_a_warning(no_sqlite_use: None) -> None:
    """Apple's system SQLite loaded but no connection opened yet is a warning."""
    hazard = runtime(native_hazards(FakeMach()), "apple-sqlite")
    assert hazard.severity is Severity.WARNING
    assert hazard.evidence["libraries"] == [SYSTEM_SQLITE]
    assert hazard.evidence["active"] is False


def test_apple_sqlite_after_a_connection_is_an_error(no_sqlite_use: None) -> None:
    """Once a sqlite3 connection was opened, Apple's system SQLite is an error."""
    connection = sqlite3.connect(":memory:")
    try:
        hazard = runtime(native_hazards(FakeMach()), "apple-sqlite")
    finally:
        connection.close()
    assert hazard.severity is Severity.ERROR
    assert hazard.evidence["signals"] == ["a connection was opened"]


def test_bundled_sqlite_is_not_apples(no_sqlite_use: None) -> None:
    """The same program on a Python that bundles SQLite gets no Apple-SQLite hazard at all."""
    connection = sqlite3.connect(":memory:")
    try:
        hazards = native_hazards(FakeMach(images=BUNDLED_SQLITE_IMAGES))
    finally:
        connection.close()
    assert hazards == []


def test_recorded_image_list_matches_the_apple_runtimes() -> None:
    """In the Apple python3 image list the catalog finds exactly the Apple runtimes."""
    found: dict[str, list[str]] = {}
    for path, _ in APPLE_PYTHON_IMAGES:
        for entry in _catalog.RUNTIMES:
            if entry.matches_library(path):
                found.setdefault(entry.key, []).append(path)
    assert found == {
        "libdispatch": [DISPATCH],
        "objc": ["/usr/lib/libobjc.A.dylib"],
        "apple-frameworks": [COREFOUNDATION],
        "apple-sqlite": [SYSTEM_SQLITE],
    }


@pytest.mark.parametrize(
    ("name", "key"),
    [("com.apple.root.default-qos", "libdispatch"),
     ("com.apple.root.user-interactive-qos.overcommit", "libdispatch"),
     ("com.apple.libdispatch-manager", "libdispatch"),
     ("com.apple.main-thread", "libdispatch"),
     ("com.apple.CFSocket.private", "apple-frameworks"),
     ("com.apple.NSURLConnectionLoader", "apple-frameworks"),
     ("com.apple.rootless", "apple-frameworks")],
)
def test_apple_thread_names_belong_to_one_runtime(name: str, key: str) -> None:
    """Each Apple thread name is claimed by exactly one runtime, so it is counted once."""
    claimants = [r.key for r in _catalog.RUNTIMES if r.matches_thread_name(name)]
    assert claimants == [key]


def test_owner_claims_a_thread_whatever_its_name() -> None:
    """An unnamed GCD worker the backend attributed to libdispatch belongs to libdispatch."""
    thread = OSThread(1, "", "sleeping", (), DISPATCH, False)
    assert native._belongs(thread, _catalog.find("libdispatch"))
    assert not native._belongs(thread, _catalog.find("apple-frameworks"))
    assert LoadedLibrary(DISPATCH).text == ()


# -- the ctypes layer, run for real against a stand-in with macOS's signatures ---------------


@pytest.fixture(scope="module")
def fake_libsystem(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """tests/native/fake_libsystem.c built as a 'libdispatch.dylib' that is also libSystem."""
    if not _native.gcc_available():
        pytest.skip(_native.SKIP_REASON)
    target = tmp_path_factory.mktemp("darwin") / "libdispatch.dylib"
    proc = subprocess.run(
        ["gcc", "-shared", "-fPIC", "-O1", "-Wall", "-o", str(target),
         str(_native.HERE / "fake_libsystem.c")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return target


STAND_IN = """
import ctypes, json
from forksafe import _check
from forksafe._platform import _darwin
from forksafe._probes import native
path = {path!r}
lib = ctypes.CDLL(path)  # loaded first, as libSystem always is: _Mach opens it RTLD_NOLOAD
lib.fake_setup(path.encode())
mach = _darwin._Mach(path)
platform = _darwin.DarwinPlatform(api=mach)
out = {{}}
"""


def stand_in_result(code: str, lib: pathlib.Path, tmp_path: pathlib.Path) -> dict[str, Any]:
    s = run_scenario(STAND_IN.format(path=str(lib)) + code
                     + "\nprint('DARWIN:' + json.dumps(out))\n", tmp_path, timeout=60)
    lines = [ln for ln in s.stdout.splitlines() if ln.startswith("DARWIN:")]
    assert s.returncode == 0 and lines, s.stderr
    result: dict[str, Any] = json.loads(lines[-1][len("DARWIN:"):])
    return result


def test_ctypes_layer_runs_against_macos_signatures(
    fake_libsystem: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """_Mach's real ctypes calls list images and threads, read labels and return every right."""
    out = stand_in_result("""
libs = platform.loaded_libraries()
out["libs"] = [[lib.path, [list(r) for r in lib.text]] for lib in libs]
out["cached"] = [platform.in_shared_cache(lib.path) for lib in libs]
out["threads"] = [[t.tid, t.name, t.state, t.owner, t.named]
                  for t in platform.threads(frozenset(), libs)]
out["skipped"] = [t.tid for t in platform.threads(frozenset({0x6001}), libs)]
out["flag_off"] = platform.call_flag(path, "_dispatch_is_multithreaded")
out["as_int"] = mach.call(path, "_dispatch_is_multithreaded", boolean=False)
lib.fake_set_multithreaded(1)
out["flag_on"] = platform.call_flag(path, "_dispatch_is_multithreaded")
out["absent"] = platform.call_flag("/usr/lib/libnot-loaded.dylib", "_dispatch_is_multithreaded")
ctypes.c_uint32.in_dll(lib, "mach_task_self_").value = 0x207  # as after a fork
out["after_fork"] = len(platform.threads(frozenset(), libs))
out["outstanding"] = lib.fake_outstanding()
hazards = _check.check_with(platform=platform, probes=[("native", native.probe)]).hazards
out["hazards"] = [[h.kind, str(h.severity), h.evidence.get("runtime"),
                   [t["name"] for t in h.evidence.get("threads", [])]] for h in hazards]
""", fake_libsystem, tmp_path)
    me = str(fake_libsystem)
    assert out["libs"] == [
        ["/fake/bin/python3", [[0x1_8000_1000, 0x1_8000_5000]]],
        [me, [[0x1_8010_2000, 0x1_8010_6000]]],
        ["/usr/lib/libsqlite3.dylib", [[0x1_8020_3000, 0x1_8020_7000]]],
    ]
    assert out["cached"] == [False, True, True]
    # Port 0x1003 ended before thread_info: left out. 0x1002 is a GCD worker.
    assert out["threads"] == [[0x6001, "worker-1", "running", None, True],
                              [0x6002, "com.apple.root.default-qos", "sleeping", me, True]]
    assert out["skipped"] == [0x6002]
    assert (out["flag_off"], out["flag_on"], out["absent"]) == (0, 1, None)
    assert out["as_int"] == 0x7700  # why the bool flag must not be read as int
    assert out["after_fork"] == 2
    assert out["outstanding"] == 0  # every port right and the thread array given back
    assert sorted(out["hazards"]) == [
        ["native-runtime", "error", "libdispatch", ["com.apple.root.default-qos"]],
        ["native-runtime", "warning", "apple-sqlite", []],
        ["native-thread", "warning", None, []],
    ]


def test_ctypes_layer_reports_a_failed_thread_list(
    fake_libsystem: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """task_threads failing raises the one-line THREADS_FAILED error and leaks nothing."""
    out = stand_in_result("""
lib.fake_fail_task_threads(1)
try:
    platform.threads(frozenset(), [])
except OSError as exc:
    out["error"] = str(exc)
out["outstanding"] = lib.fake_outstanding()
""", fake_libsystem, tmp_path)
    assert out == {"error": darwin.THREADS_FAILED.format(code=5), "outstanding": 0}
