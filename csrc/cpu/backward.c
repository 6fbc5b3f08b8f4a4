/*
 * backward.c -- flash-style attention backward on the CPU.
 *
 * The probabilities are recomputed tile by tile from the rows' final
 * log-sum-exp, so nothing larger than one tile of scores exists.  Each
 * function keeps one block fixed in scratch, transposed once per call, and
 * streams the other run through in row-major tiles of TILE rows:
 *
 *   ra_cpu_backward_dkdv: keys fixed (K^T, V^T, fp32 dK, dV accumulators);
 *     per tile of queries, queries as rows and keys as columns:
 *       S = Q K^T, dP = dO V^T          (contraction over the head dim)
 *       P = exp(S - lse), dS = P (dP - D)
 *       dV += P^T dO, dK += dS^T Q      (contraction over the queries)
 *   ra_cpu_backward_dq: queries fixed (Q^T, dO^T, fp32 dQ accumulator);
 *     per tile of keys, keys as rows and queries as columns:
 *       S^T = K Q^T, dP^T = V dO^T, P^T, dS^T as above, dQ += dS K.
 *
 * As in the forward kernel (kernel.c) scores are kept in base 2: queries
 * are pre-scaled by scale*log2(e) and lse by log2(e), so exp2 replaces exp;
 * the factor is taken out when the accumulators are added to the caller's
 * rows (dK by ln 2, dQ by scale).  The head dimension is padded to a
 * multiple of 16 with zero columns.  Two register-blocked micro-kernels (four
 * rows by sixteen columns) do all the products.  Rows whose lse is -inf are
 * loaded as zero and get lse2 = +inf, so their probabilities are exactly 0
 * and they contribute nothing.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cpu/backward.h"
#include "cpu/half.h"
#include "cpu/simd.h"

#define KB RA_BWD_BLOCK_K /* keys of a dK/dV block     */
#define QB RA_BWD_BLOCK_Q /* queries of a dQ block     */
#define TILE 64           /* queries (dkdv) / keys (dq) of one streamed tile */
/* Row strides of the transposed blocks and score tiles: padded by 16 floats
 * so that a column walk (stride 9 cache lines, not 8) spreads over all sets
 * of the L1 cache instead of thrashing eight of them. */
#define KLD (KB + 16)
#define QLD (QB + 16)

#if KB % 16 || QB % 16
#error "block sizes must be multiples of 16"
#endif


/* Both functions carve their buffers from the same scratch (a workspace
 * serves one call at a time); every buffer a call reads it writes first. */
struct ra_bwd_workspace {
  int64_t dp; /* head dim padded to a multiple of 16 */
  struct {    /* ra_cpu_backward_dkdv */
    float *kt, *vt;     /* [dp][KLD]  keys, values of the block, transposed */
    float *dk, *dv;     /* [KB][dp]   accumulators                          */
    float *q, *g;       /* [TILE][dp] scaled queries, output gradients      */
    float *s, *ds;      /* [TILE][KLD] scores -> P, dP -> dS                */
    float *lse2, *dl;   /* [TILE]     lse*log2(e), delta                    */
  } kv;
  struct {    /* ra_cpu_backward_dq */
    float *qt, *gt;     /* [dp][QLD]  scaled queries, gradients, transposed */
    float *dq;          /* [QB][dp]   accumulator                           */
    float *k, *v;       /* [TILE][dp] keys, values of a tile                */
    float *s, *ds;      /* [TILE][QLD] scores -> P, dP -> dS (transposed)   */
    float *lse2, *dl;   /* [QB]                                             */
  } qq;
};

static int64_t padded_dim(int64_t d) { return (d + 15) / 16 * 16; }
static int64_t round4(int64_t n) { return (n + 3) / 4 * 4; }
static int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }

static size_t kv_floats(size_t dp) { return 2 * KLD * dp + 2 * KB * dp + 2 * TILE * dp + 2 * TILE * KLD + 2 * TILE; }
static size_t qq_floats(size_t dp) { return 2 * QLD * dp + QB * dp + 2 * TILE * dp + 2 * TILE * QLD + 2 * QB; }

size_t ra_bwd_workspace_bytes(int64_t head_dim) {
  size_t dp = (size_t)padded_dim(head_dim);
  size_t a = kv_floats(dp), b = qq_floats(dp);
  /* each buffer is rounded up to 64 bytes: 10 buffers */
  return (sizeof(struct ra_bwd_workspace) + 63) / 64 * 64 + (a > b ? a : b) * sizeof(float) + 10 * 64;
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
  ws->dp = (int64_t)dp;
  ws->kv.kt = carve(&p, KLD * dp);
  ws->kv.vt = carve(&p, KLD * dp);
  ws->kv.dk = carve(&p, KB * dp);
  ws->kv.dv = carve(&p, KB * dp);
  ws->kv.q = carve(&p, TILE * dp);
  ws->kv.g = carve(&p, TILE * dp);
  ws->kv.s = carve(&p, TILE * KLD);
  ws->kv.ds = carve(&p, TILE * KLD);
  ws->kv.lse2 = carve(&p, TILE);
  ws->kv.dl = carve(&p, TILE);
  size_t used = (size_t)(p - base);
  p = base;
  ws->qq.qt = carve(&p, QLD * dp);
  ws->qq.gt = carve(&p, QLD * dp);
  ws->qq.dq = carve(&p, QB * dp);
  ws->qq.k = carve(&p, TILE * dp);
  ws->qq.v = carve(&p, TILE * dp);
  ws->qq.s = carve(&p, TILE * QLD);
  ws->qq.ds = carve(&p, TILE * QLD);
  ws->qq.lse2 = carve(&p, QB);
  ws->qq.dl = carve(&p, QB);
  if ((size_t)(p - base) > used) used = (size_t)(p - base);
  memset(base, 0, used * sizeof(float));
  return ws;
}

/* ---------------------------------------------------------- vector helpers */

static const v8si iota8 = {0, 1, 2, 3, 4, 5, 6, 7};

/* ------------------------------------------------------------ micro-kernels */

/* out[i][j] = sum_c a[i][c] bt[c][j] for i < rows (a multiple of 4), j < cols
 * (a multiple of 16), c < dp; a rows are dp floats apart, out and bt rows ld.
 * Four rows by sixteen columns at a time, eight accumulators in registers. */
static void mm_nt(float *out, const float *a, const float *bt, int64_t ld, int64_t rows,
                  int64_t cols, int64_t dp) {
  for (int64_t i = 0; i < rows; i += 4) {
    const float *a0 = a + i * dp;
    for (int64_t j = 0; j < cols; j += 16) {
      v8sf c00 = vsplat(0), c01 = vsplat(0), c10 = vsplat(0), c11 = vsplat(0);
      v8sf c20 = vsplat(0), c21 = vsplat(0), c30 = vsplat(0), c31 = vsplat(0);
      for (int64_t c = 0; c < dp; c++) {
        v8sf b0 = *(const v8sf *)(bt + c * ld + j);
        v8sf b1 = *(const v8sf *)(bt + c * ld + j + 8);
        KEEP_IN_REGISTER(b0);
        KEEP_IN_REGISTER(b1);
        const float x0 = a0[c], x1 = a0[dp + c], x2 = a0[2 * dp + c], x3 = a0[3 * dp + c];
        c00 += b0 * x0; c01 += b1 * x0;
        c10 += b0 * x1; c11 += b1 * x1;
        c20 += b0 * x2; c21 += b1 * x2;
        c30 += b0 * x3; c31 += b1 * x3;
      }
      float *o = out + i * ld + j;
      *(v8sf *)(o) = c00;            *(v8sf *)(o + 8) = c01;
      *(v8sf *)(o + ld) = c10;       *(v8sf *)(o + ld + 8) = c11;
      *(v8sf *)(o + 2 * ld) = c20;   *(v8sf *)(o + 2 * ld + 8) = c21;
      *(v8sf *)(o + 3 * ld) = c30;   *(v8sf *)(o + 3 * ld + 8) = c31;
    }
  }
}

/* acc[i][c] += sum_j pt[j][i] x[j][c] for i < rows (a multiple of 4),
 * j < inner, c < dp: pt is the TRANSPOSED coefficient matrix, rows ld floats
 * apart (so the four coefficients of a step are adjacent); x and acc rows
 * are dp floats apart. */
static void mm_tn_acc(float *acc, const float *pt, int64_t ld, const float *x, int64_t rows,
                      int64_t inner, int64_t dp) {
  for (int64_t i = 0; i < rows; i += 4) {
    for (int64_t c = 0; c < dp; c += 16) {
      float *o = acc + i * dp + c;
      v8sf a00 = *(v8sf *)(o), a01 = *(v8sf *)(o + 8);
      v8sf a10 = *(v8sf *)(o + dp), a11 = *(v8sf *)(o + dp + 8);
      v8sf a20 = *(v8sf *)(o + 2 * dp), a21 = *(v8sf *)(o + 2 * dp + 8);
      v8sf a30 = *(v8sf *)(o + 3 * dp), a31 = *(v8sf *)(o + 3 * dp + 8);
      const float *p = pt + i;
      for (int64_t j = 0; j < inner; j++, p += ld) {
        v8sf x0 = *(const v8sf *)(x + j * dp + c);
        v8sf x1 = *(const v8sf *)(x + j * dp + c + 8);
        KEEP_IN_REGISTER(x0);
        KEEP_IN_REGISTER(x1);
        const float y0 = p[0], y1 = p[1], y2 = p[2], y3 = p[3];
        a00 += x0 * y0; a01 += x1 * y0;
        a10 += x0 * y1; a11 += x1 * y1;
        a20 += x0 * y2; a21 += x1 * y2;
        a30 += x0 * y3; a31 += x1 * y3;
      }
      *(v8sf *)(o) = a00;            *(v8sf *)(o + 8) = a01;
      *(v8sf *)(o + dp) = a10;       *(v8sf *)(o + dp + 8) = a11;
      *(v8sf *)(o + 2 * dp) = a20;   *(v8sf *)(o + 2 * dp + 8) = a21;
      *(v8sf *)(o + 3 * dp) = a30;   *(v8sf *)(o + 3 * dp + 8) = a31;
    }
  }
}

/* ----------------------------------------------------------------- loading */

/* A row of lse -inf attends to nothing. */
static inline int dead_row(const float *lse, int64_t lse_stride, int64_t t) {
  return lse && lse[t * lse_stride] == -INFINITY;
}

/* Rows t0 .. t0+count of a run (row t at base + t*stride elements, times
 * `mul`) into dst, rows dp floats apart; rows count .. total, dead rows (lse
 * -inf; lse may be NULL) and the padding columns are zero. */
static void load_rows(float *dst, const void *base, int64_t stride, ra_dtype dtype, int64_t d,
                      int64_t dp, float mul, int64_t t0, int64_t count, int64_t total,
                      const float *lse, int64_t lse_stride) {
  const size_t es = ra_dtype_size(dtype);
  for (int64_t t = 0; t < total; t++) {
    float *r = dst + t * dp;
    if (t < count && !dead_row(lse, lse_stride, t0 + t)) {
      ra_load_row(r, (const char *)base + (size_t)((t0 + t) * stride) * es, dtype,
                  d, mul);
      memset(r + d, 0, sizeof(float) * (size_t)(dp - d));
    } else {
      memset(r, 0, sizeof(float) * (size_t)dp);
    }
  }
}

/* The same, transposed: dst[c][t] = row t column c, dst rows ld floats
 * apart, for t < total (<= ld) and c < dp. */
static void load_cols(float *dst, int64_t ld, const void *base, int64_t stride, ra_dtype dtype,
                      int64_t d, int64_t dp, float mul, int64_t count, int64_t total,
                      const float *lse, int64_t lse_stride) {
  const size_t es = ra_dtype_size(dtype);
  float chunk[512];
  for (int64_t t = 0; t < total; t++) {
    if (t < count && !dead_row(lse, lse_stride, t)) {
      const char *src = (const char *)base + (size_t)(t * stride) * es;
      for (int64_t c0 = 0; c0 < d; c0 += 512) {
        int64_t w = d - c0 < 512 ? d - c0 : 512;
        ra_load_row(chunk, src + (size_t)c0 * es, dtype, w, mul);
        for (int64_t c = 0; c < w; c++) dst[(c0 + c) * ld + t] = chunk[c];
      }
      for (int64_t c = d; c < dp; c++) dst[c * ld + t] = 0.0f;
    } else {
      for (int64_t c = 0; c < dp; c++) dst[c * ld + t] = 0.0f;
    }
  }
}

/* lse2 (lse * log2 e) and delta of rows t0 .. t0+count; rows past count up to
 * total and dead rows get lse2 = +inf and delta 0, so their P is exactly 0. */
static void load_stats(float *lse2, float *dl, const float *lse, int64_t lse_stride,
                       const float *delta, int64_t delta_stride, int64_t t0, int64_t count,
                       int64_t total) {
  for (int64_t t = 0; t < total; t++) {
    float l = t < count ? lse[(t0 + t) * lse_stride] : -INFINITY;
    if (l == -INFINITY) {
      lse2[t] = INFINITY;
      dl[t] = 0.0f;
    } else {
      lse2[t] = l * LOG2E;
      dl[t] = delta[(t0 + t) * delta_stride];
    }
  }
}

/* ------------------------------------------------------------------ dK, dV */

/* One block of at most KB keys. */
static void dkdv_block(ra_bwd_workspace *ws, ra_dtype dtype, int64_t head_dim, float scale,
                       int causal, int64_t rate, ra_tokens q, const void *dout,
                       int64_t dout_stride, const float *lse, int64_t lse_stride,
                       const float *delta, int64_t delta_stride, ra_tokens k, const void *v,
                       int64_t v_stride, float *dk, float *dv, int64_t dkv_stride) {
  const int64_t d = head_dim, dp = ws->dp, nk = k.count, nq = q.count;
  if (nk <= 0 || nq <= 0) return;

  /* Queries before the block's first key see none of it. */
  int64_t t_begin = 0;
  if (causal) {
    int64_t diff = k.pos0 - q.pos0;
    if (diff > 0) t_begin = (diff + rate - 1) / rate;
    if (t_begin >= nq) return;
  }

  const int64_t cols_k = round16(nk);
  load_cols(ws->kv.kt, KLD, k.ptr, k.stride, dtype, d, dp, 1.0f, nk, cols_k, NULL, 0);
  load_cols(ws->kv.vt, KLD, v, v_stride, dtype, d, dp, 1.0f, nk, cols_k, NULL, 0);
  memset(ws->kv.dk, 0, sizeof(float) * (size_t)(round4(nk) * dp));
  memset(ws->kv.dv, 0, sizeof(float) * (size_t)(round4(nk) * dp));

  for (int64_t t0 = t_begin; t0 < nq; t0 += TILE) {
    const int64_t m = nq - t0 < TILE ? nq - t0 : TILE, rows = round4(m);
    const int64_t qpos0 = q.pos0 + t0 * rate;
    /* keys after the tile's last query are invisible to the whole tile */
    int64_t nkv = nk;
    if (causal) {
      int64_t upto = (qpos0 + (m - 1) * rate - k.pos0) / rate + 1; /* diff >= 0 here */
      if (upto < nkv) nkv = upto;
    }
    const int64_t cols = round16(nkv);

    load_rows(ws->kv.q, q.ptr, q.stride, dtype, d, dp, scale * LOG2E, t0, m, rows, lse, lse_stride);
    load_rows(ws->kv.g, dout, dout_stride, dtype, d, dp, 1.0f, t0, m, rows, lse, lse_stride);
    load_stats(ws->kv.lse2, ws->kv.dl, lse, lse_stride, delta, delta_stride, t0, m, rows);

    mm_nt(ws->kv.s, ws->kv.q, ws->kv.kt, KLD, rows, cols, dp);
    mm_nt(ws->kv.ds, ws->kv.g, ws->kv.vt, KLD, rows, cols, dp);

    /* P and dS, queries as rows: key j is visible to query i of the tile
     * when j < upto_i. */
    for (int64_t i = 0; i < rows; i++) {
      int64_t upto = i < m ? nkv : 0;
      if (causal && upto) {
        int64_t u = (qpos0 + i * rate - k.pos0) / rate + 1; /* diff >= 0 here */
        if (u < upto) upto = u;
      }
      const v8si vhi = vsplati((int32_t)upto);
      const v8sf l2 = vsplat(ws->kv.lse2[i]), dl = vsplat(ws->kv.dl[i]);
      v8sf *s = (v8sf *)(ws->kv.s + i * KLD), *ds = (v8sf *)(ws->kv.ds + i * KLD);
      for (int64_t b = 0; b < cols / VW; b++) {
        v8si idx = iota8 + vsplati((int32_t)(b * VW));
        v8sf p = vselect(idx < vhi, vexp2(s[b] - l2), vsplat(0.0f));
        s[b] = p;
        ds[b] = p * (ds[b] - dl);
      }
    }

    mm_tn_acc(ws->kv.dv, ws->kv.s, KLD, ws->kv.g, round4(nkv), m, dp);
    mm_tn_acc(ws->kv.dk, ws->kv.ds, KLD, ws->kv.q, round4(nkv), m, dp);
  }

  /* dK_j = scale * sum dS q = ln2 * sum dS (q * scale * log2 e) */
  for (int64_t j = 0; j < nk; j++) {
    const float *a = ws->kv.dk + j * dp, *b = ws->kv.dv + j * dp;
    float *x = dk + j * dkv_stride, *y = dv + j * dkv_stride;
    for (int64_t c = 0; c < d; c++) {
      x[c] += LN2 * a[c];
      y[c] += b[c];
    }
  }
}

/* ---------------------------------------------------------------------- dQ */

/* One block of at most QB queries. */
static void dq_block(ra_bwd_workspace *ws, ra_dtype dtype, int64_t head_dim, float scale,
                     int causal, int64_t rate, ra_tokens q, const void *dout,
                     int64_t dout_stride, const float *lse, int64_t lse_stride,
                     const float *delta, int64_t delta_stride, ra_tokens k, const void *v,
                     int64_t v_stride, float *dq, int64_t dq_stride) {
  const int64_t d = head_dim, dp = ws->dp, nq = q.count;
  if (nq <= 0) return;

  /* Keys after the last query are invisible to the whole block. */
  int64_t nk = k.count;
  if (causal) {
    int64_t diff = q.pos0 + (nq - 1) * rate - k.pos0;
    int64_t upto = diff < 0 ? 0 : diff / rate + 1;
    if (upto < nk) nk = upto;
  }
  if (nk <= 0) return;

  const int64_t cols_q = round16(nq);
  load_cols(ws->qq.qt, QLD, q.ptr, q.stride, dtype, d, dp, scale * LOG2E, nq, cols_q, lse, lse_stride);
  load_cols(ws->qq.gt, QLD, dout, dout_stride, dtype, d, dp, 1.0f, nq, cols_q, lse, lse_stride);
  load_stats(ws->qq.lse2, ws->qq.dl, lse, lse_stride, delta, delta_stride, 0, nq, cols_q);
  memset(ws->qq.dq, 0, sizeof(float) * (size_t)(round4(nq) * dp));

  for (int64_t j0 = 0; j0 < nk; j0 += TILE) {
    const int64_t n = nk - j0 < TILE ? nk - j0 : TILE, rows = round4(n);
    const int64_t kpos0 = k.pos0 + j0 * rate;
    /* queries before the tile's first key see none of it */
    int64_t i0 = 0;
    if (causal) {
      int64_t diff = kpos0 - q.pos0;
      if (diff > 0) i0 = (diff + rate - 1) / rate / 16 * 16; /* < nq */
    }

    load_rows(ws->qq.k, k.ptr, k.stride, dtype, d, dp, 1.0f, j0, n, rows, NULL, 0);
    load_rows(ws->qq.v, v, v_stride, dtype, d, dp, 1.0f, j0, n, rows, NULL, 0);

    mm_nt(ws->qq.s + i0, ws->qq.k, ws->qq.qt + i0, QLD, rows, cols_q - i0, dp);
    mm_nt(ws->qq.ds + i0, ws->qq.v, ws->qq.gt + i0, QLD, rows, cols_q - i0, dp);

    /* P and dS, keys as rows: query i is visible to key j of the tile when
     * lo_j <= i < nq. */
    const v8si vhi = vsplati((int32_t)nq);
    for (int64_t j = 0; j < rows; j++) {
      int64_t lo = 0;
      if (j >= n) lo = QB;
      else if (causal) {
        int64_t diff = kpos0 + j * rate - q.pos0;
        if (diff > 0) lo = (diff + rate - 1) / rate;
        if (lo > QB) lo = QB;
      }
      const v8si vlo = vsplati((int32_t)lo);
      v8sf *s = (v8sf *)(ws->qq.s + j * QLD), *ds = (v8sf *)(ws->qq.ds + j * QLD);
      const v8sf *l2 = (const v8sf *)ws->qq.lse2, *dl = (const v8sf *)ws->qq.dl;
      for (int64_t b = i0 / VW; b < cols_q / VW; b++) {
        v8si idx = iota8 + vsplati((int32_t)(b * VW));
        v8sf p = vselect((idx >= vlo) & (idx < vhi), vexp2(s[b] - l2[b]), vsplat(0.0f));
        ds[b] = p * (ds[b] - dl[b]);
      }
    }

    mm_tn_acc(ws->qq.dq + i0 * dp, ws->qq.ds + i0, QLD, ws->qq.k, round4(nq) - i0, n, dp);
  }

  for (int64_t t = 0; t < nq; t++) {
    const float *a = ws->qq.dq + t * dp;
    float *x = dq + t * dq_stride;
    for (int64_t c = 0; c < d; c++) x[c] += scale * a[c];
  }
}

/* ------------------------------------------------------------------ entries */

/* Longer runs than one block are taken a block at a time (each block writes
 * only its own rows), so the block sizes are a performance hint, not a limit. */

void ra_cpu_backward_dkdv(ra_bwd_workspace *ws, ra_dtype dtype, int64_t head_dim, float scale,
                          int causal, int64_t rate, ra_tokens q, const void *dout,
                          int64_t dout_stride, const float *lse, int64_t lse_stride,
                          const float *delta, int64_t delta_stride, ra_tokens k, const void *v,
                          int64_t v_stride, float *dk, float *dv, int64_t dkv_stride) {
  const size_t es = ra_dtype_size(dtype);
  for (int64_t j0 = 0; j0 < k.count; j0 += KB) {
    ra_tokens kb = {(const char *)k.ptr + (size_t)(j0 * k.stride) * es, k.stride,
                    k.count - j0 < KB ? k.count - j0 : KB, k.pos0 + j0 * rate};
    dkdv_block(ws, dtype, head_dim, scale, causal, rate, q, dout, dout_stride, lse, lse_stride,
               delta, delta_stride, kb, (const char *)v + (size_t)(j0 * v_stride) * es, v_stride,
               dk + j0 * dkv_stride, dv + j0 * dkv_stride, dkv_stride);
  }
}

void ra_cpu_backward_dq(ra_bwd_workspace *ws, ra_dtype dtype, int64_t head_dim, float scale,
                        int causal, int64_t rate, ra_tokens q, const void *dout,
                        int64_t dout_stride, const float *lse, int64_t lse_stride,
                        const float *delta, int64_t delta_stride, ra_tokens k, const void *v,
                        int64_t v_stride, float *dq, int64_t dq_stride) {
  const size_t es = ra_dtype_size(dtype);
  for (int64_t t0 = 0; t0 < q.count; t0 += QB) {
    ra_tokens qb = {(const char *)q.ptr + (size_t)(t0 * q.stride) * es, q.stride,
                    q.count - t0 < QB ? q.count - t0 : QB, q.pos0 + t0 * rate};
    dq_block(ws, dtype, head_dim, scale, causal, rate, qb,
             (const char *)dout + (size_t)(t0 * dout_stride) * es, dout_stride,
             lse + t0 * lse_stride, lse_stride, delta + t0 * delta_stride, delta_stride, k, v,
             v_stride, dq + t0 * dq_stride, dq_stride);
  }
}
