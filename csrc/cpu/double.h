/*
 * double.h -- the float64 path of the CPU backend (double.c).
 *
 * The ops of ra_backend_ops that depend on the accumulator type, in double.
 * ctx is the ra_cpu_backend (backend.c), opened for RA_FLOAT64: each
 * thread's ws holds ra_f64_workspace_bytes(head_dim) bytes.  The float *
 * accumulator pointers of the interface hold doubles here (internal.h).
 * gather, store, alloc, free and sync are the dtype-generic ones of
 * backend.c.
 */
#ifndef RINGATTN_CPU_DOUBLE_H
#define RINGATTN_CPU_DOUBLE_H

#include "cpu/cpu.h"

size_t ra_f64_workspace_bytes(int64_t head_dim);

ra_status ra_f64_init_state(void *ctx, float *acc, int64_t acc_n, float *lse, int64_t lse_n);
ra_status ra_f64_attend(void *ctx, const ra_attend_batch *a);
ra_status ra_f64_row_dot(void *ctx, const ra_config *c, int64_t L, ra_tensor dout, ra_tensor o,
                         float *delta, int64_t ld);
ra_status ra_f64_attend_backward(void *ctx, const ra_backward_batch *bw);
ra_status ra_f64_scatter_add(void *ctx, const ra_scatter_batch *s);

#endif /* RINGATTN_CPU_DOUBLE_H */
