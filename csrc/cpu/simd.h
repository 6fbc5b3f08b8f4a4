/*
 * simd.h -- the 8-wide float vectors of the CPU kernels (GCC/Clang vector
 * extensions: AVX2 with -march=native, pairs of SSE registers otherwise)
 * and the few operations the kernels need on them.
 */
#ifndef RINGATTN_SIMD_H
#define RINGATTN_SIMD_H

#include <stdint.h>

#define VW 8 /* floats per vector */
#define LOG2E 1.44269504088896340736f
#define LN2 0.693147180559945309417f

typedef float v8sf __attribute__((vector_size(32), aligned(32)));
typedef int32_t v8si __attribute__((vector_size(32), aligned(32)));

static inline v8sf vsplat(float x) { return (v8sf){x, x, x, x, x, x, x, x}; }
static inline v8si vsplati(int32_t x) { return (v8si){x, x, x, x, x, x, x, x}; }

/* mask ? a : b, elementwise (mask lanes are all ones or all zeros) */
static inline v8sf vselect(v8si mask, v8sf a, v8sf b) {
  return (v8sf)(((v8si)a & mask) | ((v8si)b & ~mask));
}

/* 2^f for |f| <= 1/2 by its Taylor polynomial of degree 6 (relative error
 * < 2e-7): the part of every exp2 below that the vector width does not
 * change, so one definition serves each width. */
#define RA_EXP2_FRAC(T, name, splat)          \
  static inline T name(T f) {                 \
    T p = splat(1.5403530393381606e-4f);      \
    p = p * f + 1.3333558146428443e-3f;       \
    p = p * f + 9.6181291076284772e-3f;       \
    p = p * f + 5.5504108664821580e-2f;       \
    p = p * f + 2.4022650695910071e-1f;       \
    p = p * f + 6.9314718055994531e-1f;       \
    return p * f + 1.0f;                      \
  }
RA_EXP2_FRAC(v8sf, v8exp2_frac, vsplat)

/* 2^x elementwise: exactly 0 below 2^-125 (and for -inf), NaN stays NaN,
 * clamped at 2^127.  x = n + f with n an integer and |f| <= 1/2; 2^f by its
 * Taylor polynomial of degree 6 (relative error < 2e-7), 2^n by adding n to
 * the exponent field. */
static inline v8sf vexp2(v8sf x) {
  const v8sf lo = vsplat(-125.0f), hi = vsplat(127.0f), magic = vsplat(12582912.0f); /* 1.5 * 2^23 */
  v8si tiny = x < lo;
  x = vselect(tiny, lo, x);
  x = vselect(x > hi, hi, x);
  v8sf n = (x + magic) - magic; /* round to nearest integer */
  v8sf f = x - n;
  v8sf p = v8exp2_frac(f);
  v8si bits = (v8si)p + (__builtin_convertvector(n, v8si) << 23);
  return vselect(tiny, vsplat(0.0f), (v8sf)bits);
}

/* GCC folds a vector load into the memory operand of every FMA that uses
 * it, which makes the micro-kernels wait on loads; an empty asm that
 * "modifies" the register keeps one load per vector. */
#if defined(__GNUC__) && defined(__AVX__)
#define KEEP_IN_REGISTER(x) __asm__("" : "+x"(x))
#else
#define KEEP_IN_REGISTER(x) ((void)0)
#endif

/* ------------------------------------------------ the widest vector: vf
 * VF floats per vector: 16 where the compiler targets AVX-512, 8 otherwise.
 * Kernels written against vf get the full width of whatever ISA a file is
 * compiled for (v8sf above stays 8 wide everywhere). */
#if defined(__AVX512F__)
#define VF 16
#else
#define VF 8
#endif
typedef float vf __attribute__((vector_size(VF * 4), aligned(VF * 4)));
typedef int32_t vfi __attribute__((vector_size(VF * 4), aligned(VF * 4)));

static inline vf vfsplat(float x) { return x - (vf){0}; }
static inline vfi vfsplati(int32_t x) { return x - (vfi){0}; }
static inline vf vfselect(vfi mask, vf a, vf b) {
  return (vf)(((vfi)a & mask) | ((vfi)b & ~mask));
}

RA_EXP2_FRAC(vf, vfexp2_frac, vfsplat)

/* vexp2 at width VF (same polynomial, same edge cases). */
static inline vf vfexp2(vf x) {
  const vf lo = vfsplat(-125.0f), hi = vfsplat(127.0f), magic = vfsplat(12582912.0f);
  vfi tiny = x < lo;
  x = vfselect(tiny, lo, x);
  x = vfselect(x > hi, hi, x);
  vf n = (x + magic) - magic;
  vf f = x - n;
  vf p = vfexp2_frac(f);
  vfi bits = (vfi)p + (__builtin_convertvector(n, vfi) << 23);
  return vfselect(tiny, vfsplat(0.0f), (vf)bits);
}

/* 2^x for the softmax's arguments (x <= 0 or NaN, e.g. a score minus its
 * running max): exactly 0 below -125 (and for -inf), NaN stays NaN, the
 * same polynomial as vfexp2.  Under AVX-512 2^n is applied by vscalefps and
 * the small arguments are zeroed by a mask: ten instructions instead of
 * vfexp2's sixteen. */
#if defined(__AVX512F__)
#include <immintrin.h>
static inline vf vfexp2_neg(vf x) {
  const __m512 v = (__m512)x;
  const __mmask16 keep = _mm512_cmp_ps_mask(v, _mm512_set1_ps(-125.0f), _CMP_NLT_UQ); /* NaN kept */
  const __m512 n = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const vf f = (vf)_mm512_sub_ps(v, n);
  vf p = vfexp2_frac(f);
  return (vf)_mm512_maskz_scalef_ps(keep, (__m512)p, n);
}
#else
static inline vf vfexp2_neg(vf x) { return vfexp2(x); }
#endif

#endif /* RINGATTN_SIMD_H */
