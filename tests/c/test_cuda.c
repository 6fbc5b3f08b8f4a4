/*
 * test_cuda.c -- GPU kernels against their CPU references.  Exits 77 (the
 * "skipped" code of meson test) when no CUDA device is present.
 */
#include <cuda_runtime_api.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

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

int main(void) {
  if (ra_cuda_device_count() == 0) {
    printf("no CUDA device: skipped\n");
    return 77;
  }
  test_merge();
  printf("%d passed, %d failed\n", failures ? 0 : 1, failures ? 1 : 0);
  return failures ? 1 : 0;
}
