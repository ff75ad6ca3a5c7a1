/* An image kernel parallelised with GNU OpenMP, as many native extensions are.
 * Its first call starts libgomp's worker pool, which stays alive afterwards. */
#include <omp.h>

int blur(int n) {
    long sum = 0;
#pragma omp parallel for reduction(+ : sum)
    for (int i = 0; i < n * n; i++)
        sum += (i * 7) % 13;
    return (int)(sum % 1000);
}
