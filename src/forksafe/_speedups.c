/*
 * forksafe._speedups: three things forksafe does in C, each because Python could not
 * do it safely or cheaply enough; forksafe works without them (see each part):
 *   - Recorder: the observation layer's sqlite3.connect wrapper (below);
 *   - stacks(): the threads-and-stacks part of the guard's fingerprint;
 *   - images_version() and images(): glibc's image list without a Python callback
 *     under the loader lock.
 *
 * The sqlite3.connect wrapper. Why C: the wrapper runs on every connect of a program that connects per
 * request, and issue 2 allows the observation layer 2% there. A Python
 * function that only passes the call on already costs ~1% of an in-memory
 * connect (~10 us); one that also records the caller's line costs ~3%. This
 * one records the same thing as forksafe._ledger's Python wrapper, for ~0.5%.
 *
 * It is optional: forksafe works the same without it (the Python wrapper is
 * used), and the module is only loaded when observation starts or at the first
 * guarded fork, never by `import forksafe`. The Recorder takes no lock and keeps no state of its own: every
 * decision beyond the common case is left to Python (`slow`, `prune`).
 *
 * Recorder(original, origins, known, slow, prune, limit) is called like
 * sqlite3.connect. After `original` returned a connection:
 *   - the caller is the current Python frame (a C callable has none of its
 *     own), as sys._getframe(1) is for the Python wrapper;
 *   - the database is the first positional argument, or the `database`
 *     keyword (None when neither was given): an in-memory database is private
 *     to each process after a fork, a file is shared;
 *   - if known[caller's file] is False (user code, seen before), it stores
 *     origins[id(connection)] = (code, f_lasti, None, database);
 *   - else it calls slow(connection, frame, database), which classifies the file;
 *   - when origins holds more than `limit` entries, it calls prune(origins).
 * Recording never fails the connect: its errors are cleared.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <frameobject.h>
#include <stddef.h>

typedef struct {
    PyObject_HEAD
    PyObject *original;
    PyObject *origins;
    PyObject *known;
    PyObject *slow;
    PyObject *prune;
    Py_ssize_t limit;
    PyObject *dict;
    vectorcallfunc vectorcall;
} Recorder;

/* The frame's f_lasti as Python shows it: a byte offset into co_code. */
static int
frame_lasti(PyFrameObject *frame)
{
#if PY_VERSION_HEX >= 0x030B0000
    return PyFrame_GetLasti(frame);
#elif PY_VERSION_HEX >= 0x030A0000
    return frame->f_lasti < 0 ? -1 : frame->f_lasti * (int)sizeof(_Py_CODEUNIT);
#else
    return frame->f_lasti;
#endif
}

static int
record(Recorder *self, PyObject *connection, PyObject *database)
{
    PyFrameObject *frame = PyEval_GetFrame(); /* borrowed */
    if (frame == NULL) {
        return 0;
    }
    PyCodeObject *code = PyFrame_GetCode(frame); /* new reference */
    int err = 0;
    PyObject *kind = PyDict_GetItemWithError(self->known, code->co_filename);
    if (kind == Py_False) {
        PyObject *key = PyLong_FromVoidPtr(connection);
        PyObject *lasti = PyLong_FromLong(frame_lasti(frame));
        PyObject *entry = PyTuple_New(4);
        if (key == NULL || lasti == NULL || entry == NULL) {
            err = -1;
            Py_XDECREF(lasti);
        }
        else {
            Py_INCREF(code);
            PyTuple_SET_ITEM(entry, 0, (PyObject *)code);
            PyTuple_SET_ITEM(entry, 1, lasti);
            Py_INCREF(Py_None);
            PyTuple_SET_ITEM(entry, 2, Py_None);
            Py_INCREF(database);
            PyTuple_SET_ITEM(entry, 3, database);
            err = PyDict_SetItem(self->origins, key, entry);
        }
        Py_XDECREF(key);
        Py_XDECREF(entry);
    }
    else if (kind == NULL && PyErr_Occurred()) {
        err = -1;
    }
    else {
        PyObject *done = PyObject_CallFunctionObjArgs(self->slow, connection,
                                                      (PyObject *)frame, database, NULL);
        err = done == NULL ? -1 : 0;
        Py_XDECREF(done);
    }
    Py_DECREF(code);
    if (err == 0 && PyDict_GET_SIZE(self->origins) > self->limit) {
        PyObject *done = PyObject_CallFunctionObjArgs(self->prune, self->origins, NULL);
        err = done == NULL ? -1 : 0;
        Py_XDECREF(done);
    }
    return err;
}

/* The `database` argument of a connect call (borrowed), or Py_None. */
static PyObject *
database_argument(PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs > 0) {
        return args[0];
    }
    if (kwnames != NULL) {
        Py_ssize_t n = PyTuple_GET_SIZE(kwnames);
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *name = PyTuple_GET_ITEM(kwnames, i);
            if (PyUnicode_Check(name) && PyUnicode_CompareWithASCIIString(name, "database") == 0) {
                return args[nargs + i];
            }
        }
    }
    return Py_None;
}

static PyObject *
recorder_vectorcall(PyObject *op, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Recorder *self = (Recorder *)op;
    PyObject *database = database_argument(args, nargsf, kwnames);
    Py_INCREF(database); /* the call may drop the caller's last reference */
    PyObject *connection = PyObject_Vectorcall(self->original, args, nargsf, kwnames);
    if (connection != NULL && record(self, connection, database) < 0) {
        PyErr_Clear(); /* a recording that failed must not fail the connect */
    }
    Py_DECREF(database);
    return connection;
}

static PyObject *
recorder_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *original, *origins, *known, *slow, *prune;
    Py_ssize_t limit;
    static char *names[] = {"original", "origins", "known", "slow", "prune", "limit", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO!O!OOn:Recorder", names, &original,
                                     &PyDict_Type, &origins, &PyDict_Type, &known, &slow,
                                     &prune, &limit)) {
        return NULL;
    }
    Recorder *self = (Recorder *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    Py_INCREF(original);
    self->original = original;
    Py_INCREF(origins);
    self->origins = origins;
    Py_INCREF(known);
    self->known = known;
    Py_INCREF(slow);
    self->slow = slow;
    Py_INCREF(prune);
    self->prune = prune;
    self->limit = limit;
    self->dict = NULL;
    self->vectorcall = recorder_vectorcall;
    return (PyObject *)self;
}

static int
recorder_traverse(Recorder *self, visitproc visit, void *arg)
{
    Py_VISIT(self->original);
    Py_VISIT(self->origins);
    Py_VISIT(self->known);
    Py_VISIT(self->slow);
    Py_VISIT(self->prune);
    Py_VISIT(self->dict);
    return 0;
}

static int
recorder_clear(Recorder *self)
{
    Py_CLEAR(self->original);
    Py_CLEAR(self->origins);
    Py_CLEAR(self->known);
    Py_CLEAR(self->slow);
    Py_CLEAR(self->prune);
    Py_CLEAR(self->dict);
    return 0;
}

static void
recorder_dealloc(Recorder *self)
{
    PyObject_GC_UnTrack(self);
    recorder_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject RecorderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "forksafe._speedups.Recorder",
    .tp_basicsize = sizeof(Recorder),
    .tp_dealloc = (destructor)recorder_dealloc,
    .tp_vectorcall_offset = offsetof(Recorder, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_getattro = PyObject_GenericGetAttr,
    .tp_setattro = PyObject_GenericSetAttr,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "sqlite3.connect, recording the caller's line (see forksafe._ledger).",
    .tp_traverse = (traverseproc)recorder_traverse,
    .tp_clear = (inquiry)recorder_clear,
    .tp_dictoffset = offsetof(Recorder, dict),
    .tp_new = recorder_new,
};

/*
 * stacks(active, me, dummy, name_key, daemon_key, limit): the threads-and-stacks
 * part of the guard's fingerprint (forksafe._check), read without writing to a
 * single Python object.
 *
 * Why C: after a fork every page of the parent is copy-on-write, and each page the
 * parent writes before its next fork is one more fault (and one more copy while the
 * child lives). Python code that looks at 100 threads' stacks increments the
 * reference count of every thread, name, frame and code object it touches: ~180
 * pages per fork, ~0.9 ms on top of a 7 ms fork of a 100 MB process. This walk
 * only reads: the thread table (threading._active) with borrowed references, each
 * thread's name and daemon flag from its instance dict, and every thread state's
 * frames (code object, instruction) from the interpreter's own frame chain.
 *
 * What it read is compared, value by value, with what the previous call read (a
 * plain C array, written only from the first difference on). Same: the previous
 * call's token comes back, the very object. Different: a new token. Every object
 * whose address is in the array (threads, names, code objects) is kept alive
 * until the next difference, so an address met again is the same object, never
 * a new one that took a freed one's place. None: no key can be made (a
 * DummyThread, a stack deeper than `limit`, an odd thread entry).
 *
 * The GIL is held throughout, so no thread's frames move while they are read;
 * thread states are linked and unlinked with the GIL held, or (PyGILState_Ensure
 * from a foreign thread) pushed at the list's head, which a reader passing by
 * sees or not. Not built where the GIL can be disabled, nor for Pythons whose
 * frame layout this file does not know: then forksafe reads the stacks in Python.
 */
#if !defined(Py_GIL_DISABLED) && PY_VERSION_HEX >= 0x03090000 && PY_VERSION_HEX < 0x030E0000
#define FORKSAFE_STACKS 1
#if PY_VERSION_HEX >= 0x030B0000
#ifndef Py_BUILD_CORE
#define Py_BUILD_CORE 1
#define FORKSAFE_DEFINED_BUILD_CORE 1
#endif
#include <internal/pycore_frame.h>
#ifdef FORKSAFE_DEFINED_BUILD_CORE
#undef Py_BUILD_CORE
#endif
#endif
#endif

#ifdef FORKSAFE_STACKS

static struct {
    uintptr_t *items;      /* what the last call read */
    Py_ssize_t len, cap;
    PyObject *anchors;     /* a list: every object whose address is in items */
    PyObject *token;       /* what the last call returned */
    unsigned long long generation;
} last_read;

typedef struct {
    Py_ssize_t pos;        /* the next value's index in last_read.items */
    int same;              /* every value so far equal to last_read's */
    PyObject *anchors;     /* NULL: count them in `count`; else fill it */
    Py_ssize_t count;
    Py_ssize_t written;    /* second pass: how many values the first one wrote */
    int moved;             /* second pass: a value differs from the first pass's */
} Walk;

enum { WALK_OK = 0, WALK_NO_KEY = 1, WALK_ERROR = -1 };

/* Append `value` to a growing array of values (`*items`, `*len`, `*cap`). */
static int
push_value(uintptr_t **items, Py_ssize_t *len, Py_ssize_t *cap, uintptr_t value)
{
    if (*len >= *cap) {
        Py_ssize_t grown = *cap ? *cap * 2 : 256;
        uintptr_t *more = PyMem_RawRealloc(*items, (size_t)grown * sizeof(uintptr_t));
        if (more == NULL) {
            PyErr_NoMemory();
            return WALK_ERROR;
        }
        *items = more;
        *cap = grown;
    }
    (*items)[(*len)++] = value;
    return WALK_OK;
}

/* A walk's anchors: counted on its first pass (`anchors` NULL), kept on its second,
   which may not find more than the first did (something moved). */
static int
put_anchor(PyObject *anchors, Py_ssize_t *count, PyObject *object)
{
    if (object == NULL) {
        return WALK_OK;
    }
    if (anchors == NULL) {
        (*count)++;
        return WALK_OK;
    }
    if (*count >= PyList_GET_SIZE(anchors)) {
        return WALK_NO_KEY; /* more than the first pass found: something moved */
    }
    Py_INCREF(object);
    PyList_SET_ITEM(anchors, *count, object);
    (*count)++;
    return WALK_OK;
}

static int
emit(Walk *walk, uintptr_t value)
{
    if (walk->anchors != NULL) {
        /* The second pass collects the anchors, and checks that it meets the very
           values the first one wrote: what it anchors is what was compared. */
        if (walk->pos >= walk->written || last_read.items[walk->pos] != value) {
            walk->moved = 1;
        }
        walk->pos++;
        return WALK_OK;
    }
    if (walk->same) {
        if (walk->pos < last_read.len && last_read.items[walk->pos] == value) {
            walk->pos++;
            return WALK_OK;
        }
        walk->same = 0;
    }
    return push_value(&last_read.items, &walk->pos, &last_read.cap, value);
}

static int
anchor(Walk *walk, PyObject *object)
{
    return put_anchor(walk->anchors, &walk->count, object);
}

#define STEP(call) do { int _done = (call); if (_done != WALK_OK) return _done; } while (0)

/* A borrowed value from an object's instance dict, or NULL (none, or no dict). */
static PyObject *
instance_value(PyObject *object, PyObject *key)
{
    PyObject **dict = _PyObject_GetDictPtr(object);
    if (dict == NULL || *dict == NULL || !PyDict_Check(*dict)) {
        return NULL;
    }
    return PyDict_GetItemWithError(*dict, key);
}

static int
walk_threads(Walk *walk, PyObject *active, PyObject *dummy, PyObject *name_key,
             PyObject *daemon_key)
{
    Py_ssize_t i = 0;
    PyObject *ident, *thread;
    while (PyDict_Next(active, &i, &ident, &thread)) {
        if (PyObject_TypeCheck(thread, (PyTypeObject *)dummy)) {
            return WALK_NO_KEY; /* a native thread running Python code */
        }
        if (!PyLong_CheckExact(ident)) {
            return WALK_NO_KEY;
        }
        STEP(emit(walk, (uintptr_t)PyLong_AsUnsignedLongMask(ident)));
        STEP(emit(walk, (uintptr_t)thread));
        STEP(anchor(walk, thread));
        PyObject *name = instance_value(thread, name_key);
        PyObject *daemon = name == NULL ? NULL : instance_value(thread, daemon_key);
        if (PyErr_Occurred()) {
            return WALK_ERROR;
        }
        STEP(emit(walk, (uintptr_t)name));
        STEP(anchor(walk, name));
        STEP(emit(walk, (uintptr_t)daemon)); /* True or False, which never go */
    }
    return WALK_OK;
}

static int
walk_frames(Walk *walk, PyThreadState *tstate, Py_ssize_t limit)
{
    Py_ssize_t depth = 0;
#if PY_VERSION_HEX >= 0x030D0000
    for (_PyInterpreterFrame *frame = tstate->current_frame; frame != NULL;
         frame = frame->previous) {
        PyObject *code = frame->f_executable;
        uintptr_t at = (uintptr_t)frame->instr_ptr;
#elif PY_VERSION_HEX >= 0x030B0000
    for (_PyInterpreterFrame *frame = tstate->cframe ? tstate->cframe->current_frame : NULL;
         frame != NULL; frame = frame->previous) {
        PyObject *code = (PyObject *)frame->f_code;
        uintptr_t at = (uintptr_t)frame->prev_instr;
#else
    for (PyFrameObject *frame = tstate->frame; frame != NULL; frame = frame->f_back) {
        PyObject *code = (PyObject *)frame->f_code;
        uintptr_t at = (uintptr_t)(intptr_t)frame->f_lasti;
#endif
        if (++depth > limit) {
            return WALK_NO_KEY;
        }
        STEP(emit(walk, (uintptr_t)code));
        STEP(anchor(walk, code));
        STEP(emit(walk, at));
    }
    return emit(walk, 0);
}

static int
walk_all(Walk *walk, PyObject *active, unsigned long me, PyObject *dummy, PyObject *name_key,
         PyObject *daemon_key, Py_ssize_t limit)
{
    PyInterpreterState *interp = PyInterpreterState_Get();
    STEP(emit(walk, (uintptr_t)interp));
    STEP(emit(walk, (uintptr_t)me));
    STEP(walk_threads(walk, active, dummy, name_key, daemon_key));
    STEP(emit(walk, ~(uintptr_t)0));
    for (PyThreadState *tstate = PyInterpreterState_ThreadHead(interp); tstate != NULL;
         tstate = PyThreadState_Next(tstate)) {
        STEP(emit(walk, (uintptr_t)tstate->thread_id));
        if (tstate->thread_id != me) { /* the caller's own stack: where it checks from */
            STEP(walk_frames(walk, tstate, limit));
        }
    }
    return WALK_OK;
}

static PyObject *
stacks(PyObject *module, PyObject *args)
{
    PyObject *active, *dummy, *name_key, *daemon_key;
    unsigned long me;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "O!kO!UUn:stacks", &PyDict_Type, &active, &me, &PyType_Type,
                          &dummy, &name_key, &daemon_key, &limit)) {
        return NULL;
    }
    Walk walk = {0, 1, NULL, 0, 0, 0};
    int done = walk_all(&walk, active, me, dummy, name_key, daemon_key, limit);
    if (done == WALK_OK && walk.same && walk.pos == last_read.len && last_read.token != NULL) {
        Py_INCREF(last_read.token);
        return last_read.token;
    }
    last_read.len = 0; /* from here until a new read is complete, it matches nothing */
    if (done == WALK_ERROR) {
        return NULL;
    }
    if (done == WALK_NO_KEY) {
        Py_RETURN_NONE;
    }
    Py_ssize_t length = walk.pos;
    /* Allocating may run a collection, and a finalizer may start or end a thread or
       rename one: the second pass then meets other values, and no key is made. */
    PyObject *anchors = PyList_New(walk.count);
    PyObject *token = PyLong_FromUnsignedLongLong(last_read.generation + 1);
    if (anchors == NULL || token == NULL) {
        Py_XDECREF(anchors);
        Py_XDECREF(token);
        return NULL;
    }
    Walk again = {0, 0, anchors, 0, length, 0};
    Py_ssize_t expected = walk.count;
    done = walk_all(&again, active, me, dummy, name_key, daemon_key, limit);
    if (done != WALK_OK || again.count != expected || again.moved || again.pos != length) {
        Py_DECREF(anchors);
        Py_DECREF(token);
        if (done == WALK_ERROR) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    last_read.generation++;
    last_read.len = length;
    PyObject *old_anchors = last_read.anchors, *old_token = last_read.token;
    last_read.anchors = anchors;
    Py_INCREF(token);
    last_read.token = token;
    Py_XDECREF(old_anchors); /* last: freeing may run code, and the state is whole */
    Py_XDECREF(old_token);
    return token;
}


/*
 * thread_tokens(active, me, dummy, keys, limit, own): one token per thread, for the
 * thread probe's memo (forksafe._probes.threads).
 *
 * Why: threads that fork at once (a fork storm) find each other elsewhere at every
 * fork, so stacks() never gives the same token twice and every fork's check runs
 * the probes. Yet each thread stands at one of a few places, and its hazard is the
 * same at each: the probe keeps them by this token. Finding them from Python reads
 * every frame of every thread (a frame object made for each, reference counts
 * written: pages copied after the fork, ~90 a fork for 8 threads); this only reads.
 *
 * A thread's state: its object, ident, the values of `keys` in its instance dict,
 * and its stack (code object, instruction) from the first frame whose file does not
 * start with `own` (forksafe's own frames: a thread in its own guarded fork stands
 * at the line that forks), or the whole stack if all are. States seen recently are
 * kept (up to STATE_SLOTS, the oldest replaced first, found by hash; their objects
 * anchored so an address is never reused by another object while kept); a state met
 * again gives its token back, the very object. The answer: a list of tokens, in `active`'s order, the caller left out;
 * None when no token can be made for every thread (a dummy thread, a stack deeper
 * than `limit`, a thread running Python that `active` does not list, too many
 * threads): the probe then reads the stacks in Python.
 */
#define STATE_SLOTS 512
#define MAX_TOKEN_THREADS 128

typedef struct {
    uintptr_t *values;
    Py_ssize_t len;
    uint64_t hash;
    PyObject *anchors;
    PyObject *token;
} KnownState;

static KnownState known_states[STATE_SLOTS];
static Py_ssize_t next_state;
static unsigned long long state_generation;

/* Where a state is kept, by its hash: INDEX_PROBES places from the hash on. An entry
   whose slot holds another state since is stale, and is simply passed. */
#define INDEX_SIZE 4096
#define INDEX_PROBES 8
static struct {
    uint64_t hash;
    Py_ssize_t slot; /* slot + 1; 0: empty */
} state_index[INDEX_SIZE];

static int
index_live(Py_ssize_t at)
{
    Py_ssize_t slot = state_index[at].slot - 1;
    return slot >= 0 && known_states[slot].token != NULL &&
           known_states[slot].hash == state_index[at].hash;
}

static void
index_add(uint64_t hash, Py_ssize_t slot)
{
    Py_ssize_t at = (Py_ssize_t)(hash & (INDEX_SIZE - 1));
    for (Py_ssize_t i = 0; i < INDEX_PROBES; i++) {
        Py_ssize_t here = (at + i) & (INDEX_SIZE - 1);
        if (!index_live(here)) {
            at = here;
            break;
        }
    }
    state_index[at].hash = hash;
    state_index[at].slot = slot + 1;
}

typedef struct {
    uintptr_t *items;
    Py_ssize_t len, cap;
    PyObject *anchors; /* NULL: count in `count`; else check against items, and fill */
    Py_ssize_t count;
    int moved;
} StateWalk;

static int
state_emit(StateWalk *walk, uintptr_t value)
{
    if (walk->anchors != NULL) {
        if (walk->len >= walk->cap || walk->items[walk->len] != value) {
            walk->moved = 1;
        }
        walk->len++;
        return WALK_OK;
    }
    return push_value(&walk->items, &walk->len, &walk->cap, value);
}

static int
state_anchor(StateWalk *walk, PyObject *object)
{
    return put_anchor(walk->anchors, &walk->count, object);
}

/* The code object a frame runs, or NULL. */
static PyObject *
frame_code(void *frame)
{
#if PY_VERSION_HEX >= 0x030D0000
    return ((_PyInterpreterFrame *)frame)->f_executable;
#elif PY_VERSION_HEX >= 0x030B0000
    return (PyObject *)((_PyInterpreterFrame *)frame)->f_code;
#else
    return (PyObject *)((PyFrameObject *)frame)->f_code;
#endif
}

static void *
frame_back(void *frame)
{
#if PY_VERSION_HEX >= 0x030B0000
    return ((_PyInterpreterFrame *)frame)->previous;
#else
    return ((PyFrameObject *)frame)->f_back;
#endif
}

static uintptr_t
frame_at(void *frame)
{
#if PY_VERSION_HEX >= 0x030D0000
    return (uintptr_t)((_PyInterpreterFrame *)frame)->instr_ptr;
#elif PY_VERSION_HEX >= 0x030B0000
    return (uintptr_t)((_PyInterpreterFrame *)frame)->prev_instr;
#else
    return (uintptr_t)(intptr_t)((PyFrameObject *)frame)->f_lasti;
#endif
}

static void *
top_frame(PyThreadState *tstate)
{
#if PY_VERSION_HEX >= 0x030D0000
    return tstate->current_frame;
#elif PY_VERSION_HEX >= 0x030B0000
    return tstate->cframe ? tstate->cframe->current_frame : NULL;
#else
    return tstate->frame;
#endif
}

static int
is_own(PyObject *code, PyObject *own)
{
    if (code == NULL || !PyCode_Check(code)) {
        return 0;
    }
    PyObject *filename = ((PyCodeObject *)code)->co_filename;
    if (filename == NULL || !PyUnicode_Check(filename)) {
        return 0;
    }
    Py_ssize_t n = PyUnicode_GET_LENGTH(own);
    return PyUnicode_GET_LENGTH(filename) >= n &&
           PyUnicode_Tailmatch(filename, own, 0, n, -1) == 1;
}

/* Forksafe's own frame, or (3.12+) a frame the interpreter pushes where C code calls
   Python, which Python's f_back never shows: passed over at the top of a stack. */
static int
skipped(void *frame, PyObject *own)
{
#if PY_VERSION_HEX >= 0x030C0000
    if (((_PyInterpreterFrame *)frame)->owner == FRAME_OWNED_BY_CSTACK) {
        return 1;
    }
#endif
    return is_own(frame_code(frame), own);
}

static int
walk_state(StateWalk *walk, PyObject *ident, PyObject *thread, PyObject *keys,
           PyThreadState *tstate, Py_ssize_t limit, PyObject *own)
{
    STEP(state_emit(walk, (uintptr_t)thread));
    STEP(state_anchor(walk, thread));
    STEP(state_emit(walk, (uintptr_t)PyLong_AsUnsignedLongMask(ident)));
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(keys); k++) {
        PyObject *value = instance_value(thread, PyTuple_GET_ITEM(keys, k));
        if (PyErr_Occurred()) {
            return WALK_ERROR;
        }
        STEP(state_emit(walk, (uintptr_t)value));
        STEP(state_anchor(walk, value));
    }
    void *top = top_frame(tstate);
    void *frame = top;
    while (frame != NULL && skipped(frame, own)) {
        frame = frame_back(frame);
    }
    if (frame == NULL) {
        frame = top; /* all forksafe's own: kept whole */
    }
    for (Py_ssize_t depth = 0; frame != NULL; frame = frame_back(frame)) {
        if (++depth > limit) {
            return WALK_NO_KEY;
        }
        PyObject *code = frame_code(frame);
        STEP(state_emit(walk, (uintptr_t)code));
        STEP(state_anchor(walk, code));
        STEP(state_emit(walk, frame_at(frame)));
    }
    return state_emit(walk, 0);
}

static uint64_t
state_hash(const uintptr_t *items, Py_ssize_t len)
{
    uint64_t hash = 1469598103934665603ULL;
    for (Py_ssize_t i = 0; i < len; i++) {
        hash = (hash ^ (uint64_t)items[i]) * 1099511628211ULL;
    }
    return hash;
}

static PyThreadState *
thread_state_of(PyInterpreterState *interp, unsigned long ident)
{
    for (PyThreadState *tstate = PyInterpreterState_ThreadHead(interp); tstate != NULL;
         tstate = PyThreadState_Next(tstate)) {
        if (tstate->thread_id == ident) {
            return tstate;
        }
    }
    return NULL;
}

/* The token of the state `walk` read, a new reference: a kept one, or a new one kept
   now (the thread walked again to anchor what was compared). Replaced states go to
   `dead`, released by the caller once done: releasing may run code. NULL and no error
   set: no token (the thread moved between the two walks). */
static PyObject *
token_of(StateWalk *walk, PyObject *ident, PyObject *thread, PyObject *keys,
         PyThreadState *tstate, Py_ssize_t limit, PyObject *own, PyObject *dead)
{
    uint64_t hash = state_hash(walk->items, walk->len);
    Py_ssize_t at = (Py_ssize_t)(hash & (INDEX_SIZE - 1));
    for (Py_ssize_t i = 0; i < INDEX_PROBES; i++) {
        Py_ssize_t here = (at + i) & (INDEX_SIZE - 1);
        if (state_index[here].hash != hash || !index_live(here)) {
            continue;
        }
        KnownState *known = &known_states[state_index[here].slot - 1];
        if (known->len == walk->len &&
            memcmp(known->values, walk->items, (size_t)walk->len * sizeof(uintptr_t)) == 0) {
            Py_INCREF(known->token);
            return known->token;
        }
    }
    PyObject *anchors = PyList_New(walk->count);
    PyObject *token = PyLong_FromUnsignedLongLong(++state_generation);
    uintptr_t *values = PyMem_RawMalloc((size_t)(walk->len ? walk->len : 1) * sizeof(uintptr_t));
    if (anchors == NULL || token == NULL || values == NULL) {
        Py_XDECREF(anchors);
        Py_XDECREF(token);
        PyMem_RawFree(values);
        return PyErr_NoMemory();
    }
    /* Allocating may have run a collection, and a finalizer may have moved the thread:
       what is anchored must be what was compared. */
    StateWalk again = {walk->items, 0, walk->len, anchors, 0, 0};
    int done = walk_state(&again, ident, thread, keys, tstate, limit, own);
    if (done != WALK_OK || again.moved || again.len != walk->len ||
            again.count != walk->count) {
        Py_DECREF(anchors);
        Py_DECREF(token);
        PyMem_RawFree(values);
        return NULL;
    }
    memcpy(values, walk->items, (size_t)walk->len * sizeof(uintptr_t));
    Py_ssize_t chosen = next_state;
    KnownState *slot = &known_states[chosen];
    next_state = (next_state + 1) % STATE_SLOTS;
    if (slot->token != NULL) {
        if (PyList_Append(dead, slot->anchors) < 0 || PyList_Append(dead, slot->token) < 0) {
            Py_DECREF(anchors);
            Py_DECREF(token);
            PyMem_RawFree(values);
            return NULL;
        }
        Py_CLEAR(slot->anchors);
        Py_CLEAR(slot->token);
        PyMem_RawFree(slot->values);
    }
    slot->values = values;
    slot->len = walk->len;
    slot->hash = hash;
    slot->anchors = anchors;
    slot->token = token;
    index_add(hash, chosen);
    Py_INCREF(token);
    return token;
}

static PyObject *
thread_tokens(PyObject *module, PyObject *args)
{
    PyObject *active, *dummy, *keys, *own;
    unsigned long me;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "O!kO!O!nU:thread_tokens", &PyDict_Type, &active, &me,
                          &PyType_Type, &dummy, &PyTuple_Type, &keys, &limit, &own)) {
        return NULL;
    }
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(keys); k++) {
        if (!PyUnicode_Check(PyTuple_GET_ITEM(keys, k))) {
            PyErr_SetString(PyExc_TypeError, "thread_tokens: keys must be strings");
            return NULL;
        }
    }
    if (PyDict_GET_SIZE(active) > MAX_TOKEN_THREADS) {
        Py_RETURN_NONE;
    }
    PyInterpreterState *interp = PyInterpreterState_Get();
    /* Every thread running Python code must be one `active` lists: one it does not
       (started with _thread.start_new_thread) is the probe's to find, in Python. */
    Py_ssize_t running = 0;
    for (PyThreadState *tstate = PyInterpreterState_ThreadHead(interp); tstate != NULL;
         tstate = PyThreadState_Next(tstate)) {
        if (tstate->thread_id != me && top_frame(tstate) != NULL) {
            running++;
        }
    }
    PyObject *tokens = PyList_New(0);
    PyObject *dead = PyList_New(0);
    StateWalk walk = {NULL, 0, 0, NULL, 0, 0};
    PyObject *result = NULL;
    if (tokens == NULL || dead == NULL) {
        goto done;
    }
    Py_ssize_t i = 0, listed = 0;
    PyObject *ident, *thread;
    while (PyDict_Next(active, &i, &ident, &thread)) {
        if (!PyLong_CheckExact(ident) || PyObject_TypeCheck(thread, (PyTypeObject *)dummy)) {
            result = Py_None;
            goto done;
        }
        unsigned long id = PyLong_AsUnsignedLongMask(ident);
        if (id == me) {
            continue;
        }
        PyThreadState *tstate = thread_state_of(interp, id);
        if (tstate == NULL || top_frame(tstate) == NULL) {
            result = Py_None;
            goto done;
        }
        listed++;
        walk.len = walk.count = 0;
        int walked = walk_state(&walk, ident, thread, keys, tstate, limit, own);
        if (walked == WALK_ERROR) {
            goto done;
        }
        if (walked == WALK_NO_KEY) {
            result = Py_None;
            goto done;
        }
        PyObject *token = token_of(&walk, ident, thread, keys, tstate, limit, own, dead);
        if (token == NULL) {
            if (!PyErr_Occurred()) {
                result = Py_None;
            }
            goto done;
        }
        int appended = PyList_Append(tokens, token);
        Py_DECREF(token);
        if (appended < 0) {
            goto done;
        }
        /* The dict may have changed under a collection run by an allocation. */
        if (PyDict_GET_SIZE(active) > MAX_TOKEN_THREADS) {
            result = Py_None;
            goto done;
        }
    }
    result = listed == running ? tokens : Py_None;
done:
    PyMem_RawFree(walk.items);
    Py_XINCREF(result);
    Py_XDECREF(tokens);
    Py_XDECREF(dead); /* last: releasing replaced states may run code */
    return result;
}

#endif /* FORKSAFE_STACKS */

/*
 * images_version() and images(): glibc's list of loaded images, read with
 * dl_iterate_phdr and a C callback.
 *
 * Why C: glibc holds its loader lock while it calls the callback. A Python
 * callback (ctypes) needs the GIL in there, and a thread importing an extension
 * module holds the GIL while dlopen waits for that lock: both wait forever. That
 * happened to programs that imported a module in one thread while another forked
 * under the guard. This callback only copies numbers and bytes into C memory and
 * never touches Python; the Python objects are made after the lock is released.
 */
#if defined(__linux__) && defined(__GLIBC__)
#define FORKSAFE_IMAGES 1
#include <link.h>
#include <string.h>

#define HAS_COUNTERS(size) \
    ((size) >= offsetof(struct dl_phdr_info, dlpi_subs) + sizeof(unsigned long long))

static int
first_image(struct dl_phdr_info *info, size_t size, void *data)
{
    unsigned long long *counters = data;
    if (HAS_COUNTERS(size)) {
        counters[0] = info->dlpi_adds;
        counters[1] = info->dlpi_subs;
        counters[2] = 1;
    }
    return 1; /* the first image is enough: the counters are the process's */
}

/* Every image as [name offset, name length, number of ranges, start, end, ...] in
   `words`, its name's bytes in `text`. Plain C memory: no Python in the callback. */
typedef struct {
    unsigned long long counters[3];
    unsigned long long *words;
    size_t n_words, cap_words;
    char *text;
    size_t n_text, cap_text;
    int failed;
} Images;

static int
grow(void **buffer, size_t *cap, size_t need, size_t item)
{
    if (need <= *cap) {
        return 0;
    }
    size_t cap_new = *cap ? *cap : 256;
    while (cap_new < need) {
        cap_new *= 2;
    }
    void *grown = realloc(*buffer, cap_new * item);
    if (grown == NULL) {
        return -1;
    }
    *buffer = grown;
    *cap = cap_new;
    return 0;
}

static int
every_image(struct dl_phdr_info *info, size_t size, void *data)
{
    Images *images = data;
    if (images->n_words == 0 && HAS_COUNTERS(size)) {
        images->counters[0] = info->dlpi_adds;
        images->counters[1] = info->dlpi_subs;
        images->counters[2] = 1;
    }
    const char *name = info->dlpi_name ? info->dlpi_name : "";
    size_t length = strlen(name);
    size_t ranges = 0;
    for (size_t i = 0; i < info->dlpi_phnum; i++) {
        if (info->dlpi_phdr[i].p_type == PT_LOAD && (info->dlpi_phdr[i].p_flags & PF_X)) {
            ranges++;
        }
    }
    if (grow((void **)&images->words, &images->cap_words, images->n_words + 3 + 2 * ranges,
             sizeof(unsigned long long)) < 0 ||
        grow((void **)&images->text, &images->cap_text, images->n_text + length + 1, 1) < 0) {
        images->failed = 1;
        return 1;
    }
    unsigned long long *out = images->words + images->n_words;
    *out++ = images->n_text;
    *out++ = length;
    *out++ = ranges;
    for (size_t i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        if (ph->p_type == PT_LOAD && (ph->p_flags & PF_X)) {
            *out++ = info->dlpi_addr + ph->p_vaddr;
            *out++ = info->dlpi_addr + ph->p_vaddr + ph->p_memsz;
        }
    }
    images->n_words = (size_t)(out - images->words);
    memcpy(images->text + images->n_text, name, length);
    images->n_text += length;
    return 0;
}

static PyObject *
counters_object(const unsigned long long *counters)
{
    if (!counters[2]) {
        Py_RETURN_NONE;
    }
    return Py_BuildValue("(KK)", counters[0], counters[1]);
}

static PyObject *
images_version(PyObject *module, PyObject *unused)
{
    unsigned long long counters[3] = {0, 0, 0};
    dl_iterate_phdr(first_image, counters);
    if (!counters[2]) {
        return PyLong_FromLong(-1);
    }
    /* One number, > 0: the two counters side by side (each below 2**31 in any
       process that ever lived), plus one. */
    if (counters[0] >= (1ULL << 31) || counters[1] >= (1ULL << 31)) {
        return PyLong_FromLong(-1);
    }
    return PyLong_FromUnsignedLongLong((counters[0] << 32 | counters[1]) + 1);
}

static PyObject *
images_list(PyObject *module, PyObject *unused)
{
    Images images;
    memset(&images, 0, sizeof(images));
    dl_iterate_phdr(every_image, &images);
    PyObject *result = NULL, *found = NULL;
    if (images.failed) {
        PyErr_NoMemory();
        goto done;
    }
    found = PyList_New(0);
    if (found == NULL) {
        goto done;
    }
    for (size_t at = 0; at < images.n_words;) {
        unsigned long long offset = images.words[at], length = images.words[at + 1];
        unsigned long long ranges = images.words[at + 2];
        at += 3;
        PyObject *spans = PyTuple_New((Py_ssize_t)ranges);
        if (spans == NULL) {
            goto done;
        }
        for (unsigned long long i = 0; i < ranges; i++, at += 2) {
            PyObject *span = Py_BuildValue("(KK)", images.words[at], images.words[at + 1]);
            if (span == NULL) {
                Py_DECREF(spans);
                goto done;
            }
            PyTuple_SET_ITEM(spans, (Py_ssize_t)i, span);
        }
        PyObject *entry = Py_BuildValue("(y#N)", images.text + offset, (Py_ssize_t)length,
                                        spans);
        if (entry == NULL || PyList_Append(found, entry) < 0) {
            Py_XDECREF(entry);
            goto done;
        }
        Py_DECREF(entry);
    }
    PyObject *counters = counters_object(images.counters);
    if (counters != NULL) {
        result = Py_BuildValue("(NO)", counters, found);
    }
done:
    Py_XDECREF(found);
    free(images.words);
    free(images.text);
    return result;
}

#endif /* __linux__ && __GLIBC__ */

static PyMethodDef speedups_methods[] = {
#ifdef FORKSAFE_IMAGES
    {"images_version", images_version, METH_NOARGS,
     "glibc's counts of images loaded and unloaded as one number > 0; -1 if unknown."},
    {"images", images_list, METH_NOARGS,
     "((loaded, unloaded) or None, [(name, ((start, end), ...)), ...]): every loaded image "
     "and its executable ranges, as dl_iterate_phdr lists them."},
#endif
#ifdef FORKSAFE_STACKS
    {"stacks", stacks, METH_VARARGS,
     "stacks(active, me, dummy, name_key, daemon_key, limit): the same token as the last "
     "call while every thread and stack is as it was; a new one when not; None when no "
     "key can be made (see forksafe._check)."},
    {"thread_tokens", thread_tokens, METH_VARARGS,
     "thread_tokens(active, me, dummy, keys, limit, own): a token per thread but the "
     "caller's, the same object while the thread stands where it stood before; None "
     "when not every thread can have one (see forksafe._probes.threads)."},
#endif
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups = {
    PyModuleDef_HEAD_INIT,
    .m_name = "forksafe._speedups",
    .m_doc = "The observation layer's sqlite3.connect wrapper and the guard's stack reader, "
              "in C (optional).",
    .m_size = -1,
    .m_methods = speedups_methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    if (PyType_Ready(&RecorderType) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&speedups);
    if (module == NULL) {
        return NULL;
    }
    Py_INCREF(&RecorderType);
    if (PyModule_AddObject(module, "Recorder", (PyObject *)&RecorderType) < 0) {
        Py_DECREF(&RecorderType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
