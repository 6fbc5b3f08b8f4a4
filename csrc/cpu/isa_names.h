/*
 * isa_names.h -- force-included (gcc -include) into the files meson.build
 * compiles once per ISA (kernel.c, backward.c, isa_table.c): every external
 * name they define gets the suffix RA_ISA_SUFFIX (e.g. _avx512), so that the
 * variants link side by side.  isa.c reaches them through the tables of
 * isa_table.c.  A new external function in one of those files belongs here,
 * or the variants collide at link time.
 */
#ifndef RINGATTN_ISA_NAMES_H
#define RINGATTN_ISA_NAMES_H

#ifndef RA_ISA_SUFFIX
#error "RA_ISA_SUFFIX must be defined by the build"
#endif

#define RA_ISA_CAT2(a, b) a##b
#define RA_ISA_CAT(a, b) RA_ISA_CAT2(a, b)
#define RA_ISA_NAME(x) RA_ISA_CAT(x, RA_ISA_SUFFIX)

/* kernel.c */
#define ra_workspace_bytes RA_ISA_NAME(ra_workspace_bytes)
#define ra_workspace_init RA_ISA_NAME(ra_workspace_init)
#define ra_cpu_attend RA_ISA_NAME(ra_cpu_attend)
/* backward.c */
#define ra_bwd_workspace_bytes RA_ISA_NAME(ra_bwd_workspace_bytes)
#define ra_bwd_workspace_init RA_ISA_NAME(ra_bwd_workspace_init)
#define ra_cpu_backward_dkdv RA_ISA_NAME(ra_cpu_backward_dkdv)
#define ra_cpu_backward_dq RA_ISA_NAME(ra_cpu_backward_dq)
#define ra_cpu_backward RA_ISA_NAME(ra_cpu_backward)
/* isa_table.c */
#define ra_cpu_kernels_table RA_ISA_NAME(ra_cpu_kernels_table)

#endif /* RINGATTN_ISA_NAMES_H */
