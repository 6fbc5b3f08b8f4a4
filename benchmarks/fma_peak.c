/*
 * fma_peak.c -- the machine's fp32 FMA peak, for bench_cpu.py's "% of peak".
 *
 * Each thread runs NACC independent chains of vector FMAs (enough to cover
 * the FMA latency on two ports) at the widest vector the compiler targets,
 * and the threads' rates are summed.  Built by bench_cpu.py with
 * `cc -O2 -march=native -fopenmp`; prints GFLOP/s for 1 thread and for N.
 *   usage: fma_peak THREADS
 */
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>

#if defined(__AVX512F__)
#define W 16
#else
#define W 8
#endif
#define NACC 16
typedef float vec __attribute__((vector_size(W * 4)));

/* NACC named accumulators (an array would live on the stack). */
#define CHAINS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13) X(14) X(15)
#define DECL(i) vec acc##i = (vec){0} + (float)(i) * 1e-3f;
#define STEP(i) acc##i = acc##i * a + b; __asm__("" : "+v"(acc##i));
#define SUM(i) sink += acc##i[0];

static double run(long iters) {
  CHAINS(DECL)
  const vec a = (vec){0} + 0.999999f, b = (vec){0} + 1e-7f;
  double t0 = omp_get_wtime();
  for (long it = 0; it < iters; it++) {
    CHAINS(STEP)
  }
  double t = omp_get_wtime() - t0;
  float sink = 0;
  CHAINS(SUM)
  if (sink == 12345.0f) puts(""); /* keep the result alive */
  return 2.0 * W * NACC * (double)iters / t / 1e9;
}

static double measure(int threads, long iters) {
  double total = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
  {
    double best = 0;
    for (int rep = 0; rep < 5; rep++) {
      double g = run(iters);
      if (g > best) best = g;
    }
    total += best;
  }
  return total;
}

int main(int argc, char **argv) {
  int threads = argc > 1 ? atoi(argv[1]) : 1;
  long iters = 20000000;
  printf("%d %.1f\n", 1, measure(1, iters));
  printf("%d %.1f\n", threads, measure(threads, iters));
  return 0;
}
