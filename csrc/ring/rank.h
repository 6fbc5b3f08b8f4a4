/*
 * rank.h -- what the files of one rank's ring share (internal to csrc/ring/):
 * the rank's context, key/value sources, and the helpers of driver.c that
 * the streamed sub-ring (stream.c) computes and packs with.
 */
#ifndef RINGATTN_RANK_H
#define RINGATTN_RANK_H

#include <string.h>

#include "ring/driver.h"

/* One chunk of the sequence a rank holds: the whole shard for the
 * contiguous partition, chunk j or 2k-1-j of a zigzag rank.  Its tensors
 * are views at its first row; its accumulators have its C rows. */
typedef struct rank_piece {
  int64_t start;         /* global position of its first row             */
  ra_tensor q, k, v, o;  /* views at its first row (k, v: h_kv heads)    */
  ra_tensor dout, dq, dk, dv;
  void *lse_out;         /* the caller's lse at its first row, or NULL   */
  float *acc, *lse;      /* [b][C][h][d] and [b][h][lse_ld], backend memory */
  int64_t lse_ld;
  /* backward only: acc is dQ, lse the forward's final lse (the caller's) */
  const float *delta;    /* [b][h][C] */
  float *dk_acc, *dv_acc; /* [b][C][h_kv][d] accumulators of its own keys */
} rank_piece;

/* Everything one rank needs during a call. */
typedef struct rank_ctx {
  const ra_call *call;
  const ra_plan *plan;
  const ra_config *cfg;
  const ra_transport *tr;
  const ra_backend *be;
  ra_stats *stats;
  int64_t C;             /* rows of a piece: L (contiguous), L/2 (zigzag) */
  int64_t Hkv;           /* key/value heads                             */
  int npieces;           /* 1 (contiguous) or 2 (zigzag)                 */
  rank_piece pc[2];
  size_t acc_es;         /* bytes of an accumulator / lse element    */
  ra_attend_task *tasks; /* scratch for one step's task list          */
  ra_copy_task *copies;  /* scratch for one block's packing list       */
  int64_t *tables;       /* per-slot layouts of two blocks of two pieces (12 h) */
  size_t task_bytes, copy_bytes, table_bytes;
  int64_t n_acc, n_kv, n_rows; /* elements of a piece's accumulator, dK/dV accumulator, lse */
  size_t acc_bytes, kv_bytes, row_bytes;
  int64_t held;          /* caller-owned bytes counted for this rank    */
} rank_ctx;

/* Where the keys/values of each slot of a branch (a key/value head with an
 * offset, ra_plan) are read from: token t of slot s in batch bb is at
 * k + bb*k_stride_b + k_at[s] + t*k_stride_t (and likewise for v, whose
 * strides may differ from k's). */
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

/* ---------------------------------------------------- driver.c's helpers */

/* Backend memory counted in the rank's stats. */
void *be_alloc(rank_ctx *r, size_t bytes);
void be_free(rank_ctx *r, void *p, size_t bytes);

/* Attend the active queries of piece qp in `branch`, in the windows
 * [w*wlen, (w+1)*wlen) of the piece (w < nwin; each inside one segment),
 * to the keys/values of `src`.  A backward call is split so that no two
 * tasks of one backend call add to the same dK/dV rows (query heads that
 * share a key/value head). */
ra_status attend_block(rank_ctx *r, int branch, const rank_piece *qp, int64_t wlen, int64_t nwin,
                       const kv_source *src, int backward);

/* Layout of a packed block of `branch` made of `npieces` chunks starting
 * at the global positions starts[]: per entry t * ns + s (piece t, slot s
 * of ra_plan.num_slots[branch]) its offset in a batch's keys, its count and
 * the position of its first key; per batch the entries in that order, keys
 * then values.  Returns the block's key+value elements, -1 if they do not
 * fit an int64_t. */
int64_t packed_layout(const rank_ctx *r, int branch, const int64_t *starts, int npieces, int64_t *at,
                      int64_t *count, int64_t *pos0);

/* A packed block (with its dK/dV after the values in the backward) as a
 * source; at/count/pos0 are the entries of one of its pieces. */
kv_source packed_source(const rank_ctx *r, void *buf, int64_t elems, const int64_t *at, const int64_t *count,
                        const int64_t *pos0);

/* Bytes of a packed block of `elems` key+value elements (with dK/dV in the
 * backward); 0 when they do not fit. */
int64_t block_bytes(const rank_ctx *r, int64_t elems, int backward);

/* Gather the keys and values of this rank's pieces mine[0..npieces) into
 * buf, laid out by packed_layout (their starts). */
ra_status pack_block(rank_ctx *r, int branch, const int *mine, int npieces, void *buf, int64_t elems,
                     const int64_t *at, const int64_t *count, const int64_t *pos0);

/* ------------------------------------------------------- partition.c */

/* One sub-ring of a spanning branch as this rank sees it (partition.c):
 * the ranks of one segment (zigzag: of a segment and its mirror, or of the
 * middle segment), each member's block its chunks there, packed.  Blocks
 * travel from position x to x + 1 (mod m). */
typedef struct ring_group {
  int branch;
  int64_t m, pos;     /* members, this rank's position                     */
  int64_t rank0, dir; /* member x is rank rank0 + dir * x                  */
  int64_t chunk0;     /* member x's first chunk is chunk0 + x (chunks of C) */
  int npieces;        /* chunks per member: 1 (contiguous), or 2 (zigzag:
                       * chunk0 + x and its mirror 2k-1-(chunk0 + x))      */
  int mine[2];        /* this rank's pieces (rank_ctx.pc) in member order  */
} ring_group;

/* The sub-rings of a spanning branch this rank takes part in, run one
 * after the other (one, as partitions are now; the loop keeps the door
 * open); returns their number. */
int ring_groups(const rank_ctx *r, int branch, ring_group g[2]);

/* The rank of member x (any x: taken mod m). */
int group_rank(const ring_group *g, int64_t x);

/* Does member p receive a block at step s (1 <= s < m)?  Only while p or a
 * member after it on the block's way can see one of its keys (causal). */
int group_receives(const rank_ctx *r, const ring_group *g, int64_t p, int64_t s);

/* packed_layout of member x's block (tables of 2 * num_slots entries). */
int64_t group_layout(const rank_ctx *r, const ring_group *g, int64_t x, int64_t *at, int64_t *count,
                     int64_t *pos0);

/* Pack this rank's own block (laid out by group_layout(g, g->pos)). */
ra_status group_pack(rank_ctx *r, const ring_group *g, void *buf, int64_t elems, const int64_t *at,
                     const int64_t *count, const int64_t *pos0);

/* Can this rank's queries see a key of the block from member `origin`? */
int group_sees(const rank_ctx *r, const ring_group *g, int64_t origin);

/* Attend this rank's queries in the group to the block that came from
 * member `origin` (laid out by group_layout), skipping the pairs of chunks
 * that causality hides; counts the step (computed or skipped). */
ra_status group_attend(rank_ctx *r, const ring_group *g, int64_t origin, void *buf, int64_t elems,
                       const int64_t *at, const int64_t *count, const int64_t *pos0, int backward);

/* Backward: add the dK/dV of this rank's own block, home after its loop,
 * into its pieces' accumulators. */
ra_status group_scatter_home(rank_ctx *r, const ring_group *g, void *buf, int64_t elems, const int64_t *at,
                             const int64_t *count, const int64_t *pos0);

/* ------------------------------------------------------------ stream.c */

/* A spanning branch's sub-ring, forward and backward, its blocks streamed in
 * sub-blocks through two slots. */
ra_status run_spanning_branch(rank_ctx *r, int branch, int64_t *tables);
ra_status run_spanning_backward(rank_ctx *r, int branch, int64_t *tables);

#endif /* RINGATTN_RANK_H */
