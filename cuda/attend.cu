/*
 * attend.cu -- fused flash-attention forward on tensor cores, and the choice
 * between it and the generic SIMT kernel (attend_simt.cu).
 *
 * One block of four warps takes MMA_BQ * MT queries of one task (16 * MT per
 * warp: MT = 2 once a run has more than 64 queries, else 1) and walks the
 * task's keys in tiles of MMA_BK = 64:
 *
 *   S = Q K^T        mma.m16n8k16, Q fragments in registers (MT * D <= 128)
 *                    or by ldmatrix from the Q tile, K by ldmatrix;
 *   online softmax   on the fp32 accumulators of S, in registers (base 2);
 *   O += P V         P re-packed from S's accumulators into A fragments
 *                    (no trip through shared memory), V by ldmatrix.trans.
 *
 * With MT = 2 every K and V fragment read from shared memory feeds two
 * m-tiles, halving shared-memory traffic per mma (as FlashAttention-2's
 * 128 x 64 tiles with four warps).  K and V are double-buffered: tiles
 * j + 1 are copied by cp.async during the whole step j, two barriers a step.
 * A warp skips the tiles none of its queries sees (causal diagonal, ragged
 * ends).  Rows past the end of a run are zero-filled (never left
 * uninitialised), and keys past it are masked, so padded products are exact
 * zeros.  Dilation is only strides: token t of a run is row base + t *
 * stride.
 *
 * fp16 and bf16 inputs, head dims 64 and 128, accumulation in fp32.  The
 * softmax helpers and the accumulator merge live here; the 64-row tile
 * constants come from mma_tile.cuh (shared with the backward).
 */
#include <limits.h>

#include "attend.cuh"
#include "mma_tile.cuh"

/* 2^x on the special function unit with subnormals flushed to zero (what
 * exp2f becomes under --use_fast_math): exp2f adds range fix-ups around the
 * instruction for subnormal results, which as probabilities or rescale
 * factors would weigh less than 2^-126 of the row's largest term.  NaN,
 * -inf (-> 0) and +inf behave as in exp2f. */
__device__ __forceinline__ float exp2_ftz(float x) {
#ifdef __CUDA_ARCH__
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);
#endif
}

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
    const float alpha = exp2_ftz(m[h] - base);
    float sum = 0.0f;
#pragma unroll
    for (int nb = 0; nb < MMA_BK / 8; nb++) {
      s[nb][2 * h] = exp2_ftz(s[nb][2 * h] - base);
      s[nb][2 * h + 1] = exp2_ftz(s[nb][2 * h + 1] - base);
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

/* Queue the copy of rows [0, ROWS) of a run (row r at src + r * stride, D
 * elements) into a shared tile of rows D + MMA_PAD long; rows >= `rows`
 * become zeros.  `safe` is any valid global address (not read) for the
 * zero-filled chunks.  Each thread copies one 16-byte column chunk of every
 * MMA_THREADS / (D / 8)-th row, so its addresses are a base plus constants. */
template <typename T, int D, int ROWS>
__device__ __forceinline__ void load_rows_async(T *tile, const T *src, int64_t stride, int rows,
                                                const T *safe) {
  constexpr int ROW = D + MMA_PAD, CHUNKS = D / 8, STEP = MMA_THREADS / CHUNKS;
  static_assert(ROWS % STEP == 0, "rows per tile");
  const int r0 = (int)threadIdx.x / CHUNKS, col = ((int)threadIdx.x % CHUNKS) * 8;
  const uint32_t dst = smem_addr(tile + r0 * ROW + col);
  const int64_t step = STEP * stride;
  const T *p = src + r0 * stride + col; /* chained adds: no row offsets to keep */
#pragma unroll
  for (int r = 0; r < ROWS; r += STEP, p += step) {
    const bool ok = r0 + r < rows;
    cp_async_16(dst + (uint32_t)(r * ROW * (int)sizeof(T)), ok ? p : safe, ok ? 16 : 0);
  }
}

/* s[mt] = the warp's m-tile mt (16 queries) . the MMA_BK keys of the tile
 * at sk.  The A fragments come from registers (QREG: qf[mt][kk]) or by
 * ldmatrix from the warp's rows of the Q tile at sqw; every B fragment of K
 * serves all MT m-tiles. */
template <typename T, int D, int MT, bool QREG, int QM, int QK>
__device__ __forceinline__ void warp_scores(float (&s)[MT][MMA_BK / 8][4], const uint32_t (&qf)[QM][QK][4],
                                            const T *sqw, const T *sk, int lane) {
  constexpr int ROW = D + MMA_PAD;
  const int mi = lane >> 3, r = lane & 7;
#pragma unroll
  for (int mt = 0; mt < MT; mt++)
#pragma unroll
    for (int nb = 0; nb < MMA_BK / 8; nb++) s[mt][nb][0] = s[mt][nb][1] = s[mt][nb][2] = s[mt][nb][3] = 0.0f;
#pragma unroll
  for (int kk = 0; kk < D / 16; kk++) {
    uint32_t af[MT][4];
    if constexpr (QREG) {
#pragma unroll
      for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int x = 0; x < 4; x++) af[mt][x] = qf[mt][kk][x];
    } else {
#pragma unroll
      for (int mt = 0; mt < MT; mt++)
        ldmatrix_x4(af[mt], smem_addr(sqw + (mt * 16 + (lane & 15)) * ROW + kk * 16 + (lane >> 4) * 8));
    }
#pragma unroll
    for (int np = 0; np < MMA_BK / 16; np++) {
      uint32_t b[4];
      ldmatrix_x4(b, smem_addr(sk + (np * 16 + (mi >> 1) * 8 + r) * ROW + kk * 16 + (mi & 1) * 8));
#pragma unroll
      for (int mt = 0; mt < MT; mt++) {
        mma_16816<T>(s[mt][2 * np], af[mt], b[0], b[1]);
        mma_16816<T>(s[mt][2 * np + 1], af[mt], b[2], b[3]);
      }
    }
  }
}

/* o[mt] += P[mt] V for the MMA_BK rows of the V tile at sv, as
 * tile_accumulate (mma_tile.cuh) with every B fragment of V serving all MT
 * m-tiles. */
template <typename T, int D, int MT>
__device__ __forceinline__ void warp_accumulate(float (&o)[MT][D / 8][4], const float (&p)[MT][MMA_BK / 8][4],
                                                const T *sv, int lane) {
  constexpr int ROW = D + MMA_PAD;
  const int mi = lane >> 3, r = lane & 7;
#pragma unroll
  for (int kk = 0; kk < MMA_BK / 16; kk++) {
    uint32_t pa[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
      pa[mt][0] = pack2<T>(p[mt][2 * kk][0], p[mt][2 * kk][1]);
      pa[mt][1] = pack2<T>(p[mt][2 * kk][2], p[mt][2 * kk][3]);
      pa[mt][2] = pack2<T>(p[mt][2 * kk + 1][0], p[mt][2 * kk + 1][1]);
      pa[mt][3] = pack2<T>(p[mt][2 * kk + 1][2], p[mt][2 * kk + 1][3]);
    }
#pragma unroll
    for (int np = 0; np < D / 16; np++) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, smem_addr(sv + (kk * 16 + (mi & 1) * 8 + r) * ROW + np * 16 + (mi >> 1) * 8));
#pragma unroll
      for (int mt = 0; mt < MT; mt++) {
        mma_16816<T>(o[mt][2 * np], pa[mt], b[0], b[1]);
        mma_16816<T>(o[mt][2 * np + 1], pa[mt], b[2], b[3]);
      }
    }
  }
}

/* Shared memory of the kernel: the Q tile, then two buffers each of K and V. */
template <typename T, int D, int MT>
__host__ __device__ constexpr int attend_smem_bytes() {
  return (MMA_WARPS * 16 * MT + 4 * MMA_BK) * (D + MMA_PAD) * (int)sizeof(T);
}

/* MT m-tiles of 16 queries per warp: MMA_BQ * MT queries per block.  Grid:
 * y = task (task0 + y), x = query tile, the last first (a.tile0 + gridDim.x -
 * 1 - x): the blocks of one task run side by side and share its K and V in
 * L2, and with causality the longest tiles start first. */
template <typename T, int D, int MT>
__global__ void __launch_bounds__(MMA_THREADS) attend_mma_kernel(const attend_args a, int task0) {
  constexpr int ROW = D + MMA_PAD, BQ = MMA_BQ * MT, WQ = 16 * MT, TILE = MMA_BK * ROW;
  /* the warp's Q fragments stay in registers when they take at most 32 */
  constexpr bool QREG = MT * D <= 128;
  extern __shared__ __align__(16) unsigned char smem[];
  T *sq = reinterpret_cast<T *>(smem); /* [BQ][ROW]            */
  T *sk = sq + BQ * ROW;               /* [2][MMA_BK][ROW]      */
  T *sv = sk + 2 * TILE;               /* [2][MMA_BK][ROW]      */

  const ra_attend_task t = a.tasks[task0 + (int)blockIdx.y];
  const int i0 = (a.tile0 + (int)(gridDim.x - 1 - blockIdx.x)) * BQ;
  if (i0 >= t.nq) return; /* this task has fewer query tiles */
  const int nq = (int)t.nq;
  /* keys after the tile's last query are invisible to all of it */
  const int nk = visible_key_count(t, (int64_t)min(i0 + BQ, nq) - 1, a.causal, a.rate);
  if (nk <= 0) return; /* nothing to merge: acc / lse stay as they are */
  const int64_t diff0 = t.qpos0 - t.kpos0;
  const T *q = static_cast<const T *>(a.q) + t.q;
  const T *k = static_cast<const T *>(a.k) + t.k;
  const T *v = static_cast<const T *>(a.v) + t.v;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, tq = lane & 3;
  /* the warp's first query, and the keys its queries see (none past the run) */
  const int iw = i0 + warp * WQ;
  const int nkw = iw < nq ? visible_key_count(t, (int64_t)min(iw + WQ, nq) - 1, a.causal, a.rate) : 0;

  /* groups in flight, oldest first: Q + K 0, V 0; then each step adds the
   * next K and V tiles (empty groups past the end keep the count) */
  load_rows_async<T, D, BQ>(sq, q + (int64_t)i0 * a.q_stride, a.q_stride, nq - i0, q);
  load_rows_async<T, D, MMA_BK>(sk, k, a.k_stride, nk, k);
  cp_async_commit();
  load_rows_async<T, D, MMA_BK>(sv, v, a.v_stride, nk, v);
  cp_async_commit();

  uint32_t qf[QREG ? MT : 1][QREG ? D / 16 : 1][4]; /* A fragments, QREG only */
  float o[MT][D / 8][4], m[MT][2], l[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; mt++) {
    m[mt][0] = m[mt][1] = -INFINITY;
    l[mt][0] = l[mt][1] = 0.0f;
#pragma unroll
    for (int nb = 0; nb < D / 8; nb++) o[mt][nb][0] = o[mt][nb][1] = o[mt][nb][2] = o[mt][nb][3] = 0.0f;
  }
  const T *sqw = sq + warp * WQ * ROW;

  int buf = 0;
  for (int j0 = 0; j0 < nk; j0 += MMA_BK, buf ^= 1) {
    /* K tile j0 (and Q) landed; every warp is done with step j0 - 1, whose
     * buffers now take tiles j0 + MMA_BK while this step runs */
    cp_async_wait<1>();
    __syncthreads();
    const int jn = j0 + MMA_BK;
    if (jn < nk)
      load_rows_async<T, D, MMA_BK>(sk + (buf ^ 1) * TILE, k + (int64_t)jn * a.k_stride, a.k_stride,
                                    nk - jn, k);
    cp_async_commit();
    if (jn < nk)
      load_rows_async<T, D, MMA_BK>(sv + (buf ^ 1) * TILE, v + (int64_t)jn * a.v_stride, a.v_stride,
                                    nk - jn, v);
    cp_async_commit();
    if constexpr (QREG) {
      if (j0 == 0) {
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
          for (int kk = 0; kk < D / 16; kk++)
            ldmatrix_x4(qf[mt][kk], smem_addr(sqw + (mt * 16 + (lane & 15)) * ROW + kk * 16 + (lane >> 4) * 8));
      }
    }

    /* a warp none of whose queries sees a key of the tile skips it: its
     * scores would all be -inf, which changes nothing */
    const bool active = j0 < nkw;
    float s[MT][MMA_BK / 8][4];
    if (active) {
      warp_scores<T, D, MT, QREG>(s, qf, sqw, sk + buf * TILE, lane);
#pragma unroll
      for (int mt = 0; mt < MT; mt++) {
        /* mask only tiles that hold keys past the run or, with causality,
         * keys after the m-tile's first query */
        const int im = iw + 16 * mt;
        const bool partial =
            jn > nk || (a.causal && (int64_t)(jn - 1 - im) * a.rate > diff0);
#pragma unroll
        for (int nb = 0; nb < MMA_BK / 8; nb++)
#pragma unroll
          for (int e = 0; e < 4; e++) {
            float x = s[mt][nb][e] * a.scale_log2;
            if (partial) {
              const int j = j0 + nb * 8 + 2 * tq + (e & 1), i = im + g + 8 * (e >> 1);
              if (!key_visible(j, i, nk, a.causal, diff0, a.rate)) x = -INFINITY;
            }
            s[mt][nb][e] = x;
          }
        softmax_step<D>(s[mt], o[mt], m[mt], l[mt]);
      }
    }

    cp_async_wait<2>(); /* groups complete in order: the V tile is in */
    __syncthreads();    /* and visible to every warp */
    if (active) warp_accumulate<T, D, MT>(o, s, sv + buf * TILE, lane);
  }
#pragma unroll
  for (int mt = 0; mt < MT; mt++)
    merge_out<D>(a, a.tasks[task0 + (int)blockIdx.y], iw + 16 * mt, nq, o[mt], m[mt], l[mt], lane);
}

template <typename T, int D, int MT>
static ra_status launch_mma(const attend_args &a, int ntasks, int64_t max_nq, cudaStream_t stream) {
  constexpr int BQ = MMA_BQ * MT;
  const int smem = attend_smem_bytes<T, D, MT>();
  RA_CUDA_TRY(cudaFuncSetAttribute(attend_mma_kernel<T, D, MT>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
              "attention kernel: shared memory");
  const int64_t tiles = (max_nq + BQ - 1) / BQ; /* at most 2^24: runs have at most 2^30 tokens */
  attend_args b = a;
  b.tile0 = 0;
  for (int task0 = 0; task0 < ntasks; task0 += 65535) { /* gridDim.y is at most 65535 */
    const dim3 grid((unsigned)tiles, (unsigned)(ntasks - task0 < 65535 ? ntasks - task0 : 65535));
    attend_mma_kernel<T, D, MT><<<grid, MMA_THREADS, smem, stream>>>(b, task0);
    RA_CUDA_TRY(cudaGetLastError(), "attention kernel launch");
  }
  return RA_OK;
}

/* 32 queries per warp (128 per block) share every K and V fragment loaded
 * from shared memory between two m-tiles; runs of at most 64 queries keep
 * 16 per warp so that no warp idles. */
template <typename T, int D>
static ra_status launch_mma_rows(const attend_args &a, int ntasks, int64_t max_nq, cudaStream_t stream) {
  return max_nq > MMA_BQ ? launch_mma<T, D, 2>(a, ntasks, max_nq, stream)
                         : launch_mma<T, D, 1>(a, ntasks, max_nq, stream);
}

ra_status ra_cuda_attend_mma(const attend_args &a, ra_dtype dtype, int ntasks, int64_t max_nq,
                             cudaStream_t stream) {
  if (dtype == RA_FLOAT16)
    return a.head_dim == 64 ? launch_mma_rows<__half, 64>(a, ntasks, max_nq, stream)
                            : launch_mma_rows<__half, 128>(a, ntasks, max_nq, stream);
  return a.head_dim == 64 ? launch_mma_rows<__nv_bfloat16, 64>(a, ntasks, max_nq, stream)
                          : launch_mma_rows<__nv_bfloat16, 128>(a, ntasks, max_nq, stream);
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
