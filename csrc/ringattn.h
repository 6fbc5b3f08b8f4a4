/*
 * ringattn.h -- the one public header of the ringattn C core.
 *
 * Exact ring dilated attention.  A call is described by one parameter
 * struct (ra_fwd_params, or ra_bwd_params which extends it): the
 * configuration, the tensors, where they live, how to run, and optionally a
 * communicator.  ra_forward / ra_backward validate it, build a plan,
 * choose the compute backend and run the ring.  Every function returns an
 * ra_status; on failure ra_last_error() gives a human-readable message for
 * the calling thread (NCCL style).
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
 * dK/dV that travel the ring) and its lse is double too. */
typedef enum ra_dtype {
  RA_FLOAT32 = 0,
  RA_FLOAT16 = 1,
  RA_BFLOAT16 = 2,
  RA_FLOAT64 = 3   /* CPU backend only  */
} ra_dtype;

typedef enum ra_mode {
  RA_MODE_GROUPS = 0,  /* heads split into G groups, one branch per group   */
  RA_MODE_LONGNET = 1  /* every head in every branch, softmax-denominator mix */
} ra_mode;

#define RA_MAX_BRANCHES 16

/* Which positions each rank holds (docs/semantics.md, "Ring partition"). */
typedef enum ra_partition {
  RA_PARTITION_CONTIGUOUS = 0, /* rank j: [jL, (j+1)L), L = n / k                  */
  RA_PARTITION_ZIGZAG = 1      /* 2k chunks of C = n / (2k); rank j: chunks j and
                                * 2k-1-j, in that order (balances causal work)   */
} ra_partition;

typedef struct ra_config {
  int64_t batch, seq_len, num_heads, head_dim; /* b, n, h, d (full sequence) */
  /* Grouped-query attention: heads of k and v (and dk, dv), dividing
   * num_heads; query head h reads key/value head h / (num_heads /
   * num_kv_heads).  0 means num_heads (ordinary multi-head attention). */
  int64_t num_kv_heads;
  int num_branches;                            /* G                          */
  int64_t segment_lengths[RA_MAX_BRANCHES];
  int64_t dilation_rates[RA_MAX_BRANCHES];
  int causal;
  ra_mode mode;
  double scale;   /* softmax scale; 0 means 1/sqrt(head_dim) */
  int world_size; /* k ranks, each holding seq_len / k positions */
  ra_dtype dtype;
  ra_partition partition;
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

/* Positions per chunk of the partition: L (contiguous), n / (2k) (zigzag). */
int64_t ra_plan_chunk_len(const ra_plan *plan);

/* How branch i is distributed: span = S_i / C chunks (C = ra_plan_chunk_len:
 * ranks for the contiguous partition) exchange keys/values (span 1 means
 * the branch is local and never communicates). */
typedef struct ra_branch_info {
  int64_t segment;   /* effective segment length S_i = min(s_i, n) */
  int64_t rate;      /* r_i */
  int64_t span;      /* chunks per segment; 1 when C % S_i == 0    */
  int64_t head_begin, head_end; /* heads taking part: [begin, end) */
} ra_branch_info;
ra_status ra_plan_branch(const ra_plan *plan, int branch, ra_branch_info *info);

/* Offset of head h in branch i, or -1 when the head does not use the branch. */
int64_t ra_plan_head_offset(const ra_plan *plan, int branch, int64_t head);

/* ------------------------------------------------------------------ tensors */

/* A (batch, seq, head, dim) tensor of the call's dtype.  Strides are in
 * elements; the head dimension is contiguous (stride 1).  The shape is the
 * call's (ra_config), the device the call's (ra_fwd_params.device_type). */
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
  int64_t ring_buffer_bytes; /* the largest ring buffers held at once: the
                              * two slots of a spanning branch, one sub-block
                              * each (ra_exec.ring_sub_blocks); 0 with none */
  int64_t pairs;          /* (query, key) pairs attended, summed over the
                           * batch, the query heads and the branches       */
} ra_stats;

/* --------------------------------------------------------------- the call */

/* Where a call's tensors live. */
typedef enum ra_device_type {
  RA_DEVICE_CPU = 0, /* host memory: the CPU backend         */
  RA_DEVICE_CUDA = 1 /* CUDA device memory: the CUDA backend */
} ra_device_type;

/* Which kernels a backend may use. */
typedef enum ra_kernel {
  RA_KERNEL_AUTO = 0, /* the fastest kernel that applies (tensor cores on CUDA) */
  RA_KERNEL_SIMT = 1  /* CUDA: the generic SIMT kernels only (testing)          */
} ra_kernel;

/* The instruction set of the CPU kernels (ra_exec.cpu_isa).  The hot CPU
 * kernels are compiled once per ISA (x86-64: baseline, AVX2+FMA, AVX-512;
 * baseline only elsewhere) and a call picks one at run time.  Asking for one
 * that this build lacks or this CPU cannot run fails (RA_ERR_UNSUPPORTED). */
typedef enum ra_cpu_isa {
  RA_CPU_ISA_INVALID = -1, /* an unknown RINGATTN_CPU_ISA: calls on the CPU fail */
  RA_CPU_ISA_AUTO = 0,     /* the widest this CPU runs                          */
  RA_CPU_ISA_BASELINE = 1, /* the build's baseline (x86-64 SSE2; NEON on arm64)  */
  RA_CPU_ISA_AVX2 = 2,     /* AVX2 + FMA + F16C (x86-64-v3)                      */
  RA_CPU_ISA_AVX512 = 3    /* AVX-512 F, BW, DQ, VL (x86-64-v4)                  */
} ra_cpu_isa;

/* "auto", "baseline", "avx2", "avx512"; NULL for other values. */
const char *ra_cpu_isa_name(ra_cpu_isa isa);
/* Nonzero when this build has the kernels of `isa` / and this CPU runs them. */
int ra_cpu_isa_compiled(ra_cpu_isa isa);
int ra_cpu_isa_supported(ra_cpu_isa isa);
/* RA_CPU_ISA_AUTO: the widest ISA this build and CPU run; others unchanged. */
ra_cpu_isa ra_cpu_isa_resolve(ra_cpu_isa isa);

/* How a call runs, as opposed to what it computes.  ra_exec_default()
 * takes the defaults from the environment, read once per process (and
 * nowhere else): RINGATTN_NUM_THREADS, RINGATTN_CUDA_KERNEL=simt,
 * RINGATTN_DETERMINISTIC=1, RINGATTN_CPU_ISA=auto|baseline|avx2|avx512. */
typedef struct ra_exec {
  int num_threads;   /* CPU threads for the whole call; <= 0: the default;
                      * at most 4 x the online cores are used (clamped)     */
  int check_finite;  /* refuse NaN/Inf inputs (RA_ERR_NONFINITE); CPU only   */
  ra_kernel kernel;
  int deterministic; /* CUDA backward: bitwise reproducible (no atomics)     */
  int device;        /* CUDA ordinal of the tensors; -1: the current device  */
  void *stream;      /* CUDA: the cudaStream_t the inputs are ready on (NULL:
                      * the legacy default stream); the call returns once its
                      * outputs are written */
  ra_cpu_isa cpu_isa; /* CPU kernels' instruction set (RA_CPU_ISA_AUTO)      */
  int ring_sub_blocks; /* S: a spanning branch's blocks travel in sub-blocks
                        * of at most 1/S of a block through two slots (in
                        * flight: 2 sub-blocks, not 2 blocks); <= 0: 8 on the
                        * CPU, 1 (whole blocks) for CUDA tensors (streaming
                        * has not run on a GPU yet: opt-in there).  Default
                        * from RINGATTN_RING_SUB_BLOCKS; the same on every
                        * rank (a communicator's agreement checks it)       */
  int cuda_gqa;      /* CUDA: allow num_kv_heads < num_heads (the driver's
                      * head arithmetic, never run on a GPU yet: opt-in,
                      * default from RINGATTN_CUDA_GQA=1)                    */
} ra_exec;

ra_exec ra_exec_default(void);

/* Number of cores the CPU kernels use by default: RINGATTN_NUM_THREADS if
 * it is a positive number, else every online core; at most 4 x the cores. */
int ra_default_num_threads(void);

/* A communicator: see below. */
typedef struct ra_comm ra_comm;

/* Everything a forward call needs, in the manner of flash-attention's
 * Flash_fwd_params: it flows unchanged from the Python extension through
 * the ring driver to the backend.
 *
 * Without a communicator (comm NULL) q, k, v, o are full-length tensors and
 * all cfg.world_size ranks run in this process, one thread each, rank j
 * seeing only positions [jL, (j+1)L) of them.  With a communicator they are
 * this rank's shards (b, L, h, d) and cfg.seq_len is still the full length.
 * lse, if not NULL, receives the log-sum-exp of every output row laid out
 * (batch, head, row), consecutive (batch, head) rows lse_ld elements apart
 * (lse_ld >= the rows this process holds): float32, or double for
 * RA_FLOAT64.  Rows that attend to nothing get 0 output and -inf. */
typedef struct ra_fwd_params {
  ra_config cfg;
  ra_device_type device_type;
  ra_tensor q, k, v, o;
  void *lse;
  int64_t lse_ld;
  ra_exec exec;
  ra_comm *comm;   /* NULL: every rank in this process                       */
  ra_stats *stats; /* out, may be NULL: one entry per rank run here
                    * (cfg.world_size without comm, 1 with it)               */
} ra_fwd_params;

/* The backward extends the forward: fwd holds q, k, v, the forward's output
 * o and its lse (required, only read); dq, dk, dv receive the gradients for
 * the output gradient dout, all of the call's dtype and shape. */
typedef struct ra_bwd_params {
  ra_fwd_params fwd;
  ra_tensor dout, dq, dk, dv;
} ra_bwd_params;

/* Defaults: ra_config_init, CPU tensors, ra_exec_default(), no comm. */
void ra_fwd_params_init(ra_fwd_params *p);
void ra_bwd_params_init(ra_bwd_params *p);

/* Run a call: validate it, plan, choose the backend of p->device_type, and
 * run every rank in this process -- or, with a communicator, agree with the
 * peers and run this rank.  A rank that fails tells its peers, so that none
 * of them waits forever. */
ra_status ra_forward(const ra_fwd_params *p);
ra_status ra_backward(const ra_bwd_params *p);

/* ------------------------------------------------------------ communicators */

/* A communicator joins this process to the other ranks of a real
 * distributed run: MPI between CPU processes, NCCL between GPUs.  Every
 * collective call (create, agree, forward, backward, allgather, destroy)
 * must be made by all ranks in the same order; forward, backward and
 * allgather check it (ra_comm_agree_call). */
typedef enum ra_comm_backend {
  RA_COMM_MPI = 1,
  RA_COMM_NCCL = 2,
  RA_COMM_EXTERNAL = 3 /* ra_comm_create_external */
} ra_comm_backend;

/* Nonzero when this build has MPI / NCCL support. */
int ra_have_mpi(void);
int ra_have_nccl(void);

/* MPI: `mpi_comm` points to an MPI_Comm (NULL: MPI_COMM_WORLD).  MPI is
 * initialised (MPI_THREAD_SERIALIZED) if nobody has done it; the
 * communicator is duplicated so ringattn's messages never meet the
 * caller's.  Its timeout starts at RA_COMM_DEFAULT_TIMEOUT; nothing of a
 * call blocks inside MPI, and a rank that fails, closes the communicator
 * or exits tells its peers (docs/design.md, "Failure model"). */
ra_status ra_comm_create_mpi(const void *mpi_comm, ra_comm **comm);

/* NCCL: all ranks pass the same 128-byte id (from ra_nccl_unique_id on one
 * rank), the world size, their rank and their CUDA device.  libnccl is
 * loaded at run time, so a build made without a GPU still links.  timeout
 * > 0 (seconds; opt-in for NCCL, see ra_comm_set_timeout) makes the
 * communicator nonblocking: its creation, and every wait of its calls,
 * end by then (and the NCCL communicator is aborted) instead of blocking
 * on a rank that never joins; 0 keeps NCCL's blocking behaviour. */
#define RA_NCCL_UNIQUE_ID_BYTES 128
ra_status ra_nccl_unique_id(unsigned char id[RA_NCCL_UNIQUE_ID_BYTES]);
ra_status ra_comm_create_nccl(const unsigned char id[RA_NCCL_UNIQUE_ID_BYTES],
                              int world_size, int rank, int device,
                              double timeout, ra_comm **comm);
/* NCCL communicator whose id is shared over MPI (mpi_comm as above).  The
 * ranks agree over MPI (within timeout, when > 0) before any of them
 * enters NCCL's initialisation, so a rank that fails early fails them all. */
ra_status ra_comm_create_nccl_from_mpi(const void *mpi_comm, int device,
                                       double timeout, ra_comm **comm);
/* A communicator whose bytes move through the caller's functions -- the
 * Python package's transport over a torch.distributed gloo group.  They
 * only move bytes; the agreement, the call counter, the broken state and
 * the messages stay ringattn's.  `call` names the call ("forward (call 3)")
 * and `waiting_for` what a wait waits for ("to send its ring block"), for
 * the caller's messages.  A function that fails returns RA_ERR_TRANSPORT
 * and must not block past the communicator's timeout (ra_comm_timeout;
 * 0: none); its message is the thread's last error (the core's ra_fail,
 * csrc/internal.h).  isend/irecv start a transfer and return an op that
 * wait() finishes exactly once (a receive's
 * bytes are in its buffer when wait returns RA_OK); with `abandon` set the
 * call was given up: drop the op without waiting, and never touch its
 * buffer again.  give_up tells the peers this rank gave up the call (the
 * FAIL of docs/design.md, "Failure model"); destroy releases ctx.  All
 * ranks pass the same `id` (nonzero), new for every communicator. */
typedef struct ra_external_ops {
  ra_status (*isend)(void *ctx, const void *buf, size_t bytes, int dst, int tag, void **op);
  ra_status (*irecv)(void *ctx, void *buf, size_t bytes, int src, int tag, void **op);
  ra_status (*wait)(void *ctx, void *op, int abandon, const char *call, const char *waiting_for);
  ra_status (*allgather)(void *ctx, const void *send, size_t bytes, void *recv, const char *call,
                         const char *waiting_for);
  void (*give_up)(void *ctx, const char *call, const char *why);
  void (*destroy)(void *ctx);
} ra_external_ops;
ra_status ra_comm_create_external(const ra_external_ops *ops, void *ctx, int rank, int world_size,
                                  uint64_t id, ra_comm **comm);
void ra_comm_destroy(ra_comm *comm);

int ra_comm_rank(const ra_comm *comm);
int ra_comm_size(const ra_comm *comm);
ra_comm_backend ra_comm_kind(const ra_comm *comm);
/* Where the communicator's ranks compute: RA_DEVICE_CPU for MPI,
 * RA_DEVICE_CUDA for NCCL (on ra_comm_device, its CUDA ordinal; -1 for MPI). */
ra_device_type ra_comm_device_type(const ra_comm *comm);
int ra_comm_device(const ra_comm *comm);

/* Seconds a rank waits for its peers before it gives up a call (the
 * counterpart of torch.distributed's process-group timeout): every wait of
 * a call -- the agreement, each ring step, the gather -- ends by then.
 * A communicator starts with RA_COMM_DEFAULT_TIMEOUT; 0 or less waits
 * forever.  The NCCL communicator stores it but does not enforce it yet. */
#define RA_COMM_DEFAULT_TIMEOUT 600.0
ra_status ra_comm_set_timeout(ra_comm *comm, double seconds);
double ra_comm_timeout(const ra_comm *comm);

/* What a collective call does.  Every rank's call number n must be the
 * same operation; RA_OP_COLLECTIVE is any other step the caller
 * synchronises through ra_comm_agree (e.g. sharing an NCCL id). */
typedef enum ra_comm_op {
  RA_OP_COLLECTIVE = 0,
  RA_OP_FORWARD = 1,
  RA_OP_BACKWARD = 2,
  RA_OP_GATHER = 3
} ra_comm_op;
/* "forward", "backward", "gather" or "collective call". */
const char *ra_comm_op_name(ra_comm_op op);

/* Collective calls made on this communicator so far (each agreement is
 * one; during a call, that call's number, counting from 1). */
uint64_t ra_comm_calls(const ra_comm *comm);

/* NULL while the communicator is usable.  Once a call failed in a way its
 * peers cannot recover from together -- a timeout, a peer that failed
 * inside the ring or exited, a failure inside this rank's ring -- it is
 * broken: every later call fails at once with RA_ERR_TRANSPORT, and this
 * returns why (naming the call and the original cause). */
const char *ra_comm_broken(const ra_comm *comm);

/* One rank's side of the agreement that starts every collective call. */
typedef struct ra_agreement {
  ra_comm_op op;
  ra_status status;           /* this rank's local status ...            */
  const char *message;        /* ... and its message (NULL: none)         */
  const ra_config *cfg;       /* forward/backward: the configuration
                               * (NULL when this rank has none, e.g. it
                               * refuses its input)                      */
  ra_device_type device_type; /* where the call's tensors live (with cfg) */
  uint64_t bytes;             /* gather: bytes this rank contributes      */
  int ring_sub_blocks;        /* with cfg: ra_ring_sub_blocks of the call
                               * (0: not compared)                      */
} ra_agreement;

/* Collective agreement before any traffic of a call: each rank brings its
 * operation, call number, local status (with its message) and, when it has
 * them, configuration and device type (or, for a gather, its byte count);
 * every rank returns RA_OK only when all ranks are OK and agree on all of
 * it, and otherwise the same failure naming the rank and the cause:
 * "call 3 on rank 0 but call 2 on rank 1", "operation differs between
 * ranks: forward on rank 0 but backward on rank 1" (RA_ERR_TRANSPORT),
 * "rank 1: <its message>" (rank 1's status), "configuration differs
 * between ranks: ..." (RA_ERR_INVALID_ARGUMENT).  Within the communicator's
 * timeout: a peer that does not arrive, or that failed or exited (see
 * ra_comm_broken), ends it with RA_ERR_TRANSPORT naming that rank.
 * ra_forward / ra_backward / ra_comm_allgather run it themselves; a caller
 * that refuses its input before calling them runs it with its failure
 * (and the operation it was about to run) instead. */
ra_status ra_comm_agree_call(ra_comm *comm, const ra_agreement *agreement);

/* ra_comm_agree_call for a step of the caller's own (RA_OP_COLLECTIVE). */
ra_status ra_comm_agree(ra_comm *comm, ra_status local, const char *local_message,
                        const ra_config *cfg);

/* The process is exiting: every live communicator tells its peers now, so
 * that a peer waiting in a call this rank will never make fails at once
 * ("rank 1 exited after 2 calls") instead of waiting for its timeout.  MPI
 * communicators also do it when MPI is finalized, and a destroyed one says
 * it was closed.  The Python package calls this from atexit. */
void ra_comm_exiting(void);

/* Gather `bytes` from every rank into recv (rank r's at recv + r*bytes);
 * host memory for MPI, device memory for NCCL.  A collective call
 * (RA_OP_GATHER): the ranks first agree, also on `bytes`. */
ra_status ra_comm_allgather(ra_comm *comm, const void *send, size_t bytes, void *recv);
/* The same on host memory for every communicator (NCCL stages it through
 * pinned host and device memory on its own device). */
ra_status ra_comm_allgather_host(ra_comm *comm, const void *send, size_t bytes, void *recv);

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

/* Nonzero when this build has the CUDA backend. */
int ra_have_cuda(void);

/* Number of CUDA devices this build can use: 0 when it was built without
 * CUDA, when no driver is installed, or when no device is present. */
int ra_cuda_device_count(void);

/* ra_merge_rows on device memory, enqueued on `stream` (a cudaStream_t;
 * NULL is the default stream).  RA_ERR_UNSUPPORTED in a build without CUDA. */
ra_status ra_cuda_merge_rows(float *acc, int64_t acc_stride, float *lse_acc,
                             int64_t lse_acc_stride, const float *part,
                             int64_t part_stride, const float *lse_part,
                             int64_t rows, int64_t dim, void *stream);

/* The CUDA runtime as the Python extension needs it, so that nothing but
 * the core links CUDA.  Each returns RA_ERR_UNSUPPORTED in a build without
 * CUDA.  device >= 0 is made current for the call and the caller's current
 * device restored afterwards; -1 uses the current device. */
ra_status ra_cuda_current_device(int *device);
ra_status ra_cuda_malloc(int device, size_t bytes, void **ptr);
ra_status ra_cuda_free(int device, void *ptr);
/* Synchronous copies between host memory and device memory. */
ra_status ra_cuda_copy_to_device(int device, void *dst, const void *src, size_t bytes);
ra_status ra_cuda_copy_to_host(int device, void *dst, const void *src, size_t bytes);
/* Wait on the host until `stream` (a cudaStream_t; NULL: legacy default) is idle. */
ra_status ra_cuda_synchronize(int device, void *stream);

/* What an address is, for the checks of device arrays. */
typedef enum ra_memory_kind {
  RA_MEMORY_UNREGISTERED = 0, /* ordinary host memory, or unknown to CUDA */
  RA_MEMORY_HOST = 1,         /* page-locked host memory                 */
  RA_MEMORY_DEVICE = 2,
  RA_MEMORY_MANAGED = 3
} ra_memory_kind;
/* *device is the ordinal, or -1 for host memory. */
ra_status ra_cuda_pointer_info(const void *ptr, ra_memory_kind *kind, int *device);

#ifdef __cplusplus
}
#endif
#endif /* RINGATTN_H */
