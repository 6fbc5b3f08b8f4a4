/*
 * test_sizes.c -- sizes never wrap (issue 10, item 3): the checked size
 * helpers of internal.h, the plan's and the entry point's refusals of
 * shapes, strides and lse strides whose sizes do not fit, broadcast
 * (stride-0) inputs computed in place, and the thread clamp.  Run by
 * `meson test`, also under ASan/UBSan (.ci/run), where a wrapped size
 * would show as a heap overflow.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "calls.h"
#include "internal.h"

#include "harness.h"

static ra_config config(int64_t b, int64_t n, int64_t h, int64_t d, int64_t s, int64_t r, int world) {
  return make_config(b, n, h, d, 1, &s, &r, 0, RA_MODE_GROUPS, world);
}

static void expect_refused(ra_status st, const char *needle) {
  CHECK(st == RA_ERR_INVALID_ARGUMENT);
  if (!strstr(ra_last_error(), needle)) {
    fprintf(stderr, "  message \"%s\" does not name \"%s\"\n", ra_last_error(), needle);
    failures_in_test++;
  }
}

static void test_helpers(void) {
  int64_t x = 7;
  size_t z = 7;
  CHECK(ra_mul_ok(INT64_MAX, 1, &x) && x == INT64_MAX);
  CHECK(ra_mul_ok(0, INT64_MAX, &x) && x == 0);
  CHECK(!ra_mul_ok(INT64_MAX / 2 + 1, 2, &x) && x == 0); /* *out untouched on failure */
  CHECK(!ra_mul_ok(-1, 2, &x));
  CHECK(!ra_mul_ok((int64_t)1 << 32, (int64_t)1 << 31, &x));
  CHECK(ra_mul4_ok(2, 3, 5, 7, &x) && x == 210);
  CHECK(!ra_mul4_ok((int64_t)1 << 20, (int64_t)1 << 20, (int64_t)1 << 20, (int64_t)1 << 3, &x));
  CHECK(ra_add_ok(INT64_MAX - 1, 1, &x) && x == INT64_MAX);
  CHECK(!ra_add_ok(INT64_MAX, 1, &x));
  CHECK(!ra_add_ok(-1, 1, &x));
  CHECK(ra_bytes_ok(1000, 8, &z) && z == 8000);
  CHECK(!ra_bytes_ok(INT64_MAX / 4, 8, &z));
  CHECK(!ra_bytes_ok(-1, 1, &z));

  ra_tensor t = {(void *)64, 100, 10, 0}; /* stride_h 0: a broadcast head axis */
  int64_t span = 0;
  CHECK(ra_tensor_span_ok(&t, 2, 10, 4, 8, &span) && span == 100 + 90 + 0 + 8);
  t.stride_b = INT64_MAX / 2;
  CHECK(!ra_tensor_span_ok(&t, 3, 10, 4, 8, &span));
  t.stride_b = 0;
  t.stride_n = INT64_MAX;
  CHECK(!ra_tensor_span_ok(&t, 1, 2, 1, 8, &span)); /* (n-1) stride_n + d overflows */
  CHECK(!ra_tensor_span_ok(&t, 0, 2, 1, 8, &span));  /* an empty shape has no span */
}

/* The two crashes of the issue, at the plan: a head count of 2^61 + 1
 * (G * H * 8 bytes of offsets wrapped) and shapes whose products do not fit. */
static void test_plan_refuses_unaddressable_shapes(void) {
  ra_plan *plan = (ra_plan *)1;
  ra_config c = config(1, 4, ((int64_t)1 << 61) + 1, 4, 4, 1, 1);
  expect_refused(ra_plan_create(&c, &plan), "q: shape");
  CHECK(plan == NULL);
  c.mode = RA_MODE_LONGNET;
  c.head_dim = 1;
  expect_refused(ra_plan_create(&c, &plan), "q: shape");
  const int64_t big[][4] = {{(int64_t)1 << 62, 2, 1, 1},
                            {1, (int64_t)1 << 60, 1, 16},
                            {(int64_t)1 << 21, (int64_t)1 << 21, (int64_t)1 << 21, 1},
                            {INT64_MAX, INT64_MAX, INT64_MAX, INT64_MAX},
                            {1, 1, (int64_t)1 << 57, 1}};
  for (size_t i = 0; i < sizeof big / sizeof big[0]; i++) {
    c = config(big[i][0], big[i][1], big[i][2], big[i][3], 1, 1, 1);
    plan = (ra_plan *)1;
    expect_refused(ra_plan_create(&c, &plan), "address");
    CHECK(plan == NULL);
  }
  /* the largest shape the bound allows still plans (nothing is allocated but the offsets) */
  c = config(1, (int64_t)1 << 40, 1, (INT64_MAX / 128) >> 40, (int64_t)1 << 40, 1, 1);
  CHECK(ra_plan_create(&c, &plan) == RA_OK);
  ra_plan_destroy(plan);
}

/* Strides whose offsets do not fit the address space are refused by the
 * entry point before any rank runs; so is an lse row stride that does. */
static void test_entry_refuses_unaddressable_strides(void) {
  const int64_t b = 1, n = 8, h = 2, d = 4, count = b * n * h * d;
  float *x = calloc((size_t)count, sizeof(float)), *o = calloc((size_t)count, sizeof(float));
  float *lse = calloc((size_t)(b * h * n), sizeof(float));
  ra_config c = config(b, n, h, d, n, 1, 1);
  ra_tensor ok = {x, n * h * d, h * d, d}, out = {o, n * h * d, h * d, d};
  ra_exec e = cpu_exec(1, 0);

  ra_tensor bad = ok;
  bad.stride_n = INT64_MAX / 4; /* (n - 1) * stride_n overflows */
  expect_refused(call_forward(&c, RA_DEVICE_CPU, bad, ok, ok, out, NULL, &e, NULL), "q: strides");
  bad = ok;
  bad.stride_h = INT64_MAX / 2 - 3; /* fits in elements, not in bytes */
  expect_refused(call_forward(&c, RA_DEVICE_CPU, ok, bad, ok, out, NULL, &e, NULL), "k: strides");
  ra_tensor high = {(void *)(UINTPTR_MAX - 7), 0, 0, 0}; /* d = 4 floats reach past the top of memory */
  expect_refused(call_forward(&c, RA_DEVICE_CPU, ok, ok, high, out, NULL, &e, NULL), "v: strides");
  bad = out;
  bad.stride_b = INT64_MAX; /* b = 1: stride_b never multiplies more than 0 */
  CHECK(call_forward(&c, RA_DEVICE_CPU, ok, ok, ok, bad, NULL, &e, NULL) == RA_OK);

  ra_fwd_params p;
  ra_fwd_params_init(&p);
  p.cfg = c;
  p.q = p.k = p.v = ok;
  p.o = out;
  p.lse = lse;
  p.exec = e;
  p.lse_ld = INT64_MAX / 2; /* (b h - 1) * lse_ld overflows */
  expect_refused(ra_forward(&p), "lse");
  p.lse_ld = n;
  CHECK(ra_forward(&p) == RA_OK);

  /* rings: the same check covers every rank's shard */
  c = config(b, n, h, d, n, 1, 4);
  bad = ok;
  bad.stride_n = INT64_MAX / 3;
  expect_refused(call_forward(&c, RA_DEVICE_CPU, bad, ok, ok, out, NULL, &e, NULL), "q: strides");
  free(x);
  free(o);
  free(lse);
}

/* The CPU kernels' workspaces take ~2.6 KB per column of the head dim, more
 * than the plan's 128 bytes per element: a head dim the plan accepts (b = n
 * = h = 1) made ra_workspace_bytes wrap to 5 KB and the kernel write far
 * past it.  Such head dims are refused before anything is read. */
static void test_huge_head_dim_refused(void) {
  static float buf[64];
  const ra_tensor t = {buf, 0, 0, 0};
  const int64_t dims[] = {56240073395455952LL /* the workspace bytes wrapped to 5 KB */, ((int64_t)1 << 40) + 1,
                          ((int64_t)1 << 56) - 64};
  ra_exec e = cpu_exec(1, 1);
  for (size_t i = 0; i < sizeof dims / sizeof dims[0]; i++) {
    ra_config c = config(1, 1, 1, dims[i], 1, 1, 1);
    ra_plan *plan;
    CHECK(ra_plan_create(&c, &plan) == RA_OK); /* within the plan's bound */
    ra_plan_destroy(plan);
    expect_refused(call_forward(&c, RA_DEVICE_CPU, t, t, t, t, NULL, &e, NULL), "head dim");
    c.dtype = RA_FLOAT64;
    expect_refused(call_forward(&c, RA_DEVICE_CPU, t, t, t, t, NULL, &e, NULL), "head dim");
  }
}

/* A broadcast input (stride 0 on batch, sequence or head) is a valid layout:
 * the core only reads inputs, so it computes on it in place and gets what it
 * gets on the materialised copy, on one rank and on rings, forward and
 * backward (whose gradients are per position, so dk and dv are full). */
static void test_broadcast_inputs(void) {
  const int64_t b = 2, n = 16, h = 2, d = 8, count = b * n * h * d;
  float *q = malloc(sizeof(float) * (size_t)count), *kc = malloc(sizeof(float) * (size_t)count);
  float *vc = malloc(sizeof(float) * (size_t)count), *k1 = malloc(sizeof(float) * (size_t)(n * d));
  float *v1 = malloc(sizeof(float) * (size_t)(h * d));
  float *o1 = malloc(sizeof(float) * (size_t)count), *o2 = malloc(sizeof(float) * (size_t)count);
  float *lse1 = malloc(sizeof(float) * (size_t)(b * h * n)), *lse2 = malloc(sizeof(float) * (size_t)(b * h * n));
  float *g1 = malloc(sizeof(float) * 3 * (size_t)count), *g2 = malloc(sizeof(float) * 3 * (size_t)count);
  for (int64_t i = 0; i < count; i++) q[i] = uniform();
  for (int64_t i = 0; i < n * d; i++) k1[i] = uniform();
  for (int64_t i = 0; i < h * d; i++) v1[i] = uniform();
  for (int64_t bb = 0; bb < b; bb++) /* k: (1, n, 1, d) broadcast; v: (1, 1, h, d) broadcast */
    for (int64_t t = 0; t < n; t++)
      for (int64_t hh = 0; hh < h; hh++)
        for (int64_t x = 0; x < d; x++) {
          kc[((bb * n + t) * h + hh) * d + x] = k1[t * d + x];
          vc[((bb * n + t) * h + hh) * d + x] = v1[hh * d + x];
        }
  const ra_tensor tq = {q, n * h * d, h * d, d}, out1 = {o1, n * h * d, h * d, d}, out2 = {o2, n * h * d, h * d, d};
  const ra_tensor kb = {k1, 0, d, 0}, vb = {v1, 0, 0, d};
  const ra_tensor kfull = {kc, n * h * d, h * d, d}, vfull = {vc, n * h * d, h * d, d};
  ra_exec e = cpu_exec(2, 1);
  for (int world = 1; world <= 4; world *= 2) {
    ra_config c = config(b, n, h, d, 8, 2, world);
    c.mode = RA_MODE_LONGNET;
    CHECK(call_forward(&c, RA_DEVICE_CPU, tq, kb, vb, out1, lse1, &e, NULL) == RA_OK);
    CHECK(call_forward(&c, RA_DEVICE_CPU, tq, kfull, vfull, out2, lse2, &e, NULL) == RA_OK);
    CHECK(memcmp(o1, o2, sizeof(float) * (size_t)count) == 0);
    CHECK(memcmp(lse1, lse2, sizeof(float) * (size_t)(b * h * n)) == 0);
    ra_tensor grads[2][3];
    for (int i = 0; i < 2; i++)
      for (int j = 0; j < 3; j++) grads[i][j] = (ra_tensor){(i ? g2 : g1) + j * count, n * h * d, h * d, d};
    const ra_tensor dout = {q, 0, 0, 0}; /* the output gradient broadcast too */
    CHECK(call_backward(&c, RA_DEVICE_CPU, tq, kb, vb, out1, dout, lse1, grads[0][0], grads[0][1], grads[0][2], &e,
                        NULL) == RA_OK);
    CHECK(call_backward(&c, RA_DEVICE_CPU, tq, kfull, vfull, out2, dout, lse2, grads[1][0], grads[1][1], grads[1][2],
                        &e, NULL) == RA_OK);
    CHECK(memcmp(g1, g2, sizeof(float) * 3 * (size_t)count) == 0);
  }
  free(q); free(kc); free(vc); free(k1); free(v1); free(o1); free(o2);
  free(lse1); free(lse2); free(g1); free(g2);
}

/* num_threads beyond 4 x the cores is clamped (a caller that bypasses
 * Python's rule must not make libgomp fail to start 10^6 threads). */
static void test_threads_clamped(void) {
  const int max = ra_max_num_threads();
  CHECK(max >= 4);
  CHECK(ra_resolve_num_threads(1000000) == max);
  CHECK(ra_resolve_num_threads(1) == 1);
  CHECK(ra_resolve_num_threads(0) >= 1 && ra_resolve_num_threads(0) <= max);
  CHECK(ra_default_num_threads() <= max);
  const int64_t b = 1, n = 8, h = 2, d = 4, count = b * n * h * d;
  float *x = calloc((size_t)count, sizeof(float)), *o = calloc((size_t)count, sizeof(float));
  ra_config c = config(b, n, h, d, n, 1, 2);
  ra_tensor t = {x, n * h * d, h * d, d}, out = {o, n * h * d, h * d, d};
  ra_exec e = cpu_exec(1000000, 0);
  CHECK(call_forward(&c, RA_DEVICE_CPU, t, t, t, out, NULL, &e, NULL) == RA_OK);
  free(x);
  free(o);
}

int main(void) {
  static const test_case tests[] = {
      {"size_helpers", test_helpers},
      {"plan_refuses_unaddressable_shapes", test_plan_refuses_unaddressable_shapes},
      {"entry_refuses_unaddressable_strides", test_entry_refuses_unaddressable_strides},
      {"huge_head_dim_refused", test_huge_head_dim_refused},
      {"broadcast_inputs", test_broadcast_inputs},
      {"threads_clamped", test_threads_clamped},
  };
  return run_tests(tests, sizeof tests / sizeof tests[0]);
}
