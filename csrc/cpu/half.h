/*
 * half.h -- binary16 and bfloat16 <-> binary32 conversion for the CPU
 * kernels.
 *
 * Portable bit-exact scalar versions (round to nearest even), with the F16C
 * instructions (float16) and AVX2 / AVX-512 shifts (bfloat16) used for
 * whole rows when the compiler targets them.
 */
#ifndef RINGATTN_HALF_H
#define RINGATTN_HALF_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "ringattn.h"

#if defined(__F16C__) || defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

static inline float ra_half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
  if (exp == 0) {
    float f = (float)man * 0x1p-24f; /* zero or subnormal */
    return sign ? -f : f;
  }
  if (exp == 31) bits = sign | 0x7f800000u | (man << 13);
  else bits = sign | ((exp + 112u) << 23) | (man << 13);
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

static inline uint16_t ra_float_to_half(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
  uint32_t a = x & 0x7fffffffu;
  if (a >= 0x7f800000u) return sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0u);
  if (a >= 0x477ff000u) return sign | 0x7c00u;          /* rounds to infinity */
  if (a < 0x38800000u) {                                /* half subnormal      */
    float af;
    memcpy(&af, &a, 4);
    return sign | (uint16_t)lrintf(af * 0x1p24f);
  }
  uint32_t h = (a >> 13) - (112u << 10), rem = a & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++;
  return sign | (uint16_t)h;
}

/* bfloat16 is the top half of a float32: widening is exact. */
static inline float ra_bf16_to_float(uint16_t h) {
  const uint32_t bits = (uint32_t)h << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

/* Round to nearest even; a NaN stays a NaN (quiet, its sign and top
 * payload bits kept) instead of rounding into an infinity. */
static inline uint16_t ra_float_to_bf16(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x0040u);
  return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

/* dst[i] = float(src[i]) * mul for a row of n values of `dtype` (fp32,
 * fp16 or bf16); fp16 with F16C, bf16 with AVX2 / AVX-512 shifts where the
 * compiler targets them. */
static inline void ra_load_row(float *dst, const void *src, ra_dtype dtype,
                               int64_t n, float mul) {
  if (dtype == RA_FLOAT32) {
    const float *s = (const float *)src;
    for (int64_t i = 0; i < n; i++) dst[i] = s[i] * mul;
    return;
  }
  const uint16_t *s = (const uint16_t *)src;
  int64_t i = 0;
  if (dtype == RA_BFLOAT16) {
#if defined(__AVX512F__)
    const __m512 m16 = _mm512_set1_ps(mul);
    for (; i + 16 <= n; i += 16) {
      const __m512i w = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(s + i))), 16);
      _mm512_storeu_ps(dst + i, _mm512_mul_ps(_mm512_castsi512_ps(w), m16));
    }
#endif
#if defined(__AVX2__)
    const __m256 m8 = _mm256_set1_ps(mul);
    for (; i + 8 <= n; i += 8) {
      const __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(s + i))), 16);
      _mm256_storeu_ps(dst + i, _mm256_mul_ps(_mm256_castsi256_ps(w), m8));
    }
#endif
    for (; i < n; i++) dst[i] = ra_bf16_to_float(s[i]) * mul;
    return;
  }
#if defined(__F16C__)
  __m256 m = _mm256_set1_ps(mul);
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i))), m));
#endif
  for (; i < n; i++) dst[i] = ra_half_to_float(s[i]) * mul;
}

#endif /* RINGATTN_HALF_H */
