/*
 * Part of forksafe/_speedups.c, which includes it once (one compilation unit): stacks(), and the walk helpers thread_tokens() shares.
 */

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

#endif /* FORKSAFE_STACKS */
