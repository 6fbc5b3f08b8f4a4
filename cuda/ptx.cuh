/*
 * ptx.cuh -- the few PTX instructions of the tensor-core attention kernel
 * (sm_80 and later): asynchronous global->shared copies, ldmatrix and the
 * m16n8k16 mma with fp32 accumulators.
 *
 * Fragment layouts of mma.m16n8k16 (PTX ISA, "Matrix Fragments for
 * mma.m16n8k16").  In a warp, lane = 4 * g + t (g = lane / 4 is the "group",
 * t = lane % 4 the thread in the group).  Each 32-bit register holds two
 * 16-bit elements, the lower column (or k) index in the lower half:
 *
 *   A (16 x 16, row major)  a0: (g,   2t..2t+1)    a1: (g+8, 2t..2t+1)
 *                           a2: (g,   2t+8..2t+9)  a3: (g+8, 2t+8..2t+9)
 *   B (16 x 8, "col")       b0: (k = 2t..2t+1, n = g)
 *                           b1: (k = 2t+8..2t+9, n = g)
 *   C, D (16 x 8, fp32)     c0, c1: (g, 2t..2t+1)  c2, c3: (g+8, 2t..2t+1)
 *
 * ldmatrix.x4 loads four 8x8 matrices of 16-bit elements; lanes 8i..8i+7
 * give the addresses of the eight rows of matrix i, and register i of every
 * lane receives matrix i's elements (row g, columns 2t, 2t+1) -- exactly the
 * A / B register layout above.  With .trans a lane receives (rows 2t, 2t+1,
 * column g) instead, the layout of B when the matrix is stored k-major.
 */
#ifndef RINGATTN_CUDA_PTX_CUH
#define RINGATTN_CUDA_PTX_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

/* Shared-memory address of a generic pointer to shared memory. */
__device__ __forceinline__ uint32_t smem_addr(const void *p) {
  return (uint32_t)__cvta_generic_to_shared(p);
}

/* Copy 16 bytes global -> shared without blocking; when src_bytes is 0 the
 * 16 bytes are zero-filled and nothing is read from src. */
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void *src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit(void) {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

/* Wait until at most N committed groups of this thread are still in flight. */
template <int N>
__device__ __forceinline__ void cp_async_wait(void) {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

/* c += a * b on one 16x8x16 tile; T (__half or __nv_bfloat16) picks the
 * input type. */
template <typename T>
__device__ __forceinline__ void mma_16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float c[4], const uint32_t a[4], uint32_t b0,
                                                  uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float c[4], const uint32_t a[4],
                                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* Two fp32 values as one register of two 16-bit elements, lo in the lower half. */
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi); /* .x = lo is the lower half */
  return *reinterpret_cast<uint32_t *>(&h);
}

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t *>(&h);
}

#endif /* RINGATTN_CUDA_PTX_CUH */
