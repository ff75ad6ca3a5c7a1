/* An imitation of Apple's libdispatch (built as libdispatch.so), for Linux.
 *
 * Like the real library it starts a worker thread on first use, answers
 * _dispatch_is_multithreaded(), and registers a pthread_atfork child handler
 * that marks the child as poisoned; in a poisoned child, the next use traps
 * ("BUG IN CLIENT OF LIBDISPATCH: trying to lock recursively" / "crashed on
 * child side of fork pre-exec"), which is SIGILL from __builtin_trap on x86-64
 * and SIGTRAP (brk) on arm64. fake_dispatch_use_trap() raises the arm64 signal
 * on any machine. */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

static int multithreaded = 0;
static int poisoned = 0;

static void *worker(void *arg) {
    (void)arg;
    pthread_setname_np(pthread_self(), "fakedispatch-wk");
    for (;;)
        pause();
    return NULL;
}

static void child_after_fork(void) {
    if (multithreaded)
        poisoned = 1;
}

__attribute__((constructor)) static void register_fork_handler(void) {
    pthread_atfork(NULL, NULL, child_after_fork);
}

int _dispatch_is_multithreaded(void) { return multithreaded; }

int fake_dispatch_start(void) {
    pthread_t thread;
    if (multithreaded)
        return 0;
    if (pthread_create(&thread, NULL, worker, NULL) != 0)
        return -1;
    pthread_detach(thread);
    multithreaded = 1;
    return 0;
}

/* Use the library: fine in the parent or after exec, a trap in a poisoned child. */
int fake_dispatch_use(void) {
    if (poisoned)
        __builtin_trap();
    return 0;
}

int fake_dispatch_use_trap(void) {
    if (poisoned) {
        raise(SIGTRAP);
        abort();
    }
    return 0;
}
