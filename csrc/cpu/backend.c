/*
 * backend.c -- the ring driver's backend on the CPU: host memory,
 * OpenMP threads over (task, query block), the flash kernel of
 * kernel.c, and plain row copies for packing.  float64 inputs get the
 * double ops of double.c instead where the accumulator type matters.
 */
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu/backward.h"
#include "cpu/double.h"
#include "cpu/half.h"
#include "cpu/cpu.h"
#include "cpu/isa.h"

static void *cpu_alloc(void *ctx, size_t bytes) {
  (void)ctx;
  return ra_alloc(NULL, bytes); /* the driver counts backend memory */
}

static void cpu_free(void *ctx, void *ptr) {
  (void)ctx;
  ra_free(NULL, ptr, 0);
}

static ra_status cpu_init_state(void *ctx, float *acc, int64_t acc_n, float *lse, int64_t lse_n) {
  (void)ctx;
  memset(acc, 0, sizeof(float) * (size_t)acc_n);
  for (int64_t i = 0; i < lse_n; i++) lse[i] = -INFINITY;
  return RA_OK;
}

static ra_status cpu_gather(void *ctx, const ra_gather_batch *g) {
  const ra_cpu_backend *cpu = ctx;
  const size_t es = ra_dtype_size(g->dtype), row = (size_t)g->head_dim * es;
#pragma omp parallel for num_threads(cpu->threads) schedule(static)
  for (int64_t i = 0; i < g->ntasks; i++) {
    const ra_copy_task *t = &g->tasks[i];
    for (int64_t r = 0; r < t->count; r++)
      memcpy((char *)g->dst + (size_t)(t->dst + r * g->head_dim) * es,
             (const char *)g->src + (size_t)(t->src + r * g->src_stride) * es, row);
  }
  return RA_OK;
}

static ra_status cpu_attend(void *ctx, const ra_attend_batch *a) {
  const ra_cpu_backend *cpu = ctx;
  const size_t es = ra_dtype_size(a->dtype);
  int64_t max_nq = 0;
  for (int64_t i = 0; i < a->ntasks; i++)
    if (a->tasks[i].nq > max_nq) max_nq = a->tasks[i].nq;
  const int64_t blocks = (max_nq + RA_CPU_BLOCK_Q - 1) / RA_CPU_BLOCK_Q;
  const int64_t items = a->ntasks * blocks;
#pragma omp parallel for num_threads(cpu->threads) schedule(dynamic, 1)
  for (int64_t it = 0; it < items; it++) {
    const ra_attend_task *t = &a->tasks[it / blocks];
    const int64_t q0 = (it % blocks) * RA_CPU_BLOCK_Q;
    if (q0 >= t->nq) continue;
    int tid = 0;
#ifdef _OPENMP
    tid = omp_get_thread_num();
#endif
    const int64_t nq = t->nq - q0 < RA_CPU_BLOCK_Q ? t->nq - q0 : RA_CPU_BLOCK_Q;
    ra_tokens qt = {(const char *)a->q + (size_t)(t->q + q0 * a->q_stride) * es, a->q_stride, nq,
                    t->qpos0 + q0 * a->rate};
    ra_tokens kt = {(const char *)a->k + (size_t)t->k * es, a->k_stride, t->nk, t->kpos0};
    cpu->kern->attend((ra_workspace *)cpu->ws[tid], a->dtype, a->head_dim, a->scale, a->causal, a->rate,
                  qt, kt, (const char *)a->v + (size_t)t->v * es, a->v_stride,
                  a->acc + t->acc + q0 * a->acc_stride, a->acc_stride,
                  a->lse + t->lse + q0 * a->lse_stride, a->lse_stride);
  }
  return RA_OK;
}

/* Accumulator rows (fp32, or double for float64) into o's dtype; the lse
 * has the accumulators' type. */
static ra_status cpu_store(void *ctx, const ra_config *c, int64_t L, const float *acc,
                           const float *lse_state, ra_tensor o, float *lse, int64_t lse_ld) {
  const ra_cpu_backend *cpu = ctx;
  const int64_t H = c->num_heads, d = c->head_dim, rows = c->batch * L * H;
  const size_t es = ra_dtype_size(c->dtype), acc_es = ra_acc_size(c->dtype);
#pragma omp parallel for num_threads(cpu->threads) schedule(static)
  for (int64_t i = 0; i < rows; i++) {
    const int64_t h = i % H, p = (i / H) % L, bb = i / H / L;
    char *dst = (char *)o.data + (size_t)(bb * o.stride_b + p * o.stride_n + h * o.stride_h) * es;
    const char *row = (const char *)acc + (size_t)(i * d) * acc_es;
    if (c->dtype == RA_FLOAT64)
      memcpy(dst, row, sizeof(double) * (size_t)d); /* double accumulators are the output already */
    else
      ra_store_row(dst, c->dtype, (const float *)row, d);
  }
  if (lse)
    for (int64_t bh = 0; bh < c->batch * H; bh++)
      memcpy((char *)lse + (size_t)(bh * lse_ld) * acc_es, (const char *)lse_state + (size_t)(bh * L) * acc_es,
             acc_es * (size_t)L);
  return RA_OK;
}

static ra_status cpu_sync(void *ctx) {
  (void)ctx; /* every CPU operation has finished when it returns */
  return RA_OK;
}

/* ------------------------------------------------------------- backward */

static ra_status cpu_row_dot(void *ctx, const ra_config *c, int64_t L, ra_tensor dout, ra_tensor o,
                             float *delta, int64_t ld) {
  const ra_cpu_backend *cpu = ctx;
  const int64_t H = c->num_heads, d = c->head_dim, rows = c->batch * H * L;
  const size_t es = ra_dtype_size(c->dtype);
#pragma omp parallel for num_threads(cpu->threads) schedule(static)
  for (int64_t i = 0; i < rows; i++) {
    const int64_t p = i % L, h = (i / L) % H, bb = i / L / H;
    float a[512], b[512];
    double sum = 0.0;
    for (int64_t c0 = 0; c0 < d; c0 += 512) {
      const int64_t w = d - c0 < 512 ? d - c0 : 512;
      ra_load_row(a, (const char *)dout.data + (size_t)(bb * dout.stride_b + p * dout.stride_n + h * dout.stride_h + c0) * es, c->dtype, w, 1.0f);
      ra_load_row(b, (const char *)o.data + (size_t)(bb * o.stride_b + p * o.stride_n + h * o.stride_h + c0) * es, c->dtype, w, 1.0f);
      for (int64_t x = 0; x < w; x++) sum += (double)a[x] * b[x];
    }
    delta[(bb * H + h) * ld + p] = (float)sum;
  }
  return RA_OK;
}

/* One pass per task (five products; a task's dq, dk, dv rows are its own)
 * when the tasks keep the threads about as busy as the two passes would
 * (seven products): rounds of tasks * 5 <= tasks * 7 / threads. */
static int backward_one_pass(int64_t ntasks, int64_t threads) {
  return 5 * threads * ((ntasks + threads - 1) / threads) <= 7 * ntasks;
}

/* Otherwise two passes without atomics: dK/dV over (task, key block), then
 * dQ over (task, query block); each recomputes its probabilities from lse. */
static ra_status cpu_attend_backward(void *ctx, const ra_backward_batch *bw) {
  const ra_cpu_backend *cpu = ctx;
  const ra_attend_batch *a = &bw->a;
  const size_t es = ra_dtype_size(a->dtype);
  if (backward_one_pass(a->ntasks, cpu->threads)) {
#pragma omp parallel for num_threads(cpu->threads) schedule(dynamic, 1)
    for (int64_t i = 0; i < a->ntasks; i++) {
      const ra_attend_task *t = &a->tasks[i];
      int tid = 0;
#ifdef _OPENMP
      tid = omp_get_thread_num();
#endif
      ra_tokens q = {(const char *)a->q + (size_t)t->q * es, a->q_stride, t->nq, t->qpos0};
      ra_tokens k = {(const char *)a->k + (size_t)t->k * es, a->k_stride, t->nk, t->kpos0};
      cpu->kern->backward((ra_bwd_workspace *)cpu->bwd_ws[tid], a->dtype, a->head_dim, a->scale, a->causal,
                          a->rate, q, (const char *)bw->dout + (size_t)t->dout * es, bw->dout_stride,
                          a->lse + t->lse, a->lse_stride, bw->delta + t->delta, a->lse_stride, k,
                          (const char *)a->v + (size_t)t->v * es, a->v_stride, a->acc + t->acc, a->acc_stride,
                          bw->dk + t->dkv, bw->dv + t->dkv, bw->dkv_stride);
    }
    return RA_OK;
  }
  int64_t max_nq = 0, max_nk = 0;
  for (int64_t i = 0; i < a->ntasks; i++) {
    if (a->tasks[i].nq > max_nq) max_nq = a->tasks[i].nq;
    if (a->tasks[i].nk > max_nk) max_nk = a->tasks[i].nk;
  }
  for (int pass = 0; pass < 2; pass++) {
    const int64_t block = pass == 0 ? RA_BWD_BLOCK_K : RA_BWD_BLOCK_Q;
    const int64_t blocks = ((pass == 0 ? max_nk : max_nq) + block - 1) / block;
    const int64_t items = a->ntasks * blocks;
#pragma omp parallel for num_threads(cpu->threads) schedule(dynamic, 1)
    for (int64_t it = 0; it < items; it++) {
      const ra_attend_task *t = &a->tasks[it / blocks];
      const int64_t b0 = (it % blocks) * block;
      int tid = 0;
#ifdef _OPENMP
      tid = omp_get_thread_num();
#endif
      ra_bwd_workspace *ws = (ra_bwd_workspace *)cpu->bwd_ws[tid];
      ra_tokens q = {(const char *)a->q + (size_t)t->q * es, a->q_stride, t->nq, t->qpos0};
      ra_tokens k = {(const char *)a->k + (size_t)t->k * es, a->k_stride, t->nk, t->kpos0};
      const char *dout = (const char *)bw->dout + (size_t)t->dout * es;
      const char *v = (const char *)a->v + (size_t)t->v * es;
      const float *lse = a->lse + t->lse, *delta = bw->delta + t->delta;
      if (pass == 0) {
        if (b0 >= t->nk) continue;
        k.ptr = (const char *)k.ptr + (size_t)(b0 * a->k_stride) * es;
        k.count = t->nk - b0 < block ? t->nk - b0 : block;
        k.pos0 += b0 * a->rate;
        cpu->kern->backward_dkdv(ws, a->dtype, a->head_dim, a->scale, a->causal, a->rate, q, dout, bw->dout_stride,
                             lse, a->lse_stride, delta, a->lse_stride, k, v + (size_t)(b0 * a->v_stride) * es,
                             a->v_stride, bw->dk + t->dkv + b0 * bw->dkv_stride,
                             bw->dv + t->dkv + b0 * bw->dkv_stride, bw->dkv_stride);
      } else {
        if (b0 >= t->nq) continue;
        q.ptr = (const char *)q.ptr + (size_t)(b0 * a->q_stride) * es;
        q.count = t->nq - b0 < block ? t->nq - b0 : block;
        q.pos0 += b0 * a->rate;
        cpu->kern->backward_dq(ws, a->dtype, a->head_dim, a->scale, a->causal, a->rate, q,
                           dout + (size_t)(b0 * bw->dout_stride) * es, bw->dout_stride,
                           lse + b0 * a->lse_stride, a->lse_stride, delta + b0 * a->lse_stride, a->lse_stride,
                           k, v, a->v_stride, a->acc + t->acc + b0 * a->acc_stride, a->acc_stride);
      }
    }
  }
  return RA_OK;
}

static ra_status cpu_scatter_add(void *ctx, const ra_scatter_batch *sc) {
  const ra_cpu_backend *cpu = ctx;
#pragma omp parallel for num_threads(cpu->threads) schedule(static)
  for (int64_t i = 0; i < sc->ntasks; i++) {
    const ra_copy_task *t = &sc->tasks[i];
    for (int64_t r = 0; r < t->count; r++) {
      const float *src = sc->src + t->src + r * sc->head_dim;
      float *dst = sc->dst + t->dst + r * sc->dst_stride;
      for (int64_t c = 0; c < sc->head_dim; c++) dst[c] += src[c];
    }
  }
  return RA_OK;
}

static const ra_backend_ops cpu_ops = {"cpu", cpu_alloc, cpu_free, cpu_init_state, cpu_gather,
                                       cpu_attend, cpu_store, cpu_sync, cpu_row_dot,
                                       cpu_attend_backward, cpu_scatter_add};

/* float64: double accumulators (double.c); gather and store are generic. */
static const ra_backend_ops cpu_f64_ops = {"cpu", cpu_alloc, cpu_free, ra_f64_init_state, cpu_gather,
                                           ra_f64_attend, cpu_store, cpu_sync, ra_f64_row_dot,
                                           ra_f64_attend_backward, ra_f64_scatter_add};

/* The kernel workspaces take a few thousand bytes per column of the head
 * dimension (ra_workspace_bytes and the backward's), more than the plan's
 * 128 bytes per element of q: a head dim beyond this bound would make their
 * sizes wrap, so it is refused.  (No attention has heads of 2^40 values.) */
#define RA_CPU_MAX_HEAD_DIM ((int64_t)1 << 40)

static ra_status check_head_dim(int64_t head_dim) {
  if (head_dim < 1 || head_dim > RA_CPU_MAX_HEAD_DIM)
    return ra_fail(RA_ERR_INVALID_ARGUMENT, "q: head dim %lld is more than the CPU kernels can address (at most %lld)",
                   (long long)head_dim, (long long)RA_CPU_MAX_HEAD_DIM);
  return RA_OK;
}

/* ------------------------------------------------------- workspace pool
 *
 * A call's kernel workspaces (one per thread, and the backward's) are kept
 * between calls: allocating and zeroing them each time costs a small call
 * more than its attention.  A set is reused only by a call of the same
 * kind -- kernels (ISA, or float64), head dim, thread count, backward or
 * not -- so it holds exactly the bytes a fresh one would, and the call
 * counts them in its stats while it holds the set (ra_hold / ra_release),
 * as if it had allocated them: peak_bytes does not depend on the cache.
 * Idle sets: at most RA_WS_POOL_SETS and RA_WS_POOL_BYTES in all, least
 * recently used first out; thread-safe; after fork() the child keeps the
 * parent's idle sets (plain memory) and the lock consistent.  The kernels
 * zero a workspace once, when it is made; what a call leaves in it is
 * what the previous tile of the same call would have left. */

#define RA_WS_POOL_SETS 8
#define RA_WS_POOL_BYTES ((size_t)64 << 20)

struct ra_cpu_ws_set {
  struct ra_cpu_ws_set *next; /* in the idle list, most recently used first */
  const void *kind;           /* the kernel table, or &cpu_f64_ops */
  int64_t head_dim;
  int threads;
  size_t ws_bytes, bwd_ws_bytes; /* per thread; 0: no backward workspaces */
  void **ws, **bwd_ws;
};

static struct {
  pthread_mutex_t lock;
  struct ra_cpu_ws_set *idle;
  int count;
  size_t bytes;
} ws_pool = {PTHREAD_MUTEX_INITIALIZER, NULL, 0, 0};

static pthread_once_t ws_pool_once = PTHREAD_ONCE_INIT;
static void ws_pool_lock(void) { pthread_mutex_lock(&ws_pool.lock); }
static void ws_pool_unlock(void) { pthread_mutex_unlock(&ws_pool.lock); }
static void ws_pool_init(void) { pthread_atfork(ws_pool_lock, ws_pool_unlock, ws_pool_unlock); }

static size_t set_bytes(const struct ra_cpu_ws_set *set) {
  return (size_t)set->threads * (set->ws_bytes + set->bwd_ws_bytes);
}

static void set_free(struct ra_cpu_ws_set *set) {
  if (!set) return;
  for (int t = 0; t < set->threads; t++) {
    if (set->ws) ra_free(NULL, set->ws[t], 0);
    if (set->bwd_ws) ra_free(NULL, set->bwd_ws[t], 0);
  }
  free(set->ws);
  free(set->bwd_ws);
  free(set);
}

/* A new set, every workspace initialised by its kernels (NULL if out of memory). */
static struct ra_cpu_ws_set *set_new(const ra_cpu_backend *cpu, const void *kind, int f64) {
  struct ra_cpu_ws_set *set = calloc(1, sizeof *set);
  if (!set) return NULL;
  set->kind = kind;
  set->head_dim = cpu->head_dim;
  set->threads = cpu->threads;
  set->ws_bytes = cpu->ws_bytes;
  set->bwd_ws_bytes = cpu->bwd_ws_bytes;
  set->ws = calloc((size_t)set->threads, sizeof(void *));
  set->bwd_ws = set->bwd_ws_bytes ? calloc((size_t)set->threads, sizeof(void *)) : NULL;
  if (!set->ws || (set->bwd_ws_bytes && !set->bwd_ws)) {
    set_free(set);
    return NULL;
  }
  for (int t = 0; t < set->threads; t++) {
    if (!(set->ws[t] = ra_alloc(NULL, set->ws_bytes)) ||
        (set->bwd_ws && !(set->bwd_ws[t] = ra_alloc(NULL, set->bwd_ws_bytes)))) {
      set_free(set);
      return NULL;
    }
    if (!f64) cpu->kern->workspace_init(set->ws[t], set->head_dim);
    if (set->bwd_ws) cpu->kern->bwd_workspace_init(set->bwd_ws[t], set->head_dim);
  }
  return set;
}

/* An idle set of this kind, taken out of the pool, or NULL. */
static struct ra_cpu_ws_set *pool_take(const ra_cpu_backend *cpu, const void *kind) {
  pthread_once(&ws_pool_once, ws_pool_init);
  ws_pool_lock();
  struct ra_cpu_ws_set **at = &ws_pool.idle, *set = NULL;
  for (; *at; at = &(*at)->next)
    if ((*at)->kind == kind && (*at)->head_dim == cpu->head_dim && (*at)->threads == cpu->threads &&
        (*at)->bwd_ws_bytes == cpu->bwd_ws_bytes) {
      set = *at;
      *at = set->next;
      ws_pool.count--;
      ws_pool.bytes -= set_bytes(set);
      break;
    }
  ws_pool_unlock();
  return set;
}

/* Give a set back: it becomes the most recently used; the least recently
 * used ones beyond the bounds are freed (outside the lock). */
static void pool_give(struct ra_cpu_ws_set *set) {
  struct ra_cpu_ws_set *evicted = NULL;
  ws_pool_lock();
  if (set_bytes(set) <= RA_WS_POOL_BYTES) {
    set->next = ws_pool.idle;
    ws_pool.idle = set;
    ws_pool.count++;
    ws_pool.bytes += set_bytes(set);
    set = NULL;
  }
  while (ws_pool.count > RA_WS_POOL_SETS || ws_pool.bytes > RA_WS_POOL_BYTES) {
    struct ra_cpu_ws_set **last = &ws_pool.idle;
    while ((*last)->next) last = &(*last)->next;
    struct ra_cpu_ws_set *old = *last;
    *last = NULL;
    ws_pool.count--;
    ws_pool.bytes -= set_bytes(old);
    old->next = evicted;
    evicted = old;
  }
  ws_pool_unlock();
  set_free(set); /* too large to keep */
  while (evicted) {
    struct ra_cpu_ws_set *next = evicted->next;
    set_free(evicted);
    evicted = next;
  }
}

size_t ra_cpu_pool_bytes(void) {
  ws_pool_lock();
  const size_t bytes = ws_pool.bytes;
  ws_pool_unlock();
  return bytes;
}

void ra_cpu_pool_clear(void) {
  ws_pool_lock();
  struct ra_cpu_ws_set *set = ws_pool.idle;
  ws_pool.idle = NULL;
  ws_pool.count = 0;
  ws_pool.bytes = 0;
  ws_pool_unlock();
  while (set) {
    struct ra_cpu_ws_set *next = set->next;
    set_free(set);
    set = next;
  }
}

ra_status ra_cpu_backend_open(ra_cpu_backend *cpu, ra_dtype dtype, ra_cpu_isa isa, int threads,
                              int64_t head_dim, int backward, ra_stats *stats, ra_backend *out) {
  const int f64 = dtype == RA_FLOAT64;
  memset(cpu, 0, sizeof *cpu);
  RA_TRY(check_head_dim(head_dim));
  RA_TRY(ra_cpu_kernels_for(isa, &cpu->kern));
  cpu->threads = threads > 0 ? threads : 1;
  cpu->head_dim = head_dim;
  cpu->stats = stats;
  /* the float64 path needs one row of doubles per thread and no backward scratch */
  cpu->ws_bytes = f64 ? ra_f64_workspace_bytes(head_dim) : cpu->kern->workspace_bytes(head_dim);
  cpu->bwd_ws_bytes = backward && !f64 ? cpu->kern->bwd_workspace_bytes(head_dim) : 0;
  const void *kind = f64 ? (const void *)&cpu_f64_ops : (const void *)cpu->kern;
  struct ra_cpu_ws_set *set = pool_take(cpu, kind);
  if (!set && !(set = set_new(cpu, kind, f64)))
    return ra_fail(RA_ERR_OUT_OF_MEMORY, "could not allocate kernel workspaces");
  cpu->set = set;
  cpu->ws = set->ws;
  cpu->bwd_ws = set->bwd_ws;
  ra_hold(stats, (int64_t)set_bytes(set)); /* this call holds them, cached or not */
  out->ops = f64 ? &cpu_f64_ops : &cpu_ops;
  out->ctx = cpu;
  return RA_OK;
}

void ra_cpu_backend_close(ra_cpu_backend *cpu) {
  if (!cpu->set) return;
  ra_release(cpu->stats, (int64_t)set_bytes(cpu->set));
  pool_give(cpu->set);
  cpu->set = NULL;
  cpu->ws = cpu->bwd_ws = NULL;
}

/* ------------------------------------------------------------ interface */

static ra_status cpu_supports(const ra_call *call) {
  const ra_cpu_kernels *kern;
  RA_TRY(ra_cpu_kernels_for(call->p.fwd.exec.cpu_isa, &kern)); /* before any rank starts */
  return check_head_dim(call->p.fwd.cfg.head_dim);
}

/* The core's only NaN/Inf scan: the inputs this process holds, before any
 * rank starts and before a communicator's agreement. */
static ra_status cpu_check_inputs(const ra_call *call) {
  const ra_fwd_params *f = &call->p.fwd;
  if (!f->exec.check_finite) return RA_OK;
  const ra_config *c = &f->cfg;
  const ra_tensor in[4] = {f->q, f->k, f->v, call->p.dout};
  static const char *const names[4] = {"q", "k", "v", "dout"};
  const int64_t heads[4] = {c->num_heads, c->num_kv_heads > 0 ? c->num_kv_heads : c->num_heads,
                            c->num_kv_heads > 0 ? c->num_kv_heads : c->num_heads, c->num_heads};
  for (int i = 0; i < (call->backward ? 4 : 3); i++)
    if (!ra_tensor_finite(in[i], c->dtype, c->batch, call->rows, heads[i], c->head_dim, f->exec.num_threads))
      return ra_fail(RA_ERR_NONFINITE, "%s contains NaN or Inf (nan_policy=\"raise\")", names[i]);
  return RA_OK;
}

static ra_status cpu_rank_open(void *shared, const ra_call *rank_call, ra_backend *out) {
  (void)shared;
  const ra_fwd_params *f = &rank_call->p.fwd;
  ra_cpu_backend *cpu = malloc(sizeof *cpu);
  if (!cpu) return ra_fail(RA_ERR_OUT_OF_MEMORY, "could not allocate a CPU backend");
  ra_status st = ra_cpu_backend_open(cpu, f->cfg.dtype, f->exec.cpu_isa, f->exec.num_threads, f->cfg.head_dim, rank_call->backward,
                                     f->stats, out);
  if (st != RA_OK) free(cpu);
  return st;
}

static void cpu_rank_close(ra_backend *be) {
  ra_cpu_backend_close(be->ctx);
  free(be->ctx);
}

static const ra_backend_iface cpu_iface = {"cpu", cpu_supports, cpu_check_inputs, NULL, NULL,
                                           cpu_rank_open, cpu_rank_close, NULL};

const ra_backend_iface *ra_cpu_backend_iface(void) { return &cpu_iface; }
