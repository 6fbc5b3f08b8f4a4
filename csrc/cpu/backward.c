/*
 * backward.c -- flash-style attention backward on the CPU.
 *
 * The probabilities are recomputed tile by tile from the rows' final
 * log-sum-exp, so nothing larger than one tile of scores exists.  One loop
 * serves the three entries (backward.h):
 *
 *   for each chunk of queries (packed once: scaled Q and dO as rows and
 *   transposed, lse, delta)
 *     for each block of KB keys the chunk can see (K, V packed as rows)
 *       for each tile of QT queries of the chunk that see the block,
 *       keys as rows and queries as columns:
 *         S^T  = K Q^T,  P^T  = exp(S^T - lse)
 *         dP^T = V dO^T, dS^T = P^T (dP^T - D)
 *         dV += P^T dO,  dK += dS^T Q          (unless dQ only)
 *         dQ += (dS^T)^T K                     (unless dK/dV only)
 *       add the block's dK, dV to the caller's rows
 *     add the chunk's dQ to the caller's rows
 *
 * ra_cpu_backward does all five products in that one pass; the two-pass
 * pair (ra_cpu_backward_dkdv, ra_cpu_backward_dq) recomputes S and dP in
 * each pass (seven products) but lets a caller split one run over threads.
 * Only the chunk is transposed, once; key blocks are plain row copies.
 *
 * Every product is one register-blocked micro-kernel: MR rows by NV vectors
 * of VF floats held in registers, one broadcast per row and one vector load
 * per column vector per step of the contraction (AVX-512: 4 x 4 zmm, 16
 * FMAs for 8 loads).  The exp of P and the dS of dP are computed on the
 * accumulators before they are stored.  Causal tiles above the diagonal are
 * never visited; tiles on it mask by index.
 *
 * As in the forward kernel scores are kept in base 2: queries are
 * pre-scaled by scale*log2(e) and lse by log2(e), so exp2 replaces exp; the
 * factor is taken out when the accumulators are added to the caller's rows
 * (dK by ln 2, dQ by scale).  The head dimension is padded to a multiple of
 * 16 with zero columns.  Dead rows (lse -inf) and the padding of a chunk are
 * zero queries with lse +inf: their P is 0 or below 2^-124 and their dO and
 * delta are 0, so they add exact zeros everywhere (their dq rows get +0).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cpu/backward.h"
#include "cpu/half.h"
#include "cpu/simd.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

/* Micro-tile: MR rows by NV vectors (AVX-512: 16 accumulators and 4 loaded
 * vectors of the 32 zmm; 8 wide: 8 and 2 of the 16 ymm).  MR must divide VF
 * (the dQ product's rows are a tile's query columns). */
#define MR 4
#if VF == 16
#define NV 4
#else
#define NV 2
#endif

/* Block sizes (tests/memory_model.py mirrors them). */
#define KB 64 /* keys of a packed block                */
#define QT 64 /* queries of a tile (P^T, dS^T: KB x QT) */

#if QT % (NV * VF) || KB % MR || VF % MR
#error "tile sizes must be multiples of the micro-tile"
#endif

/* Queries of a packed chunk: each chunk re-reads the keys and adds into the
 * caller's dK, dV rows once, so a longer chunk means fewer passes over
 * strided memory; its five buffers of qc x dp floats should stay in L2.
 * About 128 KiB a buffer: 512 rows at dp 64, 256 at 128, at least QT. */
static int64_t chunk_rows(int64_t dp) {
  const int64_t q = 32768 / dp / QT * QT;
  return q < QT ? QT : q > 512 ? 512 : q;
}

struct ra_bwd_workspace {
  int64_t dp;              /* head dim padded to a multiple of 16           */
  int64_t qc, qld;         /* chunk_rows(dp); qc + 16: the row stride of the
                            * transposed chunk, not a multiple of 1 KiB, so
                            * a column walk does not keep hitting the same
                            * few L1 sets */
  float *q, *g, *dq;       /* [qc][dp]  scaled queries, dO, dQ accumulator  */
  float *qt, *gt;          /* [dp][qld] the same queries and dO, transposed */
  float *lse2, *dl;        /* [qc]      lse * log2 e (+inf: dead), delta    */
  float *k, *v;            /* [KB][dp]  keys, values of a block             */
  float *dk, *dv;          /* [KB][dp]  their accumulators                  */
  float *s, *ds;           /* [KB][QT]  P^T, dS^T of a tile                 */
  int32_t *lo;             /* [KB]      first visible column of each key    */
};

static int64_t padded_dim(int64_t d) { return (d + 15) / 16 * 16; }
static int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

/* floats of the buffers (each a multiple of 16: 64 bytes) */
static size_t ws_floats(size_t dp) {
  const size_t qc = (size_t)chunk_rows((int64_t)dp), qld = qc + 16;
  return 3 * qc * dp + 2 * dp * qld + 2 * qc + 4 * KB * dp + 2 * KB * QT + KB;
}

size_t ra_bwd_workspace_bytes(int64_t head_dim) {
  return (sizeof(struct ra_bwd_workspace) + 63) / 64 * 64 + ws_floats((size_t)padded_dim(head_dim)) * sizeof(float);
}

static float *carve(float **p, size_t n) {
  float *r = *p;
  *p += (n + 15) / 16 * 16; /* keep 64-byte alignment */
  return r;
}

ra_bwd_workspace *ra_bwd_workspace_init(void *mem, int64_t head_dim) {
  ra_bwd_workspace *ws = (ra_bwd_workspace *)mem;
  const size_t dp = (size_t)padded_dim(head_dim);
  float *base = (float *)((char *)mem + (sizeof *ws + 63) / 64 * 64), *p = base;
  const size_t qc = (size_t)chunk_rows((int64_t)dp), qld = qc + 16;
  ws->dp = (int64_t)dp;
  ws->qc = (int64_t)qc;
  ws->qld = (int64_t)qld;
  ws->q = carve(&p, qc * dp);
  ws->g = carve(&p, qc * dp);
  ws->dq = carve(&p, qc * dp);
  ws->qt = carve(&p, dp * qld);
  ws->gt = carve(&p, dp * qld);
  ws->lse2 = carve(&p, qc);
  ws->dl = carve(&p, qc);
  ws->k = carve(&p, KB * dp);
  ws->v = carve(&p, KB * dp);
  ws->dk = carve(&p, KB * dp);
  ws->dv = carve(&p, KB * dp);
  ws->s = carve(&p, KB * QT);
  ws->ds = carve(&p, KB * QT);
  ws->lo = (int32_t *)carve(&p, KB);
  memset(base, 0, sizeof(float) * (size_t)(p - base));
  return ws;
}

/* ------------------------------------------------------------- the arguments */

/* One call's inputs, as the entries receive them. */
typedef struct bwd_args {
  ra_dtype dtype;
  int64_t d;
  float scale;
  int causal;
  int64_t rate;
  ra_tokens q, k;
  const void *dout, *v;
  int64_t dout_stride, v_stride;
  const float *lse, *delta;
  int64_t lse_stride, delta_stride;
} bwd_args;

/* Where the results go; dq NULL: no dQ, dk NULL: no dK / dV. */
typedef struct bwd_out {
  float *dq;
  int64_t dq_stride;
  float *dk, *dv;
  int64_t dkv_stride;
} bwd_out;

/* Keys of a run starting at position kpos0 that a query at qpos sees
 * (causal: positions <= qpos), at most n. */
static int64_t visible_keys(const bwd_args *a, int64_t qpos, int64_t kpos0, int64_t n) {
  if (!a->causal) return n;
  if (qpos < kpos0) return 0;
  int64_t u = (qpos - kpos0) / a->rate + 1;
  return u < n ? u : n;
}

/* The first of the queries at qpos0, qpos0 + rate, ... that sees a key at
 * kpos (causal; 0 otherwise). */
static int64_t first_seeing(const bwd_args *a, int64_t kpos, int64_t qpos0) {
  if (!a->causal || kpos <= qpos0) return 0;
  return (kpos - qpos0 + a->rate - 1) / a->rate;
}

/* ------------------------------------------------------------------ exp2 */

#if defined(__AVX512F__)
/* 2^x: n = round(x), 2^(x-n) by a degree-6 polynomial (relative error
 * < 2e-7), times 2^n by scalef.  x is clamped to [-125, 127], so the result
 * is never subnormal (masked entries are zeroed by the caller); NaN stays NaN
 * (max/min return their second operand when it is NaN). */
static inline vf exp2v(vf x) {
  __m512 t = _mm512_min_ps(_mm512_set1_ps(127.0f), _mm512_max_ps(_mm512_set1_ps(-125.0f), (__m512)x));
  __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  vf f = (vf)_mm512_sub_ps(t, n);
  vf p = vfexp2_frac(f);
  return (vf)_mm512_scalef_ps((__m512)p, n);
}
#else
static inline vf exp2v(vf x) { return vfexp2(x); }
#endif

/* ----------------------------------------------------------- micro-kernels */

#define INLINE static inline __attribute__((always_inline))

#if VF == 16
static const vfi iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
#else
static const vfi iota = {0, 1, 2, 3, 4, 5, 6, 7};
#endif

/* acc[r][v] += sum_{k < kn} a[r*ars + k*aks] * b[k*ldb + v*VF] for r < MR,
 * v < nv: a holds the scalars broadcast, b rows of vectors (64-byte aligned). */
#define MICRO_LOOP(nv, acc, a, ars, aks, b, ldb, kn)                                        \
  for (int64_t k_ = 0; k_ < (kn); k_++) {                                                   \
    vf b_[NV];                                                                              \
    _Pragma("GCC unroll 4") for (int v_ = 0; v_ < (nv); v_++)                               \
      b_[v_] = *(const vf *)((b) + k_ * (ldb) + v_ * VF);                                   \
    _Pragma("GCC unroll 8") for (int r_ = 0; r_ < MR; r_++) {                               \
      const vf x_ = vfsplat((a)[r_ * (ars) + k_ * (aks)]);                                  \
      _Pragma("GCC unroll 4") for (int v_ = 0; v_ < (nv); v_++) acc[r_][v_] += b_[v_] * x_; \
    }                                                                                       \
  }

#define ZERO_ACC(nv, acc)                                   \
  _Pragma("GCC unroll 8") for (int r_ = 0; r_ < MR; r_++)   \
    _Pragma("GCC unroll 4") for (int v_ = 0; v_ < (nv); v_++) acc[r_][v_] = vfsplat(0.0f)

/* c[r][v] += (a b)[r][v]: c rows ldc apart. */
INLINE void micro_acc(float *c, int64_t ldc, const float *a, int64_t ars, int64_t aks, const float *b,
                      int64_t ldb, int64_t kn, const int nv) {
  vf acc[MR][NV];
  _Pragma("GCC unroll 8") for (int r = 0; r < MR; r++)
    _Pragma("GCC unroll 4") for (int v = 0; v < nv; v++) acc[r][v] = *(vf *)(c + r * ldc + v * VF);
  MICRO_LOOP(nv, acc, a, ars, aks, b, ldb, kn)
  _Pragma("GCC unroll 8") for (int r = 0; r < MR; r++)
    _Pragma("GCC unroll 4") for (int v = 0; v < nv; v++) *(vf *)(c + r * ldc + v * VF) = acc[r][v];
}

/* x where column col+lane >= lo, else 0. */
INLINE vf mask_before(vf x, int32_t lo, int64_t col) {
  if (lo <= col) return x;
  return vfselect(vfsplati((int32_t)col) + iota >= vfsplati(lo), x, vfsplat(0.0f));
}

/* P^T for MR keys of a tile at query columns c0 .. c0 + nv*VF:
 * p[r][..] = exp2(k_r . qt[..] - lse2[..]), zero before column lo[r]. */
INLINE void micro_probs(float *p, const float *k, int64_t dp, const float *qt, int64_t qld, const float *lse2,
                        const int32_t *lo, int64_t c0, const int nv) {
  vf acc[MR][NV];
  ZERO_ACC(nv, acc);
  MICRO_LOOP(nv, acc, k, dp, 1, qt + c0, qld, dp)
  _Pragma("GCC unroll 4") for (int v = 0; v < nv; v++) {
    const vf l = *(const vf *)(lse2 + c0 + v * VF);
    _Pragma("GCC unroll 8") for (int r = 0; r < MR; r++)
      *(vf *)(p + r * QT + c0 + v * VF) = mask_before(exp2v(acc[r][v] - l), lo[r], c0 + v * VF);
  }
}

/* dS^T for the same micro-tile: dP = v_r . gt[..], ds = p (dP - delta[..])
 * (0 where p is). */
INLINE void micro_dscores(float *ds, const float *p, const float *v, int64_t dp, const float *gt, int64_t qld,
                          const float *dl, int64_t c0, const int nv) {
  vf acc[MR][NV];
  ZERO_ACC(nv, acc);
  MICRO_LOOP(nv, acc, v, dp, 1, gt + c0, qld, dp)
  _Pragma("GCC unroll 4") for (int w = 0; w < nv; w++) {
    const vf D = *(const vf *)(dl + c0 + w * VF);
    _Pragma("GCC unroll 8") for (int r = 0; r < MR; r++) {
      const int64_t at = r * QT + c0 + w * VF;
      *(vf *)(ds + at) = *(const vf *)(p + at) * (acc[r][w] - D);
    }
  }
}

/* ------------------------------------------------------------ the products */

/* c[0:rows][0:width] += A B with A (rows x kn) read through (ars, aks) and
 * B (kn x width, rows ldb apart), width a multiple of VF: a column panel of
 * NV vectors at a time (the narrower rest last), down all rows, so that the
 * panel of B stays in L1 while MR rows of A at a time stream past it. */
static void gemm_acc(float *c, int64_t ldc, const float *a, int64_t ars, int64_t aks, const float *b,
                     int64_t ldb, int64_t rows, int64_t width, int64_t kn) {
  int64_t x = 0;
  for (; x + NV * VF <= width; x += NV * VF)
    for (int64_t r = 0; r < rows; r += MR) micro_acc(c + r * ldc + x, ldc, a + r * ars, ars, aks, b + x, ldb, kn, NV);
  for (int64_t r = 0; r < rows; r += MR) {
    switch ((width - x) / VF) {
#if NV > 3
      case 3: micro_acc(c + r * ldc + x, ldc, a + r * ars, ars, aks, b + x, ldb, kn, 3); break;
#endif
#if NV > 2
      case 2: micro_acc(c + r * ldc + x, ldc, a + r * ars, ars, aks, b + x, ldb, kn, 2); break;
#endif
      case 1: micro_acc(c + r * ldc + x, ldc, a + r * ars, ars, aks, b + x, ldb, kn, 1); break;
      default: return;
    }
  }
}

/* P^T, then dS^T, of a tile: keys 0 .. rows (a multiple of MR) against the
 * chunk's query columns i0 .. i0 + cols (cols a multiple of VF); panel by
 * panel of columns as in gemm_acc. */
#define SCORES_PANEL(nv)                                                                    \
  do {                                                                                      \
    for (int64_t r = 0; r < rows; r += MR)                                                  \
      micro_probs(ws->s + r * QT, ws->k + r * dp, dp, qt, ws->qld, lse2, ws->lo + r, c, nv); \
    for (int64_t r = 0; r < rows; r += MR)                                                  \
      micro_dscores(ws->ds + r * QT, ws->s + r * QT, ws->v + r * dp, dp, gt, ws->qld, dl, c, nv); \
  } while (0)

static void tile_scores(ra_bwd_workspace *ws, int64_t i0, int64_t rows, int64_t cols) {
  const int64_t dp = ws->dp;
  const float *qt = ws->qt + i0, *gt = ws->gt + i0, *lse2 = ws->lse2 + i0, *dl = ws->dl + i0;
  int64_t c = 0;
  for (; c + NV * VF <= cols; c += NV * VF) SCORES_PANEL(NV);
  switch ((cols - c) / VF) {
#if NV > 3
    case 3: SCORES_PANEL(3); break;
#endif
#if NV > 2
    case 2: SCORES_PANEL(2); break;
#endif
    case 1: SCORES_PANEL(1); break;
    default: break;
  }
}

/* ----------------------------------------------------------------- packing */

#if defined(__AVX512F__)
/* One 16 x 16 block: dst[c][t] = src[t][c] (rows sld, dld floats apart,
 * 64-byte aligned).  Pairs, then quads within 128-bit lanes, then lanes. */
static void transpose16(float *dst, int64_t dld, const float *src, int64_t sld) {
  __m512 r[16], u[16];
  for (int i = 0; i < 16; i++) r[i] = _mm512_load_ps(src + i * sld);
  for (int i = 0; i < 16; i += 2) { /* per lane: a0 b0 a1 b1, a2 b2 a3 b3 */
    u[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    u[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) { /* r[i + j]: rows i..i+3 of column 4L + j in lane L */
    r[i] = _mm512_shuffle_ps(u[i], u[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(u[i], u[i + 2], 0xee);
    r[i + 2] = _mm512_shuffle_ps(u[i + 1], u[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(u[i + 1], u[i + 3], 0xee);
  }
  for (int j = 0; j < 4; j++) {
    const __m512 v = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88), w = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88);
    const __m512 v1 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xdd), w1 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xdd);
    _mm512_store_ps(dst + j * dld, _mm512_shuffle_f32x4(v, w, 0x88));
    _mm512_store_ps(dst + (8 + j) * dld, _mm512_shuffle_f32x4(v, w, 0xdd));
    _mm512_store_ps(dst + (4 + j) * dld, _mm512_shuffle_f32x4(v1, w1, 0x88));
    _mm512_store_ps(dst + (12 + j) * dld, _mm512_shuffle_f32x4(v1, w1, 0xdd));
  }
}
#endif

/* dst[c][t] = src[t][c] for c < dp, t < n (a multiple of VF; src rows dp
 * apart, dst rows ld). */
static void transpose(float *dst, int64_t ld, const float *src, int64_t dp, int64_t n) {
  for (int64_t t0 = 0; t0 < n; t0 += 16)
    for (int64_t c0 = 0; c0 < dp; c0 += 16) {
#if defined(__AVX512F__)
      transpose16(dst + c0 * ld + t0, ld, src + t0 * dp + c0, dp);
#else
      const int64_t tn = n - t0 < 16 ? n - t0 : 16;
      for (int64_t c = c0; c < c0 + 16; c++)
        for (int64_t t = t0; t < t0 + tn; t++) dst[c * ld + t] = src[t * dp + c];
#endif
    }
}

/* Chunk rows t0 .. t0+m of the query run: scaled queries and dO as rows and
 * transposed, lse2, delta.  Dead rows (lse -inf) and rows m ..
 * round_up(m, VF) are zero with lse2 +inf and delta 0.  Padding columns
 * are zero. */
static void pack_chunk(ra_bwd_workspace *ws, const bwd_args *a, int64_t t0, int64_t m) {
  const int64_t d = a->d, dp = ws->dp, end = round_up(m, VF);
  const size_t es = ra_dtype_size(a->dtype);
  for (int64_t t = 0; t < end; t++) {
    float *qr = ws->q + t * dp, *gr = ws->g + t * dp;
    const float l = t < m ? a->lse[(t0 + t) * a->lse_stride] : -INFINITY;
    if (l == -INFINITY) {
      memset(qr, 0, sizeof(float) * (size_t)dp);
      memset(gr, 0, sizeof(float) * (size_t)dp);
      ws->lse2[t] = INFINITY;
      ws->dl[t] = 0.0f;
      continue;
    }
    ra_load_row(qr, (const char *)a->q.ptr + (size_t)((t0 + t) * a->q.stride) * es, a->dtype, d, a->scale * LOG2E);
    ra_load_row(gr, (const char *)a->dout + (size_t)((t0 + t) * a->dout_stride) * es, a->dtype, d, 1.0f);
    memset(qr + d, 0, sizeof(float) * (size_t)(dp - d));
    memset(gr + d, 0, sizeof(float) * (size_t)(dp - d));
    ws->lse2[t] = l * LOG2E;
    ws->dl[t] = a->delta[(t0 + t) * a->delta_stride];
  }
  transpose(ws->qt, ws->qld, ws->q, dp, end);
  transpose(ws->gt, ws->qld, ws->g, dp, end);
}

/* Keys j0 .. j0+n of the run as rows; rows n .. round_up(n, MR) are zero. */
static void pack_keys(ra_bwd_workspace *ws, const bwd_args *a, int64_t j0, int64_t n) {
  const int64_t d = a->d, dp = ws->dp;
  const size_t es = ra_dtype_size(a->dtype);
  for (int64_t j = 0; j < round_up(n, MR); j++) {
    float *kr = ws->k + j * dp, *vr = ws->v + j * dp;
    if (j >= n) {
      memset(kr, 0, sizeof(float) * (size_t)dp);
      memset(vr, 0, sizeof(float) * (size_t)dp);
      continue;
    }
    ra_load_row(kr, (const char *)a->k.ptr + (size_t)((j0 + j) * a->k.stride) * es, a->dtype, d, 1.0f);
    ra_load_row(vr, (const char *)a->v + (size_t)((j0 + j) * a->v_stride) * es, a->dtype, d, 1.0f);
    memset(kr + d, 0, sizeof(float) * (size_t)(dp - d));
    memset(vr + d, 0, sizeof(float) * (size_t)(dp - d));
  }
}

/* ------------------------------------------------------------------ driver */

/* One tile: the packed key block (nb keys from position kpos) against chunk
 * columns i0 .. i0+cols (m real rows in the chunk, row 0 at qpos). */
static void tile(ra_bwd_workspace *ws, const bwd_args *a, const bwd_out *o, int64_t qpos, int64_t m,
                 int64_t i0, int64_t cols, int64_t kpos, int64_t nb) {
  const int64_t dp = ws->dp, last = (i0 + cols < m ? i0 + cols : m) - 1;
  /* keys past those the tile's last query sees are invisible to the tile */
  const int64_t hmax = visible_keys(a, qpos + last * a->rate, kpos, nb), rows = round_up(hmax, MR);
  if (hmax == 0) return;
  for (int64_t j = 0; j < rows; j++) {
    int64_t lo = j < nb ? first_seeing(a, kpos + j * a->rate, qpos) - i0 : cols;
    ws->lo[j] = (int32_t)(lo < 0 ? 0 : lo > cols ? cols : lo);
  }
  tile_scores(ws, i0, rows, cols);
  if (o->dk) {
    gemm_acc(ws->dv, dp, ws->s, QT, 1, ws->g + i0 * dp, dp, rows, dp, cols);
    gemm_acc(ws->dk, dp, ws->ds, QT, 1, ws->q + i0 * dp, dp, rows, dp, cols);
  }
  if (o->dq) gemm_acc(ws->dq + i0 * dp, dp, ws->ds, 1, QT, ws->k, dp, cols, dp, rows);
}

static void add_rows(float *dst, int64_t stride, const float *src, int64_t dp, int64_t d, int64_t n, float mul) {
  for (int64_t j = 0; j < n; j++)
    for (int64_t c = 0; c < d; c++) dst[j * stride + c] += mul * src[j * dp + c];
}

static void run(ra_bwd_workspace *ws, const bwd_args *a, const bwd_out *o) {
  const int64_t dp = ws->dp, qc = ws->qc, nq = a->q.count, nk = a->k.count, rate = a->rate;
  if (nq <= 0 || nk <= 0) return;
  for (int64_t t0 = 0; t0 < nq; t0 += qc) {
    const int64_t m = nq - t0 < qc ? nq - t0 : qc, end = round_up(m, VF);
    const int64_t qpos = a->q.pos0 + t0 * rate; /* chunk row 0 */
    const int64_t kend = visible_keys(a, qpos + (m - 1) * rate, a->k.pos0, nk);
    if (kend == 0) continue;
    pack_chunk(ws, a, t0, m);
    if (o->dq) memset(ws->dq, 0, sizeof(float) * (size_t)(end * dp));
    for (int64_t j0 = 0; j0 < kend; j0 += KB) {
      const int64_t nb = kend - j0 < KB ? kend - j0 : KB, kpos = a->k.pos0 + j0 * rate;
      pack_keys(ws, a, j0, nb);
      if (o->dk) {
        memset(ws->dk, 0, sizeof(float) * (size_t)(KB * dp));
        memset(ws->dv, 0, sizeof(float) * (size_t)(KB * dp));
      }
      /* chunk rows before the first that sees key j0 see none of the block */
      for (int64_t i0 = first_seeing(a, kpos, qpos) / VF * VF; i0 < end; i0 += QT)
        tile(ws, a, o, qpos, m, i0, end - i0 < QT ? end - i0 : QT, kpos, nb);
      if (o->dk) {
        /* dK_j = scale * sum dS q = ln2 * sum dS (q * scale * log2 e) */
        add_rows(o->dk + j0 * o->dkv_stride, o->dkv_stride, ws->dk, dp, a->d, nb, LN2);
        add_rows(o->dv + j0 * o->dkv_stride, o->dkv_stride, ws->dv, dp, a->d, nb, 1.0f);
      }
    }
    if (o->dq) add_rows(o->dq + t0 * o->dq_stride, o->dq_stride, ws->dq, dp, a->d, m, a->scale);
  }
}

/* ------------------------------------------------------------------ entries */

#define ARGS_INIT                                                                              \
  {dtype, head_dim, scale, causal, rate, q, k, dout, v, dout_stride, v_stride, lse, delta, \
   lse_stride, delta_stride}

void ra_cpu_backward(ra_bwd_workspace *ws, ra_dtype dtype, int64_t head_dim, float scale, int causal,
                     int64_t rate, ra_tokens q, const void *dout, int64_t dout_stride, const float *lse,
                     int64_t lse_stride, const float *delta, int64_t delta_stride, ra_tokens k,
                     const void *v, int64_t v_stride, float *dq, int64_t dq_stride, float *dk, float *dv,
                     int64_t dkv_stride) {
  const bwd_args a = ARGS_INIT;
  const bwd_out o = {dq, dq_stride, dk, dv, dkv_stride};
  run(ws, &a, &o);
}

void ra_cpu_backward_dkdv(ra_bwd_workspace *ws, ra_dtype dtype, int64_t head_dim, float scale,
                          int causal, int64_t rate, ra_tokens q, const void *dout,
                          int64_t dout_stride, const float *lse, int64_t lse_stride,
                          const float *delta, int64_t delta_stride, ra_tokens k, const void *v,
                          int64_t v_stride, float *dk, float *dv, int64_t dkv_stride) {
  const bwd_args a = ARGS_INIT;
  const bwd_out o = {NULL, 0, dk, dv, dkv_stride};
  run(ws, &a, &o);
}

void ra_cpu_backward_dq(ra_bwd_workspace *ws, ra_dtype dtype, int64_t head_dim, float scale,
                        int causal, int64_t rate, ra_tokens q, const void *dout,
                        int64_t dout_stride, const float *lse, int64_t lse_stride,
                        const float *delta, int64_t delta_stride, ra_tokens k, const void *v,
                        int64_t v_stride, float *dq, int64_t dq_stride) {
  const bwd_args a = ARGS_INIT;
  const bwd_out o = {dq, dq_stride, NULL, NULL, 0};
  run(ws, &a, &o);
}
