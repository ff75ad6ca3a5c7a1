"""macOS: the dyld image list, the Mach thread list and libdispatch's own flag.

NOT VERIFIED ON macOS: this module is written against the documented (and, for
libdispatch, the published open-source) macOS interfaces, but our machines run
Linux, so it is exercised only through the fake ``MachAPI`` in
``tests/test_platform_darwin.py``. See docs/macos.md.

The module has two layers, so that everything that can be wrong in Python is
tested on Linux:

``_Mach``
    the only code that calls the OS (through ctypes, set up on first use).
    Each method returns raw records: an image's name, header address and
    slide; a thread's id, run state, pthread name and dispatch-queue slot;
    bytes read from our own memory. It owns every Mach resource it touches
    (thread port rights, the thread array) and releases them before returning.
``DarwinPlatform``
    pure Python over a ``MachAPI``: caching, parsing Mach-O headers, skipping
    threads, naming, run states, attributing dispatch workers, errors.

Reading memory goes through ``mach_vm_read_overwrite`` on our own task, never a
pointer dereference: a dyld image or a dispatch queue freed by another thread
while we look makes the kernel answer "invalid address" instead of crashing the
host. Nothing is ever loaded: libraries are opened only with ``RTLD_NOLOAD``
(and ``RTLD_LOCAL``, because on macOS a NOLOAD ``dlopen`` without it defaults
to ``RTLD_GLOBAL`` and would promote the image's symbols into the global
namespace, changing how later ``dlopen`` calls resolve).
"""

from __future__ import annotations

import ctypes
import os
import re
import struct
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from forksafe._platform._types import LoadedLibrary, OSThread

# -- <mach-o/loader.h> -------------------------------------------------------------------

MH_MAGIC_64 = 0xFEEDFACF
#: Set in the header of every image that dyld maps from its shared cache (macOS 11+):
#: such a library has no file on disk, e.g. /usr/lib/libsqlite3.dylib.
MH_DYLIB_IN_CACHE = 0x80000000
LC_SEGMENT_64 = 0x19
_HEADER = struct.Struct("<IiiIIIII")  # magic cputype cpusubtype filetype ncmds sizeofcmds flags r
_LOAD_COMMAND = struct.Struct("<II")  # cmd cmdsize
_SEGMENT_64 = struct.Struct("<II16sQQ")  # cmd cmdsize segname vmaddr vmsize (then more)
#: An upper bound on the load commands read per image; real dylibs use a few KiB.
MAX_LOAD_COMMANDS = 256 * 1024

# -- <mach/thread_info.h>, <mach/kern_return.h> -------------------------------------------

KERN_SUCCESS = 0
THREAD_BASIC_INFO = 3
THREAD_IDENTIFIER_INFO = 4
#: run_state values of thread_basic_info, named like the Linux backend's states.
RUN_STATES = {1: "running", 2: "stopped", 3: "sleeping", 4: "disk-wait", 5: "halted"}

#: libdispatch's exported flag functions that return C ``bool``: only the low byte of
#: the return register is defined for a bool, so reading it as ``int`` could see garbage.
BOOL_FLAGS = frozenset({"_dispatch_is_multithreaded"})

#: libdispatch, found among the loaded images by path.
_LIBDISPATCH = re.compile(r"/libdispatch\.dylib$")
#: The exported struct that tells debuggers where a queue keeps its label:
#: ``struct dispatch_queue_offsets_s { uint16_t dqo_version; uint16_t dqo_label; ... }``.
QUEUE_OFFSETS_SYMBOL = "dispatch_queue_offsets"
#: Longest queue label read; labels are reverse-DNS names such as com.apple.root.default-qos.
MAX_LABEL = 64
_PAGE = 4096  # the smallest page size on macOS (arm64 uses 16 KiB): a safe read boundary

SETUP_FAILED = "the macOS interfaces forksafe needs are unavailable ({error})"
THREADS_FAILED = (
    "task_threads() failed with kern_return_t {code}: the Mach thread list is unavailable"
)


# -- the seam ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RawImage:
    """One entry of dyld's image list, as dyld answers it.

    ``name`` is ``None`` when dyld returned NULL: the image was unloaded by
    another thread between counting and asking.
    """

    name: str | None
    header: int
    slide: int


@dataclass(frozen=True)
class RawThread:
    """One Mach thread, from ``thread_info`` and libpthread.

    ``tid`` is THREAD_IDENTIFIER_INFO's ``thread_id`` (the value of
    ``pthread_threadid_np`` and ``threading.get_native_id()``); ``name`` is the
    pthread name ("" when unset or not a pthread); ``dispatch_qaddr`` is the
    address of the thread's slot holding the dispatch queue it is serving now.
    """

    tid: int
    run_state: int
    suspend_count: int
    name: str
    dispatch_qaddr: int


class MachAPI(Protocol):
    """The raw OS calls ``DarwinPlatform`` is built on; faked in the tests."""

    def image_count(self) -> int:
        """``_dyld_image_count()``."""
        ...

    def image(self, index: int) -> RawImage:
        """The name, header address and slide of image ``index``."""
        ...

    def threads(self) -> list[RawThread]:
        """Every thread of the task; raises OSError when the list cannot be had."""
        ...

    def read(self, address: int, size: int) -> bytes:
        """Up to ``size`` bytes of our own memory; ``b""`` if unmapped. Never faults."""
        ...

    def symbol(self, library: str, symbol: str) -> int | None:
        """Address of ``symbol`` in an already loaded ``library``, else ``None``."""
        ...

    def call(self, library: str, symbol: str, *, boolean: bool) -> int | None:
        """Call ``symbol(void)`` in an already loaded ``library``, else ``None``."""
        ...

    def pthread_id(self, pthread: int) -> int | None:
        """``pthread_threadid_np`` of a live ``pthread_t``; None if libpthread does not
        know it (it checks the handle against its list of threads first)."""
        ...


# -- the logic -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Image:
    library: LoadedLibrary
    in_shared_cache: bool


class DarwinPlatform:
    """The macOS backend; no ctypes set-up happens before the first question.

    ``api`` is the test seam: by default the real ``_Mach`` calls.
    """

    name = "darwin"

    def __init__(self, *, api: MachAPI | None = None) -> None:
        self._api = api
        # (image count, last raw image) -> the libraries, in dyld order.
        self._images: tuple[tuple[int, RawImage | None], list[_Image]] | None = None
        # Parsed images by (name, header address): headers are immutable once mapped.
        self._parsed: dict[tuple[str, int], _Image] = {}
        self._label_offset: int | None = None
        self._label_offset_known = False
        self._setup_error: OSError | None = None

    @property
    def api(self) -> MachAPI:
        """The OS calls, set up on first use.

        A set-up failure (a symbol missing from an old or future macOS) is
        kept and raised again on every later question, cheaply: the probes
        turn it into one reported probe error instead of retrying ``dlopen``
        on every fork.
        """
        if self._api is None:
            if self._setup_error is not None:
                raise self._setup_error
            try:
                self._api = _Mach()
            except (OSError, AttributeError, ValueError) as exc:
                error = f"{type(exc).__name__}: {exc}"
                self._setup_error = OSError(SETUP_FAILED.format(error=error))
                raise self._setup_error from exc
        return self._api

    # -- images ---------------------------------------------------------------

    def loaded_libraries(self) -> list[LoadedLibrary]:
        return [image.library for image in self._current_images()]

    def in_shared_cache(self, path: str) -> bool:
        """Whether the loaded image at ``path`` came from dyld's shared cache.

        Such images have no file on disk since macOS 11 (so ``os.path.exists``
        says False for /usr/lib/libsqlite3.dylib): this is how to tell that a
        system library really is Apple's.
        """
        return any(i.in_shared_cache for i in self._current_images() if i.library.path == path)

    def _current_images(self) -> list[_Image]:
        """dyld's image list, re-read only when it changed.

        dyld appends new images at the end and has no generation counter, so
        the cache key is the count plus the last image: a load is always seen,
        and an unload followed by a load of something else as well. (A
        ``_dyld_register_func_for_add_image`` callback would be exact, but it
        would run our Python code under dyld's lock in every later ``dlopen``
        of the host, forever: a diagnostic tool must not do that.)
        """
        api = self.api
        count = api.image_count()
        last = api.image(count - 1) if count else None
        key = (count, last)
        if self._images is not None and self._images[0] == key:
            return self._images[1]
        images = []
        parsed: dict[tuple[str, int], _Image] = {}
        for index in range(count):
            raw = last if index == count - 1 and last is not None else api.image(index)
            if raw.name is None:
                continue  # unloaded while we looked
            ident = (raw.name, raw.header)
            image = self._parsed.get(ident) or parsed.get(ident)
            if image is None:
                image = _parse_image(raw, api.read)
            parsed[ident] = image
            images.append(image)
        self._parsed = parsed  # only images still loaded: bounded by the process
        self._images = (key, images)
        return images

    # -- threads --------------------------------------------------------------

    def threads(self, skip: frozenset[int], libraries: list[LoadedLibrary]) -> list[OSThread]:
        raws = self.api.threads()
        dispatch = next((lib.path for lib in libraries if _LIBDISPATCH.search(lib.path)), None)
        result = []
        for raw in sorted(raws, key=lambda r: r.tid):
            if raw.tid in skip:
                continue
            label = None
            if not raw.name and raw.dispatch_qaddr:
                label = self._queue_label(raw.dispatch_qaddr, dispatch)
            # An unnamed thread serving a dispatch queue is one of libdispatch's
            # workers (a named thread may just be in dispatch_sync: leave it be).
            owner = dispatch if label is not None else None
            name = raw.name or label or ""
            state = "stopped" if raw.suspend_count > 0 else RUN_STATES.get(raw.run_state, "unknown")
            result.append(OSThread(raw.tid, name, state, (), owner, bool(name)))
        return result

    def _queue_label(self, qaddr: int, dispatch: str | None) -> str | None:
        """The label of the dispatch queue a thread is serving, the way debuggers find it.

        The thread's slot at ``qaddr`` holds the queue pointer (zero when idle);
        the queue keeps a pointer to its label at the offset libdispatch
        publishes in ``dispatch_queue_offsets``. Every step is a checked read.
        """
        if dispatch is None:
            return None
        queue = _pointer(self.api.read(qaddr, 8))
        if not queue:
            return None
        offset = self._dispatch_label_offset(dispatch)
        if offset is None:
            return None
        text = _pointer(self.api.read(queue + offset, 8))
        if not text:
            return None
        first = min(MAX_LABEL, _PAGE - text % _PAGE)  # never read across a page we may lack
        data = self.api.read(text, first)
        if b"\0" not in data and len(data) == first < MAX_LABEL:
            data += self.api.read(text + first, MAX_LABEL - first)
        label = data.split(b"\0", 1)[0].decode("utf-8", errors="replace")
        return label or None

    def _dispatch_label_offset(self, dispatch: str) -> int | None:
        if not self._label_offset_known:
            self._label_offset_known = True
            address = self.api.symbol(dispatch, QUEUE_OFFSETS_SYMBOL)
            data = self.api.read(address, 4) if address else b""
            if len(data) == 4:
                _version, label = struct.unpack("<HH", data)
                self._label_offset = label or None
        return self._label_offset

    # -- flags ----------------------------------------------------------------

    def call_flag(self, library: str, symbol: str) -> int | None:
        return self.api.call(library, symbol, boolean=symbol in BOOL_FLAGS)

    def native_id(self, ident: int) -> int | None:
        """On macOS ``threading.get_ident()`` is the ``pthread_t``; its id is what the
        Mach thread list calls the thread's ``tid`` (not verified on macOS)."""
        try:
            return self.api.pthread_id(ident)
        except (OSError, AttributeError):  # an API that cannot answer: unknown
            return None


def _parse_image(raw: RawImage, read: Callable[[int, int], bytes]) -> _Image:
    """A LoadedLibrary with its __TEXT range, and whether it is in the shared cache.

    Only 64-bit images are parsed (every image of a 64-bit process is); an
    unreadable or foreign header still yields the library, without text range.
    """
    name = raw.name or ""
    header = read(raw.header, _HEADER.size) if raw.header else b""
    if len(header) != _HEADER.size:
        return _Image(LoadedLibrary(name), False)
    magic, _cpu, _sub, _type, ncmds, sizeofcmds, flags, _ = _HEADER.unpack(header)
    if magic != MH_MAGIC_64:
        return _Image(LoadedLibrary(name), False)
    commands = read(raw.header + _HEADER.size, min(sizeofcmds, MAX_LOAD_COMMANDS))
    return _Image(
        LoadedLibrary(name, _text_ranges(commands, ncmds, raw.slide)),
        bool(flags & MH_DYLIB_IN_CACHE),
    )


def _text_ranges(commands: bytes, ncmds: int, slide: int) -> tuple[tuple[int, int], ...]:
    """The slid ``__TEXT`` segment, the executable part of an image, from its load commands."""
    ranges = []
    at = 0
    for _ in range(ncmds):
        if at + _LOAD_COMMAND.size > len(commands):
            break
        cmd, size = _LOAD_COMMAND.unpack_from(commands, at)
        if size < _LOAD_COMMAND.size:
            break  # malformed: stop rather than loop
        if cmd == LC_SEGMENT_64 and at + _SEGMENT_64.size <= len(commands):
            _, _, segname, vmaddr, vmsize = _SEGMENT_64.unpack_from(commands, at)
            if segname.rstrip(b"\0") == b"__TEXT" and vmsize:
                ranges.append((vmaddr + slide, vmaddr + slide + vmsize))
        at += size
    return tuple(ranges)


def _pointer(data: bytes) -> int:
    return int.from_bytes(data, "little") if len(data) == 8 else 0


# -- the OS calls (macOS only) -------------------------------------------------------------


class _BasicInfo(ctypes.Structure):
    """``struct thread_basic_info`` (THREAD_BASIC_INFO_COUNT = 10 integers)."""

    _fields_ = [
        ("user_time", ctypes.c_int * 2),
        ("system_time", ctypes.c_int * 2),
        ("cpu_usage", ctypes.c_int),
        ("policy", ctypes.c_int),
        ("run_state", ctypes.c_int),
        ("flags", ctypes.c_int),
        ("suspend_count", ctypes.c_int),
        ("sleep_time", ctypes.c_int),
    ]


class _IdentifierInfo(ctypes.Structure):
    """``struct thread_identifier_info`` (THREAD_IDENTIFIER_INFO_COUNT = 6 integers)."""

    _fields_ = [
        ("thread_id", ctypes.c_uint64),
        ("thread_handle", ctypes.c_uint64),
        ("dispatch_qaddr", ctypes.c_uint64),
    ]


_LIBSYSTEM = "/usr/lib/libSystem.B.dylib"
_NOLOAD = getattr(os, "RTLD_NOLOAD", 0x10) | getattr(os, "RTLD_LAZY", 0x1)
_NOLOAD_LOCAL = _NOLOAD | getattr(os, "RTLD_LOCAL", 0x4)


class _Mach:
    """The real calls, through libSystem (always loaded; opened with RTLD_NOLOAD).

    ``libsystem`` is a test seam: the tests point it at a gcc-built stand-in
    with macOS's signatures (tests/native/fake_libsystem.c).
    """

    def __init__(self, libsystem: str = _LIBSYSTEM) -> None:
        lib = ctypes.CDLL(libsystem, mode=_NOLOAD_LOCAL)
        u32, vp, u64 = ctypes.c_uint32, ctypes.c_void_p, ctypes.c_uint64
        # The variable behind mach_task_self(), read on every use: libSystem
        # renews it in a forked child, so a cached port name would be the parent's.
        self._task_self = ctypes.c_uint32.in_dll(lib, "mach_task_self_")
        self._count = _function(lib, "_dyld_image_count", u32, [])
        self._name = _function(lib, "_dyld_get_image_name", ctypes.c_char_p, [u32])
        self._header = _function(lib, "_dyld_get_image_header", vp, [u32])
        self._slide = _function(lib, "_dyld_get_image_vmaddr_slide", ctypes.c_ssize_t, [u32])
        self._task_threads = _function(lib, "task_threads", ctypes.c_int, [u32, vp, vp])
        self._thread_info = _function(lib, "thread_info", ctypes.c_int, [u32, ctypes.c_int, vp, vp])
        self._port_deallocate = _function(lib, "mach_port_deallocate", ctypes.c_int, [u32, u32])
        self._vm_deallocate = _function(
            lib, "vm_deallocate", ctypes.c_int, [u32, ctypes.c_size_t, ctypes.c_size_t]
        )
        self._pthread_from_port = _function(lib, "pthread_from_mach_thread_np", vp, [u32])
        self._getname = _function(
            lib, "pthread_getname_np", ctypes.c_int, [vp, ctypes.c_char_p, ctypes.c_size_t]
        )
        self._read = _function(
            lib, "mach_vm_read_overwrite", ctypes.c_int, [u32, u64, u64, u64, vp]
        )
        self._threadid = _function(lib, "pthread_threadid_np", ctypes.c_int, [vp, vp])
        self._libraries: dict[str, ctypes.CDLL | None] = {}

    @property
    def _task(self) -> int:
        return int(self._task_self.value)

    def image_count(self) -> int:
        return int(self._count())

    def image(self, index: int) -> RawImage:
        raw = self._name(index)
        name = os.fsdecode(raw) if raw is not None else None
        return RawImage(name, int(self._header(index) or 0), int(self._slide(index)))

    def threads(self) -> list[RawThread]:
        array = ctypes.POINTER(ctypes.c_uint32)()
        count = ctypes.c_uint32(0)
        code = self._task_threads(self._task, ctypes.byref(array), ctypes.byref(count))
        if code != KERN_SUCCESS:
            raise OSError(THREADS_FAILED.format(code=code))
        ports = [int(array[i]) for i in range(count.value)]
        address = ctypes.cast(array, ctypes.c_void_p).value or 0
        if address:  # the array was vm_allocate'd into our task for us: give it back
            self._vm_deallocate(self._task, address, count.value * ctypes.sizeof(ctypes.c_uint32))
        records = []
        try:
            for port in ports:
                record = self._thread(port)
                if record is not None:
                    records.append(record)
        finally:
            for port in ports:  # task_threads gave us a send right to each thread
                self._port_deallocate(self._task, port)
        return records

    def _thread(self, port: int) -> RawThread | None:
        basic = _BasicInfo()
        size = ctypes.c_uint32(ctypes.sizeof(_BasicInfo) // 4)
        if self._thread_info(port, THREAD_BASIC_INFO, ctypes.byref(basic), ctypes.byref(size)):
            return None  # the thread ended after task_threads listed it
        ident = _IdentifierInfo()
        size = ctypes.c_uint32(ctypes.sizeof(_IdentifierInfo) // 4)
        if self._thread_info(port, THREAD_IDENTIFIER_INFO, ctypes.byref(ident), ctypes.byref(size)):
            return None
        name = ""
        handle = self._pthread_from_port(port)
        if handle:  # NULL for a bare Mach thread that libpthread does not know
            buffer = ctypes.create_string_buffer(MAX_LABEL)
            if self._getname(handle, buffer, MAX_LABEL) == 0:
                name = buffer.value.decode("utf-8", errors="replace")
        return RawThread(
            int(ident.thread_id), int(basic.run_state), int(basic.suspend_count), name,
            int(ident.dispatch_qaddr),
        )

    def pthread_id(self, pthread: int) -> int | None:
        value = ctypes.c_uint64(0)
        if self._threadid(ctypes.c_void_p(pthread), ctypes.byref(value)) != 0:
            return None
        return int(value.value) or None

    def read(self, address: int, size: int) -> bytes:
        if address <= 0 or size <= 0:
            return b""
        buffer = ctypes.create_string_buffer(size)
        done = ctypes.c_uint64(0)
        code = self._read(
            self._task, address, size, ctypes.addressof(buffer), ctypes.byref(done)
        )
        return buffer.raw[: done.value] if code == KERN_SUCCESS else b""

    def _library(self, path: str) -> ctypes.CDLL | None:
        if path not in self._libraries:
            try:
                self._libraries[path] = ctypes.CDLL(path, mode=_NOLOAD_LOCAL)
            except OSError:
                return None  # not loaded: do not remember, it may be loaded later
        return self._libraries[path]

    def symbol(self, library: str, symbol: str) -> int | None:
        lib = self._library(library)
        if lib is None:
            return None
        try:
            pointer = getattr(lib, symbol)
        except AttributeError:
            return None
        return ctypes.cast(pointer, ctypes.c_void_p).value

    def call(self, library: str, symbol: str, *, boolean: bool) -> int | None:
        lib = self._library(library)
        if lib is None:
            return None
        try:
            func = getattr(lib, symbol)
        except AttributeError:
            return None
        func.argtypes = []
        func.restype = ctypes.c_bool if boolean else ctypes.c_int
        return int(func())


def _function(lib: ctypes.CDLL, name: str, restype: Any, argtypes: list[Any]) -> Any:
    func = getattr(lib, name)
    func.restype = restype
    func.argtypes = argtypes
    return func
