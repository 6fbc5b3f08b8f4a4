/*
 * driver.c -- one rank's share of ring dilated attention.
 *
 * Rank j holds one piece of q, k, v and o -- positions [jL, (j+1)L) -- or,
 * with the zigzag partition, two: chunks j and 2k-1-j of C = n/(2k)
 * positions (rank_piece, partition.c).  Per piece it keeps one accumulator
 * row and one log-sum-exp per (batch, position, head) -- fp32, or double
 * for float64 inputs (ra_acc_size) -- and, for each branch, merges into
 * them the attention of its queries over every key block it may see.  k
 * and v may have fewer heads than q (grouped-query attention): query head
 * h reads key/value head h / (h / h_kv), and blocks carry one run per
 * (key/value head, offset) of the branch, its *slots* (ra_plan).
 *
 *  - a *local* branch (C % S == 0) has whole segments inside each piece:
 *    one block, no communication;
 *  - a *spanning* branch (S % L == 0) has segments over m = S/L consecutive
 *    ranks, which form a sub-ring.  Each rank packs only the keys/values
 *    active in the branch's cells, and the packed blocks travel the
 *    sub-ring (send to the next rank, receive from the previous) for m - 1
 *    steps, in sub-blocks through two slots so that the next sub-block is
 *    in flight while the current one is computed (stream.c).
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

#include "ring/rank.h"

/* --------------------------------------------------- counted backend memory */

void *be_alloc(rank_ctx *r, size_t bytes) {
  void *p = r->be->ops->alloc(r->be->ctx, bytes);
  if (p) ra_hold(r->stats, (int64_t)bytes);
  return p;
}

void be_free(rank_ctx *r, void *p, size_t bytes) {
  if (!p) return;
  r->be->ops->free(r->be->ctx, p);
  ra_release(r->stats, (int64_t)bytes);
}

/* ------------------------------------------------------------- computing */

/* (query, key) pairs a task attends: nq * nk, or with causality those with
 * kpos <= qpos.  The queries and keys of a cell share their residue mod the
 * rate, so query i sees min(nk, a + i + 1) keys, a = (qpos0 - kpos0) / rate:
 * the sum is F(a + nq) - F(a) with F(x) = sum_{y=1}^{x} min(y, nk). */
static int64_t pairs_upto(int64_t x, int64_t nk) {
  if (x <= 0) return 0;
  return x <= nk ? x * (x + 1) / 2 : nk * (nk + 1) / 2 + (x - nk) * nk;
}

static int64_t task_pairs(const ra_attend_task *t, int64_t rate, int causal) {
  if (!causal) return t->nq * t->nk;
  const int64_t a = (t->qpos0 - t->kpos0) / rate;
  return pairs_upto(a + t->nq, t->nk) - pairs_upto(a, t->nk);
}

/* One backend call of attend_block: the tasks of every head of the branch,
 * or in the backward (pass >= 0) of the heads that are the pass-th reader
 * of their slot, so that no two tasks add to the same dK/dV rows. */
static ra_status attend_pass(rank_ctx *r, int branch, const rank_piece *qp, int64_t wlen, int64_t nwin,
                             const kv_source *src, int backward, int64_t pass) {
  const ra_config *c = r->cfg;
  const ra_plan *plan = r->plan;
  const ra_branch_info *bi = &plan->branch[branch];
  const int64_t H = c->num_heads, d = c->head_dim, rate = bi->rate;
  int64_t n = 0;
  for (int64_t bb = 0; bb < c->batch; bb++)
    for (int64_t h = bi->head_begin; h < bi->head_end; h++) {
      const int64_t off = plan->offset[branch * H + h], s = plan->slot[branch * H + h];
      if (pass >= 0 && h - plan->slot_head[branch * H + s] != pass) continue;
      for (int64_t w = 0; w < nwin; w++) {
        const ra_run run = ra_active_run(bi->segment, rate, off, qp->start + w * wlen, wlen);
        if (run.count == 0 || src->count[s] == 0) continue;
        const int64_t lpos = w * wlen + run.first; /* position of query 0 in the piece */
        ra_attend_task *t = &r->tasks[n++];
        t->q = bb * qp->q.stride_b + lpos * qp->q.stride_n + h * qp->q.stride_h;
        t->k = bb * src->k_stride_b + src->k_at[s] + w * src->k_window;
        t->v = bb * src->v_stride_b + src->v_at[s] + w * src->v_window;
        t->acc = ((bb * r->C + lpos) * H + h) * d;
        t->lse = (bb * H + h) * qp->lse_ld + lpos;
        t->nq = run.count;
        t->nk = src->count[s];
        t->qpos0 = qp->start + lpos;
        t->kpos0 = src->pos0[s] + w * wlen;
        t->dout = bb * qp->dout.stride_b + lpos * qp->dout.stride_n + h * qp->dout.stride_h;
        t->dkv = backward ? bb * src->dkv_stride_b + src->dkv_at[s] + w * src->dkv_window : 0;
        t->delta = (bb * H + h) * r->C + lpos;
        r->stats->pairs += task_pairs(t, rate, c->causal);
      }
    }
  if (n == 0) return RA_OK;
  ra_attend_batch a = {c->dtype, d, (float)c->scale, c->causal, rate,
                       qp->q.data, src->k, src->v,
                       rate * qp->q.stride_n, src->k_stride_t, src->v_stride_t,
                       qp->acc, qp->lse, rate * H * d, rate,
                       r->tasks, n, c->scale};
  if (!backward) return r->be->ops->attend(r->be->ctx, &a);
  ra_backward_batch bw = {a, qp->dout.data, rate * qp->dout.stride_n, qp->delta, src->dk, src->dv,
                          src->dkv_stride_t};
  return r->be->ops->attend_backward(r->be->ctx, &bw);
}

ra_status attend_block(rank_ctx *r, int branch, const rank_piece *qp, int64_t wlen, int64_t nwin,
                       const kv_source *src, int backward) {
  if (!backward) return attend_pass(r, branch, qp, wlen, nwin, src, 0, -1);
  for (int64_t pass = 0; pass < r->plan->group; pass++) /* a slot has at most h / h_kv readers */
    RA_TRY(attend_pass(r, branch, qp, wlen, nwin, src, 1, pass));
  return RA_OK;
}

/* A local branch on one piece: every segment of it attends to itself. */
static ra_status run_local_piece(rank_ctx *r, int branch, const rank_piece *pc, int64_t *tables, int backward) {
  const ra_plan *plan = r->plan;
  const ra_branch_info *bi = &plan->branch[branch];
  const int64_t H = r->cfg->num_heads, d = r->cfg->head_dim, Hkv = r->Hkv, ns = plan->num_slots[branch];
  int64_t *k_at = tables, *v_at = tables + ns, *count = tables + 2 * ns, *pos0 = tables + 3 * ns;
  int64_t *dkv_at = tables + 4 * ns; /* backward: the piece's own dK/dV rows, laid out like its accumulator */
  for (int64_t s = 0; s < ns; s++) {
    const int64_t h = plan->slot_head[branch * H + s], kv = ra_kv_head(plan, h);
    const ra_run run = ra_active_run(bi->segment, bi->rate, plan->offset[branch * H + h], pc->start, bi->segment);
    k_at[s] = run.first * pc->k.stride_n + kv * pc->k.stride_h;
    v_at[s] = run.first * pc->v.stride_n + kv * pc->v.stride_h;
    count[s] = run.count;
    pos0[s] = pc->start + run.first;
    dkv_at[s] = run.first * Hkv * d + kv * d;
  }
  kv_source src = {pc->k.data, pc->v.data, pc->k.stride_b, pc->v.stride_b, bi->rate * pc->k.stride_n,
                   bi->rate * pc->v.stride_n, bi->segment * pc->k.stride_n, bi->segment * pc->v.stride_n,
                   k_at, v_at, count, pos0,
                   pc->dk_acc, pc->dv_acc, r->C * Hkv * d, bi->rate * Hkv * d, bi->segment * Hkv * d, dkv_at};
  return attend_block(r, branch, pc, bi->segment, r->C / bi->segment, &src, backward);
}

/* A local branch: every segment of every piece attends to itself. */
static ra_status run_local_branch(rank_ctx *r, int branch, int64_t *tables, int backward) {
  r->stats->steps++;
  for (int i = 0; i < r->npieces; i++) RA_TRY(run_local_piece(r, branch, &r->pc[i], tables, backward));
  return RA_OK;
}

/* ------------------------------------------------------------- packing */

int64_t packed_layout(const rank_ctx *r, int branch, const int64_t *starts, int npieces, int64_t *at,
                      int64_t *count, int64_t *pos0) {
  const ra_plan *plan = r->plan;
  const ra_branch_info *bi = &plan->branch[branch];
  const int64_t H = r->cfg->num_heads, d = r->cfg->head_dim, ns = plan->num_slots[branch];
  int64_t per_batch = 0, rows, elems;
  for (int t = 0; t < npieces; t++)
    for (int64_t s = 0; s < ns; s++) {
      const int64_t e = t * ns + s, h = plan->slot_head[branch * H + s];
      const ra_run run = ra_active_run(bi->segment, bi->rate, plan->offset[branch * H + h], starts[t], r->C);
      at[e] = per_batch;
      count[e] = run.count;
      pos0[e] = starts[t] + run.first;
      if (!ra_mul_ok(run.count, d, &rows) || !ra_add_ok(per_batch, rows, &per_batch)) return -1;
    }
  return ra_mul_ok(per_batch, r->cfg->batch, &elems) && ra_mul_ok(elems, 2, &elems) ? elems : -1;
}

/* The packed block as a key/value source.  In the backward a block carries
 * its dK/dV accumulators (accumulator elements, laid out like the keys)
 * after the values. */
kv_source packed_source(const rank_ctx *r, void *buf, int64_t elems,
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
 * backward); 0 when they do not fit.  Every sub-block of a sub-ring is at
 * most the one its slots were sized for (stream.c, sub_ring_open), so only
 * that call can see 0. */
int64_t block_bytes(const rank_ctx *r, int64_t elems, int backward) {
  size_t bytes;
  return ra_bytes_ok(elems, ra_dtype_size(r->cfg->dtype) + (backward ? r->acc_es : 0), &bytes) ? (int64_t)bytes : 0;
}

ra_status pack_block(rank_ctx *r, int branch, const int *mine, int npieces, void *buf, int64_t elems,
                     const int64_t *at, const int64_t *count, const int64_t *pos0) {
  const ra_plan *plan = r->plan;
  const int64_t B = r->cfg->batch, H = r->cfg->num_heads, ns = plan->num_slots[branch];
  const int64_t per_batch = elems / (2 * B);
  const size_t es = ra_dtype_size(r->cfg->dtype);
  for (int pass = 0; pass < 2; pass++)
    for (int p = 0; p < npieces; p++) {
      const rank_piece *pc = &r->pc[mine[p]];
      const ra_tensor *t = pass == 0 ? &pc->k : &pc->v;
      int64_t n = 0;
      for (int64_t bb = 0; bb < B; bb++)
        for (int64_t s = 0; s < ns; s++) {
          const int64_t e = p * ns + s, kv = ra_kv_head(plan, plan->slot_head[branch * H + s]);
          ra_copy_task *c = &r->copies[n++];
          c->src = bb * t->stride_b + (pos0[e] - pc->start) * t->stride_n + kv * t->stride_h;
          c->dst = bb * per_batch + at[e];
          c->count = count[e];
        }
      ra_gather_batch g = {r->cfg->dtype, r->cfg->head_dim, t->data, plan->branch[branch].rate * t->stride_n,
                           (char *)buf + (size_t)(pass * B * per_batch) * es, r->copies, n};
      RA_TRY(r->be->ops->gather(r->be->ctx, &g));
    }
  return r->be->ops->sync(r->be->ctx);
}

/* Every size a rank allocates or counts, checked once (internal.h): per
 * piece the accumulator, dK/dV accumulator and lse elements and bytes; the
 * task lists (one step has at most b * h * windows-per-piece tasks), the
 * per-slot tables, the largest ring block (2 b L h d elements with their
 * dK/dV), and the caller's shards counted as held: q, k, v, o (and lse),
 * or in the backward q, k, v, o, dout, dq, dk, dv and lse (k, v, dk, dv
 * with h_kv heads). */
static ra_status rank_sizes(rank_ctx *r, int backward, int with_lse) {
  const ra_config *c = r->cfg;
  const int64_t es = (int64_t)ra_dtype_size(c->dtype), acc_es = (int64_t)r->acc_es, L = r->plan->local_len;
  int64_t max_windows = 1, n_tasks, n_copies, n_tables, shard, shards, lse, block, n_q, n_k, n_qk;
  for (int b = 0; b < c->num_branches; b++)
    if (r->plan->branch[b].span == 1 && r->C / r->plan->branch[b].segment > max_windows)
      max_windows = r->C / r->plan->branch[b].segment;
  const int ok = ra_mul4_ok(c->batch, r->C, c->num_heads, c->head_dim, &r->n_acc) &&
                 ra_mul4_ok(c->batch, r->C, r->Hkv, c->head_dim, &r->n_kv) &&
                 ra_mul4_ok(c->batch, c->num_heads, r->C, 1, &r->n_rows) &&
                 ra_bytes_ok(r->n_acc, r->acc_es, &r->acc_bytes) && ra_bytes_ok(r->n_kv, r->acc_es, &r->kv_bytes) &&
                 ra_bytes_ok(r->n_rows, r->acc_es, &r->row_bytes) &&
                 ra_mul4_ok(c->batch, c->num_heads, max_windows, 1, &n_tasks) &&
                 ra_bytes_ok(n_tasks, sizeof(ra_attend_task), &r->task_bytes) &&
                 ra_mul_ok(c->batch, c->num_heads, &n_copies) &&
                 ra_bytes_ok(n_copies, sizeof(ra_copy_task), &r->copy_bytes) &&
                 ra_mul_ok(12, c->num_heads, &n_tables) && ra_bytes_ok(n_tables, sizeof(int64_t), &r->table_bytes) &&
                 ra_mul4_ok(c->batch, L, c->num_heads, c->head_dim, &n_q) &&
                 ra_mul4_ok(c->batch, L, r->Hkv, c->head_dim, &n_k) && ra_add_ok(n_q, n_k, &n_qk) &&
                 ra_mul4_ok(2, n_q, es + (backward ? acc_es : 0), 1, &block) &&
                 ra_mul4_ok(backward ? 4 : 2, n_qk, es, 1, &shards) &&
                 ra_mul4_ok(c->batch, c->num_heads, L, with_lse ? acc_es : 0, &lse) && ra_add_ok(shards, lse, &shard);
  if (!ok)
    return ra_fail(RA_ERR_INVALID_ARGUMENT,
                   "q: shape (%lld, %lld, %lld, %lld) needs more memory per rank than this machine can address",
                   (long long)c->batch, (long long)c->seq_len, (long long)c->num_heads, (long long)c->head_dim);
  r->held = shard;
  return RA_OK;
}

/* t from `rows` positions on (the views the entry point and ranks.c have
 * checked to be addressable). */
static ra_tensor rows_on(ra_tensor t, int64_t rows, size_t es) {
  if (t.data) t.data = (char *)t.data + (size_t)(rows * t.stride_n) * es;
  return t;
}

/* The rank's pieces: its shard (contiguous), or chunks j and 2k-1-j
 * (zigzag), the second `second_row` rows into the rank's tensors: C in a
 * shard of its own, further on in an in-process view of the full tensors. */
static void rank_pieces(rank_ctx *r, const ra_call *call) {
  const ra_config *c = r->cfg;
  const ra_bwd_params *p = &call->p;
  const int64_t j = r->tr->rank, k = c->world_size;
  const size_t es = ra_dtype_size(c->dtype);
  r->npieces = c->partition == RA_PARTITION_ZIGZAG ? 2 : 1;
  for (int i = 0; i < r->npieces; i++) {
    rank_piece *pc = &r->pc[i];
    const int64_t row = i == 0 ? 0 : call->second_row > 0 ? call->second_row : r->C;
    pc->start = (i == 0 ? j : 2 * k - 1 - j) * r->C;
    pc->q = rows_on(p->fwd.q, row, es);
    pc->k = rows_on(p->fwd.k, row, es);
    pc->v = rows_on(p->fwd.v, row, es);
    pc->o = rows_on(p->fwd.o, row, es);
    pc->dout = rows_on(p->dout, row, es);
    pc->dq = rows_on(p->dq, row, es);
    pc->dk = rows_on(p->dk, row, es);
    pc->dv = rows_on(p->dv, row, es);
    pc->lse_out = p->fwd.lse ? (char *)p->fwd.lse + (size_t)row * r->acc_es : NULL;
  }
}

/* What the forward and the backward of a rank share: the context, its
 * pieces, its sizes, the caller's shards counted as held, and the scratch
 * for task lists and block layouts. */
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
  r->C = plan->chunk_len;
  r->Hkv = c->num_kv_heads;
  r->acc_es = ra_acc_size(c->dtype);
  rank_pieces(r, call);
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

/* Every branch of the call, local or spanning. */
static ra_status run_branches(rank_ctx *r, int backward) {
  for (int b = 0; b < r->cfg->num_branches; b++) {
    const int local = r->plan->branch[b].span == 1;
    RA_TRY(local ? run_local_branch(r, b, r->tables, backward)
                 : backward ? run_spanning_backward(r, b, r->tables) : run_spanning_branch(r, b, r->tables));
  }
  return RA_OK;
}

/* ------------------------------------------------------------ backward */

/* A piece's gradient accumulators: dQ, dK/dV of its own keys (h_kv heads)
 * and delta = rowsum(dO o); lse is the caller's. */
static ra_status open_piece_grads(rank_ctx *r, rank_piece *pc) {
  const ra_backend *be = r->be;
  pc->lse = pc->lse_out; /* read only in the backward; an opaque base (doubles for float64) */
  pc->lse_ld = r->call->p.fwd.lse_ld;
  pc->acc = be_alloc(r, r->acc_bytes);
  pc->dk_acc = be_alloc(r, r->kv_bytes);
  pc->dv_acc = be_alloc(r, r->kv_bytes);
  float *delta = be_alloc(r, r->row_bytes);
  pc->delta = delta;
  if (!pc->acc || !pc->dk_acc || !pc->dv_acc || !delta)
    return ra_fail(RA_ERR_OUT_OF_MEMORY, "could not allocate the gradient accumulators of rank %d", r->tr->rank);
  RA_TRY(be->ops->init_state(be->ctx, pc->acc, r->n_acc, NULL, 0));
  RA_TRY(be->ops->init_state(be->ctx, pc->dk_acc, r->n_kv, NULL, 0));
  RA_TRY(be->ops->init_state(be->ctx, pc->dv_acc, r->n_kv, NULL, 0));
  return be->ops->row_dot(be->ctx, r->cfg, r->C, pc->dout, pc->o, delta, r->C);
}

/* dq, and dk, dv with h_kv heads, of one piece. */
static ra_status store_piece_grads(rank_ctx *r, const rank_piece *pc) {
  const ra_backend *be = r->be;
  ra_config kv = *r->cfg;
  kv.num_heads = r->Hkv;
  RA_TRY(be->ops->store(be->ctx, r->cfg, r->C, pc->acc, NULL, pc->dq, NULL, 0));
  RA_TRY(be->ops->store(be->ctx, &kv, r->C, pc->dk_acc, NULL, pc->dk, NULL, 0));
  return be->ops->store(be->ctx, &kv, r->C, pc->dv_acc, NULL, pc->dv, NULL, 0);
}

static void close_piece_grads(rank_ctx *r, rank_piece *pc) {
  be_free(r, (void *)pc->delta, pc->delta ? r->row_bytes : 0);
  be_free(r, pc->dv_acc, r->kv_bytes);
  be_free(r, pc->dk_acc, r->kv_bytes);
  be_free(r, pc->acc, r->acc_bytes);
}

/* The backward of one rank: dq, dk, dv from q, k, v, o, dout and the
 * forward's final lse. */
static ra_status ring_backward(const ra_call *call, const ra_transport *tr, const ra_backend *be) {
  if (!be->ops->attend_backward || !be->ops->row_dot || !be->ops->scatter_add)
    return ra_fail(RA_ERR_UNSUPPORTED, "the %s backend has no backward", be->ops->name);
  rank_ctx r;
  ra_status st = rank_open(&r, call, tr, be, 1);
  for (int i = 0; i < r.npieces && st == RA_OK; i++) st = open_piece_grads(&r, &r.pc[i]);
  if (st == RA_OK) st = run_branches(&r, 1);
  for (int i = 0; i < r.npieces && st == RA_OK; i++) st = store_piece_grads(&r, &r.pc[i]);
  if (st == RA_OK) st = be->ops->sync(be->ctx);
  for (int i = r.npieces - 1; i >= 0; i--) close_piece_grads(&r, &r.pc[i]);
  rank_close(&r);
  return st;
}

/* ------------------------------------------------------------- forward */

static ra_status ring_forward(const ra_call *call, const ra_transport *tr, const ra_backend *be) {
  const ra_fwd_params *p = &call->p.fwd;
  rank_ctx r;
  ra_status st = rank_open(&r, call, tr, be, p->lse != NULL);
  for (int i = 0; i < r.npieces && st == RA_OK; i++) {
    rank_piece *pc = &r.pc[i];
    pc->acc = be_alloc(&r, r.acc_bytes);
    pc->lse = be_alloc(&r, r.row_bytes);
    pc->lse_ld = r.C;
    if (!pc->acc || !pc->lse)
      st = ra_fail(RA_ERR_OUT_OF_MEMORY, "could not allocate the accumulators of rank %d", tr->rank);
    else
      st = be->ops->init_state(be->ctx, pc->acc, r.n_acc, pc->lse, r.n_rows);
  }
  if (st == RA_OK) st = run_branches(&r, 0);
  for (int i = 0; i < r.npieces && st == RA_OK; i++)
    st = be->ops->store(be->ctx, r.cfg, r.C, r.pc[i].acc, r.pc[i].lse, r.pc[i].o, r.pc[i].lse_out, p->lse_ld);
  if (st == RA_OK) st = be->ops->sync(be->ctx);
  for (int i = r.npieces - 1; i >= 0; i--) {
    be_free(&r, r.pc[i].lse, r.row_bytes);
    be_free(&r, r.pc[i].acc, r.acc_bytes);
  }
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
