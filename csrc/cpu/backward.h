/*
 * backward.h -- flash-style attention backward on the CPU (backward.c).
 *
 * For a query row i with visible keys J, the row's FINAL log-sum-exp lse_i
 * (over everything the row sees, all ring steps and branches) and
 * D_i = dO_i . o_i (delta):
 *   P_ij  = exp(scale * q_i.k_j - lse_i)
 *   dV_j += sum_i P_ij dO_i
 *   dS_ij = P_ij (dO_i.v_j - D_i)
 *   dQ_i += scale * sum_j dS_ij k_j
 *   dK_j += scale * sum_i dS_ij q_i
 * Because lse and D are final, contributions of different key runs (ring
 * steps, branches) add: every call accumulates (+=) into dq / dk / dv.
 *
 * Positions and causality are those of ra_cpu_attend: query t of a run is at
 * q.pos0 + t*rate, key j at k.pos0 + j*rate, and with `causal` a key is
 * visible iff its position <= the query's.  Rows whose lse is -inf attend to
 * nothing and contribute nothing.  q, dout, k, v share `dtype` (converted to
 * fp32 as they are packed, by ra_load_row); lse, delta and the outputs are
 * fp32.  Arithmetic is fp32.
 *
 * ra_cpu_backward computes dQ, dK and dV in one pass (five products); the
 * pair ra_cpu_backward_dkdv / ra_cpu_backward_dq recomputes the scores in
 * each of two passes (seven products) so that a caller can parallelise dK/dV
 * over key blocks and dQ over query blocks without atomics.  Each writes
 * only the first head_dim floats of the output rows it owns.
 */
#ifndef RINGATTN_CPU_BACKWARD_H
#define RINGATTN_CPU_BACKWARD_H

#include <stddef.h>
#include <stdint.h>

#include "cpu/cpu.h"

/* The blocks a caller that parallelises the two passes hands each call: keys
 * for ra_cpu_backward_dkdv, queries for ra_cpu_backward_dq.  A hint, not a
 * limit: every function takes runs of any length. */
#define RA_BWD_BLOCK_K 128
#define RA_BWD_BLOCK_Q 128

/* Per-thread scratch of the three functions (one call at a time). */
typedef struct ra_bwd_workspace ra_bwd_workspace;
size_t ra_bwd_workspace_bytes(int64_t head_dim);
/* mem: ra_bwd_workspace_bytes(head_dim) bytes, 64-byte aligned. */
ra_bwd_workspace *ra_bwd_workspace_init(void *mem, int64_t head_dim);

/* dQ, dK, dV of a run of queries against a run of keys (any lengths) in one
 * pass: dq rows of the queries, dk/dv rows of the keys, all += (arguments as
 * below).  Calls that run at the same time must not share output rows. */
void ra_cpu_backward(ra_bwd_workspace *ws, ra_dtype dtype, int64_t head_dim, float scale, int causal,
                     int64_t rate, ra_tokens q, const void *dout, int64_t dout_stride, const float *lse,
                     int64_t lse_stride, const float *delta, int64_t delta_stride, ra_tokens k,
                     const void *v, int64_t v_stride, float *dq, int64_t dq_stride, float *dk, float *dv,
                     int64_t dkv_stride);

/* dK, dV for a block of keys (k.count, best at most RA_BWD_BLOCK_K) against a
 * whole run of queries (q.count, any length).  dout row t at dout + t*dout_stride
 * elements (dtype), lse/delta of query t at lse + t*lse_stride,
 * delta + t*delta_stride.  dk/dv: fp32 rows of the key block (row j at
 * dk + j*dkv_stride, dv + j*dkv_stride), accumulated (+=). */
void ra_cpu_backward_dkdv(ra_bwd_workspace *ws, ra_dtype dtype, int64_t head_dim, float scale,
                          int causal, int64_t rate, ra_tokens q, const void *dout,
                          int64_t dout_stride, const float *lse, int64_t lse_stride,
                          const float *delta, int64_t delta_stride, ra_tokens k, const void *v,
                          int64_t v_stride, float *dk, float *dv, int64_t dkv_stride);

/* dQ for a block of queries (q.count, best at most RA_BWD_BLOCK_Q) against a
 * whole run of keys (k.count, any length): dq row t at dq + t*dq_stride, += . */
void ra_cpu_backward_dq(ra_bwd_workspace *ws, ra_dtype dtype, int64_t head_dim, float scale,
                        int causal, int64_t rate, ra_tokens q, const void *dout,
                        int64_t dout_stride, const float *lse, int64_t lse_stride,
                        const float *delta, int64_t delta_stride, ra_tokens k, const void *v,
                        int64_t v_stride, float *dq, int64_t dq_stride);

#endif /* RINGATTN_CPU_BACKWARD_H */
