"""What forksafe knows about native runtimes and fork: data, not code.

Adding a runtime means adding a ``Runtime`` entry below, not a branch in a
probe. Each entry says how to recognise the library (a regular expression over
its full path, so that wheel-bundled copies such as ``libgomp-a34b3233.so.1``
match too), how to recognise its threads (by OS thread name, and by the probe's
stack attribution, which needs no name), how bad it is when merely loaded and
when active, why, and what to do instead.

"Active" is told by the signals named in ``activity``:

``threads``
    an OS thread of the runtime is alive (owned by its library, or named like
    its threads);
``flag:SYMBOL``
    the loaded library's own ``int SYMBOL(void)`` answers non-zero (libdispatch's
    ``_dispatch_is_multithreaded``);
``sqlite-used``
    the ``sqlite3`` module opened a connection (for Apple's system SQLite,
    which starts using libdispatch from ``sqlite3_initialize``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from forksafe._report import Severity

DOCS = "docs/hazards.md"


@dataclass(frozen=True, eq=False)  # identity equality: cheap to hash as a cache key
class Runtime:
    """One native runtime and how it behaves across fork."""

    key: str
    name: str
    libraries: str
    why: str
    remedy: str
    loaded: Severity | None = Severity.INFO
    active: Severity = Severity.ERROR
    activity: tuple[str, ...] = ("threads",)
    threads: str | None = None
    #: An environment variable that turns on the runtime's own fork support;
    #: when it is set to a true value an active runtime is a warning, not an error.
    fork_support: str | None = None
    #: Python packages that drive the runtime: their code on a failing or stalled
    #: child's stack links the failure to the runtime (``forksafe._diagnose``,
    #: ``forksafe._hang``).
    modules: tuple[str, ...] = ()
    _library_re: re.Pattern[str] = field(init=False, repr=False, compare=False)
    _thread_re: re.Pattern[str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_library_re", re.compile(self.libraries))
        compiled = None if self.threads is None else re.compile(self.threads)
        object.__setattr__(self, "_thread_re", compiled)

    def matches_library(self, path: str) -> bool:
        return self._library_re.search(path) is not None

    def matches_thread_name(self, name: str) -> bool:
        return self._thread_re is not None and self._thread_re.match(name) is not None


#: The catalog's fix where a start method is the user's choice (``forksafe._grade``
#: puts what fits in its place for other forks).
ANY_START = (
    "use a start method that does not fork: forksafe.get_context() picks 'forkserver' "
    "or 'spawn' when forking is unsafe"
)

RUNTIMES: tuple[Runtime, ...] = (
    Runtime(
        key="gnu-openmp",
        name="GNU OpenMP (libgomp)",
        libraries=r"/libgomp[-.][^/]*$",
        why=(
            "libgomp keeps its worker pool alive between parallel regions and registers no "
            "fork handler: the child inherits a pool whose threads do not exist, so the "
            "child's first parallel region waits for them forever"
        ),
        remedy=(
            f"{ANY_START}; or fork before the first parallel region; or set "
            "OMP_NUM_THREADS=1 in the parent so that no pool is started"
        ),
    ),
    Runtime(
        key="llvm-openmp",
        name="LLVM OpenMP (libomp)",
        libraries=r"/libomp[-.][^/]*$",
        active=Severity.WARNING,
        why=(
            "libomp re-initialises itself in the child through a pthread_atfork handler, "
            "but a fork during a parallel region, or with locks held by its workers, can "
            "still deadlock the child"
        ),
        remedy=f"fork only outside parallel regions, or {ANY_START}",
    ),
    Runtime(
        key="intel-openmp",
        name="Intel OpenMP (libiomp5)",
        libraries=r"/libiomp5[-.][^/]*$",
        active=Severity.WARNING,
        why=(
            "libiomp5 re-initialises itself in the child through a pthread_atfork "
            "handler, but a fork during a parallel region can still deadlock the child"
        ),
        remedy=f"fork only outside parallel regions, or {ANY_START}",
    ),
    Runtime(
        key="openblas",
        name="OpenBLAS",
        libraries=r"/lib(scipy_)?openblas[^/]*$",
        active=Severity.INFO,
        why=(
            "OpenBLAS registers pthread_atfork handlers that shut its thread pool down "
            "before fork and restart it in the child, so its threads are safe to fork over"
        ),
        remedy="nothing to do: OpenBLAS handles fork itself",
    ),
    Runtime(
        key="mkl",
        name="Intel MKL",
        libraries=r"/libmkl_(rt|core)[^/]*$",
        active=Severity.INFO,
        why=(
            "MKL's own threads come from its threading layer (Intel or GNU OpenMP, or TBB); "
            "those are reported separately when active"
        ),
        remedy="nothing to do for MKL itself; see the threading layer's entry",
    ),
    Runtime(
        key="tbb",
        name="Intel oneTBB",
        libraries=r"/libtbb[^/]*$",
        active=Severity.WARNING,
        why="oneTBB's worker threads do not exist in the child and it has no fork handler",
        remedy=f"{ANY_START}; or fork before TBB starts its workers",
    ),
    Runtime(
        key="grpc",
        modules=("grpc",),
        name="gRPC core",
        libraries=r"/(cygrpc\.[^/]*\.so|libgrpc[^/]*\.so[^/]*)$",
        threads=r"(grpc_global_tim|event_engine|lifeguard|default-executo|resolver-execu|grpc_)",
        fork_support="GRPC_ENABLE_FORK_SUPPORT",
        why=(
            "gRPC runs its own polling, timer and executor threads; without fork support "
            "the child inherits gRPC's state with those threads gone and crashes "
            "(SIGSEGV) or hangs on its first RPC"
        ),
        remedy=(
            f"{ANY_START}; or create channels and servers only after forking; or set "
            "GRPC_ENABLE_FORK_SUPPORT=1 (and GRPC_POLL_STRATEGY=poll) before importing grpc"
        ),
    ),
    Runtime(
        key="cuda",
        modules=("torch", "cupy", "pycuda", "numba", "jax"),
        name="NVIDIA CUDA driver",
        libraries=r"/libcuda\.(so[^/]*|dylib)$",
        threads=r"cuda-",
        why=(
            "an initialised CUDA context cannot be used in a forked child: NVIDIA documents "
            "that CUDA is not fork-safe, and the child fails with "
            "'initialization error' or hangs"
        ),
        remedy=(
            f"{ANY_START} (PyTorch: torch.multiprocessing.set_start_method('spawn')); "
            "or initialise CUDA only in the children"
        ),
    ),
    Runtime(
        key="rocm",
        modules=("torch", "cupy"),
        name="AMD ROCm HIP runtime",
        libraries=r"/libamdhip64\.so[^/]*$",
        why="like CUDA, an initialised HIP runtime cannot be used in a forked child",
        remedy=f"{ANY_START}; or initialise the GPU only in the children",
    ),
    Runtime(
        key="mpi",
        modules=("mpi4py",),
        name="MPI library",
        libraries=r"/lib(mpi|mpich)(\.so|_)[^/]*$",
        loaded=Severity.WARNING,
        why=(
            "MPI implementations do not support fork after MPI_Init: the child shares the "
            "parent's network endpoints and registered memory (Open MPI warns about it)"
        ),
        remedy=f"{ANY_START}; or fork before initialising MPI",
    ),
    Runtime(
        key="jvm",
        modules=("jpype", "jnius"),
        name="Java VM (libjvm)",
        libraries=r"/libjvm\.(so|dylib)$",
        loaded=Severity.WARNING,
        threads=(
            r"(VM Thread|GC Thread|C[12] CompilerThre|Reference Handl|Finalizer"
            r"|Signal Dispatch)"
        ),
        why=(
            "a running JVM has garbage-collector, compiler and VM threads that vanish in "
            "the child; the child's JVM deadlocks or crashes at its next safepoint"
        ),
        remedy=f"{ANY_START}; or start the JVM (jpype, pyjnius) only in the children",
    ),
    Runtime(
        key="libdispatch",
        name="Apple libdispatch (Grand Central Dispatch)",
        libraries=r"/libdispatch\.(dylib|so)[^/]*$",
        loaded=None,  # part of libSystem: loaded in every macOS process
        activity=("flag:_dispatch_is_multithreaded", "threads"),
        # Worker threads are named by the queue they serve (the Darwin backend reads
        # the label, as debuggers do): com.apple.root.<qos>-qos for the global
        # queues; com.apple.libdispatch-manager is the manager thread.
        threads=r"fakedispatch-|com\.apple\.(root\.|main-thread|libdispatch-)",
        why=(
            "libdispatch marks the process multithreaded once it has used a queue, and "
            "crashes the child on its next use ('crashed on child side of fork pre-exec'); "
            "Apple documents that no GCD call is safe after fork until exec"
        ),
        remedy=(
            f"{ANY_START}; or make the call that used GCD (system proxy lookup, system "
            "SQLite, Objective-C frameworks) only in the children or in a helper process"
        ),
    ),
    Runtime(
        key="apple-frameworks",
        name="Apple CoreFoundation / Foundation",
        libraries=r"/(CoreFoundation|Foundation)\.framework/",
        loaded=None,
        # Any other com.apple. thread (CFSocket, NSURLConnectionLoader, ...); the
        # libdispatch names are excluded so that a GCD worker counts once, as libdispatch.
        threads=r"com\.apple\.(?!root\.|main-thread|libdispatch-)",
        why=(
            "CoreFoundation and Foundation run dispatch queues and threads once used; "
            "Apple documents them as unsafe to use in a forked child before exec"
        ),
        remedy=f"{ANY_START}; or use these frameworks only after forking",
    ),
    Runtime(
        key="objc",
        name="Objective-C runtime (libobjc)",
        libraries=r"/libobjc\.A\.dylib$",
        loaded=None,
        why=(
            "a class whose +initialize ran in another thread at fork time is locked in the "
            "child; the runtime aborts the child rather than deadlock "
            "(OBJC_DISABLE_INITIALIZE_FORK_SAFETY only turns the abort off)"
        ),
        remedy=f"{ANY_START}; setting OBJC_DISABLE_INITIALIZE_FORK_SAFETY=YES fixes nothing",
    ),
    Runtime(
        key="apple-systemconfiguration",
        name="Apple SystemConfiguration (system proxy lookup)",
        libraries=r"/SystemConfiguration\.framework/",
        loaded=Severity.WARNING,
        active=Severity.ERROR,
        why=(
            "SystemConfiguration is loaded by urllib's macOS proxy lookup (_scproxy); it "
            "talks to configd through libdispatch, so a child forked after a proxy lookup "
            "can crash on its next one (CPython bpo-27126, bpo-13829)"
        ),
        remedy=(
            "look proxies up out of process with forksafe.getproxies() / "
            f"forksafe.patch_urllib(), or {ANY_START}"
        ),
    ),
    Runtime(
        key="apple-sqlite",
        modules=("sqlite3",),
        name="Apple's system SQLite (/usr/lib/libsqlite3.dylib)",
        libraries=r"^/usr/lib/libsqlite3(\.0)?\.dylib$",
        loaded=Severity.WARNING,
        activity=("sqlite-used",),
        why=(
            "Apple's build of SQLite uses libdispatch from sqlite3_initialize on; once a "
            "connection was opened, the first SQLite call in a forked child crashes it"
        ),
        remedy=(
            f"{ANY_START}; or use a Python that bundles its own SQLite (python.org, "
            "Homebrew, conda) or the pysqlite3-binary package"
        ),
    ),
)


def modules_of(key: object) -> tuple[str, ...]:
    """The Python packages of runtime ``key`` (none for a key the catalog lacks)."""
    for runtime in RUNTIMES:
        if runtime.key == key:
            return runtime.modules
    return ()


def find(key: str) -> Runtime:
    """The entry with this key; KeyError names the known keys."""
    for runtime in RUNTIMES:
        if runtime.key == key:
            return runtime
    raise KeyError(f"no runtime {key!r}; known: {', '.join(r.key for r in RUNTIMES)}")


@dataclass(frozen=True, eq=False)
class KnownThread:
    """A Python-level thread a library starts, recognised by the code it runs.

    ``code`` lists (file name suffix, function) pairs; a thread with one of them
    on its stack, or as its target, is this one. ``severity`` is what the thread
    is at a fork (None: a warning, like any thread); ``why`` and ``remedy`` say
    what it is and what to do, in place of the generic text.
    """

    key: str
    name: str
    code: tuple[tuple[str, str], ...]
    why: str
    remedy: str
    severity: Severity | None = None
    #: A pool's own thread: harmless to a fork the same pool makes to replace a
    #: worker, which never uses it (``forksafe._grade``).
    pool: str | None = None

    def matches(self, frames: list[tuple[str, str]]) -> bool:
        """``frames``: (file, function) of the thread's stack and of its target."""
        return any(file.endswith(suffix) and function == name
                   for file, function in frames for suffix, name in self.code)


_MP_POOL = ("multiprocessing/pool.py", "multiprocessing.Pool")
_BILLIARD_POOL = ("billiard/pool.py", "billiard.Pool")

THREADS: tuple[KnownThread, ...] = (
    KnownThread(
        key="execnet-receiver",
        name="execnet's channel reader (pytest-xdist)",
        code=(("execnet/gateway_base.py", "_thread_receiver"),),
        severity=Severity.INFO,
        why=(
            "execnet (which pytest-xdist runs its workers on) reads the controller's "
            "messages in this thread; a forked child that does not itself talk over the "
            "execnet channel never needs it"
        ),
        remedy=(
            "nothing to do for a child that does not use the execnet channel; one that "
            "reads the worker's input would wait forever, since this thread holds its "
            "reader"
        ),
    ),
    KnownThread(
        key="thread-pool-worker",
        name="a ThreadPoolExecutor worker",
        code=(("concurrent/futures/thread.py", "_worker"),),
        why=(
            "in the child the executor still counts this worker as idle, so work submitted "
            "there to the inherited executor is never run and its future never completes"
        ),
        remedy=(
            "create a new executor in the child and never use this one there; shut it down "
            "before forking if the parent is done with it, or fork before creating it"
        ),
    ),
    KnownThread(
        key="mp-queue-feeder",
        name="a multiprocessing.Queue feeder",
        code=(("multiprocessing/queues.py", "_feed"),),
        why=(
            "it sends what put() buffers; a child made by multiprocessing (its fork "
            "context) resets the queue, but after a bare os.fork the child's copy believes "
            "its feeder runs, so what it puts is never sent"
        ),
        remedy=(
            "use the queue only from children that multiprocessing starts (Process with "
            "the fork context); after a bare os.fork, create a new queue in the child"
        ),
    ),
    KnownThread(
        key="mp-pool-thread",
        name="a multiprocessing.Pool handler thread",
        code=(("multiprocessing/pool.py", "_handle_workers"),
              ("multiprocessing/pool.py", "_handle_tasks"),
              ("multiprocessing/pool.py", "_handle_results")),
        why=(
            "the pool's own bookkeeping thread; a worker that the pool forks to replace "
            "another never uses it, any other child inherits the pool without it"
        ),
        remedy=(
            "fork before creating the pool, or close and join it first; a pool's own "
            "replacement workers need nothing"
        ),
        pool=_MP_POOL[1],
    ),
    KnownThread(
        key="billiard-pool-thread",
        name="a billiard (Celery) pool thread",
        code=(("billiard/pool.py", "body"), ("billiard/pool.py", "run")),
        why=(
            "billiard's (Celery's prefork pool's) own supervisor, task, timeout and result "
            "threads; a worker the pool forks to replace another never uses them"
        ),
        remedy=(
            "nothing for the pool's own workers; create what a worker needs in Celery's "
            "worker_process_init signal, not before the pool starts"
        ),
        pool=_BILLIARD_POOL[1],
    ),
)

#: Frames that show a fork is a pool replacing a worker: (file suffix, function, pool).
POOL_REFORKS = (
    ("multiprocessing/pool.py", "_maintain_pool", _MP_POOL[1]),
    ("billiard/pool.py", "_maintain_pool", _BILLIARD_POOL[1]),
)
#: A pool's modules: a thread waiting inside one of them is waiting for the pool.
POOL_FILES = {_MP_POOL[1]: (_MP_POOL[0],), _BILLIARD_POOL[1]: (_BILLIARD_POOL[0],)}


def known_thread(frames: list[tuple[str, str]]) -> KnownThread | None:
    """The catalog's entry for a thread whose stack and target are ``frames``: the
    first of ``THREADS`` that matches, as ``KnownThread.matches`` would find it, through
    an index by function name (every fork checks every thread's stack)."""
    best: int | None = None
    for file, function in frames:
        for suffix, order in _BY_FUNCTION.get(function, ()):
            if (best is None or order < best) and file.endswith(suffix):
                best = order
    return None if best is None else THREADS[best]


#: function name -> (file suffix, position in THREADS) of every known thread's code.
_BY_FUNCTION: dict[str, list[tuple[str, int]]] = {}
for _order, _known in enumerate(THREADS):
    for _suffix, _function in _known.code:
        _BY_FUNCTION.setdefault(_function, []).append((_suffix, _order))
