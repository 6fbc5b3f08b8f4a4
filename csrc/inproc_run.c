/*
 * inproc_run.c -- run every rank of a plan as a thread of this process.
 *
 * Each rank thread gets views of only its own shards and talks to the
 * others through the in-process transport, exactly as separate processes
 * would through MPI or NCCL; nothing here knows the algorithm.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

typedef struct rank_job {
  const ra_plan *plan;
  ra_transport tr;
  int backward;
  ra_tensor q, k, v, o;
  void *lse;             /* float, or double for RA_FLOAT64 */
  int64_t lse_ld;
  ra_tensor dout, dq, dk, dv; /* backward only */
  ra_exec exec;
  ra_stats *stats;
} rank_job;

static ra_tensor shard(ra_tensor t, int64_t first, size_t es) {
  if (t.data) t.data = (char *)t.data + (size_t)(first * t.stride_n) * es;
  return t;
}

/* Refuse non-finite inputs before any rank starts. */
static ra_status check_inputs(const ra_config *c, const ra_tensor *t, const char *const *names, int count,
                              int threads) {
  for (int i = 0; i < count; i++)
    if (t[i].data && !ra_tensor_finite(t[i], c->dtype, c->batch, c->seq_len, c->num_heads, c->head_dim, threads))
      return ra_fail(RA_ERR_NONFINITE, "%s contains NaN or Inf (nan_policy=\"raise\")", names[i]);
  return RA_OK;
}

/* ------------------------------------------------- rank threads, generic */

typedef struct rank_thread {
  ra_rank_fn fn;
  void *arg;
  int rank;
  ra_transport tr;
  ra_status status;
  char message[512];
} rank_thread;

static void *rank_thread_main(void *p) {
  rank_thread *t = p;
  t->status = t->fn(t->arg, t->rank);
  if (t->status != RA_OK) {
    snprintf(t->message, sizeof t->message, "%s", ra_last_error());
    t->tr.ops->abort(t->tr.ctx); /* no peer may wait for this rank forever */
  }
  return NULL;
}

ra_status ra_run_rank_threads(ra_inproc_world *world, int ranks, ra_rank_fn fn, void *arg) {
  rank_thread *t = calloc((size_t)ranks, sizeof *t);
  pthread_t *tid = calloc((size_t)ranks, sizeof *tid);
  if (!t || !tid) {
    free(t);
    free(tid);
    return ra_fail(RA_ERR_OUT_OF_MEMORY, "could not allocate %d rank threads", ranks);
  }
  for (int r = 0; r < ranks; r++) t[r] = (rank_thread){fn, arg, r, ra_inproc_transport(world, r), RA_OK, ""};
  int started = 1;
  for (int r = 1; r < ranks; r++, started++)
    if (pthread_create(&tid[r], NULL, rank_thread_main, &t[r]) != 0) {
      t[r].status = ra_fail(RA_ERR_INTERNAL, "could not start the thread of rank %d", r);
      snprintf(t[r].message, sizeof t[r].message, "%s", ra_last_error());
      t[0].tr.ops->abort(t[0].tr.ctx); /* a rank that never runs must not be waited for */
      break;
    }
  rank_thread_main(&t[0]); /* rank 0 on the calling thread */
  for (int r = 1; r < started; r++) pthread_join(tid[r], NULL);
  /* Report the root cause: a rank's own failure before its peers' echoes. */
  ra_status result = RA_OK;
  for (int pass = 0; pass < 2 && result == RA_OK; pass++)
    for (int r = 0; r < ranks; r++)
      if (t[r].status != RA_OK && (pass == 1 || t[r].status != RA_ERR_TRANSPORT)) {
        result = ra_fail(t[r].status, "%s", t[r].message);
        break;
      }
  free(t);
  free(tid);
  return result;
}

static ra_status run_job(void *arg, int rank) {
  rank_job *j = (rank_job *)arg + rank;
  if (j->backward)
    return ra_ring_backward(j->plan, &j->tr, j->q, j->k, j->v, j->o, j->dout, j->lse, j->lse_ld, j->dq, j->dk,
                            j->dv, &j->exec, j->stats);
  return ra_ring_forward(j->plan, &j->tr, j->q, j->k, j->v, j->o, j->lse, j->lse_ld, &j->exec, j->stats);
}

/* Fill one job per rank with views of its shards and run them. */
static ra_status run_inproc(const ra_plan *plan, int backward, const ra_tensor *full, void *lse,
                            const ra_exec *exec, ra_stats *stats) {
  if (!plan) return ra_fail(RA_ERR_INVALID_ARGUMENT, "plan is NULL");
  const ra_config *c = &plan->cfg;
  const int ranks = c->world_size;
  const int64_t L = plan->local_len;
  const size_t es = ra_dtype_size(c->dtype), lse_es = ra_acc_size(c->dtype);
  const int threads = exec && exec->num_threads > 0 ? exec->num_threads : ra_default_num_threads();
  static const char *const names[] = {"q", "k", "v", "dout"};
  if (exec && exec->check_finite) {
    const ra_tensor in[4] = {full[0], full[1], full[2], backward ? full[4] : (ra_tensor){0}};
    RA_TRY(check_inputs(c, in, names, 4, threads));
  }
  ra_inproc_world *world;
  RA_TRY(ra_inproc_world_create(ranks, &world));
  rank_job *jobs = calloc((size_t)ranks, sizeof *jobs);
  ra_stats *st = stats ? stats : calloc((size_t)ranks, sizeof *st);
  ra_status result = RA_OK;
  if (!jobs || !st) {
    result = ra_fail(RA_ERR_OUT_OF_MEMORY, "could not allocate %d rank jobs", ranks);
  } else {
    for (int r = 0; r < ranks; r++) {
      rank_job *j = &jobs[r];
      ra_tensor *views[8] = {&j->q, &j->k, &j->v, &j->o, &j->dout, &j->dq, &j->dk, &j->dv};
      j->plan = plan;
      j->tr = ra_inproc_transport(world, r);
      j->backward = backward;
      for (int i = 0; i < (backward ? 8 : 4); i++) *views[i] = shard(full[i], r * L, es);
      j->lse = lse ? (char *)lse + (size_t)(r * L) * lse_es : NULL;
      j->lse_ld = c->seq_len;
      j->exec = (ra_exec){threads / ranks > 0 ? threads / ranks : 1, 0}; /* inputs checked above */
      j->stats = &st[r];
    }
    result = ra_run_rank_threads(world, ranks, run_job, jobs);
  }
  free(jobs);
  if (!stats) free(st);
  ra_inproc_world_destroy(world);
  return result;
}

ra_status ra_inproc_forward(const ra_plan *plan, ra_tensor q, ra_tensor k, ra_tensor v, ra_tensor o,
                            void *lse, const ra_exec *exec, ra_stats *stats) {
  const ra_tensor full[4] = {q, k, v, o};
  return run_inproc(plan, 0, full, lse, exec, stats);
}

ra_status ra_inproc_backward(const ra_plan *plan, ra_tensor q, ra_tensor k, ra_tensor v, ra_tensor o,
                             ra_tensor dout, const void *lse, ra_tensor dq, ra_tensor dk, ra_tensor dv,
                             const ra_exec *exec, ra_stats *stats) {
  const ra_tensor full[8] = {q, k, v, o, dout, dq, dk, dv};
  return run_inproc(plan, 1, full, (void *)lse, exec, stats); /* the backward only reads lse */
}
