/*
 * device.cu -- what the CUDA runtime can see.
 */
#include <cuda_runtime.h>

extern "C" {
#include "internal.h"
}

extern "C" int ra_cuda_device_count(void) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError(); /* clear the sticky "no driver" / "no device" error */
    return 0;
  }
  return n;
}
