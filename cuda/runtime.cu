/*
 * runtime.cu -- the CUDA runtime as the rest of ringattn sees it: what the
 * runtime can see (devices), how a failed CUDA call becomes an ra_status,
 * and the few runtime calls the Python extension needs (ringattn.h), so
 * that nothing but the core links CUDA.
 *
 * Every helper that takes a device makes it current for the call and puts
 * the caller's current device back afterwards (device -1: the current one).
 */
#include <cuda_runtime.h>
#include <stdio.h>
#include <string.h>

#include "cuda_backend.h"

ra_status ra_cuda_fail(cudaError_t err, const char *what) {
  ra_status st = RA_ERR_INTERNAL;
  if (err == cudaErrorMemoryAllocation) st = RA_ERR_OUT_OF_MEMORY;
  else if (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver ||
           err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDevice)
    st = RA_ERR_UNSUPPORTED;
  cudaGetLastError(); /* clear a non-sticky error so the next call starts clean */
  return ra_fail(st, "%s: CUDA error %d (%s: %s)", what, (int)err, cudaGetErrorName(err), cudaGetErrorString(err));
}

/* ----------------------------------------------------------------- devices */

extern "C" int ra_have_cuda(void) { return 1; }

extern "C" int ra_cuda_device_count(void) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError(); /* clear the sticky "no driver" / "no device" error */
    return 0;
  }
  return n;
}

ra_status ra_cuda_check_device(int device, const char *what) {
  if (device < -1) return ra_fail(RA_ERR_INVALID_ARGUMENT, "%s: CUDA device %d (an ordinal, or -1 for the current one)", what, device);
  const int count = ra_cuda_device_count();
  if (count == 0) return ra_fail(RA_ERR_UNSUPPORTED, "%s: no CUDA device", what);
  if (device >= count)
    return ra_fail(RA_ERR_INVALID_ARGUMENT, "%s: CUDA device %d does not exist (%d device%s: 0 to %d)", what, device,
                   count, count == 1 ? "" : "s", count - 1);
  return RA_OK;
}

extern "C" ra_status ra_cuda_current_device(int *device) {
  if (!device) return ra_fail(RA_ERR_INVALID_ARGUMENT, "ra_cuda_current_device: device is NULL");
  *device = -1;
  RA_CUDA_TRY(cudaGetDevice(device), "ra_cuda_current_device");
  return RA_OK;
}

/* ------------------------------------------------------------ device guard */

/* `device` current from enter to exit (device -1: leave the current one). */
typedef struct device_guard {
  int prev;
  int changed;
} device_guard;

static ra_status guard_enter(device_guard *g, int device, const char *what) {
  g->prev = -1;
  g->changed = 0;
  if (device < 0) return RA_OK;
  RA_TRY(ra_cuda_check_device(device, what));
  RA_CUDA_TRY(cudaGetDevice(&g->prev), what);
  if (g->prev == device) return RA_OK;
  RA_CUDA_TRY(cudaSetDevice(device), what);
  g->changed = 1;
  return RA_OK;
}

static void guard_exit(const device_guard *g) {
  if (g->changed) cudaSetDevice(g->prev);
}

/* Leave the guard, then report err (if any) as ra_cuda_fail does. */
static ra_status guard_done(const device_guard *g, cudaError_t err, const char *what) {
  guard_exit(g);
  return err == cudaSuccess ? RA_OK : ra_cuda_fail(err, what);
}

/* ------------------------------------------------------------------ memory */

extern "C" ra_status ra_cuda_malloc(int device, size_t bytes, void **ptr) {
  if (!ptr) return ra_fail(RA_ERR_INVALID_ARGUMENT, "ra_cuda_malloc: ptr is NULL");
  *ptr = NULL;
  char what[96];
  snprintf(what, sizeof what, "ra_cuda_malloc: %zu bytes on device %d", bytes, device);
  device_guard g;
  RA_TRY(guard_enter(&g, device, what));
  /* a zero-byte request still gets a distinct, freeable address */
  return guard_done(&g, cudaMalloc(ptr, bytes ? bytes : 1), what);
}

extern "C" ra_status ra_cuda_free(int device, void *ptr) {
  if (!ptr) return RA_OK;
  device_guard g;
  RA_TRY(guard_enter(&g, device, "ra_cuda_free"));
  return guard_done(&g, cudaFree(ptr), "ra_cuda_free");
}

extern "C" ra_status ra_cuda_copy_to_device(int device, void *dst, const void *src, size_t bytes) {
  if (bytes && (!dst || !src)) return ra_fail(RA_ERR_INVALID_ARGUMENT, "ra_cuda_copy_to_device: NULL pointer");
  device_guard g;
  RA_TRY(guard_enter(&g, device, "ra_cuda_copy_to_device"));
  return guard_done(&g, cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice), "ra_cuda_copy_to_device");
}

extern "C" ra_status ra_cuda_copy_to_host(int device, void *dst, const void *src, size_t bytes) {
  if (bytes && (!dst || !src)) return ra_fail(RA_ERR_INVALID_ARGUMENT, "ra_cuda_copy_to_host: NULL pointer");
  device_guard g;
  RA_TRY(guard_enter(&g, device, "ra_cuda_copy_to_host"));
  return guard_done(&g, cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost), "ra_cuda_copy_to_host");
}

extern "C" ra_status ra_cuda_synchronize(int device, void *stream) {
  device_guard g;
  RA_TRY(guard_enter(&g, device, "ra_cuda_synchronize"));
  return guard_done(&g, cudaStreamSynchronize((cudaStream_t)stream), "ra_cuda_synchronize");
}

extern "C" ra_status ra_cuda_pointer_info(const void *ptr, ra_memory_kind *kind, int *device) {
  if (!kind) return ra_fail(RA_ERR_INVALID_ARGUMENT, "ra_cuda_pointer_info: kind is NULL");
  *kind = RA_MEMORY_UNREGISTERED;
  if (device) *device = -1;
  cudaPointerAttributes at;
  memset(&at, 0, sizeof at);
  const cudaError_t err = cudaPointerGetAttributes(&at, ptr);
  if (err == cudaErrorInvalidValue) { /* an address CUDA does not know */
    cudaGetLastError();
    return RA_OK;
  }
  if (err != cudaSuccess) return ra_cuda_fail(err, "ra_cuda_pointer_info");
  switch (at.type) {
    case cudaMemoryTypeDevice:
      *kind = RA_MEMORY_DEVICE;
      if (device) *device = at.device;
      break;
    case cudaMemoryTypeManaged:
      *kind = RA_MEMORY_MANAGED;
      if (device) *device = at.device;
      break;
    case cudaMemoryTypeHost:
      *kind = RA_MEMORY_HOST;
      break;
    default:
      break; /* cudaMemoryTypeUnregistered: ordinary host memory */
  }
  return RA_OK;
}
