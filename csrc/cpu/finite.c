/*
 * finite.c -- input scans and output stores shared by the CPU paths.
 */
#include <string.h>

#include "cpu/half.h"
#include "cpu/cpu.h"

/* Non-finite numbers are exactly those whose exponent bits are all ones.
 * The loops count rather than branch, so that the compiler vectorises them. */
static int span_finite(const void *row, ra_dtype dtype, int64_t d) {
  unsigned bad = 0;
  if (dtype == RA_FLOAT64) {
    const uint64_t expmask = 0x7ff0000000000000ull, *x = (const uint64_t *)row;
    for (int64_t c = 0; c < d; c++) bad |= (x[c] & expmask) == expmask;
  } else if (dtype == RA_FLOAT32) {
    const uint32_t *x = (const uint32_t *)row;
    for (int64_t c = 0; c < d; c++) bad |= (x[c] & 0x7f800000u) == 0x7f800000u;
  } else {
    const uint16_t *x = (const uint16_t *)row;
    const uint16_t expmask = dtype == RA_FLOAT16 ? 0x7c00u : 0x7f80u; /* float16; bfloat16 */
    for (int64_t c = 0; c < d; c++) bad |= (x[c] & expmask) == expmask;
  }
  return !bad;
}

/* Elements below which one thread scans faster than a team would. */
#define RA_SCAN_PER_THREAD (1 << 18)

int ra_tensor_finite(ra_tensor t, ra_dtype dtype, int64_t b, int64_t n,
                     int64_t h, int64_t d, int num_threads) {
  const size_t es = ra_dtype_size(dtype);
  const int64_t elems = b * n * h * d; /* the plan made sure it fits */
  const int threads = elems / RA_SCAN_PER_THREAD < num_threads ? (int)(elems / RA_SCAN_PER_THREAD) + 1 : num_threads;
  int ok = 1;
  (void)threads;
  if (t.stride_h == d && t.stride_n == h * d && (b == 1 || t.stride_b == n * h * d)) {
    /* contiguous: one run, in chunks */
    const int64_t chunk = 1 << 14, chunks = (elems + chunk - 1) / chunk;
#pragma omp parallel for num_threads(threads) reduction(&& : ok) schedule(static)
    for (int64_t i = 0; i < chunks; i++) {
      const int64_t len = elems - i * chunk < chunk ? elems - i * chunk : chunk;
      ok = ok && span_finite((const char *)t.data + (size_t)(i * chunk) * es, dtype, len);
    }
    return ok;
  }
#pragma omp parallel for collapse(2) num_threads(threads) reduction(&& : ok) schedule(static)
  for (int64_t i = 0; i < b; i++)
    for (int64_t p = 0; p < n; p++)
      for (int64_t j = 0; j < h; j++) {
        const char *row = (const char *)t.data + (size_t)(i * t.stride_b + p * t.stride_n + j * t.stride_h) * es;
        ok = ok && span_finite(row, dtype, d);
      }
  return ok;
}

void ra_store_row(void *dst, ra_dtype dtype, const float *src, int64_t d) {
  if (dtype == RA_FLOAT32) {
    memcpy(dst, src, sizeof(float) * (size_t)d);
    return;
  }
  uint16_t *o = (uint16_t *)dst;
  if (dtype == RA_BFLOAT16)
    for (int64_t c = 0; c < d; c++) o[c] = ra_float_to_bf16(src[c]); /* integer ops: vectorised by the compiler */
  else
    for (int64_t c = 0; c < d; c++) o[c] = ra_float_to_half(src[c]);
}
