/*
 * ringattn.h -- the one public header of the ringattn C core.
 *
 * Exact ring dilated attention.  A *plan* is built from a configuration and
 * validated once; a *transport* moves key/value blocks between ranks; the
 * ring driver runs one rank's share of the work given that rank's shards.
 * Every function returns an ra_status; on failure ra_last_error() gives a
 * human-readable message for the calling thread (NCCL style).
 *
 * The function computed is the one in docs/semantics.md: dilated attention
 * with G branches (segment length s_i, dilation rate r_i) in "groups" or
 * "longnet" mode, causal or not, over tensors laid out (batch, seq, head,
 * dim) with the head dimension contiguous.
 */
#ifndef RINGATTN_H
#define RINGATTN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define RINGATTN_VERSION_MAJOR 0
#define RINGATTN_VERSION_MINOR 1
#define RINGATTN_VERSION_PATCH 0

/* ---------------------------------------------------------------- status */

typedef enum ra_status {
  RA_OK = 0,
  RA_ERR_INVALID_ARGUMENT = 1, /* a configuration or tensor argument breaks a rule */
  RA_ERR_UNSUPPORTED = 2,      /* valid, but this build/backend cannot do it    */
  RA_ERR_OUT_OF_MEMORY = 3,
  RA_ERR_TRANSPORT = 4,        /* a send/receive failed, or a peer rank failed  */
  RA_ERR_NONFINITE = 5,        /* an input holds NaN or Inf (nan_policy=raise)  */
  RA_ERR_INTERNAL = 6
} ra_status;

/* Short fixed description of a status code ("invalid argument", ...). */
const char *ra_status_string(ra_status status);

/* Detailed message of the last failure on the calling thread ("" if none). */
const char *ra_last_error(void);

/* ------------------------------------------------------------ configuration */

/* The dtype of q, k, v, o (and dout, dq, dk, dv).  float32, float16 and
 * bfloat16 are computed and accumulated in float32, with a float32 lse.
 * RA_FLOAT64 is computed in double throughout (accumulators, merge, the
 * dK/dV that travel the ring) and its lse is double too: for RA_FLOAT64
 * every `lse` argument below points to doubles. */
typedef enum ra_dtype {
  RA_FLOAT32 = 0,
  RA_FLOAT16 = 1,
  RA_BFLOAT16 = 2, /* CUDA backends only */
  RA_FLOAT64 = 3   /* CPU backend only   */
} ra_dtype;

typedef enum ra_mode {
  RA_MODE_GROUPS = 0,  /* heads split into G groups, one branch per group   */
  RA_MODE_LONGNET = 1  /* every head in every branch, softmax-denominator mix */
} ra_mode;

#define RA_MAX_BRANCHES 16

typedef struct ra_config {
  int64_t batch, seq_len, num_heads, head_dim; /* b, n, h, d (full sequence) */
  int num_branches;                            /* G                          */
  int64_t segment_lengths[RA_MAX_BRANCHES];
  int64_t dilation_rates[RA_MAX_BRANCHES];
  int causal;
  ra_mode mode;
  double scale;   /* softmax scale; 0 means 1/sqrt(head_dim) */
  int world_size; /* k ranks, each holding seq_len / k positions */
  ra_dtype dtype;
} ra_config;

/* Fill a config with defaults (non-causal, groups, default scale, 1 rank, fp32). */
void ra_config_init(ra_config *cfg);

/* ---------------------------------------------------------------------- plan */

typedef struct ra_plan ra_plan;

/* Validate cfg against every rule of the semantics and build the schedule.
 * On RA_ERR_INVALID_ARGUMENT the message names the offending field. */
ra_status ra_plan_create(const ra_config *cfg, ra_plan **plan);
void ra_plan_destroy(ra_plan *plan);

/* The configuration the plan was built from (effective scale filled in). */
const ra_config *ra_plan_config(const ra_plan *plan);

/* Positions per rank, L = n / k. */
int64_t ra_plan_local_len(const ra_plan *plan);

/* How branch i is distributed: span = S_i / L ranks exchange keys/values
 * (span 1 means the branch is local and never communicates). */
typedef struct ra_branch_info {
  int64_t segment;   /* effective segment length S_i = min(s_i, n) */
  int64_t rate;      /* r_i */
  int64_t span;      /* ranks per segment; 1 when L % S_i == 0     */
  int64_t head_begin, head_end; /* heads taking part: [begin, end) */
} ra_branch_info;
ra_status ra_plan_branch(const ra_plan *plan, int branch, ra_branch_info *info);

/* Offset of head h in branch i, or -1 when the head does not use the branch. */
int64_t ra_plan_head_offset(const ra_plan *plan, int branch, int64_t head);

/* ------------------------------------------------------------------ tensors */

/* A (batch, seq, head, dim) tensor of the plan's dtype.  Strides are in
 * elements; the head dimension is contiguous (stride 1). */
typedef struct ra_tensor {
  void *data;
  int64_t stride_b, stride_n, stride_h;
} ra_tensor;

/* --------------------------------------------------------------- statistics */

/* What one rank held and moved during a call.  Bytes held include the rank's
 * shards of q, k, v and o (and lse when requested), which the caller owns. */
typedef struct ra_stats {
  int64_t peak_bytes;     /* high-water mark of bytes held               */
  int64_t current_bytes;  /* bytes held now (0 after a clean call)       */
  int64_t bytes_sent;
  int64_t bytes_received;
  int64_t steps;          /* (branch, ring step) blocks computed         */
  int64_t steps_skipped;  /* blocks skipped: nothing visible (causal)    */
} ra_stats;

/* ---------------------------------------------------------------- transport */

/* Opaque space for one outstanding operation of a transport. */
typedef struct ra_request {
  void *handle;
  uint64_t words[3];
} ra_request;

/* A transport connects `world_size` ranks.  isend/irecv start an operation
 * and return at once; the buffer must stay untouched until wait() returns.
 * Messages between one pair of ranks with one tag arrive in order.  A send
 * may complete only once its receiver waits for it (a rendezvous), so a
 * rank waits for its receives before its sends. */
typedef struct ra_transport_ops {
  const char *name;
  ra_status (*isend)(void *ctx, const void *buf, size_t bytes, int dst, int tag,
                     ra_request *req);
  ra_status (*irecv)(void *ctx, void *buf, size_t bytes, int src, int tag,
                     ra_request *req);
  ra_status (*wait)(void *ctx, ra_request *req);
  /* Tell the peers this rank failed so that none waits forever (may be NULL). */
  void (*abort)(void *ctx);
} ra_transport_ops;

typedef struct ra_transport {
  const ra_transport_ops *ops;
  void *ctx;
  int rank, world_size;
} ra_transport;

/* In-process transport: world_size ranks that are threads of this process. */
typedef struct ra_inproc_world ra_inproc_world;
ra_status ra_inproc_world_create(int world_size, ra_inproc_world **world);
void ra_inproc_world_destroy(ra_inproc_world *world);
/* The transport endpoint of one rank of the world. */
ra_transport ra_inproc_transport(ra_inproc_world *world, int rank);
/* How a receive copies bytes from the sender's buffer (memcpy by default;
 * ranks whose buffers live on a GPU set a device-to-device copy).  The copy
 * runs on the thread of the receiving rank `rank` and must be complete on
 * return. */
typedef ra_status (*ra_copy_fn)(void *ctx, int rank, void *dst, const void *src, size_t bytes);
void ra_inproc_world_set_copy(ra_inproc_world *world, ra_copy_fn copy, void *ctx);

/* ------------------------------------------------------------------ running */

typedef struct ra_exec {
  int num_threads;   /* compute threads for this rank; <= 0 means all cores */
  int check_finite;  /* nonzero: refuse NaN/Inf inputs (RA_ERR_NONFINITE)   */
} ra_exec;

/* Run one rank of the ring.  q, k, v, o are this rank's shards, holding
 * positions [rank*L, (rank+1)*L).  lse, if not NULL, receives the
 * log-sum-exp of every output row laid out (batch, head, L), consecutive
 * (batch, head) rows lse_ld elements apart (lse_ld >= L): float32, or
 * double for RA_FLOAT64 (hence void *); rows attending to nothing get 0
 * output and -inf.  Every rank of the transport must make the same call
 * with the same plan.  On failure the rank tells its peers through
 * transport->ops->abort so that none of them hangs. */
ra_status ra_ring_forward(const ra_plan *plan, const ra_transport *transport,
                          ra_tensor q, ra_tensor k, ra_tensor v, ra_tensor o,
                          void *lse, int64_t lse_ld, const ra_exec *exec,
                          ra_stats *stats);

/* The backward of ra_ring_forward on one rank: given this rank's shards of
 * q, k, v, the output o, the output gradient dout (all the plan's dtype)
 * and the forward's lse (as ra_ring_forward wrote it), write this rank's
 * shards of dq, dk, dv (the plan's dtype).  Key/value blocks travel the
 * sub-rings with their dK/dV accumulators and arrive home complete. */
ra_status ra_ring_backward(const ra_plan *plan, const ra_transport *transport,
                           ra_tensor q, ra_tensor k, ra_tensor v, ra_tensor o,
                           ra_tensor dout, const void *lse, int64_t lse_ld,
                           ra_tensor dq, ra_tensor dk, ra_tensor dv,
                           const ra_exec *exec, ra_stats *stats);

/* Run all world_size ranks of the plan in this process, one thread each,
 * over the in-process transport.  q, k, v, o are full-length tensors; each
 * rank sees only its own shard of them.  lse (batch, head, n) may be NULL.
 * stats, if not NULL, has world_size entries.  exec->num_threads is shared
 * among the ranks. */
ra_status ra_inproc_forward(const ra_plan *plan, ra_tensor q, ra_tensor k,
                            ra_tensor v, ra_tensor o, void *lse,
                            const ra_exec *exec, ra_stats *stats);

/* ------------------------------------------------------------ communicators */

/* A communicator joins this process to the other ranks of a real
 * distributed run: MPI between CPU processes, NCCL between GPUs.  Every
 * collective call (create, agree, forward, allgather, destroy) must be made
 * by all ranks in the same order. */
typedef struct ra_comm ra_comm;

typedef enum ra_comm_backend {
  RA_COMM_MPI = 1,
  RA_COMM_NCCL = 2
} ra_comm_backend;

/* Nonzero when this build has MPI / NCCL support. */
int ra_have_mpi(void);
int ra_have_nccl(void);

/* MPI: `mpi_comm` points to an MPI_Comm (NULL: MPI_COMM_WORLD).  MPI is
 * initialised (MPI_THREAD_SERIALIZED) if nobody has done it; the
 * communicator is duplicated so ringattn's messages never meet the
 * caller's. */
ra_status ra_comm_create_mpi(const void *mpi_comm, ra_comm **comm);

/* NCCL: all ranks pass the same 128-byte id (from ra_nccl_unique_id on one
 * rank), the world size, their rank and their CUDA device.  libnccl is
 * loaded at run time, so a build made without a GPU still links. */
#define RA_NCCL_UNIQUE_ID_BYTES 128
ra_status ra_nccl_unique_id(unsigned char id[RA_NCCL_UNIQUE_ID_BYTES]);
ra_status ra_comm_create_nccl(const unsigned char id[RA_NCCL_UNIQUE_ID_BYTES],
                              int world_size, int rank, int device,
                              ra_comm **comm);
/* NCCL communicator whose id is shared over MPI (mpi_comm as above). */
ra_status ra_comm_create_nccl_from_mpi(const void *mpi_comm, int device,
                                       ra_comm **comm);
void ra_comm_destroy(ra_comm *comm);

int ra_comm_rank(const ra_comm *comm);
int ra_comm_size(const ra_comm *comm);
ra_comm_backend ra_comm_kind(const ra_comm *comm);
/* The transport of this communicator (valid until ra_comm_destroy). */
ra_transport ra_comm_transport(ra_comm *comm);

/* Collective agreement before any ring traffic: each rank brings its local
 * status (with its message) and configuration (NULL if it has none); every
 * rank returns RA_OK only when all ranks are OK with equal configurations,
 * and otherwise the same failure naming the rank and the cause.  This is
 * how one rank's bad input becomes an error everywhere instead of a hang. */
ra_status ra_comm_agree(ra_comm *comm, ra_status local, const char *local_message,
                        const ra_config *cfg);

/* Gather `bytes` from every rank into recv (rank r's at recv + r*bytes);
 * host memory for MPI, device memory for NCCL. */
ra_status ra_comm_allgather(ra_comm *comm, const void *send, size_t bytes, void *recv);

/* One rank of a distributed ring: plan, agreement, then the ring over the
 * communicator's transport.  cfg describes the full sequence (seq_len = k *
 * local length, world_size = communicator size); q, k, v, o are this rank's
 * shards (host memory for MPI).  lse as in ra_ring_forward. */
ra_status ra_comm_forward(const ra_config *cfg, ra_comm *comm, ra_tensor q,
                          ra_tensor k, ra_tensor v, ra_tensor o, void *lse,
                          int64_t lse_ld, const ra_exec *exec, ra_stats *stats);

/* ra_inproc_forward's backward: full-length tensors, lse (batch, head, n). */
ra_status ra_inproc_backward(const ra_plan *plan, ra_tensor q, ra_tensor k,
                             ra_tensor v, ra_tensor o, ra_tensor dout,
                             const void *lse, ra_tensor dq, ra_tensor dk,
                             ra_tensor dv, const ra_exec *exec, ra_stats *stats);

/* ra_comm_forward's backward (lse as that call wrote it, rows lse_ld apart). */
ra_status ra_comm_backward(const ra_config *cfg, ra_comm *comm, ra_tensor q,
                           ra_tensor k, ra_tensor v, ra_tensor o, ra_tensor dout,
                           const void *lse, int64_t lse_ld, ra_tensor dq,
                           ra_tensor dk, ra_tensor dv, const ra_exec *exec,
                           ra_stats *stats);

/* --------------------------------------------------------------------- merge */

/* Merge a partial attention result into an accumulated one by log-sum-exp:
 * acc <- (e^lse_acc acc + e^lse_part part) / e^lse_new for `rows` rows of
 * `dim` floats, rows spaced acc_stride / part_stride floats apart.  -inf
 * means "no keys yet"; merging two -inf rows gives a zero row. */
void ra_merge_rows(float *acc, int64_t acc_stride, float *lse_acc,
                   int64_t lse_acc_stride, const float *part,
                   int64_t part_stride, const float *lse_part, int64_t rows,
                   int64_t dim);

/* ---------------------------------------------------------------------- CUDA */

/* Number of CUDA devices this build can use: 0 when it was built without
 * CUDA, when no driver is installed, or when no device is present. */
int ra_cuda_device_count(void);

/* ra_merge_rows on device memory, enqueued on `stream` (a cudaStream_t;
 * NULL is the default stream).  RA_ERR_UNSUPPORTED in a build without CUDA. */
ra_status ra_cuda_merge_rows(float *acc, int64_t acc_stride, float *lse_acc,
                             int64_t lse_acc_stride, const float *part,
                             int64_t part_stride, const float *lse_part,
                             int64_t rows, int64_t dim, void *stream);

/* Run all world_size ranks of the plan on the current CUDA device, one host
 * thread and one CUDA stream pair each, over the in-process transport (the
 * ring exchanges become device-to-device copies that overlap the attention).
 * q, k, v, o are full-length DEVICE tensors of the plan's dtype (RA_FLOAT32,
 * RA_FLOAT16 or RA_BFLOAT16; RA_FLOAT64 is RA_ERR_UNSUPPORTED), laid out
 * (b, n, h, d) with the head dimension contiguous; lse (b, h, n) float32
 * is device memory or NULL.  The inputs
 * are read after the work already enqueued on `stream` (a cudaStream_t;
 * NULL is the default stream); the call returns when o and lse are written.
 * stats, if not NULL, has world_size entries (bytes are device bytes).
 * Head dims up to 256; fp16/bf16 with head dim 64 or 128 use tensor cores.
 * RA_ERR_UNSUPPORTED in a build without CUDA. */
ra_status ra_cuda_forward(const ra_plan *plan, ra_tensor q, ra_tensor k, ra_tensor v,
                          ra_tensor o, float *lse, void *stream, ra_stats *stats);

/* The backward of ra_cuda_forward on the same ranks and ring schedule (as
 * ra_inproc_backward on the CPU): dq, dk, dv (full-length device tensors of
 * the inputs' dtype) <- the gradients for the output gradient dout, given
 * the forward's o and lse (device memory, required).  Gradients are
 * accumulated in fp32 and written once at the end.  RA_ERR_UNSUPPORTED in a
 * build without CUDA. */
ra_status ra_cuda_backward(const ra_plan *plan, ra_tensor q, ra_tensor k, ra_tensor v,
                           ra_tensor o, ra_tensor dout, const float *lse, ra_tensor dq,
                           ra_tensor dk, ra_tensor dv, void *stream, ra_stats *stats);

/* ------------------------------------------------------------------- threads */

/* Number of cores the CPU kernels use by default (after RINGATTN_NUM_THREADS). */
int ra_default_num_threads(void);

#ifdef __cplusplus
}
#endif
#endif /* RINGATTN_H */
