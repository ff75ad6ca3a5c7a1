/* A thread started by C code (no Python thread accounts for it) that holds a
 * pthread mutex for a while. Forked while it holds the mutex, a child that takes
 * the mutex blocks forever: the holder does not exist in the child. */
#define _GNU_SOURCE
#include <pthread.h>
#include <time.h>
#include <unistd.h>

static pthread_mutex_t mutex = PTHREAD_MUTEX_INITIALIZER;
static volatile int held = 0;
static double hold_seconds = 0;

static void sleep_for(double seconds) {
    struct timespec ts;
    ts.tv_sec = (time_t)seconds;
    ts.tv_nsec = (long)((seconds - (double)ts.tv_sec) * 1e9);
    while (nanosleep(&ts, &ts) != 0) {
    }
}

static void *holder(void *arg) {
    (void)arg;
    pthread_setname_np(pthread_self(), "mutex-holder");
    pthread_mutex_lock(&mutex);
    held = 1;
    sleep_for(hold_seconds);
    held = 0;
    pthread_mutex_unlock(&mutex);
    return NULL;
}

/* Start the holder thread; it takes the mutex and keeps it for `seconds`. */
int native_mutex_hold(double seconds) {
    pthread_t thread;
    hold_seconds = seconds;
    if (pthread_create(&thread, NULL, holder, NULL) != 0)
        return -1;
    return pthread_detach(thread);
}

/* Wait up to `timeout` seconds until the holder has the mutex: 1 if it does. */
int native_mutex_wait_held(double timeout) {
    for (double waited = 0; waited < timeout; waited += 0.005) {
        if (held)
            return 1;
        sleep_for(0.005);
    }
    return held;
}

/* Take and release the mutex (in a forked child: blocks forever if it was held). */
int native_mutex_take(void) {
    pthread_mutex_lock(&mutex);
    pthread_mutex_unlock(&mutex);
    return 0;
}
