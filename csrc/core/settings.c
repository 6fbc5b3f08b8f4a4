/*
 * settings.c -- the only place the environment is read.
 *
 * Execution settings are fields of a call (ra_exec); the environment only
 * supplies their defaults, read once per process:
 *   RINGATTN_NUM_THREADS    CPU threads of a call (a positive number; at most
 *                           4 x the online cores are used)
 *   RINGATTN_CUDA_KERNEL    "simt": the generic CUDA kernels only
 *   RINGATTN_DETERMINISTIC  any value but "" and "0": bitwise reproducible
 *                           CUDA backward
 *   RINGATTN_CUDA_GQA       any value but "" and "0": allow grouped-query
 *                           attention on CUDA tensors (never run on a GPU yet)
 *   RINGATTN_NCCL_LIBRARY   the libnccl to load (a path)
 *   RINGATTN_CPU_ISA        auto, baseline, avx2 or avx512: the CPU kernels'
 *                           instruction set (another value makes CPU calls fail)
 *   RINGATTN_RING_SUB_BLOCKS  sub-blocks per ring block (a positive number;
 *                           0 or unset: 8 on the CPU, 1 for CUDA tensors)
 */
#include <limits.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "internal.h"

static struct {
  int num_threads; /* <= 0: every core */
  int simt;
  int deterministic;
  int cuda_gqa;
  char nccl_library[4096];
  ra_cpu_isa cpu_isa;
  int ring_sub_blocks; /* <= 0: the device's default */
} env;

static pthread_once_t env_once = PTHREAD_ONCE_INIT;

static int flag(const char *value) { return value && value[0] && strcmp(value, "0") != 0; }

/* unset or "": auto; a name of ra_cpu_isa_name; anything else: invalid */
static ra_cpu_isa parse_cpu_isa(const char *value) {
  if (!value || !value[0]) return RA_CPU_ISA_AUTO;
  for (int i = RA_CPU_ISA_AUTO; ra_cpu_isa_name((ra_cpu_isa)i); i++)
    if (strcmp(value, ra_cpu_isa_name((ra_cpu_isa)i)) == 0) return (ra_cpu_isa)i;
  return RA_CPU_ISA_INVALID;
}

static void read_env(void) {
  const char *s = getenv("RINGATTN_NUM_THREADS");
  env.num_threads = s ? atoi(s) : 0;
  s = getenv("RINGATTN_CUDA_KERNEL");
  env.simt = s && strcmp(s, "simt") == 0;
  env.deterministic = flag(getenv("RINGATTN_DETERMINISTIC"));
  env.cpu_isa = parse_cpu_isa(getenv("RINGATTN_CPU_ISA"));
  env.cuda_gqa = flag(getenv("RINGATTN_CUDA_GQA"));
  s = getenv("RINGATTN_RING_SUB_BLOCKS");
  env.ring_sub_blocks = s ? atoi(s) : 0;
  s = getenv("RINGATTN_NCCL_LIBRARY");
  if (s) {
    strncpy(env.nccl_library, s, sizeof env.nccl_library - 1);
    env.nccl_library[sizeof env.nccl_library - 1] = '\0';
  }
}

static void load_env(void) { pthread_once(&env_once, read_env); }

/* Online cores, as Python's os.cpu_count() counts them: counted once per
 * process, since sysconf reads /sys on every call (several system calls,
 * a visible part of a small call's cost). */
static int cores, procs; /* online cores; the cores OpenMP may use */
static pthread_once_t cores_once = PTHREAD_ONCE_INIT;

static void count_cores(void) {
  long n = sysconf(_SC_NPROCESSORS_ONLN);
  cores = n > 0 ? (n < INT_MAX / 4 ? (int)n : INT_MAX / 4) : 1;
#ifdef _OPENMP
  procs = omp_get_num_procs(); /* this process's affinity mask */
#else
  procs = cores;
#endif
}

static int online_cores(void) {
  pthread_once(&cores_once, count_cores);
  return cores;
}

int ra_max_num_threads(void) { return 4 * online_cores(); }

static int clamp_threads(int n) {
  const int max = ra_max_num_threads();
  return n > max ? max : n;
}

int ra_default_num_threads(void) {
  load_env();
  if (env.num_threads > 0) return clamp_threads(env.num_threads);
  pthread_once(&cores_once, count_cores);
  return clamp_threads(procs);
}

int ra_num_threads_explicit(int requested) {
  load_env();
  return requested > 0 || env.num_threads > 0;
}

/* A call's thread count.  Clamped, so that num_threads=1000 from a caller
 * that bypasses Python's rule cannot make libgomp fail to start its threads
 * (under a memory limit it then ends the process). */
int ra_resolve_num_threads(int requested) {
  return requested > 0 ? clamp_threads(requested) : ra_default_num_threads();
}

const char *ra_env_nccl_library(void) {
  load_env();
  return env.nccl_library[0] ? env.nccl_library : NULL;
}

ra_exec ra_exec_default(void) {
  load_env();
  ra_exec e;
  memset(&e, 0, sizeof e);
  e.num_threads = 0; /* resolved per call: ra_default_num_threads() */
  e.check_finite = 0;
  e.kernel = env.simt ? RA_KERNEL_SIMT : RA_KERNEL_AUTO;
  e.deterministic = env.deterministic;
  e.cuda_gqa = env.cuda_gqa;
  e.ring_sub_blocks = env.ring_sub_blocks;
  e.device = -1;
  e.stream = NULL;
  e.cpu_isa = env.cpu_isa;
  return e;
}

void ra_fwd_params_init(ra_fwd_params *p) {
  memset(p, 0, sizeof *p);
  ra_config_init(&p->cfg);
  p->device_type = RA_DEVICE_CPU;
  p->exec = ra_exec_default();
}

void ra_bwd_params_init(ra_bwd_params *p) {
  memset(p, 0, sizeof *p);
  ra_fwd_params_init(&p->fwd);
}
