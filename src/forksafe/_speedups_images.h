/*
 * Part of forksafe/_speedups.c, which includes it once (one compilation unit): images_version() and images().
 */

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
