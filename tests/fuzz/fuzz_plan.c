/*
 * fuzz_plan.c -- libFuzzer target for plan creation and the core's intake
 * of shapes and strides (issue 10, item 3: sizes never wrap).
 *
 * Each input is decoded into an ra_config (shape, branches, mode, scale,
 * world size, dtype: anything, valid or not, with sizes drawn to hit
 * powers of two and the edges of int64), element strides for q, k, v, o
 * (and dout, dq, dk, dv), an lse row stride and a thread count.  Then:
 *
 *  1. ra_plan_create: a refusal must leave the plan NULL and a message in
 *     ra_last_error(); a plan must describe itself consistently.
 *  2. ra_forward (or ra_backward) on the CPU, in process, with every rank:
 *     - when the tensors' reach (computed here independently, in 128-bit
 *       arithmetic) is small, on buffers of exactly that reach;
 *     - when the reach does not fit the address space, on tiny buffers:
 *       the core must refuse the call before it touches any of them;
 *     - otherwise (valid but too large to allocate here) it is not run.
 *     A refusal must set a message, and every rank's current_bytes must be
 *     back at 0 after the call.
 *
 * Built with clang -fsanitize=fuzzer,address,undefined from the core's
 * sources (CPU only: no CUDA, MPI or OpenMP) by tests/fuzz/run.sh.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ringattn.h"

/* ------------------------------------------------------------- decoding */

typedef struct reader {
  const uint8_t *p;
  size_t n;
} reader;

static uint8_t u8(reader *r) {
  if (!r->n) return 0;
  r->n--;
  return *r->p++;
}

static uint64_t u64(reader *r) {
  uint64_t v = 0;
  for (int i = 0; i < 8; i++) v = v << 8 | u8(r);
  return v;
}

/* A size-like int64: mostly small, often a power of two or its neighbour,
 * sometimes an edge of int64 or 8 raw bytes. */
static int64_t size_value(reader *r) {
  const uint8_t sel = u8(r);
  switch (sel % 8) {
    case 0: case 1: case 2: return (int64_t)(u8(r) % 17);          /* 0..16 */
    case 3: return (int64_t)(u8(r) % 65) + 1;                       /* 1..65 */
    case 4: {                                                       /* 2^k - 1, 2^k, 2^k + 1 */
      const int k = u8(r) % 63;
      return ((int64_t)1 << k) + (int64_t)(sel / 8 % 3) - 1;
    }
    case 5: return INT64_MAX - (int64_t)(u8(r) % 4);
    case 6: return -(int64_t)(u8(r) % 3);
    default: return (int64_t)u64(r);
  }
}

/* A stride: contiguous-like (from the caller), zero (broadcast), small, or a size_value. */
static int64_t stride_value(reader *r, int64_t contiguous) {
  switch (u8(r) % 6) {
    case 0: case 1: case 2: return contiguous;
    case 3: return 0;
    case 4: return (int64_t)(u8(r) % 40);
    default: return size_value(r);
  }
}

/* -------------------------------------------------------------- checks */

static void fail(const char *what) {
  fprintf(stderr, "fuzz_plan: %s (last error: \"%s\")\n", what, ra_last_error());
  abort();
}

static void expect_message(ra_status st, const char *where) {
  if (st != RA_OK && ra_last_error()[0] == '\0') fail(where);
  if (st != RA_OK && strcmp(ra_status_string(st), "unknown status") == 0) fail("unknown status code");
}

static void check_plan(const ra_config *cfg) {
  ra_plan *plan = (ra_plan *)(uintptr_t)1;
  const ra_status st = ra_plan_create(cfg, &plan);
  expect_message(st, "ra_plan_create refused without a message");
  if (st != RA_OK) {
    if (plan) fail("a refused plan is not NULL");
    return;
  }
  if (!plan) fail("an accepted plan is NULL");
  const ra_config *pc = ra_plan_config(plan);
  const int64_t L = ra_plan_local_len(plan);
  if (L < 1 || L * pc->world_size != pc->seq_len) fail("local length");
  if (cfg->scale == 0.0 && !(pc->scale > 0 && isfinite(pc->scale))) fail("default scale");
  for (int i = 0; i < pc->num_branches; i++) {
    ra_branch_info bi;
    if (ra_plan_branch(plan, i, &bi) != RA_OK) fail("ra_plan_branch");
    if (bi.segment < 1 || bi.rate < 1 || bi.segment % bi.rate || bi.span < 1) fail("branch info");
    if (bi.head_begin < 0 || bi.head_end > pc->num_heads || bi.head_begin > bi.head_end) fail("branch heads");
    /* a few heads: the first, the last, and their neighbours */
    const int64_t heads[4] = {0, 1, pc->num_heads - 2, pc->num_heads - 1};
    for (int j = 0; j < 4; j++) {
      const int64_t off = ra_plan_head_offset(plan, i, heads[j]);
      if (off < -1 || off >= bi.rate) fail("head offset");
    }
  }
  ra_branch_info bi;
  if (ra_plan_branch(plan, pc->num_branches, &bi) == RA_OK) fail("branch out of range accepted");
  ra_plan_destroy(plan);
}

/* ------------------------------------------------------------ the call */

enum { MAX_ELEMS = 1 << 12, MAX_BYTES = 1 << 20, TINY = 64 };
/* The CPU backend refuses head dims above this (its workspaces' sizes would
 * wrap): such calls run on tiny buffers and must be refused. */
#define CPU_MAX_HEAD_DIM ((int64_t)1 << 40)

/* Elements a (b, n, h, d) tensor reaches with its strides: 0 when a
 * stride is negative (the core refuses it), -1 when the reach does not fit
 * in int64 elements or its bytes do not. */
static __int128 reach(const ra_tensor *t, int64_t b, int64_t n, int64_t h, int64_t d, size_t es) {
  if (t->stride_b < 0 || t->stride_n < 0 || t->stride_h < 0) return 0;
  const __int128 e = (__int128)(b - 1) * t->stride_b + (__int128)(n - 1) * t->stride_n +
                     (__int128)(h - 1) * t->stride_h + d;
  return e * (__int128)es > (__int128)INT64_MAX ? -1 : e;
}

static void fill(void *buf, size_t bytes, reader *r) {
  /* small finite values of every dtype: bytes of 0x3c / 0x40 patterns */
  unsigned char *c = buf;
  const unsigned char seed = u8(r);
  for (size_t i = 0; i < bytes; i++) c[i] = (unsigned char)(((i * 7 + seed) & 0x1f) | (i % 2 ? 0x38 : 0x00));
}

static void run_call(const ra_config *cfg, reader *r) {
  ra_bwd_params p;
  ra_bwd_params_init(&p);
  p.fwd.cfg = *cfg;
  const int backward = u8(r) & 1;
  const int with_lse = backward || (u8(r) & 1);
  const int64_t b = cfg->batch, n = cfg->seq_len, h = cfg->num_heads, d = cfg->head_dim;
  const size_t es = cfg->dtype == RA_FLOAT64 ? 8 : cfg->dtype == RA_FLOAT32 ? 4 : 2;
  const size_t acc_es = cfg->dtype == RA_FLOAT64 ? 8 : 4;
  ra_tensor *t[8] = {&p.fwd.q, &p.fwd.k, &p.fwd.v, &p.fwd.o, &p.dout, &p.dq, &p.dk, &p.dv};
  const int count = backward ? 8 : 4;
  __int128 need[8];
  int refuse = 0, small = 1, valid = 1; /* valid: nothing the core may refuse but the plan and the dtype */
  const __int128 hd = (__int128)h * d, nhd = hd * n; /* contiguous strides, saturated below */
  for (int i = 0; i < count; i++) {
    t[i]->stride_h = stride_value(r, d);
    t[i]->stride_n = stride_value(r, hd > INT64_MAX ? INT64_MAX : (int64_t)hd);
    t[i]->stride_b = stride_value(r, nhd > INT64_MAX ? INT64_MAX : (int64_t)nhd);
    need[i] = reach(t[i], b, n, h, d, es);
    if (need[i] < 0) refuse = 1;
    else if (need[i] * (__int128)es > MAX_BYTES) small = 0;
    if (need[i] <= 0) valid = 0;
  }
  /* the lse: (b, h) rows of n values, lse_ld apart */
  p.fwd.lse_ld = (u8(r) % 4) ? n + (int64_t)(u8(r) % 3) : size_value(r);
  __int128 lse_need = 0;
  if (with_lse) {
    lse_need = p.fwd.lse_ld < n ? 0 : (__int128)(b * h - 1) * p.fwd.lse_ld + n;
    if (lse_need <= 0) valid = 0;
    if (lse_need * (__int128)acc_es > (__int128)INT64_MAX) refuse = 1, lse_need = -1;
    else if (lse_need * (__int128)acc_es > MAX_BYTES) small = 0;
  }
  const int threads = (int)(int8_t)u8(r); /* <= 0: the default; large ones are clamped */
  p.fwd.exec.num_threads = threads * (u8(r) % 2 ? 1000 : 1);
  p.fwd.exec.check_finite = u8(r) & 1;
  if (d > CPU_MAX_HEAD_DIM) refuse = 1;
  if (!refuse && !small) return; /* valid, maybe, but too large to allocate here */

  void *buf[9] = {0};
  for (int i = 0; i < count; i++) {
    const size_t bytes = refuse ? TINY : (size_t)(need[i] > 0 ? need[i] : 1) * es;
    buf[i] = malloc(bytes);
    fill(buf[i], bytes, r);
    t[i]->data = buf[i];
  }
  if (with_lse) {
    const size_t bytes = refuse ? TINY : (size_t)(lse_need > 0 ? lse_need : 1) * acc_es;
    buf[8] = malloc(bytes);
    memset(buf[8], 0, bytes);
    p.fwd.lse = buf[8];
  }
  if (backward && !refuse && lse_need > 0) { /* the backward reads lse: finite values */
    for (int64_t i = 0; i < (int64_t)lse_need; i++) {
      if (acc_es == 8) ((double *)buf[8])[i] = 1.0;
      else ((float *)buf[8])[i] = 1.0f;
    }
  }
  const int ranks = cfg->world_size > 0 && cfg->world_size <= 64 ? cfg->world_size : 1;
  ra_stats stats[64];
  memset(stats, 0, sizeof stats);
  p.fwd.stats = cfg->world_size > 0 && cfg->world_size <= 64 ? stats : NULL;
  const ra_status st = backward ? ra_backward(&p) : ra_forward(&p.fwd);
  expect_message(st, backward ? "ra_backward refused without a message" : "ra_forward refused without a message");
  if (refuse && st == RA_OK) fail("a call whose strides reach outside the address space was run");
  if (refuse && st != RA_ERR_INVALID_ARGUMENT && st != RA_ERR_UNSUPPORTED) /* e.g. out of memory: it sized something */
    fail("a call whose sizes cannot be addressed was not refused by a rule");
  ra_plan *plan = NULL;
  if (valid && !refuse && cfg->dtype != RA_BFLOAT16 && ra_plan_create(cfg, &plan) == RA_OK && st != RA_OK)
    fail("a valid call on addressable tensors was refused");
  ra_plan_destroy(plan);
  for (int i = 0; p.fwd.stats && i < ranks; i++)
    if (stats[i].current_bytes != 0) fail("a rank's current_bytes is not back at 0");
  for (int i = 0; i < 9; i++) free(buf[i]);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  reader r = {data, size};
  ra_config cfg;
  ra_config_init(&cfg);
  cfg.batch = size_value(&r);
  cfg.seq_len = size_value(&r);
  cfg.num_heads = size_value(&r);
  cfg.head_dim = size_value(&r);
  cfg.num_branches = (int)(u8(&r) % (RA_MAX_BRANCHES + 2));
  for (int i = 0; i < RA_MAX_BRANCHES && i < cfg.num_branches; i++) {
    cfg.segment_lengths[i] = size_value(&r);
    cfg.dilation_rates[i] = size_value(&r);
  }
  cfg.causal = u8(&r) & 1;
  const uint8_t mode = u8(&r);
  cfg.mode = (ra_mode)(mode < 250 ? mode % 2 : mode);
  const uint8_t sc = u8(&r);
  cfg.scale = sc < 200 ? 0.0 : sc < 250 ? (double)(sc - 199) / 8 : sc == 250 ? NAN : sc == 251 ? INFINITY : -1.0;
  const uint8_t ws = u8(&r);
  cfg.world_size = ws < 240 ? 1 << (ws % 4) : ws < 250 ? (int)(ws % 9) : (int)(int32_t)(uint32_t)u64(&r);
  const uint8_t dt = u8(&r);
  cfg.dtype = (ra_dtype)(dt < 250 ? dt % 4 : dt);

  /* A plan holds a table of G x h head offsets: at most 128 bytes per
   * element of q, as every size of the core, but for a shape within that
   * bound and with millions of heads it is larger than this process may
   * allocate (libFuzzer's malloc limit).  Such plans are not built here;
   * every other configuration is, the refused ones above all. */
  int within_bound = cfg.batch >= 1 && cfg.seq_len >= 1 && cfg.num_heads >= 1 && cfg.head_dim >= 1;
  const int64_t dims[4] = {cfg.batch, cfg.seq_len, cfg.num_heads, cfg.head_dim};
  __int128 bytes = 128;
  for (int i = 0; i < 4 && within_bound; i++) {
    bytes *= dims[i]; /* both factors below 2^63: no 128-bit overflow */
    within_bound = bytes <= (__int128)INT64_MAX;
  }
  const int big_table = (__int128)cfg.num_branches * cfg.num_heads * 8 > ((__int128)64 << 20);
  if (!(within_bound && big_table)) check_plan(&cfg);

  /* the call, for shapes small enough to hold or whose strides must be refused */
  const int shape_small = cfg.batch >= 1 && cfg.seq_len >= 1 && cfg.num_heads >= 1 && cfg.head_dim >= 1 &&
                          cfg.batch <= MAX_ELEMS && cfg.seq_len <= MAX_ELEMS && cfg.num_heads <= MAX_ELEMS &&
                          cfg.head_dim <= MAX_ELEMS &&
                          cfg.batch * cfg.seq_len * cfg.num_heads * cfg.head_dim <= MAX_ELEMS;
  const int huge_head = cfg.batch == 1 && cfg.seq_len >= 1 && cfg.seq_len <= 64 && cfg.num_heads >= 1 &&
                        cfg.num_heads <= 4 && cfg.head_dim > CPU_MAX_HEAD_DIM;
  if ((shape_small || huge_head) && cfg.world_size <= 16) run_call(&cfg, &r);
  return 0;
}
