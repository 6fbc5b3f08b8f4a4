/*
 * backward_simt.cu -- the generic attention backward: plain fp32 FMA on CUDA
 * cores, any head dim up to RA_SIMT_MAX_DIM, fp32 / fp16 / bf16 inputs, no
 * alignment needs.  It serves fp32 (exact fp32 arithmetic, no TF32), the
 * head dims and layouts the tensor-core kernels do not take, and, forced
 * with exec.kernel = RA_KERNEL_SIMT (default from RINGATTN_CUDA_KERNEL=simt),
 * as a second reference for them.
 * Semantics: backward.cuh; the structure mirrors attend_simt.cu.
 *
 * A block of four warps owns BS_OWN = 16 rows of one run (four per warp) and
 * streams the other run in tiles of 32 rows, one per lane:
 *
 *   dK/dV: owns keys j, streams queries i (lane = query):
 *     s_j, dp_j     lane i computes k_j . q_i and v_j . dO_i for the warp's
 *                   four keys;
 *     p, ds         P = exp2(s * scale_log2 - lse_i * log2 e), masked to 0;
 *                   dS = P (dp - delta_i);
 *     dV_j += p dO_i, dK_j += ds q_i   lane c holds columns c, c + 32, ...;
 *                   p and ds of query i are broadcast by shuffle.
 *   dQ: owns queries i, streams keys j (lane = key), the same with the
 *     roles exchanged: dQ_i += ds k_j.
 *
 * Tiles are converted to fp32 in shared memory; rows past a run are
 * zero-filled, rows past it and rows whose lse is -inf get P = 0 exactly.
 */
#include "backward.cuh"

#define BS_WARPS 4
#define BS_THREADS (BS_WARPS * 32)
#define BS_ROWS 4                      /* own rows per warp            */
#define BS_OWN (BS_WARPS * BS_ROWS)    /* own rows per block           */
#define BS_T 32                        /* streamed rows per tile: one per lane */

/* Streamed rows are stored with an odd length so that the 32 lanes, each
 * reading its own row at the same column, hit 32 different banks. */
__host__ __device__ __forceinline__ int odd_row(int d) { return d | 1; }

/* Own rows (keys or queries) and their partners, stats of dK/dV's queries. */
static size_t bwd_simt_smem_bytes(int d) {
  return sizeof(float) * (size_t)(2 * BS_OWN * d + 2 * BS_T * odd_row(d) + 2 * BS_T);
}

/* lse * log2 e and delta of query i of a run (see backward.cu). */
__device__ __forceinline__ void simt_query_stats(const float *lse, const float *delta, int64_t stride, int i,
                                                 int nq, float &l2, float &dl) {
  const float l = i < nq ? lse[(int64_t)i * stride] : -INFINITY;
  l2 = l == -INFINITY ? INFINITY : l * RA_LOG2E;
  dl = l == -INFINITY ? 0.0f : delta[(int64_t)i * stride];
}

/* Rows r0 .. r0 + nrows of a run (row r at src + r * stride) as fp32 rows
 * `ld` floats apart; rows past `valid` (relative to r0) become zeros. */
template <typename T>
__device__ __forceinline__ void load_rows_f32(float *dst, int ld, const T *src, int64_t stride, int r0,
                                              int nrows, int valid, int d) {
  for (int e = threadIdx.x; e < nrows * d; e += BS_THREADS) {
    const int r = e / d, c = e % d;
    dst[r * ld + c] = r < valid ? to_float(src[(int64_t)(r0 + r) * stride + c]) : 0.0f;
  }
}

/* ---------------------------------------------------------------- dK, dV */

/* NC = output columns per lane: head_dim <= 32 * NC. */
template <typename T, int NC>
__global__ void __launch_bounds__(BS_THREADS) bwd_dkdv_simt_kernel(const backward_args b, int tile0) {
  extern __shared__ float sm[];
  const attend_args &a = b.a;
  const int D = a.head_dim, R = odd_row(D);
  float *sk = sm;                /* [BS_OWN][D] keys of the block */
  float *sv = sk + BS_OWN * D;   /* [BS_OWN][D] their values      */
  float *sq = sv + BS_OWN * D;   /* [BS_T][R]   query tile        */
  float *sdo = sq + BS_T * R;    /* [BS_T][R]   its dO            */
  float *sl2 = sdo + BS_T * R;   /* [BS_T]      lse * log2 e      */
  float *sdl = sl2 + BS_T;       /* [BS_T]      delta             */

  const ra_attend_task t = a.tasks[blockIdx.x];
  const int j0 = (tile0 + (int)blockIdx.y) * BS_OWN;
  if (j0 >= t.nk) return;
  const int nk = (int)t.nk, nq = (int)t.nq;
  const int64_t diff0 = t.qpos0 - t.kpos0;
  /* the first query that sees key j0: (j0 - i) * rate <= diff0 */
  int i_begin = 0;
  if (a.causal) {
    const int64_t need = (int64_t)j0 * a.rate - diff0;
    if (need > 0) {
      const int64_t first = (need + a.rate - 1) / a.rate;
      i_begin = first < nq ? (int)first : nq;
    }
  }
  if (i_begin >= nq) return;
  const T *q = static_cast<const T *>(a.q) + t.q;
  const T *k = static_cast<const T *>(a.k) + t.k;
  const T *v = static_cast<const T *>(a.v) + t.v;
  const T *dout = static_cast<const T *>(b.dout) + t.dout;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int r0 = warp * BS_ROWS; /* this warp's first key in the block */

  load_rows_f32(sk, D, k, a.k_stride, j0, BS_OWN, nk - j0, D);
  load_rows_f32(sv, D, v, a.v_stride, j0, BS_OWN, nk - j0, D);

  float dk[BS_ROWS][NC], dv[BS_ROWS][NC];
#pragma unroll
  for (int rr = 0; rr < BS_ROWS; rr++)
#pragma unroll
    for (int cc = 0; cc < NC; cc++) dk[rr][cc] = dv[rr][cc] = 0.0f;

  for (int i0 = i_begin; i0 < nq; i0 += BS_T) {
    __syncthreads(); /* every warp is done with the last tile */
    load_rows_f32(sq, R, q, a.q_stride, i0, BS_T, nq - i0, D);
    load_rows_f32(sdo, R, dout, b.dout_stride, i0, BS_T, nq - i0, D);
    if (threadIdx.x < BS_T)
      simt_query_stats(a.lse + t.lse, b.delta + t.delta, a.lse_stride, i0 + (int)threadIdx.x, nq,
                       sl2[threadIdx.x], sdl[threadIdx.x]);
    __syncthreads();

    float s[BS_ROWS], dp[BS_ROWS];
#pragma unroll
    for (int rr = 0; rr < BS_ROWS; rr++) s[rr] = dp[rr] = 0.0f;
    const float *qr = sq + lane * R, *gr = sdo + lane * R, *kr = sk + r0 * D, *vr = sv + r0 * D;
    for (int c = 0; c < D; c++) {
      const float qc = qr[c], gc = gr[c];
#pragma unroll
      for (int rr = 0; rr < BS_ROWS; rr++) {
        s[rr] += kr[rr * D + c] * qc;
        dp[rr] += vr[rr * D + c] * gc;
      }
    }
    const int i = i0 + lane;
    const float l2 = sl2[lane], dl = sdl[lane];
#pragma unroll
    for (int rr = 0; rr < BS_ROWS; rr++) {
      const bool vis = i < nq && key_visible(j0 + r0 + rr, i, nk, a.causal, diff0, a.rate);
      const float p = vis ? exp2f(fmaf(s[rr], a.scale_log2, -l2)) : 0.0f;
      s[rr] = p;
      dp[rr] = p * (dp[rr] - dl);
    }

    for (int il = 0; il < BS_T; il++) {
      float pi[BS_ROWS], dsi[BS_ROWS];
#pragma unroll
      for (int rr = 0; rr < BS_ROWS; rr++) {
        pi[rr] = __shfl_sync(0xffffffffu, s[rr], il);
        dsi[rr] = __shfl_sync(0xffffffffu, dp[rr], il);
      }
#pragma unroll
      for (int cc = 0; cc < NC; cc++) {
        const int c = lane + 32 * cc;
        if (c < D) {
          const float gc = sdo[il * R + c], qc = sq[il * R + c];
#pragma unroll
          for (int rr = 0; rr < BS_ROWS; rr++) {
            dv[rr][cc] += pi[rr] * gc;
            dk[rr][cc] += dsi[rr] * qc;
          }
        }
      }
    }
  }

#pragma unroll
  for (int rr = 0; rr < BS_ROWS; rr++) {
    const int j = j0 + r0 + rr;
    if (j >= nk) continue; /* the same for the whole warp */
    float *rk = b.dk + t.dkv + (int64_t)j * b.dkv_stride, *rv = b.dv + t.dkv + (int64_t)j * b.dkv_stride;
#pragma unroll
    for (int cc = 0; cc < NC; cc++) {
      const int c = lane + 32 * cc;
      if (c < D) {
        rk[c] += b.scale * dk[rr][cc];
        rv[c] += dv[rr][cc];
      }
    }
  }
}

/* -------------------------------------------------------------------- dQ */

template <typename T, int NC>
__global__ void __launch_bounds__(BS_THREADS) bwd_dq_simt_kernel(const backward_args b, int tile0) {
  extern __shared__ float sm[];
  const attend_args &a = b.a;
  const int D = a.head_dim, R = odd_row(D);
  float *sq = sm;                /* [BS_OWN][D] queries of the block */
  float *sdo = sq + BS_OWN * D;  /* [BS_OWN][D] their dO             */
  float *sk = sdo + BS_OWN * D;  /* [BS_T][R]   key tile             */
  float *sv = sk + BS_T * R;     /* [BS_T][R]   its values           */

  const ra_attend_task t = a.tasks[blockIdx.x];
  const int i0 = (tile0 + (int)blockIdx.y) * BS_OWN;
  if (i0 >= t.nq) return;
  const int nq = (int)t.nq;
  const int nk = visible_key_count(t, (int64_t)min(i0 + BS_OWN, nq) - 1, a.causal, a.rate);
  if (nk <= 0) return;
  const int64_t diff0 = t.qpos0 - t.kpos0;
  const T *q = static_cast<const T *>(a.q) + t.q;
  const T *k = static_cast<const T *>(a.k) + t.k;
  const T *v = static_cast<const T *>(a.v) + t.v;
  const T *dout = static_cast<const T *>(b.dout) + t.dout;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int r0 = warp * BS_ROWS; /* this warp's first query in the block */

  load_rows_f32(sq, D, q, a.q_stride, i0, BS_OWN, nq - i0, D);
  load_rows_f32(sdo, D, dout, b.dout_stride, i0, BS_OWN, nq - i0, D);
  float l2[BS_ROWS], dl[BS_ROWS], dq[BS_ROWS][NC];
#pragma unroll
  for (int rr = 0; rr < BS_ROWS; rr++) {
    simt_query_stats(a.lse + t.lse, b.delta + t.delta, a.lse_stride, i0 + r0 + rr, nq, l2[rr], dl[rr]);
#pragma unroll
    for (int cc = 0; cc < NC; cc++) dq[rr][cc] = 0.0f;
  }

  for (int j0 = 0; j0 < nk; j0 += BS_T) {
    __syncthreads(); /* own rows stored; every warp is done with the last tile */
    load_rows_f32(sk, R, k, a.k_stride, j0, BS_T, nk - j0, D);
    load_rows_f32(sv, R, v, a.v_stride, j0, BS_T, nk - j0, D);
    __syncthreads();

    float s[BS_ROWS], ds[BS_ROWS];
#pragma unroll
    for (int rr = 0; rr < BS_ROWS; rr++) s[rr] = ds[rr] = 0.0f;
    const float *kr = sk + lane * R, *vr = sv + lane * R, *qr = sq + r0 * D, *gr = sdo + r0 * D;
    for (int c = 0; c < D; c++) {
      const float kc = kr[c], vc = vr[c];
#pragma unroll
      for (int rr = 0; rr < BS_ROWS; rr++) {
        s[rr] += qr[rr * D + c] * kc;
        ds[rr] += gr[rr * D + c] * vc;
      }
    }
    const int j = j0 + lane;
#pragma unroll
    for (int rr = 0; rr < BS_ROWS; rr++) {
      const bool vis = key_visible(j, i0 + r0 + rr, nk, a.causal, diff0, a.rate);
      const float p = vis ? exp2f(fmaf(s[rr], a.scale_log2, -l2[rr])) : 0.0f;
      ds[rr] = p * (ds[rr] - dl[rr]);
    }

    for (int jl = 0; jl < BS_T; jl++) {
      float dsj[BS_ROWS];
#pragma unroll
      for (int rr = 0; rr < BS_ROWS; rr++) dsj[rr] = __shfl_sync(0xffffffffu, ds[rr], jl);
#pragma unroll
      for (int cc = 0; cc < NC; cc++) {
        const int c = lane + 32 * cc;
        if (c < D) {
          const float kc = sk[jl * R + c];
#pragma unroll
          for (int rr = 0; rr < BS_ROWS; rr++) dq[rr][cc] += dsj[rr] * kc;
        }
      }
    }
  }

#pragma unroll
  for (int rr = 0; rr < BS_ROWS; rr++) {
    const int i = i0 + r0 + rr;
    if (i >= nq) continue; /* the same for the whole warp */
    float *row = a.acc + t.acc + (int64_t)i * a.acc_stride;
#pragma unroll
    for (int cc = 0; cc < NC; cc++) {
      const int c = lane + 32 * cc;
      if (c < D) row[c] += b.scale * dq[rr][cc];
    }
  }
}

/* -------------------------------------------------------------- launchers */

/* Grid: x = task, y = block of BS_OWN own rows (tile0 + y); gridDim.y is at
 * most 65535, so long runs take several launches. */
template <typename K>
static ra_status launch_simt_tiles(K kernel, const backward_args &b, int ntasks, int64_t max_n,
                                   cudaStream_t stream, const char *what) {
  const size_t smem = bwd_simt_smem_bytes(b.a.head_dim);
  RA_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem), what);
  const int64_t tiles = (max_n + BS_OWN - 1) / BS_OWN;
  for (int64_t y0 = 0; y0 < tiles; y0 += 65535) {
    const dim3 grid((unsigned)ntasks, (unsigned)(tiles - y0 < 65535 ? tiles - y0 : 65535));
    kernel<<<grid, BS_THREADS, smem, stream>>>(b, (int)y0);
    RA_CUDA_TRY(cudaGetLastError(), what);
  }
  return RA_OK;
}

template <typename T, int NC>
static ra_status launch_nc(bool dkdv, const backward_args &b, int ntasks, int64_t max_n, cudaStream_t stream) {
  if (dkdv)
    return launch_simt_tiles(bwd_dkdv_simt_kernel<T, NC>, b, ntasks, max_n, stream,
                             "attention backward kernel (SIMT, dK, dV)");
  return launch_simt_tiles(bwd_dq_simt_kernel<T, NC>, b, ntasks, max_n, stream,
                           "attention backward kernel (SIMT, dQ)");
}

template <typename T>
static ra_status launch_dim(bool dkdv, const backward_args &b, int ntasks, int64_t max_n, cudaStream_t stream) {
  const int d = b.a.head_dim;
  if (d <= 32) return launch_nc<T, 1>(dkdv, b, ntasks, max_n, stream);
  if (d <= 64) return launch_nc<T, 2>(dkdv, b, ntasks, max_n, stream);
  if (d <= 128) return launch_nc<T, 4>(dkdv, b, ntasks, max_n, stream);
  return launch_nc<T, RA_SIMT_MAX_DIM / 32>(dkdv, b, ntasks, max_n, stream);
}

static ra_status launch_dtype(bool dkdv, const backward_args &b, ra_dtype dtype, int ntasks, int64_t max_n,
                              cudaStream_t stream) {
  switch (dtype) {
    case RA_FLOAT16: return launch_dim<__half>(dkdv, b, ntasks, max_n, stream);
    case RA_BFLOAT16: return launch_dim<__nv_bfloat16>(dkdv, b, ntasks, max_n, stream);
    default: return launch_dim<float>(dkdv, b, ntasks, max_n, stream);
  }
}

ra_status ra_cuda_backward_dkdv_simt(const backward_args &b, ra_dtype dtype, int ntasks, int64_t max_nk,
                                     cudaStream_t stream) {
  return launch_dtype(true, b, dtype, ntasks, max_nk, stream);
}

ra_status ra_cuda_backward_dq_simt(const backward_args &b, ra_dtype dtype, int ntasks, int64_t max_nq,
                                   cudaStream_t stream) {
  return launch_dtype(false, b, dtype, ntasks, max_nq, stream);
}
