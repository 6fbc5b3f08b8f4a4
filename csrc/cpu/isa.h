/*
 * isa.h -- runtime choice of the CPU kernels' instruction set (isa.c).
 *
 * meson.build compiles the hot CPU files (kernel.c, backward.c) once per
 * ISA -- baseline, AVX2+FMA, AVX-512 on x86-64; baseline only elsewhere --
 * with suffixed names (isa_names.h); each variant exports one table of its
 * functions (isa_table.c).  A call picks a table from ra_exec.cpu_isa and
 * uses that one table for its workspaces and kernels.
 */
#ifndef RINGATTN_CPU_ISA_H
#define RINGATTN_CPU_ISA_H

#include "cpu/backward.h"
#include "cpu/cpu.h"

typedef struct ra_cpu_kernels {
  size_t (*workspace_bytes)(int64_t head_dim);
  ra_workspace *(*workspace_init)(void *mem, int64_t head_dim);
  void (*attend)(ra_workspace *ws, ra_dtype dtype, int64_t head_dim, float scale, int causal, int64_t rate,
                 ra_tokens q, ra_tokens k, const void *v, int64_t v_stride, float *acc, int64_t acc_stride,
                 float *lse, int64_t lse_stride);
  size_t (*bwd_workspace_bytes)(int64_t head_dim);
  ra_bwd_workspace *(*bwd_workspace_init)(void *mem, int64_t head_dim);
  void (*backward_dkdv)(ra_bwd_workspace *ws, ra_dtype dtype, int64_t head_dim, float scale, int causal,
                        int64_t rate, ra_tokens q, const void *dout, int64_t dout_stride, const float *lse,
                        int64_t lse_stride, const float *delta, int64_t delta_stride, ra_tokens k,
                        const void *v, int64_t v_stride, float *dk, float *dv, int64_t dkv_stride);
  void (*backward_dq)(ra_bwd_workspace *ws, ra_dtype dtype, int64_t head_dim, float scale, int causal,
                      int64_t rate, ra_tokens q, const void *dout, int64_t dout_stride, const float *lse,
                      int64_t lse_stride, const float *delta, int64_t delta_stride, ra_tokens k,
                      const void *v, int64_t v_stride, float *dq, int64_t dq_stride);
  /* dQ, dK and dV in one pass (backward.h) */
  void (*backward)(ra_bwd_workspace *ws, ra_dtype dtype, int64_t head_dim, float scale, int causal, int64_t rate,
                   ra_tokens q, const void *dout, int64_t dout_stride, const float *lse, int64_t lse_stride,
                   const float *delta, int64_t delta_stride, ra_tokens k, const void *v, int64_t v_stride,
                   float *dq, int64_t dq_stride, float *dk, float *dv, int64_t dkv_stride);
} ra_cpu_kernels;

/* The kernels of `isa` (RA_CPU_ISA_AUTO: the widest this CPU runs), or a
 * failure naming the setting: an unknown value (RA_ERR_INVALID_ARGUMENT),
 * an ISA this build lacks or this CPU cannot run (RA_ERR_UNSUPPORTED). */
ra_status ra_cpu_kernels_for(ra_cpu_isa isa, const ra_cpu_kernels **out);

#endif /* RINGATTN_CPU_ISA_H */
