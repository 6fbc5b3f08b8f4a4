/*
 * internal.h -- what every layer of the C core shares, and nothing else:
 * errors, the plan, sizes, and memory accounting.  The layers have their
 * own headers: ring/call.h and ring/backend.h (the call as the driver sees
 * it, the backend interface), cpu/cpu.h (the CPU kernels), and
 * transport/transport.h (transports and communicators).
 */
#ifndef RINGATTN_INTERNAL_H
#define RINGATTN_INTERNAL_H

#include "ringattn.h"

/* Record a formatted message for ra_last_error() and return `status`. */
ra_status ra_fail(ra_status status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

/* Evaluate an ra_status expression and return it from the caller on failure. */
#define RA_TRY(expr)                      \
  do {                                    \
    ra_status ra_try_s_ = (expr);         \
    if (ra_try_s_ != RA_OK) return ra_try_s_; \
  } while (0)

/* ------------------------------------------------------------------- plan */

/* The plan: the validated configuration plus what the schedule needs. */
struct ra_plan {
  ra_config cfg;          /* scale already resolved                        */
  int64_t local_len;      /* L                                             */
  ra_branch_info branch[RA_MAX_BRANCHES];
  /* offset[i * num_heads + h]: offset of head h in branch i, -1 if unused */
  int64_t *offset;
};

/* The active tokens of one cell inside a window of positions: those p in
 * [start, start + len) with ((p mod S) mod r) == off.  The window never
 * crosses a segment boundary.  first is relative to the window start. */
typedef struct ra_run {
  int64_t first, count;
} ra_run;
ra_run ra_active_run(int64_t segment, int64_t rate, int64_t off,
                     int64_t start, int64_t len);

/* ------------------------------------------------------------------ sizes */

/* *out <- a * b, or 0 when the product does not fit an int64_t (or either
 * factor is negative).  Every size product of the core goes through it. */
int ra_mul_ok(int64_t a, int64_t b, int64_t *out);
/* a * b * c * d with the same check. */
int ra_mul4_ok(int64_t a, int64_t b, int64_t c, int64_t d, int64_t *out);

/* Bytes of one element of a dtype. */
size_t ra_dtype_size(ra_dtype dtype);

/* Bytes of one accumulator element of a dtype's computation: 8 (double) for
 * RA_FLOAT64, 4 (float) otherwise.  The accumulators, the lse state and the
 * public lse, delta, and the dK/dV carried in ring blocks all use it. */
size_t ra_acc_size(ra_dtype dtype);

/* --------------------------------------------------------------- settings */

/* RINGATTN_NCCL_LIBRARY, or NULL (settings.c reads the environment once). */
const char *ra_env_nccl_library(void);

/* ----------------------------------------------------------------- memory */

/* Allocations counted against a rank's ra_stats (64-byte aligned, zeroed
 * when asked).  ra_hold/ra_release count memory the caller owns. */
void *ra_alloc(ra_stats *stats, size_t bytes);
void ra_free(ra_stats *stats, void *ptr, size_t bytes);
void ra_hold(ra_stats *stats, int64_t bytes);
void ra_release(ra_stats *stats, int64_t bytes);

#endif /* RINGATTN_INTERNAL_H */
