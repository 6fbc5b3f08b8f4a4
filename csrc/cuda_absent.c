/*
 * cuda_absent.c -- the CUDA entry points of a build made without CUDA:
 * they report that no device is usable and refuse work with a clear status.
 */
#include "internal.h"

static ra_status no_cuda(void) {
  return ra_fail(RA_ERR_UNSUPPORTED, "ringattn was built without CUDA (rebuild with -Dcuda=enabled)");
}

int ra_cuda_device_count(void) { return 0; }

ra_status ra_cuda_merge_rows(float *acc, int64_t acc_stride, float *lse_acc,
                             int64_t lse_acc_stride, const float *part,
                             int64_t part_stride, const float *lse_part,
                             int64_t rows, int64_t dim, void *stream) {
  (void)acc; (void)acc_stride; (void)lse_acc; (void)lse_acc_stride; (void)part;
  (void)part_stride; (void)lse_part; (void)rows; (void)dim; (void)stream;
  return no_cuda();
}

ra_status ra_cuda_forward(const ra_plan *plan, ra_tensor q, ra_tensor k, ra_tensor v,
                          ra_tensor o, float *lse, void *stream, ra_stats *stats) {
  (void)plan; (void)q; (void)k; (void)v; (void)o; (void)lse; (void)stream; (void)stats;
  return no_cuda();
}

ra_status ra_cuda_backward(const ra_plan *plan, ra_tensor q, ra_tensor k, ra_tensor v,
                           ra_tensor o, ra_tensor dout, const float *lse, ra_tensor dq,
                           ra_tensor dk, ra_tensor dv, void *stream, ra_stats *stats) {
  (void)plan; (void)q; (void)k; (void)v; (void)o; (void)dout; (void)lse; (void)dq; (void)dk; (void)dv;
  (void)stream; (void)stats;
  return no_cuda();
}
