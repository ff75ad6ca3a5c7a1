/*
 * Part of forksafe/_speedups.c, which includes it once (one compilation unit): thread_tokens().
 */

#ifdef FORKSAFE_STACKS

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
