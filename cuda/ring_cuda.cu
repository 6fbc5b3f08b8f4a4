/*
 * ring_cuda.cu -- every rank of a plan on the current CUDA device.
 *
 * The GPU twin of csrc/inproc_run.c: one host thread per rank, each with its
 * own CUDA backend (compute stream, buffers) running ra_ring_run on views
 * of its own shards, the ranks talking through the in-process transport.
 * A receive copies the sender's device buffer into the receiver's on the
 * receiving rank's communication stream, so the transfer overlaps the
 * attention the driver has just enqueued on the compute stream.  world_size
 * 1 is the plain single-GPU forward.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_backend.h"

typedef struct rank_job {
  const ra_plan *plan;
  ra_transport tr;
  int backward;
  ra_tensor t[8];           /* q, k, v, o, and for the backward dout, dq, dk, dv */
  float *lse;               /* written by the forward, read by the backward      */
  int64_t lse_ld;
  int device;
  cudaEvent_t inputs_ready; /* recorded on the caller's stream */
  ra_stats *stats;
  cudaStream_t comm; /* this rank's communication stream, set by its thread */
} rank_job;

/* A receive's copy, on the receiving rank's communication stream (the
 * in-process transport runs it on that rank's thread). */
static ra_status device_copy(void *ctx, int rank, void *dst, const void *src, size_t bytes) {
  cudaStream_t comm = ((rank_job *)ctx)[rank].comm;
  RA_CUDA_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, comm), "ring transfer");
  RA_CUDA_TRY(cudaStreamSynchronize(comm), "ring transfer");
  return RA_OK;
}

/* The driver's forward or backward on one rank's CUDA backend. */
static ra_status ring_on_backend(const rank_job *j, const ra_backend *be) {
  const ra_tensor *t = j->t;
  if (j->backward)
    return ra_ring_backward_run(j->plan, &j->tr, be, t[0], t[1], t[2], t[3], t[4], j->lse, j->lse_ld, t[5],
                                t[6], t[7], j->stats);
  return ra_ring_run(j->plan, &j->tr, be, t[0], t[1], t[2], t[3], j->lse, j->lse_ld, j->stats);
}

static ra_status run_rank(rank_job *j) {
  RA_CUDA_TRY(cudaSetDevice(j->device), "rank thread: device");
  RA_CUDA_TRY(cudaStreamCreateWithFlags(&j->comm, cudaStreamNonBlocking), "rank thread: stream");
  ra_cuda_backend cb;
  ra_backend be;
  ra_status st = ra_cuda_backend_open(&cb, j->stats, j->inputs_ready, &be);
  if (st == RA_OK) st = ring_on_backend(j, &be);
  ra_cuda_backend_close(&cb);
  cudaStreamDestroy(j->comm);
  return st;
}

static ra_status run_job(void *arg, int rank) { return run_rank((rank_job *)arg + rank); }

static ra_tensor shard(ra_tensor t, int64_t first, size_t es) {
  t.data = (char *)t.data + (size_t)(first * t.stride_n) * es;
  return t;
}

/* The tensors must be device memory of this process (or managed). */
static ra_status check_device_ptr(const void *p, const char *name) {
  if (!p) return RA_OK; /* the driver names NULL tensors itself */
  cudaPointerAttributes at;
  cudaError_t err = cudaPointerGetAttributes(&at, p);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return ra_fail(RA_ERR_INVALID_ARGUMENT, "%s: not a CUDA pointer (%s)", name, cudaGetErrorString(err));
  }
  if (at.type != cudaMemoryTypeDevice && at.type != cudaMemoryTypeManaged)
    return ra_fail(RA_ERR_INVALID_ARGUMENT, "%s: must be device memory", name);
  return RA_OK;
}

/* float64 is a CPU-only dtype (double accumulators, cpu_double.c): the
 * kernels here are fp32/fp16/bf16. */
static ra_status check_dtype(ra_dtype dtype) {
  if (dtype == RA_FLOAT64)
    return ra_fail(RA_ERR_UNSUPPORTED, "dtype: float64 is supported by the CPU backend only");
  return RA_OK;
}

static const char *const tensor_names[8] = {"q", "k", "v", "out", "dout", "dq", "dk", "dv"};

/* Every rank of `plan` on the current device, one thread each: the forward
 * (t: q, k, v, o) or the backward (t: q, k, v, o, dout, dq, dk, dv), all
 * full-length device tensors of which rank r uses rows [r L, (r+1) L). */
static ra_status run_ranks(const ra_plan *plan, int backward, const ra_tensor *t, float *lse, void *stream,
                           ra_stats *stats, const char *who) {
  if (!plan) return ra_fail(RA_ERR_INVALID_ARGUMENT, "plan is NULL");
  const ra_config *c = &plan->cfg;
  const int ranks = c->world_size, count = backward ? 8 : 4;
  const int64_t L = plan->local_len;
  const size_t es = ra_dtype_size(c->dtype);
  RA_TRY(check_dtype(c->dtype));
  RA_TRY(ra_cuda_check_head_dim(c->head_dim));
  if (ra_cuda_device_count() == 0) return ra_fail(RA_ERR_UNSUPPORTED, "%s: no CUDA device", who);
  int device = 0;
  RA_CUDA_TRY(cudaGetDevice(&device), "no usable CUDA device");
  for (int i = 0; i < count; i++) RA_TRY(check_device_ptr(t[i].data, tensor_names[i]));
  RA_TRY(check_device_ptr(lse, "lse"));
  if (backward && !lse) return ra_fail(RA_ERR_INVALID_ARGUMENT, "lse: the backward needs the forward's lse");

  rank_job *jobs = (rank_job *)calloc((size_t)ranks, sizeof *jobs);
  ra_stats *st = stats ? stats : (ra_stats *)calloc((size_t)ranks, sizeof *st);
  cudaEvent_t ready = NULL;
  ra_inproc_world *world = NULL;
  ra_status result = RA_OK;
  if (!jobs || !st) {
    result = ra_fail(RA_ERR_OUT_OF_MEMORY, "could not allocate %d rank jobs", ranks);
    goto done;
  }
  memset(st, 0, sizeof *st * (size_t)ranks);
  if ((result = ra_inproc_world_create(ranks, &world)) != RA_OK) goto done;
  ra_inproc_world_set_copy(world, device_copy, jobs);
  /* the ranks' streams start after the work the caller has queued so far */
  {
    cudaError_t err = cudaEventCreateWithFlags(&ready, cudaEventDisableTiming);
    if (err == cudaSuccess) err = cudaEventRecord(ready, (cudaStream_t)stream);
    if (err != cudaSuccess) {
      result = ra_cuda_fail(err, "input event");
      goto done;
    }
  }
  for (int r = 0; r < ranks; r++) {
    rank_job *j = &jobs[r];
    j->plan = plan;
    j->tr = ra_inproc_transport(world, r);
    j->backward = backward;
    for (int i = 0; i < count; i++) j->t[i] = shard(t[i], r * L, es);
    j->lse = lse ? lse + r * L : NULL;
    j->lse_ld = c->seq_len;
    j->device = device;
    j->inputs_ready = ready;
    j->stats = &st[r];
  }
  result = ra_run_rank_threads(world, ranks, run_job, jobs);
  cudaSetDevice(device); /* rank 0 ran here: leave the caller's device current */

done:
  if (ready) cudaEventDestroy(ready);
  if (world) ra_inproc_world_destroy(world);
  free(jobs);
  if (!stats) free(st);
  return result;
}

extern "C" ra_status ra_cuda_forward(const ra_plan *plan, ra_tensor q, ra_tensor k, ra_tensor v,
                                     ra_tensor o, float *lse, void *stream, ra_stats *stats) {
  const ra_tensor t[4] = {q, k, v, o};
  return run_ranks(plan, 0, t, lse, stream, stats, "ra_cuda_forward");
}

extern "C" ra_status ra_cuda_backward(const ra_plan *plan, ra_tensor q, ra_tensor k, ra_tensor v,
                                      ra_tensor o, ra_tensor dout, const float *lse, ra_tensor dq,
                                      ra_tensor dk, ra_tensor dv, void *stream, ra_stats *stats) {
  const ra_tensor t[8] = {q, k, v, o, dout, dq, dk, dv};
  return run_ranks(plan, 1, t, (float *)lse, stream, stats, "ra_cuda_backward");
}

/* One rank of a distributed ring (the NCCL communicator): this process's
 * shards on `device`, the blocks moving over `transport`; t as in
 * run_ranks (4 tensors, or 8 with backward). */
extern "C" ra_status ra_cuda_ring_rank(const ra_plan *plan, const ra_transport *transport, int device,
                                       int backward, const ra_tensor *t, float *lse, int64_t lse_ld,
                                       ra_stats *stats) {
  if (!plan) return ra_fail(RA_ERR_INVALID_ARGUMENT, "plan is NULL");
  RA_TRY(check_dtype(plan->cfg.dtype));
  RA_TRY(ra_cuda_check_head_dim(plan->cfg.head_dim));
  RA_CUDA_TRY(cudaSetDevice(device), "ra_cuda_ring_rank: device");
  for (int i = 0; i < (backward ? 8 : 4); i++) RA_TRY(check_device_ptr(t[i].data, tensor_names[i]));
  RA_TRY(check_device_ptr(lse, "lse"));
  ra_stats local;
  if (!stats) stats = &local;
  memset(stats, 0, sizeof *stats);
  rank_job j;
  memset(&j, 0, sizeof j);
  j.plan = plan;
  j.tr = *transport;
  j.backward = backward;
  memcpy(j.t, t, sizeof(ra_tensor) * (backward ? 8 : 4));
  j.lse = lse;
  j.lse_ld = lse_ld;
  j.device = device;
  j.stats = stats;
  ra_cuda_backend cb;
  ra_backend be;
  ra_status st = ra_cuda_backend_open(&cb, stats, NULL, &be);
  if (st == RA_OK) st = ring_on_backend(&j, &be);
  ra_cuda_backend_close(&cb);
  return st;
}
