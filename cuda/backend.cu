/*
 * backend.cu -- the ring driver's backend on one CUDA device.
 *
 * The ops of ra_backend_ops (csrc/internal.h; csrc/cpu_backend.c is the
 * reference for each) on device memory: everything is enqueued on the
 * backend's compute stream, and sync() waits for it.  The small kernels for
 * the state, packing, output conversion and the backward's row dots and
 * scatters live here; attention is in attend.cu / attend_simt.cu and its
 * backward in backward.cu / backward_simt.cu.
 */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "attend.cuh" /* to_float */
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

/* delta[(bb * H + h) * ld + p] = sum_c dout . o over one row, a warp per
 * row (b, L, h, d with each tensor's strides), summed in fp32 lanes and
 * then across the warp. */
template <typename T>
__global__ void row_dot_kernel(const T *dout, const T *o, float *delta, int64_t L, int64_t H, int64_t d,
                               int64_t gb, int64_t gn, int64_t gh, int64_t ob, int64_t on, int64_t oh,
                               int64_t ld, int64_t rows) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = (int64_t)gridDim.x * (blockDim.x / 32);
  for (int64_t row = blockIdx.x * (int64_t)(blockDim.x / 32) + threadIdx.x / 32; row < rows; row += warps) {
    const int64_t p = row % L, h = (row / L) % H, bb = row / L / H;
    const T *g = dout + bb * gb + p * gn + h * gh;
    const T *x = o + bb * ob + p * on + h * oh;
    float sum = 0.0f;
    for (int64_t c = lane; c < d; c += 32) sum += to_float<T>(g[c]) * to_float<T>(x[c]);
    for (int off = 16; off; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (lane == 0) delta[(bb * H + h) * ld + p] = sum;
  }
}

/* Scatter-add: for each copy task (blockIdx.x), dst + t.dst + r * dst_stride
 * += src + t.src + r * d, row by row (fp32).  Rows of one call never
 * overlap, so plain adds suffice. */
__global__ void scatter_add_kernel(const float *src, float *dst, int64_t dst_stride, int64_t d,
                                   const ra_copy_task *tasks) {
  const ra_copy_task t = tasks[blockIdx.x];
  for (int64_t r0 = (int64_t)blockIdx.y * GATHER_ROWS; r0 < t.count; r0 += (int64_t)gridDim.y * GATHER_ROWS)
    for (int64_t e = threadIdx.x; e < GATHER_ROWS * d; e += blockDim.x) {
      const int64_t r = r0 + e / d, c = e % d;
      if (r < t.count) dst[t.dst + r * dst_stride + c] += src[t.src + r * d + c];
    }
}

/* ------------------------------------------------------------------ memory */

/* Device memory comes from one stream-ordered pool per device, private to
 * ringattn: cudaMallocAsync / cudaFreeAsync on the compute stream neither
 * synchronize the device (cudaFree does, which would serialize the ranks
 * sharing a GPU) nor go back to the driver on every call, since the pool
 * keeps what was freed (release threshold: unlimited) for the next call,
 * much as PyTorch's caching allocator does. */
#define RA_MAX_DEVICES 64
static cudaMemPool_t pools[RA_MAX_DEVICES];
static pthread_mutex_t pools_mu = PTHREAD_MUTEX_INITIALIZER;

static ra_status device_pool(cudaMemPool_t *out) {
  int device = 0;
  RA_CUDA_TRY(cudaGetDevice(&device), "memory pool: device");
  if (device < 0 || device >= RA_MAX_DEVICES)
    return ra_fail(RA_ERR_UNSUPPORTED, "memory pool: device %d beyond the first %d", device, RA_MAX_DEVICES);
  pthread_mutex_lock(&pools_mu);
  cudaError_t err = cudaSuccess;
  if (!pools[device]) {
    cudaMemPoolProps props;
    memset(&props, 0, sizeof props);
    props.allocType = cudaMemAllocationTypePinned;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = device;
    cudaMemPool_t pool;
    err = cudaMemPoolCreate(&pool, &props);
    if (err == cudaSuccess) {
      uint64_t keep = UINT64_MAX;
      err = cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep);
      if (err == cudaSuccess) pools[device] = pool;
      else cudaMemPoolDestroy(pool);
    }
  }
  *out = pools[device];
  pthread_mutex_unlock(&pools_mu);
  RA_CUDA_TRY(err, "memory pool");
  return RA_OK;
}

/* `bytes` of device memory usable on cb->stream from here on. */
static ra_status pool_alloc(ra_cuda_backend *cb, size_t bytes, void **out) {
  *out = NULL;
  RA_CUDA_TRY(cudaMallocFromPoolAsync(out, bytes ? bytes : 1, cb->pool, cb->stream), "device allocation");
  return RA_OK;
}

/* ---------------------------------------------------------------- task lists */

/* Put a host task list on the device (into cb->list).  The copy is ordered
 * on the compute stream, so the kernel launched next sees it and the one
 * before has finished with the old list; from pageable memory the copy
 * stages the bytes before returning, so the host list may change at once. */
static ra_status upload(ra_cuda_backend *cb, const void *host, size_t bytes) {
  if (bytes > cb->list_cap) {
    const size_t cap = bytes > 2 * cb->list_cap ? bytes : 2 * cb->list_cap;
    if (cb->list) { /* freed in stream order: the kernels before still read it */
      cudaFreeAsync(cb->list, cb->stream);
      ra_release(cb->stats, (int64_t)cb->list_cap);
      cb->list = NULL;
      cb->list_cap = 0;
    }
    RA_TRY(pool_alloc(cb, cap, &cb->list));
    cb->list_cap = cap;
    ra_hold(cb->stats, (int64_t)cap);
  }
  RA_CUDA_TRY(cudaMemcpyAsync(cb->list, host, bytes, cudaMemcpyHostToDevice, cb->stream), "task list upload");
  return RA_OK;
}

/* ---------------------------------------------------------------------- ops */

static void *cuda_alloc(void *ctx, size_t bytes) {
  void *p = NULL;
  return pool_alloc((ra_cuda_backend *)ctx, bytes, &p) == RA_OK ? p : NULL;
}

static void cuda_free(void *ctx, void *ptr) {
  if (ptr) cudaFreeAsync(ptr, ((ra_cuda_backend *)ctx)->stream);
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

static ra_status cuda_row_dot(void *ctx, const ra_config *c, int64_t L, ra_tensor dout, ra_tensor o,
                              float *delta, int64_t ld) {
  ra_cuda_backend *cb = (ra_cuda_backend *)ctx;
  const int64_t H = c->num_heads, d = c->head_dim, rows = c->batch * H * L;
  const unsigned blocks = grid_for(rows * 32);
#define ROW_DOT(T)                                                                                  \
  row_dot_kernel<T><<<blocks, 256, 0, cb->stream>>>((const T *)dout.data, (const T *)o.data, delta, L, H, d, \
                                                    dout.stride_b, dout.stride_n, dout.stride_h, o.stride_b,  \
                                                    o.stride_n, o.stride_h, ld, rows)
  switch (c->dtype) {
    case RA_FLOAT16: ROW_DOT(__half); break;
    case RA_BFLOAT16: ROW_DOT(__nv_bfloat16); break;
    default: ROW_DOT(float);
  }
#undef ROW_DOT
  RA_CUDA_TRY(cudaGetLastError(), "row dot kernel launch");
  return RA_OK;
}

static ra_status cuda_attend_backward(void *ctx, const ra_backward_batch *b) {
  ra_cuda_backend *cb = (ra_cuda_backend *)ctx;
  if (b->a.ntasks == 0) return RA_OK;
  RA_TRY(upload(cb, b->a.tasks, sizeof(ra_attend_task) * (size_t)b->a.ntasks));
  return ra_cuda_attend_backward(b, (const ra_attend_task *)cb->list, cb->allow_mma, cb->stream);
}

static ra_status cuda_scatter_add(void *ctx, const ra_scatter_batch *sc) {
  ra_cuda_backend *cb = (ra_cuda_backend *)ctx;
  int64_t max_count = 0;
  for (int64_t i = 0; i < sc->ntasks; i++)
    if (sc->tasks[i].count > max_count) max_count = sc->tasks[i].count;
  if (sc->ntasks == 0 || max_count == 0) return RA_OK;
  if (sc->ntasks > 2147483647LL) return ra_fail(RA_ERR_UNSUPPORTED, "scatter: too many copy tasks");
  RA_TRY(upload(cb, sc->tasks, sizeof(ra_copy_task) * (size_t)sc->ntasks));
  const int64_t chunks = (max_count + GATHER_ROWS - 1) / GATHER_ROWS;
  const dim3 grid((unsigned)sc->ntasks, (unsigned)(chunks < 65535 ? chunks : 65535));
  scatter_add_kernel<<<grid, 128, 0, cb->stream>>>(sc->src, sc->dst, sc->dst_stride, sc->head_dim,
                                                   (const ra_copy_task *)cb->list);
  RA_CUDA_TRY(cudaGetLastError(), "scatter kernel launch");
  return RA_OK;
}

static ra_status cuda_sync(void *ctx) {
  ra_cuda_backend *cb = (ra_cuda_backend *)ctx;
  RA_CUDA_TRY(cudaStreamSynchronize(cb->stream), "CUDA backend");
  return RA_OK;
}

/* By field name, in the order of ra_backend_ops. */
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
  ops.row_dot = cuda_row_dot;
  ops.attend_backward = cuda_attend_backward;
  ops.scatter_add = cuda_scatter_add;
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
  RA_TRY(device_pool(&cb->pool));
  RA_CUDA_TRY(cudaStreamCreateWithFlags(&cb->stream, cudaStreamNonBlocking), "CUDA backend: stream");
  if (inputs_ready) RA_CUDA_TRY(cudaStreamWaitEvent(cb->stream, inputs_ready, 0), "CUDA backend: input event");
  out->ops = &cuda_ops;
  out->ctx = cb;
  return RA_OK;
}

void ra_cuda_backend_close(ra_cuda_backend *cb) {
  if (cb->stream) cudaStreamSynchronize(cb->stream); /* nothing may still use the buffers */
  if (cb->list) {
    cudaFreeAsync(cb->list, cb->stream);
    ra_release(cb->stats, (int64_t)cb->list_cap);
  }
  if (cb->stream) {
    cudaStreamSynchronize(cb->stream);
    cudaStreamDestroy(cb->stream);
  }
  memset(cb, 0, sizeof *cb);
}
