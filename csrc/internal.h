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
  ra_config cfg;          /* scale and num_kv_heads already resolved       */
  int64_t local_len;      /* L                                             */
  int64_t chunk_len;      /* C: L (contiguous), n / (2k) (zigzag)          */
  int64_t group;          /* query heads per key/value head, h / h_kv      */
  ra_branch_info branch[RA_MAX_BRANCHES];
  /* offset[i * num_heads + h]: offset of head h in branch i, -1 if unused */
  int64_t *offset;
  int refs; /* holders of a cached plan (the cache is one); 0: not cached */
  /* Grouped-query attention: the *slots* of branch i are its distinct
   * (key/value head, offset) pairs, the key/value runs its heads read.
   * slot[i * num_heads + h]: the slot head h reads (-1 if unused), numbered
   * from 0 in head order; slot_head[i * num_heads + s]: the first query
   * head of slot s; num_slots[i] of them (num_heads in MHA). */
  int64_t *slot, *slot_head;
  int64_t num_slots[RA_MAX_BRANCHES];
};

/* Key/value head of query head h: h / (h / h_kv). */
static inline int64_t ra_kv_head(const ra_plan *p, int64_t h) { return h / p->group; }

/* The plan of `cfg` from a small process-wide cache (thread-safe, bounded,
 * least recently used out): a call whose shapes and configuration repeat
 * does not build it again.  On a miss it is built by ra_plan_create, whose
 * failure it returns.  The plan is shared and immutable: give it back
 * with ra_plan_release. */
ra_status ra_plan_acquire(const ra_config *cfg, const ra_plan **plan);
void ra_plan_release(const ra_plan *plan);

/* The active tokens of one cell inside a window of positions: those p in
 * [start, start + len) with ((p mod S) mod r) == off.  The window never
 * crosses a segment boundary.  first is relative to the window start. */
typedef struct ra_run {
  int64_t first, count;
} ra_run;
ra_run ra_active_run(int64_t segment, int64_t rate, int64_t off,
                     int64_t start, int64_t len);

/* ------------------------------------------------------------------ sizes */

/* Checked size arithmetic.  Every product or sum of sizes in the core, the
 * driver and the extension goes through these, so that no size wraps even
 * when a caller bypasses the plan's own limit (ra_plan_create refuses
 * shapes whose bytes times 128 do not fit).  Each returns 1 and sets *out,
 * or returns 0 (leaving *out alone) when the result does not fit an int64_t
 * or an operand is negative. */
int ra_mul_ok(int64_t a, int64_t b, int64_t *out);
/* a * b * c * d with the same check. */
int ra_mul4_ok(int64_t a, int64_t b, int64_t c, int64_t d, int64_t *out);
/* a + b with the same check. */
int ra_add_ok(int64_t a, int64_t b, int64_t *out);
/* count * elem_bytes as a size_t: bytes that can be allocated or copied. */
int ra_bytes_ok(int64_t count, size_t elem_bytes, size_t *out);

/* One past the furthest element a (b, n, h, d) tensor reaches from its data
 * pointer with its strides (all >= 0, the head dimension contiguous):
 * (b-1) stride_b + (n-1) stride_n + (h-1) stride_h + d.  Every offset the
 * core computes into the tensor is below it, so checking it once bounds
 * them all.  0 when it does not fit an int64_t. */
int ra_tensor_span_ok(const ra_tensor *t, int64_t b, int64_t n, int64_t h, int64_t d, int64_t *elems);

/* Bytes of one element of a dtype. */
size_t ra_dtype_size(ra_dtype dtype);

/* Bytes of one accumulator element of a dtype's computation: 8 (double) for
 * RA_FLOAT64, 4 (float) otherwise.  The accumulators, the lse state and the
 * public lse, delta, and the dK/dV carried in ring blocks all use it. */
size_t ra_acc_size(ra_dtype dtype);

/* --------------------------------------------------------------- settings */

/* RINGATTN_NCCL_LIBRARY, or NULL (settings.c reads the environment once). */
const char *ra_env_nccl_library(void);

/* The most CPU threads a call may use: 4 x the online cores.  Python's
 * num_threads= and set_num_threads refuse more; the core clamps to it. */
int ra_max_num_threads(void);
/* The thread count a call runs with: `requested`, or the default when it
 * is <= 0, clamped to ra_max_num_threads(). */
int ra_resolve_num_threads(int requested);
/* Nonzero when a call's thread count was chosen by someone: `requested` > 0
 * or RINGATTN_NUM_THREADS set.  Otherwise the entry point may use fewer
 * threads than the default for a call too small to share (entry.c). */
int ra_num_threads_explicit(int requested);

/* ----------------------------------------------------------------- memory */

/* Allocations counted against a rank's ra_stats (64-byte aligned, zeroed
 * when asked).  ra_hold/ra_release count memory the caller owns. */
void *ra_alloc(ra_stats *stats, size_t bytes);
void ra_free(ra_stats *stats, void *ptr, size_t bytes);
void ra_hold(ra_stats *stats, int64_t bytes);
void ra_release(ra_stats *stats, int64_t bytes);

#endif /* RINGATTN_INTERNAL_H */
