/*
 * isa_table.c -- the table of one ISA variant of the CPU kernels (compiled
 * once per ISA with isa_names.h force-included, so the names below are the
 * variant's suffixed functions).
 */
#include "cpu/backward.h"
#include "cpu/cpu.h"
#include "cpu/isa.h"

const ra_cpu_kernels ra_cpu_kernels_table = {
    ra_workspace_bytes,     ra_workspace_init,    ra_cpu_attend,      ra_bwd_workspace_bytes,
    ra_bwd_workspace_init,  ra_cpu_backward_dkdv, ra_cpu_backward_dq, ra_cpu_backward,
};
