/*
 * threads.c -- how many cores the CPU kernels use.
 */
#include <stdlib.h>
#include <unistd.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "internal.h"

/* RINGATTN_NUM_THREADS if set to a positive number, else every online core. */
int ra_default_num_threads(void) {
  const char *env = getenv("RINGATTN_NUM_THREADS");
  if (env) {
    int n = atoi(env);
    if (n > 0) return n;
  }
#ifdef _OPENMP
  return omp_get_num_procs();
#else
  long n = sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? (int)n : 1;
#endif
}
