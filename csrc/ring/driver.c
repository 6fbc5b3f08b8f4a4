/*
 * driver.c -- one rank's share of ring dilated attention.
 *
 * Rank j holds positions [jL, (j+1)L) of q, k, v and o.  It keeps one
 * accumulator row and one log-sum-exp per (batch, position, head) -- fp32,
 * or double for float64 inputs (ra_acc_size) -- and, for
 * each branch, merges into them the attention of its queries over every
 * key block it may see:
 *
 *  - a *local* branch (L % S == 0) has whole segments inside the shard:
 *    one block, no communication;
 *  - a *spanning* branch (S % L == 0) has segments over m = S/L consecutive
 *    ranks, which form a sub-ring.  Each rank packs only the keys/values
 *    active in the branch's cells, and the packed blocks travel the
 *    sub-ring (send to the next rank, receive from the previous) for m - 1
 *    steps, double-buffered so the next block is in flight while the
 *    current one is computed.
 *
 * With causality a rank sees no key of a later rank, so at step s only the
 * ranks at sub-ring position >= s compute, and a block is forwarded only
 * while somebody downstream still needs it: the ring becomes a pipeline and
 * the wrap-around link carries nothing.
 *
 * This file decides what to compute and what to move; the backend (CPU or
 * CUDA) computes, the transport (in-process, MPI, NCCL) moves.  It never
 * indexes the accumulators itself: their pointers are bases for the
 * backend, and any arithmetic on them here is in bytes of ra_acc_size.
 *
 * Sizes: every size it allocates or moves (accumulators, task lists, ring
 * blocks, the bytes held) is computed with the checked helpers of
 * internal.h once, in rank_sizes() and packed_layout(); the offsets of
 * tasks and copies are below those totals, or below the tensor spans the
 * entry point checked (ra_tensor_span_ok), so none of them can wrap.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ring/driver.h"

/* Everything one rank needs during a call. */
typedef struct rank_ctx {
  const ra_call *call;
  const ra_plan *plan;
  const ra_config *cfg;
  const ra_transport *tr;
  const ra_backend *be;
  ra_stats *stats;
  ra_tensor q, k, v;
  int64_t L, start;      /* local length and first global position */
  size_t acc_es;         /* bytes of an accumulator / lse element    */
  float *acc, *lse;      /* [b][L][h][d] and [b][h][lse_ld], backend memory */
  int64_t lse_ld;
  /* backward only: acc is dQ, lse the forward's final lse */
  ra_tensor dout;
  const float *delta;    /* [b][h][lse_ld] */
  float *dk, *dv;        /* [b][L][h][d] accumulators of the shard's own keys */
  ra_attend_task *tasks; /* scratch for one step's task list          */
  ra_copy_task *copies;  /* scratch for one block's packing list       */
  int64_t *tables;       /* per-head layouts of two blocks (6 h)        */
  size_t task_bytes, copy_bytes, table_bytes;
  int64_t n_acc, n_rows; /* elements of an accumulator, of an lse      */
  size_t acc_bytes, row_bytes;
  int64_t held;          /* caller-owned bytes counted for this rank    */
} rank_ctx;

/* Where the keys/values of each head of a branch are read from: token t of
 * head hh in batch bb is at k + bb*k_stride_b + k_at[hh] + t*k_stride_t
 * (and likewise for v, whose strides may differ from k's). */
typedef struct kv_source {
  const void *k, *v;
  int64_t k_stride_b, v_stride_b, k_stride_t, v_stride_t;
  int64_t k_window, v_window; /* elements between the first tokens of windows */
  const int64_t *k_at, *v_at, *count, *pos0;
  /* backward: dK/dV accumulators of these keys (accumulator elements) */
  float *dk, *dv;
  int64_t dkv_stride_b, dkv_stride_t, dkv_window;
  const int64_t *dkv_at;
} kv_source;

/* --------------------------------------------------- counted backend memory */

static void *be_alloc(rank_ctx *r, size_t bytes) {
  void *p = r->be->ops->alloc(r->be->ctx, bytes);
  if (p) ra_hold(r->stats, (int64_t)bytes);
  return p;
}

static void be_free(rank_ctx *r, void *p, size_t bytes) {
  if (!p) return;
  r->be->ops->free(r->be->ctx, p);
  ra_release(r->stats, (int64_t)bytes);
}

/* ------------------------------------------------------------- computing */

/* Attend this rank's active queries of `branch` in the windows
 * [w*wlen, (w+1)*wlen) (w < nwin; each inside one segment) to the
 * keys/values of `src`: one task per (batch, head, window). */
static ra_status attend_block(rank_ctx *r, int branch, int64_t wlen, int64_t nwin,
                              const kv_source *src, int backward) {
  const ra_config *c = r->cfg;
  const ra_branch_info *bi = &r->plan->branch[branch];
  const int64_t H = c->num_heads, d = c->head_dim, rate = bi->rate;
  const int64_t hb = bi->head_end - bi->head_begin;
  int64_t n = 0;
  for (int64_t bb = 0; bb < c->batch; bb++)
    for (int64_t hh = 0; hh < hb; hh++) {
      const int64_t h = bi->head_begin + hh, off = r->plan->offset[branch * H + h];
      for (int64_t w = 0; w < nwin; w++) {
        const ra_run run = ra_active_run(bi->segment, rate, off, r->start + w * wlen, wlen);
        if (run.count == 0 || src->count[hh] == 0) continue;
        const int64_t lpos = w * wlen + run.first; /* local position of query 0 */
        ra_attend_task *t = &r->tasks[n++];
        t->q = bb * r->q.stride_b + lpos * r->q.stride_n + h * r->q.stride_h;
        t->k = bb * src->k_stride_b + src->k_at[hh] + w * src->k_window;
        t->v = bb * src->v_stride_b + src->v_at[hh] + w * src->v_window;
        t->acc = ((bb * r->L + lpos) * H + h) * d;
        t->lse = (bb * H + h) * r->lse_ld + lpos;
        t->nq = run.count;
        t->nk = src->count[hh];
        t->qpos0 = r->start + lpos;
        t->kpos0 = src->pos0[hh] + w * wlen;
        t->dout = bb * r->dout.stride_b + lpos * r->dout.stride_n + h * r->dout.stride_h;
        t->dkv = backward ? bb * src->dkv_stride_b + src->dkv_at[hh] + w * src->dkv_window : 0;
        t->delta = (bb * H + h) * r->L + lpos;
      }
    }
  if (n == 0) return RA_OK;
  ra_attend_batch a = {c->dtype, d, (float)c->scale, c->causal, rate,
                       r->q.data, src->k, src->v,
                       rate * r->q.stride_n, src->k_stride_t, src->v_stride_t,
                       r->acc, r->lse, rate * H * d, rate,
                       r->tasks, n, c->scale};
  if (!backward) return r->be->ops->attend(r->be->ctx, &a);
  ra_backward_batch bw = {a, r->dout.data, rate * r->dout.stride_n, r->delta, src->dk, src->dv,
                          src->dkv_stride_t};
  return r->be->ops->attend_backward(r->be->ctx, &bw);
}

/* A local branch: every segment of the shard attends to itself. */
static ra_status run_local_branch(rank_ctx *r, int branch, int64_t *tables, int backward) {
  const ra_branch_info *bi = &r->plan->branch[branch];
  const int64_t H = r->cfg->num_heads, d = r->cfg->head_dim, hb = bi->head_end - bi->head_begin;
  int64_t *k_at = tables, *v_at = tables + hb, *count = tables + 2 * hb, *pos0 = tables + 3 * hb;
  int64_t *dkv_at = tables + 4 * hb; /* backward: the shard's own dK/dV rows, laid out like the accumulator */
  for (int64_t hh = 0; hh < hb; hh++) {
    const int64_t h = bi->head_begin + hh;
    const ra_run run = ra_active_run(bi->segment, bi->rate, r->plan->offset[branch * H + h], r->start, bi->segment);
    k_at[hh] = run.first * r->k.stride_n + h * r->k.stride_h;
    v_at[hh] = run.first * r->v.stride_n + h * r->v.stride_h;
    count[hh] = run.count;
    pos0[hh] = r->start + run.first;
    dkv_at[hh] = run.first * H * d + h * d;
  }
  kv_source src = {r->k.data, r->v.data, r->k.stride_b, r->v.stride_b, bi->rate * r->k.stride_n,
                   bi->rate * r->v.stride_n, bi->segment * r->k.stride_n, bi->segment * r->v.stride_n,
                   k_at, v_at, count, pos0,
                   r->dk, r->dv, r->L * H * d, bi->rate * H * d, bi->segment * H * d, dkv_at};
  r->stats->steps++;
  return attend_block(r, branch, bi->segment, r->L / bi->segment, &src, backward);
}

/* ------------------------------------------------------------- packing */

/* Layout of a packed block of a branch from the rank whose shard starts at
 * `start`: for each batch, for each head of the branch, its active keys;
 * then the same for values.  Returns the block's size in elements, -1 if
 * it does not fit an int64_t. */
static int64_t packed_layout(const rank_ctx *r, int branch, int64_t start,
                             int64_t *at, int64_t *count, int64_t *pos0) {
  const ra_branch_info *bi = &r->plan->branch[branch];
  const int64_t H = r->cfg->num_heads, d = r->cfg->head_dim;
  int64_t per_batch = 0, rows, elems;
  for (int64_t h = bi->head_begin; h < bi->head_end; h++) {
    const int64_t hh = h - bi->head_begin;
    const ra_run run = ra_active_run(bi->segment, bi->rate, r->plan->offset[branch * H + h], start, r->L);
    at[hh] = per_batch;
    count[hh] = run.count;
    pos0[hh] = start + run.first;
    if (!ra_mul_ok(run.count, d, &rows) || !ra_add_ok(per_batch, rows, &per_batch)) return -1;
  }
  return ra_mul_ok(per_batch, r->cfg->batch, &elems) && ra_mul_ok(elems, 2, &elems) ? elems : -1;
}

/* The packed block as a key/value source.  In the backward a block carries
 * its dK/dV accumulators (accumulator elements, laid out like the keys)
 * after the values. */
static kv_source packed_source(const rank_ctx *r, void *buf, int64_t elems,
                               const int64_t *at, const int64_t *count, const int64_t *pos0) {
  const int64_t B = r->cfg->batch, per_batch = elems / (2 * B);
  const size_t es = ra_dtype_size(r->cfg->dtype), half = (size_t)(B * per_batch); /* keys, or values */
  char *grads = (char *)buf + 2 * half * es;
  kv_source src = {buf, (char *)buf + half * es,
                   per_batch, per_batch, r->cfg->head_dim, r->cfg->head_dim, 0, 0, at, at, count, pos0,
                   (float *)grads, (float *)(grads + half * r->acc_es), per_batch, r->cfg->head_dim, 0, at};
  return src;
}

/* Bytes of a packed block of `elems` key+value elements (with dK/dV in the
 * backward); 0 when they do not fit.  Every block of a sub-ring is at most
 * the one alloc_ring_buffers sized, so only that call can see 0. */
static int64_t block_bytes(const rank_ctx *r, int64_t elems, int backward) {
  size_t bytes;
  return ra_bytes_ok(elems, ra_dtype_size(r->cfg->dtype) + (backward ? r->acc_es : 0), &bytes) ? (int64_t)bytes : 0;
}

/* Gather this rank's active keys and values of a branch into buf. */
static ra_status pack_block(rank_ctx *r, int branch, void *buf, int64_t elems,
                            const int64_t *at, const int64_t *count, const int64_t *pos0) {
  const ra_branch_info *bi = &r->plan->branch[branch];
  const int64_t B = r->cfg->batch, hb = bi->head_end - bi->head_begin;
  const int64_t per_batch = elems / (2 * B);
  const size_t es = ra_dtype_size(r->cfg->dtype);
  for (int pass = 0; pass < 2; pass++) {
    const ra_tensor *t = pass == 0 ? &r->k : &r->v;
    int64_t n = 0;
    for (int64_t bb = 0; bb < B; bb++)
      for (int64_t hh = 0; hh < hb; hh++) {
        ra_copy_task *c = &r->copies[n++];
        c->src = bb * t->stride_b + (pos0[hh] - r->start) * t->stride_n + (bi->head_begin + hh) * t->stride_h;
        c->dst = bb * per_batch + at[hh];
        c->count = count[hh];
      }
    ra_gather_batch g = {r->cfg->dtype, r->cfg->head_dim, t->data, bi->rate * t->stride_n,
                         (char *)buf + (size_t)(pass * B * per_batch) * es, r->copies, n};
    RA_TRY(r->be->ops->gather(r->be->ctx, &g));
  }
  return r->be->ops->sync(r->be->ctx);
}

/* ------------------------------------------------------------ the ring */

/* The two ring buffers of a spanning branch, each as large as the largest
 * block any rank of the sub-ring sends (keys and values, and dK/dV in the
 * backward).  `scratch` is room for three tables of the branch's heads.
 * *cap_bytes <- the bytes of one buffer. */
static ra_status alloc_ring_buffers(rank_ctx *r, int branch, int64_t group0, int backward,
                                    int64_t *scratch, void *buf[2], size_t *cap_bytes) {
  const ra_branch_info *bi = &r->plan->branch[branch];
  const int64_t hb = bi->head_end - bi->head_begin;
  int64_t cap = 0;
  buf[0] = buf[1] = NULL;
  for (int64_t p = 0; p < bi->span; p++) {
    int64_t e = packed_layout(r, branch, (group0 + p) * r->L, scratch, scratch + hb, scratch + 2 * hb);
    if (e < 0) cap = -1;
    if (cap >= 0 && e > cap) cap = e;
  }
  const size_t bytes = cap < 0 ? 0 : (size_t)block_bytes(r, cap, backward);
  if (cap < 0 || (cap > 0 && !bytes))
    return ra_fail(RA_ERR_INVALID_ARGUMENT,
                   "the ring blocks of segment_lengths[%d] are larger than this machine can address", branch);
  buf[0] = be_alloc(r, bytes);
  buf[1] = be_alloc(r, bytes);
  if (buf[0] && buf[1]) {
    *cap_bytes = bytes;
    return RA_OK;
  }
  be_free(r, buf[0], bytes);
  be_free(r, buf[1], bytes);
  buf[0] = buf[1] = NULL;
  return ra_fail(RA_ERR_OUT_OF_MEMORY, "could not allocate the ring buffers of rank %d", r->tr->rank);
}

/* Does sub-ring position p receive a block at step s (1 <= s < m)?  With
 * causality only blocks from earlier positions are useful. */
static int receives(int causal, int64_t p, int64_t s, int64_t m) {
  return s < m && (!causal || s <= p);
}

/* Start step s's exchange: send the current block on, receive the next.
 * *sending / *receiving say which operations are in flight afterwards. */
static ra_status exchange_start(rank_ctx *r, int tag, int64_t pos, int64_t m, int64_t s,
                                int64_t group0, const void *cur, int64_t cur_bytes,
                                void *nxt, int64_t nxt_bytes, ra_request *sreq,
                                ra_request *rreq, int *sending, int *receiving) {
  const ra_transport *tr = r->tr;
  if (receives(r->cfg->causal, (pos + 1) % m, s, m)) {
    RA_TRY(tr->ops->isend(tr->ctx, cur, (size_t)cur_bytes, (int)(group0 + (pos + 1) % m), tag, sreq));
    *sending = 1;
    r->stats->bytes_sent += cur_bytes;
  }
  if (receives(r->cfg->causal, pos, s, m)) {
    RA_TRY(tr->ops->irecv(tr->ctx, nxt, (size_t)nxt_bytes, (int)(group0 + (pos + m - 1) % m), tag, rreq));
    *receiving = 1;
    r->stats->bytes_received += nxt_bytes;
  }
  return RA_OK;
}

/* One spanning branch's sub-ring as this rank sees it: its position, the
 * two block buffers with the layout of the block each holds, and the
 * transfers in flight.  Shared by the forward and the backward. */
typedef struct ring_walk {
  int branch, backward;
  int64_t m, pos, group0;
  void *buf[2];
  size_t cap_bytes;
  int64_t elems[2];                    /* elements of the block in buf[i] */
  int64_t *at[2], *count[2], *pos0[2]; /* its per-head layout            */
  int cur, sending, receiving;
  ra_request sreq, rreq;
} ring_walk;

/* Place this rank in the sub-ring, allocate the buffers and pack its own
 * block into buf[0] (with zeroed dK/dV accumulators in the backward). */
static ra_status walk_open(rank_ctx *r, int branch, int backward, int64_t *tables, ring_walk *w) {
  const ra_branch_info *bi = &r->plan->branch[branch];
  const int64_t hb = bi->head_end - bi->head_begin;
  memset(w, 0, sizeof *w);
  w->branch = branch;
  w->backward = backward;
  w->m = bi->span;
  w->pos = r->tr->rank % w->m;
  w->group0 = r->tr->rank - w->pos;
  for (int i = 0; i < 2; i++) {
    w->at[i] = tables + 3 * i * hb;
    w->count[i] = w->at[i] + hb;
    w->pos0[i] = w->at[i] + 2 * hb;
  }
  RA_TRY(alloc_ring_buffers(r, branch, w->group0, backward, w->at[1], w->buf, &w->cap_bytes));
  w->elems[0] = packed_layout(r, branch, r->start, w->at[0], w->count[0], w->pos0[0]);
  if (backward) {
    kv_source own = packed_source(r, w->buf[0], w->elems[0], w->at[0], w->count[0], w->pos0[0]);
    RA_TRY(r->be->ops->init_state(r->be->ctx, own.dk, w->elems[0], NULL, 0));
  }
  return pack_block(r, branch, w->buf[0], w->elems[0], w->at[0], w->count[0], w->pos0[0]);
}

/* Lay out the other buffer for the block this rank receives at step s+1. */
static void walk_layout_next(rank_ctx *r, ring_walk *w, int64_t s) {
  const int n = 1 - w->cur;
  const int64_t from = (w->pos - (s + 1) + 2 * w->m) % w->m; /* origin of the next block */
  w->elems[n] = packed_layout(r, w->branch, (w->group0 + from) * r->L, w->at[n], w->count[n], w->pos0[n]);
}

static kv_source walk_source(const rank_ctx *r, const ring_walk *w, int i) {
  return packed_source(r, w->buf[i], w->elems[i], w->at[i], w->count[i], w->pos0[i]);
}

static int64_t walk_bytes(const rank_ctx *r, const ring_walk *w, int i) {
  return block_bytes(r, w->elems[i], w->backward);
}

/* Attend this rank's queries to the current block, unless causality hides it. */
static ra_status walk_attend(rank_ctx *r, ring_walk *w, int64_t s) {
  if (r->cfg->causal && s > w->pos) {
    r->stats->steps_skipped++;
    return RA_OK;
  }
  const kv_source src = walk_source(r, w, w->cur);
  r->stats->steps++;
  return attend_block(r, w->branch, r->L, 1, &src, w->backward);
}

/* Wait for the step's transfers: receive before send, since a send may
 * complete only when its receiver waits. */
static ra_status walk_wait(rank_ctx *r, ring_walk *w) {
  ra_status st = RA_OK;
  if (w->receiving && (w->receiving = 0, st = r->tr->ops->wait(r->tr->ctx, &w->rreq)) != RA_OK) return st;
  if (w->sending && (w->sending = 0, st = r->tr->ops->wait(r->tr->ctx, &w->sreq)) != RA_OK) return st;
  return RA_OK;
}

/* Finish a walk: after a failure with transfers in flight, tell the peers
 * and let the transport finish them before the buffers go. */
static ra_status walk_close(rank_ctx *r, ring_walk *w, ra_status st) {
  if (w->sending || w->receiving) {
    if (r->tr->ops->abort) r->tr->ops->abort(r->tr->ctx);
    if (w->receiving) r->tr->ops->wait(r->tr->ctx, &w->rreq);
    if (w->sending) r->tr->ops->wait(r->tr->ctx, &w->sreq);
  }
  be_free(r, w->buf[0], w->cap_bytes);
  be_free(r, w->buf[1], w->cap_bytes);
  return st;
}

static ra_status run_spanning_branch(rank_ctx *r, int branch, int64_t *tables) {
  ring_walk w;
  ra_status st = walk_open(r, branch, 0, tables, &w);
  for (int64_t s = 0; s < w.m && st == RA_OK; s++) {
    if (s + 1 < w.m) {
      walk_layout_next(r, &w, s);
      st = exchange_start(r, branch, w.pos, w.m, s + 1, w.group0, w.buf[w.cur], walk_bytes(r, &w, w.cur),
                          w.buf[1 - w.cur], walk_bytes(r, &w, 1 - w.cur), &w.sreq, &w.rreq, &w.sending,
                          &w.receiving);
    }
    /* An asynchronous backend is still computing on buf[cur] while the
     * transport moves data (reading buf[cur], writing buf[1-cur]); the sync
     * makes sure it is done before the next step's receive overwrites
     * buf[cur]. */
    if (st == RA_OK) st = walk_attend(r, &w, s);
    if (st == RA_OK) st = walk_wait(r, &w);
    if (st == RA_OK) st = r->be->ops->sync(r->be->ctx);
    if (s + 1 < w.m) w.cur = 1 - w.cur;
  }
  return walk_close(r, &w, st);
}

/* Every size a rank allocates or counts, checked once (internal.h):
 * accumulator and lse elements and bytes, the task lists (one step has at
 * most b * h * windows-per-shard tasks), the per-head tables, the largest
 * ring block (2 b L h d elements with their dK/dV), and the caller's
 * shards counted as held: q, k, v, o (and lse), or in the backward q, k,
 * v, o, dout, dq, dk, dv and lse. */
static ra_status rank_sizes(rank_ctx *r, int backward, int with_lse) {
  const ra_config *c = r->cfg;
  const int64_t es = (int64_t)ra_dtype_size(c->dtype), acc_es = (int64_t)r->acc_es;
  int64_t max_windows = 1, n_tasks, n_copies, n_tables, shard, shards, lse, block;
  for (int b = 0; b < c->num_branches; b++)
    if (r->plan->branch[b].span == 1 && r->L / r->plan->branch[b].segment > max_windows)
      max_windows = r->L / r->plan->branch[b].segment;
  const int ok = ra_mul4_ok(c->batch, r->L, c->num_heads, c->head_dim, &r->n_acc) &&
                 ra_mul4_ok(c->batch, c->num_heads, r->L, 1, &r->n_rows) &&
                 ra_bytes_ok(r->n_acc, r->acc_es, &r->acc_bytes) && ra_bytes_ok(r->n_rows, r->acc_es, &r->row_bytes) &&
                 ra_mul4_ok(c->batch, c->num_heads, max_windows, 1, &n_tasks) &&
                 ra_bytes_ok(n_tasks, sizeof(ra_attend_task), &r->task_bytes) &&
                 ra_mul_ok(c->batch, c->num_heads, &n_copies) &&
                 ra_bytes_ok(n_copies, sizeof(ra_copy_task), &r->copy_bytes) &&
                 ra_mul_ok(6, c->num_heads, &n_tables) && ra_bytes_ok(n_tables, sizeof(int64_t), &r->table_bytes) &&
                 ra_mul4_ok(2, r->n_acc, es + (backward ? acc_es : 0), 1, &block) &&
                 ra_mul4_ok(backward ? 8 : 4, r->n_acc, es, 1, &shards) &&
                 ra_mul_ok(r->n_rows, with_lse ? acc_es : 0, &lse) && ra_add_ok(shards, lse, &shard);
  if (!ok)
    return ra_fail(RA_ERR_INVALID_ARGUMENT,
                   "q: shape (%lld, %lld, %lld, %lld) needs more memory per rank than this machine can address",
                   (long long)c->batch, (long long)c->seq_len, (long long)c->num_heads, (long long)c->head_dim);
  r->held = shard;
  return RA_OK;
}

/* What the forward and the backward of a rank share: the context, its
 * sizes, the caller's shards counted as held, and the scratch for task
 * lists and block layouts. */
static ra_status rank_open(rank_ctx *r, const ra_call *call, const ra_transport *tr, const ra_backend *be,
                           int with_lse) {
  const ra_plan *plan = call->plan;
  const ra_config *c = &plan->cfg;
  memset(r, 0, sizeof *r);
  r->call = call;
  r->plan = plan;
  r->cfg = c;
  r->tr = tr;
  r->be = be;
  r->stats = call->p.fwd.stats;
  r->q = call->p.fwd.q;
  r->k = call->p.fwd.k;
  r->v = call->p.fwd.v;
  r->L = r->lse_ld = plan->local_len;
  r->start = (int64_t)tr->rank * r->L;
  r->acc_es = ra_acc_size(c->dtype);
  RA_TRY(rank_sizes(r, call->backward, with_lse)); /* held stays 0 on failure */
  ra_hold(r->stats, r->held);
  r->tables = malloc(r->table_bytes); /* O(h), not counted */
  r->tasks = ra_alloc(r->stats, r->task_bytes);
  r->copies = ra_alloc(r->stats, r->copy_bytes);
  if (!r->tables || !r->tasks || !r->copies)
    return ra_fail(RA_ERR_OUT_OF_MEMORY, "could not allocate the task lists of rank %d", tr->rank);
  return RA_OK;
}

static void rank_close(rank_ctx *r) {
  ra_free(r->stats, r->copies, r->copy_bytes);
  ra_free(r->stats, r->tasks, r->task_bytes);
  free(r->tables);
  ra_release(r->stats, r->held);
}

/* ------------------------------------------------------------ backward */

/* The backward of a spanning branch.  Each block travels the whole sub-ring
 * with its dK/dV accumulators, which every rank it visits adds to, and
 * after m transfers arrives home complete.  The next block is received
 * while the current one is computed; the current one is sent on only once
 * its gradients are updated.  (Causality saves compute here, not traffic:
 * every block makes the full loop home.) */
static ra_status run_spanning_backward(rank_ctx *r, int branch, int64_t *tables) {
  const ra_branch_info *bi = &r->plan->branch[branch];
  const int64_t hb = bi->head_end - bi->head_begin, H = r->cfg->num_heads, d = r->cfg->head_dim;
  ring_walk w;
  ra_status st = walk_open(r, branch, 1, tables, &w);
  const int prev = (int)(w.group0 + (w.pos + w.m - 1) % w.m), next = (int)(w.group0 + (w.pos + 1) % w.m);
  for (int64_t s = 0; s < w.m && st == RA_OK; s++) {
    walk_layout_next(r, &w, s);
    const int nxt = 1 - w.cur;
    st = r->tr->ops->irecv(r->tr->ctx, w.buf[nxt], (size_t)walk_bytes(r, &w, nxt), prev, branch, &w.rreq);
    if (st != RA_OK) break;
    w.receiving = 1;
    r->stats->bytes_received += walk_bytes(r, &w, nxt);
    st = walk_attend(r, &w, s);
    if (st == RA_OK) st = r->be->ops->sync(r->be->ctx); /* dK/dV of the block are final here */
    if (st == RA_OK)
      st = r->tr->ops->isend(r->tr->ctx, w.buf[w.cur], (size_t)walk_bytes(r, &w, w.cur), next, branch, &w.sreq);
    if (st != RA_OK) break;
    w.sending = 1;
    r->stats->bytes_sent += walk_bytes(r, &w, w.cur);
    st = walk_wait(r, &w);
    w.cur = nxt;
  }

  /* Home: buf[cur] is this rank's own block with every rank's contribution. */
  if (st == RA_OK) {
    const kv_source home = walk_source(r, &w, w.cur);
    int64_t n = 0;
    for (int64_t bb = 0; bb < r->cfg->batch; bb++)
      for (int64_t hh = 0; hh < hb; hh++) {
        ra_copy_task *t = &r->copies[n++];
        t->src = bb * home.dkv_stride_b + w.at[w.cur][hh];
        t->dst = ((bb * r->L + (w.pos0[w.cur][hh] - r->start)) * H + bi->head_begin + hh) * d;
        t->count = w.count[w.cur][hh];
      }
    ra_scatter_batch sk = {d, home.dk, r->dk, bi->rate * H * d, r->copies, n};
    ra_scatter_batch sv = {d, home.dv, r->dv, bi->rate * H * d, r->copies, n};
    if ((st = r->be->ops->scatter_add(r->be->ctx, &sk)) == RA_OK) st = r->be->ops->scatter_add(r->be->ctx, &sv);
    if (st == RA_OK) st = r->be->ops->sync(r->be->ctx);
  }
  return walk_close(r, &w, st);
}

/* The backward of one rank: dq, dk, dv from q, k, v, o, dout and the
 * forward's final lse. */
static ra_status ring_backward(const ra_call *call, const ra_transport *tr, const ra_backend *be) {
  const ra_bwd_params *p = &call->p;
  const ra_plan *plan = call->plan;
  if (!be->ops->attend_backward || !be->ops->row_dot || !be->ops->scatter_add)
    return ra_fail(RA_ERR_UNSUPPORTED, "the %s backend has no backward", be->ops->name);
  const ra_config *c = &plan->cfg;
  const int64_t L = plan->local_len;
  rank_ctx r;
  ra_status st = rank_open(&r, call, tr, be, 1);
  const size_t acc_bytes = r.acc_bytes, delta_bytes = r.row_bytes; /* 0 when rank_open failed */
  r.dout = p->dout;
  r.lse = p->fwd.lse; /* read only in the backward; an opaque base (doubles for float64) */
  r.lse_ld = p->fwd.lse_ld;
  float *delta = NULL;
  if (st == RA_OK) {
    r.acc = be_alloc(&r, acc_bytes);
    r.dk = be_alloc(&r, acc_bytes);
    r.dv = be_alloc(&r, acc_bytes);
    r.delta = delta = be_alloc(&r, delta_bytes);
    if (!r.acc || !r.dk || !r.dv || !delta)
      st = ra_fail(RA_ERR_OUT_OF_MEMORY, "could not allocate the gradient accumulators of rank %d", tr->rank);
  }
  const int64_t n_acc = r.n_acc;
  if (st == RA_OK && (st = be->ops->init_state(be->ctx, r.acc, n_acc, NULL, 0)) == RA_OK &&
      (st = be->ops->init_state(be->ctx, r.dk, n_acc, NULL, 0)) == RA_OK &&
      (st = be->ops->init_state(be->ctx, r.dv, n_acc, NULL, 0)) == RA_OK)
    st = be->ops->row_dot(be->ctx, c, L, p->dout, p->fwd.o, delta, L);
  for (int b = 0; b < c->num_branches && st == RA_OK; b++)
    st = plan->branch[b].span == 1 ? run_local_branch(&r, b, r.tables, 1) : run_spanning_backward(&r, b, r.tables);
  if (st == RA_OK) st = be->ops->store(be->ctx, c, L, r.acc, NULL, p->dq, NULL, 0);
  if (st == RA_OK) st = be->ops->store(be->ctx, c, L, r.dk, NULL, p->dk, NULL, 0);
  if (st == RA_OK) st = be->ops->store(be->ctx, c, L, r.dv, NULL, p->dv, NULL, 0);
  if (st == RA_OK) st = be->ops->sync(be->ctx);
  be_free(&r, delta, delta_bytes);
  be_free(&r, r.dv, acc_bytes);
  be_free(&r, r.dk, acc_bytes);
  be_free(&r, r.acc, acc_bytes);
  rank_close(&r);
  return st;
}

/* ------------------------------------------------------------- forward */

static ra_status ring_forward(const ra_call *call, const ra_transport *tr, const ra_backend *be) {
  const ra_fwd_params *p = &call->p.fwd;
  const ra_plan *plan = call->plan;
  const ra_config *c = &plan->cfg;
  const int64_t L = plan->local_len;
  rank_ctx r;
  ra_status st = rank_open(&r, call, tr, be, p->lse != NULL);
  const size_t acc_bytes = r.acc_bytes, lse_bytes = r.row_bytes; /* 0 when rank_open failed */
  if (st == RA_OK) {
    r.acc = be_alloc(&r, acc_bytes);
    r.lse = be_alloc(&r, lse_bytes);
    if (!r.acc || !r.lse) st = ra_fail(RA_ERR_OUT_OF_MEMORY, "could not allocate the accumulators of rank %d", tr->rank);
  }
  if (st == RA_OK) st = be->ops->init_state(be->ctx, r.acc, r.n_acc, r.lse, r.n_rows);
  for (int b = 0; b < c->num_branches && st == RA_OK; b++)
    st = plan->branch[b].span == 1 ? run_local_branch(&r, b, r.tables, 0) : run_spanning_branch(&r, b, r.tables);
  if (st == RA_OK) st = be->ops->store(be->ctx, c, L, r.acc, r.lse, p->o, p->lse, p->lse_ld);
  if (st == RA_OK) st = be->ops->sync(be->ctx);
  be_free(&r, r.lse, lse_bytes);
  be_free(&r, r.acc, acc_bytes);
  rank_close(&r);
  return st;
}

/* --------------------------------------------------------------- entry */

/* What the driver itself relies on (the entry point has validated the
 * call; this only keeps a bad internal caller from touching memory). */
static ra_status check_rank(const ra_call *call, const ra_transport *tr, const ra_backend *be) {
  if (!call || !call->plan) return ra_fail(RA_ERR_INVALID_ARGUMENT, "plan is NULL");
  if (!tr || !tr->ops) return ra_fail(RA_ERR_INVALID_ARGUMENT, "transport is NULL");
  if (!be || !be->ops) return ra_fail(RA_ERR_INVALID_ARGUMENT, "backend is NULL");
  if (!call->p.fwd.stats) return ra_fail(RA_ERR_INVALID_ARGUMENT, "stats is NULL");
  if (tr->world_size != call->plan->cfg.world_size)
    return ra_fail(RA_ERR_INVALID_ARGUMENT, "world_size: the plan has %d ranks but the transport %d",
                   call->plan->cfg.world_size, tr->world_size);
  if (tr->rank < 0 || tr->rank >= tr->world_size)
    return ra_fail(RA_ERR_INVALID_ARGUMENT, "rank %d outside [0, %d)", tr->rank, tr->world_size);
  const ra_fwd_params *f = &call->p.fwd;
  const void *data[8] = {f->q.data, f->k.data, f->v.data, f->o.data,
                         call->p.dout.data, call->p.dq.data, call->p.dk.data, call->p.dv.data};
  static const char *const names[8] = {"q", "k", "v", "out", "dout", "dq", "dk", "dv"};
  for (int i = 0; i < (call->backward ? 8 : 4); i++)
    if (!data[i]) return ra_fail(RA_ERR_INVALID_ARGUMENT, "%s: data is NULL", names[i]);
  if (call->backward && !f->lse)
    return ra_fail(RA_ERR_INVALID_ARGUMENT, "lse: the forward's log-sum-exp is required");
  if (f->lse && f->lse_ld < call->plan->local_len)
    return ra_fail(RA_ERR_INVALID_ARGUMENT, "lse: row stride %lld below the local length %lld",
                   (long long)f->lse_ld, (long long)call->plan->local_len);
  return RA_OK;
}

ra_status ra_ring_rank(const ra_call *call, const ra_transport *tr, const ra_backend *be) {
  RA_TRY(check_rank(call, tr, be));
  return call->backward ? ring_backward(call, tr, be) : ring_forward(call, tr, be);
}
