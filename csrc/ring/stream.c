/*
 * stream.c -- a spanning branch's sub-ring, its blocks streamed in sub-blocks.
 *
 * A block (one rank's packed active keys and values of a branch, with their
 * dK/dV accumulators in the backward) does not travel whole.  It is cut
 * into `nsub` sub-blocks of at most 1/S of it, S = ra_ring_sub_blocks: the
 * entries of its layout (a key/value run of one head of the branch in one
 * of the member's chunks) in groups of floor(E/S) when there are E >= S of
 * them, else each entry's keys in ceil(S/E) runs (sub_geometry) -- and
 * each sub-ring (ring_group, partition.c) is walked once per sub-block index j: sub-block j of
 * every rank's block makes the journey a whole block used to make, through
 * two slots of one sub-block each (the one computed on and sent on, and the
 * one arriving).  A rank so holds two sub-blocks in flight instead of two
 * blocks, 2/nsub of a block, and each step still overlaps its transfer with
 * its compute: a sub-block's compute (all the rank's queries against 1/nsub
 * of the keys) and its transfer shrink alike, so their ratio is the block's.
 *
 * Walk j, step s (0..m-1): member p computes on sub-block j of the block
 * that originated at member p - s.  Forward: while it computes, the same
 * sub-block is sent on to p + 1 and the next one received from p - 1 (with
 * causality only while a downstream rank still needs it, as for whole
 * blocks).  Backward: the sub-block travels the whole loop home with its
 * dK/dV, sent on only once this rank's share is added; the next one is
 * received meanwhile; at home its dK/dV are added into the rank's own.
 *
 * The number of sub-blocks is an execution setting (ra_ring_sub_blocks):
 * 8 on the CPU; 1 -- whole blocks, the path that ran on GPUs -- for CUDA
 * tensors unless exec.ring_sub_blocks asks for more, since streaming has
 * not run on a GPU yet.  Every rank derives the same geometry from the plan
 * and that number (the agreement compares it between processes).
 *
 * Memory (counted in the rank's stats; ring_buffer_bytes records it): two
 * slots, each as large as the largest sub-block of the sub-ring's blocks:
 * 2 b d (its keys) elements of the input dtype, plus as many accumulator
 * elements in the backward.  tests/memory_model.py has the same formula.
 */
#include <string.h>

#include "ring/rank.h"

#define SUB_BLOCKS_CPU 8     /* default on the CPU: 2/8 of a block in flight */
#define SUB_BLOCKS_MAX 4096  /* a sanity bound on exec.ring_sub_blocks      */

int ra_ring_sub_blocks(const ra_fwd_params *p) {
  const int want = p->exec.ring_sub_blocks;
  if (want > 0) return want < SUB_BLOCKS_MAX ? want : SUB_BLOCKS_MAX;
  return p->device_type == RA_DEVICE_CUDA ? 1 : SUB_BLOCKS_CPU;
}

/* One sub-ring of a spanning branch (ring_group, partition.c) as this
 * rank walks it: the sub-block geometry, the two slots with the layout of
 * the sub-block each holds, and the transfers in flight. */
typedef struct sub_ring {
  const ring_group *g;
  int backward;
  int64_t entries;                     /* entries of a block's layout          */
  int64_t rate;
  /* the geometry (sub_geometry): a sub-block is `per` consecutive entries
   * whole (chunks == 1), or one entry's keys j*rows .. (j+1)*rows - 1 */
  int64_t per, chunks, rows, nsub;
  void *slot[2];
  size_t slot_bytes;
  int64_t elems[2];                    /* elements of the sub-block in slot i  */
  int64_t *at[2], *count[2], *pos0[2]; /* its per-entry layout                 */
  int cur, sending, receiving;
  ra_request sreq, rreq;
} sub_ring;

static int64_t mod(int64_t x, int64_t m) { return ((x % m) + m) % m; }

/* How a block of `entries` runs of at most `most` keys is cut into about
 * `want` sub-blocks of at most 1/want of it.  Whole entries when there are
 * enough: the kernel then meets each query row once per block, as with
 * whole blocks (cutting an entry's keys makes every query of its head
 * start and merge once more per cut, which costs about 1% per cut at 256
 * keys a cut on the CPU).  Otherwise each entry's keys are cut in
 * ceil(want / entries) runs. */
static void sub_geometry(sub_ring *w, int64_t most, int64_t want) {
  const int64_t E = w->entries;
  w->per = 1;
  w->chunks = 1;
  w->rows = most > 0 ? most : 1;
  if (E >= want) {
    w->per = E / want;
    w->nsub = (E + w->per - 1) / w->per;
  } else if (E > 0) {
    const int64_t cuts = (want + E - 1) / E;
    w->rows = (w->rows + cuts - 1) / cuts;
    w->chunks = (most + w->rows - 1) / w->rows;
    if (w->chunks < 1) w->chunks = 1;
    w->nsub = E * w->chunks;
  } else {
    w->nsub = 1;
  }
}

/* Lay out in slot i sub-block j of the block of member x: the entries
 * (a piece's slot of the branch, packed_layout) in the same order, those
 * outside the sub-block empty.  Its elements, -1 if the whole block does
 * not fit an int64_t. */
static int64_t sub_layout(const rank_ctx *r, sub_ring *w, int i, int64_t x, int64_t j) {
  const int64_t d = r->cfg->head_dim, np = w->g->npieces, ns = w->entries / np;
  const int64_t o0 = w->chunks == 1 ? j * w->per : j / w->chunks;
  const int64_t o1 = w->chunks == 1 ? o0 + w->per : o0 + 1, first = w->chunks == 1 ? 0 : j % w->chunks * w->rows;
  int64_t *at = w->at[i], *count = w->count[i], *pos0 = w->pos0[i], per_batch = 0;
  if (group_layout(r, w->g, x, at, count, pos0) < 0) return -1;
  for (int64_t e = 0; e < w->entries; e++) { /* below the whole block's sizes: no wrap */
    /* Sub-blocks take entries in stream order o: a slot's pieces together
     * (the layout, e, is piece-major).  Every sub-block then holds the same
     * share of each piece, so each step's work stays balanced across ranks
     * sub-block by sub-block as it is block by block (zigzag: a block's two
     * chunks cost different ranks different work). */
    const int64_t o = (e % ns) * np + e / ns;
    const int64_t left = o < o0 || o >= o1 ? 0 : count[e] - first;
    const int64_t n = left <= 0 ? 0 : left < w->rows ? left : w->rows;
    if (n > 0) pos0[e] += first * w->rate;
    at[e] = per_batch;
    count[e] = n;
    per_batch += n * d;
  }
  return 2 * r->cfg->batch * per_batch;
}

static int64_t slot_bytes_of(const rank_ctx *r, const sub_ring *w, int i) {
  return block_bytes(r, w->elems[i], w->backward);
}

/* Choose the sub-blocks of this sub-ring and allocate the two slots, each
 * as large as the largest sub-block of its members' blocks.  `tables` has
 * room for the layouts of two blocks. */
static ra_status sub_ring_open(rank_ctx *r, const ring_group *g, int backward, int64_t *tables, sub_ring *w) {
  const ra_branch_info *bi = &r->plan->branch[g->branch];
  memset(w, 0, sizeof *w);
  w->g = g;
  w->backward = backward;
  w->entries = (int64_t)g->npieces * r->plan->num_slots[g->branch];
  for (int i = 0; i < 2; i++) {
    w->at[i] = tables + 3 * i * w->entries;
    w->count[i] = w->at[i] + w->entries;
    w->pos0[i] = w->at[i] + 2 * w->entries;
  }
  /* at most ceil(C / r) active keys per entry (a piece of C rows) */
  const int64_t most = (r->C + bi->rate - 1) / bi->rate, want = ra_ring_sub_blocks(&r->call->p.fwd);
  w->rate = bi->rate;
  sub_geometry(w, most, want);
  int64_t cap = 0;
  for (int64_t x = 0; x < g->m && cap >= 0; x++)
    for (int64_t j = 0; j < w->nsub && cap >= 0; j++) {
      const int64_t e = sub_layout(r, w, 0, x, j);
      cap = e < 0 ? -1 : e > cap ? e : cap;
    }
  const size_t bytes = cap < 0 ? 0 : (size_t)block_bytes(r, cap, backward);
  if (cap < 0 || (cap > 0 && !bytes))
    return ra_fail(RA_ERR_INVALID_ARGUMENT,
                   "the ring blocks of segment_lengths[%d] are larger than this machine can address", g->branch);
  w->slot[0] = be_alloc(r, bytes);
  w->slot[1] = be_alloc(r, bytes);
  if (!w->slot[0] || !w->slot[1]) {
    be_free(r, w->slot[0], bytes);
    be_free(r, w->slot[1], bytes);
    w->slot[0] = w->slot[1] = NULL;
    return ra_fail(RA_ERR_OUT_OF_MEMORY, "could not allocate the ring buffers of rank %d", r->tr->rank);
  }
  w->slot_bytes = bytes;
  if ((int64_t)(2 * bytes) > r->stats->ring_buffer_bytes) r->stats->ring_buffer_bytes = (int64_t)(2 * bytes);
  return RA_OK;
}

/* Finish a walk: after a failure with transfers in flight, tell the peers
 * and let the transport finish them before the slots go. */
static ra_status sub_ring_close(rank_ctx *r, sub_ring *w, ra_status st) {
  if (w->sending || w->receiving) {
    if (r->tr->ops->abort) r->tr->ops->abort(r->tr->ctx);
    if (w->receiving) r->tr->ops->wait(r->tr->ctx, &w->rreq);
    if (w->sending) r->tr->ops->wait(r->tr->ctx, &w->sreq);
  }
  be_free(r, w->slot[0], w->slot_bytes);
  be_free(r, w->slot[1], w->slot_bytes);
  return st;
}

/* Pack this rank's own sub-block j into the current slot (with zeroed dK/dV
 * accumulators in the backward). */
static ra_status pack_own(rank_ctx *r, sub_ring *w, int64_t j) {
  const int i = w->cur;
  w->elems[i] = sub_layout(r, w, i, w->g->pos, j);
  if (w->backward) {
    const kv_source own = packed_source(r, w->slot[i], w->elems[i], w->at[i], w->count[i], w->pos0[i]);
    RA_TRY(r->be->ops->init_state(r->be->ctx, own.dk, w->elems[i], NULL, 0));
  }
  return group_pack(r, w->g, w->slot[i], w->elems[i], w->at[i], w->count[i], w->pos0[i]);
}

/* Lay out the other slot for the sub-block received at step s + 1. */
static void layout_next(rank_ctx *r, sub_ring *w, int64_t j, int64_t s) {
  const int n = 1 - w->cur;
  w->elems[n] = sub_layout(r, w, n, mod(w->g->pos - (s + 1), w->g->m), j);
}

/* Attend this rank's queries to the current sub-block (step s: from member
 * pos - s).  group_attend counts a step per call; steps are per block, so
 * only sub-block 0 keeps its count. */
static ra_status attend_current(rank_ctx *r, sub_ring *w, int64_t j, int64_t s) {
  const int64_t steps = r->stats->steps, skipped = r->stats->steps_skipped;
  const int i = w->cur;
  RA_TRY(group_attend(r, w->g, mod(w->g->pos - s, w->g->m), w->slot[i], w->elems[i], w->at[i], w->count[i],
                      w->pos0[i], w->backward));
  if (j > 0) {
    r->stats->steps = steps;
    r->stats->steps_skipped = skipped;
  }
  return RA_OK;
}

/* Wait for the step's transfers: receive before send, since a send may
 * complete only when its receiver waits. */
static ra_status wait_transfers(rank_ctx *r, sub_ring *w) {
  ra_status st = RA_OK;
  if (w->receiving && (w->receiving = 0, st = r->tr->ops->wait(r->tr->ctx, &w->rreq)) != RA_OK) return st;
  if (w->sending && (w->sending = 0, st = r->tr->ops->wait(r->tr->ctx, &w->sreq)) != RA_OK) return st;
  return RA_OK;
}

/* Send the current slot on to member pos + 1. */
static ra_status send_current(rank_ctx *r, sub_ring *w) {
  const int64_t bytes = slot_bytes_of(r, w, w->cur);
  RA_TRY(r->tr->ops->isend(r->tr->ctx, w->slot[w->cur], (size_t)bytes, group_rank(w->g, w->g->pos + 1),
                           w->g->branch, &w->sreq));
  w->sending = 1;
  r->stats->bytes_sent += bytes;
  return RA_OK;
}

/* Receive into the other slot from member pos - 1. */
static ra_status receive_next(rank_ctx *r, sub_ring *w) {
  const int n = 1 - w->cur;
  const int64_t bytes = slot_bytes_of(r, w, n);
  RA_TRY(r->tr->ops->irecv(r->tr->ctx, w->slot[n], (size_t)bytes, group_rank(w->g, w->g->pos - 1 + w->g->m),
                           w->g->branch, &w->rreq));
  w->receiving = 1;
  r->stats->bytes_received += bytes;
  return RA_OK;
}

/* ------------------------------------------------------------- forward */

/* Walk j of the forward: sub-block j of every member's block. */
static ra_status forward_walk(rank_ctx *r, sub_ring *w, int64_t j) {
  const ring_group *g = w->g;
  RA_TRY(pack_own(r, w, j));
  for (int64_t s = 0; s < g->m; s++) {
    if (s + 1 < g->m) {
      layout_next(r, w, j, s);
      if (group_receives(r, g, (g->pos + 1) % g->m, s + 1)) RA_TRY(send_current(r, w));
      if (group_receives(r, g, g->pos, s + 1)) RA_TRY(receive_next(r, w));
    }
    /* An asynchronous backend may still compute on the current slot while
     * the transport moves data (reading it, writing the other): the sync
     * makes sure it is done before the next step's receive overwrites it. */
    RA_TRY(attend_current(r, w, j, s));
    RA_TRY(wait_transfers(r, w));
    RA_TRY(r->be->ops->sync(r->be->ctx));
    if (s + 1 < g->m) w->cur = 1 - w->cur;
  }
  return RA_OK;
}

/* ------------------------------------------------------------ backward */

/* Walk j of the backward.  Each sub-block travels the whole sub-ring with
 * its dK/dV and after m transfers arrives home complete, to be added into
 * the rank's accumulators.  (Causality saves compute here, not traffic:
 * every sub-block makes the full loop home.) */
static ra_status backward_walk(rank_ctx *r, sub_ring *w, int64_t j) {
  RA_TRY(pack_own(r, w, j));
  if (w->g->m == 1) /* a zigzag rank alone in its segment: its block never leaves */
    RA_TRY(attend_current(r, w, j, 0));
  for (int64_t s = 0; s < w->g->m && w->g->m > 1; s++) {
    layout_next(r, w, j, s); /* at s = m - 1: this rank's own, coming home */
    RA_TRY(receive_next(r, w));
    RA_TRY(attend_current(r, w, j, s));
    RA_TRY(r->be->ops->sync(r->be->ctx)); /* its dK/dV are final here */
    RA_TRY(send_current(r, w));
    RA_TRY(wait_transfers(r, w));
    w->cur = 1 - w->cur;
  }
  const int i = w->cur;
  return group_scatter_home(r, w->g, w->slot[i], w->elems[i], w->at[i], w->count[i], w->pos0[i]);
}

/* ---------------------------------------------------------------- entry */

static ra_status run_groups(rank_ctx *r, int branch, int64_t *tables, int backward) {
  ring_group g[2];
  const int n = ring_groups(r, branch, g);
  ra_status st = RA_OK;
  for (int k = 0; k < n && st == RA_OK; k++) {
    sub_ring w;
    st = sub_ring_open(r, &g[k], backward, tables, &w);
    for (int64_t j = 0; j < w.nsub && st == RA_OK; j++)
      st = backward ? backward_walk(r, &w, j) : forward_walk(r, &w, j);
    st = sub_ring_close(r, &w, st);
  }
  return st;
}

ra_status run_spanning_branch(rank_ctx *r, int branch, int64_t *tables) {
  return run_groups(r, branch, tables, 0);
}

ra_status run_spanning_backward(rank_ctx *r, int branch, int64_t *tables) {
  return run_groups(r, branch, tables, 1);
}
