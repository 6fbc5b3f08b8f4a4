/*
 * merge.c -- combine partial attention results by their log-sum-exp.
 *
 * A partial result is a normalised output row o_x with its log-sum-exp
 * lse_x over some set of keys.  The result over the union of two disjoint
 * key sets is (e^{lse_a} o_a + e^{lse_b} o_b) / (e^{lse_a} + e^{lse_b}),
 * computed relative to the larger lse so that nothing overflows.  This is
 * how ring steps, and branches in "longnet" mode, are combined.
 */
#include <math.h>

#include "cpu/cpu.h"

/* One definition for both precisions: float (the fp32 accumulators of the
 * float32/float16 kernels) and double (the float64 path). */
#define DEFINE_MERGE_ROWS(NAME, T, EXP, LOG)                                  \
  void NAME(T *acc, int64_t acc_stride, T *lse_acc, int64_t lse_acc_stride,   \
            const T *part, int64_t part_stride, const T *lse_part,            \
            int64_t rows, int64_t dim) {                                      \
    for (int64_t t = 0; t < rows; t++) {                                      \
      T *a = acc + t * acc_stride, *la = lse_acc + t * lse_acc_stride;        \
      const T *p = part + t * part_stride, lp = lse_part[t];                  \
      if (lp == -INFINITY) continue;       /* the part saw no keys    */      \
      if (*la == -INFINITY) {              /* first keys for this row */      \
        for (int64_t c = 0; c < dim; c++) a[c] = p[c];                        \
        *la = lp;                                                             \
        continue;                                                             \
      }                                                                       \
      T mx = *la > lp ? *la : lp;                                             \
      T wa = EXP(*la - mx), wp = EXP(lp - mx), sum = wa + wp;                 \
      T ia = wa / sum, ip = wp / sum;                                         \
      for (int64_t c = 0; c < dim; c++) a[c] = ia * a[c] + ip * p[c];         \
      *la = mx + LOG(sum);                                                    \
    }                                                                         \
  }

DEFINE_MERGE_ROWS(ra_merge_rows, float, expf, logf)
DEFINE_MERGE_ROWS(ra_merge_rows_f64, double, exp, log)
