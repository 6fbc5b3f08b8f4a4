/*
 * absent.c -- the CUDA side of a build made without CUDA: no device is
 * usable, the backend interface refuses every call (in supports(), so the
 * entry point reports it before anything runs), and every runtime helper
 * returns the same clear status.
 */
#include <stddef.h>

#include "ring/backend.h"

static ra_status no_cuda(void) {
  return ra_fail(RA_ERR_UNSUPPORTED, "ringattn was built without CUDA (rebuild with -Dcuda=enabled)");
}

int ra_have_cuda(void) { return 0; }

int ra_cuda_device_count(void) { return 0; }

ra_status ra_cuda_merge_rows(float *acc, int64_t acc_stride, float *lse_acc,
                             int64_t lse_acc_stride, const float *part,
                             int64_t part_stride, const float *lse_part,
                             int64_t rows, int64_t dim, void *stream) {
  (void)acc; (void)acc_stride; (void)lse_acc; (void)lse_acc_stride; (void)part;
  (void)part_stride; (void)lse_part; (void)rows; (void)dim; (void)stream;
  return no_cuda();
}

/* ----------------------------------------------------------------- runtime */

ra_status ra_cuda_current_device(int *device) {
  if (device) *device = -1;
  return no_cuda();
}

ra_status ra_cuda_malloc(int device, size_t bytes, void **ptr) {
  (void)device; (void)bytes;
  if (ptr) *ptr = NULL;
  return no_cuda();
}

ra_status ra_cuda_free(int device, void *ptr) {
  (void)device; (void)ptr;
  return no_cuda();
}

ra_status ra_cuda_copy_to_device(int device, void *dst, const void *src, size_t bytes) {
  (void)device; (void)dst; (void)src; (void)bytes;
  return no_cuda();
}

ra_status ra_cuda_copy_to_host(int device, void *dst, const void *src, size_t bytes) {
  (void)device; (void)dst; (void)src; (void)bytes;
  return no_cuda();
}

ra_status ra_cuda_synchronize(int device, void *stream) {
  (void)device; (void)stream;
  return no_cuda();
}

ra_status ra_cuda_pointer_info(const void *ptr, ra_memory_kind *kind, int *device) {
  (void)ptr;
  if (kind) *kind = RA_MEMORY_UNREGISTERED;
  if (device) *device = -1;
  return no_cuda();
}

/* --------------------------------------------------------------- backend */

static ra_status absent_supports(const ra_call *call) {
  (void)call;
  return no_cuda();
}

static ra_status absent_check_inputs(const ra_call *call) {
  (void)call;
  return no_cuda();
}

static ra_status absent_call_open(const ra_call *call, void **shared) {
  (void)call;
  if (shared) *shared = NULL;
  return no_cuda();
}

static void absent_call_close(void *shared) { (void)shared; }

static ra_status absent_rank_open(void *shared, const ra_call *rank_call, ra_backend *out) {
  (void)shared; (void)rank_call;
  if (out) {
    out->ops = NULL;
    out->ctx = NULL;
  }
  return no_cuda();
}

static void absent_rank_close(ra_backend *be) { (void)be; }

static ra_status absent_copy(void *ctx, int rank, void *dst, const void *src, size_t bytes) {
  (void)ctx; (void)rank; (void)dst; (void)src; (void)bytes;
  return no_cuda();
}

/* Every entry refuses, should a caller skip supports(). */
static const ra_backend_iface absent_iface = {
    .name = "cuda",
    .supports = absent_supports,
    .check_inputs = absent_check_inputs,
    .call_open = absent_call_open,
    .call_close = absent_call_close,
    .rank_open = absent_rank_open,
    .rank_close = absent_rank_close,
    .copy = absent_copy,
};

const ra_backend_iface *ra_cuda_backend_iface(void) { return &absent_iface; }
