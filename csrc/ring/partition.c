/*
 * partition.c -- which chunks a rank holds, and the sub-rings of a
 * spanning branch over them (docs/semantics.md, "Ring partition").
 *
 * Contiguous: rank j holds chunk j of k chunks of L = n / k positions.  A
 * branch spanning m = S / L chunks has one sub-ring per segment: its m
 * ranks, in order; a block is a rank's chunk.
 *
 * Zigzag: rank j holds chunks j and 2k-1-j of 2k chunks of C = n / (2k).  A
 * branch spanning m = S / C chunks cuts them into 2k/m segments, which pair
 * up as mirror images (chunk c's mirror is 2k-1-c).  The ranks of a
 * segment in the first half hold its mirror too, so they form one
 * sub-ring, and a block is both of a rank's chunks: m ranks for a segment
 * and its mirror, or m/2 for the middle segment (2k/m odd), which holds
 * both chunks of each of its ranks.  Queries only ever meet keys of their
 * own segment, and with causality not of a later chunk; so member p, given
 * the block of member q, attends (the middle segment) its two chunks to q's
 * first chunk when q < p, its second chunk to both of q's when q > p, or
 * (a segment and its mirror) its first chunk to q's first when q < p, its
 * second to q's second when q > p.  Either way every step costs every rank
 * the same: the causal work is balanced step by step.  The price is
 * traffic: every block makes the whole round, although with causality
 * half of what it carries is used by each member it reaches (ring-flash-
 * attention's zigzag makes the same trade).
 *
 * Blocks travel from member x to x + 1, and a block is forwarded only while
 * a member further on its way can see one of its keys.
 */
#include "ring/rank.h"

int ring_groups(const rank_ctx *r, int branch, ring_group g[2]) {
  const int64_t m = r->plan->branch[branch].span, k = r->cfg->world_size, j = r->tr->rank;
  memset(g, 0, 2 * sizeof *g);
  g->branch = branch;
  g->dir = 1;
  g->npieces = r->npieces;
  g->mine[1] = 1;
  const int64_t first = j - j % m; /* the first chunk (and rank) of j's segment */
  g->rank0 = g->chunk0 = first;
  g->pos = j - first;
  /* zigzag's middle segment holds chunks k - m/2 .. k + m/2 - 1: m/2 ranks */
  g->m = r->npieces == 2 && first + m > k ? k - first : m;
  return 1;
}

int group_rank(const ring_group *g, int64_t x) {
  x = (x % g->m + g->m) % g->m;
  return (int)(g->rank0 + g->dir * x);
}

/* Global first positions of member x's chunks. */
static void member_starts(const rank_ctx *r, const ring_group *g, int64_t x, int64_t starts[2]) {
  const int64_t chunk = g->chunk0 + x, last = 2 * (int64_t)r->cfg->world_size - 1;
  starts[0] = chunk * r->C;
  starts[1] = g->npieces == 2 ? (last - chunk) * r->C : starts[0];
}

/* May a query chunk starting at qs meet keys of the chunk starting at ks?
 * Only in its own segment, and with causality not after it (chunks never
 * straddle a segment, so a key chunk is visible exactly when it does not
 * start after the query chunk). */
static int chunk_sees(const rank_ctx *r, int branch, int64_t qs, int64_t ks) {
  const int64_t S = r->plan->branch[branch].segment;
  return qs / S == ks / S && (!r->cfg->causal || ks <= qs);
}

/* Can member x's queries see a key of member q's block? */
static int sees(const rank_ctx *r, const ring_group *g, int64_t x, int64_t q) {
  int64_t qs[2], ks[2];
  member_starts(r, g, x, qs);
  member_starts(r, g, q, ks);
  for (int a = 0; a < g->npieces; a++)
    for (int b = 0; b < g->npieces; b++)
      if (chunk_sees(r, g->branch, qs[a], ks[b])) return 1;
  return 0;
}

int group_receives(const rank_ctx *r, const ring_group *g, int64_t p, int64_t s) {
  if (s < 1 || s >= g->m) return 0;
  const int64_t origin = ((p - s) % g->m + g->m) % g->m;
  for (int64_t t = s; t < g->m; t++) /* the members still ahead of the block */
    if (sees(r, g, (origin + t) % g->m, origin)) return 1;
  return 0;
}

int64_t group_layout(const rank_ctx *r, const ring_group *g, int64_t x, int64_t *at, int64_t *count,
                     int64_t *pos0) {
  int64_t starts[2];
  member_starts(r, g, x, starts);
  return packed_layout(r, g->branch, starts, g->npieces, at, count, pos0);
}

ra_status group_pack(rank_ctx *r, const ring_group *g, void *buf, int64_t elems, const int64_t *at,
                     const int64_t *count, const int64_t *pos0) {
  return pack_block(r, g->branch, g->mine, g->npieces, buf, elems, at, count, pos0);
}

int group_sees(const rank_ctx *r, const ring_group *g, int64_t origin) { return sees(r, g, g->pos, origin); }

ra_status group_attend(rank_ctx *r, const ring_group *g, int64_t origin, void *buf, int64_t elems,
                       const int64_t *at, const int64_t *count, const int64_t *pos0, int backward) {
  const int64_t ns = r->plan->num_slots[g->branch];
  int64_t qs[2], ks[2];
  member_starts(r, g, g->pos, qs);
  member_starts(r, g, origin, ks);
  if (!sees(r, g, g->pos, origin)) {
    r->stats->steps_skipped++;
    return RA_OK;
  }
  r->stats->steps++;
  for (int a = 0; a < g->npieces; a++)
    for (int b = 0; b < g->npieces; b++) {
      if (!chunk_sees(r, g->branch, qs[a], ks[b])) continue;
      const kv_source src = packed_source(r, buf, elems, at + b * ns, count + b * ns, pos0 + b * ns);
      RA_TRY(attend_block(r, g->branch, &r->pc[g->mine[a]], r->C, 1, &src, backward));
    }
  return RA_OK;
}

ra_status group_scatter_home(rank_ctx *r, const ring_group *g, void *buf, int64_t elems, const int64_t *at,
                             const int64_t *count, const int64_t *pos0) {
  const ra_plan *plan = r->plan;
  const int64_t H = r->cfg->num_heads, d = r->cfg->head_dim, Hkv = r->Hkv, ns = plan->num_slots[g->branch];
  const int64_t rate = plan->branch[g->branch].rate;
  for (int t = 0; t < g->npieces; t++) {
    const rank_piece *pc = &r->pc[g->mine[t]];
    const kv_source home = packed_source(r, buf, elems, at, count, pos0);
    int64_t n = 0;
    for (int64_t bb = 0; bb < r->cfg->batch; bb++)
      for (int64_t s = 0; s < ns; s++) {
        const int64_t e = t * ns + s, kv = ra_kv_head(plan, plan->slot_head[g->branch * H + s]);
        ra_copy_task *c = &r->copies[n++];
        c->src = bb * home.dkv_stride_b + at[e];
        c->dst = ((bb * r->C + (pos0[e] - pc->start)) * Hkv + kv) * d;
        c->count = count[e];
      }
    ra_scatter_batch sk = {d, home.dk, pc->dk_acc, rate * Hkv * d, r->copies, n};
    ra_scatter_batch sv = {d, home.dv, pc->dv_acc, rate * Hkv * d, r->copies, n};
    RA_TRY(r->be->ops->scatter_add(r->be->ctx, &sk));
    RA_TRY(r->be->ops->scatter_add(r->be->ctx, &sv));
  }
  return r->be->ops->sync(r->be->ctx);
}
