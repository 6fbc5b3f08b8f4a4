/*
 * attend.cu -- fused flash-attention forward on tensor cores, and the choice
 * between it and the generic SIMT kernel (attend_simt.cu).
 *
 * One block of four warps takes MMA_BQ = 64 queries of one task (16 per
 * warp) and walks the task's keys in tiles of MMA_BK = 64:
 *
 *   S = Q K^T        mma.m16n8k16, Q fragments kept in registers, K from
 *                    shared memory by ldmatrix;
 *   online softmax   on the fp32 accumulators of S, in registers (base 2);
 *   O += P V         P re-packed from S's accumulators into A fragments
 *                    (no trip through shared memory), V by ldmatrix.trans.
 *
 * Tiles come in by cp.async: while S is computed the V tile is in flight,
 * while P V is computed the next K tile is.  Rows past the end of a run are
 * zero-filled (never left uninitialised), and keys past it are masked, so
 * padded products are exact zeros.  Dilation is only strides: token t of a
 * run is row base + t * stride.
 *
 * fp16 and bf16 inputs, head dims 64 and 128, accumulation in fp32.  The tile
 * loads and warp products are shared with the backward (mma_tile.cuh).
 */
#include <limits.h>

#include "attend.cuh"
#include "mma_tile.cuh"

/* Online softmax step for the two rows a thread holds (h = 0: row g, h = 1:
 * row g + 8).  Scores become probabilities relative to the new running max;
 * the running sum (this thread's columns only) and output are rescaled.  A
 * row with nothing visible yet keeps max -inf and uses 0 as its base so that
 * no -inf - -inf appears. */
template <int D>
__device__ __forceinline__ void softmax_step(float s[MMA_BK / 8][4], float o[D / 8][4], float m[2],
                                             float l[2]) {
#pragma unroll
  for (int h = 0; h < 2; h++) {
    float mx = -INFINITY;
#pragma unroll
    for (int nb = 0; nb < MMA_BK / 8; nb++) mx = fmaxf(mx, fmaxf(s[nb][2 * h], s[nb][2 * h + 1]));
    /* the four threads of a group hold the row's 64 columns */
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(m[h], mx);
    const float base = m_new == -INFINITY ? 0.0f : m_new;
    const float alpha = exp2f(m[h] - base);
    float sum = 0.0f;
#pragma unroll
    for (int nb = 0; nb < MMA_BK / 8; nb++) {
      s[nb][2 * h] = exp2f(s[nb][2 * h] - base);
      s[nb][2 * h + 1] = exp2f(s[nb][2 * h + 1] - base);
      sum += s[nb][2 * h] + s[nb][2 * h + 1];
    }
    l[h] = l[h] * alpha + sum;
#pragma unroll
    for (int nb = 0; nb < D / 8; nb++) {
      o[nb][2 * h] *= alpha;
      o[nb][2 * h + 1] *= alpha;
    }
    m[h] = m_new;
  }
}

/* Normalise the two rows and merge them into acc / lse.  The four threads of
 * a group share a row: all read its lse before one of them writes it. */
template <int D>
__device__ __forceinline__ void merge_out(const attend_args &a, const ra_attend_task &t, int i_row0,
                                          int nq, const float o[D / 8][4], const float m[2],
                                          const float l[2], int lane) {
  const int g = lane >> 2, tq = lane & 3;
#pragma unroll
  for (int h = 0; h < 2; h++) {
    float sum = l[h];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const int i = i_row0 + g + 8 * h;
    const bool row_ok = i < nq;
    const float lp = row_lse(m[h] == -INFINITY ? 0.0f : m[h], sum), inv = 1.0f / sum;
    float *lse = a.lse + t.lse + (int64_t)i * a.lse_stride;
    const merge_rule w = merge_weights(row_ok ? *lse : -INFINITY, row_ok ? lp : -INFINITY);
    if (w.apply) {
      float *row = a.acc + t.acc + (int64_t)i * a.acc_stride;
#pragma unroll
      for (int nb = 0; nb < D / 8; nb++) {
        float2 *p = reinterpret_cast<float2 *>(row + nb * 8 + 2 * tq);
        const float2 cur = w.copy ? make_float2(0.0f, 0.0f) : *p;
        *p = make_float2(merged(w, cur.x, o[nb][2 * h] * inv), merged(w, cur.y, o[nb][2 * h + 1] * inv));
      }
    }
    __syncwarp();
    if (w.apply && tq == 0) *lse = w.lse;
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(MMA_THREADS) attend_mma_kernel(const attend_args a) {
  constexpr int ROW = D + MMA_PAD;
  extern __shared__ __align__(16) unsigned char smem[];
  T *sq = reinterpret_cast<T *>(smem); /* [MMA_BQ][ROW] */
  T *sk = sq + MMA_BQ * ROW;           /* [MMA_BK][ROW] */
  T *sv = sk + MMA_BK * ROW;           /* [MMA_BK][ROW] */

  const ra_attend_task t = a.tasks[blockIdx.x];
  const int i0 = (a.tile0 + (int)blockIdx.y) * MMA_BQ;
  if (i0 >= t.nq) return; /* this task has fewer query tiles */
  const int nq = (int)t.nq;
  /* keys after the tile's last query are invisible to all of it */
  const int nk = visible_key_count(t, (int64_t)min(i0 + MMA_BQ, nq) - 1, a.causal, a.rate);
  if (nk <= 0) return; /* nothing to merge: acc / lse stay as they are */
  const int64_t diff0 = t.qpos0 - t.kpos0;
  const T *q = static_cast<const T *>(a.q) + t.q;
  const T *k = static_cast<const T *>(a.k) + t.k;
  const T *v = static_cast<const T *>(a.v) + t.v;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, tq = lane & 3;

  load_tile_async<T, D>(sq, q + (int64_t)i0 * a.q_stride, a.q_stride, nq - i0, q);
  load_tile_async<T, D>(sk, k, a.k_stride, nk, k);
  cp_async_commit();

  uint32_t qf[D / 16][4]; /* this warp's 16 queries as A fragments */
  float o[D / 8][4];
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
#pragma unroll
  for (int nb = 0; nb < D / 8; nb++) o[nb][0] = o[nb][1] = o[nb][2] = o[nb][3] = 0.0f;

  for (int j0 = 0; j0 < nk; j0 += MMA_BK) {
    /* K tile j0 (and Q) landed; every warp is done with the previous V tile */
    cp_async_wait<0>();
    __syncthreads();
    if (j0 == 0) {
#pragma unroll
      for (int kk = 0; kk < D / 16; kk++)
        ldmatrix_x4(qf[kk], smem_addr(sq + (warp * 16 + (lane & 15)) * ROW + kk * 16 + (lane >> 4) * 8));
    }
    load_tile_async<T, D>(sv, v + (int64_t)j0 * a.v_stride, a.v_stride, nk - j0, v);
    cp_async_commit();

    float s[MMA_BK / 8][4];
    tile_scores<T, D>(s, qf, sk, lane);
    /* mask only tiles that hold keys past the run or, with causality, keys
     * after the block's first query */
    const bool partial = j0 + MMA_BK > nk ||
                         (a.causal && (int64_t)(j0 + MMA_BK - 1 - i0) * a.rate > diff0);
#pragma unroll
    for (int nb = 0; nb < MMA_BK / 8; nb++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        float x = s[nb][e] * a.scale_log2;
        if (partial) {
          const int j = j0 + nb * 8 + 2 * tq + (e & 1), i = i0 + warp * 16 + g + 8 * (e >> 1);
          if (!key_visible(j, i, nk, a.causal, diff0, a.rate)) x = -INFINITY;
        }
        s[nb][e] = x;
      }
    softmax_step<D>(s, o, m, l);

    __syncthreads(); /* every warp has read the K tile */
    if (j0 + MMA_BK < nk) {
      load_tile_async<T, D>(sk, k + (int64_t)(j0 + MMA_BK) * a.k_stride, a.k_stride,
                            nk - j0 - MMA_BK, k);
      cp_async_commit();
      cp_async_wait<1>(); /* groups complete in order: the V tile is in */
    } else {
      cp_async_wait<0>();
    }
    __syncthreads(); /* the V tile is visible to every warp */
    tile_accumulate<T, D>(o, s, sv, lane);
  }
  merge_out<D>(a, t, i0 + warp * 16, nq, o, m, l, lane);
}

template <typename T, int D>
static ra_status launch_mma(const attend_args &a, int ntasks, int64_t max_nq, cudaStream_t stream) {
  const int smem = (MMA_BQ + 2 * MMA_BK) * (D + MMA_PAD) * (int)sizeof(T);
  RA_CUDA_TRY(cudaFuncSetAttribute(attend_mma_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
              "attention kernel: shared memory");
  const int64_t tiles = (max_nq + MMA_BQ - 1) / MMA_BQ;
  for (int64_t y0 = 0; y0 < tiles; y0 += 65535) { /* gridDim.y is at most 65535 */
    attend_args b = a;
    b.tile0 = (int)y0;
    const dim3 grid((unsigned)ntasks, (unsigned)(tiles - y0 < 65535 ? tiles - y0 : 65535));
    attend_mma_kernel<T, D><<<grid, MMA_THREADS, smem, stream>>>(b);
    RA_CUDA_TRY(cudaGetLastError(), "attention kernel launch");
  }
  return RA_OK;
}

ra_status ra_cuda_attend_mma(const attend_args &a, ra_dtype dtype, int ntasks, int64_t max_nq,
                             cudaStream_t stream) {
  if (dtype == RA_FLOAT16)
    return a.head_dim == 64 ? launch_mma<__half, 64>(a, ntasks, max_nq, stream)
                            : launch_mma<__half, 128>(a, ntasks, max_nq, stream);
  return a.head_dim == 64 ? launch_mma<__nv_bfloat16, 64>(a, ntasks, max_nq, stream)
                          : launch_mma<__nv_bfloat16, 128>(a, ntasks, max_nq, stream);
}

/* ------------------------------------------------------------- dispatch */

ra_status ra_cuda_check_head_dim(int64_t head_dim) {
  if (head_dim < 1 || head_dim > RA_SIMT_MAX_DIM)
    return ra_fail(RA_ERR_UNSUPPORTED,
                   "head_dim=%lld: the CUDA backend supports head dims up to %d (tensor cores for 64 "
                   "and 128 with fp16/bf16)",
                   (long long)head_dim, RA_SIMT_MAX_DIM);
  return RA_OK;
}

/* cp.async moves 16-byte chunks: every row of q, k, v must start on one. */
static bool rows_aligned(const ra_attend_batch *b) {
  const int64_t e = 8; /* 16 bytes of a 2-byte type */
  if ((uintptr_t)b->q % 16 || (uintptr_t)b->k % 16 || (uintptr_t)b->v % 16) return false;
  if (b->q_stride % e || b->k_stride % e || b->v_stride % e) return false;
  if ((uintptr_t)b->acc % 8 || b->acc_stride % 2) return false; /* float2 stores */
  for (int64_t i = 0; i < b->ntasks; i++) {
    const ra_attend_task *t = &b->tasks[i];
    if (t->q % e || t->k % e || t->v % e || t->acc % 2) return false;
  }
  return true;
}

ra_status ra_cuda_attend(const ra_attend_batch *b, const ra_attend_task *dev_tasks, int allow_mma,
                         cudaStream_t stream) {
  RA_TRY(ra_cuda_check_head_dim(b->head_dim));
  if (b->ntasks > INT_MAX) return ra_fail(RA_ERR_UNSUPPORTED, "attention: %lld tasks in one step", (long long)b->ntasks);
  int64_t max_nq = 0;
  for (int64_t i = 0; i < b->ntasks; i++) {
    const ra_attend_task *t = &b->tasks[i];
    if (t->nq > max_nq) max_nq = t->nq;
    if (t->nq > INT_MAX / 2 || t->nk > INT_MAX / 2)
      return ra_fail(RA_ERR_UNSUPPORTED, "attention: a run of more than 2^30 tokens");
  }
  if (b->ntasks == 0 || max_nq == 0) return RA_OK;
  attend_args a;
  a.q = b->q;
  a.k = b->k;
  a.v = b->v;
  a.q_stride = b->q_stride;
  a.k_stride = b->k_stride;
  a.v_stride = b->v_stride;
  a.acc = b->acc;
  a.lse = b->lse;
  a.acc_stride = b->acc_stride;
  a.lse_stride = b->lse_stride;
  a.tasks = dev_tasks;
  a.rate = b->rate;
  a.scale_log2 = b->scale * RA_LOG2E;
  a.causal = b->causal;
  a.head_dim = (int)b->head_dim;
  a.tile0 = 0;
  const bool mma = allow_mma && b->dtype != RA_FLOAT32 && (b->head_dim == 64 || b->head_dim == 128) &&
                   rows_aligned(b);
  return mma ? ra_cuda_attend_mma(a, b->dtype, (int)b->ntasks, max_nq, stream)
             : ra_cuda_attend_simt(a, b->dtype, (int)b->ntasks, max_nq, stream);
}
