/*
 * merge.cu -- the ring's log-sum-exp merge on the GPU.
 *
 * Same contract as ra_merge_rows in csrc/cpu/merge.c (its CPU reference): one
 * block per row; every thread reads the two lse values, then updates its
 * share of the row, and thread 0 writes the new lse once all have read it.
 */
#include <cuda_runtime.h>
#include <math.h>

extern "C" {
#include "internal.h"
}

__global__ void merge_rows_kernel(float *acc, int64_t acc_stride, float *lse_acc,
                                  int64_t lse_acc_stride, const float *part,
                                  int64_t part_stride, const float *lse_part,
                                  int64_t dim) {
  const int64_t t = blockIdx.x;
  float *a = acc + t * acc_stride;
  const float *p = part + t * part_stride;
  const float la = lse_acc[t * lse_acc_stride], lp = lse_part[t];
  __syncthreads(); /* every thread has read la before thread 0 overwrites it */
  if (lp == -INFINITY) return; /* the part saw no keys */
  float ia = 0.0f, ip = 1.0f, lse_new = lp;
  if (la != -INFINITY) {
    const float mx = fmaxf(la, lp);
    const float wa = expf(la - mx), wp = expf(lp - mx), sum = wa + wp;
    ia = wa / sum;
    ip = wp / sum;
    lse_new = mx + logf(sum);
  }
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x)
    a[c] = la == -INFINITY ? p[c] : ia * a[c] + ip * p[c];
  if (threadIdx.x == 0) lse_acc[t * lse_acc_stride] = lse_new;
}

extern "C" ra_status ra_cuda_merge_rows(float *acc, int64_t acc_stride, float *lse_acc,
                                        int64_t lse_acc_stride, const float *part,
                                        int64_t part_stride, const float *lse_part,
                                        int64_t rows, int64_t dim, void *stream) {
  if (rows < 0 || dim < 0) return ra_fail(RA_ERR_INVALID_ARGUMENT, "rows and dim must be >= 0");
  if (rows == 0 || dim == 0) return RA_OK;
  if (rows > 2147483647LL) return ra_fail(RA_ERR_INVALID_ARGUMENT, "rows: at most 2^31-1 rows per call");
  const int threads = dim >= 128 ? 128 : 32;
  merge_rows_kernel<<<(unsigned)rows, threads, 0, (cudaStream_t)stream>>>(
      acc, acc_stride, lse_acc, lse_acc_stride, part, part_stride, lse_part, dim);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    return ra_fail(RA_ERR_UNSUPPORTED, "merge kernel launch failed: %s", cudaGetErrorString(err));
  return RA_OK;
}
