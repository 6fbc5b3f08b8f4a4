/*
 * micro.h -- the register-blocked micro-kernels of the forward (kernel.c).
 *
 * The forward works on transposed tiles: queries run along the vector lanes.
 * A query block of QB = NV vectors is one micro-tile wide, so
 *   scores  S^T[j][i] = sum_c K[j][c] Q^T[c][i]   (MR keys x QB queries)
 *   output  O^T[c][i] += sum_j V[j][c] P^T[j][i]  (MR dims x QB queries)
 * are both "broadcast one scalar of a packed row, FMA it into NV vectors":
 * MR x NV accumulators stay in registers for the whole inner loop, each step
 * loads NV vectors and MR scalars for MR*NV FMAs.  Keys and values are used
 * in their natural row layout (no transposes), and the softmax over keys runs
 * down the columns of S^T with plain vector operations.
 *
 * MR and NV are sized to the registers of the ISA the file is compiled for
 * (simd.h's vf is 16 lanes under AVX-512, 8 otherwise):
 *   AVX-512  32 zmm: 6 x 4 = 24 accumulators, 64 queries per tile
 *   AVX2     16 ymm: 6 x 2 = 12 accumulators, 16 queries per tile
 *   NEON     32 q (vf = 2 q): 6 x 2 = 24 q accumulators
 *   SSE2     16 xmm (vf = 2 xmm): 3 x 2 = 12 xmm accumulators
 */
#ifndef RINGATTN_MICRO_H
#define RINGATTN_MICRO_H

#include <stdint.h>

#include "cpu/simd.h"

#if defined(__AVX512F__)
#define RA_MR 6
#define RA_NV 4
#elif defined(__AVX2__) || defined(__aarch64__)
#define RA_MR 6
#define RA_NV 2
#else
#define RA_MR 3
#define RA_NV 2
#endif
#define RA_QB (RA_NV * VF) /* queries per micro-tile (a column block) */

#if defined(__GNUC__)
#define RA_ALWAYS_INLINE inline __attribute__((always_inline))
#define RA_UNROLL _Pragma("GCC unroll 16")
#else
#define RA_ALWAYS_INLINE inline
#define RA_UNROLL
#endif

/* s[r][0:QB] = sum_c k[r][c] qt[c][0:QB] for r < mr: mr keys (rows ldk
 * apart) against one column block of transposed queries (rows QB apart);
 * the first `valid` rows also raise the column maxima mx (the softmax's
 * max, taken while the scores are still in registers). */
static RA_ALWAYS_INLINE void micro_scores(float *restrict s, const float *restrict k, int64_t ldk,
                                          const float *restrict qt, int64_t d, vf *mx, int valid,
                                          const int mr) {
  vf acc[RA_MR][RA_NV];
  RA_UNROLL for (int r = 0; r < mr; r++)
    RA_UNROLL for (int v = 0; v < RA_NV; v++) acc[r][v] = vfsplat(0.0f);
  for (int64_t c = 0; c < d; c++) {
    vf x[RA_NV];
    RA_UNROLL for (int v = 0; v < RA_NV; v++) x[v] = *(const vf *)(qt + c * RA_QB + v * VF);
    RA_UNROLL for (int r = 0; r < mr; r++) {
      const vf b = vfsplat(k[r * ldk + c]);
      RA_UNROLL for (int v = 0; v < RA_NV; v++) acc[r][v] += b * x[v];
    }
  }
  RA_UNROLL for (int r = 0; r < mr; r++)
    RA_UNROLL for (int v = 0; v < RA_NV; v++) {
      *(vf *)(s + r * RA_QB + v * VF) = acc[r][v];
      if (r < valid) mx[v] = vfselect(acc[r][v] > mx[v], acc[r][v], mx[v]);
    }
}

/* ot[r][0:QB] = alpha * ot[r][0:QB] + sum_{j < n} v[j][r] p[j][0:QB] for
 * r < mr: mr head dims of the output (rows QB apart), rescaled by the
 * softmax's alpha on the way into registers, plus n probabilities (rows QB
 * apart) times the values (rows ldv apart, columns r). */
static RA_ALWAYS_INLINE void micro_values(float *restrict ot, const float *restrict vals, int64_t ldv,
                                          const float *restrict p, int64_t n, const vf *alpha,
                                          const int mr) {
  vf acc[RA_MR][RA_NV];
  RA_UNROLL for (int r = 0; r < mr; r++)
    RA_UNROLL for (int v = 0; v < RA_NV; v++) acc[r][v] = *(const vf *)(ot + r * RA_QB + v * VF) * alpha[v];
  for (int64_t j = 0; j < n; j++) {
    vf x[RA_NV];
    RA_UNROLL for (int v = 0; v < RA_NV; v++) x[v] = *(const vf *)(p + j * RA_QB + v * VF);
    RA_UNROLL for (int r = 0; r < mr; r++) {
      const vf b = vfsplat(vals[j * ldv + r]);
      RA_UNROLL for (int v = 0; v < RA_NV; v++) acc[r][v] += b * x[v];
    }
  }
  RA_UNROLL for (int r = 0; r < mr; r++)
    RA_UNROLL for (int v = 0; v < RA_NV; v++) *(vf *)(ot + r * RA_QB + v * VF) = acc[r][v];
}

#endif /* RINGATTN_MICRO_H */
