/*
 * forksafe._speedups: three things forksafe does in C, each because Python could not
 * do it safely or cheaply enough; forksafe works without them (see each part):
 *   - Recorder: the observation layer's sqlite3.connect wrapper (below);
 *   - stacks(): the threads-and-stacks part of the guard's fingerprint, and
 *     thread_tokens(): a token per thread for a fork storm (_speedups_stacks.h,
 *     _speedups_tokens.h);
 *   - images_version() and images(): glibc's image list without a Python callback
 *     under the loader lock (_speedups_images.h).
 * The parts are included into this file: one compilation unit, one module.
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

#include "_speedups_stacks.h"
#include "_speedups_tokens.h"
#include "_speedups_images.h"

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
