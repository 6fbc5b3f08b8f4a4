/*
 * cuda_backend.h -- the ring driver's backend on one CUDA device (internal
 * to the CUDA sources; C++ only).  The ops and batch structs it implements
 * are ring/backend.h's; ra_cuda_backend_iface() (backend.cu) is how the
 * entry point opens it.
 *
 * Everything a backend does is enqueued on its compute stream; sync()
 * waits for that stream.  The driver's task lists live in host memory and
 * are uploaded per call into a growable device buffer.  Device memory is
 * allocated and freed in stream order from a pool ringattn keeps per device.
 */
#ifndef RINGATTN_CUDA_BACKEND_H
#define RINGATTN_CUDA_BACKEND_H

#include <cuda_runtime.h>

extern "C" {
#include "ring/backend.h"
}

/* Record a failed CUDA call ("what: CUDA error N (name: description)"),
 * clear the calling thread's last CUDA error, and return its status:
 * RA_ERR_OUT_OF_MEMORY, RA_ERR_UNSUPPORTED (no usable device or kernel
 * image) or RA_ERR_INTERNAL.  (runtime.cu) */
ra_status ra_cuda_fail(cudaError_t err, const char *what);

#define RA_CUDA_TRY(call, what)                                \
  do {                                                         \
    cudaError_t ra_cuda_e_ = (call);                           \
    if (ra_cuda_e_ != cudaSuccess) return ra_cuda_fail(ra_cuda_e_, what); \
  } while (0)

/* RA_OK when `device` is -1 (the current device) or the ordinal of a device
 * of this machine; else RA_ERR_UNSUPPORTED (no device at all) or
 * RA_ERR_INVALID_ARGUMENT, the message starting with `what`. */
ra_status ra_cuda_check_device(int device, const char *what);

/* One rank's backend state on the current device. */
struct ra_cuda_backend {
  cudaStream_t stream;  /* compute: every kernel and copy of the backend    */
  cudaMemPool_t pool;   /* ringattn's stream-ordered pool on this device     */
  void *list;           /* device copy of the current task list             */
  size_t list_cap;
  int allow_mma;        /* 0: always the SIMT kernels (RA_KERNEL_SIMT)       */
  int deterministic;    /* backward on tensor cores: the two-pass kernels    */
  ra_stats *stats;      /* the device task buffer is counted here           */
};

/* Open a backend on the current device.  Its compute stream first waits for
 * `inputs_ready` (may be NULL), the event after which the caller's inputs
 * are valid.  allow_mma 0 (the call's exec.kernel RA_KERNEL_SIMT) makes
 * every attention and its backward use the generic SIMT kernels;
 * deterministic (exec.deterministic) makes the tensor-core backward use its
 * two-pass kernels, which add every gradient in a fixed order. */
ra_status ra_cuda_backend_open(ra_cuda_backend *cb, ra_stats *stats, cudaEvent_t inputs_ready, int allow_mma,
                               int deterministic, ra_backend *out);
/* Wait for the backend's work and free what open and later calls allocated. */
void ra_cuda_backend_close(ra_cuda_backend *cb);

/* Launch the attention of batch `a` (its task list in host memory, the same
 * list already on the device at dev_tasks) on `stream`: the tensor-core
 * kernel when allow_mma and the batch qualifies, else the SIMT kernel. */
ra_status ra_cuda_attend(const ra_attend_batch *a, const ra_attend_task *dev_tasks, int allow_mma,
                         cudaStream_t stream);

/* The backward of batch `b` (list on the device at dev_tasks), on `stream`;
 * tensor cores when allow_mma and the batch qualifies (fp16/bf16, head dim
 * 64 or 128, aligned): the fused kernel, or with `deterministic` the dK/dV
 * pass then the dQ pass; else the SIMT dK/dV and dQ passes. */
ra_status ra_cuda_attend_backward(const ra_backward_batch *b, const ra_attend_task *dev_tasks, int allow_mma,
                                  int deterministic, cudaStream_t stream);

/* RA_OK when the CUDA backend can attend with this head dim and dtype. */
ra_status ra_cuda_check_head_dim(int64_t head_dim);

#endif /* RINGATTN_CUDA_BACKEND_H */
