/*
 * test_isa.c -- the CPU kernels' ISA variants (csrc/cpu/isa.c): every
 * variant this build has and this CPU runs against the naive double
 * reference, AUTO is the widest, and settings that cannot run are clear
 * errors.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "calls.h"
#include "harness.h"
#include "naive.h"

/* max |o - ref| / max |ref| and the largest lse error of one forward */
static void run_case(ra_cpu_isa isa, const ra_config *c, double *err_o, double *err_lse) {
  const int64_t b = c->batch, n = c->seq_len, h = c->num_heads, d = c->head_dim, count = b * n * h * d;
  float *q = malloc(sizeof(float) * (size_t)count * 4), *k = q + count, *v = k + count, *o = v + count;
  float *lse = malloc(sizeof(float) * (size_t)(b * h * n));
  double *ro = malloc(sizeof(double) * (size_t)count), *rl = malloc(sizeof(double) * (size_t)(b * h * n));
  for (int64_t i = 0; i < 3 * count; i++) q[i] = 2.0f * uniform();
  for (int64_t i = 0; i < count; i++) o[i] = NAN; /* poisoned */
  const ra_tensor tq = {q, n * h * d, h * d, d}, tk = {k, n * h * d, h * d, d}, tv = {v, n * h * d, h * d, d},
                  to = {o, n * h * d, h * d, d};
  ra_exec e = cpu_exec(2, 0);
  e.cpu_isa = isa;
  CHECK(call_forward(c, RA_DEVICE_CPU, tq, tk, tv, to, lse, &e, NULL) == RA_OK);
  naive_attention(c, q, k, v, ro, rl);
  double mx = 1e-3, eo = 0, el = 0;
  for (int64_t i = 0; i < count; i++) mx = fmax(mx, fabs(ro[i]));
  for (int64_t i = 0; i < count; i++) eo = fmax(eo, isfinite(o[i]) ? fabs(o[i] - ro[i]) : INFINITY);
  for (int64_t i = 0; i < b * h * n; i++)
    el = fmax(el, isinf(rl[i]) ? (lse[i] == (float)rl[i] ? 0 : INFINITY) : fabs(lse[i] - rl[i]));
  *err_o = eo / mx;
  *err_lse = el;
  free(q);
  free(lse);
  free(ro);
  free(rl);
}

static void test_variants_match_naive(void) {
  const int64_t s1[1] = {300}, r1[1] = {1}, s2[2] = {96, 288}, r2[2] = {3, 2}, s3[1] = {197}, r3[1] = {1};
  const ra_config cases[] = {
      make_config(1, 300, 2, 40, 1, s1, r1, 1, RA_MODE_GROUPS, 1),   /* odd head dim, partial tiles */
      make_config(2, 288, 2, 64, 2, s2, r2, 0, RA_MODE_LONGNET, 1),  /* dilated                     */
      make_config(1, 197, 1, 128, 1, s3, r3, 1, RA_MODE_GROUPS, 1),  /* odd length                  */
      make_config(1, 300, 2, 32, 1, s1, r1, 0, RA_MODE_GROUPS, 2),   /* a ring of two               */
  };
  int ran = 0;
  for (int isa = RA_CPU_ISA_BASELINE; isa <= RA_CPU_ISA_AVX512; isa++) {
    if (!ra_cpu_isa_supported((ra_cpu_isa)isa)) continue;
    ran++;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
      double eo, el;
      run_case((ra_cpu_isa)isa, &cases[i], &eo, &el);
      if (!(eo < 2e-5 && el < 2e-5)) {
        fprintf(stderr, "  %s case %zu: output error %.3g, lse error %.3g\n", ra_cpu_isa_name((ra_cpu_isa)isa), i,
                eo, el);
        CHECK(0);
      }
    }
  }
  CHECK(ran >= 1); /* the baseline at least */
}

static void test_auto_is_the_widest(void) {
  const ra_cpu_isa a = ra_cpu_isa_resolve(RA_CPU_ISA_AUTO);
  CHECK(a >= RA_CPU_ISA_BASELINE && ra_cpu_isa_supported(a));
  for (int isa = a + 1; isa <= RA_CPU_ISA_AVX512; isa++) CHECK(!ra_cpu_isa_supported((ra_cpu_isa)isa));
  CHECK(ra_cpu_isa_compiled(RA_CPU_ISA_BASELINE) && ra_cpu_isa_supported(RA_CPU_ISA_BASELINE));
  CHECK(strcmp(ra_cpu_isa_name(RA_CPU_ISA_AVX2), "avx2") == 0 && ra_cpu_isa_name((ra_cpu_isa)9) == NULL);
}

static ra_status forward_with(ra_cpu_isa isa) {
  static float x[8 * 16], out[8 * 16];
  const int64_t s[1] = {8}, r[1] = {1};
  const ra_config c = make_config(1, 8, 1, 16, 1, s, r, 0, RA_MODE_GROUPS, 1);
  const ra_tensor t = {x, 8 * 16, 16, 16}, o = {out, 8 * 16, 16, 16};
  for (int i = 0; i < 8 * 16; i++) x[i] = uniform();
  ra_exec e = cpu_exec(1, 0);
  e.cpu_isa = isa;
  return call_forward(&c, RA_DEVICE_CPU, t, t, t, o, NULL, &e, NULL);
}

static void test_unusable_settings_are_errors(void) {
  CHECK(forward_with(RA_CPU_ISA_INVALID) == RA_ERR_INVALID_ARGUMENT);
  CHECK(strstr(ra_last_error(), "cpu_isa: unknown instruction set") != NULL);
  CHECK(forward_with((ra_cpu_isa)7) == RA_ERR_INVALID_ARGUMENT);
  for (int isa = RA_CPU_ISA_BASELINE; isa <= RA_CPU_ISA_AVX512; isa++) {
    if (ra_cpu_isa_supported((ra_cpu_isa)isa)) {
      CHECK(forward_with((ra_cpu_isa)isa) == RA_OK);
    } else {
      CHECK(forward_with((ra_cpu_isa)isa) == RA_ERR_UNSUPPORTED);
      CHECK(strstr(ra_last_error(), ra_cpu_isa_name((ra_cpu_isa)isa)) != NULL);
    }
  }
}

int main(void) {
  const test_case tests[] = {
      {"variants_match_naive", test_variants_match_naive},
      {"auto_is_the_widest", test_auto_is_the_widest},
      {"unusable_settings_are_errors", test_unusable_settings_are_errors},
  };
  return run_tests(tests, sizeof tests / sizeof tests[0]);
}
