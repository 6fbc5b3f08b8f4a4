/*
 * kernel.c -- flash-style attention of one query block on the CPU.
 *
 * One call takes up to RA_CPU_BLOCK_Q queries of one cell (one batch, head,
 * branch offset and segment) and a run of keys of the same cell, walks the
 * keys in tiles of BK with an online softmax (running max m, sum l, fp32
 * accumulator), and merges the normalised result into the caller's rows by
 * log-sum-exp.  Nothing larger than one BQ x BK tile of scores exists.
 *
 * Dilation is pure index arithmetic: the caller hands runs of tokens with a
 * stride of r rows, and the kernel packs one tile at a time into fp32
 * scratch (transposing keys) so the inner loops are dense and vectorised.
 * Scores are kept in base 2: queries are pre-scaled by scale*log2(e), so
 * exp2 replaces exp and the log-sum-exp is converted back at the end.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cpu/half.h"
#include "cpu/cpu.h"
#include "cpu/simd.h"

#define BQ RA_CPU_BLOCK_Q
#define BK 64
/* Row strides of the kt and s tiles: BK plus 16 floats, so that walking a
 * column does not keep hitting the same few L1 sets (64 floats = 256 bytes). */
#define LD (BK + 16)


struct ra_workspace {
  int64_t dp;      /* head dim padded to a multiple of 16 */
  float *q;        /* [BQ][dp]  scaled queries            */
  float *kt;       /* [dp][LD]  keys, transposed          */
  float *v;        /* [BK][dp]  values                    */
  float *s;        /* [BQ][LD]  scores, then probabilities */
  float *o;        /* [BQ][dp]  unnormalised output        */
  float *m, *l, *lse; /* [BQ] running max, sum, final lse  */
};

static int64_t padded_dim(int64_t d) { return (d + 15) / 16 * 16; }

size_t ra_workspace_bytes(int64_t head_dim) {
  size_t dp = (size_t)padded_dim(head_dim);
  size_t floats = BQ * dp * 2 + dp * LD + BK * dp + BQ * LD + 3 * BQ;
  return sizeof(struct ra_workspace) + 64 + floats * sizeof(float) + 8 * 64;
}

/* Carve the scratch out of `mem` (ra_workspace_bytes(head_dim) bytes, 64-byte
 * aligned).  Padding columns are zeroed here once and never written again,
 * so a padded head dimension adds only zero products. */
ra_workspace *ra_workspace_init(void *mem, int64_t head_dim) {
  ra_workspace *ws = (ra_workspace *)mem;
  int64_t dp = padded_dim(head_dim);
  float *p = (float *)((char *)mem + (sizeof *ws + 63) / 64 * 64);
  ws->dp = dp;
  ws->q = p;   p += BQ * dp;
  ws->kt = p;  p += dp * LD;
  ws->v = p;   p += BK * dp;
  ws->s = p;   p += BQ * LD;
  ws->o = p;   p += BQ * dp;
  ws->m = p;   p += BQ;
  ws->l = p;   p += BQ;
  ws->lse = p;
  memset(ws->q, 0, sizeof(float) * (size_t)(BQ * dp * 2 + dp * LD + BK * dp + BQ * LD));
  return ws;
}

/* ---------------------------------------------------------- vector helpers */

/* Largest element; NaN if any element is NaN, so NaN inputs stay visible. */
static inline float hmax(v8sf x) {
  float m = x[0];
  for (int i = 1; i < VW; i++) m = (x[i] > m || x[i] != x[i]) ? x[i] : m;
  return m;
}

static inline float hsum(v8sf x) {
  return ((x[0] + x[4]) + (x[1] + x[5])) + ((x[2] + x[6]) + (x[3] + x[7]));
}

/* ------------------------------------------------------------ micro-kernels */

/* s[0:rows][0:BK] = q[0:rows][0:dp] . kt, four rows by sixteen columns at a
 * time so that eight accumulators stay in registers. */
static void tile_scores(const ra_workspace *ws, int64_t rows) {
  const int64_t dp = ws->dp;
  for (int64_t i = 0; i < rows; i += 4) {
    const float *q0 = ws->q + i * dp;
    for (int64_t j = 0; j < BK; j += 16) {
      v8sf a00 = vsplat(0), a01 = vsplat(0), a10 = vsplat(0), a11 = vsplat(0);
      v8sf a20 = vsplat(0), a21 = vsplat(0), a30 = vsplat(0), a31 = vsplat(0);
      for (int64_t c = 0; c < dp; c++) {
        v8sf k0 = *(const v8sf *)(ws->kt + c * LD + j);
        v8sf k1 = *(const v8sf *)(ws->kt + c * LD + j + 8);
        KEEP_IN_REGISTER(k0);
        KEEP_IN_REGISTER(k1);
        const float x0 = q0[c], x1 = q0[dp + c], x2 = q0[2 * dp + c], x3 = q0[3 * dp + c];
        a00 += k0 * x0; a01 += k1 * x0;
        a10 += k0 * x1; a11 += k1 * x1;
        a20 += k0 * x2; a21 += k1 * x2;
        a30 += k0 * x3; a31 += k1 * x3;
      }
      float *s = ws->s + i * LD + j;
      *(v8sf *)(s) = a00;            *(v8sf *)(s + 8) = a01;
      *(v8sf *)(s + LD) = a10;       *(v8sf *)(s + LD + 8) = a11;
      *(v8sf *)(s + 2 * LD) = a20;   *(v8sf *)(s + 2 * LD + 8) = a21;
      *(v8sf *)(s + 3 * LD) = a30;   *(v8sf *)(s + 3 * LD + 8) = a31;
    }
  }
}

/* o[0:rows][0:dp] += s[0:rows][0:cols] . v, same register blocking. */
static void tile_accumulate(ra_workspace *ws, int64_t rows, int64_t cols) {
  const int64_t dp = ws->dp;
  for (int64_t i = 0; i < rows; i += 4) {
    const float *p0 = ws->s + i * LD;
    for (int64_t c = 0; c < dp; c += 16) {
      float *o = ws->o + i * dp + c;
      v8sf a00 = *(v8sf *)(o), a01 = *(v8sf *)(o + 8);
      v8sf a10 = *(v8sf *)(o + dp), a11 = *(v8sf *)(o + dp + 8);
      v8sf a20 = *(v8sf *)(o + 2 * dp), a21 = *(v8sf *)(o + 2 * dp + 8);
      v8sf a30 = *(v8sf *)(o + 3 * dp), a31 = *(v8sf *)(o + 3 * dp + 8);
      for (int64_t j = 0; j < cols; j++) {
        v8sf v0 = *(const v8sf *)(ws->v + j * dp + c);
        v8sf v1 = *(const v8sf *)(ws->v + j * dp + c + 8);
        KEEP_IN_REGISTER(v0);
        KEEP_IN_REGISTER(v1);
        const float x0 = p0[j], x1 = p0[LD + j], x2 = p0[2 * LD + j], x3 = p0[3 * LD + j];
        a00 += v0 * x0; a01 += v1 * x0;
        a10 += v0 * x1; a11 += v1 * x1;
        a20 += v0 * x2; a21 += v1 * x2;
        a30 += v0 * x3; a31 += v1 * x3;
      }
      *(v8sf *)(o) = a00;            *(v8sf *)(o + 8) = a01;
      *(v8sf *)(o + dp) = a10;       *(v8sf *)(o + dp + 8) = a11;
      *(v8sf *)(o + 2 * dp) = a20;   *(v8sf *)(o + 2 * dp + 8) = a21;
      *(v8sf *)(o + 3 * dp) = a30;   *(v8sf *)(o + 3 * dp + 8) = a31;
    }
  }
}

/* ----------------------------------------------------------------- loading */

static void load_queries(ra_workspace *ws, ra_dtype dtype, int64_t d, float mul,
                         ra_tokens q, int64_t rows) {
  const size_t es = ra_dtype_size(dtype);
  for (int64_t t = 0; t < q.count; t++)
    ra_load_row(ws->q + t * ws->dp, (const char *)q.ptr + (size_t)(t * q.stride) * es,
                dtype, d, mul);
  /* rows past the run up to the 4-row blocking are zero queries */
  for (int64_t t = q.count; t < rows; t++) memset(ws->q + t * ws->dp, 0, sizeof(float) * (size_t)d);
}

/* Keys j0..j0+n of the run into kt (transposed) and their values into v;
 * columns past n are zeroed so the padded part of the last tile is inert. */
static void load_tile(ra_workspace *ws, ra_dtype dtype, int64_t d, ra_tokens k,
                      const void *v, int64_t v_stride, int64_t j0, int64_t n) {
  const size_t es = ra_dtype_size(dtype);
  float row[512];
  for (int64_t j = 0; j < n; j++) {
    const char *kp = (const char *)k.ptr + (size_t)((j0 + j) * k.stride) * es;
    for (int64_t c0 = 0; c0 < d; c0 += 512) {
      int64_t w = d - c0 < 512 ? d - c0 : 512;
      ra_load_row(row, kp + (size_t)c0 * es, dtype, w, 1.0f);
      for (int64_t c = 0; c < w; c++) ws->kt[(c0 + c) * LD + j] = row[c];
    }
    ra_load_row(ws->v + j * ws->dp, (const char *)v + (size_t)((j0 + j) * v_stride) * es,
                dtype, d, 1.0f);
  }
  for (int64_t j = n; j < BK; j++) {
    for (int64_t c = 0; c < d; c++) ws->kt[c * LD + j] = 0.0f;
    memset(ws->v + j * ws->dp, 0, sizeof(float) * (size_t)d);
  }
}

/* ----------------------------------------------------------- online softmax */

/* Mask invisible scores of the tile to -inf: keys past `n` and, with
 * causality, keys after the query.  Positions: query t at qpos0 + t*rate,
 * key j at kpos0 + j*rate. */
static void mask_tile(ra_workspace *ws, int64_t rows, int64_t n, int causal,
                      int64_t qpos0, int64_t kpos0, int64_t rate) {
  for (int64_t t = 0; t < rows; t++) {
    float *s = ws->s + t * LD;
    int64_t visible = n;
    if (causal) {
      int64_t diff = qpos0 + t * rate - kpos0; /* keys j with j*rate <= diff */
      int64_t upto = diff < 0 ? 0 : diff / rate + 1;
      if (upto < visible) visible = upto;
    }
    for (int64_t j = visible; j < BK; j++) s[j] = -INFINITY;
  }
}

/* Turn scores of rows [0, rows) into probabilities against the running max,
 * rescaling the running sum and output where the max moved. */
static void softmax_tile(ra_workspace *ws, int64_t rows) {
  const int64_t dp = ws->dp;
  for (int64_t t = 0; t < rows; t++) {
    v8sf *s = (v8sf *)(ws->s + t * LD);
    v8sf mx = s[0];
    for (int j = 1; j < BK / VW; j++) mx = vselect((s[j] > mx) | (s[j] != s[j]), s[j], mx);
    float m_new = hmax(mx), m_old = ws->m[t];
    if (m_new == m_new && !(m_new > m_old)) m_new = m_old; /* NaN stays NaN */
    if (m_new == -INFINITY) { /* nothing visible to this row yet */
      for (int j = 0; j < BK / VW; j++) s[j] = vsplat(0.0f);
      continue;
    }
    v8sf sum = vsplat(0.0f);
    for (int j = 0; j < BK / VW; j++) {
      s[j] = vexp2(s[j] - m_new);
      sum += s[j];
    }
    if (m_new != m_old) {
      float alpha = m_old == -INFINITY ? 0.0f : exp2f(m_old - m_new);
      ws->l[t] *= alpha;
      float *o = ws->o + t * dp;
      for (int64_t c = 0; c < dp; c++) o[c] *= alpha;
      ws->m[t] = m_new;
    }
    ws->l[t] += hsum(sum);
  }
}

/* ------------------------------------------------------------------- entry */

void ra_cpu_attend(ra_workspace *ws, ra_dtype dtype, int64_t head_dim,
                   float scale, int causal, int64_t rate, ra_tokens q,
                   ra_tokens k, const void *v, int64_t v_stride, float *acc,
                   int64_t acc_stride, float *lse, int64_t lse_stride) {
  const int64_t d = head_dim, dp = ws->dp, nq = q.count;
  const int64_t rows = (nq + 3) / 4 * 4;
  if (nq <= 0) return;

  /* Keys after the last query are invisible to the whole block. */
  int64_t nk = k.count;
  const int64_t qlast = q.pos0 + (nq - 1) * rate;
  if (causal) {
    int64_t diff = qlast - k.pos0;
    int64_t upto = diff < 0 ? 0 : diff / rate + 1;
    if (upto < nk) nk = upto;
  }
  if (nk <= 0) return;

  load_queries(ws, dtype, d, scale * LOG2E, q, rows);
  memset(ws->o, 0, sizeof(float) * (size_t)(rows * dp));
  for (int64_t t = 0; t < rows; t++) {
    ws->m[t] = -INFINITY;
    ws->l[t] = 0.0f;
  }

  for (int64_t j0 = 0; j0 < nk; j0 += BK) {
    const int64_t n = nk - j0 < BK ? nk - j0 : BK;
    const int64_t kpos0 = k.pos0 + j0 * rate;
    load_tile(ws, dtype, d, k, v, v_stride, j0, n);
    tile_scores(ws, rows);
    if (n < BK || (causal && kpos0 + (n - 1) * rate > q.pos0))
      mask_tile(ws, rows, n, causal, q.pos0, kpos0, rate);
    softmax_tile(ws, rows);
    tile_accumulate(ws, rows, n);
  }

  for (int64_t t = 0; t < nq; t++) {
    float l = ws->l[t], *o = ws->o + t * dp;
    if (l > 0.0f) {
      float inv = 1.0f / l;
      for (int64_t c = 0; c < d; c++) o[c] *= inv;
      ws->lse[t] = (ws->m[t] + log2f(l)) * LN2;
    } else {
      ws->lse[t] = l == l ? -INFINITY : NAN; /* keep NaN inputs visible */
    }
  }
  ra_merge_rows(acc, acc_stride, lse, lse_stride, ws->o, dp, ws->lse, nq, d);
}
