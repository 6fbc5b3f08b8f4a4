/*
 * test_core.c -- unit tests of the C core, run by `meson test` (harness.h).
 */
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "calls.h"
#include "cpu/cpu.h"
#include "naive.h"
#include "ring/driver.h"

#include "harness.h"

static float *random_tensor(int64_t count) {
  float *x = malloc(sizeof(float) * (size_t)count);
  for (int64_t i = 0; i < count; i++) x[i] = 2.0f * uniform();
  return x;
}


static ra_tensor contiguous(void *data, const ra_config *c) {
  ra_tensor t = {data, c->seq_len * c->num_heads * c->head_dim, c->num_heads * c->head_dim, c->head_dim};
  return t;
}

/* Element i of an fp32 array, or of a double one for RA_FLOAT64 (whose
 * outputs and lse are double). */
static double get(const void *x, ra_dtype t, int64_t i) {
  return t == RA_FLOAT64 ? ((const double *)x)[i] : ((const float *)x)[i];
}

/* `count` elements filled from x (float, widened exactly for RA_FLOAT64),
 * or NaN when x is NULL (poison: an unwritten output fails). */
static void *filled(const float *x, int64_t count, ra_dtype t) {
  void *out = malloc((t == RA_FLOAT64 ? sizeof(double) : sizeof(float)) * (size_t)count);
  for (int64_t i = 0; i < count; i++) {
    if (t == RA_FLOAT64) ((double *)out)[i] = x ? (double)x[i] : NAN;
    else ((float *)out)[i] = x ? x[i] : NAN;
  }
  return out;
}

/* Run the in-process ring (c->dtype: RA_FLOAT32 or RA_FLOAT64) on random
 * inputs and compare with naive(); returns the largest absolute error of o,
 * or +inf on a failed call. */
static double ring_error(const ra_config *c, ra_stats *stats, double *lse_err) {
  int64_t count = c->batch * c->seq_len * c->num_heads * c->head_dim;
  int64_t rows = c->batch * c->num_heads * c->seq_len;
  float *q = random_tensor(count), *k = random_tensor(count), *v = random_tensor(count);
  void *qt = filled(q, count, c->dtype), *kt = filled(k, count, c->dtype), *vt = filled(v, count, c->dtype);
  void *o = filled(NULL, count, c->dtype), *lse = filled(NULL, rows, c->dtype);
  double *ref = malloc(sizeof(double) * (size_t)count), *ref_lse = malloc(sizeof(double) * (size_t)rows);
  double err = INFINITY;
  ra_plan *plan = NULL;
  if (ra_plan_create(c, &plan) == RA_OK) {
    ra_exec exec = cpu_exec(2, 1);
    ra_status st = call_forward(c, RA_DEVICE_CPU, contiguous(qt, c), contiguous(kt, c), contiguous(vt, c),
                                contiguous(o, c), lse, &exec, stats);
    if (st == RA_OK) {
      naive_attention(c, q, k, v, ref, ref_lse);
      err = 0;
      *lse_err = 0;
      for (int64_t i = 0; i < count; i++) {
        double e = fabs(get(o, c->dtype, i) - ref[i]);
        if (!(e <= err)) err = e; /* NaN counts as failure */
      }
      for (int64_t i = 0; i < rows; i++) {
        double l = get(lse, c->dtype, i);
        double e = isinf(ref_lse[i]) ? (l == ref_lse[i] ? 0 : INFINITY) : fabs(l - ref_lse[i]);
        if (!(e <= *lse_err)) *lse_err = e;
      }
    } else {
      fprintf(stderr, "  forward failed: %s\n", ra_last_error());
    }
  }
  ra_plan_destroy(plan);
  free(q); free(k); free(v); free(qt); free(kt); free(vt); free(o); free(lse); free(ref); free(ref_lse);
  return err;
}

/* ------------------------------------------------------------------ tests */

static void test_status_strings(void) {
  CHECK(strcmp(ra_status_string(RA_OK), "no error") == 0);
  CHECK(strcmp(ra_status_string(RA_ERR_INVALID_ARGUMENT), "invalid argument") == 0);
  CHECK(strcmp(ra_status_string((ra_status)999), "unknown status") == 0);
}

static void expect_invalid(ra_config c, const char *needle) {
  ra_plan *plan = (ra_plan *)1;
  ra_status st = ra_plan_create(&c, &plan);
  CHECK(st == RA_ERR_INVALID_ARGUMENT);
  CHECK(plan == NULL);
  if (!strstr(ra_last_error(), needle)) {
    fprintf(stderr, "  message \"%s\" does not name \"%s\"\n", ra_last_error(), needle);
    failures_in_test++;
  }
}

static void test_plan_validation(void) {
  int64_t s[2] = {8, 16}, r[2] = {1, 2};
  ra_config ok = make_config(1, 32, 4, 8, 2, s, r, 0, RA_MODE_GROUPS, 2);
  ra_plan *plan;
  CHECK(ra_plan_create(&ok, &plan) == RA_OK);
  ra_branch_info bi;
  CHECK(ra_plan_branch(plan, 0, &bi) == RA_OK && bi.span == 1 && bi.head_begin == 0 && bi.head_end == 2);
  CHECK(ra_plan_branch(plan, 1, &bi) == RA_OK && bi.span == 1 && bi.head_begin == 2 && bi.head_end == 4);
  CHECK(ra_plan_head_offset(plan, 1, 3) == 1 && ra_plan_head_offset(plan, 1, 0) == -1);
  CHECK(fabs(ra_plan_config(plan)->scale - 1.0 / sqrt(8.0)) < 1e-15);
  ra_plan_destroy(plan);

  ra_config c = ok;
  c.seq_len = 24; /* 24 % 16 != 0 */
  expect_invalid(c, "segment_lengths[1]");
  c = ok;
  c.dilation_rates[1] = 3;
  expect_invalid(c, "dilation_rates[1]");
  c = ok;
  c.segment_lengths[0] = 0;
  expect_invalid(c, "segment_lengths[0]");
  c = ok;
  c.num_heads = 1;
  expect_invalid(c, "groups");
  c = ok;
  c.world_size = 3;
  expect_invalid(c, "world_size");
  c = ok;
  c.world_size = 0;
  expect_invalid(c, "world_size");
  c = ok;
  c.scale = INFINITY;
  expect_invalid(c, "scale");
  c = ok;
  c.num_branches = 0;
  expect_invalid(c, "segment_lengths");
  c = ok;
  c.batch = 0;
  expect_invalid(c, "batch");
  /* L = 12, S = 8: neither divides the other */
  int64_t s2[1] = {8}, r2[1] = {1};
  c = make_config(1, 48, 2, 4, 1, s2, r2, 0, RA_MODE_GROUPS, 4);
  expect_invalid(c, "world_size");

  /* segment longer than n is clamped to n; longnet offsets h div ceil(H/r) */
  int64_t s3[1] = {1000}, r3[1] = {2};
  c = make_config(1, 16, 5, 4, 1, s3, r3, 0, RA_MODE_LONGNET, 1);
  CHECK(ra_plan_create(&c, &plan) == RA_OK);
  CHECK(ra_plan_branch(plan, 0, &bi) == RA_OK && bi.segment == 16);
  CHECK(ra_plan_head_offset(plan, 0, 2) == 0 && ra_plan_head_offset(plan, 0, 3) == 1);
  ra_plan_destroy(plan);
}

static void test_merge(void) {
  /* part over keys {a}, acc over keys {b}: merged must be the softmax over both */
  float acc[3] = {1, 2, 3}, part[3] = {5, -1, 0}, lse_acc = 0.5f, lse_part = 2.0f;
  double wa = exp(0.5) / (exp(0.5) + exp(2.0)), wp = 1 - wa;
  double want[3] = {wa * 1 + wp * 5, wa * 2 - wp, wa * 3};
  ra_merge_rows(acc, 3, &lse_acc, 1, part, 3, &lse_part, 1, 3);
  for (int i = 0; i < 3; i++) CHECK(fabs(acc[i] - want[i]) < 1e-6);
  CHECK(fabs(lse_acc - log(exp(0.5) + exp(2.0))) < 1e-6);
  /* -inf on either side */
  float a2[2] = {0, 0}, l2 = -INFINITY, p2[2] = {7, 8}, lp2 = 1.0f;
  ra_merge_rows(a2, 2, &l2, 1, p2, 2, &lp2, 1, 2);
  CHECK(a2[0] == 7 && a2[1] == 8 && l2 == 1.0f);
  float lp3 = -INFINITY;
  ra_merge_rows(a2, 2, &l2, 1, p2, 2, &lp3, 1, 2);
  CHECK(a2[0] == 7 && l2 == 1.0f);
  /* large lse values must not overflow */
  float a4[1] = {1}, l4 = 1000.0f, p4[1] = {3}, lp4 = 1000.0f;
  ra_merge_rows(a4, 1, &l4, 1, p4, 1, &lp4, 1, 1);
  CHECK(fabs(a4[0] - 2.0f) < 1e-6 && fabs(l4 - (1000.0 + log(2.0))) < 1e-3);
}

/* The merge of partials whose lse lies far outside exp's range: e^lse
 * overflows (float beyond 88.7, double beyond 709.8) or underflows to 0
 * (float below -103, double below -745) unless the merge is taken relative
 * to the larger lse; without that, inf/inf or 0/0 gives NaN.  Rows 3 apart
 * (acc), 2 apart (lse), each with its own pair, checked against the stable
 * formula in double: w_a = 1 / (1 + e^{lse_b - lse_a}). */
static const double merge_pairs[][2] = {
    {1000, 990}, {990, 1000}, {-1000, -995}, {-995, -1000}, {100, 80},
    {-110, -120}, {-120, -110}, {800, 800}, {-800, -800}, {2.5, -3.0},
};
#define MERGE_ROWS (sizeof merge_pairs / sizeof merge_pairs[0])

static void merge_expect(int row, double a0, double p0, double *out, double *lse) {
  const double la = merge_pairs[row][0], lp = merge_pairs[row][1], mx = la > lp ? la : lp;
  const double wa = 1.0 / (1.0 + exp(lp - la));
  *out = wa * a0 + (1.0 - wa) * p0;
  *lse = mx + log1p(exp(-fabs(la - lp)));
}

static void test_merge_large_lse(void) {
  enum { R = MERGE_ROWS, D = 2 };
  float acc[3 * R], part[D * R], lse_acc[2 * R], lse_part[R];
  double acc64[3 * R], part64[D * R], lse_acc64[2 * R], lse_part64[R];
  for (int t = 0; t < (int)R; t++)
    for (int c = 0; c < D; c++) {
      acc[3 * t + c] = (float)(acc64[3 * t + c] = 1.0 + t + 0.25 * c);
      part[D * t + c] = (float)(part64[D * t + c] = -2.0 + 0.5 * t - c);
      lse_acc[2 * t] = (float)(lse_acc64[2 * t] = merge_pairs[t][0]);
      lse_part[t] = (float)(lse_part64[t] = merge_pairs[t][1]);
    }
  ra_merge_rows(acc, 3, lse_acc, 2, part, D, lse_part, R, D);
  ra_merge_rows_f64(acc64, 3, lse_acc64, 2, part64, D, lse_part64, R, D);
  for (int t = 0; t < (int)R; t++) {
    for (int c = 0; c < D; c++) {
      double want, want_lse;
      merge_expect(t, 1.0 + t + 0.25 * c, -2.0 + 0.5 * t - c, &want, &want_lse);
      /* float: inputs and weights are rounded to float (values below 12) */
      if (!(fabs(acc[3 * t + c] - want) <= 1e-5 * (1 + fabs(want))) ||
          !(fabs(acc64[3 * t + c] - want) <= 1e-13 * (1 + fabs(want)))) {
        fprintf(stderr, "  row %d (lse %g, %g) col %d: float %.9g, double %.17g, want %.17g\n", t,
                merge_pairs[t][0], merge_pairs[t][1], c, acc[3 * t + c], acc64[3 * t + c], want);
        failures_in_test++;
      }
      /* lse to a few ulp of its magnitude */
      if (!(fabs(lse_acc[2 * t] - want_lse) <= 4 * 6e-8 * fabs(want_lse) + 1e-6) ||
          !(fabs(lse_acc64[2 * t] - want_lse) <= 4e-16 * fabs(want_lse) + 1e-15)) {
        fprintf(stderr, "  row %d (lse %g, %g): lse float %.9g, double %.17g, want %.17g\n", t,
                merge_pairs[t][0], merge_pairs[t][1], lse_acc[2 * t], lse_acc64[2 * t], want_lse);
        failures_in_test++;
      }
    }
  }
}

/* Every case in float32 (tol 2e-5) and in float64, whose double path must
 * match the double reference to rounding (tol 1e-12). */
static void forward_cases(ra_dtype dtype, double tol) {
  struct {
    int64_t b, n, h, d;
    int G;
    int64_t s[3], r[3];
    int causal;
    ra_mode mode;
    int world;
  } cases[] = {
      {1, 64, 2, 16, 1, {64}, {1}, 0, RA_MODE_GROUPS, 1},          /* dense           */
      {1, 64, 2, 16, 1, {64}, {1}, 1, RA_MODE_GROUPS, 4},          /* dense ring      */
      {2, 96, 3, 24, 2, {32, 96}, {1, 3}, 1, RA_MODE_GROUPS, 3},   /* odd d, sub-ring */
      {1, 128, 5, 32, 3, {16, 32, 128}, {1, 2, 4}, 0, RA_MODE_LONGNET, 4},
      {1, 128, 5, 32, 3, {16, 32, 128}, {1, 2, 4}, 1, RA_MODE_LONGNET, 8},
      {1, 72, 4, 8, 2, {12, 72}, {3, 2}, 1, RA_MODE_GROUPS, 6},    /* L=12 % r uneven */
      {1, 200, 2, 64, 1, {200}, {1}, 1, RA_MODE_LONGNET, 2},       /* > one key tile  */
      {1, 256, 2, 16, 2, {256, 256}, {1, 2}, 0, RA_MODE_LONGNET, 4},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    ra_config c = make_config(cases[i].b, cases[i].n, cases[i].h, cases[i].d, cases[i].G, cases[i].s,
                              cases[i].r, cases[i].causal, cases[i].mode, cases[i].world);
    c.dtype = dtype;
    ra_stats stats[8];
    double lse_err = INFINITY, err = ring_error(&c, stats, &lse_err);
    if (!(err < tol && lse_err < tol)) {
      fprintf(stderr, "  case %zu: max error %.3g, lse error %.3g\n", i, err, lse_err);
      failures_in_test++;
    }
    for (int rk = 0; rk < c.world_size; rk++) CHECK(stats[rk].current_bytes == 0);
  }
}

static void test_forward_matches_naive(void) { forward_cases(RA_FLOAT32, 2e-5); }
static void test_float64_matches_naive(void) { forward_cases(RA_FLOAT64, 1e-12); }

/* The float64 backward through a ring (spanning sub-rings: dK/dV travel in
 * double) equals the single-rank one to rounding. */
static void test_float64_backward_ring(void) {
  int64_t s[2] = {16, 64}, r[2] = {1, 2};
  for (int causal = 0; causal < 2; causal++) {
    double *out[2][3];
    for (int pass = 0; pass < 2; pass++) {
      ra_config c = make_config(1, 64, 3, 8, 2, s, r, causal, RA_MODE_LONGNET, pass ? 4 : 1);
      c.dtype = RA_FLOAT64;
      const int64_t count = 64 * 3 * 8, rows = 3 * 64;
      rng_state = 0x1234567ull; /* the same inputs for both passes */
      float *x[4];
      for (int i = 0; i < 4; i++) x[i] = random_tensor(count);
      double *q = filled(x[0], count, c.dtype), *k = filled(x[1], count, c.dtype), *v = filled(x[2], count, c.dtype);
      double *g = filled(x[3], count, c.dtype), *o = filled(NULL, count, c.dtype), *lse = filled(NULL, rows, c.dtype);
      for (int i = 0; i < 3; i++) out[pass][i] = filled(NULL, count, c.dtype);
      ra_plan *plan;
      ra_exec exec = cpu_exec(2, 1);
      CHECK(ra_plan_create(&c, &plan) == RA_OK);
      CHECK(call_forward(&c, RA_DEVICE_CPU, contiguous(q, &c), contiguous(k, &c), contiguous(v, &c),
                         contiguous(o, &c), lse, &exec, NULL) == RA_OK);
      CHECK(call_backward(&c, RA_DEVICE_CPU, contiguous(q, &c), contiguous(k, &c), contiguous(v, &c),
                          contiguous(o, &c), contiguous(g, &c), lse, contiguous(out[pass][0], &c),
                          contiguous(out[pass][1], &c), contiguous(out[pass][2], &c), &exec, NULL) == RA_OK);
      ra_plan_destroy(plan);
      for (int i = 0; i < 4; i++) free(x[i]);
      free(q); free(k); free(v); free(g); free(o); free(lse);
    }
    double err = 0, mag = 0;
    for (int i = 0; i < 3; i++)
      for (int64_t j = 0; j < 64 * 3 * 8; j++) {
        double e = fabs(out[1][i][j] - out[0][i][j]);
        if (!(e <= err)) err = e; /* NaN (unwritten) counts as failure */
        if (fabs(out[0][i][j]) > mag) mag = fabs(out[0][i][j]);
      }
    if (!(err < 1e-13 && mag > 0.1)) {
      fprintf(stderr, "  causal=%d: ring vs single rank %.3g (largest gradient %.3g)\n", causal, err, mag);
      failures_in_test++;
    }
    for (int p = 0; p < 2; p++)
      for (int i = 0; i < 3; i++) free(out[p][i]);
  }
}

/* Per rank: 4 shards (q, k, v, o) + the fp32 accumulator, and from two
 * ranks on the two ring slots, each one sub-block (1/8) of a key/value
 * block (ring/stream.c): 5 units of n/k at k = 1, 5.5 units of n/k at
 * k >= 2.  So the peak halves whenever k doubles.
 * Exactly, to the byte (tests/memory_model.py has the general formula):
 * the kernel workspaces of the rank's threads (ring_error runs 2 threads,
 * shared by the ranks), the shards and lse it holds, the task and copy
 * lists, the accumulator and lse state, and the two ring buffers. */
static void test_memory_falls_with_ranks(void) {
  int64_t s[1] = {512}, r[1] = {1};
  int64_t peak_at[9] = {0};
  const int64_t b = 1, n = 512, h = 4, d = 64, unit = b * n * h * d * 4;
  const int64_t slack = 2 * 300000; /* kernel workspace: 2 threads */
  for (int world = 1; world <= 8; world *= 2) {
    ra_config c = make_config(b, n, h, d, 1, s, r, 0, RA_MODE_GROUPS, world);
    ra_stats stats[8];
    double lse_err;
    CHECK(ring_error(&c, stats, &lse_err) < 2e-5);
    const int64_t L = n / world, threads = world < 2 ? 2 / world : 1;
    const int64_t exact = threads * (int64_t)ra_workspace_bytes(d)   /* kernel workspaces      */
                          + 5 * unit / world + b * h * L * 4         /* q k v o, lse (held)    */
                          + b * h * (int64_t)sizeof(ra_attend_task)  /* task list: 1 window    */
                          + b * h * (int64_t)sizeof(ra_copy_task)    /* copy list              */
                          + b * h * L * 4                            /* lse state; acc in 5u/k */
                          + (world > 1 ? 2 * 2 * unit / world / 8 : 0); /* two slots: k, v / 8 */
    int64_t peak = 0;
    for (int rk = 0; rk < world; rk++) {
      if (stats[rk].peak_bytes != exact) {
        fprintf(stderr, "  k=%d rank %d: peak %lld, want %lld\n", world, rk, (long long)stats[rk].peak_bytes,
                (long long)exact);
        failures_in_test++;
      }
      peak = stats[rk].peak_bytes > peak ? stats[rk].peak_bytes : peak;
    }
    peak_at[world] = peak;
    int64_t expect = (world == 1 ? 10 : 11) * unit / world / 2;
    CHECK(peak >= expect && peak <= expect + unit / 64 + slack);
    if (world > 1) CHECK(stats[0].bytes_sent > 0);
  }
  CHECK(peak_at[8] * 8 <= peak_at[2] * 2 + 8 * slack);
  CHECK(peak_at[8] * 2 < peak_at[1]);
}

static void test_causal_pipeline_sends_less(void) {
  int64_t s[1] = {256}, r[1] = {1};
  int64_t sent[2] = {0, 0};
  for (int causal = 0; causal < 2; causal++) {
    ra_config c = make_config(1, 256, 2, 16, 1, s, r, causal, RA_MODE_GROUPS, 4);
    ra_stats stats[4];
    double lse_err;
    CHECK(ring_error(&c, stats, &lse_err) < 2e-5);
    for (int rk = 0; rk < 4; rk++) sent[causal] += stats[rk].bytes_sent;
    if (causal) CHECK(stats[0].steps_skipped == 3 && stats[3].steps == 4);
    else CHECK(stats[0].steps == 4 && stats[0].steps_skipped == 0);
  }
  /* 4 ranks: non-causal sends 4*3 blocks, causal only 3+2+1 */
  CHECK(sent[1] * 2 == sent[0]);
}

static void test_local_branch_never_communicates(void) {
  int64_t s[2] = {16, 32}, r[2] = {1, 2};
  ra_config c = make_config(1, 128, 2, 16, 2, s, r, 1, RA_MODE_LONGNET, 4); /* L = 32 */
  ra_stats stats[4];
  double lse_err;
  CHECK(ring_error(&c, stats, &lse_err) < 2e-5);
  for (int rk = 0; rk < 4; rk++) CHECK(stats[rk].bytes_sent == 0 && stats[rk].bytes_received == 0);
}

static void test_nonfinite_refused(void) {
  int64_t s[1] = {16}, r[1] = {1};
  ra_config c = make_config(1, 16, 1, 8, 1, s, r, 0, RA_MODE_GROUPS, 2);
  float *q = random_tensor(128), *k = random_tensor(128), *v = random_tensor(128), o[128];
  k[77] = NAN;
  ra_exec exec = cpu_exec(1, 1);
  CHECK(call_forward(&c, RA_DEVICE_CPU, contiguous(q, &c), contiguous(k, &c), contiguous(v, &c),
                     contiguous(o, &c), NULL, &exec, NULL) == RA_ERR_NONFINITE);
  CHECK(strstr(ra_last_error(), "k contains") != NULL);
  /* float64: an infinity in v (the scan reads 8-byte elements) */
  c.dtype = RA_FLOAT64;
  double *q64 = filled(q, 128, c.dtype), *v64 = filled(v, 128, c.dtype), o64[128];
  v64[127] = INFINITY;
  CHECK(call_forward(&c, RA_DEVICE_CPU, contiguous(q64, &c), contiguous(q64, &c), contiguous(v64, &c),
                     contiguous(o64, &c), NULL, &exec, NULL) == RA_ERR_NONFINITE);
  CHECK(strstr(ra_last_error(), "v contains") != NULL);
  free(q64); free(v64);
  free(q); free(k); free(v);
}

/* A rank that fails must not leave its peers waiting forever. */
static void test_failed_rank_does_not_hang(void) {
  int64_t s[1] = {64}, r[1] = {1};
  ra_config c = make_config(1, 64, 1, 8, 1, s, r, 0, RA_MODE_GROUPS, 2);
  float *x = random_tensor(512), o[512];
  ra_plan *plan;
  CHECK(ra_plan_create(&c, &plan) == RA_OK);
  ra_inproc_world *w;
  CHECK(ra_inproc_world_create(2, &w) == RA_OK);
  ra_transport t1 = ra_inproc_transport(w, 1), t0 = ra_inproc_transport(w, 0);
  ra_stats stats[2];
  ra_call call;
  memset(&call, 0, sizeof call);
  ra_fwd_params_init(&call.p.fwd);
  call.p.fwd.cfg = c;
  call.p.fwd.q = call.p.fwd.k = call.p.fwd.v = contiguous(x, &c);
  call.p.fwd.o = contiguous(o, &c);
  call.p.fwd.exec.num_threads = 2;
  call.p.fwd.stats = stats;
  call.plan = plan;
  call.rows = c.seq_len;
  ra_call bad = ra_rank_view(&call, 1), good = ra_rank_view(&call, 0);
  bad.p.fwd.q.data = NULL;
  /* rank 1 fails its argument check and aborts; rank 0 then runs alone */
  const ra_backend_iface *cpu = ra_cpu_backend_iface();
  CHECK(ra_run_rank(cpu, NULL, &bad, &t1) == RA_ERR_INVALID_ARGUMENT);
  CHECK(ra_run_rank(cpu, NULL, &good, &t0) == RA_ERR_TRANSPORT);
  ra_inproc_world_destroy(w);
  ra_plan_destroy(plan);
  free(x);
}

/* A deadlocked ring (a wrong neighbour, a lost message) must fail this
 * program quickly, not hang it until meson's timeout: the whole program takes
 * about a second (7 s under the sanitizers, on two cores). */
#define WATCHDOG_SECONDS 60
#define STRINGIFY(x) #x
#define STR(x) STRINGIFY(x)

static void on_watchdog(int sig) {
  static const char msg[] = "test_core: still running after " STR(WATCHDOG_SECONDS)
                            " s: a deadlocked ring? (the test after the last one listed)\n";
  (void)sig;
  if (write(2, msg, sizeof msg - 1) < 0) _exit(2);
  _exit(1);
}

int main(void) {
  setvbuf(stdout, NULL, _IOLBF, 0); /* each finished test is listed before a hang */
  signal(SIGALRM, on_watchdog);
  alarm(WATCHDOG_SECONDS);
  static const test_case tests[] = {
      {"status_strings", test_status_strings},
      {"plan_validation", test_plan_validation},
      {"merge", test_merge},
      {"merge_large_lse", test_merge_large_lse},
      {"forward_matches_naive", test_forward_matches_naive},
      {"float64_matches_naive", test_float64_matches_naive},
      {"float64_backward_ring", test_float64_backward_ring},
      {"memory_falls_with_ranks", test_memory_falls_with_ranks},
      {"causal_pipeline_sends_less", test_causal_pipeline_sends_less},
      {"local_branch_never_communicates", test_local_branch_never_communicates},
      {"nonfinite_refused", test_nonfinite_refused},
      {"failed_rank_does_not_hang", test_failed_rank_does_not_hang},
  };
  return run_tests(tests, sizeof tests / sizeof tests[0]);
}
