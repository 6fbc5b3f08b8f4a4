/*
 * internal.h -- declarations shared by the C core's files, not part of the
 * public API.
 */
#ifndef RINGATTN_INTERNAL_H
#define RINGATTN_INTERNAL_H

#include "ringattn.h"

/* Record a formatted message for ra_last_error() and return `status`. */
ra_status ra_fail(ra_status status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

/* Evaluate an ra_status expression and return it from the caller on failure. */
#define RA_TRY(expr)                      \
  do {                                    \
    ra_status ra_try_s_ = (expr);         \
    if (ra_try_s_ != RA_OK) return ra_try_s_; \
  } while (0)

/* ------------------------------------------------------------------- plan */

/* The plan: the validated configuration plus what the schedule needs. */
struct ra_plan {
  ra_config cfg;          /* scale already resolved                        */
  int64_t local_len;      /* L                                             */
  ra_branch_info branch[RA_MAX_BRANCHES];
  /* offset[i * num_heads + h]: offset of head h in branch i, -1 if unused */
  int64_t *offset;
};

/* The active tokens of one cell inside a window of positions: those p in
 * [start, start + len) with ((p mod S) mod r) == off.  The window never
 * crosses a segment boundary.  first is relative to the window start. */
typedef struct ra_run {
  int64_t first, count;
} ra_run;
ra_run ra_active_run(int64_t segment, int64_t rate, int64_t off,
                     int64_t start, int64_t len);

/* Bytes of one element of a dtype. */
size_t ra_dtype_size(ra_dtype dtype);

/* Bytes of one accumulator element of a dtype's computation: 8 (double) for
 * RA_FLOAT64, 4 (float) otherwise.  The accumulators, the lse state and the
 * public lse, delta, and the dK/dV carried in ring blocks all use it. */
size_t ra_acc_size(ra_dtype dtype);

/* ----------------------------------------------------------------- memory */

/* Allocations counted against a rank's ra_stats (64-byte aligned, zeroed
 * when asked).  ra_hold/ra_release count memory the caller owns. */
void *ra_alloc(ra_stats *stats, size_t bytes);
void ra_free(ra_stats *stats, void *ptr, size_t bytes);
void ra_hold(ra_stats *stats, int64_t bytes);
void ra_release(ra_stats *stats, int64_t bytes);

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

/* --------------------------------------------------------------- backends */

/* The ring driver (ring.c) decides *what* to compute and move; a backend
 * does it in its own memory (host for the CPU, device for CUDA).  All work
 * is described by small task lists in host memory.
 *
 * Accumulators (acc, lse, delta, dK/dV) are typed float * below, but they
 * hold ra_acc_size(dtype)-byte elements: doubles for RA_FLOAT64.  So such
 * a pointer is an opaque base: offsets and strides ("floats" below) count
 * accumulator elements, and only code that knows the dtype indexes it (the
 * driver's own arithmetic on these pointers is in bytes). */

/* One (batch, head, window) pair of runs for an attention step.  Offsets
 * are in elements from the batch's base pointers; row t of the run is at
 * offset + t * stride. */
typedef struct ra_attend_task {
  int64_t q, k, v;       /* token 0 of the query, key and value runs      */
  int64_t acc, lse;      /* accumulator row and lse of query 0 (floats)  */
  int64_t nq, nk;        /* tokens in the runs                           */
  int64_t qpos0, kpos0;  /* global positions of token 0 (step: rate)     */
  int64_t dout, dkv;     /* backward only: dO row of query 0 (elements),  */
                         /* dK/dV accumulator row of key 0 (floats)       */
  int64_t delta;         /* backward only: delta of query 0 (floats)      */
} ra_attend_task;

typedef struct ra_attend_batch {
  ra_dtype dtype;
  int64_t head_dim;
  float scale;
  int causal;
  int64_t rate;
  const void *q, *k, *v;
  int64_t q_stride, k_stride, v_stride; /* elements between tokens of a run */
  float *acc, *lse;
  int64_t acc_stride, lse_stride;       /* floats between rows of a run    */
  const ra_attend_task *tasks;
  int64_t ntasks;
  double scale64;                       /* scale unrounded (RA_FLOAT64)    */
} ra_attend_batch;

/* Copy `count` rows of head_dim elements from src + src (rows src_stride
 * apart) to dst + dst (contiguous): packing the active keys/values. */
typedef struct ra_copy_task {
  int64_t src, dst, count;
} ra_copy_task;

typedef struct ra_gather_batch {
  ra_dtype dtype;
  int64_t head_dim;
  const void *src;
  int64_t src_stride;
  void *dst;
  const ra_copy_task *tasks;
  int64_t ntasks;
} ra_gather_batch;

/* The backward of an attend batch: `a` as in the forward, with acc the dQ
 * accumulator and lse the rows' final log-sum-exp; dO at dout + task.dout
 * (rows dout_stride apart), delta = dO . o per row at delta + task.delta
 * (rows a.lse_stride apart), dK/dV accumulators at dk/dv + task.dkv (rows
 * dkv_stride floats apart).  Every gradient is accumulated (+=). */
typedef struct ra_backward_batch {
  ra_attend_batch a;
  const void *dout;
  int64_t dout_stride;
  const float *delta;
  float *dk, *dv;
  int64_t dkv_stride;
} ra_backward_batch;

/* Add packed accumulator rows back into strided ones: task i adds
 * `count` rows of head_dim floats from src + src (contiguous) to dst + dst
 * (rows dst_stride apart). */
typedef struct ra_scatter_batch {
  int64_t head_dim;
  const float *src;
  float *dst;
  int64_t dst_stride;
  const ra_copy_task *tasks;
  int64_t ntasks;
} ra_scatter_batch;

typedef struct ra_backend_ops {
  const char *name;
  /* Memory the backend computes in and the transport reads (NULL + ra_fail on failure). */
  void *(*alloc)(void *ctx, size_t bytes);
  void (*free)(void *ctx, void *ptr);
  /* acc <- 0 (acc_n floats), lse <- -inf (lse_n floats) */
  ra_status (*init_state)(void *ctx, float *acc, int64_t acc_n, float *lse, int64_t lse_n);
  ra_status (*gather)(void *ctx, const ra_gather_batch *g);
  /* Attend every task's queries to its keys and merge into acc / lse. */
  ra_status (*attend)(void *ctx, const ra_attend_batch *a);
  /* o <- acc in o's dtype; lse (b, h, L rows lse_ld apart; may be NULL) <- state */
  ra_status (*store)(void *ctx, const ra_config *cfg, int64_t L, const float *acc,
                     const float *lse_state, ra_tensor o, float *lse, int64_t lse_ld);
  /* Make everything computed so far visible to the transport. */
  ra_status (*sync)(void *ctx);
  /* ---- backward (may be NULL in a backend without it) ---- */
  /* delta[(b*h + head)*lse_ld + p] = sum_d dout * o for every row of the shard */
  ra_status (*row_dot)(void *ctx, const ra_config *cfg, int64_t L, ra_tensor dout, ra_tensor o,
                       float *delta, int64_t lse_ld);
  ra_status (*attend_backward)(void *ctx, const ra_backward_batch *b);
  ra_status (*scatter_add)(void *ctx, const ra_scatter_batch *s);
} ra_backend_ops;

typedef struct ra_backend {
  const ra_backend_ops *ops;
  void *ctx;
} ra_backend;

/* The CPU backend: `threads` OpenMP threads, each with a kernel workspace
 * counted in `stats`; RA_FLOAT64 gets the double ops of cpu_double.c.
 * ra_cpu_backend_close frees what open allocated. */
typedef struct ra_cpu_backend {
  int threads;
  int64_t head_dim;
  void **ws, **bwd_ws; /* per thread; bwd_ws only when opened for an fp32/fp16 backward */
  size_t ws_bytes, bwd_ws_bytes;
  ra_stats *stats;
} ra_cpu_backend;
ra_status ra_cpu_backend_open(ra_cpu_backend *cpu, ra_dtype dtype, int threads, int64_t head_dim,
                              int backward, ra_stats *stats, ra_backend *out);
void ra_cpu_backend_close(ra_cpu_backend *cpu);

/* The backward of one rank: dq, dk, dv (this rank's shards, the inputs'
 * dtype) from q, k, v, o, dout and the forward's final lse (ring.c). */
ra_status ra_ring_backward_run(const ra_plan *plan, const ra_transport *transport,
                               const ra_backend *backend, ra_tensor q, ra_tensor k,
                               ra_tensor v, ra_tensor o, ra_tensor dout, const void *lse,
                               int64_t lse_ld, ra_tensor dq, ra_tensor dk, ra_tensor dv,
                               ra_stats *stats);

/* One rank of the ring on any backend and transport (ring.c). */
ra_status ra_ring_run(const ra_plan *plan, const ra_transport *transport,
                      const ra_backend *backend, ra_tensor q, ra_tensor k,
                      ra_tensor v, ra_tensor o, void *lse, int64_t lse_ld,
                      ra_stats *stats);

/* ------------------------------------------------------------ communicators */

/* What every communicator provides; comm_mpi.c and comm_nccl.c fill it. */
struct ra_comm {
  ra_comm_backend kind;
  int rank, size;
  ra_transport transport;
  /* allgather of host memory (the agreement uses it on every backend) */
  ra_status (*allgather_host)(ra_comm *comm, const void *send, size_t bytes, void *recv);
  /* allgather of the backend's own memory (device memory for NCCL) */
  ra_status (*allgather)(ra_comm *comm, const void *send, size_t bytes, void *recv);
  /* run one rank of the ring on this communicator's backend (lse as in
   * ra_ring_forward: doubles for RA_FLOAT64 behind the float *) */
  ra_status (*ring)(ra_comm *comm, const ra_plan *plan, ra_tensor q, ra_tensor k, ra_tensor v,
                    ra_tensor o, float *lse, int64_t lse_ld, const ra_exec *exec, ra_stats *stats);
  /* its backward (t: q, k, v, o, dout, dq, dk, dv) */
  ra_status (*ring_backward)(ra_comm *comm, const ra_plan *plan, const ra_tensor *t, const float *lse,
                             int64_t lse_ld, const ra_exec *exec, ra_stats *stats);
  void (*destroy)(ra_comm *comm);
  void *impl;
};

/* Run fn(arg, r) for every rank r of an in-process world: rank 0 on the
 * calling thread, the others on threads of their own.  A rank that fails
 * aborts the world so that none of its peers waits forever; the result is
 * the root cause (a rank's own failure before its peers' echoes of it). */
typedef ra_status (*ra_rank_fn)(void *arg, int rank);
ra_status ra_run_rank_threads(ra_inproc_world *world, int ranks, ra_rank_fn fn, void *arg);

/* One rank of the ring on the CUDA backend over any transport (used by the
 * NCCL communicator): the forward (t: q, k, v, o) or the backward (t: q, k,
 * v, o, dout, dq, dk, dv), all device memory on `device`, as is lse. */
ra_status ra_cuda_ring_rank(const ra_plan *plan, const ra_transport *transport, int device,
                            int backward, const ra_tensor *t, float *lse, int64_t lse_ld,
                            ra_stats *stats);

/* ------------------------------------------------------------ conversions */

/* Nonzero when every element of a (b, n, h, d) tensor is finite. */
int ra_tensor_finite(ra_tensor t, ra_dtype dtype, int64_t b, int64_t n,
                     int64_t h, int64_t d, int num_threads);

/* Write fp32 rows into a tensor of `dtype` (rounding to nearest even). */
void ra_store_row(void *dst, ra_dtype dtype, const float *src, int64_t d);

#endif /* RINGATTN_INTERNAL_H */
