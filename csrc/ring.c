/*
 * ring.c -- one rank's share of ring dilated attention.
 *
 * Rank j holds positions [jL, (j+1)L) of q, k, v and o.  It keeps one fp32
 * accumulator row and one log-sum-exp per (batch, position, head) and, for
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
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "internal.h"

/* Everything one rank needs during a call. */
typedef struct rank_ctx {
  const ra_plan *plan;
  const ra_config *cfg;
  const ra_transport *tr;
  ra_stats *stats;
  ra_tensor q, k, v;
  int64_t L, start;      /* local length and first global position */
  size_t es;             /* element size                            */
  float *acc, *lse;      /* [b][L][h][d] and [b][h][L]               */
  void **ws;             /* one kernel workspace per thread          */
  int threads;
} rank_ctx;

/* Where the keys/values of one (batch, head) of a branch are read from. */
typedef struct kv_source {
  const char *k, *v;        /* first token of (batch 0, head 0)        */
  int64_t k_stride_b, v_stride_b;
  int64_t k_stride_t, v_stride_t; /* between active tokens             */
  /* per head of the branch: offset of its first token and its run      */
  const int64_t *head_at;   /* elements from k / v                     */
  const int64_t *count, *pos0;
} kv_source;

/* ------------------------------------------------------------- computing */

/* Attend this rank's active queries of `branch` (inside the window
 * [wstart, wstart+wlen) of the shard, which lies in one segment) to the
 * keys/values of `src`.  Work items are (batch, head, query block). */
static void compute_block(rank_ctx *r, int branch, int64_t wstart, int64_t wlen,
                          int64_t nwin, const kv_source *src) {
  const ra_config *c = r->cfg;
  const ra_branch_info *bi = &r->plan->branch[branch];
  const int64_t H = c->num_heads, d = c->head_dim, rate = bi->rate;
  const int64_t hb = bi->head_end - bi->head_begin;
  const int64_t nqb = (wlen / rate + 1 + RA_CPU_BLOCK_Q - 1) / RA_CPU_BLOCK_Q;
  const int64_t items = c->batch * hb * nwin * nqb;
  const float scale = (float)c->scale;
  const ra_dtype dt = c->dtype;

#pragma omp parallel for num_threads(r->threads) schedule(dynamic, 1)
  for (int64_t it = 0; it < items; it++) {
    int64_t qb = it % nqb, w = (it / nqb) % nwin, hh = (it / nqb / nwin) % hb;
    int64_t bb = it / nqb / nwin / hb, h = bi->head_begin + hh;
    int64_t off = r->plan->offset[branch * H + h];
    int64_t win = wstart + w * wlen; /* window start, local position */
    ra_run run = ra_active_run(bi->segment, rate, off, r->start + win, wlen);
    int64_t q0 = qb * RA_CPU_BLOCK_Q;
    if (q0 >= run.count) continue;
    int64_t lpos = win + run.first + q0 * rate; /* local position of query 0 */
    ra_tokens qt = {
        (const char *)r->q.data + (size_t)(bb * r->q.stride_b + lpos * r->q.stride_n + h * r->q.stride_h) * r->es,
        rate * r->q.stride_n, run.count - q0 < RA_CPU_BLOCK_Q ? run.count - q0 : RA_CPU_BLOCK_Q,
        r->start + lpos};
    ra_tokens kt = {src->k + (size_t)(bb * src->k_stride_b + src->head_at[hh] + w * wlen * r->k.stride_n) * r->es,
                    src->k_stride_t, src->count[hh], src->pos0[hh] + w * wlen};
    const char *vp = src->v + (size_t)(bb * src->v_stride_b + src->head_at[hh] + w * wlen * r->v.stride_n) * r->es;
    int tid = 0;
#ifdef _OPENMP
    tid = omp_get_thread_num();
#endif
    ra_cpu_attend((ra_workspace *)r->ws[tid], dt, d, scale, c->causal, rate, qt, kt, vp,
                  src->v_stride_t, r->acc + ((bb * r->L + lpos) * H + h) * d, rate * H * d,
                  r->lse + (bb * H + h) * r->L + lpos, rate);
  }
}

/* A local branch: every segment of the shard attends to itself. */
static void run_local_branch(rank_ctx *r, int branch, int64_t *head_at,
                             int64_t *count, int64_t *pos0) {
  const ra_branch_info *bi = &r->plan->branch[branch];
  const int64_t H = r->cfg->num_heads;
  for (int64_t h = bi->head_begin; h < bi->head_end; h++) {
    int64_t hh = h - bi->head_begin, off = r->plan->offset[branch * H + h];
    ra_run run = ra_active_run(bi->segment, bi->rate, off, r->start, bi->segment);
    head_at[hh] = run.first * r->k.stride_n + h * r->k.stride_h;
    count[hh] = run.count;
    pos0[hh] = r->start + run.first;
  }
  /* k and v share one head_at table, so they must share strides */
  kv_source src = {(const char *)r->k.data, (const char *)r->v.data, r->k.stride_b, r->v.stride_b,
                   bi->rate * r->k.stride_n, bi->rate * r->v.stride_n, head_at, count, pos0};
  compute_block(r, branch, 0, bi->segment, r->L / bi->segment, &src);
}

/* ------------------------------------------------------------- packing */

/* Layout of a packed block of a branch from the rank whose shard starts at
 * `start`: for each batch, for each head of the branch, its active keys,
 * then the same for values.  Returns the block's size in elements. */
static int64_t packed_layout(const rank_ctx *r, int branch, int64_t start,
                             int64_t *head_at, int64_t *count, int64_t *pos0) {
  const ra_branch_info *bi = &r->plan->branch[branch];
  const int64_t H = r->cfg->num_heads, d = r->cfg->head_dim;
  int64_t at = 0;
  for (int64_t h = bi->head_begin; h < bi->head_end; h++) {
    int64_t hh = h - bi->head_begin;
    ra_run run = ra_active_run(bi->segment, bi->rate, r->plan->offset[branch * H + h], start, r->L);
    head_at[hh] = at;
    count[hh] = run.count;
    pos0[hh] = start + run.first;
    at += run.count * d;
  }
  return 2 * r->cfg->batch * at; /* at = elements per batch, k and v */
}

static void pack_block(const rank_ctx *r, int branch, char *buf,
                       const int64_t *head_at, const int64_t *count,
                       const int64_t *pos0, int64_t per_batch) {
  const ra_branch_info *bi = &r->plan->branch[branch];
  const int64_t d = r->cfg->head_dim, B = r->cfg->batch, hb = bi->head_end - bi->head_begin;
  const size_t es = r->es, row = (size_t)d * es;
  char *vbuf = buf + (size_t)(B * per_batch) * es;
#pragma omp parallel for collapse(2) num_threads(r->threads) schedule(static)
  for (int64_t bb = 0; bb < B; bb++)
    for (int64_t hh = 0; hh < hb; hh++) {
      int64_t h = bi->head_begin + hh;
      for (int64_t t = 0; t < count[hh]; t++) {
        int64_t lp = pos0[hh] - r->start + t * bi->rate;
        size_t dst = (size_t)(bb * per_batch + head_at[hh] + t * d) * es;
        memcpy(buf + dst, (const char *)r->k.data + (size_t)(bb * r->k.stride_b + lp * r->k.stride_n + h * r->k.stride_h) * es, row);
        memcpy(vbuf + dst, (const char *)r->v.data + (size_t)(bb * r->v.stride_b + lp * r->v.stride_n + h * r->v.stride_h) * es, row);
      }
    }
}

/* ------------------------------------------------------------ the ring */

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

static ra_status run_spanning_branch(rank_ctx *r, int branch, int64_t *tables) {
  const ra_branch_info *bi = &r->plan->branch[branch];
  const int64_t m = bi->span, rank = r->tr->rank, pos = rank % m, group0 = rank - pos;
  const int64_t hb = bi->head_end - bi->head_begin;
  int64_t *cur_at = tables, *cur_n = tables + hb, *cur_p = tables + 2 * hb;
  int64_t *nxt_at = tables + 3 * hb, *nxt_n = tables + 4 * hb, *nxt_p = tables + 5 * hb;
  ra_status st = RA_OK;
  int cur = 0, sending = 0, receiving = 0;
  ra_request sreq, rreq;

  /* capacity: the largest block any rank of the sub-ring can send */
  int64_t cap = 0;
  for (int64_t p = 0; p < m; p++) {
    int64_t e = packed_layout(r, branch, (group0 + p) * r->L, nxt_at, nxt_n, nxt_p);
    if (e > cap) cap = e;
  }
  size_t cap_bytes = (size_t)cap * r->es;
  char *buf[2];
  buf[0] = ra_alloc(r->stats, cap_bytes);
  buf[1] = ra_alloc(r->stats, cap_bytes);
  if (!buf[0] || !buf[1]) {
    st = RA_ERR_OUT_OF_MEMORY;
    goto done;
  }
  int64_t cur_elems = packed_layout(r, branch, r->start, cur_at, cur_n, cur_p);
  pack_block(r, branch, buf[0], cur_at, cur_n, cur_p, cur_elems / (2 * r->cfg->batch));

  for (int64_t s = 0; s < m; s++) {
    sending = receiving = 0;
    int64_t nxt_elems = 0;
    if (s + 1 < m) {
      int64_t from = (pos - (s + 1) + 2 * m) % m; /* origin of the next block */
      nxt_elems = packed_layout(r, branch, (group0 + from) * r->L, nxt_at, nxt_n, nxt_p);
      st = exchange_start(r, branch, pos, m, s + 1, group0, buf[cur], cur_elems * (int64_t)r->es,
                          buf[1 - cur], nxt_elems * (int64_t)r->es, &sreq, &rreq, &sending, &receiving);
      if (st != RA_OK) goto done;
    }
    if (!r->cfg->causal || s <= pos) {
      int64_t per_batch = cur_elems / (2 * r->cfg->batch);
      kv_source src = {buf[cur], buf[cur] + (size_t)(r->cfg->batch * per_batch) * r->es,
                       per_batch, per_batch, r->cfg->head_dim, r->cfg->head_dim, cur_at, cur_n, cur_p};
      compute_block(r, branch, 0, r->L, 1, &src);
      r->stats->steps++;
    } else {
      r->stats->steps_skipped++;
    }
    /* receive before send: a send may complete only when its receiver waits */
    if (receiving && (receiving = 0, st = r->tr->ops->wait(r->tr->ctx, &rreq)) != RA_OK) goto done;
    if (sending && (sending = 0, st = r->tr->ops->wait(r->tr->ctx, &sreq)) != RA_OK) goto done;
    if (s + 1 < m) {
      int64_t *t;
      t = cur_at; cur_at = nxt_at; nxt_at = t;
      t = cur_n; cur_n = nxt_n; nxt_n = t;
      t = cur_p; cur_p = nxt_p; nxt_p = t;
      cur_elems = nxt_elems;
      cur = 1 - cur;
    }
  }
done:
  if (sending || receiving) { /* failed with operations in flight: finish them first */
    if (r->tr->ops->abort) r->tr->ops->abort(r->tr->ctx);
    if (receiving) r->tr->ops->wait(r->tr->ctx, &rreq);
    if (sending) r->tr->ops->wait(r->tr->ctx, &sreq);
  }
  ra_free(r->stats, buf[0], cap_bytes);
  ra_free(r->stats, buf[1], cap_bytes);
  return st;
}

/* --------------------------------------------------------------- entry */

static ra_status check_call(const ra_plan *plan, const ra_transport *tr,
                            ra_tensor q, ra_tensor k, ra_tensor v, ra_tensor o,
                            float *lse, int64_t lse_ld) {
  if (!plan) return ra_fail(RA_ERR_INVALID_ARGUMENT, "plan is NULL");
  if (!tr || !tr->ops) return ra_fail(RA_ERR_INVALID_ARGUMENT, "transport is NULL");
  if (tr->world_size != plan->cfg.world_size)
    return ra_fail(RA_ERR_INVALID_ARGUMENT, "world_size: the plan has %d ranks but the transport %d",
                   plan->cfg.world_size, tr->world_size);
  if (tr->rank < 0 || tr->rank >= tr->world_size)
    return ra_fail(RA_ERR_INVALID_ARGUMENT, "rank %d outside [0, %d)", tr->rank, tr->world_size);
  if (!q.data) return ra_fail(RA_ERR_INVALID_ARGUMENT, "q: data is NULL");
  if (!k.data) return ra_fail(RA_ERR_INVALID_ARGUMENT, "k: data is NULL");
  if (!v.data) return ra_fail(RA_ERR_INVALID_ARGUMENT, "v: data is NULL");
  if (!o.data) return ra_fail(RA_ERR_INVALID_ARGUMENT, "out: data is NULL");
  if (lse && lse_ld < plan->local_len)
    return ra_fail(RA_ERR_INVALID_ARGUMENT, "lse: row stride %lld below the local length %lld",
                   (long long)lse_ld, (long long)plan->local_len);
  if (plan->cfg.dtype == RA_BFLOAT16)
    return ra_fail(RA_ERR_UNSUPPORTED, "dtype: bfloat16 is supported by the CUDA backend only");
  if (k.stride_n != v.stride_n || k.stride_h != v.stride_h)
    return ra_fail(RA_ERR_INVALID_ARGUMENT, "v: must have the same sequence and head strides as k");
  return RA_OK;
}

/* Scan this rank's inputs when non-finite values are to be refused. */
static ra_status check_finite(const ra_config *c, int64_t L, ra_tensor q, ra_tensor k,
                              ra_tensor v, int threads) {
  const ra_tensor *t[3] = {&q, &k, &v};
  const char *name[3] = {"q", "k", "v"};
  for (int i = 0; i < 3; i++)
    if (!ra_tensor_finite(*t[i], c->dtype, c->batch, L, c->num_heads, c->head_dim, threads))
      return ra_fail(RA_ERR_NONFINITE, "%s contains NaN or Inf (nan_policy=\"raise\")", name[i]);
  return RA_OK;
}

static void store_output(const rank_ctx *r, ra_tensor o, float *lse, int64_t lse_ld) {
  const ra_config *c = r->cfg;
  const int64_t H = c->num_heads, d = c->head_dim, rows = c->batch * r->L * H;
#pragma omp parallel for num_threads(r->threads) schedule(static)
  for (int64_t i = 0; i < rows; i++) {
    int64_t h = i % H, p = (i / H) % r->L, bb = i / H / r->L;
    ra_store_row((char *)o.data + (size_t)(bb * o.stride_b + p * o.stride_n + h * o.stride_h) * r->es,
                 c->dtype, r->acc + i * d, d);
  }
  if (lse)
    for (int64_t bh = 0; bh < c->batch * H; bh++)
      memcpy(lse + bh * lse_ld, r->lse + bh * r->L, sizeof(float) * (size_t)r->L);
}

ra_status ra_ring_forward(const ra_plan *plan, const ra_transport *tr,
                          ra_tensor q, ra_tensor k, ra_tensor v, ra_tensor o,
                          float *lse, int64_t lse_ld, const ra_exec *exec,
                          ra_stats *stats) {
  ra_stats local_stats;
  if (!stats) stats = &local_stats;
  memset(stats, 0, sizeof *stats);
  ra_status st = check_call(plan, tr, q, k, v, o, lse, lse_ld);
  if (st != RA_OK) goto fail_early;

  const ra_config *c = &plan->cfg;
  rank_ctx r;
  memset(&r, 0, sizeof r);
  r.plan = plan;
  r.cfg = c;
  r.tr = tr;
  r.stats = stats;
  r.q = q;
  r.k = k;
  r.v = v;
  r.L = plan->local_len;
  r.start = (int64_t)tr->rank * r.L;
  r.es = ra_dtype_size(c->dtype);
  r.threads = exec && exec->num_threads > 0 ? exec->num_threads : ra_default_num_threads();
  if (exec && exec->check_finite && (st = check_finite(c, r.L, q, k, v, r.threads)) != RA_OK)
    goto fail_early;

  const int64_t H = c->num_heads, d = c->head_dim;
  const int64_t shard = c->batch * r.L * H * d * (int64_t)r.es;
  const int64_t held = 4 * shard + (lse ? c->batch * H * r.L * 4 : 0);
  const size_t acc_bytes = (size_t)(c->batch * r.L * H * d) * sizeof(float);
  const size_t lse_bytes = (size_t)(c->batch * H * r.L) * sizeof(float);
  const size_t ws_bytes = ra_workspace_bytes(d);
  ra_hold(stats, held);
  int64_t *tables = malloc(sizeof(int64_t) * (size_t)(6 * H)); /* O(h), not counted */
  r.acc = ra_alloc(stats, acc_bytes);
  r.lse = ra_alloc(stats, lse_bytes);
  r.ws = calloc((size_t)r.threads, sizeof(void *));
  if (!tables || !r.acc || !r.lse || !r.ws) {
    st = ra_fail(RA_ERR_OUT_OF_MEMORY, "could not allocate the accumulators of rank %d", tr->rank);
    goto done;
  }
  for (int t = 0; t < r.threads; t++) {
    if (!(r.ws[t] = ra_alloc(stats, ws_bytes))) {
      st = ra_fail(RA_ERR_OUT_OF_MEMORY, "could not allocate kernel workspace");
      goto done;
    }
    ra_workspace_init(r.ws[t], d);
  }
  memset(r.acc, 0, acc_bytes);
  for (int64_t i = 0; i < c->batch * H * r.L; i++) r.lse[i] = -INFINITY;

  for (int b = 0; b < c->num_branches && st == RA_OK; b++) {
    if (plan->branch[b].span == 1) {
      run_local_branch(&r, b, tables, tables + H, tables + 2 * H);
      stats->steps++;
    } else {
      st = run_spanning_branch(&r, b, tables);
    }
  }
  if (st == RA_OK) store_output(&r, o, lse, lse_ld);

done:
  if (r.ws)
    for (int t = 0; t < r.threads; t++) ra_free(stats, r.ws[t], ws_bytes);
  free(r.ws);
  ra_free(stats, r.lse, lse_bytes);
  ra_free(stats, r.acc, acc_bytes);
  free(tables);
  ra_release(stats, held);
  if (st == RA_OK) return RA_OK;
fail_early:
  if (tr && tr->ops && tr->ops->abort) tr->ops->abort(tr->ctx);
  return st;
}
