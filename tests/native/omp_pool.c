/* A real GNU OpenMP pool: the first parallel region starts libgomp's worker
 * threads, which stay alive (idle) afterwards. A child forked after that and
 * running another region waits forever for workers that do not exist. */
#include <omp.h>

long omp_pool_run(int n) {
    long sum = 0;
#pragma omp parallel for reduction(+ : sum)
    for (int i = 0; i < n; i++)
        sum += (i * 7) % 13;
    return sum;
}

int omp_pool_threads(void) {
    int count = 0;
#pragma omp parallel
    {
#pragma omp atomic
        count++;
    }
    return count;
}
