/*
 * kernel.c -- flash-style attention of one query block on the CPU.
 *
 * One call takes up to RA_CPU_BLOCK_Q queries of one cell (one batch, head,
 * branch offset and segment) and a run of keys of the same cell, walks the
 * keys in tiles of BK with an online softmax (running max m, sum l, fp32
 * accumulator), and merges the normalised result into the caller's rows by
 * log-sum-exp.  Nothing larger than one BK x QB tile of scores exists.
 *
 * Layout (see micro.h): queries run along the vector lanes.  The query
 * block is packed once, transposed and pre-scaled, into column blocks of QB
 * queries; every key tile is packed once into fp32 rows (fp16 converted
 * here) and then used by all column blocks.  Per (tile, column block):
 * scores S^T = K Q^T, the softmax down the columns (vector max, vector exp),
 * and O^T += V^T P^T with the rescale by alpha folded into the accumulators'
 * load.  Causal tiles are cut per column block to the keys its last query
 * sees; only the tile rows crossing the diagonal are masked.
 *
 * Dilation is pure index arithmetic: the caller hands runs of tokens with a
 * stride of r rows.  Scores are kept in base 2: queries are pre-scaled by
 * scale*log2(e), so exp2 replaces exp and the log-sum-exp is converted back
 * at the end.
 *
 * This file is compiled once per ISA (meson.build, isa.c): its external
 * names get a suffix from isa_names.h.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cpu/half.h"
#include "cpu/cpu.h"
#include "cpu/micro.h"
#include "cpu/simd.h"

#define BQ RA_CPU_BLOCK_Q
#define QB RA_QB
#define NV RA_NV
#define MR RA_MR
#define BK 96 /* keys per tile: a multiple of MR (6 or 3) */
#define NBLK (BQ / QB)

#if BK % MR != 0 || BQ % QB != 0 || MR < 2 || MR > 6 /* block_values' tails */
#error "tile sizes must be multiples of the micro-tile"
#endif

struct ra_workspace {
  int64_t d, ld; /* head dim; row stride of k and v */
  float *qt;    /* [NBLK][d][QB] scaled queries, transposed; then the output rows [BQ][d] */
  float *ot;    /* [NBLK][d][QB] unnormalised output, transposed */
  float *s;     /* [BK][QB]      scores, then probabilities, of one column block */
  float *k, *v; /* [BK][ld]      the key tile's keys and values in fp32 */
  float *row;   /* [d]           one converted query row */
  float *m, *l, *lse; /* [BQ]    running max (base 2), sum, final lse */
};

/* Rows of k and v an odd number of cache lines apart: the micro-kernels
 * read a few columns of many rows, which would otherwise crowd into a few
 * L1 sets (d = 128: rows 512 bytes apart use 8 of the 64 sets). */
static size_t row_stride(size_t d) {
  size_t ld = (d + 15) / 16 * 16;
  return ld / 16 % 2 ? ld : ld + 16;
}

static size_t workspace_floats(size_t d) {
  return 2 * (size_t)BQ * d + (size_t)BK * QB + 2 * (size_t)BK * row_stride(d) + d + 3 * (size_t)BQ;
}

size_t ra_workspace_bytes(int64_t head_dim) {
  /* the struct, alignment, the floats and 64 bytes of slack per array */
  return sizeof(struct ra_workspace) + 64 + workspace_floats((size_t)head_dim) * sizeof(float) + 9 * 64;
}

static float *carve(float **p, size_t n) {
  float *a = *p;
  *p += (n + 15) / 16 * 16; /* keep every array 64-byte aligned */
  return a;
}

/* Carve the scratch out of `mem` (ra_workspace_bytes(head_dim) bytes, 64-byte
 * aligned).  Everything is zeroed once so that the stale key rows a tail
 * tile's last micro-tile reads (and ignores) are initialised memory. */
ra_workspace *ra_workspace_init(void *mem, int64_t head_dim) {
  ra_workspace *ws = (ra_workspace *)mem;
  const size_t d = (size_t)head_dim;
  float *p = (float *)((char *)mem + (sizeof *ws + 63) / 64 * 64), *start = p;
  ws->d = head_dim;
  ws->ld = (int64_t)row_stride(d);
  ws->qt = carve(&p, BQ * d);
  ws->ot = carve(&p, BQ * d);
  ws->s = carve(&p, (size_t)BK * QB);
  ws->k = carve(&p, BK * row_stride(d));
  ws->v = carve(&p, BK * row_stride(d));
  ws->row = carve(&p, d);
  ws->m = carve(&p, BQ);
  ws->l = carve(&p, BQ);
  ws->lse = carve(&p, BQ);
  memset(start, 0, sizeof(float) * (size_t)(p - start));
  return ws;
}

/* ----------------------------------------------------------------- helpers */

static inline int64_t floor_div(int64_t a, int64_t b) { /* b > 0 */
  int64_t q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}

static inline vf vfmax(vf a, vf b) { return vfselect(b > a, b, a); }

/* ----------------------------------------------------------------- packing */

/* Queries of the block into column blocks of qt, transposed and multiplied
 * by `mul`; the columns past the run are zero queries. */
static void pack_queries(ra_workspace *ws, ra_dtype dtype, float mul, ra_tokens q, int64_t nblk) {
  const int64_t d = ws->d;
  const size_t es = ra_dtype_size(dtype);
  for (int64_t t = 0; t < nblk * QB; t++) {
    float *col = ws->qt + (t / QB) * d * QB + t % QB;
    if (t < q.count) {
      ra_load_row(ws->row, (const char *)q.ptr + (size_t)(t * q.stride) * es, dtype, d, mul);
      for (int64_t c = 0; c < d; c++) col[c * QB] = ws->row[c];
    } else {
      for (int64_t c = 0; c < d; c++) col[c * QB] = 0.0f;
    }
  }
}

/* Rows j0..j0+n of the key and value runs into fp32 rows of ws->k, ws->v. */
static void pack_tile(ra_workspace *ws, ra_dtype dtype, ra_tokens k, const void *v, int64_t v_stride,
                      int64_t j0, int64_t n) {
  const int64_t d = ws->d, ld = ws->ld;
  const size_t es = ra_dtype_size(dtype);
  for (int64_t j = 0; j < n; j++) {
    ra_load_row(ws->k + j * ld, (const char *)k.ptr + (size_t)((j0 + j) * k.stride) * es, dtype, d, 1.0f);
    ra_load_row(ws->v + j * ld, (const char *)v + (size_t)((j0 + j) * v_stride) * es, dtype, d, 1.0f);
  }
}

/* Ask for rows [j0, j1) of the key and value runs ahead of their packing:
 * rows a head-stride apart each sit on their own page, where the hardware
 * prefetchers do not follow, so the next tile is fetched while this one is
 * being multiplied. */
static void prefetch_rows(ra_dtype dtype, int64_t d, ra_tokens k, const void *v, int64_t v_stride, int64_t j0,
                          int64_t j1) {
  const size_t es = ra_dtype_size(dtype), bytes = (size_t)d * es;
  for (int64_t j = j0; j < j1; j++) {
    const char *kp = (const char *)k.ptr + (size_t)(j * k.stride) * es;
    const char *vp = (const char *)v + (size_t)(j * v_stride) * es;
    for (size_t x = 0; x < bytes; x += 64) {
      __builtin_prefetch(kp + x, 0, 2);
      __builtin_prefetch(vp + x, 0, 2);
    }
  }
}

/* ------------------------------------------------------------ the products */

/* s[0:n][0:QB] = K[0:n] . Q^T of column block qt (n rounded up to MR: the
 * extra rows are stale keys whose scores nobody reads), and their column
 * maxima into mx. */
static void block_scores(ra_workspace *ws, const float *qt, int64_t n, vf *mx) {
  const int64_t d = ws->d, ld = ws->ld;
  for (int v = 0; v < NV; v++) mx[v] = vfsplat(-INFINITY);
  for (int64_t j = 0; j < n; j += MR)
    micro_scores(ws->s + j * QB, ws->k + j * ld, ld, qt, d, mx, (int)(n - j < MR ? n - j : MR), MR);
}

/* ot = alpha * ot + V[0:n]^T . P[0:n] for one column block: MR head dims at
 * a time, the last d % MR by a narrower instance of the same micro-kernel. */
static void block_values(ra_workspace *ws, float *ot, int64_t n, const vf *alpha) {
  const int64_t d = ws->d, ld = ws->ld;
  int64_t c = 0;
  for (; c + MR <= d; c += MR) micro_values(ot + c * QB, ws->v + c, ld, ws->s, n, alpha, MR);
  switch (d - c) {
#define TAIL(w) case w: micro_values(ot + c * QB, ws->v + c, ld, ws->s, n, alpha, w); break;
#if MR > 5
    TAIL(5)
#endif
#if MR > 4
    TAIL(4)
#endif
#if MR > 3
    TAIL(3)
#endif
    TAIL(2) TAIL(1)
#undef TAIL
    default: break;
  }
}

/* ----------------------------------------------------------- online softmax */

/* Causal mask of the tile rows that cross the diagonal: key row j sees the
 * queries i >= j - f of the column block (f = floor of the position offset
 * in steps of the rate), so rows j > f lose their first j - f lanes.  The
 * column maxima mx are taken again over what stays visible. */
static void mask_block(float *s, int64_t n, int64_t f, vf *mx) {
  vfi lane[NV];
  for (int v = 0; v < NV; v++)
    for (int x = 0; x < VF; x++) lane[v][x] = v * VF + x;
  for (int64_t j = f + 1 > 0 ? f + 1 : 0; j < n; j++) {
    const vfi thr = vfsplati((int32_t)(j - f < QB ? j - f : QB));
    for (int v = 0; v < NV; v++) {
      vf *x = (vf *)(s + j * QB + v * VF);
      *x = vfselect(lane[v] < thr, vfsplat(-INFINITY), *x);
    }
  }
  for (int v = 0; v < NV; v++) mx[v] = vfsplat(-INFINITY);
  for (int64_t j = 0; j < n; j++)
    for (int v = 0; v < NV; v++) mx[v] = vfmax(mx[v], *(const vf *)(s + j * QB + v * VF));
}

/* Scores of n key rows, whose column maxima are mx, into probabilities
 * against the running max m of the block's queries; updates m and the
 * running sum l and returns in alpha the factor the earlier output must be
 * scaled by.  A NaN score makes its probability, and so the query's sum and
 * output, NaN: NaN inputs stay visible whatever the max does with them. */
static void softmax_block(float *s, int64_t n, const vf *mx, float *m, float *l, vf *alpha) {
  vf mu[NV], sum[NV];
  for (int v = 0; v < NV; v++) sum[v] = vfsplat(0.0f);
  for (int v = 0; v < NV; v++) {
    const vf m_old = *(vf *)(m + v * VF), m_new = vfmax(m_old, mx[v]);
    /* a query that sees no key yet keeps m = -inf; subtract 0 instead */
    mu[v] = vfselect(m_new == vfsplat(-INFINITY), vfsplat(0.0f), m_new);
    alpha[v] = vfexp2_neg(m_old - mu[v]);
    *(vf *)(m + v * VF) = m_new;
  }
  for (int64_t j = 0; j < n; j++)
    for (int v = 0; v < NV; v++) {
      vf *x = (vf *)(s + j * QB + v * VF);
      *x = vfexp2_neg(*x - mu[v]);
      sum[v] += *x;
    }
  for (int v = 0; v < NV; v++) *(vf *)(l + v * VF) = *(vf *)(l + v * VF) * alpha[v] + sum[v];
}

/* ------------------------------------------------------------------- entry */

void ra_cpu_attend(ra_workspace *ws, ra_dtype dtype, int64_t head_dim,
                   float scale, int causal, int64_t rate, ra_tokens q,
                   ra_tokens k, const void *v, int64_t v_stride, float *acc,
                   int64_t acc_stride, float *lse, int64_t lse_stride) {
  const int64_t d = head_dim, nq = q.count;
  if (nq <= 0) return;
  const int64_t nblk = (nq + QB - 1) / QB;

  /* Keys after the last query are invisible to the whole block. */
  int64_t nk = k.count;
  if (causal) {
    const int64_t upto = floor_div(q.pos0 + (nq - 1) * rate - k.pos0, rate) + 1;
    if (upto < nk) nk = upto;
  }
  if (nk <= 0) return;

  pack_queries(ws, dtype, scale * LOG2E, q, nblk);
  memset(ws->ot, 0, sizeof(float) * (size_t)(nblk * QB * d));
  for (int64_t t = 0; t < nblk * QB; t++) {
    ws->m[t] = -INFINITY;
    ws->l[t] = 0.0f;
  }

  for (int64_t j0 = 0; j0 < nk; j0 += BK) {
    const int64_t n = nk - j0 < BK ? nk - j0 : BK;
    const int64_t kpos0 = k.pos0 + j0 * rate;
    pack_tile(ws, dtype, k, v, v_stride, j0, n);
    /* the next tile's rows [next0, next1) are fetched meanwhile, a share per column block */
    const int64_t next0 = j0 + n, next1 = next0 + BK < nk ? next0 + BK : nk;
    const int64_t share = (next1 - next0 + nblk - 1) / nblk;
    for (int64_t b = 0; b < nblk; b++) {
      const int64_t p0 = next0 + b * share, p1 = p0 + share < next1 ? p0 + share : next1;
      if (p0 < p1) prefetch_rows(dtype, d, k, v, v_stride, p0, p1);
      int64_t rows = n, f = 0;
      if (causal) {
        /* key j of the tile sees query i of the block iff j - i <= f */
        const int64_t last = (nq - b * QB < QB ? nq - b * QB : QB) - 1;
        f = floor_div(q.pos0 + b * QB * rate - kpos0, rate);
        if (last + f + 1 < rows) rows = last + f + 1;
        if (rows <= 0) continue; /* the tile is above the diagonal for this block */
      }
      vf alpha[NV], mx[NV];
      block_scores(ws, ws->qt + b * d * QB, rows, mx);
      if (causal && rows - 1 > f) mask_block(ws->s, rows, f, mx);
      softmax_block(ws->s, rows, mx, ws->m + b * QB, ws->l + b * QB, alpha);
      block_values(ws, ws->ot + b * d * QB, rows, alpha);
    }
  }

  /* normalise, transpose into rows (over the packed queries) and merge */
  float *out = ws->qt;
  for (int64_t t = 0; t < nq; t++) {
    const float l = ws->l[t], *col = ws->ot + (t / QB) * d * QB + t % QB;
    const float inv = l > 0.0f ? 1.0f / l : 1.0f;
    for (int64_t c = 0; c < d; c++) out[t * d + c] = col[c * QB] * inv;
    /* a NaN sum keeps NaN inputs visible; a zero one means no key was seen */
    ws->lse[t] = l > 0.0f ? (ws->m[t] + log2f(l)) * LN2 : (l == l ? -INFINITY : NAN);
  }
  ra_merge_rows(acc, acc_stride, lse, lse_stride, out, d, ws->lse, nq, d);
}
