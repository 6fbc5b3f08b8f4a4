/*
 * test_cuda.c -- GPU kernels against their CPU references.  Exits 77 (the
 * "skipped" code of meson test) when no CUDA device is present.
 *
 * The CUDA forward (ra_forward on RA_DEVICE_CUDA tensors) is compared with
 * the CPU ring (ra_forward on RA_DEVICE_CPU tensors) on the same
 * configuration and fresh random inputs, with every output element
 * poisoned (NaN) beforehand: fp32, fp16 and bf16 (the CPU has no bf16, so
 * its reference runs in fp32 on the bf16-rounded inputs), both modes,
 * causal and not, ring sizes 1 to 8, local and spanning branches, head dims
 * 64 / 128 (tensor cores) and others (SIMT kernel), padded layouts, and the
 * tensor-core cases again on the SIMT kernel (exec.kernel RA_KERNEL_SIMT).
 * The CUDA backward (ra_backward) is compared in the same way with the CPU
 * ring's backward, given the same o, lse and dout, also on the SIMT kernels
 * and on the deterministic two-pass kernels (exec.deterministic).  The CUDA
 * runtime helpers of ringattn.h get a round trip of their own.
 */
#define _POSIX_C_SOURCE 200809L
#include <cuda_runtime_api.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/half.h"
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

/* One call of ra_forward on full-length tensors t (q, k, v, o) of device
 * type `dev`, lse (b, h, n) rows n apart.  A CUDA call waits for
 * user_stream; kernel "simt" restricts it to the SIMT kernels. */
static ra_status forward_call(const ra_config *cfg, ra_device_type dev, const ra_tensor *t, float *lse,
                              const char *kernel, ra_stats *stats) {
  ra_fwd_params p;
  ra_fwd_params_init(&p);
  p.cfg = *cfg;
  p.device_type = dev;
  p.q = t[0];
  p.k = t[1];
  p.v = t[2];
  p.o = t[3];
  p.lse = lse;
  p.lse_ld = cfg->seq_len;
  if (dev == RA_DEVICE_CUDA) {
    p.exec.stream = user_stream;
    if (kernel && strcmp(kernel, "simt") == 0) p.exec.kernel = RA_KERNEL_SIMT;
  }
  p.stats = stats;
  return ra_forward(&p);
}

/* ra_backward likewise: t holds q, k, v, o, dout, dq, dk, dv; kernel "simt"
 * (the SIMT kernels) or "deterministic" (the two-pass tensor-core kernels). */
static ra_status backward_call(const ra_config *cfg, ra_device_type dev, const ra_tensor *t, const float *lse,
                               const char *kernel, ra_stats *stats) {
  ra_bwd_params p;
  ra_bwd_params_init(&p);
  p.fwd.cfg = *cfg;
  p.fwd.device_type = dev;
  p.fwd.q = t[0];
  p.fwd.k = t[1];
  p.fwd.v = t[2];
  p.fwd.o = t[3];
  p.fwd.lse = (void *)lse; /* only read */
  p.fwd.lse_ld = cfg->seq_len;
  p.dout = t[4];
  p.dq = t[5];
  p.dk = t[6];
  p.dv = t[7];
  if (dev == RA_DEVICE_CUDA) {
    p.fwd.exec.stream = user_stream;
    if (kernel && strcmp(kernel, "simt") == 0) p.fwd.exec.kernel = RA_KERNEL_SIMT;
    if (kernel && strcmp(kernel, "deterministic") == 0) p.fwd.exec.deterministic = 1;
  }
  p.fwd.stats = stats;
  return ra_backward(&p);
}

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
  ra_plan *dplan = NULL, *rplan = NULL; /* both configurations must be valid */
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
  ra_stats *stats = calloc((size_t)fc->world, sizeof *stats);
  ra_status st = forward_call(&rc, RA_DEVICE_CPU, t_ref, ref_lse, NULL, NULL);
  if (st != RA_OK) {
    fprintf(stderr, "  %s: CPU reference failed: %s\n", fc->name, ra_last_error());
    bad++;
  }
  ra_status gst = forward_call(&dc, RA_DEVICE_CUDA, t_dev, d_lse, kernel, stats);
  if (gst != RA_OK) {
    fprintf(stderr, "  %s: CUDA ra_forward failed: %s\n", fc->name, ra_last_error());
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

/* The CUDA ra_backward against the CPU one on the same configuration: both
 * get the CPU forward's o (rounded to the device dtype) and lse, and the
 * same dout; dq, dk, dv are NaN-poisoned first. */
static int64_t run_backward_case(const fwd_case *fc, int causal, ra_dtype dtype, const char *kernel) {
  const int64_t sh = fc->d + fc->pad, sn = fc->h * sh, sb = fc->n * sn;
  const int64_t total = fc->b * sb, rows = fc->b * fc->h * fc->n;
  const ra_dtype ref_dtype = dtype == RA_BFLOAT16 ? RA_FLOAT32 : dtype;
  const size_t es = dtype_bytes(dtype), res = dtype_bytes(ref_dtype);
  const double tol = dtype == RA_FLOAT32 ? 1e-4 : dtype == RA_FLOAT16 ? 1e-2 : 3e-2;
  static unsigned seed = 77;
  int64_t bad = 0;
  ra_config dc = case_config(fc, causal, dtype), rc = case_config(fc, causal, ref_dtype);
  ra_plan *dplan = NULL, *rplan = NULL; /* both configurations must be valid */
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
  ra_status st = forward_call(&rc, RA_DEVICE_CPU, tr, lse, NULL, NULL);
  for (int64_t i = 0; i < total && st == RA_OK; i++) { /* o in the device dtype, the reference alike */
    put(host[3], dtype, i, get(ref[3], ref_dtype, i));
    put(ref[3], ref_dtype, i, get(host[3], dtype, i));
  }
  for (int t = 5; t < 8; t++) memset(ref[t], 0xff, res * (size_t)total);
  if (st == RA_OK) st = backward_call(&rc, RA_DEVICE_CPU, tr, lse, NULL, NULL);
  if (st != RA_OK) {
    fprintf(stderr, "  %s: CPU reference failed: %s\n", fc->name, ra_last_error());
    bad++;
  }
  for (int t = 0; t < 5; t++) CHECK(cudaMemcpy(dev[t], host[t], es * (size_t)total, cudaMemcpyHostToDevice) == cudaSuccess);
  for (int t = 5; t < 8; t++) CHECK(cudaMemsetAsync(dev[t], 0xff, es * (size_t)total, user_stream) == cudaSuccess);
  CHECK(cudaMemcpy(d_lse, lse, sizeof(float) * (size_t)rows, cudaMemcpyHostToDevice) == cudaSuccess);
  ra_stats *stats = calloc((size_t)fc->world, sizeof *stats);
  /* kernel: "simt" (exec.kernel RA_KERNEL_SIMT) or "deterministic" (the
   * two-pass tensor-core kernels, exec.deterministic) */
  ra_status gst = backward_call(&dc, RA_DEVICE_CUDA, td, d_lse, kernel, stats);
  if (gst != RA_OK) {
    fprintf(stderr, "  %s: CUDA ra_backward failed: %s\n", fc->name, ra_last_error());
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

/* Clear refusals: host memory, an unsupported head dim, float64, a device
 * that does not exist; and a call on an explicit device leaves the caller's
 * current device as it was. */
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
  ra_plan *plan = NULL; /* the configuration is valid: the refusals are the backend's */
  CHECK(ra_plan_create(&c, &plan) == RA_OK);
  ra_plan_destroy(plan);
  float *host[4];
  ra_tensor t[4];
  for (int i = 0; i < 4; i++) {
    host[i] = calloc(64 * 300, sizeof(float));
    t[i] = (ra_tensor){host[i], 64 * 64, 64, 64};
  }
  CHECK(forward_call(&c, RA_DEVICE_CUDA, t, NULL, NULL, NULL) == RA_ERR_INVALID_ARGUMENT);
  CHECK(strstr(ra_last_error(), "device memory") != NULL);
  c.head_dim = 300;
  CHECK(ra_plan_create(&c, &plan) == RA_OK);
  ra_plan_destroy(plan);
  for (int i = 0; i < 4; i++) t[i] = (ra_tensor){host[i], 64 * 300, 300, 300};
  CHECK(forward_call(&c, RA_DEVICE_CUDA, t, NULL, NULL, NULL) == RA_ERR_UNSUPPORTED);
  CHECK(strstr(ra_last_error(), "head_dim") != NULL);
  for (int i = 0; i < 4; i++) free(host[i]);

  /* float64 is the CPU's alone; device tensors from here on */
  c.head_dim = 64;
  void *dev[4] = {NULL, NULL, NULL, NULL};
  for (int i = 0; i < 4; i++) {
    CHECK(cudaMalloc(&dev[i], 64 * 64 * sizeof(double)) == cudaSuccess);
    CHECK(cudaMemset(dev[i], 0, 64 * 64 * sizeof(double)) == cudaSuccess);
    t[i] = (ra_tensor){dev[i], 64 * 64, 64, 64};
  }
  c.dtype = RA_FLOAT64;
  CHECK(forward_call(&c, RA_DEVICE_CUDA, t, NULL, NULL, NULL) == RA_ERR_UNSUPPORTED);
  CHECK(strstr(ra_last_error(), "float64") != NULL);
  c.dtype = RA_FLOAT32;

  /* exec.device: one that does not exist is refused; an existing one runs
   * (two ranks, no stats) and leaves the caller's device current */
  int before = -1, after = -2;
  CHECK(cudaGetDevice(&before) == cudaSuccess);
  ra_fwd_params p;
  ra_fwd_params_init(&p);
  p.cfg = c;
  p.cfg.world_size = 2;
  p.device_type = RA_DEVICE_CUDA;
  p.q = t[0];
  p.k = t[1];
  p.v = t[2];
  p.o = t[3];
  p.exec.device = ra_cuda_device_count();
  CHECK(ra_forward(&p) != RA_OK);
  CHECK(strstr(ra_last_error(), "device") != NULL);
  p.exec.device = before;
  CHECK(ra_forward(&p) == RA_OK);
  CHECK(cudaGetDevice(&after) == cudaSuccess && after == before);
  for (int i = 0; i < 4; i++) cudaFree(dev[i]);
}

/* The runtime helpers of ringattn.h: allocation, copies both ways, pointer
 * kinds, synchronisation, and their refusals. */
static void test_runtime(void) {
  CHECK(ra_have_cuda() == 1);
  int current = -2, after = -3;
  CHECK(ra_cuda_current_device(&current) == RA_OK && current >= 0);
  const size_t n = 1000;
  float *h = malloc(n * sizeof(float)), *back = malloc(n * sizeof(float));
  for (size_t i = 0; i < n; i++) {
    h[i] = 0.5f * (float)i;
    back[i] = -1.0f;
  }
  void *d = NULL;
  CHECK(ra_cuda_malloc(current, n * sizeof(float), &d) == RA_OK && d != NULL);
  CHECK(ra_cuda_copy_to_device(current, d, h, n * sizeof(float)) == RA_OK);
  CHECK(ra_cuda_synchronize(-1, NULL) == RA_OK);
  CHECK(ra_cuda_copy_to_host(-1, back, d, n * sizeof(float)) == RA_OK);
  CHECK(memcmp(h, back, n * sizeof(float)) == 0);
  ra_memory_kind kind = RA_MEMORY_HOST;
  int where = -2;
  CHECK(ra_cuda_pointer_info(d, &kind, &where) == RA_OK && kind == RA_MEMORY_DEVICE && where == current);
  CHECK(ra_cuda_pointer_info(h, &kind, &where) == RA_OK && kind == RA_MEMORY_UNREGISTERED && where == -1);
  CHECK(ra_cuda_free(current, d) == RA_OK);
  void *pinned = NULL, *managed = NULL;
  if (cudaMallocHost(&pinned, 64) == cudaSuccess) {
    CHECK(ra_cuda_pointer_info(pinned, &kind, &where) == RA_OK && kind == RA_MEMORY_HOST && where == -1);
    cudaFreeHost(pinned);
  }
  if (cudaMallocManaged(&managed, 64, cudaMemAttachGlobal) == cudaSuccess) {
    CHECK(ra_cuda_pointer_info(managed, &kind, &where) == RA_OK && kind == RA_MEMORY_MANAGED);
    cudaFree(managed);
  }
  /* zero bytes still give a freeable address */
  d = NULL;
  CHECK(ra_cuda_malloc(-1, 0, &d) == RA_OK && d != NULL);
  CHECK(ra_cuda_free(-1, d) == RA_OK);
  /* refusals: no such device, more memory than any GPU has (and the next
   * call starts clean) */
  d = h;
  CHECK(ra_cuda_malloc(ra_cuda_device_count(), 16, &d) == RA_ERR_INVALID_ARGUMENT && d == NULL);
  CHECK(ra_cuda_malloc(-1, (size_t)1 << 60, &d) == RA_ERR_OUT_OF_MEMORY && d == NULL);
  CHECK(strstr(ra_last_error(), "CUDA error") != NULL);
  CHECK(ra_cuda_malloc(-1, 16, &d) == RA_OK && d != NULL);
  CHECK(ra_cuda_free(-1, d) == RA_OK);
  CHECK(ra_cuda_current_device(&after) == RA_OK && after == current);
  free(h);
  free(back);
}

int main(void) {
  if (ra_cuda_device_count() == 0) {
    printf("no CUDA device: skipped\n");
    return 77;
  }
  test_runtime();
  test_merge();
  test_forward_errors();
  test_forward();
  test_backward();
  printf("%d failure(s)\n", failures);
  return failures ? 1 : 0;
}
