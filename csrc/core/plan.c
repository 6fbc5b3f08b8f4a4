/*
 * plan.c -- validate a configuration and derive the ring schedule.
 *
 * All the rules of the semantics are checked here, once, so that the
 * kernels and the ring driver can trust their inputs.  Messages name the
 * field as the Python API spells it.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

void ra_config_init(ra_config *cfg) {
  memset(cfg, 0, sizeof *cfg);
  cfg->causal = 0;
  cfg->mode = RA_MODE_GROUPS;
  cfg->scale = 0.0;
  cfg->world_size = 1;
  cfg->dtype = RA_FLOAT32;
}

int ra_mul_ok(int64_t a, int64_t b, int64_t *out) {
  if (a < 0 || b < 0 || (a != 0 && b > INT64_MAX / a)) return 0;
  *out = a * b;
  return 1;
}

int ra_mul4_ok(int64_t a, int64_t b, int64_t c, int64_t d, int64_t *out) {
  int64_t ab, abc;
  return ra_mul_ok(a, b, &ab) && ra_mul_ok(ab, c, &abc) && ra_mul_ok(abc, d, out);
}

int ra_add_ok(int64_t a, int64_t b, int64_t *out) {
  if (a < 0 || b < 0 || a > INT64_MAX - b) return 0;
  *out = a + b;
  return 1;
}

int ra_bytes_ok(int64_t count, size_t elem_bytes, size_t *out) {
  int64_t bytes;
  if (elem_bytes > (size_t)INT64_MAX || !ra_mul_ok(count, (int64_t)elem_bytes, &bytes) ||
      (uint64_t)bytes > (uint64_t)SIZE_MAX)
    return 0;
  *out = (size_t)bytes;
  return 1;
}

int ra_tensor_span_ok(const ra_tensor *t, int64_t b, int64_t n, int64_t h, int64_t d, int64_t *elems) {
  int64_t ob, on, oh, s1, s2, s3;
  if (b < 1 || n < 1 || h < 1 || d < 1) return 0;
  if (!ra_mul_ok(b - 1, t->stride_b, &ob) || !ra_mul_ok(n - 1, t->stride_n, &on) ||
      !ra_mul_ok(h - 1, t->stride_h, &oh))
    return 0;
  return ra_add_ok(ob, on, &s1) && ra_add_ok(s1, oh, &s2) && ra_add_ok(s2, d, &s3) && (*elems = s3, 1);
}

size_t ra_dtype_size(ra_dtype dtype) {
  switch (dtype) {
    case RA_FLOAT64: return 8;
    case RA_FLOAT32: return 4;
    default: return 2; /* float16, bfloat16 */
  }
}

size_t ra_acc_size(ra_dtype dtype) { return dtype == RA_FLOAT64 ? sizeof(double) : sizeof(float); }

ra_run ra_active_run(int64_t segment, int64_t rate, int64_t off,
                     int64_t start, int64_t len) {
  ra_run run;
  int64_t u0 = start % segment;                 /* window start inside segment */
  int64_t first = ((off - u0) % rate + rate) % rate;
  run.first = first;
  run.count = first < len ? (len - 1 - first) / rate + 1 : 0;
  return run;
}

static ra_status check_shape(const ra_config *c) {
  if (c->batch < 1) return ra_fail(RA_ERR_INVALID_ARGUMENT, "q: batch size must be >= 1, got %lld", (long long)c->batch);
  if (c->seq_len < 1) return ra_fail(RA_ERR_INVALID_ARGUMENT, "q: sequence length must be >= 1, got %lld", (long long)c->seq_len);
  if (c->num_heads < 1) return ra_fail(RA_ERR_INVALID_ARGUMENT, "q: number of heads must be >= 1, got %lld", (long long)c->num_heads);
  if (c->head_dim < 1) return ra_fail(RA_ERR_INVALID_ARGUMENT, "q: head dim must be >= 1, got %lld", (long long)c->head_dim);
  if (c->dtype != RA_FLOAT32 && c->dtype != RA_FLOAT16 && c->dtype != RA_BFLOAT16 && c->dtype != RA_FLOAT64)
    return ra_fail(RA_ERR_INVALID_ARGUMENT, "dtype: unknown dtype code %d", (int)c->dtype);
  /* every size the core computes is at most a small multiple of a tensor's
   * bytes: refuse shapes whose bytes (times 16, for the accumulators and
   * ring blocks in double) do not fit, so that no product can wrap */
  int64_t elems, bytes;
  if (!ra_mul4_ok(c->batch, c->seq_len, c->num_heads, c->head_dim, &elems) ||
      !ra_mul_ok(elems, 16 * (int64_t)sizeof(double), &bytes) || (uint64_t)bytes > (uint64_t)SIZE_MAX)
    return ra_fail(RA_ERR_INVALID_ARGUMENT,
                   "q: shape (%lld, %lld, %lld, %lld) holds more elements than this machine can address",
                   (long long)c->batch, (long long)c->seq_len, (long long)c->num_heads, (long long)c->head_dim);
  return RA_OK;
}

static ra_status check_branches(const ra_config *c) {
  int G = c->num_branches;
  if (G < 1 || G > RA_MAX_BRANCHES)
    return ra_fail(RA_ERR_INVALID_ARGUMENT, "segment_lengths: need 1 to %d branches, got %d", RA_MAX_BRANCHES, G);
  for (int i = 0; i < G; i++) {
    int64_t s = c->segment_lengths[i], r = c->dilation_rates[i];
    if (s < 1) return ra_fail(RA_ERR_INVALID_ARGUMENT, "segment_lengths[%d] must be >= 1, got %lld", i, (long long)s);
    if (r < 1) return ra_fail(RA_ERR_INVALID_ARGUMENT, "dilation_rates[%d] must be >= 1, got %lld", i, (long long)r);
    int64_t S = s < c->seq_len ? s : c->seq_len;
    if (c->seq_len % S != 0)
      return ra_fail(RA_ERR_INVALID_ARGUMENT, "segment_lengths[%d]=%lld: sequence length %lld is not divisible by it", i, (long long)S, (long long)c->seq_len);
    if (S % r != 0)
      return ra_fail(RA_ERR_INVALID_ARGUMENT, "dilation_rates[%d]=%lld does not divide the effective segment length %lld", i, (long long)r, (long long)S);
  }
  if (c->mode != RA_MODE_GROUPS && c->mode != RA_MODE_LONGNET)
    return ra_fail(RA_ERR_INVALID_ARGUMENT, "mode: unknown mode code %d", (int)c->mode);
  if (c->mode == RA_MODE_GROUPS && c->num_heads < G)
    return ra_fail(RA_ERR_INVALID_ARGUMENT, "segment_lengths: mode \"groups\" needs at least one head per branch, got %lld heads for %d branches", (long long)c->num_heads, G);
  if (!isfinite(c->scale))
    return ra_fail(RA_ERR_INVALID_ARGUMENT, "scale must be finite, got %g", c->scale);
  return RA_OK;
}

static ra_status check_kv_heads(const ra_config *c) {
  const int64_t hkv = c->num_kv_heads;
  if (hkv < 0 || hkv > c->num_heads || (hkv > 0 && c->num_heads % hkv != 0))
    return ra_fail(RA_ERR_INVALID_ARGUMENT,
                   "k: %lld key/value heads must divide the %lld heads of q (grouped-query attention)",
                   (long long)hkv, (long long)c->num_heads);
  return RA_OK;
}

/* The partition's chunks: contiguous ranks hold one chunk of L = n / k
 * positions, zigzag ranks two of C = n / (2k).  Every branch must be local
 * to a chunk or span whole chunks. */
static ra_status check_ring(const ra_config *c) {
  int64_t k = c->world_size;
  if (k < 1) return ra_fail(RA_ERR_INVALID_ARGUMENT, "world_size must be >= 1, got %lld", (long long)k);
  if (c->partition != RA_PARTITION_CONTIGUOUS && c->partition != RA_PARTITION_ZIGZAG)
    return ra_fail(RA_ERR_INVALID_ARGUMENT, "partition: unknown partition code %d", (int)c->partition);
  const int zigzag = c->partition == RA_PARTITION_ZIGZAG;
  if (c->seq_len % (zigzag ? 2 * k : k) != 0)
    return ra_fail(RA_ERR_INVALID_ARGUMENT,
                   zigzag ? "world_size=%lld: partition=\"zigzag\" needs 2 * world_size to divide the sequence length %lld"
                          : "world_size=%lld does not divide the sequence length %lld",
                   (long long)k, (long long)c->seq_len);
  int64_t C = c->seq_len / (zigzag ? 2 * k : k);
  for (int i = 0; i < c->num_branches; i++) {
    int64_t S = c->segment_lengths[i] < c->seq_len ? c->segment_lengths[i] : c->seq_len;
    if (C % S != 0 && S % C != 0)
      return ra_fail(RA_ERR_INVALID_ARGUMENT,
                     zigzag ? "world_size=%lld: zigzag chunk length %lld and segment_lengths[%d]=%lld must divide one another"
                            : "world_size=%lld: local length %lld and segment_lengths[%d]=%lld must divide one another",
                     (long long)k, (long long)C, i, (long long)S);
  }
  return RA_OK;
}

/* Number the distinct (key/value head, offset) pairs of each branch.  Both
 * grow with the query head (offsets are constant in "groups" mode and
 * h div ceil(h / r) in "longnet" mode), so a slot is a run of heads. */
static void plan_slots(ra_plan *p) {
  const int64_t H = p->cfg.num_heads;
  for (int i = 0; i < p->cfg.num_branches; i++) {
    int64_t n = 0, last_kv = -1, last_off = -1;
    for (int64_t h = 0; h < H; h++) {
      const int64_t off = p->offset[i * H + h];
      if (off < 0) {
        p->slot[i * H + h] = -1;
        continue;
      }
      if (n == 0 || ra_kv_head(p, h) != last_kv || off != last_off) {
        p->slot_head[i * H + n++] = h;
        last_kv = ra_kv_head(p, h);
        last_off = off;
      }
      p->slot[i * H + h] = n - 1;
    }
    p->num_slots[i] = n;
  }
}

/* Heads of branch i: groups mode splits heads into contiguous groups. */
static void branch_heads(const ra_config *c, int i, int64_t *begin, int64_t *end) {
  if (c->mode == RA_MODE_LONGNET) {
    *begin = 0;
    *end = c->num_heads;
    return;
  }
  int64_t G = c->num_branches, base = c->num_heads / G, extra = c->num_heads % G;
  *begin = i * base + (i < extra ? i : extra);
  *end = *begin + base + (i < extra ? 1 : 0);
}

ra_status ra_plan_create(const ra_config *cfg, ra_plan **out) {
  *out = NULL;
  if (!cfg) return ra_fail(RA_ERR_INVALID_ARGUMENT, "config is NULL");
  RA_TRY(check_shape(cfg));
  RA_TRY(check_branches(cfg));
  RA_TRY(check_kv_heads(cfg));
  RA_TRY(check_ring(cfg));

  ra_plan *p = calloc(1, sizeof *p);
  if (!p) return ra_fail(RA_ERR_OUT_OF_MEMORY, "could not allocate a plan");
  p->cfg = *cfg;
  if (p->cfg.scale == 0.0) p->cfg.scale = 1.0 / sqrt((double)cfg->head_dim);
  if (p->cfg.num_kv_heads == 0) p->cfg.num_kv_heads = cfg->num_heads;
  p->group = cfg->num_heads / p->cfg.num_kv_heads;
  p->local_len = cfg->seq_len / cfg->world_size;
  p->chunk_len = cfg->partition == RA_PARTITION_ZIGZAG ? p->local_len / 2 : p->local_len;
  int64_t H = cfg->num_heads, n_offsets;
  size_t offset_bytes;
  if (!ra_mul_ok(cfg->num_branches, H, &n_offsets) || !ra_bytes_ok(n_offsets, sizeof(int64_t), &offset_bytes)) {
    free(p);
    return ra_fail(RA_ERR_INVALID_ARGUMENT, "q: %lld heads are more than this machine can address",
                   (long long)H);
  }
  p->offset = malloc(offset_bytes);
  p->slot = malloc(offset_bytes);
  p->slot_head = malloc(offset_bytes);
  if (!p->offset || !p->slot || !p->slot_head) {
    ra_plan_destroy(p);
    return ra_fail(RA_ERR_OUT_OF_MEMORY, "could not allocate a plan");
  }
  for (int i = 0; i < cfg->num_branches; i++) {
    ra_branch_info *b = &p->branch[i];
    b->segment = cfg->segment_lengths[i] < cfg->seq_len ? cfg->segment_lengths[i] : cfg->seq_len;
    b->rate = cfg->dilation_rates[i];
    b->span = p->chunk_len % b->segment == 0 ? 1 : b->segment / p->chunk_len;
    branch_heads(cfg, i, &b->head_begin, &b->head_end);
    int64_t per = (H + b->rate - 1) / b->rate; /* ceil(H / r): longnet's head-offset rule */
    for (int64_t h = 0; h < H; h++) {
      int64_t off = -1;
      if (h >= b->head_begin && h < b->head_end)
        off = cfg->mode == RA_MODE_GROUPS ? i % b->rate : h / per;
      p->offset[i * H + h] = off;
    }
  }
  plan_slots(p);
  *out = p;
  return RA_OK;
}

void ra_plan_destroy(ra_plan *plan) {
  if (!plan) return;
  free(plan->offset);
  free(plan->slot);
  free(plan->slot_head);
  free(plan);
}

const ra_config *ra_plan_config(const ra_plan *plan) { return &plan->cfg; }
int64_t ra_plan_local_len(const ra_plan *plan) { return plan->local_len; }
int64_t ra_plan_chunk_len(const ra_plan *plan) { return plan->chunk_len; }

ra_status ra_plan_branch(const ra_plan *plan, int branch, ra_branch_info *info) {
  if (branch < 0 || branch >= plan->cfg.num_branches)
    return ra_fail(RA_ERR_INVALID_ARGUMENT, "branch %d out of range [0, %d)", branch, plan->cfg.num_branches);
  *info = plan->branch[branch];
  return RA_OK;
}

int64_t ra_plan_head_offset(const ra_plan *plan, int branch, int64_t head) {
  if (branch < 0 || branch >= plan->cfg.num_branches || head < 0 || head >= plan->cfg.num_heads) return -1;
  return plan->offset[branch * plan->cfg.num_heads + head];
}

/* ------------------------------------------------------------ plan cache */

#define PLAN_CACHE_SLOTS 16

/* The cache keys plans by the configuration as the caller gave it (scale
 * unresolved).  Each slot holds one reference; a plan evicted while a call
 * uses it is destroyed by that call's release. */
static struct {
  pthread_mutex_t lock;
  uint64_t clock;
  struct {
    ra_config key;
    ra_plan *plan;
    uint64_t used;
  } slot[PLAN_CACHE_SLOTS];
} cache = {PTHREAD_MUTEX_INITIALIZER, 0, {{{0}, NULL, 0}}};

static pthread_once_t cache_once = PTHREAD_ONCE_INIT;

/* fork() while another thread holds the lock must not leave the child's
 * copy locked forever. */
static void cache_lock(void) { pthread_mutex_lock(&cache.lock); }
static void cache_unlock(void) { pthread_mutex_unlock(&cache.lock); }
static void cache_init(void) { pthread_atfork(cache_lock, cache_unlock, cache_unlock); }

/* Every field of ra_config that a plan depends on (all of them). */
static int same_config(const ra_config *a, const ra_config *b) {
  if (a->batch != b->batch || a->seq_len != b->seq_len || a->num_heads != b->num_heads ||
      a->head_dim != b->head_dim || a->num_branches != b->num_branches || a->causal != b->causal ||
      a->mode != b->mode || a->scale != b->scale || a->world_size != b->world_size || a->dtype != b->dtype ||
      a->num_kv_heads != b->num_kv_heads || a->partition != b->partition)
    return 0;
  for (int i = 0; i < a->num_branches; i++)
    if (a->segment_lengths[i] != b->segment_lengths[i] || a->dilation_rates[i] != b->dilation_rates[i]) return 0;
  return 1;
}

static void drop_ref(ra_plan *plan) {
  if (--plan->refs == 0) ra_plan_destroy(plan);
}

ra_status ra_plan_acquire(const ra_config *cfg, const ra_plan **out) {
  *out = NULL;
  if (!cfg) return ra_fail(RA_ERR_INVALID_ARGUMENT, "config is NULL");
  pthread_once(&cache_once, cache_init);
  const int usable = cfg->num_branches >= 1 && cfg->num_branches <= RA_MAX_BRANCHES;
  cache_lock();
  int victim = 0;
  for (int i = 0; usable && i < PLAN_CACHE_SLOTS; i++) {
    if (cache.slot[i].plan && same_config(&cache.slot[i].key, cfg)) {
      cache.slot[i].used = ++cache.clock;
      cache.slot[i].plan->refs++;
      *out = cache.slot[i].plan;
      cache_unlock();
      return RA_OK;
    }
    if (cache.slot[i].used < cache.slot[victim].used) victim = i;
  }
  cache_unlock();
  ra_plan *plan;
  RA_TRY(ra_plan_create(cfg, &plan)); /* outside the lock: it may fail and say why */
  plan->refs = 2;                     /* the caller and the cache */
  cache_lock();
  ra_plan *old = cache.slot[victim].plan;
  cache.slot[victim].key = *cfg;
  cache.slot[victim].plan = plan;
  cache.slot[victim].used = ++cache.clock;
  if (old) drop_ref(old);
  cache_unlock();
  *out = plan;
  return RA_OK;
}

void ra_plan_release(const ra_plan *plan) {
  if (!plan) return;
  cache_lock();
  drop_ref((ra_plan *)plan);
  cache_unlock();
}
