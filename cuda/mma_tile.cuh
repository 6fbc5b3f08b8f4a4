/*
 * mma_tile.cuh -- the tile building blocks of the tensor-core kernels
 * (attend.cu forward, backward.cu backward): 64-row tiles in shared memory
 * filled by cp.async, and warp-level products of 16 rows on mma.m16n8k16
 * (layouts in ptx.cuh).
 *
 * A warp owns 16 rows of the left operand, kept either as A fragments in
 * registers (load_a_frags) or in shared memory.  Two products:
 *
 *   tile_scores      s = A B^T: A 16 x D, B N x D stored row-major (N rows
 *                    of D elements): S = Q K^T in the forward.
 *   tile_accumulate  o += P V: P 16 x K from fp32 accumulators (re-packed to
 *                    A fragments in registers), V K x D stored row-major.
 */
#ifndef RINGATTN_CUDA_MMA_TILE_CUH
#define RINGATTN_CUDA_MMA_TILE_CUH

#include "ptx.cuh"

#define MMA_WARPS 4
#define MMA_THREADS (MMA_WARPS * 32)
#define MMA_BQ (MMA_WARPS * 16) /* queries per block      */
#define MMA_BK 64               /* keys per tile          */
#define MMA_PAD 8               /* elements of padding per shared-memory row:
                                   16 bytes shift the eight rows an ldmatrix
                                   phase reads onto distinct banks */

/* Copy rows [0, 64) of a run (row r at src + r * stride, D elements) into a
 * shared tile of rows D + MMA_PAD long; rows >= `rows` become zeros.  `safe`
 * is any valid global address (not read) for the zero-filled chunks. */
template <typename T, int D>
__device__ __forceinline__ void load_tile_async(T *tile, const T *src, int64_t stride, int rows,
                                                const T *safe) {
  constexpr int ROW = D + MMA_PAD, CHUNKS = D / 8; /* 16-byte chunks per row */
  for (int c = threadIdx.x; c < 64 * CHUNKS; c += MMA_THREADS) {
    const int r = c / CHUNKS, ch = c % CHUNKS;
    const bool ok = r < rows;
    cp_async_16(smem_addr(tile + r * ROW + ch * 8), ok ? src + r * stride + ch * 8 : safe,
                ok ? 16 : 0);
  }
}

/* The A fragments of a warp's 16 rows (row r at sa + r * (D + MMA_PAD)),
 * one per k-step of 16: matrices 0-3 = rows 0-7 / 8-15 at +0, then at +8. */
template <typename T, int D>
__device__ __forceinline__ void load_a_frag(uint32_t af[4], const T *sa, int kk, int lane) {
  constexpr int ROW = D + MMA_PAD;
  ldmatrix_x4(af, smem_addr(sa + (lane & 15) * ROW + kk * 16 + (lane >> 4) * 8));
}

template <typename T, int D>
__device__ __forceinline__ void load_a_frags(uint32_t af[D / 16][4], const T *sa, int lane) {
#pragma unroll
  for (int kk = 0; kk < D / 16; kk++) load_a_frag<T, D>(af[kk], sa, kk, lane);
}

/* One k-step (dims kk*16 .. +15) of s += A B^T over N columns.  One
 * ldmatrix.x4 yields the B fragments of two n-blocks: matrices 0, 1 = rows
 * 0-7 of the pair at dims +0 / +8 (b0, b1 of the first block), matrices
 * 2, 3 = rows 8-15 (b0, b1 of the second). */
template <typename T, int D, int N>
__device__ __forceinline__ void scores_kstep(float s[N / 8][4], const uint32_t a[4], const T *sb,
                                             int kk, int lane) {
  constexpr int ROW = D + MMA_PAD;
  const int mi = lane >> 3, r = lane & 7;
#pragma unroll
  for (int np = 0; np < N / 16; np++) {
    uint32_t b[4];
    ldmatrix_x4(b, smem_addr(sb + (np * 16 + (mi >> 1) * 8 + r) * ROW + kk * 16 + (mi & 1) * 8));
    mma_16816<T>(s[2 * np], a, b[0], b[1]);
    mma_16816<T>(s[2 * np + 1], a, b[2], b[3]);
  }
}

/* s[nb] (N/8 n-blocks of 8 columns) = this warp's 16 rows (A fragments qf)
 * . the N rows of the tile at sk. */
template <typename T, int D, int N = MMA_BK>
__device__ __forceinline__ void tile_scores(float s[N / 8][4], const uint32_t qf[D / 16][4],
                                            const T *sk, int lane) {
#pragma unroll
  for (int nb = 0; nb < N / 8; nb++) s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.0f;
#pragma unroll
  for (int kk = 0; kk < D / 16; kk++) scores_kstep<T, D, N>(s, qf[kk], sk, kk, lane);
}

/* The same with the 16 rows of A in shared memory (at sa), loaded a k-step
 * at a time: fewer registers than keeping all D / 16 fragments. */
template <typename T, int D, int N = MMA_BK>
__device__ __forceinline__ void tile_scores_smem(float s[N / 8][4], const T *sa, const T *sk,
                                                 int lane) {
#pragma unroll
  for (int nb = 0; nb < N / 8; nb++) s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.0f;
#pragma unroll
  for (int kk = 0; kk < D / 16; kk++) {
    uint32_t a[4];
    load_a_frag<T, D>(a, sa, kk, lane);
    scores_kstep<T, D, N>(s, a, sk, kk, lane);
  }
}

/* o += P V for K rows of V.  P's accumulator layout (rows g, g+8; columns
 * 2t, 2t+1 of each n-block) is the A layout of the next mma once two
 * n-blocks are paired per k-step of 16.  ldmatrix.trans of V (stored
 * row-major, K rows of D) gives B: matrices 0, 1 = rows +0 / +8 at dims 0-7
 * of the pair (b0, b1 of the first output block), matrices 2, 3 = the same
 * rows at dims 8-15. */
template <typename T, int D, int K = MMA_BK>
__device__ __forceinline__ void tile_accumulate(float o[D / 8][4], const float p[K / 8][4],
                                                const T *sv, int lane) {
  constexpr int ROW = D + MMA_PAD;
  const int mi = lane >> 3, r = lane & 7;
#pragma unroll
  for (int kk = 0; kk < K / 16; kk++) {
    const uint32_t pa[4] = {pack2<T>(p[2 * kk][0], p[2 * kk][1]), pack2<T>(p[2 * kk][2], p[2 * kk][3]),
                            pack2<T>(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                            pack2<T>(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
    for (int np = 0; np < D / 16; np++) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, smem_addr(sv + (kk * 16 + (mi & 1) * 8 + r) * ROW + np * 16 + (mi >> 1) * 8));
      mma_16816<T>(o[2 * np], pa, b[0], b[1]);
      mma_16816<T>(o[2 * np + 1], pa, b[2], b[3]);
    }
  }
}

#endif /* RINGATTN_CUDA_MMA_TILE_CUH */
