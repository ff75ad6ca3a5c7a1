"""Linux: ``dl_iterate_phdr`` for images, procfs for threads and their stacks.

Attributing a native thread to a library is the heart of telling a *loaded*
runtime from an *active* one: GNU OpenMP names no thread, so its pool can only
be recognised by what its threads are running. A thread blocked in a system
call exposes its stack pointer in ``/proc/self/task/TID/syscall``; reading the
live part of its stack through ``/proc/self/mem`` (never by dereferencing a
pointer, so a racing thread cannot make us fault) and mapping every word that
points into some library's executable segment back to that library gives the
chain of return addresses, outermost (the start routine) at the top of the
stack. This is the same idea a conservative stack scanner uses; stale words can
add a library, but the outermost frames — the ones we rank by — are live.
"""

from __future__ import annotations

import array
import bisect
import os
import sys
import threading
from typing import Any, Callable

from forksafe._platform._types import LoadedLibrary, OSThread

PT_LOAD = 1
PF_X = 1

#: How much of a thread's live stack to read. Idle pool workers use well under
#: this between their start routine and the blocking system call; glibc keeps
#: the thread descriptor and static TLS above it in the same mapping.
STACK_SCAN_BYTES = 48 * 1024

#: Libraries every thread passes through, which say nothing about who owns it.
TRANSPARENT = ("libc.so", "libc-", "libpthread", "ld-linux", "libstdc++", "libgcc_s", "[vdso]")


#: A mapping from /proc/self/maps: start, end, permissions, path ("" if anonymous).
_Span = tuple[int, int, str, str]

#: Whether glibc's image list may be read through ``forksafe._speedups`` (off: from
#: /proc/self/maps, the way without the extension; tests of both).
C_IMAGES = True


def _reader() -> Any:
    """``forksafe._speedups`` when it was built with the image reader, else None.

    Never a ctypes callback to ``dl_iterate_phdr``: glibc holds its loader lock
    while it calls the callback, which would need the GIL, while a thread that
    imports an extension module holds the GIL and waits in ``dlopen`` for that
    lock — a deadlock of the host program, seen in a fork storm.
    """
    global _native
    if not C_IMAGES:
        return None
    if _native is None:
        try:
            from forksafe import _speedups
        except ImportError:  # not built: no compiler where forksafe was installed
            _native = False
        else:
            _native = _speedups if hasattr(_speedups, "images") else False
    return _native or None


#: ``forksafe._speedups`` once looked up; False: not built, or without the image reader.
_native: Any = None


class LinuxPlatform:
    """The Linux backend; all ctypes set-up happens on first use, not on import."""

    name = "linux"

    def __init__(self, proc: str = "/proc/self") -> None:
        self._proc = proc
        self._exe: str | None = None
        self._tid_off: int | None = None
        #: (images version, the libraries then): reused while nothing is (un)loaded.
        self._images: tuple[int, list[LoadedLibrary]] | None = None
        # A thread's start routine never changes: (tid, start time) -> stack libraries.
        self._owners: dict[tuple[int, str], tuple[str, ...]] = {}
        self._maps: tuple[str, list[_Span]] = ("", [])
        self._version: Callable[[], int] | None = None

    # -- images ---------------------------------------------------------------

    def images_version(self) -> int | None:
        """glibc's counts of images loaded and unloaded so far, as one number; None if unknown.

        Equal answers mean the same set of images (nothing was ``dlopen``ed or
        ``dlclose``d in between).
        """
        packed = self.images_version_reader()()
        return packed if packed > 0 else None

    def images_version_reader(self) -> Callable[[], int]:
        """``images_version`` as a call without arguments (looked up once), <= 0 when unknown.

        It runs whenever the guard sees the address space change size, so it is
        a C function (``_speedups.images_version``: no Python frame, nothing
        written but the answer). Without the extension: a digest of the
        executable file mappings in /proc/self/maps, which change exactly when an
        image is loaded or unloaded.
        """
        if self._version is None:
            native = _reader()
            self._version = native.images_version if native is not None else \
                self._maps_version
        return self._version

    def _maps_version(self) -> int:
        spans = self._mappings()
        return hash(tuple((lo, path) for lo, _, perms, path in spans
                          if "x" in perms and path)) & ((1 << 62) - 1) | 1

    def loaded_libraries(self) -> list[LoadedLibrary]:
        if self._exe is None:
            self._exe = os.path.realpath(sys.executable)
        native = _reader()
        if native is None:
            return self._maps_libraries()
        version = native.images_version()
        cached = self._images
        if cached is not None and version > 0 and cached[0] == version:
            return list(cached[1])  # nothing loaded or unloaded since last time
        counters, images = native.images()
        found = []
        for raw, text in images:
            # The main program reports an empty name; the vDSO reports its soname.
            path = raw.decode(errors="replace") if raw else self._exe
            found.append(LoadedLibrary(path, text))
        if counters is not None and counters[0] < 1 << 31 and counters[1] < 1 << 31:
            self._images = ((counters[0] << 32 | counters[1]) + 1, found)
        return list(found)

    def _maps_libraries(self) -> list[LoadedLibrary]:
        """Every executable file mapping, one library per path, in address order."""
        ranges: dict[str, list[tuple[int, int]]] = {}
        for lo, hi, perms, path in self._mappings():
            if ("x" in perms and path and not path.startswith("[")) or path == "[vdso]":
                ranges.setdefault(path, []).append((lo, hi))
        return [LoadedLibrary(path, tuple(text)) for path, text in ranges.items()]

    # -- threads --------------------------------------------------------------

    def threads(self, skip: frozenset[int], libraries: list[LoadedLibrary]) -> list[OSThread]:
        task = f"{self._proc}/task"
        try:
            tids = [int(t) for t in os.listdir(task)]
        except OSError:
            return []
        others = [tid for tid in tids if tid not in skip]
        if not others:
            return []
        process_name = _read(f"{self._proc}/comm").rstrip("\n")
        locator = _Locator(libraries)
        spans: list[_Span] | None = None
        tops: dict[int, int] | None = None
        owners: dict[tuple[int, str], tuple[str, ...]] = {}
        result = []
        for tid in sorted(others):
            base = f"{task}/{tid}"
            name = _read(f"{base}/comm").rstrip("\n")
            stat = _read(f"{base}/stat")
            if not name or not stat:
                continue  # exited while we looked
            state, started = _state(stat)
            key = (tid, started)
            libs = self._owners.get(key)
            if libs is None:
                sp = _stack_pointer(_read(f"{base}/syscall"))
                if spans is None:
                    spans = self._mappings()
                stack = b""
                if sp is not None:
                    stack = self._read_stack(sp, spans)
                else:
                    # On a CPU: no stack pointer to be had, but the outermost frames
                    # sit just below the thread descriptor at the top of its stack.
                    if tops is None:
                        tops = self._stack_tops(spans)
                    if tid in tops:
                        stack = self._pread(tops[tid] - STACK_SCAN_BYTES, STACK_SCAN_BYTES)
                libs = locator.scan(stack)
            owner = libs[-1] if libs and not _transparent(libs[-1]) else None
            if owner is not None:
                owners[key] = libs  # only a found owner is final; retry the others
            result.append(OSThread(tid, name, state, libs, owner, name != process_name))
        self._owners = owners  # forget threads that are gone: bounded by live threads
        return result

    def _mappings(self) -> list[_Span]:
        text = _read(f"{self._proc}/maps")
        if text != self._maps[0]:
            self._maps = (text, _parse_maps(text))
        return self._maps[1]

    def _stack_tops(self, spans: list[_Span]) -> dict[int, int]:
        """Thread id -> the end of the mapping that holds that thread's descriptor.

        glibc places each thread's ``struct pthread`` at the top of its stack
        mapping; its header starts with two pointers to itself (``tcb`` and,
        two words on, ``self``). Finding those self-pointers in the last pages
        of anonymous mappings, and the tid at the offset learned from our own
        descriptor, maps every glibc thread to its stack without stopping it.
        """
        offset = self._tid_offset()
        if offset is None:
            return {}
        tops: dict[int, int] = {}
        window = 8192
        for lo, hi, perms, path in spans:
            if not perms.startswith("rw") or path or hi - lo < window:
                continue
            base = hi - window
            data = self._pread(base, window)
            if len(data) != window:
                continue
            words = array.array("Q", data)
            for i, (word, address) in enumerate(zip(words[::8], range(base, hi, 64))):
                if word == address and words[i * 8 + 2] == address:
                    at = i * 64 + offset
                    if at + 4 <= window:
                        tops[int.from_bytes(data[at : at + 4], sys.byteorder)] = hi
        return tops

    def _tid_offset(self) -> int | None:
        if self._tid_off is None:
            self._tid_off = -1
            me = threading.get_ident()  # on Linux, pthread_self(): our struct pthread
            data = self._pread(me, 4096)
            if len(data) == 4096:
                words = array.array("Q", data[:24])
                if words[0] == me and words[2] == me:
                    tid = threading.get_native_id().to_bytes(4, sys.byteorder)
                    at = data.find(tid, 24)
                    while at != -1 and at % 4:
                        at = data.find(tid, at + 1)
                    self._tid_off = at
        return None if self._tid_off < 0 else self._tid_off

    def native_id(self, ident: int) -> int | None:
        """The tid in the ``struct pthread`` at ``ident`` (glibc's ``pthread_self()``).

        Read through ``/proc/self/mem``, which fails cleanly on a bad address, and
        only after the descriptor's two self-pointers confirm that ``ident`` is one.
        """
        offset = self._tid_offset()
        if offset is None or ident <= 0:
            return None
        data = self._pread(ident, offset + 4)
        if len(data) != offset + 4:
            return None
        words = array.array("Q", data[:24])
        if words[0] != ident or words[2] != ident:
            return None
        tid = int.from_bytes(data[offset:offset + 4], sys.byteorder)
        return tid if tid > 0 else None

    def _pread(self, address: int, size: int) -> bytes:
        return read_memory(f"{self._proc}/mem", address, size)

    def _read_stack(self, sp: int, spans: list[_Span]) -> bytes:
        i = bisect.bisect_right(spans, (sp, sys.maxsize)) - 1
        if i < 0 or not spans[i][0] <= sp < spans[i][1]:
            return b""
        end = min(spans[i][1], sp + STACK_SCAN_BYTES)
        return self._pread(sp, end - sp)

    # -- flags ----------------------------------------------------------------

    def call_flag(self, library: str, symbol: str) -> int | None:
        # ctypes only here, for a runtime with a flag function: importing it (and
        # libffi) for every guarded process made each fork copy its pages too.
        import ctypes

        mode = getattr(os, "RTLD_NOLOAD", 4) | getattr(os, "RTLD_LAZY", 1)
        try:
            lib = ctypes.CDLL(library, mode=mode)
            func = getattr(lib, symbol)
        except (OSError, AttributeError):
            return None
        func.argtypes = []
        func.restype = ctypes.c_int
        return int(func())


class _Locator:
    """Maps code addresses back to the library whose executable segment holds them."""

    def __init__(self, libraries: list[LoadedLibrary]) -> None:
        spans = sorted((s, e, lib.path) for lib in libraries for s, e in lib.text if e > s)
        self._starts = [s for s, _, _ in spans]
        self._spans = spans
        self._low = spans[0][0] if spans else 0
        self._high = max((e for _, e, _ in spans), default=0)

    def scan(self, stack: bytes) -> tuple[str, ...]:
        """Libraries on the stack, outermost first, up to the first one that owns the thread.

        The top of the stack is outermost. Scanning stops at the first library
        that is not plumbing (see ``TRANSPARENT``): that is the start routine's,
        and going deeper would only cost time and add stale words.
        """
        usable = len(stack) - len(stack) % 8
        if not usable or not self._spans:
            return ()
        words = array.array("Q", stack[:usable])
        low, high, starts, spans = self._low, self._high, self._starts, self._spans
        seen: dict[str, None] = {}
        for word in reversed(words):
            if low <= word < high:
                i = bisect.bisect_right(starts, word) - 1
                if i >= 0 and word < spans[i][1] and spans[i][2] not in seen:
                    path = spans[i][2]
                    seen[path] = None
                    if not _transparent(path):
                        break
        return tuple(seen)


def _transparent(path: str) -> bool:
    base = os.path.basename(path)
    return any(base.startswith(t) for t in TRANSPARENT)


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _state(stat: str) -> tuple[str, str]:
    """The thread's state and its start time (field 22), which tells a reused tid apart."""
    # Field 2 (comm) may hold spaces and parentheses; the state follows the last ')'.
    tail = stat.rpartition(")")[2].split()
    code = tail[0] if tail else "?"
    started = tail[19] if len(tail) > 19 else ""
    return _STATES.get(code, "unknown"), started


_STATES = {
    "R": "running",
    "S": "sleeping",
    "D": "disk-wait",
    "T": "stopped",
    "t": "traced",
    "Z": "zombie",
}


def _stack_pointer(syscall: str) -> int | None:
    # "NR arg1..arg6 sp pc" while blocked in a system call; "running" or "-1 sp pc" otherwise.
    fields = syscall.split()
    if len(fields) == 9:
        try:
            return int(fields[7], 16)
        except ValueError:
            return None
    return None


def _parse_maps(maps: str) -> list[_Span]:
    spans = []
    for line in maps.splitlines():
        fields = line.split(None, 5)
        if len(fields) < 5:
            continue
        lo, _, hi = fields[0].partition("-")
        try:
            path = fields[5] if len(fields) > 5 else ""
            spans.append((int(lo, 16), int(hi, 16), fields[1], path))
        except ValueError:
            continue
    spans.sort()
    return spans


def read_memory(mem_path: str, address: int, size: int) -> bytes:
    """Up to ``size`` bytes at ``address`` of a process's ``/proc/<pid>/mem``; b"" if unreadable.

    Reading through the file, never through a pointer, means a page unmapped
    meanwhile is an error here instead of a crash of the process that reads.
    """
    try:
        fd = os.open(mem_path, os.O_RDONLY)
    except OSError:
        return b""
    try:
        return os.pread(fd, size, address)
    except OSError:
        return b""
    finally:
        os.close(fd)
