/* A native library that finds out for itself that it was forked, as some runtimes
 * do: it remembers the process it started its (event) thread in, and a call from
 * another process prints a message on stderr and ends that process with SIGTERM,
 * because the library's state there is not safe to use. */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <sys/types.h>
#include <unistd.h>

static pid_t owner = 0;

static void *events(void *arg) {
    (void)arg;
    pthread_setname_np(pthread_self(), "fc-events");
    for (;;)
        pause();
    return NULL;
}

/* Start the library's event thread in this process. */
int fc_start(void) {
    pthread_t thread;
    if (owner != 0)
        return 0;
    owner = getpid();
    if (pthread_create(&thread, NULL, events, NULL) != 0)
        return -1;
    return pthread_detach(thread);
}

/* Do a piece of work; in a forked child of the starting process, end it. */
int fc_work(int value) {
    if (owner != 0 && owner != getpid()) {
        fprintf(stderr, "forkcheck: fork() detected (started in %d, called in %d); "
                "terminating\n", (int)owner, (int)getpid());
        fflush(stderr);
        raise(SIGTERM);
    }
    return value + 1;
}
