/*
 * backend.cu -- the ring driver's backend on one CUDA device, and the
 * interface through which the entry point opens it.
 *
 * The ops of ra_backend_ops (csrc/ring/backend.h; csrc/cpu/backend.c is the
 * reference for each) on device memory: everything is enqueued on the
 * backend's compute stream, and sync() waits for it.  The small kernels for
 * the state, packing, output conversion and the backward's row dots and
 * scatters live here; attention is in attend.cu / attend_simt.cu and its
 * backward in backward.cu / backward_simt.cu.
 *
 * The interface (ra_cuda_backend_iface, at the end) checks a call's device
 * pointers, and runs its ranks on the call's device: one ra_cuda_backend per
 * rank (its own compute stream and buffers) on the thread of that rank.
 * Without a communicator every rank is a thread of this process (the
 * generic csrc/ring/ranks.c) and a receive copies the sender's device buffer
 * into the receiver's on the receiving rank's copy stream, so the transfer
 * overlaps the attention the driver has just enqueued on the compute
 * stream; with one (NCCL) the call is this process's rank alone.
 */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "attend.cuh" /* to_float */
#include "cuda_backend.h"

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
  return ra_cuda_attend_backward(b, (const ra_attend_task *)cb->list, cb->allow_mma, cb->deterministic,
                                 cb->stream);
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

ra_status ra_cuda_backend_open(ra_cuda_backend *cb, ra_stats *stats, cudaEvent_t inputs_ready, int allow_mma,
                               int deterministic, ra_backend *out) {
  memset(cb, 0, sizeof *cb);
  cb->stats = stats;
  cb->allow_mma = allow_mma;
  cb->deterministic = deterministic;
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

/* -------------------------------------------------------------- interface */

/* What the ranks of one call in this process share, from call_open on the
 * calling thread to call_close there after the last rank ended. */
typedef struct cuda_call {
  int caller_device;        /* current on the calling thread before the call  */
  int device;               /* the call's device: exec.device, or the current */
  int on_device;            /* device made current (what follows is on it)   */
  cudaEvent_t inputs_ready; /* recorded on exec.stream: the inputs are valid  */
  int ranks;                /* copy streams (0 with a communicator)          */
  cudaStream_t *copy;       /* copy[r]: rank r's receives (in-process ring)  */
} cuda_call;

/* The tensors must be device memory of this process (or managed), and
 * device memory on the call's device when it names one. */
static ra_status check_device_ptr(const void *p, const char *name, int device) {
  if (!p) return RA_OK; /* the driver names NULL tensors itself */
  cudaPointerAttributes at;
  cudaError_t err = cudaPointerGetAttributes(&at, p);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return ra_fail(RA_ERR_INVALID_ARGUMENT, "%s: not a CUDA pointer (%s)", name, cudaGetErrorString(err));
  }
  if (at.type != cudaMemoryTypeDevice && at.type != cudaMemoryTypeManaged)
    return ra_fail(RA_ERR_INVALID_ARGUMENT, "%s: must be device memory", name);
  if (device >= 0 && at.type == cudaMemoryTypeDevice && at.device != device)
    return ra_fail(RA_ERR_INVALID_ARGUMENT, "%s: memory of CUDA device %d, but the call runs on CUDA device %d", name,
                   at.device, device);
  return RA_OK;
}

/* float64 is a CPU-only dtype (double accumulators, csrc/cpu/double.c): the
 * kernels here are fp32/fp16/bf16.  The rest needs a device and a head dim
 * the kernels take. */
static ra_status cuda_supports(const ra_call *call) {
  const ra_fwd_params *p = &call->p.fwd;
  if (p->cfg.dtype == RA_FLOAT64)
    return ra_fail(RA_ERR_UNSUPPORTED, "dtype: float64 is supported by the CPU backend only");
  RA_TRY(ra_cuda_check_head_dim(p->cfg.head_dim));
  /* Grouped-query attention is the driver's head arithmetic on the same
   * kernels, but it has not run on a GPU yet: opt-in. */
  if (p->cfg.num_kv_heads > 0 && p->cfg.num_kv_heads != p->cfg.num_heads && !p->exec.cuda_gqa)
    return ra_fail(RA_ERR_UNSUPPORTED,
                   "k: grouped-query attention (%lld key/value heads for %lld query heads) has not been run on a "
                   "GPU yet; set RINGATTN_CUDA_GQA=1 to use it unverified",
                   (long long)p->cfg.num_kv_heads, (long long)p->cfg.num_heads);
  if (ra_cuda_device_count() == 0) return ra_fail(RA_ERR_UNSUPPORTED, "no CUDA device");
  return ra_cuda_check_device(p->exec.device, "device");
}

static ra_status cuda_check_inputs(const ra_call *call) {
  const ra_bwd_params *p = &call->p;
  const int device = p->fwd.exec.device;
  const ra_tensor *t[8] = {&p->fwd.q, &p->fwd.k, &p->fwd.v, &p->fwd.o, &p->dout, &p->dq, &p->dk, &p->dv};
  static const char *const names[8] = {"q", "k", "v", "out", "dout", "dq", "dk", "dv"};
  for (int i = 0; i < (call->backward ? 8 : 4); i++) RA_TRY(check_device_ptr(t[i]->data, names[i], device));
  RA_TRY(check_device_ptr(p->fwd.lse, "lse", device));
  if (call->backward && !p->fwd.lse)
    return ra_fail(RA_ERR_INVALID_ARGUMENT, "lse: the backward needs the forward's lse");
  return RA_OK;
}

static void cuda_call_close(void *shared) {
  cuda_call *s = (cuda_call *)shared;
  if (!s) return;
  if (s->on_device) {
    cudaSetDevice(s->device); /* what the call created belongs to its device */
    for (int r = 0; r < s->ranks && s->copy; r++)
      if (s->copy[r]) cudaStreamDestroy(s->copy[r]);
    if (s->inputs_ready) cudaEventDestroy(s->inputs_ready);
  }
  free(s->copy);
  cudaSetDevice(s->caller_device); /* the caller's current device, as it was */
  free(s);
}

static ra_status cuda_call_open(const ra_call *call, void **shared) {
  *shared = NULL;
  const ra_fwd_params *p = &call->p.fwd;
  cuda_call *s = (cuda_call *)calloc(1, sizeof *s);
  if (!s) return ra_fail(RA_ERR_OUT_OF_MEMORY, "CUDA call: could not allocate its state");
  ra_status st = RA_OK;
  cudaError_t err = cudaGetDevice(&s->caller_device);
  if (err != cudaSuccess) {
    free(s);
    return ra_cuda_fail(err, "no usable CUDA device");
  }
  s->device = p->exec.device >= 0 ? p->exec.device : s->caller_device;
  if ((err = cudaSetDevice(s->device)) != cudaSuccess) {
    st = ra_cuda_fail(err, "CUDA call: device");
    goto fail;
  }
  s->on_device = 1;
  /* the ranks' streams start after the work the caller has queued so far */
  err = cudaEventCreateWithFlags(&s->inputs_ready, cudaEventDisableTiming);
  if (err == cudaSuccess) err = cudaEventRecord(s->inputs_ready, (cudaStream_t)p->exec.stream);
  if (err != cudaSuccess) {
    st = ra_cuda_fail(err, "input event");
    goto fail;
  }
  if (!p->comm) { /* in-process ranks: a copy stream each for their receives */
    const int ranks = p->cfg.world_size > 0 ? p->cfg.world_size : 1;
    s->copy = (cudaStream_t *)calloc((size_t)ranks, sizeof *s->copy);
    if (!s->copy) {
      st = ra_fail(RA_ERR_OUT_OF_MEMORY, "CUDA call: could not allocate %d copy streams", ranks);
      goto fail;
    }
    s->ranks = ranks;
    for (int r = 0; r < ranks; r++)
      if ((err = cudaStreamCreateWithFlags(&s->copy[r], cudaStreamNonBlocking)) != cudaSuccess) {
        s->copy[r] = NULL;
        st = ra_cuda_fail(err, "rank thread: stream");
        goto fail;
      }
  }
  *shared = s;
  return RA_OK;
fail:
  cuda_call_close(s);
  return st;
}

/* On the rank's own thread: the call's device current, then the rank's
 * backend, its compute stream waiting for the caller's inputs. */
static ra_status cuda_rank_open(void *shared, const ra_call *rank_call, ra_backend *out) {
  out->ops = NULL;
  out->ctx = NULL;
  const cuda_call *s = (const cuda_call *)shared;
  const ra_exec *e = &rank_call->p.fwd.exec;
  const int device = s ? s->device : e->device;
  if (device >= 0) RA_CUDA_TRY(cudaSetDevice(device), "rank thread: device");
  ra_cuda_backend *cb = (ra_cuda_backend *)malloc(sizeof *cb);
  if (!cb) return ra_fail(RA_ERR_OUT_OF_MEMORY, "CUDA backend: could not allocate its state");
  ra_status st = ra_cuda_backend_open(cb, rank_call->p.fwd.stats, s ? s->inputs_ready : NULL,
                                      e->kernel != RA_KERNEL_SIMT, e->deterministic != 0, out);
  if (st != RA_OK) {
    ra_cuda_backend_close(cb);
    free(cb);
    out->ops = NULL;
    out->ctx = NULL;
  }
  return st;
}

static void cuda_rank_close(ra_backend *be) {
  if (!be || !be->ctx) return;
  ra_cuda_backend *cb = (ra_cuda_backend *)be->ctx;
  ra_cuda_backend_close(cb);
  free(cb);
  be->ops = NULL;
  be->ctx = NULL;
}

/* A receive's copy, on the receiving rank's copy stream (the in-process
 * transport runs it on that rank's thread). */
static ra_status cuda_copy(void *ctx, int rank, void *dst, const void *src, size_t bytes) {
  const cuda_call *s = (const cuda_call *)ctx;
  if (!s || !s->copy || rank < 0 || rank >= s->ranks)
    return ra_fail(RA_ERR_INTERNAL, "ring transfer: rank %d has no copy stream", rank);
  cudaStream_t comm = s->copy[rank];
  RA_CUDA_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, comm), "ring transfer");
  RA_CUDA_TRY(cudaStreamSynchronize(comm), "ring transfer");
  return RA_OK;
}

/* By field name, in the order of ra_backend_iface. */
static ra_backend_iface cuda_iface_init(void) {
  ra_backend_iface iface = {};
  iface.name = "cuda";
  iface.supports = cuda_supports;
  iface.check_inputs = cuda_check_inputs;
  iface.call_open = cuda_call_open;
  iface.call_close = cuda_call_close;
  iface.rank_open = cuda_rank_open;
  iface.rank_close = cuda_rank_close;
  iface.copy = cuda_copy;
  return iface;
}

extern "C" const ra_backend_iface *ra_cuda_backend_iface(void) {
  static const ra_backend_iface iface = cuda_iface_init();
  return &iface;
}
