/*
 * backend.cu -- the ring driver's backend on one CUDA device.
 *
 * The ops of ra_backend_ops (csrc/internal.h; csrc/cpu_backend.c is the
 * reference for each) on device memory: everything is enqueued on the
 * backend's compute stream, and sync() waits for it.  The small kernels for
 * the state, packing and output conversion live here; attention is in
 * attend.cu / attend_simt.cu.
 */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_backend.h"

ra_status ra_cuda_fail(cudaError_t err, const char *what) {
  ra_status st = RA_ERR_INTERNAL;
  if (err == cudaErrorMemoryAllocation) st = RA_ERR_OUT_OF_MEMORY;
  else if (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver ||
           err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDevice)
    st = RA_ERR_UNSUPPORTED;
  return ra_fail(st, "%s: CUDA error: %s", what, cudaGetErrorString(err));
}

/* Blocks for a grid-stride loop over n items, 256 threads each. */
static unsigned grid_for(int64_t n) {
  const int64_t b = (n + 255) / 256;
  return (unsigned)(b < 1 ? 1 : b > 65536 ? 65536 : b);
}

/* ------------------------------------------------------------------ kernels */

__global__ void fill_kernel(float *x, int64_t n, float value) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    x[i] = value;
}

/* Packing: for each copy task (blockIdx.x), rows r of d elements from
 * src + t.src + r * src_stride to dst + t.dst + r * d.  E is an unsigned
 * type of the element's size: the bits are moved, not converted. */
#define GATHER_ROWS 8 /* rows per block and loop step */
template <typename E>
__global__ void gather_kernel(const E *src, int64_t src_stride, E *dst, int64_t d,
                              const ra_copy_task *tasks) {
  const ra_copy_task t = tasks[blockIdx.x];
  for (int64_t r0 = (int64_t)blockIdx.y * GATHER_ROWS; r0 < t.count; r0 += (int64_t)gridDim.y * GATHER_ROWS)
    for (int64_t e = threadIdx.x; e < GATHER_ROWS * d; e += blockDim.x) {
      const int64_t r = r0 + e / d, c = e % d;
      if (r < t.count) dst[t.dst + r * d + c] = src[t.src + r * src_stride + c];
    }
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

/* o (b, L, h, d with o's strides) <- acc (b, L, h, d contiguous fp32). */
template <typename T>
__global__ void store_kernel(const float *acc, T *o, int64_t L, int64_t H, int64_t d, int64_t sb,
                             int64_t sn, int64_t sh, int64_t total) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t c = i % d, row = i / d;
    const int64_t h = row % H, p = (row / H) % L, bb = row / H / L;
    o[bb * sb + p * sn + h * sh + c] = from_float<T>(acc[i]);
  }
}

/* ---------------------------------------------------------------- task lists */

/* Put a host task list on the device (into cb->list) through the pinned
 * staging buffer; the copy is ordered on the compute stream, so the kernel
 * launched next sees it and the one before has finished with the old list.
 * The staging buffer is rewritten only after its previous upload is done. */
static ra_status upload(ra_cuda_backend *cb, const void *host, size_t bytes) {
  if (bytes > cb->list_cap) {
    const size_t cap = bytes > 2 * cb->list_cap ? bytes : 2 * cb->list_cap;
    RA_CUDA_TRY(cudaStreamSynchronize(cb->stream), "task list"); /* old list no longer read */
    if (cb->list) {
      cudaFree(cb->list);
      ra_release(cb->stats, (int64_t)cb->list_cap);
      cb->list = NULL;
      cb->list_cap = 0;
    }
    RA_CUDA_TRY(cudaMalloc(&cb->list, cap), "task list: device buffer");
    cb->list_cap = cap;
    ra_hold(cb->stats, (int64_t)cap);
  }
  RA_CUDA_TRY(cudaEventSynchronize(cb->staged), "task list");
  if (bytes > cb->staging_cap) {
    const size_t cap = bytes > 2 * cb->staging_cap ? bytes : 2 * cb->staging_cap;
    if (cb->staging) cudaFreeHost(cb->staging);
    cb->staging = NULL;
    cb->staging_cap = 0;
    RA_CUDA_TRY(cudaMallocHost(&cb->staging, cap), "task list: pinned staging buffer");
    cb->staging_cap = cap;
  }
  memcpy(cb->staging, host, bytes);
  RA_CUDA_TRY(cudaMemcpyAsync(cb->list, cb->staging, bytes, cudaMemcpyHostToDevice, cb->stream),
              "task list upload");
  RA_CUDA_TRY(cudaEventRecord(cb->staged, cb->stream), "task list upload");
  return RA_OK;
}

/* ---------------------------------------------------------------------- ops */

static void *cuda_alloc(void *ctx, size_t bytes) {
  (void)ctx;
  void *p = NULL;
  cudaError_t err = cudaMalloc(&p, bytes ? bytes : 1); /* a 0-byte block is still a block */
  if (err != cudaSuccess) {
    ra_cuda_fail(err, "device allocation");
    return NULL;
  }
  return p;
}

static void cuda_free(void *ctx, void *ptr) {
  (void)ctx;
  if (ptr) cudaFree(ptr);
}

static ra_status cuda_init_state(void *ctx, float *acc, int64_t acc_n, float *lse, int64_t lse_n) {
  ra_cuda_backend *cb = (ra_cuda_backend *)ctx;
  RA_CUDA_TRY(cudaMemsetAsync(acc, 0, sizeof(float) * (size_t)acc_n, cb->stream), "init state");
  if (lse_n > 0) {
    fill_kernel<<<grid_for(lse_n), 256, 0, cb->stream>>>(lse, lse_n, -INFINITY);
    RA_CUDA_TRY(cudaGetLastError(), "init state: fill kernel");
  }
  return RA_OK;
}

static ra_status cuda_gather(void *ctx, const ra_gather_batch *g) {
  ra_cuda_backend *cb = (ra_cuda_backend *)ctx;
  int64_t max_count = 0;
  for (int64_t i = 0; i < g->ntasks; i++)
    if (g->tasks[i].count > max_count) max_count = g->tasks[i].count;
  if (g->ntasks == 0 || max_count == 0) return RA_OK;
  if (g->ntasks > 2147483647LL) return ra_fail(RA_ERR_UNSUPPORTED, "gather: too many copy tasks");
  RA_TRY(upload(cb, g->tasks, sizeof(ra_copy_task) * (size_t)g->ntasks));
  const ra_copy_task *tasks = (const ra_copy_task *)cb->list;
  const int64_t chunks = (max_count + GATHER_ROWS - 1) / GATHER_ROWS;
  const dim3 grid((unsigned)g->ntasks, (unsigned)(chunks < 65535 ? chunks : 65535));
  if (ra_dtype_size(g->dtype) == 4)
    gather_kernel<uint32_t><<<grid, 128, 0, cb->stream>>>((const uint32_t *)g->src, g->src_stride,
                                                          (uint32_t *)g->dst, g->head_dim, tasks);
  else
    gather_kernel<uint16_t><<<grid, 128, 0, cb->stream>>>((const uint16_t *)g->src, g->src_stride,
                                                          (uint16_t *)g->dst, g->head_dim, tasks);
  RA_CUDA_TRY(cudaGetLastError(), "gather kernel launch");
  return RA_OK;
}

static ra_status cuda_attend(void *ctx, const ra_attend_batch *a) {
  ra_cuda_backend *cb = (ra_cuda_backend *)ctx;
  if (a->ntasks == 0) return RA_OK;
  RA_TRY(upload(cb, a->tasks, sizeof(ra_attend_task) * (size_t)a->ntasks));
  return ra_cuda_attend(a, (const ra_attend_task *)cb->list, cb->allow_mma, cb->stream);
}

static ra_status cuda_store(void *ctx, const ra_config *c, int64_t L, const float *acc,
                            const float *lse_state, ra_tensor o, float *lse, int64_t lse_ld) {
  ra_cuda_backend *cb = (ra_cuda_backend *)ctx;
  const int64_t H = c->num_heads, d = c->head_dim, total = c->batch * L * H * d;
  const unsigned blocks = grid_for(total);
  switch (c->dtype) {
    case RA_FLOAT16:
      store_kernel<__half><<<blocks, 256, 0, cb->stream>>>(acc, (__half *)o.data, L, H, d, o.stride_b,
                                                           o.stride_n, o.stride_h, total);
      break;
    case RA_BFLOAT16:
      store_kernel<__nv_bfloat16><<<blocks, 256, 0, cb->stream>>>(acc, (__nv_bfloat16 *)o.data, L, H, d,
                                                                  o.stride_b, o.stride_n, o.stride_h, total);
      break;
    default:
      store_kernel<float><<<blocks, 256, 0, cb->stream>>>(acc, (float *)o.data, L, H, d, o.stride_b,
                                                          o.stride_n, o.stride_h, total);
  }
  RA_CUDA_TRY(cudaGetLastError(), "store kernel launch");
  if (lse) /* (b, h) rows of L floats, lse_ld apart */
    RA_CUDA_TRY(cudaMemcpy2DAsync(lse, sizeof(float) * (size_t)lse_ld, lse_state, sizeof(float) * (size_t)L,
                                  sizeof(float) * (size_t)L, (size_t)(c->batch * H), cudaMemcpyDeviceToDevice,
                                  cb->stream),
                "store: lse copy");
  return RA_OK;
}

static ra_status cuda_sync(void *ctx) {
  ra_cuda_backend *cb = (ra_cuda_backend *)ctx;
  RA_CUDA_TRY(cudaStreamSynchronize(cb->stream), "CUDA backend");
  return RA_OK;
}

/* By field name, so that ops this backend lacks (the backward) stay NULL. */
static ra_backend_ops cuda_ops_init(void) {
  ra_backend_ops ops = {};
  ops.name = "cuda";
  ops.alloc = cuda_alloc;
  ops.free = cuda_free;
  ops.init_state = cuda_init_state;
  ops.gather = cuda_gather;
  ops.attend = cuda_attend;
  ops.store = cuda_store;
  ops.sync = cuda_sync;
  return ops;
}

static const ra_backend_ops cuda_ops = cuda_ops_init();

/* --------------------------------------------------------------- lifetime */

ra_status ra_cuda_backend_open(ra_cuda_backend *cb, ra_stats *stats, cudaEvent_t inputs_ready,
                               ra_backend *out) {
  memset(cb, 0, sizeof *cb);
  cb->stats = stats;
  const char *kernel = getenv("RINGATTN_CUDA_KERNEL");
  cb->allow_mma = !(kernel && strcmp(kernel, "simt") == 0);
  RA_CUDA_TRY(cudaStreamCreateWithFlags(&cb->stream, cudaStreamNonBlocking), "CUDA backend: stream");
  RA_CUDA_TRY(cudaEventCreateWithFlags(&cb->staged, cudaEventDisableTiming), "CUDA backend: event");
  if (inputs_ready) RA_CUDA_TRY(cudaStreamWaitEvent(cb->stream, inputs_ready, 0), "CUDA backend: input event");
  out->ops = &cuda_ops;
  out->ctx = cb;
  return RA_OK;
}

void ra_cuda_backend_close(ra_cuda_backend *cb) {
  if (cb->stream) cudaStreamSynchronize(cb->stream); /* nothing may still use the buffers */
  if (cb->list) {
    cudaFree(cb->list);
    ra_release(cb->stats, (int64_t)cb->list_cap);
  }
  if (cb->staging) cudaFreeHost(cb->staging);
  if (cb->staged) cudaEventDestroy(cb->staged);
  if (cb->stream) cudaStreamDestroy(cb->stream);
  memset(cb, 0, sizeof *cb);
}
