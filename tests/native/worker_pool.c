/* A native library that does its work on its own threads, as messaging and
 * inference runtimes do: callers hand a job to the library's worker thread and
 * wait for the answer; results arrive through an I/O thread that reads a pipe.
 * Forked after the threads start, a child's call waits forever: the worker and
 * the I/O thread do not exist in the child, while the library's state (its
 * "started" flag) says they do, so none is started again. Forked before, the
 * child starts its own threads and its call completes. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <unistd.h>

static pthread_mutex_t mutex = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t work = PTHREAD_COND_INITIALIZER;
static pthread_cond_t done = PTHREAD_COND_INITIALIZER;
static int started = 0;
static int64_t pending = -1;
static int64_t result = -1;
static int pipe_fds[2] = {-1, -1};

static void *worker(void *arg) {
    (void)arg;
    pthread_setname_np(pthread_self(), "wp-worker");
    pthread_mutex_lock(&mutex);
    for (;;) {
        while (pending < 0)
            pthread_cond_wait(&work, &mutex);
        int64_t job = pending;
        pending = -1;
        pthread_mutex_unlock(&mutex);
        int64_t answer = job * 2;
        if (write(pipe_fds[1], &answer, sizeof answer) != sizeof answer)
            return NULL;
        pthread_mutex_lock(&mutex);
    }
}

static void *reader(void *arg) {
    (void)arg;
    pthread_setname_np(pthread_self(), "wp-io");
    int64_t answer;
    while (read(pipe_fds[0], &answer, sizeof answer) == sizeof answer) {
        pthread_mutex_lock(&mutex);
        result = answer;
        pthread_cond_broadcast(&done);
        pthread_mutex_unlock(&mutex);
    }
    return NULL;
}

/* Start the library's worker and I/O threads, once per process image (as far as
 * the library can tell). */
int wp_start(void) {
    pthread_t thread;
    pthread_mutex_lock(&mutex);
    if (started) {
        pthread_mutex_unlock(&mutex);
        return 0;
    }
    if (pipe(pipe_fds) != 0) {
        pthread_mutex_unlock(&mutex);
        return -1;
    }
    started = 1;
    pthread_mutex_unlock(&mutex);
    if (pthread_create(&thread, NULL, worker, NULL) != 0 || pthread_detach(thread) != 0)
        return -1;
    if (pthread_create(&thread, NULL, reader, NULL) != 0 || pthread_detach(thread) != 0)
        return -1;
    return 0;
}

/* Hand `job` to the worker and wait for its answer (job * 2). */
int64_t wp_call(int64_t job) {
    if (wp_start() != 0)
        return -1;
    pthread_mutex_lock(&mutex);
    result = -1;
    pending = job;
    pthread_cond_signal(&work);
    while (result < 0)
        pthread_cond_wait(&done, &mutex);
    int64_t answer = result;
    pthread_mutex_unlock(&mutex);
    return answer;
}
