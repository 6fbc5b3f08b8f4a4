/*
 * attend_simt.cu -- the generic attention kernel: plain fp32 FMA on CUDA
 * cores, any head dim up to RA_SIMT_MAX_DIM, fp32 / fp16 / bf16 inputs, no
 * alignment needs.  It serves fp32 (exact fp32 arithmetic, no TF32), the
 * head dims and layouts the tensor-core kernel does not take, and, forced
 * with exec.kernel = RA_KERNEL_SIMT (default from RINGATTN_CUDA_KERNEL=simt),
 * as a second reference for that kernel.
 *
 * One block of four warps takes SIMT_BQ = 16 queries of one task (four rows
 * per warp) and walks the keys in tiles of 32, one key per lane:
 *   scores      lane j computes q_i . k_j for the warp's four rows;
 *   softmax     max and sum by warp shuffles (online, base 2);
 *   o += p v    lane c holds output columns c, c + 32, ...; p_j is
 *               broadcast by shuffle.
 * Tiles are converted to fp32 in shared memory; rows past the run are
 * zero-filled, so nothing uninitialised is ever read.
 */
#include "attend.cuh"

#define SIMT_WARPS 4
#define SIMT_THREADS (SIMT_WARPS * 32)
#define SIMT_ROWS 4                         /* queries per warp  */
#define SIMT_BQ (SIMT_WARPS * SIMT_ROWS)   /* queries per block */
#define SIMT_BK 32                          /* keys per tile: one per lane */

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

/* Key rows are stored with an odd length so that the 32 lanes, each reading
 * its own key row at the same column, hit 32 different banks. */
__host__ __device__ __forceinline__ int key_row(int d) { return d | 1; }

static size_t simt_smem_bytes(int d) {
  return sizeof(float) * (size_t)(SIMT_BQ * d + SIMT_BK * key_row(d) + SIMT_BK * d);
}

/* NC = output columns per lane: head_dim <= 32 * NC. */
template <typename T, int NC>
__global__ void __launch_bounds__(SIMT_THREADS) attend_simt_kernel(const attend_args a) {
  extern __shared__ float sm[];
  const int D = a.head_dim, KR = key_row(D);
  float *sq = sm;                 /* [SIMT_BQ][D]  queries * scale * log2 e */
  float *sk = sq + SIMT_BQ * D;   /* [SIMT_BK][KR] keys                     */
  float *sv = sk + SIMT_BK * KR;  /* [SIMT_BK][D]  values                   */

  const ra_attend_task t = a.tasks[blockIdx.x];
  const int i0 = (a.tile0 + (int)blockIdx.y) * SIMT_BQ;
  if (i0 >= t.nq) return;
  const int nq = (int)t.nq;
  const int nk = visible_key_count(t, (int64_t)min(i0 + SIMT_BQ, nq) - 1, a.causal, a.rate);
  if (nk <= 0) return;
  const int64_t diff0 = t.qpos0 - t.kpos0;
  const T *q = static_cast<const T *>(a.q) + t.q;
  const T *k = static_cast<const T *>(a.k) + t.k;
  const T *v = static_cast<const T *>(a.v) + t.v;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int r0 = warp * SIMT_ROWS; /* this warp's first row in the block */

  for (int e = threadIdx.x; e < SIMT_BQ * D; e += SIMT_THREADS) {
    const int r = e / D, c = e % D;
    sq[e] = i0 + r < nq ? to_float(q[(int64_t)(i0 + r) * a.q_stride + c]) * a.scale_log2 : 0.0f;
  }

  float m[SIMT_ROWS], l[SIMT_ROWS], o[SIMT_ROWS][NC];
#pragma unroll
  for (int rr = 0; rr < SIMT_ROWS; rr++) {
    m[rr] = -INFINITY;
    l[rr] = 0.0f;
#pragma unroll
    for (int cc = 0; cc < NC; cc++) o[rr][cc] = 0.0f;
  }

  for (int j0 = 0; j0 < nk; j0 += SIMT_BK) {
    __syncthreads(); /* queries stored; every warp is done with the last tile */
    for (int e = threadIdx.x; e < SIMT_BK * D; e += SIMT_THREADS) {
      const int j = e / D, c = e % D;
      const bool ok = j0 + j < nk;
      sk[j * KR + c] = ok ? to_float(k[(int64_t)(j0 + j) * a.k_stride + c]) : 0.0f;
      sv[j * D + c] = ok ? to_float(v[(int64_t)(j0 + j) * a.v_stride + c]) : 0.0f;
    }
    __syncthreads();

    float s[SIMT_ROWS];
#pragma unroll
    for (int rr = 0; rr < SIMT_ROWS; rr++) s[rr] = 0.0f;
    const float *kr = sk + lane * KR, *qr = sq + r0 * D;
    for (int c = 0; c < D; c++) {
      const float kc = kr[c];
#pragma unroll
      for (int rr = 0; rr < SIMT_ROWS; rr++) s[rr] += qr[rr * D + c] * kc;
    }

    float p[SIMT_ROWS];
#pragma unroll
    for (int rr = 0; rr < SIMT_ROWS; rr++) {
      const float x = key_visible(j0 + lane, i0 + r0 + rr, nk, a.causal, diff0, a.rate) ? s[rr] : -INFINITY;
      const float m_new = fmaxf(m[rr], warp_max(x));
      const float base = m_new == -INFINITY ? 0.0f : m_new; /* nothing visible yet */
      const float alpha = exp2f(m[rr] - base);
      p[rr] = exp2f(x - base);
      l[rr] = l[rr] * alpha + warp_sum(p[rr]);
      m[rr] = m_new;
#pragma unroll
      for (int cc = 0; cc < NC; cc++) o[rr][cc] *= alpha;
    }

    for (int j = 0; j < SIMT_BK; j++) {
      float pj[SIMT_ROWS];
#pragma unroll
      for (int rr = 0; rr < SIMT_ROWS; rr++) pj[rr] = __shfl_sync(0xffffffffu, p[rr], j);
#pragma unroll
      for (int cc = 0; cc < NC; cc++) {
        const int c = lane + 32 * cc;
        if (c < D) {
          const float vc = sv[j * D + c];
#pragma unroll
          for (int rr = 0; rr < SIMT_ROWS; rr++) o[rr][cc] += pj[rr] * vc;
        }
      }
    }
  }

  /* merge each finished row into acc / lse (ra_merge_rows) */
#pragma unroll
  for (int rr = 0; rr < SIMT_ROWS; rr++) {
    const int i = i0 + r0 + rr;
    if (i >= nq) continue; /* the same for the whole warp */
    const float lp = row_lse(m[rr] == -INFINITY ? 0.0f : m[rr], l[rr]), inv = 1.0f / l[rr];
    float *lse = a.lse + t.lse + (int64_t)i * a.lse_stride;
    float *row = a.acc + t.acc + (int64_t)i * a.acc_stride;
    const merge_rule w = merge_weights(*lse, lp);
    if (w.apply) {
#pragma unroll
      for (int cc = 0; cc < NC; cc++) {
        const int c = lane + 32 * cc;
        if (c < D) row[c] = merged(w, w.copy ? 0.0f : row[c], o[rr][cc] * inv);
      }
    }
    __syncwarp(); /* every lane has read *lse */
    if (w.apply && lane == 0) *lse = w.lse;
  }
}

template <typename T, int NC>
static ra_status launch_simt(const attend_args &a, int ntasks, int64_t max_nq, cudaStream_t stream) {
  const size_t smem = simt_smem_bytes(a.head_dim);
  RA_CUDA_TRY(cudaFuncSetAttribute(attend_simt_kernel<T, NC>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   (int)smem),
              "attention kernel (SIMT): shared memory");
  const int64_t tiles = (max_nq + SIMT_BQ - 1) / SIMT_BQ;
  for (int64_t y0 = 0; y0 < tiles; y0 += 65535) { /* gridDim.y is at most 65535 */
    attend_args b = a;
    b.tile0 = (int)y0;
    const dim3 grid((unsigned)ntasks, (unsigned)(tiles - y0 < 65535 ? tiles - y0 : 65535));
    attend_simt_kernel<T, NC><<<grid, SIMT_THREADS, smem, stream>>>(b);
    RA_CUDA_TRY(cudaGetLastError(), "attention kernel (SIMT) launch");
  }
  return RA_OK;
}

template <typename T>
static ra_status launch_simt_dim(const attend_args &a, int ntasks, int64_t max_nq, cudaStream_t stream) {
  if (a.head_dim <= 32) return launch_simt<T, 1>(a, ntasks, max_nq, stream);
  if (a.head_dim <= 64) return launch_simt<T, 2>(a, ntasks, max_nq, stream);
  if (a.head_dim <= 128) return launch_simt<T, 4>(a, ntasks, max_nq, stream);
  return launch_simt<T, RA_SIMT_MAX_DIM / 32>(a, ntasks, max_nq, stream);
}

ra_status ra_cuda_attend_simt(const attend_args &a, ra_dtype dtype, int ntasks, int64_t max_nq,
                              cudaStream_t stream) {
  switch (dtype) {
    case RA_FLOAT16: return launch_simt_dim<__half>(a, ntasks, max_nq, stream);
    case RA_BFLOAT16: return launch_simt_dim<__nv_bfloat16>(a, ntasks, max_nq, stream);
    default: return launch_simt_dim<float>(a, ntasks, max_nq, stream);
  }
}
