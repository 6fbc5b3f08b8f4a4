/*
 * test_backward.c -- the CPU attention backward (csrc/cpu/backward.c) against
 * a naive double-precision backward written from the formulas:
 *   P_ij = exp(scale q_i.k_j - lse_i), D_i = dO_i.o_i,
 *   dV_j += sum_i P_ij dO_i, dS_ij = P_ij (dO_i.v_j - D_i),
 *   dQ_i += scale sum_j dS_ij k_j, dK_j += scale sum_i dS_ij q_i,
 * with lse and o from a double forward over the run's visible keys plus a
 * set of "extra" keys (another branch / ring step the call does not see), so
 * that lse is the row's final value and the call's share is partial.
 *
 * Every check runs the fused one-pass entry (ra_cpu_backward) and the
 * two-pass pair (ra_cpu_backward_dq, ra_cpu_backward_dkdv), each on its own
 * outputs, and the whole suite runs once per ISA variant of the kernels
 * that this build has and this CPU runs (cpu/isa.h).
 *
 * `test_backward` runs the tests (a "N passed, N failed" line per ISA);
 * `test_backward --bench [n] [d] [causal]` times the functions
 * single-threaded (the default ISA).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cpu/backward.h"
#include "cpu/half.h"
#include "cpu/isa.h"

#include "harness.h"
static float nonzero(float amp) {
  float x = amp * uniform();
  return x == 0.0f ? 0.5f * amp : x;
}

/* ------------------------------------------------------------- test data */

/* A run of `count` rows of d values, rows `stride` elements apart, in dtype;
 * `val` holds the values as the kernel sees them (after fp16 rounding). */
typedef struct rows {
  ra_dtype dtype;
  int64_t count, d, stride;
  void *data;
  double *val; /* [count][d] */
} rows;

static size_t esize(ra_dtype t) { return t == RA_FLOAT16 ? 2 : 4; }

static rows make_rows(ra_dtype dtype, int64_t count, int64_t d, int64_t stride, float amp) {
  rows r = {dtype, count, d, stride, NULL, NULL};
  size_t n = (size_t)(count > 0 ? (count - 1) * stride + d : 1);
  r.data = malloc(n * esize(dtype));
  r.val = malloc(sizeof(double) * (size_t)(count * d + 1));
  /* gaps between rows hold NaN: reading them would show */
  for (size_t i = 0; i < n; i++) {
    if (dtype == RA_FLOAT16) ((uint16_t *)r.data)[i] = 0x7e00u;
    else ((float *)r.data)[i] = NAN;
  }
  for (int64_t t = 0; t < count; t++)
    for (int64_t c = 0; c < d; c++) {
      float x = nonzero(amp);
      size_t at = (size_t)(t * stride + c);
      if (dtype == RA_FLOAT16) {
        uint16_t h = ra_float_to_half(x);
        ((uint16_t *)r.data)[at] = h;
        r.val[t * d + c] = ra_half_to_float(h);
      } else {
        ((float *)r.data)[at] = x;
        r.val[t * d + c] = x;
      }
    }
  return r;
}

static void free_rows(rows *r) {
  free(r->data);
  free(r->val);
}

static const void *row_ptr(const rows *r, int64_t t) {
  return (const char *)r->data + (size_t)(t * r->stride) * esize(r->dtype);
}

/* fp32 output rows `stride` apart; padding after d columns and `extra` rows
 * after count are NaN (must stay NaN); the rows themselves hold random
 * values (accumulation is +=). */
typedef struct out {
  int64_t count, d, stride, extra;
  float *data;
  double *init; /* [count][d] */
} out;

static out make_out(int64_t count, int64_t d, int64_t stride, int64_t extra) {
  out o = {count, d, stride, extra, NULL, NULL};
  size_t n = (size_t)((count + extra) * stride);
  o.data = malloc(sizeof(float) * (n + 1));
  o.init = malloc(sizeof(double) * (size_t)(count * d + 1));
  for (size_t i = 0; i < n; i++) o.data[i] = NAN;
  for (int64_t t = 0; t < count; t++)
    for (int64_t c = 0; c < d; c++) o.data[t * stride + c] = (float)(o.init[t * d + c] = nonzero(1.0f));
  return o;
}

static void free_out(out *o) {
  free(o->data);
  free(o->init);
}

/* Largest |(out - init) - want| / max |want| (+inf on NaN), and whether the
 * padding and extra rows are still NaN.  `mag` (may be NULL): the sums of
 * the terms' absolute values; where the terms cancel (one visible key gives
 * dS = 0 exactly) the error is measured against a tenth of their size. */
static double out_error_mag(const out *o, const double *want, const double *mag, int *poison_ok) {
  double err = 0, big = 1e-30;
  if (mag)
    for (int64_t i = 0; i < o->count * o->d; i++)
      if (0.1 * mag[i] > big) big = 0.1 * mag[i];
  for (int64_t t = 0; t < o->count; t++)
    for (int64_t c = 0; c < o->d; c++) {
      double w = want[t * o->d + c];
      double e = fabs(((double)o->data[t * o->stride + c] - o->init[t * o->d + c]) - w);
      if (!(e <= err)) err = e;
      if (fabs(w) > big) big = fabs(w);
    }
  *poison_ok = 1;
  for (int64_t t = 0; t < o->count + o->extra; t++)
    for (int64_t c = t < o->count ? o->d : 0; c < o->stride; c++)
      if (!isnan(o->data[t * o->stride + c])) *poison_ok = 0;
  return err / big;
}

static double out_error(const out *o, const double *want, int *poison_ok) {
  return out_error_mag(o, want, NULL, poison_ok);
}

/* ------------------------------------------------------- naive reference */

typedef struct bcase {
  ra_dtype dtype;
  int64_t d, nq, nk, ne; /* queries, keys of the run, extra keys         */
  int64_t rate, qpos0, kpos0;
  int causal;
  int dead_every;        /* every dead_every-th query forced dead (0: none) */
} bcase;

typedef struct bdata {
  bcase c;
  float scale;
  rows q, g, k, v, ek, ev; /* g = dO; ek, ev: extra keys (always visible) */
  float *lse, *delta;      /* given, strides 2 and 3                      */
  double *dq, *dk, *dv;    /* reference contributions of the run           */
  double *mq, *mk;         /* sums of |terms| of dq, dk                    */
} bdata;

#define LSE_STRIDE 2
#define DELTA_STRIDE 3

static int visible(const bcase *c, int64_t i, int64_t j) {
  return !c->causal || c->kpos0 + j * c->rate <= c->qpos0 + i * c->rate;
}

static double dot(const double *a, const double *b, int64_t d) {
  double s = 0;
  for (int64_t c = 0; c < d; c++) s += a[c] * b[c];
  return s;
}

static bdata make_case(bcase c, float amp) {
  bdata b;
  const int64_t d = c.d;
  b.c = c;
  b.scale = (float)(1.0 / sqrt((double)d));
  b.q = make_rows(c.dtype, c.nq, d, d + 3, amp);
  b.g = make_rows(c.dtype, c.nq, d, 2 * d + 1, 1.0f);
  b.k = make_rows(c.dtype, c.nk, d, c.rate * d + 5, amp);
  b.v = make_rows(c.dtype, c.nk, d, d + 7, 1.0f);
  b.ek = make_rows(RA_FLOAT32, c.ne, d, d, amp);
  b.ev = make_rows(RA_FLOAT32, c.ne, d, d, 1.0f);
  b.lse = malloc(sizeof(float) * (size_t)(c.nq * LSE_STRIDE + 1));
  b.delta = malloc(sizeof(float) * (size_t)(c.nq * DELTA_STRIDE + 1));
  for (int64_t i = 0; i < c.nq * LSE_STRIDE; i++) b.lse[i] = NAN;
  for (int64_t i = 0; i < c.nq * DELTA_STRIDE; i++) b.delta[i] = NAN;
  b.dq = calloc((size_t)(c.nq * d + 1), sizeof(double));
  b.dk = calloc((size_t)(c.nk * d + 1), sizeof(double));
  b.dv = calloc((size_t)(c.nk * d + 1), sizeof(double));
  b.mq = calloc((size_t)(c.nq * d + 1), sizeof(double));
  b.mk = calloc((size_t)(c.nk * d + 1), sizeof(double));
  double *s = malloc(sizeof(double) * (size_t)(c.nk + c.ne + 1));
  double *o = malloc(sizeof(double) * (size_t)d);
  const double sc = b.scale;
  for (int64_t i = 0; i < c.nq; i++) {
    const double *qi = b.q.val + i * d, *gi = b.g.val + i * d;
    int any = c.ne > 0;
    for (int64_t j = 0; j < c.nk; j++) any |= visible(&c, i, j);
    if (!any || (c.dead_every && i % c.dead_every == 1)) {
      b.lse[i * LSE_STRIDE] = -INFINITY;
      b.delta[i * DELTA_STRIDE] = any ? 0.75f : 0.0f; /* must be ignored */
      continue;
    }
    /* forward in double over run + extra keys */
    double m = -INFINITY;
    for (int64_t j = 0; j < c.nk; j++) {
      s[j] = visible(&c, i, j) ? sc * dot(qi, b.k.val + j * d, d) : -INFINITY;
      if (s[j] > m) m = s[j];
    }
    for (int64_t e = 0; e < c.ne; e++) {
      s[c.nk + e] = sc * dot(qi, b.ek.val + e * d, d);
      if (s[c.nk + e] > m) m = s[c.nk + e];
    }
    double l = 0;
    for (int64_t j = 0; j < c.nk + c.ne; j++) l += exp(s[j] - m);
    const double lse = m + log(l);
    memset(o, 0, sizeof(double) * (size_t)d);
    for (int64_t j = 0; j < c.nk + c.ne; j++) {
      double p = exp(s[j] - lse);
      const double *vj = j < c.nk ? b.v.val + j * d : b.ev.val + (j - c.nk) * d;
      for (int64_t x = 0; x < d; x++) o[x] += p * vj[x];
    }
    b.lse[i * LSE_STRIDE] = (float)lse;
    b.delta[i * DELTA_STRIDE] = (float)dot(gi, o, d);
    /* backward of the run's keys, from the given (fp32) lse and delta */
    const double L = b.lse[i * LSE_STRIDE], D = b.delta[i * DELTA_STRIDE];
    for (int64_t j = 0; j < c.nk; j++) {
      if (!visible(&c, i, j)) continue;
      const double *kj = b.k.val + j * d, *vj = b.v.val + j * d;
      double p = exp(sc * dot(qi, kj, d) - L);
      double dp = dot(gi, vj, d), ds = p * (dp - D), ads = p * (fabs(dp) + fabs(D));
      for (int64_t x = 0; x < d; x++) {
        b.dv[j * d + x] += p * gi[x];
        b.dq[i * d + x] += sc * ds * kj[x];
        b.dk[j * d + x] += sc * ds * qi[x];
        b.mq[i * d + x] += sc * ads * fabs(kj[x]);
        b.mk[j * d + x] += sc * ads * fabs(qi[x]);
      }
    }
  }
  free(s);
  free(o);
  return b;
}

static void free_case(bdata *b) {
  free_rows(&b->q); free_rows(&b->g); free_rows(&b->k); free_rows(&b->v);
  free_rows(&b->ek); free_rows(&b->ev);
  free(b->lse); free(b->delta); free(b->dq); free(b->dk); free(b->dv);
  free(b->mq); free(b->mk);
}

/* -------------------------------------------------------- calling the kernel */

/* The ISA variant under test (main sets it before each run of the suite). */
static const ra_cpu_kernels *K;

static ra_tokens tokens(const rows *r, int64_t t0, int64_t count, int64_t pos0) {
  ra_tokens t = {row_ptr(r, t0), r->stride, count, pos0};
  return t;
}

/* dq for queries [t0, t0+nq) against keys [j0, j0+nk) of the case, in query
 * blocks of at most `block` (<= RA_BWD_BLOCK_Q). */
static void call_dq(ra_bwd_workspace *ws, const bdata *b, int64_t t0, int64_t nq, int64_t j0,
                    int64_t nk, int64_t block, out *dq) {
  const bcase *c = &b->c;
  for (int64_t t = t0; t < t0 + nq; t += block) {
    int64_t m = t0 + nq - t < block ? t0 + nq - t : block;
    K->backward_dq(ws, c->dtype, c->d, b->scale, c->causal, c->rate,
                       tokens(&b->q, t, m, c->qpos0 + t * c->rate), row_ptr(&b->g, t),
                       b->g.stride, b->lse + t * LSE_STRIDE, LSE_STRIDE,
                       b->delta + t * DELTA_STRIDE, DELTA_STRIDE,
                       tokens(&b->k, j0, nk, c->kpos0 + j0 * c->rate), row_ptr(&b->v, j0),
                       b->v.stride, dq->data + t * dq->stride, dq->stride);
  }
}

/* dk, dv for keys [j0, j0+nk) against queries [t0, t0+nq), in key blocks. */
static void call_dkdv(ra_bwd_workspace *ws, const bdata *b, int64_t t0, int64_t nq, int64_t j0,
                      int64_t nk, int64_t block, out *dk, out *dv) {
  const bcase *c = &b->c;
  for (int64_t j = j0; j < j0 + nk; j += block) {
    int64_t n = j0 + nk - j < block ? j0 + nk - j : block;
    K->backward_dkdv(ws, c->dtype, c->d, b->scale, c->causal, c->rate,
                         tokens(&b->q, t0, nq, c->qpos0 + t0 * c->rate), row_ptr(&b->g, t0),
                         b->g.stride, b->lse + t0 * LSE_STRIDE, LSE_STRIDE,
                         b->delta + t0 * DELTA_STRIDE, DELTA_STRIDE,
                         tokens(&b->k, j, n, c->kpos0 + j * c->rate), row_ptr(&b->v, j),
                         b->v.stride, dk->data + j * dk->stride, dv->data + j * dv->stride,
                         dk->stride);
  }
}

/* dq, dk, dv for queries [t0, t0+nq) against keys [j0, j0+nk) in one call
 * of the fused entry. */
static void call_fused(ra_bwd_workspace *ws, const bdata *b, int64_t t0, int64_t nq, int64_t j0,
                       int64_t nk, out *dq, out *dk, out *dv) {
  const bcase *c = &b->c;
  K->backward(ws, c->dtype, c->d, b->scale, c->causal, c->rate, tokens(&b->q, t0, nq, c->qpos0 + t0 * c->rate),
              row_ptr(&b->g, t0), b->g.stride, b->lse + t0 * LSE_STRIDE, LSE_STRIDE, b->delta + t0 * DELTA_STRIDE,
              DELTA_STRIDE, tokens(&b->k, j0, nk, c->kpos0 + j0 * c->rate), row_ptr(&b->v, j0), b->v.stride,
              dq->data + t0 * dq->stride, dq->stride, dk->data + j0 * dk->stride, dv->data + j0 * dv->stride,
              dk->stride);
}

/* The whole case through one entry: 0 the two-pass pair (in blocks), 1 the
 * fused one. */
static void call_entry(int fused, ra_bwd_workspace *ws, const bdata *b, int64_t block_q, int64_t block_k,
                       out *dq, out *dk, out *dv) {
  if (fused) {
    call_fused(ws, b, 0, b->c.nq, 0, b->c.nk, dq, dk, dv);
  } else {
    call_dq(ws, b, 0, b->c.nq, 0, b->c.nk, block_q, dq);
    call_dkdv(ws, b, 0, b->c.nq, 0, b->c.nk, block_k, dk, dv);
  }
}

static void *alloc_ws(int64_t d, ra_bwd_workspace **ws) {
  size_t bytes = K->bwd_workspace_bytes(d);
  void *mem = aligned_alloc(64, (bytes + 63) / 64 * 64);
  *ws = K->bwd_workspace_init(mem, d);
  return mem;
}

/* ------------------------------------------------------------------ tests */

static int verbose;
/* Blocks check_case hands to one call (the caller's choice; longer than
 * RA_BWD_BLOCK_* is allowed and taken a block at a time). */
static int64_t case_block_q = RA_BWD_BLOCK_Q, case_block_k = RA_BWD_BLOCK_K;

/* Run one case against the reference through both entries; returns the
 * worst relative error. */
static double check_case(bcase c, double tol) {
  bdata b = make_case(c, 2.0f);
  ra_bwd_workspace *ws;
  void *mem = alloc_ws(c.d, &ws);
  double worst = 0;
  for (int fused = 0; fused <= 1; fused++) {
    /* dv shares dk's stride, but lives in its own buffer */
    out dq = make_out(c.nq, c.d, c.d + 5, 2), dk = make_out(c.nk, c.d, c.d + 3, 3),
        dv = make_out(c.nk, c.d, c.d + 3, 3);
    call_entry(fused, ws, &b, case_block_q, case_block_k, &dq, &dk, &dv);
    int p1, p2, p3;
    double e1 = out_error_mag(&dq, b.dq, b.mq, &p1), e2 = out_error_mag(&dk, b.dk, b.mk, &p2),
           e3 = out_error(&dv, b.dv, &p3);
    double w = e1 > e2 ? e1 : e2;
    if (e3 > w || e3 != e3) w = e3;
    if (verbose || !(w <= tol) || !(p1 && p2 && p3))
      fprintf(stderr, "  %s %s d=%lld nq=%lld nk=%lld ne=%lld rate=%lld pos0=%lld/%lld causal=%d: "
                      "dq %.2e dk %.2e dv %.2e poison %d%d%d\n",
              fused ? "fused" : "2-pass", c.dtype == RA_FLOAT16 ? "fp16" : "fp32", (long long)c.d,
              (long long)c.nq, (long long)c.nk, (long long)c.ne, (long long)c.rate, (long long)c.qpos0,
              (long long)c.kpos0, c.causal, e1, e2, e3, p1, p2, p3);
    CHECK(w <= tol);
    CHECK(p1 && p2 && p3);
    if (!(w <= worst)) worst = w;
    free_out(&dq); free_out(&dk); free_out(&dv);
  }
  free(mem);
  free_case(&b);
  return worst;
}

static void test_matches_naive(ra_dtype dtype, double tol) {
  static const int64_t dims[] = {8, 64, 80, 128};
  static const int64_t sizes[][2] = {{1, 1}, {37, 53}, {130, 77}, {200, 261}};
  double worst = 0;
  int n = 0;
  for (int di = 0; di < 4; di++)
    for (int64_t rate = 1; rate <= 3; rate++)
      for (int causal = 0; causal <= 1; causal++)
        for (int si = 0; si < 4; si++) {
          if (dims[di] == 128 && si == 3 && rate != 2) continue; /* keep it quick */
          bcase c = {dtype, dims[di], sizes[si][0], sizes[si][1], 0, rate, 0, 0, causal, 0};
          /* positions: same cell (pos0 = off mod rate), keys before/after queries */
          int64_t off = (si + di) % rate;
          c.qpos0 = off + rate * (si * 11);
          c.kpos0 = off + rate * (si % 2 ? si * 7 : si * 13);
          c.ne = (si + rate) % 2 ? 5 : 0;  /* other branch / ring step */
          c.dead_every = si == 2 ? 7 : 0;
          double e = check_case(c, tol);
          if (!(e <= worst)) worst = e;
          n++;
        }
  if (verbose) fprintf(stderr, "  %d cases, worst relative error %.2e\n", n, worst);
}

static void test_fp32(void) { test_matches_naive(RA_FLOAT32, 1e-4); }
static void test_fp16(void) { test_matches_naive(RA_FLOAT16, 1e-2); }

/* Positions not congruent mod rate, keys entirely after the queries, runs
 * that only partly overlap: the causal boundary by plain arithmetic. */
static void test_position_arithmetic(void) {
  static const int64_t pos[][3] = {{2, 0, 5}, {3, 7, 1}, {3, 1, 8}, {2, 100, 0},
                                   {1, 0, 300}, {3, 0, 2000}, {2, 64, 63}, {3, 5, 5}};
  for (int i = 0; i < 8; i++)
    for (int causal = 0; causal <= 1; causal++) {
      bcase c = {RA_FLOAT32, 24, 90, 150, i % 3 == 0 ? 3 : 0, pos[i][0], pos[i][1], pos[i][2],
                 causal, 0};
      check_case(c, 1e-4);
    }
}

/* Head dims of any size (padding, rows longer than the loaders' chunk) and
 * runs longer than one block in a single call. */
static void test_odd_dims_and_long_runs(void) {
  static const int64_t dims[] = {1, 3, 17, 520};
  for (int i = 0; i < 4; i++)
    for (int causal = 0; causal <= 1; causal++) {
      bcase c = {i % 2 ? RA_FLOAT16 : RA_FLOAT32, dims[i], 70, 45, 2, 2, 6, 0, causal, 4};
      check_case(c, i % 2 ? 1e-2 : 1e-4);
    }
  case_block_q = 1000;
  case_block_k = 1000;
  for (int causal = 0; causal <= 1; causal++) {
    bcase c = {RA_FLOAT32, 64, 333, 290, 0, 3, 9, 0, causal, 0};
    check_case(c, 1e-4);
  }
  case_block_q = 40; /* smaller blocks than the kernel's */
  case_block_k = 24;
  for (int causal = 0; causal <= 1; causal++) {
    bcase c = {RA_FLOAT16, 48, 133, 190, 3, 1, 20, 0, causal, 0};
    check_case(c, 1e-2);
  }
  case_block_q = RA_BWD_BLOCK_Q;
  case_block_k = RA_BWD_BLOCK_K;
}

/* Two calls over halves of the key run give dq of one call; two calls over
 * halves of the query run give dk, dv of one call; smaller blocks give the
 * same result too. */
static void test_additivity(void) {
  for (int causal = 0; causal <= 1; causal++)
    for (int dt = 0; dt < 2; dt++) {
      bcase c = {dt ? RA_FLOAT16 : RA_FLOAT32, 64, 150, 190, 4, 2, 6, 2, causal, 5};
      bdata b = make_case(c, 2.0f);
      ra_bwd_workspace *ws;
      void *mem = alloc_ws(c.d, &ws);
      out dq1 = make_out(c.nq, c.d, c.d, 0), dq2 = make_out(c.nq, c.d, c.d, 0);
      out dk1 = make_out(c.nk, c.d, c.d, 0), dk2 = make_out(c.nk, c.d, c.d, 0);
      out dv1 = make_out(c.nk, c.d, c.d, 0), dv2 = make_out(c.nk, c.d, c.d, 0);
      /* same initial values in both */
      memcpy(dq2.data, dq1.data, sizeof(float) * (size_t)(c.nq * c.d));
      memcpy(dk2.data, dk1.data, sizeof(float) * (size_t)(c.nk * c.d));
      memcpy(dv2.data, dv1.data, sizeof(float) * (size_t)(c.nk * c.d));
      memcpy(dq2.init, dq1.init, sizeof(double) * (size_t)(c.nq * c.d));
      memcpy(dk2.init, dk1.init, sizeof(double) * (size_t)(c.nk * c.d));
      memcpy(dv2.init, dv1.init, sizeof(double) * (size_t)(c.nk * c.d));
      call_dq(ws, &b, 0, c.nq, 0, c.nk, RA_BWD_BLOCK_Q, &dq1);
      call_dq(ws, &b, 0, c.nq, 0, 77, 50, &dq2);
      call_dq(ws, &b, 0, c.nq, 77, c.nk - 77, 33, &dq2);
      call_dkdv(ws, &b, 0, c.nq, 0, c.nk, RA_BWD_BLOCK_K, &dk1, &dv1);
      call_dkdv(ws, &b, 0, 61, 0, c.nk, 70, &dk2, &dv2);
      call_dkdv(ws, &b, 61, c.nq - 61, 0, c.nk, 41, &dk2, &dv2);
      /* the fused entry: one call, and four over (query half, key half) */
      out fq1 = make_out(c.nq, c.d, c.d, 0), fk1 = make_out(c.nk, c.d, c.d, 0), fv1 = make_out(c.nk, c.d, c.d, 0);
      out fq2 = make_out(c.nq, c.d, c.d, 0), fk2 = make_out(c.nk, c.d, c.d, 0), fv2 = make_out(c.nk, c.d, c.d, 0);
      out *fo[6] = {&fq1, &fk1, &fv1, &fq2, &fk2, &fv2};
      const out *like[6] = {&dq1, &dk1, &dv1, &dq1, &dk1, &dv1};
      for (int x = 0; x < 6; x++) /* the initial values of dq1, dk1, dv1 */
        for (int64_t i = 0; i < like[x]->count * c.d; i++) fo[x]->data[i] = (float)(fo[x]->init[i] = like[x]->init[i]);
      call_fused(ws, &b, 0, c.nq, 0, c.nk, &fq1, &fk1, &fv1);
      call_fused(ws, &b, 0, 61, 0, 77, &fq2, &fk2, &fv2);
      call_fused(ws, &b, 61, c.nq - 61, 0, 77, &fq2, &fk2, &fv2);
      call_fused(ws, &b, 0, 61, 77, c.nk - 77, &fq2, &fk2, &fv2);
      call_fused(ws, &b, 61, c.nq - 61, 77, c.nk - 77, &fq2, &fk2, &fv2);
      double *w = malloc(sizeof(double) * (size_t)(c.nk * c.d));
      int p;
      const out *one[3] = {&dq1, &dk1, &dv1}, *two[3] = {&dq2, &dk2, &dv2};
      for (int x = 0; x < 3; x++) {
        int64_t cnt = one[x]->count * c.d;
        for (int64_t i = 0; i < cnt; i++) w[i] = (double)one[x]->data[i] - one[x]->init[i];
        double e = out_error(two[x], w, &p);
        if (verbose) fprintf(stderr, "  additivity causal=%d %s out %d: %.2e\n", causal,
                             dt ? "fp16" : "fp32", x, e);
        CHECK(e <= 2e-6);
      }
      const out *f1[3] = {&fq1, &fk1, &fv1}, *f2[3] = {&fq2, &fk2, &fv2};
      for (int x = 0; x < 3; x++) {
        /* same initial values as dq1 ...: compare the fused results with the two-pass ones too */
        int64_t cnt = f1[x]->count * c.d;
        for (int64_t i = 0; i < cnt; i++) w[i] = (double)f1[x]->data[i] - f1[x]->init[i];
        CHECK(out_error(f2[x], w, &p) <= 2e-6);
        CHECK(out_error(one[x], w, &p) <= 2e-6);
      }
      /* and both match the reference */
      CHECK(out_error(&dq2, b.dq, &p) < 1e-4);
      CHECK(out_error(&dk2, b.dk, &p) < 1e-4);
      CHECK(out_error(&dv2, b.dv, &p) < 1e-4);
      free_out(&fq1); free_out(&fk1); free_out(&fv1); free_out(&fq2); free_out(&fk2); free_out(&fv2);
      free(w);
      free_out(&dq1); free_out(&dq2); free_out(&dk1); free_out(&dk2); free_out(&dv1); free_out(&dv2);
      free(mem);
      free_case(&b);
    }
}

/* Runs longer than the kernel's packed chunk of queries (512 rows at these
 * head dims) and key block (64 keys), in one call: the last chunk and block
 * partial and not a multiple of the vector width, the causal diagonal
 * crossing chunk and block edges (keys starting before, inside and with the
 * queries, dilated), head dims that are not multiples of 16. */
static void test_chunk_and_block_edges(void) {
  case_block_q = 1000;
  case_block_k = 1000;
  static const struct { ra_dtype dt; int64_t d, nq, nk, rate, qpos0, kpos0; } cs[] = {
      {RA_FLOAT32, 64, 601, 699, 2, 200, 0},  /* keys from before the queries  */
      {RA_FLOAT32, 40, 515, 262, 1, 7, 300},  /* keys start inside the run     */
      {RA_FLOAT16, 24, 600, 513, 3, 3, 3},    /* same start, dilated           */
  };
  for (int i = 0; i < 3; i++)
    for (int causal = 0; causal <= 1; causal++) {
      bcase c = {cs[i].dt, cs[i].d, cs[i].nq, cs[i].nk, i == 1 ? 2 : 0, cs[i].rate, cs[i].qpos0, cs[i].kpos0,
                 causal, i == 0 ? 9 : 0};
      check_case(c, cs[i].dt == RA_FLOAT16 ? 1e-2 : 1e-4);
    }
  case_block_q = RA_BWD_BLOCK_Q;
  case_block_k = RA_BWD_BLOCK_K;
}

/* A workspace that saw NaN / inf in an earlier call, and was used by the
 * other function and another head dim layout, gives correct results. */
static void stale_workspace_with(int fused) {
  bcase c = {RA_FLOAT32, 80, 70, 90, 0, 1, 0, 0, 0, 0};
  bdata bad = make_case(c, 2.0f);
  for (int64_t t = 0; t < c.nq; t++) {
    ((float *)bad.q.data)[t * bad.q.stride + 3] = NAN;
    ((float *)bad.g.data)[t * bad.g.stride + 5] = INFINITY;
    bad.lse[t * LSE_STRIDE] = t % 2 ? NAN : -1e30f;
  }
  ra_bwd_workspace *ws;
  void *mem = alloc_ws(c.d, &ws);
  out dq = make_out(c.nq, c.d, c.d, 0), dk = make_out(c.nk, c.d, c.d, 0), dv = make_out(c.nk, c.d, c.d, 0);
  call_entry(fused, ws, &bad, RA_BWD_BLOCK_Q, RA_BWD_BLOCK_K, &dq, &dk, &dv);
  /* NaN inputs must show in the outputs, not be hidden */
  int nan_seen = 0;
  for (int64_t i = 0; i < c.nk * c.d; i++) nan_seen |= isnan(dk.data[i]);
  CHECK(nan_seen);
  free_out(&dq); free_out(&dk); free_out(&dv);
  free_case(&bad);
  /* the same workspace, not re-initialised, for other head dims of the same
   * padded width (stale padding columns must not leak) and causal runs */
  const int64_t dims[] = {80, 66, 79, 72};
  for (int i = 0; i < 4; i++) {
    bcase g = {RA_FLOAT32, dims[i], 45, 70, 2, 2, 4, 0, 1, 0};
    bdata b = make_case(g, 2.0f);
    out q2 = make_out(g.nq, g.d, g.d + 1, 1), k2 = make_out(g.nk, g.d, g.d, 1), v2 = make_out(g.nk, g.d, g.d, 1);
    call_entry(fused, ws, &b, RA_BWD_BLOCK_Q, RA_BWD_BLOCK_K, &q2, &k2, &v2);
    int p1, p2, p3;
    CHECK(out_error(&q2, b.dq, &p1) < 1e-4 && p1);
    CHECK(out_error(&k2, b.dk, &p2) < 1e-4 && p2);
    CHECK(out_error(&v2, b.dv, &p3) < 1e-4 && p3);
    free_out(&q2); free_out(&k2); free_out(&v2);
    free_case(&b);
  }
  free(mem);
}

static void test_stale_workspace(void) {
  stale_workspace_with(0);
  stale_workspace_with(1);
}

/* Poison the workspace's memory between calls (after init) except what init
 * wrote: every buffer a call reads it must write first.  Done by running a
 * case whose inputs are huge (scores overflow to inf in scratch) and then a
 * normal one without re-init. */
static void overflowing_then_normal_with(int fused) {
  bcase c = {RA_FLOAT32, 64, 100, 100, 0, 1, 0, 0, 1, 0};
  bdata huge = make_case(c, 2.0f);
  for (int64_t t = 0; t < c.nq; t++)
    for (int64_t x = 0; x < c.d; x++) ((float *)huge.q.data)[t * huge.q.stride + x] = 3e38f;
  ra_bwd_workspace *ws;
  void *mem = alloc_ws(c.d, &ws);
  out a = make_out(c.nq, c.d, c.d, 0), bk = make_out(c.nk, c.d, c.d, 0), bv = make_out(c.nk, c.d, c.d, 0);
  call_entry(fused, ws, &huge, RA_BWD_BLOCK_Q, RA_BWD_BLOCK_K, &a, &bk, &bv);
  free_out(&a); free_out(&bk); free_out(&bv);
  bcase n = {RA_FLOAT32, 64, 37, 41, 0, 1, 0, 0, 0, 0};
  bdata b = make_case(n, 2.0f);
  out q2 = make_out(n.nq, n.d, n.d, 0), k2 = make_out(n.nk, n.d, n.d, 0), v2 = make_out(n.nk, n.d, n.d, 0);
  call_entry(fused, ws, &b, RA_BWD_BLOCK_Q, RA_BWD_BLOCK_K, &q2, &k2, &v2);
  int p;
  CHECK(out_error(&q2, b.dq, &p) < 1e-4);
  CHECK(out_error(&k2, b.dk, &p) < 1e-4);
  CHECK(out_error(&v2, b.dv, &p) < 1e-4);
  free_out(&q2); free_out(&k2); free_out(&v2);
  free_case(&huge);
  free_case(&b);
  free(mem);
}

static void test_overflowing_then_normal(void) {
  overflowing_then_normal_with(0);
  overflowing_then_normal_with(1);
}

/* Rows with lse -inf contribute nothing even when their q, dO and delta are
 * garbage (NaN): dq of the row unchanged, dk / dv as without the row. */
static void dead_rows_ignored_with(int fused) {
  bcase c = {RA_FLOAT32, 16, 20, 30, 0, 1, 0, 0, 0, 3};
  bdata b = make_case(c, 2.0f);
  for (int64_t t = 0; t < c.nq; t++)
    if (b.lse[t * LSE_STRIDE] == -INFINITY) {
      for (int64_t x = 0; x < c.d; x++) {
        ((float *)b.q.data)[t * b.q.stride + x] = NAN;
        ((float *)b.g.data)[t * b.g.stride + x] = NAN;
      }
      b.delta[t * DELTA_STRIDE] = NAN;
    }
  ra_bwd_workspace *ws;
  void *mem = alloc_ws(c.d, &ws);
  out dq = make_out(c.nq, c.d, c.d, 0), dk = make_out(c.nk, c.d, c.d, 0), dv = make_out(c.nk, c.d, c.d, 0);
  call_entry(fused, ws, &b, RA_BWD_BLOCK_Q, RA_BWD_BLOCK_K, &dq, &dk, &dv);
  int p;
  CHECK(out_error(&dq, b.dq, &p) < 1e-4);
  CHECK(out_error(&dk, b.dk, &p) < 1e-4);
  CHECK(out_error(&dv, b.dv, &p) < 1e-4);
  for (int64_t t = 1; t < c.nq; t += 3)
    for (int64_t x = 0; x < c.d; x++) CHECK(dq.data[t * c.d + x] == (float)dq.init[t * c.d + x]);
  free_out(&dq); free_out(&dk); free_out(&dv);
  free(mem);
  free_case(&b);
}

static void test_dead_rows_ignored(void) {
  dead_rows_ignored_with(0);
  dead_rows_ignored_with(1);
}

/* Finite differences in double of L = sum_i dO_i . o_i(q, k, v) on a tiny
 * causal dilated case (lse and D of the same forward) against the kernel:
 * checks the formulas themselves, not just agreement with the reference. */
static double fd_loss(const bcase *c, const double *q, const double *k, const double *v,
                      const double *g, double scale) {
  const int64_t d = c->d;
  double L = 0;
  for (int64_t i = 0; i < c->nq; i++) {
    double m = -INFINITY, s[64];
    for (int64_t j = 0; j < c->nk; j++) {
      s[j] = visible(c, i, j) ? scale * dot(q + i * d, k + j * d, d) : -INFINITY;
      if (s[j] > m) m = s[j];
    }
    if (m == -INFINITY) continue;
    double l = 0;
    for (int64_t j = 0; j < c->nk; j++) l += exp(s[j] - m);
    for (int64_t j = 0; j < c->nk; j++)
      if (s[j] > -INFINITY) L += exp(s[j] - m) / l * dot(g + i * d, v + j * d, d);
  }
  return L;
}

static void finite_differences_with(int fused) {
  bcase c = {RA_FLOAT32, 5, 7, 9, 0, 2, 4, 0, 1, 0};
  bdata b = make_case(c, 1.0f);
  const int64_t d = c.d;
  ra_bwd_workspace *ws;
  void *mem = alloc_ws(d, &ws);
  out dq = make_out(c.nq, d, d, 0), dk = make_out(c.nk, d, d, 0), dv = make_out(c.nk, d, d, 0);
  call_entry(fused, ws, &b, RA_BWD_BLOCK_Q, RA_BWD_BLOCK_K, &dq, &dk, &dv);
  double *q = b.q.val, *k = b.k.val, *v = b.v.val;
  const double h = 1e-6;
  double worst = 0, big = 0;
  struct { double *x; int64_t n; out *o; } grads[3] = {{q, c.nq, &dq}, {k, c.nk, &dk}, {v, c.nk, &dv}};
  for (int w = 0; w < 3; w++)
    for (int64_t i = 0; i < grads[w].n * d; i++) {
      double keep = grads[w].x[i];
      grads[w].x[i] = keep + h;
      double up = fd_loss(&c, q, k, v, b.g.val, b.scale);
      grads[w].x[i] = keep - h;
      double dn = fd_loss(&c, q, k, v, b.g.val, b.scale);
      grads[w].x[i] = keep;
      double fd = (up - dn) / (2 * h);
      double got = (double)grads[w].o->data[i] - grads[w].o->init[i];
      if (fabs(fd) > big) big = fabs(fd);
      if (!(fabs(got - fd) <= worst)) worst = fabs(got - fd);
    }
  if (verbose) fprintf(stderr, "  finite differences: worst %.2e of max %.2e\n", worst, big);
  CHECK(worst <= 1e-4 * big);
  free_out(&dq); free_out(&dk); free_out(&dv);
  free(mem);
  free_case(&b);
}

static void test_finite_differences(void) {
  finite_differences_with(0);
  finite_differences_with(1);
}

static void empty_and_invisible_with(int fused) {
  /* no queries / no keys / keys all after the queries: nothing is written */
  bcase c = {RA_FLOAT32, 8, 10, 10, 0, 1, 0, 50, 1, 0};
  bdata b = make_case(c, 1.0f);
  ra_bwd_workspace *ws;
  void *mem = alloc_ws(c.d, &ws);
  out dq = make_out(c.nq, c.d, c.d, 0), dk = make_out(c.nk, c.d, c.d, 0), dv = make_out(c.nk, c.d, c.d, 0);
  call_entry(fused, ws, &b, RA_BWD_BLOCK_Q, RA_BWD_BLOCK_K, &dq, &dk, &dv);
  ra_tokens none = {b.q.data, b.q.stride, 0, 0}, all_q = {b.q.data, b.q.stride, c.nq, 0};
  ra_tokens nokeys = {b.k.data, b.k.stride, 0, 0}, all_k = {b.k.data, b.k.stride, c.nk, 0};
  K->backward_dq(ws, c.dtype, c.d, b.scale, 0, 1, none, b.g.data, b.g.stride, b.lse, LSE_STRIDE,
                     b.delta, DELTA_STRIDE, all_k, b.v.data, b.v.stride, dq.data, dq.stride);
  K->backward_dq(ws, c.dtype, c.d, b.scale, 0, 1, all_q, b.g.data, b.g.stride, b.lse, LSE_STRIDE,
                     b.delta, DELTA_STRIDE, nokeys, b.v.data, b.v.stride, dq.data, dq.stride);
  K->backward_dkdv(ws, c.dtype, c.d, b.scale, 0, 1, none, b.g.data, b.g.stride, b.lse, LSE_STRIDE,
                       b.delta, DELTA_STRIDE, all_k, b.v.data, b.v.stride, dk.data, dv.data, dk.stride);
  K->backward_dkdv(ws, c.dtype, c.d, b.scale, 0, 1, all_q, b.g.data, b.g.stride, b.lse, LSE_STRIDE,
                       b.delta, DELTA_STRIDE, nokeys, b.v.data, b.v.stride, dk.data, dv.data, dk.stride);
  if (fused) {
    K->backward(ws, c.dtype, c.d, b.scale, 0, 1, none, b.g.data, b.g.stride, b.lse, LSE_STRIDE, b.delta,
                DELTA_STRIDE, all_k, b.v.data, b.v.stride, dq.data, dq.stride, dk.data, dv.data, dk.stride);
    K->backward(ws, c.dtype, c.d, b.scale, 0, 1, all_q, b.g.data, b.g.stride, b.lse, LSE_STRIDE, b.delta,
                DELTA_STRIDE, nokeys, b.v.data, b.v.stride, dq.data, dq.stride, dk.data, dv.data, dk.stride);
  }
  for (int64_t i = 0; i < c.nq * c.d; i++) CHECK(dq.data[i] == (float)dq.init[i]);
  for (int64_t i = 0; i < c.nk * c.d; i++) CHECK(dk.data[i] == (float)dk.init[i] && dv.data[i] == (float)dv.init[i]);
  free_out(&dq); free_out(&dk); free_out(&dv);
  free(mem);
  free_case(&b);
}

static void test_empty_and_invisible(void) {
  empty_and_invisible_with(0);
  empty_and_invisible_with(1);
}

/* ------------------------------------------------------------------ bench */

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts); /* the build machine is shared */
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int bench(int64_t n, int64_t d, int causal) {
  CHECK(ra_cpu_kernels_for(ra_exec_default().cpu_isa, &K) == RA_OK); /* RINGATTN_CPU_ISA */
  ra_bwd_workspace *ws;
  void *mem = alloc_ws(d, &ws);
  float *q = malloc(sizeof(float) * (size_t)(n * d)), *k = malloc(sizeof(float) * (size_t)(n * d)),
        *v = malloc(sizeof(float) * (size_t)(n * d)), *g = malloc(sizeof(float) * (size_t)(n * d));
  float *dq = calloc((size_t)(n * d), sizeof(float)), *dk = calloc((size_t)(n * d), sizeof(float)),
        *dv = calloc((size_t)(n * d), sizeof(float));
  float *lse = malloc(sizeof(float) * (size_t)n), *delta = malloc(sizeof(float) * (size_t)n);
  for (int64_t i = 0; i < n * d; i++) {
    q[i] = uniform(); k[i] = uniform(); v[i] = uniform(); g[i] = uniform();
  }
  for (int64_t i = 0; i < n; i++) {
    lse[i] = 7.0f + 0.1f * uniform();
    delta[i] = 0.1f * uniform();
  }
  const float scale = (float)(1.0 / sqrt((double)d));
  /* one call per block, as a parallel caller would (BWD_BLOCK=n: one call) */
  const char *blk = getenv("BWD_BLOCK");
  const int64_t bq = blk ? atoll(blk) : RA_BWD_BLOCK_Q, bk = blk ? atoll(blk) : RA_BWD_BLOCK_K;
  double best_q = INFINITY, best_kv = INFINITY, best_f = INFINITY, best_fused = INFINITY;
  size_t fbytes = K->workspace_bytes(d);
  void *fmem = aligned_alloc(64, (fbytes + 63) / 64 * 64);
  ra_workspace *fws = K->workspace_init(fmem, d);
  float *acc = calloc((size_t)(n * d), sizeof(float)), *flse = malloc(sizeof(float) * (size_t)n);
  for (int rep = 0; rep < 5; rep++) {
    double t = now();
    for (int64_t i = 0; i < n; i += bq) {
      int64_t m = n - i < bq ? n - i : bq;
      ra_tokens tq = {q + i * d, d, m, i}, tk = {k, d, n, 0};
      K->backward_dq(ws, RA_FLOAT32, d, scale, causal, 1, tq, g + i * d, d, lse + i, 1,
                         delta + i, 1, tk, v, d, dq + i * d, d);
    }
    double t1 = now();
    for (int64_t j = 0; j < n; j += bk) {
      int64_t m = n - j < bk ? n - j : bk;
      ra_tokens tq = {q, d, n, 0}, tk = {k + j * d, d, m, j};
      K->backward_dkdv(ws, RA_FLOAT32, d, scale, causal, 1, tq, g, d, lse, 1, delta, 1, tk,
                           v + j * d, d, dk + j * d, dv + j * d, d);
    }
    double t2 = now();
    if (t2 - t1 < best_kv) best_kv = t2 - t1;
    ra_tokens fq = {q, d, n, 0}, fk = {k, d, n, 0};
    K->backward(ws, RA_FLOAT32, d, scale, causal, 1, fq, g, d, lse, 1, delta, 1, fk, v, d, dq, d, dk, dv, d);
    double t2f = now();
    if (t2f - t2 < best_fused) best_fused = t2f - t2;
    t2 = now();
    for (int64_t i = 0; i < n * d; i++) acc[i] = 0.0f;
    for (int64_t i = 0; i < n; i++) flse[i] = -INFINITY;
    double t3 = now();
    for (int64_t i = 0; i < n; i += RA_CPU_BLOCK_Q) {
      int64_t m = n - i < RA_CPU_BLOCK_Q ? n - i : RA_CPU_BLOCK_Q;
      ra_tokens tq = {q + i * d, d, m, i}, tk = {k, d, n, 0};
      K->attend(fws, RA_FLOAT32, d, scale, causal, 1, tq, tk, v, d, acc + i * d, d, flse + i, 1);
    }
    double t4 = now();
    if (t1 - t < best_q) best_q = t1 - t;
    if (t4 - t3 < best_f) best_f = t4 - t3;
  }
  const double mm = 2.0 * (double)n * (double)n * (double)d * (causal ? 0.5 : 1.0); /* one matmul */
  printf("n=%lld d=%lld %s, one thread:\n", (long long)n, (long long)d, causal ? "causal" : "dense");
  printf("  forward ra_cpu_attend  %8.2f ms  %6.1f GFLOP/s (2 matmuls)\n", best_f * 1e3, 2 * mm / best_f * 1e-9);
  printf("  ra_cpu_backward_dq     %8.2f ms  %6.1f GFLOP/s real (3 matmuls)\n", best_q * 1e3, 3 * mm / best_q * 1e-9);
  printf("  ra_cpu_backward_dkdv   %8.2f ms  %6.1f GFLOP/s real (4 matmuls)\n", best_kv * 1e3, 4 * mm / best_kv * 1e-9);
  printf("  backward total         %8.2f ms  %6.1f GFLOP/s nominal (2.5 x forward 4n^2d), %6.1f real (7 matmuls)\n",
         (best_q + best_kv) * 1e3, 5 * mm / (best_q + best_kv) * 1e-9, 7 * mm / (best_q + best_kv) * 1e-9);
  printf("  ra_cpu_backward (fused) %7.2f ms  %6.1f GFLOP/s nominal, %6.1f real (5 matmuls)\n", best_fused * 1e3,
         5 * mm / best_fused * 1e-9, 5 * mm / best_fused * 1e-9);
  free(q); free(k); free(v); free(g); free(dq); free(dk); free(dv); free(lse); free(delta);
  free(acc); free(flse); free(fmem); free(mem);
  return 0;
}

int main(int argc, char **argv) {
  if (argc > 1 && strcmp(argv[1], "--bench") == 0) {
    int64_t n = argc > 2 ? atoll(argv[2]) : 2048, d = argc > 3 ? atoll(argv[3]) : 64;
    int causal = argc > 4 ? atoi(argv[4]) : 0;
    return bench(n, d, causal);
  }
  verbose = argc > 1 && strcmp(argv[1], "-v") == 0;
  static const ra_cpu_isa isas[] = {RA_CPU_ISA_BASELINE, RA_CPU_ISA_AVX2, RA_CPU_ISA_AVX512};
  static const test_case tests[] = {
      {"fp32_matches_naive", test_fp32},
      {"fp16_matches_naive", test_fp16},
      {"position_arithmetic", test_position_arithmetic},
      {"odd_dims_and_long_runs", test_odd_dims_and_long_runs},
      {"additivity", test_additivity},
      {"dead_rows_ignored", test_dead_rows_ignored},
      {"finite_differences", test_finite_differences},
      {"empty_and_invisible", test_empty_and_invisible},
      {"stale_workspace", test_stale_workspace},
      {"overflowing_then_normal", test_overflowing_then_normal},
      {"chunk_and_block_edges", test_chunk_and_block_edges},
  };
  int failed = 0;
  for (int i = 0; i < 3; i++) {
    if (!ra_cpu_isa_supported(isas[i])) continue;
    CHECK(ra_cpu_kernels_for(isas[i], &K) == RA_OK);
    rng_state = 0x9e3779b97f4a7c15ull; /* every variant sees the same data */
    printf("-- %s kernels\n", ra_cpu_isa_name(isas[i]));
    failed |= run_tests(tests, sizeof tests / sizeof tests[0]);
  }
  return failed;
}
