/* A stand-in for the CUDA driver (built as libcuda.so.1): cuInit starts a
 * named event-handler thread, as the real driver does; before cuInit the
 * library is inert. */
#define _GNU_SOURCE
#include <pthread.h>
#include <unistd.h>

static int initialised = 0;

static void *event_handler(void *arg) {
    (void)arg;
    pthread_setname_np(pthread_self(), "cuda-EvtHandlr");
    for (;;)
        pause();
    return NULL;
}

int cuInit(unsigned int flags) {
    pthread_t thread;
    (void)flags;
    if (initialised)
        return 0;
    if (pthread_create(&thread, NULL, event_handler, NULL) != 0)
        return 999; /* CUDA_ERROR_UNKNOWN */
    pthread_detach(thread);
    initialised = 1;
    return 0;
}
