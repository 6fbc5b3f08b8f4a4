/*
 * backend.h -- the compute backend interface of the ring driver.
 *
 * The driver (driver.c) decides *what* to compute and move; a backend does
 * it in its own memory (host for the CPU, device for CUDA).  A backend is
 * chosen once per call, at the entry point (entry.c), from the call's
 * device type: its ra_backend_iface says whether it supports the call,
 * checks what only it can check, and opens one ra_backend per rank, whose
 * ops the driver calls.  One folder per backend: csrc/cpu/ and cuda/.
 */
#ifndef RINGATTN_BACKEND_H
#define RINGATTN_BACKEND_H

#include "ring/call.h"
#include "transport/transport.h" /* ra_copy_fn */

/* All work is described by small task lists in host memory.
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

/* A backend as the entry point sees it. */
typedef struct ra_backend_iface {
  const char *name;
  /* RA_OK when this backend can run the call (dtype, head dim, a device,
   * the kernels built), else the reason, through ra_fail. */
  ra_status (*supports)(const ra_call *call);
  /* Check the call's tensors as only this backend can, before any rank
   * starts and before a communicator's agreement (the CPU's NaN/Inf scan,
   * CUDA's pointer checks); may be NULL. */
  ra_status (*check_inputs)(const ra_call *call);
  /* State the ranks of a call in this process share (CUDA: the device made
   * current, an event after which the inputs are ready, the ranks' copy
   * streams), opened on the calling thread before any rank starts and
   * closed after the last one ended.  *shared may stay NULL. */
  ra_status (*call_open)(const ra_call *call, void **shared);
  void (*call_close)(void *shared);
  /* One rank's backend, opened and closed on the rank's own thread;
   * rank_call is that rank's view of the call. */
  ra_status (*rank_open)(void *shared, const ra_call *rank_call, ra_backend *out);
  void (*rank_close)(ra_backend *be);
  /* How in-process ranks copy blocks (ctx: the shared state); NULL: memcpy. */
  ra_copy_fn copy;
} ra_backend_iface;

/* The backends: csrc/cpu/backend.c, and cuda/backend.cu (or cuda/absent.c
 * in a build without CUDA, whose supports() says so). */
const ra_backend_iface *ra_cpu_backend_iface(void);
const ra_backend_iface *ra_cuda_backend_iface(void);

#endif /* RINGATTN_BACKEND_H */
