/*
 * isa.c -- which ISA variant of the CPU kernels a call runs (see isa.h).
 *
 * The build says which variants exist (RA_HAVE_ISA_AVX2 / _AVX512, x86-64
 * only); the CPU says which of them it runs (cpuid, with the OS's support
 * for the wider registers, through __builtin_cpu_supports).
 */
#include <pthread.h>
#include <string.h>

#include "cpu/isa.h"

extern const ra_cpu_kernels ra_cpu_kernels_table_baseline;
#ifdef RA_HAVE_ISA_AVX2
extern const ra_cpu_kernels ra_cpu_kernels_table_avx2;
#endif
#ifdef RA_HAVE_ISA_AVX512
extern const ra_cpu_kernels ra_cpu_kernels_table_avx512;
#endif

static const char *const isa_names[] = {"auto", "baseline", "avx2", "avx512"};

static int known(ra_cpu_isa isa) { return isa >= RA_CPU_ISA_AUTO && isa <= RA_CPU_ISA_AVX512; }

const char *ra_cpu_isa_name(ra_cpu_isa isa) { return known(isa) ? isa_names[isa] : NULL; }

static const ra_cpu_kernels *table(ra_cpu_isa isa) {
  switch (isa) {
    case RA_CPU_ISA_BASELINE: return &ra_cpu_kernels_table_baseline;
#ifdef RA_HAVE_ISA_AVX2
    case RA_CPU_ISA_AVX2: return &ra_cpu_kernels_table_avx2;
#endif
#ifdef RA_HAVE_ISA_AVX512
    case RA_CPU_ISA_AVX512: return &ra_cpu_kernels_table_avx512;
#endif
    default: return NULL;
  }
}

int ra_cpu_isa_compiled(ra_cpu_isa isa) { return isa == RA_CPU_ISA_AUTO || table(isa) != NULL; }

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#define RA_X86_CPUID 1
#include <cpuid.h>

/* F16C by cpuid (clang's __builtin_cpu_supports does not know it) */
static int has_f16c(void) {
  unsigned a, b, c, d;
  return __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C);
}
#endif

/* What the CPU (and the OS, for the register state) runs, asked once: cpuid
 * is slow under a hypervisor (a VM exit each time, tens of microseconds),
 * and a call asks several times. */
static int runs_mask; /* bit i: the CPU runs variant i */
static pthread_once_t runs_once = PTHREAD_ONCE_INIT;

static void probe_cpu(void) {
  int mask = 1 << RA_CPU_ISA_AUTO | 1 << RA_CPU_ISA_BASELINE;
#ifdef RA_X86_CPUID
  __builtin_cpu_init();
  const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && has_f16c();
  const int avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                     __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  if (avx2) mask |= 1 << RA_CPU_ISA_AVX2;
  if (avx512) mask |= 1 << RA_CPU_ISA_AVX512;
#endif
  runs_mask = mask;
}

/* The CPU runs the instructions the variant was compiled with (meson.build:
 * isa_variants). */
static int cpu_runs(ra_cpu_isa isa) {
  pthread_once(&runs_once, probe_cpu);
  return known(isa) && (runs_mask >> isa & 1);
}

int ra_cpu_isa_supported(ra_cpu_isa isa) { return known(isa) && table(isa == RA_CPU_ISA_AUTO ? RA_CPU_ISA_BASELINE : isa) && cpu_runs(isa); }

ra_cpu_isa ra_cpu_isa_resolve(ra_cpu_isa isa) {
  if (isa != RA_CPU_ISA_AUTO) return isa;
  for (int i = RA_CPU_ISA_AVX512; i > RA_CPU_ISA_BASELINE; i--)
    if (ra_cpu_isa_supported((ra_cpu_isa)i)) return (ra_cpu_isa)i;
  return RA_CPU_ISA_BASELINE;
}

/* "baseline, avx2" (the variants for which `pred` holds) into buf. */
static const char *list(char *buf, size_t size, int (*pred)(ra_cpu_isa)) {
  buf[0] = '\0';
  for (int i = RA_CPU_ISA_BASELINE; i <= RA_CPU_ISA_AVX512; i++)
    if (pred((ra_cpu_isa)i)) {
      if (buf[0]) strncat(buf, ", ", size - strlen(buf) - 1);
      strncat(buf, isa_names[i], size - strlen(buf) - 1);
    }
  return buf;
}

ra_status ra_cpu_kernels_for(ra_cpu_isa isa, const ra_cpu_kernels **out) {
  char buf[64];
  if (!known(isa))
    return ra_fail(RA_ERR_INVALID_ARGUMENT,
                   "cpu_isa: unknown instruction set (RINGATTN_CPU_ISA must be auto, baseline, avx2 or avx512)");
  const ra_cpu_isa concrete = ra_cpu_isa_resolve(isa);
  if (!table(concrete))
    return ra_fail(RA_ERR_UNSUPPORTED, "cpu_isa: this build has no %s kernels (it has: %s)", isa_names[concrete],
                   list(buf, sizeof buf, ra_cpu_isa_compiled));
  if (!cpu_runs(concrete))
    return ra_fail(RA_ERR_UNSUPPORTED, "cpu_isa: this CPU cannot run the %s kernels (it runs: %s)",
                   isa_names[concrete], list(buf, sizeof buf, ra_cpu_isa_supported));
  *out = table(concrete);
  return RA_OK;
}

/* ------------------------------------------------- the plain names
 * ra_workspace_bytes, ra_cpu_attend, ... of cpu.h and backward.h, for
 * callers without a call's settings (the C tests): the kernels of the
 * default settings, the baseline if those are unusable. */

static const ra_cpu_kernels *default_kernels(void) {
  const ra_cpu_kernels *k;
  if (ra_cpu_kernels_for(ra_exec_default().cpu_isa, &k) != RA_OK) k = &ra_cpu_kernels_table_baseline;
  return k;
}

size_t ra_workspace_bytes(int64_t head_dim) { return default_kernels()->workspace_bytes(head_dim); }

ra_workspace *ra_workspace_init(void *mem, int64_t head_dim) {
  return default_kernels()->workspace_init(mem, head_dim);
}

void ra_cpu_attend(ra_workspace *ws, ra_dtype dtype, int64_t head_dim, float scale, int causal, int64_t rate,
                   ra_tokens q, ra_tokens k, const void *v, int64_t v_stride, float *acc, int64_t acc_stride,
                   float *lse, int64_t lse_stride) {
  default_kernels()->attend(ws, dtype, head_dim, scale, causal, rate, q, k, v, v_stride, acc, acc_stride, lse,
                            lse_stride);
}

size_t ra_bwd_workspace_bytes(int64_t head_dim) { return default_kernels()->bwd_workspace_bytes(head_dim); }

ra_bwd_workspace *ra_bwd_workspace_init(void *mem, int64_t head_dim) {
  return default_kernels()->bwd_workspace_init(mem, head_dim);
}

void ra_cpu_backward_dkdv(ra_bwd_workspace *ws, ra_dtype dtype, int64_t head_dim, float scale, int causal,
                          int64_t rate, ra_tokens q, const void *dout, int64_t dout_stride, const float *lse,
                          int64_t lse_stride, const float *delta, int64_t delta_stride, ra_tokens k,
                          const void *v, int64_t v_stride, float *dk, float *dv, int64_t dkv_stride) {
  default_kernels()->backward_dkdv(ws, dtype, head_dim, scale, causal, rate, q, dout, dout_stride, lse, lse_stride,
                                   delta, delta_stride, k, v, v_stride, dk, dv, dkv_stride);
}

void ra_cpu_backward_dq(ra_bwd_workspace *ws, ra_dtype dtype, int64_t head_dim, float scale, int causal,
                        int64_t rate, ra_tokens q, const void *dout, int64_t dout_stride, const float *lse,
                        int64_t lse_stride, const float *delta, int64_t delta_stride, ra_tokens k,
                        const void *v, int64_t v_stride, float *dq, int64_t dq_stride) {
  default_kernels()->backward_dq(ws, dtype, head_dim, scale, causal, rate, q, dout, dout_stride, lse, lse_stride,
                                 delta, delta_stride, k, v, v_stride, dq, dq_stride);
}

void ra_cpu_backward(ra_bwd_workspace *ws, ra_dtype dtype, int64_t head_dim, float scale, int causal, int64_t rate,
                     ra_tokens q, const void *dout, int64_t dout_stride, const float *lse, int64_t lse_stride,
                     const float *delta, int64_t delta_stride, ra_tokens k, const void *v, int64_t v_stride,
                     float *dq, int64_t dq_stride, float *dk, float *dv, int64_t dkv_stride) {
  default_kernels()->backward(ws, dtype, head_dim, scale, causal, rate, q, dout, dout_stride, lse, lse_stride, delta,
                              delta_stride, k, v, v_stride, dq, dq_stride, dk, dv, dkv_stride);
}
