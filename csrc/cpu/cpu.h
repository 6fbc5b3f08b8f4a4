/*
 * cpu.h -- the CPU backend and its kernels (internal to csrc/cpu/, and the
 * C tests).  The backend implements ring/backend.h; the kernels below are
 * what it calls: a flash-style forward (kernel.c), its backward
 * (backward.h), the float64 twins (double.h), the NaN/Inf scan and the
 * conversions (finite.c).
 */
#ifndef RINGATTN_CPU_H
#define RINGATTN_CPU_H

#include "internal.h"
#include "ring/backend.h"

/* ------------------------------------------------------------ CPU kernel */

/* One run of tokens of one (batch, head): token t is at ptr + t*stride
 * elements and has global position pos0 + t*rate. */
typedef struct ra_tokens {
  const void *ptr;
  int64_t stride;
  int64_t count;
  int64_t pos0;
} ra_tokens;

/* Per-thread scratch of the CPU kernel. */
typedef struct ra_workspace ra_workspace;
size_t ra_workspace_bytes(int64_t head_dim);
ra_workspace *ra_workspace_init(void *mem, int64_t head_dim);

/* Attend a run of queries to a run of keys/values of the same cell and merge
 * the result into the accumulated rows acc (fp32, row t at acc + t*acc_stride)
 * and their log-sum-exp (lse + t*lse_stride).  `rate` is the position step
 * of both runs; with `causal` a key is visible when its position <= the
 * query's. */
void ra_cpu_attend(ra_workspace *ws, ra_dtype dtype, int64_t head_dim,
                   float scale, int causal, int64_t rate, ra_tokens q,
                   ra_tokens k, const void *v, int64_t v_stride, float *acc,
                   int64_t acc_stride, float *lse, int64_t lse_stride);

/* ra_merge_rows in double (the float64 path, merge.c). */
void ra_merge_rows_f64(double *acc, int64_t acc_stride, double *lse_acc,
                       int64_t lse_acc_stride, const double *part,
                       int64_t part_stride, const double *lse_part, int64_t rows,
                       int64_t dim);

/* Largest number of queries the kernel takes in one call (a query block). */
#define RA_CPU_BLOCK_Q 256

/* ------------------------------------------------------------ conversions */

/* Nonzero when every element of a (b, n, h, d) tensor is finite. */
int ra_tensor_finite(ra_tensor t, ra_dtype dtype, int64_t b, int64_t n,
                     int64_t h, int64_t d, int num_threads);

/* Write fp32 rows into a tensor of `dtype` (rounding to nearest even). */
void ra_store_row(void *dst, ra_dtype dtype, const float *src, int64_t d);

/* ---------------------------------------------------------------- backend */

/* The CPU backend: `threads` OpenMP threads, each with a kernel workspace
 * counted in `stats`, the kernels of `isa` (isa.h); RA_FLOAT64 gets the
 * double ops of double.c.
 * ra_cpu_backend_close frees what open allocated. */
typedef struct ra_cpu_backend {
  const struct ra_cpu_kernels *kern; /* the ISA variant of the kernels (isa.h) */
  int threads;
  int64_t head_dim;
  void **ws, **bwd_ws; /* per thread; bwd_ws only when opened for an fp32/fp16 backward */
  size_t ws_bytes, bwd_ws_bytes;
  ra_stats *stats;
  struct ra_cpu_ws_set *set; /* the pooled workspaces ws, bwd_ws belong to (backend.c) */
} ra_cpu_backend;
ra_status ra_cpu_backend_open(ra_cpu_backend *cpu, ra_dtype dtype, ra_cpu_isa isa, int threads,
                              int64_t head_dim, int backward, ra_stats *stats, ra_backend *out);
void ra_cpu_backend_close(ra_cpu_backend *cpu);
/* Bytes of the idle workspaces the backend keeps for later calls; free them. */
size_t ra_cpu_pool_bytes(void);
void ra_cpu_pool_clear(void);

#endif /* RINGATTN_CPU_H */
