/*
 * test_cuda.c -- GPU kernels against their CPU references.  Exits 77 (the
 * "skipped" code of meson test) when no CUDA device is present.
 *
 * The CUDA forward (ra_cuda_forward) is compared with the CPU ring
 * (ra_inproc_forward) on the same plan and fresh random inputs, with every
 * output element poisoned (NaN) beforehand: fp32, fp16 and bf16 (the CPU
 * has no bf16, so its reference runs in fp32 on the bf16-rounded inputs),
 * both modes, causal and not, ring sizes 1 to 8, local and spanning
 * branches, head dims 64 / 128 (tensor cores) and others (SIMT kernel),
 * padded layouts, and the tensor-core cases again on the SIMT kernel.
 * The CUDA backward (ra_cuda_backward) is compared in the same way with the
 * CPU ring's backward (ra_inproc_backward), given the same o, lse and dout.
 */
#define _POSIX_C_SOURCE 200809L
#include <cuda_runtime_api.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "half.h"
#include "ringattn.h"

static int failures;
#define CHECK(cond)                                                               \
  do {                                                                            \
    if (!(cond)) {                                                                \
      fprintf(stderr, "  %s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);  \
      failures++;                                                                 \
    }                                                                             \
  } while (0)

static float frand(unsigned *s) {
  *s = *s * 1664525u + 1013904223u;
  return (float)(*s >> 8) / (float)(1 << 24) * 4.0f - 2.0f;
}

/* Rows with every combination of finite / -inf lse on either side. */
static void test_merge(void) {
  const int rows = 64, dim = 80, stride = 96;
  size_t n = (size_t)rows * stride;
  float *acc = malloc(n * 4), *part = malloc(n * 4), *la = malloc(rows * 4), *lp = malloc(rows * 4);
  float *gpu = malloc(n * 4), *gla = malloc(rows * 4);
  unsigned s = 12345;
  for (size_t i = 0; i < n; i++) {
    acc[i] = frand(&s);
    part[i] = frand(&s);
  }
  for (int t = 0; t < rows; t++) {
    la[t] = t % 4 == 1 ? -INFINITY : 3 * frand(&s);
    lp[t] = t % 4 == 2 ? -INFINITY : 3 * frand(&s);
  }
  float *d_acc, *d_part, *d_la, *d_lp;
  CHECK(cudaMalloc((void **)&d_acc, n * 4) == cudaSuccess);
  CHECK(cudaMalloc((void **)&d_part, n * 4) == cudaSuccess);
  CHECK(cudaMalloc((void **)&d_la, rows * 4) == cudaSuccess);
  CHECK(cudaMalloc((void **)&d_lp, rows * 4) == cudaSuccess);
  cudaMemcpy(d_acc, acc, n * 4, cudaMemcpyHostToDevice);
  cudaMemcpy(d_part, part, n * 4, cudaMemcpyHostToDevice);
  cudaMemcpy(d_la, la, rows * 4, cudaMemcpyHostToDevice);
  cudaMemcpy(d_lp, lp, rows * 4, cudaMemcpyHostToDevice);
  CHECK(ra_cuda_merge_rows(d_acc, stride, d_la, 1, d_part, stride, d_lp, rows, dim, NULL) == RA_OK);
  CHECK(cudaMemcpy(gpu, d_acc, n * 4, cudaMemcpyDeviceToHost) == cudaSuccess);
  CHECK(cudaMemcpy(gla, d_la, rows * 4, cudaMemcpyDeviceToHost) == cudaSuccess);
  ra_merge_rows(acc, stride, la, 1, part, stride, lp, rows, dim);
  for (int t = 0; t < rows; t++) {
    CHECK(gla[t] == la[t] || fabsf(gla[t] - la[t]) < 1e-5f);
    for (int c = 0; c < stride; c++) CHECK(fabsf(gpu[t * stride + c] - acc[t * stride + c]) < 1e-5f);
  }
  cudaFree(d_acc); cudaFree(d_part); cudaFree(d_la); cudaFree(d_lp);
  free(acc); free(part); free(la); free(lp); free(gpu); free(gla);
}

/* ------------------------------------------------------------ the forward */

static uint16_t float_to_bf16(float f) { /* round to nearest even */
  uint32_t x;
  memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);
  x += 0x7fffu + ((x >> 16) & 1u);
  return (uint16_t)(x >> 16);
}

static float bf16_to_float(uint16_t h) {
  uint32_t x = (uint32_t)h << 16;
  float f;
  memcpy(&f, &x, 4);
  return f;
}

static size_t dtype_bytes(ra_dtype t) { return t == RA_FLOAT32 ? 4 : 2; }

/* Element i of a host buffer of dtype t as a float. */
static float get(const void *buf, ra_dtype t, int64_t i) {
  if (t == RA_FLOAT32) return ((const float *)buf)[i];
  uint16_t h = ((const uint16_t *)buf)[i];
  return t == RA_FLOAT16 ? ra_half_to_float(h) : bf16_to_float(h);
}

static void put(void *buf, ra_dtype t, int64_t i, float x) {
  if (t == RA_FLOAT32) ((float *)buf)[i] = x;
  else ((uint16_t *)buf)[i] = t == RA_FLOAT16 ? ra_float_to_half(x) : float_to_bf16(x);
}

typedef struct fwd_case {
  const char *name;
  int64_t b, n, h, d;
  int G;
  int64_t seg[4], rate[4];
  ra_mode mode;
  int world;
  int64_t pad; /* extra elements after each head's row: a strided layout */
} fwd_case;

static ra_config case_config(const fwd_case *fc, int causal, ra_dtype dtype) {
  ra_config c;
  ra_config_init(&c);
  c.batch = fc->b;
  c.seq_len = fc->n;
  c.num_heads = fc->h;
  c.head_dim = fc->d;
  c.num_branches = fc->G;
  for (int i = 0; i < fc->G; i++) {
    c.segment_lengths[i] = fc->seg[i];
    c.dilation_rates[i] = fc->rate[i];
  }
  c.causal = causal;
  c.mode = fc->mode;
  c.world_size = fc->world;
  c.dtype = dtype;
  return c;
}

static cudaStream_t user_stream; /* the caller's stream of every forward */

/* One comparison; returns the number of mismatching values (printed). */
static int64_t run_forward_case(const fwd_case *fc, int causal, ra_dtype dtype, const char *kernel) {
  const int64_t sh = fc->d + fc->pad, sn = fc->h * sh, sb = fc->n * sn;
  const int64_t total = fc->b * sb, rows = fc->b * fc->h * fc->n;
  const ra_dtype ref_dtype = dtype == RA_BFLOAT16 ? RA_FLOAT32 : dtype;
  const size_t es = dtype_bytes(dtype), res = dtype_bytes(ref_dtype);
  const double tol = dtype == RA_FLOAT32 ? 2e-4 : dtype == RA_FLOAT16 ? 1e-2 : 2e-2;
  static unsigned seed = 2024;
  int64_t bad = 0;

  ra_config dc = case_config(fc, causal, dtype), rc = case_config(fc, causal, ref_dtype);
  ra_plan *dplan = NULL, *rplan = NULL;
  if (ra_plan_create(&dc, &dplan) != RA_OK || ra_plan_create(&rc, &rplan) != RA_OK) {
    fprintf(stderr, "  %s: plan: %s\n", fc->name, ra_last_error());
    ra_plan_destroy(dplan);
    return 1;
  }
  /* inputs in the device dtype; the reference gets the same values */
  void *in[3], *ref_in[3], *ref_o = malloc(res * (size_t)total), *got_o = malloc(es * (size_t)total);
  float *ref_lse = malloc(sizeof(float) * (size_t)rows), *got_lse = malloc(sizeof(float) * (size_t)rows);
  void *d_in[3] = {NULL, NULL, NULL}, *d_o = NULL;
  float *d_lse = NULL;
  for (int t = 0; t < 3; t++) {
    in[t] = malloc(es * (size_t)total);
    ref_in[t] = malloc(res * (size_t)total);
    for (int64_t i = 0; i < total; i++) {
      put(in[t], dtype, i, frand(&seed));
      put(ref_in[t], ref_dtype, i, get(in[t], dtype, i));
    }
    CHECK(cudaMalloc(&d_in[t], es * (size_t)total) == cudaSuccess);
    CHECK(cudaMemcpy(d_in[t], in[t], es * (size_t)total, cudaMemcpyHostToDevice) == cudaSuccess);
  }
  CHECK(cudaMalloc(&d_o, es * (size_t)total) == cudaSuccess);
  CHECK(cudaMalloc((void **)&d_lse, sizeof(float) * (size_t)rows) == cudaSuccess);
  /* NaN in every dtype, enqueued on the caller's stream: the forward must
   * write after it */
  CHECK(cudaMemsetAsync(d_o, 0xff, es * (size_t)total, user_stream) == cudaSuccess);
  CHECK(cudaMemsetAsync(d_lse, 0xff, sizeof(float) * (size_t)rows, user_stream) == cudaSuccess);
  memset(ref_o, 0xff, res * (size_t)total);
  memset(ref_lse, 0xff, sizeof(float) * (size_t)rows);

  ra_tensor t_ref[4], t_dev[4];
  void *ref_ptr[4] = {ref_in[0], ref_in[1], ref_in[2], ref_o}, *dev_ptr[4] = {d_in[0], d_in[1], d_in[2], d_o};
  for (int t = 0; t < 4; t++) {
    t_ref[t] = (ra_tensor){ref_ptr[t], sb, sn, sh};
    t_dev[t] = (ra_tensor){dev_ptr[t], sb, sn, sh};
  }
  ra_exec exec = {0, 0};
  ra_stats *stats = calloc((size_t)fc->world, sizeof *stats);
  ra_status st = ra_inproc_forward(rplan, t_ref[0], t_ref[1], t_ref[2], t_ref[3], ref_lse, &exec, NULL);
  if (st != RA_OK) {
    fprintf(stderr, "  %s: CPU reference failed: %s\n", fc->name, ra_last_error());
    bad++;
  }
  if (kernel) setenv("RINGATTN_CUDA_KERNEL", kernel, 1);
  ra_status gst = ra_cuda_forward(dplan, t_dev[0], t_dev[1], t_dev[2], t_dev[3], d_lse, user_stream, stats);
  if (kernel) unsetenv("RINGATTN_CUDA_KERNEL");
  if (gst != RA_OK) {
    fprintf(stderr, "  %s: ra_cuda_forward failed: %s\n", fc->name, ra_last_error());
    bad++;
  }
  CHECK(cudaMemcpy(got_o, d_o, es * (size_t)total, cudaMemcpyDeviceToHost) == cudaSuccess);
  CHECK(cudaMemcpy(got_lse, d_lse, sizeof(float) * (size_t)rows, cudaMemcpyDeviceToHost) == cudaSuccess);

  double max_err = 0.0, max_lse_err = 0.0;
  int64_t first = -1;
  if (st == RA_OK && gst == RA_OK) {
    for (int64_t i = 0; i < total; i++) {
      const float g = get(got_o, dtype, i);
      if (i % sh >= fc->d) { /* padding: must never be written */
        if (!isnan(g)) bad++, first = first < 0 ? i : first;
        continue;
      }
      const double r = get(ref_o, ref_dtype, i), e = fabs(g - r);
      if (!(e <= tol + tol * fabs(r))) bad++, first = first < 0 ? i : first; /* NaN fails */
      if (!(e <= max_err)) max_err = e;
    }
    for (int64_t i = 0; i < rows; i++) {
      const double r = ref_lse[i], g = got_lse[i];
      const double e = isinf(r) ? (g == r ? 0.0 : INFINITY) : fabs(g - r);
      if (!(e <= tol)) bad++, first = first < 0 ? total + i : first;
      if (!(e <= max_lse_err)) max_lse_err = e;
    }
    for (int r = 0; r < fc->world; r++) {
      if (stats[r].current_bytes != 0 || stats[r].peak_bytes <= 0) {
        fprintf(stderr, "  %s: rank %d holds %lld bytes after the call (peak %lld)\n", fc->name, r,
                (long long)stats[r].current_bytes, (long long)stats[r].peak_bytes);
        bad++;
      }
    }
  }
  const char *dn = dtype == RA_FLOAT32 ? "fp32" : dtype == RA_FLOAT16 ? "fp16" : "bf16";
  if (bad) {
    fprintf(stderr, "  FAIL %s %s%s%s%s: %lld bad values, max |err| o %.3g lse %.3g (first at %lld)\n",
            fc->name, dn, causal ? " causal" : "", kernel ? " kernel=" : "", kernel ? kernel : "",
            (long long)bad, max_err, max_lse_err, (long long)first);
    failures++;
  } else {
    printf("  ok %-22s %s%s%s%s  max |err| o %.2e lse %.2e\n", fc->name, dn, causal ? " causal" : "",
           kernel ? " kernel=" : "", kernel ? kernel : "", max_err, max_lse_err);
  }
  for (int t = 0; t < 3; t++) {
    cudaFree(d_in[t]);
    free(in[t]);
    free(ref_in[t]);
  }
  cudaFree(d_o);
  cudaFree(d_lse);
  free(ref_o); free(got_o); free(ref_lse); free(got_lse); free(stats);
  ra_plan_destroy(dplan);
  ra_plan_destroy(rplan);
  return bad;
}

static const fwd_case cases[] = {
    /* name                 b     n  h    d  G  segments            rates        mode          k  pad */
    {"dense k=1",           1,  256, 2,  64, 1, {256},              {1},         RA_MODE_GROUPS,  1, 0},
    {"dense k=4",           2,  512, 3, 128, 1, {512},              {1},         RA_MODE_GROUPS,  4, 0},
    {"dense k=8 tails",     1,  320, 1,  64, 1, {320},              {1},         RA_MODE_GROUPS,  8, 0},
    {"groups local+span",   3,  512, 3, 128, 3, {128, 256, 512},    {1, 2, 4},   RA_MODE_GROUPS,  4, 0},
    {"longnet k=8",         1,  768, 5,  64, 2, {96, 384},          {2, 4},      RA_MODE_LONGNET, 8, 0},
    {"longnet windows",     2, 1024, 4,  64, 2, {64, 256},          {1, 2},      RA_MODE_LONGNET, 2, 0},
    {"long runs k=2",       1, 2048, 2, 128, 2, {512, 2048},        {1, 4},      RA_MODE_GROUPS,  2, 0},
    {"rate 3 k=5",          1,  240, 2,  64, 1, {240},              {3},         RA_MODE_GROUPS,  5, 0},
    {"groups k=6",          1,  384, 2, 128, 2, {192, 384},         {2, 3},      RA_MODE_GROUPS,  6, 0},
    {"rate 7 k=7",          1,  224, 1,  64, 1, {224},              {7},         RA_MODE_LONGNET, 7, 0},
    {"dim 80 k=3",          1,  192, 3,  80, 2, {64, 192},          {1, 3},      RA_MODE_GROUPS,  3, 0},
    {"dim 32 k=2",          2,   96, 2,  32, 1, {96},               {2},         RA_MODE_LONGNET, 2, 0},
    {"dim 256 k=1",         1,  128, 1, 256, 1, {128},              {1},         RA_MODE_GROUPS,  1, 0},
    {"padded aligned",      1,  256, 2,  64, 2, {128, 256},         {1, 2},      RA_MODE_GROUPS,  2, 8},
    {"padded misaligned",   1,  256, 2, 128, 1, {256},              {1},         RA_MODE_LONGNET, 2, 3},
};

static void test_forward(void) {
  const ra_dtype dtypes[3] = {RA_FLOAT32, RA_FLOAT16, RA_BFLOAT16};
  CHECK(cudaStreamCreate(&user_stream) == cudaSuccess);
  for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++)
    for (int causal = 0; causal < 2; causal++)
      for (int t = 0; t < 3; t++) {
        run_forward_case(&cases[c], causal, dtypes[t], NULL);
        /* the tensor-core cases once more on the SIMT kernel */
        if (dtypes[t] != RA_FLOAT32 && (cases[c].d == 64 || cases[c].d == 128) && cases[c].pad == 0 &&
            cases[c].n <= 512)
          run_forward_case(&cases[c], causal, dtypes[t], "simt");
      }
  cudaStreamDestroy(user_stream);
}

/* ----------------------------------------------------------- the backward */

/* Largest |a - b| over the d used columns of every row (a: device dtype, b:
 * reference dtype); padding columns of a must still hold the NaN poison.
 * Returns the error relative to max(|b|, 1e-3) and counts bad values. */
static double grad_error(const void *a, ra_dtype ta, const void *b, ra_dtype tb, int64_t total, int64_t sh,
                         int64_t d, int64_t *unwritten) {
  double err = 0.0, scale = 1e-3;
  for (int64_t i = 0; i < total; i++) {
    const float g = get(a, ta, i);
    if (i % sh >= d) {
      if (!isnan(g)) (*unwritten)++;
      continue;
    }
    const double r = get(b, tb, i), e = fabs(g - r);
    if (!(e <= err)) err = e; /* a NaN makes err NaN */
    if (fabs(r) > scale) scale = fabs(r);
  }
  return err / scale;
}

/* ra_cuda_backward against ra_inproc_backward on the same plan: both get
 * the CPU forward's o (rounded to the device dtype) and lse, and the same
 * dout; dq, dk, dv are NaN-poisoned first. */
static int64_t run_backward_case(const fwd_case *fc, int causal, ra_dtype dtype, const char *kernel) {
  const int64_t sh = fc->d + fc->pad, sn = fc->h * sh, sb = fc->n * sn;
  const int64_t total = fc->b * sb, rows = fc->b * fc->h * fc->n;
  const ra_dtype ref_dtype = dtype == RA_BFLOAT16 ? RA_FLOAT32 : dtype;
  const size_t es = dtype_bytes(dtype), res = dtype_bytes(ref_dtype);
  const double tol = dtype == RA_FLOAT32 ? 1e-4 : dtype == RA_FLOAT16 ? 1e-2 : 3e-2;
  static unsigned seed = 77;
  int64_t bad = 0;
  ra_config dc = case_config(fc, causal, dtype), rc = case_config(fc, causal, ref_dtype);
  ra_plan *dplan = NULL, *rplan = NULL;
  if (ra_plan_create(&dc, &dplan) != RA_OK || ra_plan_create(&rc, &rplan) != RA_OK) {
    fprintf(stderr, "  %s: plan: %s\n", fc->name, ra_last_error());
    ra_plan_destroy(dplan);
    return 1;
  }
  /* 0-2 q, k, v; 3 o; 4 dout (inputs, both dtypes); 5-7 dq, dk, dv (outputs) */
  void *host[8], *ref[8], *dev[8];
  float *lse = malloc(sizeof(float) * (size_t)rows), *d_lse = NULL;
  for (int t = 0; t < 8; t++) {
    host[t] = malloc(es * (size_t)total);
    ref[t] = malloc(res * (size_t)total);
    dev[t] = NULL;
    CHECK(cudaMalloc(&dev[t], es * (size_t)total) == cudaSuccess);
    if (t == 3 || t > 4) continue;
    for (int64_t i = 0; i < total; i++) {
      put(host[t], dtype, i, frand(&seed));
      put(ref[t], ref_dtype, i, get(host[t], dtype, i));
    }
  }
  CHECK(cudaMalloc((void **)&d_lse, sizeof(float) * (size_t)rows) == cudaSuccess);
  ra_tensor tr[8], td[8];
  for (int t = 0; t < 8; t++) {
    tr[t] = (ra_tensor){ref[t], sb, sn, sh};
    td[t] = (ra_tensor){dev[t], sb, sn, sh};
  }
  ra_exec exec = {0, 0};
  ra_status st = ra_inproc_forward(rplan, tr[0], tr[1], tr[2], tr[3], lse, &exec, NULL);
  for (int64_t i = 0; i < total && st == RA_OK; i++) { /* o in the device dtype, the reference alike */
    put(host[3], dtype, i, get(ref[3], ref_dtype, i));
    put(ref[3], ref_dtype, i, get(host[3], dtype, i));
  }
  for (int t = 5; t < 8; t++) memset(ref[t], 0xff, res * (size_t)total);
  if (st == RA_OK) st = ra_inproc_backward(rplan, tr[0], tr[1], tr[2], tr[3], tr[4], lse, tr[5], tr[6], tr[7], &exec, NULL);
  if (st != RA_OK) {
    fprintf(stderr, "  %s: CPU reference failed: %s\n", fc->name, ra_last_error());
    bad++;
  }
  for (int t = 0; t < 5; t++) CHECK(cudaMemcpy(dev[t], host[t], es * (size_t)total, cudaMemcpyHostToDevice) == cudaSuccess);
  for (int t = 5; t < 8; t++) CHECK(cudaMemsetAsync(dev[t], 0xff, es * (size_t)total, user_stream) == cudaSuccess);
  CHECK(cudaMemcpy(d_lse, lse, sizeof(float) * (size_t)rows, cudaMemcpyHostToDevice) == cudaSuccess);
  ra_stats *stats = calloc((size_t)fc->world, sizeof *stats);
  /* kernel: "simt" (RINGATTN_CUDA_KERNEL) or "deterministic" (the two-pass
   * tensor-core kernels, RINGATTN_DETERMINISTIC=1) */
  const int det = kernel && strcmp(kernel, "deterministic") == 0;
  const char *env = det ? "RINGATTN_DETERMINISTIC" : "RINGATTN_CUDA_KERNEL";
  if (kernel) setenv(env, det ? "1" : kernel, 1);
  ra_status gst = ra_cuda_backward(dplan, td[0], td[1], td[2], td[3], td[4], d_lse, td[5], td[6], td[7],
                                   user_stream, stats);
  if (kernel) unsetenv(env);
  if (gst != RA_OK) {
    fprintf(stderr, "  %s: ra_cuda_backward failed: %s\n", fc->name, ra_last_error());
    bad++;
  }
  double err[3] = {0, 0, 0};
  int64_t unwritten = 0;
  if (st == RA_OK && gst == RA_OK) {
    for (int t = 5; t < 8; t++) {
      CHECK(cudaMemcpy(host[t], dev[t], es * (size_t)total, cudaMemcpyDeviceToHost) == cudaSuccess);
      err[t - 5] = grad_error(host[t], dtype, ref[t], ref_dtype, total, sh, fc->d, &unwritten);
      if (!(err[t - 5] <= tol)) bad++;
    }
    bad += unwritten;
    for (int r = 0; r < fc->world; r++)
      if (stats[r].current_bytes != 0 || stats[r].peak_bytes <= 0) bad++;
  }
  const char *dn = dtype == RA_FLOAT32 ? "fp32" : dtype == RA_FLOAT16 ? "fp16" : "bf16";
  if (bad) {
    fprintf(stderr, "  FAIL backward %s %s%s%s%s: rel err dq %.3g dk %.3g dv %.3g, %lld padding values written\n",
            fc->name, dn, causal ? " causal" : "", kernel ? " kernel=" : "", kernel ? kernel : "", err[0], err[1],
            err[2], (long long)unwritten);
    failures++;
  } else {
    printf("  ok backward %-22s %s%s%s%s  rel err dq %.2e dk %.2e dv %.2e\n", fc->name, dn, causal ? " causal" : "",
           kernel ? " kernel=" : "", kernel ? kernel : "", err[0], err[1], err[2]);
  }
  for (int t = 0; t < 8; t++) {
    cudaFree(dev[t]);
    free(host[t]);
    free(ref[t]);
  }
  cudaFree(d_lse);
  free(lse);
  free(stats);
  ra_plan_destroy(dplan);
  ra_plan_destroy(rplan);
  return bad;
}

static void test_backward(void) {
  const ra_dtype dtypes[3] = {RA_FLOAT32, RA_FLOAT16, RA_BFLOAT16};
  CHECK(cudaStreamCreate(&user_stream) == cudaSuccess);
  for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++)
    for (int causal = 0; causal < 2; causal++)
      for (int t = 0; t < 3; t++) {
        run_backward_case(&cases[c], causal, dtypes[t], NULL);
        if (dtypes[t] != RA_FLOAT32 && (cases[c].d == 64 || cases[c].d == 128) && cases[c].pad == 0 &&
            cases[c].n <= 512) {
          run_backward_case(&cases[c], causal, dtypes[t], "simt");
          run_backward_case(&cases[c], causal, dtypes[t], "deterministic");
        }
      }
  cudaStreamDestroy(user_stream);
}

/* Clear refusals: host memory, an unsupported head dim. */
static void test_forward_errors(void) {
  ra_config c;
  ra_config_init(&c);
  c.batch = 1;
  c.seq_len = 64;
  c.num_heads = 1;
  c.head_dim = 64;
  c.num_branches = 1;
  c.segment_lengths[0] = 64;
  c.dilation_rates[0] = 1;
  ra_plan *plan = NULL;
  CHECK(ra_plan_create(&c, &plan) == RA_OK);
  float *host = calloc(64 * 64, sizeof(float));
  ra_tensor t = {host, 64 * 64, 64, 64};
  CHECK(ra_cuda_forward(plan, t, t, t, t, NULL, NULL, NULL) == RA_ERR_INVALID_ARGUMENT);
  CHECK(strstr(ra_last_error(), "device memory") != NULL);
  ra_plan_destroy(plan);
  c.head_dim = 300;
  CHECK(ra_plan_create(&c, &plan) == RA_OK);
  CHECK(ra_cuda_forward(plan, t, t, t, t, NULL, NULL, NULL) == RA_ERR_UNSUPPORTED);
  CHECK(strstr(ra_last_error(), "head_dim") != NULL);
  ra_plan_destroy(plan);
  free(host);
}

int main(void) {
  if (ra_cuda_device_count() == 0) {
    printf("no CUDA device: skipped\n");
    return 77;
  }
  test_merge();
  test_forward_errors();
  test_forward();
  test_backward();
  printf("%d failure(s)\n", failures);
  return failures ? 1 : 0;
}
