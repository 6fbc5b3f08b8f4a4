/*
 * attend.cuh -- what the two attention kernels share: their arguments, the
 * visibility rule of a (query, key) pair, and the log-sum-exp merge of a
 * finished row into the accumulator.
 *
 * Both kernels compute, for every task of an ra_attend_batch, softmax
 * attention of its queries over its keys in fp32 with an online softmax in
 * base 2 (scores pre-multiplied by scale * log2 e, so exp2 replaces exp),
 * and merge each finished row into acc / lse exactly as ra_merge_rows
 * (csrc/cpu/merge.c) does.  Grid of the SIMT kernel: x = task, y = query tile
 * (tile0 + y); the tensor-core kernel's is described in attend.cu.
 */
#ifndef RINGATTN_CUDA_ATTEND_CUH
#define RINGATTN_CUDA_ATTEND_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>

#include "cuda_backend.h"

#define RA_LOG2E 1.44269504088896340736f
#define RA_LN2 0.693147180559945309417f

/* Everything a kernel launch needs, passed by value.  Offsets and strides are
 * in elements (q, k, v) or floats (acc, lse), as in ra_attend_batch. */
struct attend_args {
  const void *q, *k, *v;
  int64_t q_stride, k_stride, v_stride;
  float *acc, *lse;
  int64_t acc_stride, lse_stride;
  const ra_attend_task *tasks; /* device copy of the batch's task list */
  int64_t rate;
  float scale_log2;            /* softmax scale * log2(e)             */
  int causal;
  int head_dim;
  int tile0;                   /* first query tile of the launch      */
};

/* Launchers (attend.cu, attend_simt.cu).  ntasks >= 1; max_nq is the
 * longest query run of the batch. */
ra_status ra_cuda_attend_mma(const attend_args &a, ra_dtype dtype, int ntasks, int64_t max_nq,
                             cudaStream_t stream);
ra_status ra_cuda_attend_simt(const attend_args &a, ra_dtype dtype, int ntasks, int64_t max_nq,
                              cudaStream_t stream);
/* Largest head dim of the SIMT kernel. */
#define RA_SIMT_MAX_DIM 256

/* ------------------------------------------------------------ element types */

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

/* --------------------------------------------------------------- visibility */

/* How many keys of the task any query up to local index i_last may see:
 * all of them, or with causality those at positions <= that query's. */
__device__ __forceinline__ int visible_key_count(const ra_attend_task &t, int64_t i_last,
                                                 int causal, int64_t rate) {
  int64_t n = t.nk;
  if (causal) {
    const int64_t diff = t.qpos0 + i_last * rate - t.kpos0; /* keys j with j*rate <= diff */
    const int64_t upto = diff < 0 ? 0 : diff / rate + 1;
    if (upto < n) n = upto;
  }
  return (int)n;
}

/* Is key j (of nk valid) visible to query i?  Query i sits at qpos0 + i*rate
 * and key j at kpos0 + j*rate; diff0 = qpos0 - kpos0. */
__device__ __forceinline__ bool key_visible(int j, int i, int nk, int causal, int64_t diff0,
                                            int64_t rate) {
  return j < nk && (!causal || (int64_t)(j - i) * rate <= diff0);
}

/* -------------------------------------------------------------------- merge */

/* Log-sum-exp of a finished row from its running max m (base 2) and sum l:
 * -inf when the row saw no key, NaN when a NaN input reached it. */
__device__ __forceinline__ float row_lse(float m, float l) {
  if (l > 0.0f) return (m + log2f(l)) * RA_LN2;
  return l == l ? -INFINITY : NAN;
}

/* How a finished part row (lse lp) merges into an accumulated row (lse la),
 * exactly as ra_merge_rows: skipped when the part saw no keys, copied when
 * the accumulator has none yet, else mixed by the two weights.  A NaN lse
 * takes over the row. */
struct merge_rule {
  bool apply, copy;
  float ia, ip, lse;
};

__device__ __forceinline__ merge_rule merge_weights(float la, float lp) {
  merge_rule w = {false, false, 0.0f, 0.0f, la};
  if (lp == -INFINITY) return w;
  w.apply = true;
  if (la == -INFINITY) {
    w.copy = true;
    w.lse = lp;
    return w;
  }
  const float mx = la > lp ? la : lp; /* not fmaxf: a NaN must win */
  const float wa = expf(la - mx), wp = expf(lp - mx), sum = wa + wp;
  w.ia = wa / sum;
  w.ip = wp / sum;
  w.lse = mx + logf(sum);
  return w;
}

__device__ __forceinline__ float merged(const merge_rule &w, float acc, float part) {
  return w.copy ? part : w.ia * acc + w.ip * part;
}

#endif /* RINGATTN_CUDA_ATTEND_CUH */
