/*
 * ranks.c -- every rank of a call as a thread of this process.
 *
 * Each rank thread gets a view of the call holding only its own shards and
 * talks to the others through the in-process transport, exactly as
 * separate processes would through MPI or NCCL; nothing here knows the
 * algorithm or the backend beyond its interface.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ring/driver.h"

/* ------------------------------------------------------------ rank views */

/* Bytes from a tensor's data to position `first` (checked, internal.h). */
static int shard_bytes(const ra_tensor *t, int64_t first, size_t es, size_t *bytes) {
  int64_t elems;
  return ra_mul_ok(first, t->stride_n, &elems) && ra_bytes_ok(elems, es, bytes);
}

/* The tensor from position `first` on.  check_views has made sure that the
 * offset fits; should it not, the view has no data and the driver refuses it. */
static ra_tensor shard(ra_tensor t, int64_t first, size_t es) {
  size_t bytes;
  if (t.data) t.data = shard_bytes(&t, first, es, &bytes) ? (char *)t.data + bytes : NULL;
  return t;
}

/* Every rank's view is addressable: offsets grow with the rank (strides
 * are non-negative), so checking the last rank's covers them all. */
static ra_status check_views(const ra_call *call) {
  const ra_config *c = &call->plan->cfg;
  const size_t es = ra_dtype_size(c->dtype);
  int64_t first;
  size_t bytes;
  /* the furthest chunk from its tensors' data: the last rank's (contiguous),
   * rank 0's second (zigzag: chunk 2k-1, n - C) */
  const int64_t last = c->partition == RA_PARTITION_ZIGZAG ? 2 * (int64_t)c->world_size - 1 : c->world_size - 1;
  if (!ra_mul_ok(last, call->plan->chunk_len, &first))
    return ra_fail(RA_ERR_INVALID_ARGUMENT, "world_size=%d: the shard offsets do not fit", c->world_size);
  const ra_tensor *t[8] = {&call->p.fwd.q, &call->p.fwd.k, &call->p.fwd.v, &call->p.fwd.o,
                           &call->p.dout,  &call->p.dq,    &call->p.dk,    &call->p.dv};
  static const char *const names[8] = {"q", "k", "v", "out", "dout", "dq", "dk", "dv"};
  for (int i = 0; i < 8; i++)
    if (t[i]->data && !shard_bytes(t[i], first, es, &bytes))
      return ra_fail(RA_ERR_INVALID_ARGUMENT, "%s: the offset of the last rank's shard does not fit", names[i]);
  if (call->p.fwd.lse && !ra_bytes_ok(first, ra_acc_size(c->dtype), &bytes))
    return ra_fail(RA_ERR_INVALID_ARGUMENT, "lse: the offset of the last rank's shard does not fit");
  return RA_OK;
}

ra_call ra_rank_view(const ra_call *call, int rank) {
  const ra_config *c = &call->plan->cfg;
  const int64_t L = call->plan->local_len, C = call->plan->chunk_len, first = rank * C;
  const size_t es = ra_dtype_size(c->dtype);
  ra_call v = *call;
  ra_fwd_params *f = &v.p.fwd;
  v.rank = rank;
  v.rows = L;
  /* zigzag: chunks rank and 2k-1-rank, the second (2k-1-2 rank) C rows on */
  v.second_row = c->partition == RA_PARTITION_ZIGZAG ? (2 * (int64_t)c->world_size - 1 - 2 * rank) * C : 0;
  f->q = shard(f->q, first, es);
  f->k = shard(f->k, first, es);
  f->v = shard(f->v, first, es);
  f->o = shard(f->o, first, es);
  v.p.dout = shard(v.p.dout, first, es);
  v.p.dq = shard(v.p.dq, first, es);
  v.p.dk = shard(v.p.dk, first, es);
  v.p.dv = shard(v.p.dv, first, es);
  size_t lse_bytes = 0;
  if (f->lse) f->lse = ra_bytes_ok(first, ra_acc_size(c->dtype), &lse_bytes) ? (char *)f->lse + lse_bytes : NULL;
  f->stats = call->p.fwd.stats + rank;
  /* the ranks share the call's threads */
  const int ranks = c->world_size;
  f->exec.num_threads = f->exec.num_threads / ranks > 0 ? f->exec.num_threads / ranks : 1;
  return v;
}

/* ------------------------------------------------------------- one rank */

ra_status ra_run_rank(const ra_backend_iface *iface, void *shared, const ra_call *rank_call,
                      const ra_transport *tr) {
  ra_backend be;
  memset(&be, 0, sizeof be);
  ra_status st = iface->rank_open(shared, rank_call, &be);
  if (st == RA_OK) {
    st = ra_ring_rank(rank_call, tr, &be);
    iface->rank_close(&be);
  }
  if (st != RA_OK && tr->ops->abort) tr->ops->abort(tr->ctx); /* no peer may wait for it forever */
  return st;
}

/* ------------------------------------------------------------- threads */

typedef struct rank_thread {
  const ra_call *call;
  const ra_backend_iface *iface;
  void *shared;
  ra_call view;
  ra_transport tr;
  ra_status status;
  char message[512];
} rank_thread;

static void *rank_thread_main(void *p) {
  rank_thread *t = p;
  t->status = ra_run_rank(t->iface, t->shared, &t->view, &t->tr);
  if (t->status != RA_OK) snprintf(t->message, sizeof t->message, "%s", ra_last_error());
  return NULL;
}

/* Start ranks 1.. on threads of their own and run rank 0 here.  The result
 * is the root cause: a rank's own failure before its peers' echoes. */
static ra_status run_threads(rank_thread *t, int ranks) {
  pthread_t *tid = calloc((size_t)ranks, sizeof *tid);
  if (!tid) return ra_fail(RA_ERR_OUT_OF_MEMORY, "could not allocate %d rank threads", ranks);
  int started = 1;
  for (int r = 1; r < ranks; r++, started++)
    if (pthread_create(&tid[r], NULL, rank_thread_main, &t[r]) != 0) {
      t[r].status = ra_fail(RA_ERR_INTERNAL, "could not start the thread of rank %d", r);
      snprintf(t[r].message, sizeof t[r].message, "%s", ra_last_error());
      t[0].tr.ops->abort(t[0].tr.ctx); /* a rank that never runs must not be waited for */
      break;
    }
  rank_thread_main(&t[0]);
  for (int r = 1; r < started; r++) pthread_join(tid[r], NULL);
  free(tid);
  ra_status result = RA_OK;
  for (int pass = 0; pass < 2 && result == RA_OK; pass++)
    for (int r = 0; r < ranks; r++)
      if (t[r].status != RA_OK && (pass == 1 || t[r].status != RA_ERR_TRANSPORT)) {
        result = ra_fail(t[r].status, "%s", t[r].message);
        break;
      }
  return result;
}

ra_status ra_run_ranks(const ra_call *call, const ra_backend_iface *iface) {
  const int ranks = call->plan->cfg.world_size;
  void *shared = NULL;
  RA_TRY(check_views(call));
  RA_TRY(iface->call_open ? iface->call_open(call, &shared) : RA_OK);
  ra_inproc_world *world = NULL;
  rank_thread *t = NULL;
  ra_status st = ra_inproc_world_create(ranks, &world);
  if (st == RA_OK && !(t = calloc((size_t)ranks, sizeof *t)))
    st = ra_fail(RA_ERR_OUT_OF_MEMORY, "could not allocate %d rank jobs", ranks);
  if (st == RA_OK) {
    if (iface->copy) ra_inproc_world_set_copy(world, iface->copy, shared);
    for (int r = 0; r < ranks; r++) {
      t[r].call = call;
      t[r].iface = iface;
      t[r].shared = shared;
      t[r].view = ra_rank_view(call, r);
      t[r].tr = ra_inproc_transport(world, r);
    }
    st = run_threads(t, ranks);
  }
  free(t);
  if (world) ra_inproc_world_destroy(world);
  if (iface->call_close) iface->call_close(shared);
  return st;
}
