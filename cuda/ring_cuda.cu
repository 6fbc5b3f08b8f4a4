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
  ra_tensor q, k, v, o;
  float *lse;
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

static ra_status run_rank(rank_job *j) {
  RA_CUDA_TRY(cudaSetDevice(j->device), "rank thread: device");
  RA_CUDA_TRY(cudaStreamCreateWithFlags(&j->comm, cudaStreamNonBlocking), "rank thread: stream");
  ra_cuda_backend cb;
  ra_backend be;
  ra_status st = ra_cuda_backend_open(&cb, j->stats, j->inputs_ready, &be);
  if (st == RA_OK) st = ra_ring_run(j->plan, &j->tr, &be, j->q, j->k, j->v, j->o, j->lse, j->lse_ld, j->stats);
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

extern "C" ra_status ra_cuda_forward(const ra_plan *plan, ra_tensor q, ra_tensor k, ra_tensor v,
                                     ra_tensor o, float *lse, void *stream, ra_stats *stats) {
  if (!plan) return ra_fail(RA_ERR_INVALID_ARGUMENT, "plan is NULL");
  const ra_config *c = &plan->cfg;
  const int ranks = c->world_size;
  const int64_t L = plan->local_len;
  const size_t es = ra_dtype_size(c->dtype);
  RA_TRY(ra_cuda_check_head_dim(c->head_dim));
  if (ra_cuda_device_count() == 0) return ra_fail(RA_ERR_UNSUPPORTED, "ra_cuda_forward: no CUDA device");
  int device = 0;
  RA_CUDA_TRY(cudaGetDevice(&device), "ra_cuda_forward: no usable CUDA device");
  RA_TRY(check_device_ptr(q.data, "q"));
  RA_TRY(check_device_ptr(k.data, "k"));
  RA_TRY(check_device_ptr(v.data, "v"));
  RA_TRY(check_device_ptr(o.data, "out"));
  RA_TRY(check_device_ptr(lse, "lse"));

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
      result = ra_cuda_fail(err, "ra_cuda_forward: input event");
      goto done;
    }
  }
  for (int r = 0; r < ranks; r++) {
    rank_job *j = &jobs[r];
    j->plan = plan;
    j->tr = ra_inproc_transport(world, r);
    j->q = shard(q, r * L, es);
    j->k = shard(k, r * L, es);
    j->v = shard(v, r * L, es);
    j->o = shard(o, r * L, es);
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

/* One rank of a distributed ring (the NCCL communicator): this process's
 * shards on `device`, the blocks moving over `transport`. */
extern "C" ra_status ra_cuda_ring_rank(const ra_plan *plan, const ra_transport *transport, int device,
                                       ra_tensor q, ra_tensor k, ra_tensor v, ra_tensor o, float *lse,
                                       int64_t lse_ld, ra_stats *stats) {
  if (!plan) return ra_fail(RA_ERR_INVALID_ARGUMENT, "plan is NULL");
  RA_TRY(ra_cuda_check_head_dim(plan->cfg.head_dim));
  RA_CUDA_TRY(cudaSetDevice(device), "ra_cuda_ring_rank: device");
  const void *ptrs[5] = {q.data, k.data, v.data, o.data, lse};
  static const char *const names[5] = {"q", "k", "v", "out", "lse"};
  for (int i = 0; i < 5; i++) RA_TRY(check_device_ptr(ptrs[i], names[i]));
  ra_stats local;
  if (!stats) stats = &local;
  memset(stats, 0, sizeof *stats);
  ra_cuda_backend cb;
  ra_backend be;
  ra_status st = ra_cuda_backend_open(&cb, stats, NULL, &be);
  if (st == RA_OK) st = ra_ring_run(plan, transport, &be, q, k, v, o, lse, lse_ld, stats);
  ra_cuda_backend_close(&cb);
  return st;
}
