/*
 * backward.cuh -- the attention backward kernels on one device: what the
 * tensor-core (backward.cu) and SIMT (backward_simt.cu) variants share.
 *
 * For every task of an ra_backward_batch (csrc/ring/backend.h), with P the
 * probabilities recomputed from the rows' final log-sum-exp
 * (P = exp(scale * q.k - lse), exactly 0 for a key the query may not see and
 * for a row whose lse is -inf), D = delta of the row (sum dO * O) and
 * dS = P * (dO . v - D):
 *
 *   dQ  += scale * dS K      (fp32 accumulator rows acc + task.acc, a.acc_stride apart)
 *   dK  += scale * dS^T Q    (fp32 rows dk + task.dkv, dkv_stride apart)
 *   dV  += P^T dO            (fp32 rows dv + task.dkv, dkv_stride apart)
 *
 * Within one batch the tasks' key rows (and query rows) are disjoint.  The
 * tensor-core path (backward.cu) by default runs one fused kernel: a block
 * owns a tile of keys of one task, streams its queries and adds dQ with fp32
 * atomics (the key blocks of one task share dQ rows), so dQ's summation
 * order -- and its last bits -- vary between runs.  exec.deterministic
 * (default from RINGATTN_DETERMINISTIC=1) selects two passes without
 * atomics instead, as the SIMT kernels always run: the dK/dV kernel owns a
 * tile of keys and streams its queries, the dQ kernel owns a tile of
 * queries and streams the keys, so blocks never write the same accumulator
 * row.  csrc/cpu/backward.c is the CPU twin.
 */
#ifndef RINGATTN_CUDA_BACKWARD_CUH
#define RINGATTN_CUDA_BACKWARD_CUH

#include "attend.cuh"

/* Launch arguments, passed by value.  `a` is the forward's argument block
 * with a.acc the dQ accumulator and a.lse the rows' final lse (read only);
 * a.tile0 is unused (the launchers split long runs or many tasks themselves). */
struct backward_args {
  attend_args a;
  const void *dout;     /* dO, indexed like q by task.dout            */
  int64_t dout_stride;  /* elements between the tokens of a run       */
  const float *delta;   /* delta + task.delta, rows a.lse_stride apart */
  float *dk, *dv;       /* + task.dkv, rows dkv_stride floats apart   */
  int64_t dkv_stride;
  float scale;          /* the softmax scale (a.scale_log2 / log2 e)  */
};

/* Launchers (the tensor-core ones are private to backward.cu): ntasks >= 1;
 * max_nk / max_nq the longest key / query run. */
ra_status ra_cuda_backward_dkdv_simt(const backward_args &b, ra_dtype dtype, int ntasks, int64_t max_nk,
                                     cudaStream_t stream);
ra_status ra_cuda_backward_dq_simt(const backward_args &b, ra_dtype dtype, int ntasks, int64_t max_nq,
                                   cudaStream_t stream);

#endif /* RINGATTN_CUDA_BACKWARD_CUH */
