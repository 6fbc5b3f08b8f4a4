/*
 * finite.c -- input scans and output stores shared by the CPU paths.
 */
#include <string.h>

#include "cpu/half.h"
#include "cpu/cpu.h"

/* Non-finite numbers are exactly those whose exponent bits are all ones. */
static int row_finite(const void *row, ra_dtype dtype, int64_t d) {
  unsigned bad = 0;
  if (dtype == RA_FLOAT64) {
    const uint64_t expmask = 0x7ff0000000000000ull, *x = (const uint64_t *)row;
    for (int64_t c = 0; c < d; c++) bad |= (x[c] & expmask) == expmask;
  } else if (dtype == RA_FLOAT32) {
    const uint32_t *x = (const uint32_t *)row;
    for (int64_t c = 0; c < d; c++) bad |= (x[c] & 0x7f800000u) == 0x7f800000u;
  } else {
    const uint16_t *x = (const uint16_t *)row;
    uint16_t expmask = dtype == RA_FLOAT16 ? 0x7c00u : 0x7f80u;
    for (int64_t c = 0; c < d; c++) bad |= (x[c] & expmask) == expmask;
  }
  return !bad;
}

int ra_tensor_finite(ra_tensor t, ra_dtype dtype, int64_t b, int64_t n,
                     int64_t h, int64_t d, int num_threads) {
  const size_t es = ra_dtype_size(dtype);
  int ok = 1;
  (void)num_threads;
#pragma omp parallel for collapse(2) num_threads(num_threads) reduction(&& : ok) schedule(static)
  for (int64_t i = 0; i < b; i++)
    for (int64_t p = 0; p < n; p++)
      for (int64_t j = 0; j < h; j++) {
        const char *row = (const char *)t.data + (size_t)(i * t.stride_b + p * t.stride_n + j * t.stride_h) * es;
        ok = ok && row_finite(row, dtype, d);
      }
  return ok;
}

void ra_store_row(void *dst, ra_dtype dtype, const float *src, int64_t d) {
  if (dtype == RA_FLOAT32) {
    memcpy(dst, src, sizeof(float) * (size_t)d);
    return;
  }
  uint16_t *o = (uint16_t *)dst;
  for (int64_t c = 0; c < d; c++) o[c] = ra_float_to_half(src[c]);
}
