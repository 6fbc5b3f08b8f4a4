/*
 * backward.cu -- flash-attention backward on tensor cores (FlashAttention-2
 * style), and the choice between it and the generic SIMT kernels
 * (backward_simt.cu).  Semantics: backward.cuh.
 *
 * Two ways, chosen per call by ra_cuda_attend_backward:
 *   fused (default)  one kernel per step: blocks own keys, stream the
 *                    queries and add dQ with fp32 atomics (5 products per
 *                    pair of tiles: S, dP, dV, dK, dQ).  Fast, but the
 *                    order of the atomic additions into a dQ row varies from
 *                    run to run, so dQ may differ in its last bits.
 *   two passes       the call's exec.deterministic (whose default is
 *                    RINGATTN_DETERMINISTIC=1, csrc/core/settings.c): a dK/dV
 *                    kernel and a dQ kernel that each own their rows and add
 *                    in a fixed order -- bitwise reproducible, at the cost of
 *                    recomputing S and dP in the dQ kernel (7 products).
 *
 * All kernels recompute the probabilities from the rows' final lse in base
 * 2, as the forward computes them: P = exp2(s * scale_log2 - lse * log2 e),
 * with lse = -inf (a row that saw no key) turned into +inf so that its P is
 * exactly 0.  16 rows of the block's own run per warp, tiles of 64 rows of
 * the other run streamed through shared memory by cp.async, double-buffered
 * (the next tile is in flight while this one is used).  Rows past the end
 * of a run are zero-filled; keys past it and pairs hidden by causality are
 * masked to P = 0 (only in tiles that hold any).
 *
 * dK/dV kernel (KW warps, KW * 16 keys per block; the fused kernel has
 * KW = BWD_KW = 8, the two-pass one KW = 4): per tile of 64 queries each
 * warp computes, its 16 keys as rows,
 *   S^T = K Q^T, dP^T = V dO^T      (tile_scores: Q, dO rows are B)
 *   P^T, dS^T = P^T (dP^T - delta)  (accumulator layout, keys as rows)
 *   dV += P^T dO, dK += dS^T Q      (tile_accumulate: P^T, dS^T re-packed
 *                                    as A fragments, dO, Q by ldmatrix.trans)
 * and, fused, stores dS^T (16-bit, as the dK product rounds it) in shared
 * memory; after the barrier that ends the tile each warp takes 16 queries
 * (by D / (KW / 4) columns) of dQ += dS K over all the block's keys (A = dS
 * by ldmatrix.trans of dS^T, B = the block's K), BWD_DQC columns at a
 * time, and adds them with red.global.add(.v2).f32.  The next tile's
 * barrier orders the next writes of dS^T after these reads: no extra
 * barrier per tile.  The grid runs the key blocks of a task back to back
 * (launch_tiles), so the dQ rows being added to stay in L2.
 * dQ kernel (two passes only): a block owns 64 queries; per tile of 64 keys
 *   S = Q K^T, dP = dO V^T, dS = P (dP - delta), dQ += dS K.
 *
 * Registers: a warp keeps fp32 accumulators for 16 rows by D (dK and dV: 2 x
 * D/2 floats per thread); the fused dQ adds BWD_DQC (32) columns at a time.
 * With D = 64 the fixed operands (K, V or Q, dO) stay in registers as A
 * fragments; with D = 128 they are read from shared memory a k-step at a
 * time and the dK/dV kernel takes its query tile in halves of 32, which
 * keeps the kernels free of spills.
 *
 * fp16 and bf16 inputs, head dims 64 and 128, fp32 accumulation; dK and dQ
 * get the factor `scale` when added (+=) to the caller's fp32 rows.
 */
#include <limits.h>

#include "backward.cuh"
#include "mma_tile.cuh"

#define BWD_T 64 /* rows per tile, either run: MMA_BQ == MMA_BK == 64 */
#ifndef BWD_KW
#define BWD_KW 8 /* the fused kernel's warps: KW * 16 keys per block */
#endif

/* The dK/dV kernel's queries per sub-tile (a tile of 64 taken in 64 / QS steps). */
template <int D>
constexpr int bwd_qs() { return D <= 64 ? 64 : 32; }

template <int D>
__host__ __device__ constexpr int bwd_tile_elems() { return BWD_T * (D + MMA_PAD); }
/* Shared memory of the dQ kernel: six tiles (the block's own two, two
 * buffers of the streamed two). */
template <typename T, int D>
constexpr int bwd_dq_smem_bytes() { return 6 * bwd_tile_elems<D>() * (int)sizeof(T); }

/* lse * log2 e and delta of query i of a run, as the kernels use them: a row
 * past the run or with lse -inf gets +inf and 0 (P and dS exactly 0). */
__device__ __forceinline__ void query_stats(const float *lse, const float *delta, int64_t stride, int i,
                                            int nq, float &l2, float &dl) {
  const float l = i < nq ? lse[(int64_t)i * stride] : -INFINITY;
  l2 = l == -INFINITY ? INFINITY : l * RA_LOG2E;
  dl = l == -INFINITY ? 0.0f : delta[(int64_t)i * stride];
}

/* ---------------------------------------------------------------- dK, dV */

/* Copy rows [0, R) of a run (row r at src + r * stride, D elements) into a
 * shared tile of rows D + MMA_PAD long with NT threads; rows >= `rows`
 * become zeros.  (load_tile_async with any row count and block size.) */
template <typename T, int D, int R, int NT>
__device__ __forceinline__ void bwd_load_async(T *tile, const T *src, int64_t stride, int rows, const T *safe) {
  constexpr int ROW = D + MMA_PAD, CHUNKS = D / 8; /* 16-byte chunks per row */
#pragma unroll 4
  for (int c = threadIdx.x; c < R * CHUNKS; c += NT) {
    const int r = c / CHUNKS, ch = c % CHUNKS;
    const bool ok = r < rows;
    cp_async_16(smem_addr(tile + r * ROW + ch * 8), ok ? src + r * stride + ch * 8 : safe, ok ? 16 : 0);
  }
}

/* dQ rows += this thread's columns 2t, 2t+1 of an n-block: x0, x1 at pa
 * (row g), x2, x3 at pb (row g + 8); rows past the run (!oka, !okb) are
 * left alone.  vec 2: one 8-byte vector reduction per row, which needs sm_90
 * and rows the caller proved 8-byte aligned; else scalar ones.  (16-byte
 * ones, after pairing the threads by a shuffle, measured no faster on an
 * H100: the cost seems to be the bytes reduced in L2, not the count.) */
__device__ __forceinline__ void bwd_red_add(float *pa, float *pb, const float x[4], bool oka, bool okb, int vec) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
  if (vec == 2) {
    if (oka) atomicAdd(reinterpret_cast<float2 *>(pa), make_float2(x[0], x[1]));
    if (okb) atomicAdd(reinterpret_cast<float2 *>(pb), make_float2(x[2], x[3]));
    return;
  }
#endif
  if (oka) {
    atomicAdd(pa, x[0]);
    atomicAdd(pa + 1, x[1]);
  }
  if (okb) {
    atomicAdd(pb, x[2]);
    atomicAdd(pb + 1, x[3]);
  }
}

/* Shared memory of the dK/dV kernel: its keys and values (KW * 16 rows
 * each), two buffers of query tiles and their dO, two buffers of per-query
 * lse * log2 e and delta, and with FUSE the tile's dS^T (keys x queries). */
#define BWD_SROW (BWD_T + MMA_PAD) /* elements per row of dS^T */
#ifndef BWD_DQC
#define BWD_DQC 32 /* most dQ columns a warp accumulates at a time */
#endif
template <typename T, int D, int KW, bool FUSE>
constexpr int bwd_dkdv_smem_bytes() {
  return (2 * KW * 16 + 4 * BWD_T) * (D + MMA_PAD) * (int)sizeof(T) + 4 * BWD_T * (int)sizeof(float) +
         (FUSE ? KW * 16 * BWD_SROW * (int)sizeof(T) : 0);
}

/* QS: queries per sub-tile (a tile of 64 taken in 64 / QS steps).  KW warps
 * own KW * 16 keys.  FUSE: also add dQ += scale * dS K by atomics. */
template <typename T, int D, int QS, int KW, bool FUSE>
__global__ void __launch_bounds__(KW * 32) bwd_dkdv_mma_kernel(const backward_args b, int task0, int vec) {
  constexpr int NT = KW * 32, BK = KW * 16; /* threads; keys of the block */
  constexpr int ROW = D + MMA_PAD, TILE = bwd_tile_elems<D>(), SROW = BWD_SROW;
  constexpr bool KV_REGS = D <= 64; /* K, V fragments kept in registers */
  extern __shared__ __align__(16) unsigned char smem[];
  T *sk = reinterpret_cast<T *>(smem);            /* [BK][ROW] keys of the block */
  T *sv = sk + BK * ROW;                           /* [BK][ROW] their values      */
  T *sq = sv + BK * ROW;                           /* [2][64][ROW] query tiles    */
  T *sdo = sq + 2 * TILE;                          /* [2][64][ROW] their dO       */
  T *sds = sdo + 2 * TILE;                         /* [BK][SROW] dS^T (FUSE)      */
  float *slse = reinterpret_cast<float *>(sds + (FUSE ? BK * SROW : 0)); /* [2][64] lse * log2 e */
  float *sdl = slse + 2 * BWD_T;                   /* [2][64] delta               */

  const attend_args &a = b.a;
  const ra_attend_task t = a.tasks[task0 + (int)blockIdx.y];
  const int j0 = (int)blockIdx.x * BK;
  if (j0 >= t.nk) return; /* this task has fewer key tiles */
  const int nk = (int)t.nk, nq = (int)t.nq;
  const int64_t diff0 = t.qpos0 - t.kpos0;
  /* queries before the first one that sees key j0 see none of the block:
   * query i sees key j when (j - i) * rate <= diff0 */
  int i_begin = 0;
  if (a.causal) {
    const int64_t need = (int64_t)j0 * a.rate - diff0; /* i * rate >= need */
    if (need > 0) {
      const int64_t first = (need + a.rate - 1) / a.rate;
      i_begin = first < nq ? (int)first : nq;
    }
  }
  if (i_begin >= nq) return; /* nothing to add */

  const T *q = static_cast<const T *>(a.q) + t.q;
  const T *k = static_cast<const T *>(a.k) + t.k;
  const T *v = static_cast<const T *>(a.v) + t.v;
  const T *dout = static_cast<const T *>(b.dout) + t.dout;
  const float *lse = a.lse + t.lse, *delta = b.delta + t.delta;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, tq = lane & 3;

  /* Queries i0 .. i0+63 (Q, dO, stats) into buffer `buf`. */
  auto load_queries = [&](int buf, int i0) {
    bwd_load_async<T, D, BWD_T, NT>(sq + buf * TILE, q + (int64_t)i0 * a.q_stride, a.q_stride, nq - i0, q);
    bwd_load_async<T, D, BWD_T, NT>(sdo + buf * TILE, dout + (int64_t)i0 * b.dout_stride, b.dout_stride,
                                    nq - i0, dout);
    if (threadIdx.x < BWD_T)
      query_stats(lse, delta, a.lse_stride, i0 + (int)threadIdx.x, nq, slse[buf * BWD_T + threadIdx.x],
                  sdl[buf * BWD_T + threadIdx.x]);
  };

  bwd_load_async<T, D, BK, NT>(sk, k + (int64_t)j0 * a.k_stride, a.k_stride, nk - j0, k);
  bwd_load_async<T, D, BK, NT>(sv, v + (int64_t)j0 * a.v_stride, a.v_stride, nk - j0, v);
  load_queries(0, i_begin);
  cp_async_commit();

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int nb = 0; nb < D / 8; nb++)
#pragma unroll
    for (int e = 0; e < 4; e++) dk[nb][e] = dv[nb][e] = 0.0f;
  uint32_t kf[KV_REGS ? D / 16 : 1][4], vf[KV_REGS ? D / 16 : 1][4];
  const T *wk = sk + warp * 16 * ROW, *wv = sv + warp * 16 * ROW; /* this warp's 16 keys */

  int buf = 0;
  for (int i0 = i_begin; i0 < nq; i0 += BWD_T, buf ^= 1) {
    if (i0 + BWD_T < nq) {
      load_queries(buf ^ 1, i0 + BWD_T); /* that buffer was released at the end of the last step */
      cp_async_commit();
      cp_async_wait<1>(); /* groups complete in order: this tile (and K, V) is in */
    } else {
      cp_async_wait<0>();
    }
    __syncthreads(); /* the tile and its stats are visible to every warp (and,
                        with FUSE, every warp is done reading the last dS^T) */
    if constexpr (KV_REGS) {
      if (i0 == i_begin) {
        load_a_frags<T, D>(kf, wk, lane);
        load_a_frags<T, D>(vf, wv, lane);
      }
    }
    const T *tile_q = sq + buf * TILE, *tile_do = sdo + buf * TILE;
    const float *l2 = slse + buf * BWD_T, *dl = sdl + buf * BWD_T;
    /* mask only tiles with keys past the run, queries past it, or pairs with
     * a key after the query (the largest j - i is j0 + BK - 1 - i0) */
    const bool partial = j0 + BK > nk || i0 + BWD_T > nq ||
                         (a.causal && (int64_t)(j0 + BK - 1 - i0) * a.rate > diff0);
#pragma unroll
    for (int s0 = 0; s0 < BWD_T; s0 += QS) {
      float s[QS / 8][4], dp[QS / 8][4]; /* S^T, dP^T: keys g, g+8; queries 2t, 2t+1 */
      if constexpr (KV_REGS) {
        tile_scores<T, D, QS>(s, kf, tile_q + s0 * ROW, lane);
        tile_scores<T, D, QS>(dp, vf, tile_do + s0 * ROW, lane);
      } else {
        tile_scores_smem<T, D, QS>(s, wk, tile_q + s0 * ROW, lane);
        tile_scores_smem<T, D, QS>(dp, wv, tile_do + s0 * ROW, lane);
      }
#pragma unroll
      for (int nb = 0; nb < QS / 8; nb++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
          const int il = s0 + nb * 8 + 2 * tq + (e & 1); /* query in the tile */
          float p = exp2f(fmaf(s[nb][e], a.scale_log2, -l2[il]));
          if (partial) {
            const int j = j0 + warp * 16 + g + 8 * (e >> 1), i = i0 + il;
            if (i >= nq || !key_visible(j, i, nk, a.causal, diff0, a.rate)) p = 0.0f;
          }
          s[nb][e] = p;
          dp[nb][e] = p * (dp[nb][e] - dl[il]);
        }
      if constexpr (FUSE) { /* dS^T of the warp's keys g, g + 8 and queries 2t, 2t+1 */
        T *w = sds + (warp * 16 + g) * SROW + s0 + 2 * tq;
#pragma unroll
        for (int nb = 0; nb < QS / 8; nb++) {
          *reinterpret_cast<uint32_t *>(w + nb * 8) = pack2<T>(dp[nb][0], dp[nb][1]);
          *reinterpret_cast<uint32_t *>(w + 8 * SROW + nb * 8) = pack2<T>(dp[nb][2], dp[nb][3]);
        }
      }
      tile_accumulate<T, D, QS>(dv, s, tile_do + s0 * ROW, lane);  /* dV += P^T dO  */
      tile_accumulate<T, D, QS>(dk, dp, tile_q + s0 * ROW, lane); /* dK += dS^T Q  */
    }
    __syncthreads(); /* every warp is done with buffer `buf` before it is
                        refilled (and, with FUSE, dS^T is complete) */
    if constexpr (FUSE) {
      /* dQ += scale * dS K for the tile's 64 queries: warp w takes the 16
       * queries of m-block w % 4 and the columns of group w / 4, DC at a
       * time.  A = dS (queries x keys) by ldmatrix.trans of dS^T (matrices
       * 0-3: queries +0 / +8 at keys +0, then at keys +8); B = K by
       * ldmatrix.trans as V in tile_accumulate. */
      constexpr int NCG = KW / 4, DW = D / NCG, DC = DW < BWD_DQC ? DW : BWD_DQC;
      const int mb = warp & 3, mi = lane >> 3, r = lane & 7;
      const int ia = i0 + mb * 16 + g, ib = ia + 8; /* this thread's rows */
      float *ra = a.acc + t.acc + (int64_t)ia * a.acc_stride + 2 * tq;
      float *rb = ra + 8 * a.acc_stride;
#pragma unroll
      for (int c0 = (warp >> 2) * DW; c0 < (warp >> 2) * DW + DW; c0 += DC) {
        float o[DC / 8][4];
#pragma unroll
        for (int nb = 0; nb < DC / 8; nb++) o[nb][0] = o[nb][1] = o[nb][2] = o[nb][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < BK / 16; kk++) {
          uint32_t af[4];
          ldmatrix_x4_trans(af, smem_addr(sds + (kk * 16 + (mi >> 1) * 8 + r) * SROW + mb * 16 + (mi & 1) * 8));
#pragma unroll
          for (int np = 0; np < DC / 16; np++) {
            uint32_t bf[4];
            ldmatrix_x4_trans(bf, smem_addr(sk + (kk * 16 + (mi & 1) * 8 + r) * ROW + c0 + np * 16 + (mi >> 1) * 8));
            mma_16816<T>(o[2 * np], af, bf[0], bf[1]);
            mma_16816<T>(o[2 * np + 1], af, bf[2], bf[3]);
          }
        }
#pragma unroll
        for (int nb = 0; nb < DC / 8; nb++) {
          const float x[4] = {b.scale * o[nb][0], b.scale * o[nb][1], b.scale * o[nb][2], b.scale * o[nb][3]};
          bwd_red_add(ra + c0 + nb * 8, rb + c0 + nb * 8, x, ia < nq, ib < nq, vec);
        }
      }
    }
  }

  /* add into the caller's rows: keys g and g + 8 of the warp, columns 2t, 2t+1 */
#pragma unroll
  for (int h = 0; h < 2; h++) {
    const int j = j0 + warp * 16 + g + 8 * h;
    if (j >= nk) continue;
    float *rk = b.dk + t.dkv + (int64_t)j * b.dkv_stride, *rv = b.dv + t.dkv + (int64_t)j * b.dkv_stride;
#pragma unroll
    for (int nb = 0; nb < D / 8; nb++) {
      const int c = nb * 8 + 2 * tq;
      rk[c] += b.scale * dk[nb][2 * h];
      rk[c + 1] += b.scale * dk[nb][2 * h + 1];
      rv[c] += dv[nb][2 * h];
      rv[c + 1] += dv[nb][2 * h + 1];
    }
  }
}

/* -------------------------------------------------------------------- dQ */

template <typename T, int D>
__global__ void __launch_bounds__(MMA_THREADS) bwd_dq_mma_kernel(const backward_args b, int task0, int) {
  constexpr int ROW = D + MMA_PAD, TILE = bwd_tile_elems<D>();
  constexpr bool QD_REGS = D <= 64; /* Q, dO fragments kept in registers */
  extern __shared__ __align__(16) unsigned char smem[];
  T *sq = reinterpret_cast<T *>(smem); /* [64][ROW] queries of the block */
  T *sdo = sq + TILE;                   /* [64][ROW] their dO            */
  T *sk = sdo + TILE;                   /* [2][64][ROW] key tiles        */
  T *sv = sk + 2 * TILE;                /* [2][64][ROW] their values     */

  const attend_args &a = b.a;
  const ra_attend_task t = a.tasks[task0 + (int)blockIdx.y];
  const int i0 = (int)blockIdx.x * BWD_T;
  if (i0 >= t.nq) return; /* this task has fewer query tiles */
  const int nq = (int)t.nq;
  /* keys after the tile's last query are invisible to all of it */
  const int nk = visible_key_count(t, (int64_t)min(i0 + BWD_T, nq) - 1, a.causal, a.rate);
  if (nk <= 0) return; /* nothing to add */
  const int64_t diff0 = t.qpos0 - t.kpos0;
  const T *q = static_cast<const T *>(a.q) + t.q;
  const T *k = static_cast<const T *>(a.k) + t.k;
  const T *v = static_cast<const T *>(a.v) + t.v;
  const T *dout = static_cast<const T *>(b.dout) + t.dout;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, tq = lane & 3;

  /* Keys j0 .. j0+63 (K, V) into buffer `buf`. */
  auto load_keys = [&](int buf, int j0) {
    load_tile_async<T, D>(sk + buf * TILE, k + (int64_t)j0 * a.k_stride, a.k_stride, nk - j0, k);
    load_tile_async<T, D>(sv + buf * TILE, v + (int64_t)j0 * a.v_stride, a.v_stride, nk - j0, v);
  };

  load_tile_async<T, D>(sq, q + (int64_t)i0 * a.q_stride, a.q_stride, nq - i0, q);
  load_tile_async<T, D>(sdo, dout + (int64_t)i0 * b.dout_stride, b.dout_stride, nq - i0, dout);
  load_keys(0, 0);
  cp_async_commit();

  /* the stats of this thread's rows g, g + 8 */
  float l2[2], dl[2];
#pragma unroll
  for (int h = 0; h < 2; h++)
    query_stats(a.lse + t.lse, b.delta + t.delta, a.lse_stride, i0 + warp * 16 + g + 8 * h, nq, l2[h], dl[h]);

  float dq[D / 8][4];
#pragma unroll
  for (int nb = 0; nb < D / 8; nb++) dq[nb][0] = dq[nb][1] = dq[nb][2] = dq[nb][3] = 0.0f;
  uint32_t qf[QD_REGS ? D / 16 : 1][4], df[QD_REGS ? D / 16 : 1][4];
  const T *wq = sq + warp * 16 * ROW, *wdo = sdo + warp * 16 * ROW; /* this warp's 16 queries */

  int buf = 0;
  for (int j0 = 0; j0 < nk; j0 += BWD_T, buf ^= 1) {
    if (j0 + BWD_T < nk) {
      load_keys(buf ^ 1, j0 + BWD_T); /* that buffer was released at the end of the last step */
      cp_async_commit();
      cp_async_wait<1>(); /* groups complete in order: this tile (and Q, dO) is in */
    } else {
      cp_async_wait<0>();
    }
    __syncthreads(); /* the tile is visible to every warp */
    if constexpr (QD_REGS) {
      if (j0 == 0) {
        load_a_frags<T, D>(qf, wq, lane);
        load_a_frags<T, D>(df, wdo, lane);
      }
    }
    const T *tk = sk + buf * TILE, *tv = sv + buf * TILE;
    float s[BWD_T / 8][4], dp[BWD_T / 8][4]; /* S, dP: queries g, g+8; keys 2t, 2t+1 */
    if constexpr (QD_REGS) {
      tile_scores<T, D, BWD_T>(s, qf, tk, lane);
      tile_scores<T, D, BWD_T>(dp, df, tv, lane);
    } else {
      tile_scores_smem<T, D, BWD_T>(s, wq, tk, lane);
      tile_scores_smem<T, D, BWD_T>(dp, wdo, tv, lane);
    }
    /* mask only tiles that hold keys past the run or, with causality, keys
     * after the block's first query */
    const bool partial = j0 + BWD_T > nk ||
                         (a.causal && (int64_t)(j0 + BWD_T - 1 - i0) * a.rate > diff0);
#pragma unroll
    for (int nb = 0; nb < BWD_T / 8; nb++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int h = e >> 1;
        float p = exp2f(fmaf(s[nb][e], a.scale_log2, -l2[h]));
        if (partial) {
          const int j = j0 + nb * 8 + 2 * tq + (e & 1), i = i0 + warp * 16 + g + 8 * h;
          if (!key_visible(j, i, nk, a.causal, diff0, a.rate)) p = 0.0f;
        }
        dp[nb][e] = p * (dp[nb][e] - dl[h]);
      }
    tile_accumulate<T, D, BWD_T>(dq, dp, tk, lane); /* dQ += dS K */
    __syncthreads(); /* every warp is done with buffer `buf` before it is refilled */
  }

  /* add into the caller's rows: queries g and g + 8 of the warp */
#pragma unroll
  for (int h = 0; h < 2; h++) {
    const int i = i0 + warp * 16 + g + 8 * h;
    if (i >= nq) continue;
    float *row = a.acc + t.acc + (int64_t)i * a.acc_stride;
#pragma unroll
    for (int nb = 0; nb < D / 8; nb++) {
      const int c = nb * 8 + 2 * tq;
      row[c] += b.scale * dq[nb][2 * h];
      row[c + 1] += b.scale * dq[nb][2 * h + 1];
    }
  }
}

/* -------------------------------------------------------------- launchers */

/* Grid: x = block of `rows` rows, y = task (task0 + y; gridDim.y is at most
 * 65535, so many tasks take several launches).  The tiles of a task are
 * consecutive blocks: the blocks in flight together work on a few tasks,
 * stream the same tiles of the other run and, fused, add into the same dQ
 * rows -- a working set that stays in L2.  (With the task fastest, every
 * task of a step has blocks in flight, and the fused kernel's dQ atomics,
 * 4 MB of rows per task at n = 8192, d = 128, went to DRAM.) */
template <typename K>
static ra_status launch_tiles(K kernel, const backward_args &b, int rows, int threads, int smem, int ntasks,
                              int64_t max_n, int vec, cudaStream_t stream, const char *what) {
  RA_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem), what);
  const int64_t tiles = (max_n + rows - 1) / rows; /* < 2^31: runs are < 2^30 tokens */
  for (int t0 = 0; t0 < ntasks; t0 += 65535) {
    const dim3 grid((unsigned)tiles, (unsigned)(ntasks - t0 < 65535 ? ntasks - t0 : 65535));
    kernel<<<grid, threads, smem, stream>>>(b, t0, vec);
    RA_CUDA_TRY(cudaGetLastError(), what);
  }
  return RA_OK;
}

template <typename T, int D, int KW, bool FUSE>
static ra_status dkdv_mma(const backward_args &b, int ntasks, int64_t max_nk, int vec, cudaStream_t stream) {
  return launch_tiles(bwd_dkdv_mma_kernel<T, D, bwd_qs<D>(), KW, FUSE>, b, KW * 16, KW * 32,
                      bwd_dkdv_smem_bytes<T, D, KW, FUSE>(), ntasks, max_nk, vec, stream,
                      FUSE ? "attention backward kernel (dQ, dK, dV)" : "attention backward kernel (dK, dV)");
}

template <typename T, int D>
static ra_status dq_mma(const backward_args &b, int ntasks, int64_t max_nq, cudaStream_t stream) {
  return launch_tiles(bwd_dq_mma_kernel<T, D>, b, BWD_T, MMA_THREADS, bwd_dq_smem_bytes<T, D>(), ntasks, max_nq,
                      1, stream, "attention backward kernel (dQ)");
}

/* Shared memory of the fused kernel with `kw` warps, and of the two-pass
 * dK/dV kernel (the larger of the two-pass kernels). */
static int fused_smem(int d, int kw) {
  if (d == 64) return kw == 8 ? bwd_dkdv_smem_bytes<__half, 64, 8, true>() : bwd_dkdv_smem_bytes<__half, 64, 4, true>();
  return kw == 8 ? bwd_dkdv_smem_bytes<__half, 128, 8, true>() : bwd_dkdv_smem_bytes<__half, 128, 4, true>();
}
static int two_pass_smem(int d) {
  return d == 64 ? bwd_dkdv_smem_bytes<__half, 64, 4, false>() : bwd_dkdv_smem_bytes<__half, 128, 4, false>();
}

template <typename T, int D>
static ra_status backward_mma(const backward_args &b, int ntasks, int64_t max_nq, int64_t max_nk, int kw,
                              int vec, cudaStream_t stream) {
  if (kw == 8) return dkdv_mma<T, D, 8, true>(b, ntasks, max_nk, vec, stream);
  if (kw == 4) return dkdv_mma<T, D, 4, true>(b, ntasks, max_nk, vec, stream);
  RA_TRY((dkdv_mma<T, D, 4, false>(b, ntasks, max_nk, 1, stream)));
  return dq_mma<T, D>(b, ntasks, max_nq, stream);
}

/* kw: 8 or 4 (fused, that many warps per block), 0 (two passes). */
static ra_status ra_cuda_backward_mma(const backward_args &b, ra_dtype dtype, int ntasks, int64_t max_nq,
                                      int64_t max_nk, int kw, int vec, cudaStream_t stream) {
  if (dtype == RA_FLOAT16)
    return b.a.head_dim == 64 ? backward_mma<__half, 64>(b, ntasks, max_nq, max_nk, kw, vec, stream)
                              : backward_mma<__half, 128>(b, ntasks, max_nq, max_nk, kw, vec, stream);
  return b.a.head_dim == 64 ? backward_mma<__nv_bfloat16, 64>(b, ntasks, max_nq, max_nk, kw, vec, stream)
                            : backward_mma<__nv_bfloat16, 128>(b, ntasks, max_nq, max_nk, kw, vec, stream);
}

/* --------------------------------------------------------------- dispatch */

/* cp.async moves 16-byte chunks: every row of q, k, v and dO must start on
 * one.  (The gradients are added a float at a time: no alignment needed.) */
static bool rows_aligned_bwd(const ra_backward_batch *bw) {
  const ra_attend_batch *b = &bw->a;
  const int64_t e = 8; /* 16 bytes of a 2-byte type */
  if ((uintptr_t)b->q % 16 || (uintptr_t)b->k % 16 || (uintptr_t)b->v % 16 || (uintptr_t)bw->dout % 16)
    return false;
  if (b->q_stride % e || b->k_stride % e || b->v_stride % e || bw->dout_stride % e) return false;
  for (int64_t i = 0; i < b->ntasks; i++) {
    const ra_attend_task *t = &b->tasks[i];
    if (t->q % e || t->k % e || t->v % e || t->dout % e) return false;
  }
  return true;
}

ra_status ra_cuda_attend_backward(const ra_backward_batch *bw, const ra_attend_task *dev_tasks, int allow_mma,
                                  int deterministic, cudaStream_t stream) {
  const ra_attend_batch *b = &bw->a;
  if (b->dtype != RA_FLOAT32 && b->dtype != RA_FLOAT16 && b->dtype != RA_BFLOAT16)
    return ra_fail(RA_ERR_UNSUPPORTED, "attention backward: the CUDA backend takes float32, float16 and bfloat16");
  RA_TRY(ra_cuda_check_head_dim(b->head_dim));
  if (b->ntasks > INT_MAX)
    return ra_fail(RA_ERR_UNSUPPORTED, "attention backward: %lld tasks in one step", (long long)b->ntasks);
  int64_t max_nq = 0, max_nk = 0;
  for (int64_t i = 0; i < b->ntasks; i++) {
    const ra_attend_task *t = &b->tasks[i];
    if (t->nq > max_nq) max_nq = t->nq;
    if (t->nk > max_nk) max_nk = t->nk;
    if (t->nq > INT_MAX / 2 || t->nk > INT_MAX / 2)
      return ra_fail(RA_ERR_UNSUPPORTED, "attention backward: a run of more than 2^30 tokens");
  }
  if (b->ntasks == 0 || max_nq == 0 || max_nk == 0) return RA_OK;
  backward_args a;
  a.a.q = b->q;
  a.a.k = b->k;
  a.a.v = b->v;
  a.a.q_stride = b->q_stride;
  a.a.k_stride = b->k_stride;
  a.a.v_stride = b->v_stride;
  a.a.acc = b->acc;
  a.a.lse = b->lse;
  a.a.acc_stride = b->acc_stride;
  a.a.lse_stride = b->lse_stride;
  a.a.tasks = dev_tasks;
  a.a.rate = b->rate;
  a.a.scale_log2 = b->scale * RA_LOG2E;
  a.a.causal = b->causal;
  a.a.head_dim = (int)b->head_dim;
  a.a.tile0 = 0;
  a.dout = bw->dout;
  a.dout_stride = bw->dout_stride;
  a.delta = bw->delta;
  a.dk = bw->dk;
  a.dv = bw->dv;
  a.dkv_stride = bw->dkv_stride;
  a.scale = b->scale;
  const int n = (int)b->ntasks;
  bool mma = allow_mma && (b->dtype == RA_FLOAT16 || b->dtype == RA_BFLOAT16) &&
             (b->head_dim == 64 || b->head_dim == 128) && rows_aligned_bwd(bw);
  int kw = 0; /* the tensor-core shape: fused with kw warps, 0 two passes */
  if (mma) {
    /* deterministic: the two-pass kernels, which add every gradient in a
     * fixed order; else the fused kernel, whose dQ atomics make the fp32
     * summation order vary. */
    /* the D = 128 kernels need 105-155 KB: more than some GPUs (sm_86, sm_89) give a block */
    int dev = 0, optin = 0;
    RA_CUDA_TRY(cudaGetDevice(&dev), "attention backward: device");
    RA_CUDA_TRY(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
                "attention backward: shared memory limit");
    const int d = (int)b->head_dim;
    if (deterministic) {
      mma = two_pass_smem(d) <= optin;
    } else if (fused_smem(d, BWD_KW) <= optin) {
      kw = BWD_KW;
    } else if (fused_smem(d, 4) <= optin) {
      kw = 4;
    } else {
      mma = two_pass_smem(d) <= optin;
    }
  }
  if (mma) {
    /* dQ by 8-byte vector atomics where every dQ row starts 8-byte aligned */
    bool even = (uintptr_t)b->acc % 8 == 0 && b->acc_stride % 2 == 0;
    for (int64_t i = 0; i < b->ntasks && even; i++) even = b->tasks[i].acc % 2 == 0;
    const int vec = even ? 2 : 1;
    return ra_cuda_backward_mma(a, b->dtype, n, max_nq, max_nk, kw, vec, stream);
  }
  RA_TRY(ra_cuda_backward_dkdv_simt(a, b->dtype, n, max_nk, stream));
  return ra_cuda_backward_dq_simt(a, b->dtype, n, max_nq, stream);
}
