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
  ra_tensor q, k, v, o;
  float *lse;
  int64_t lse_ld;
  ra_exec exec;
  ra_stats *stats;
  ra_status status;
  char message[512];
} rank_job;

static void *rank_main(void *arg) {
  rank_job *j = arg;
  j->status = ra_ring_forward(j->plan, &j->tr, j->q, j->k, j->v, j->o, j->lse,
                              j->lse_ld, &j->exec, j->stats);
  if (j->status != RA_OK) snprintf(j->message, sizeof j->message, "%s", ra_last_error());
  return NULL;
}

static ra_tensor shard(ra_tensor t, int64_t first, size_t es) {
  t.data = (char *)t.data + (size_t)(first * t.stride_n) * es;
  return t;
}

ra_status ra_inproc_forward(const ra_plan *plan, ra_tensor q, ra_tensor k,
                            ra_tensor v, ra_tensor o, float *lse,
                            const ra_exec *exec, ra_stats *stats) {
  if (!plan) return ra_fail(RA_ERR_INVALID_ARGUMENT, "plan is NULL");
  const ra_config *c = &plan->cfg;
  const int ranks = c->world_size;
  const int64_t L = plan->local_len;
  const size_t es = ra_dtype_size(c->dtype);
  int threads = exec && exec->num_threads > 0 ? exec->num_threads : ra_default_num_threads();
  ra_exec rank_exec = {threads / ranks > 0 ? threads / ranks : 1, 0};

  if (exec && exec->check_finite) {
    const ra_tensor *t[3] = {&q, &k, &v};
    const char *name[3] = {"q", "k", "v"};
    for (int i = 0; i < 3; i++)
      if (t[i]->data && !ra_tensor_finite(*t[i], c->dtype, c->batch, c->seq_len, c->num_heads, c->head_dim, threads))
        return ra_fail(RA_ERR_NONFINITE, "%s contains NaN or Inf (nan_policy=\"raise\")", name[i]);
  }

  ra_inproc_world *world;
  RA_TRY(ra_inproc_world_create(ranks, &world));
  rank_job *jobs = calloc((size_t)ranks, sizeof *jobs);
  ra_stats *st = stats ? stats : calloc((size_t)ranks, sizeof *st);
  pthread_t *tid = calloc((size_t)ranks, sizeof *tid);
  if (!jobs || !st || !tid) {
    free(jobs);
    if (!stats) free(st);
    free(tid);
    ra_inproc_world_destroy(world);
    return ra_fail(RA_ERR_OUT_OF_MEMORY, "could not allocate %d rank jobs", ranks);
  }
  for (int r = 0; r < ranks; r++) {
    rank_job *j = &jobs[r];
    j->plan = plan;
    j->tr = ra_inproc_transport(world, r);
    j->q = shard(q, r * L, es);
    j->k = shard(k, r * L, es);
    j->v = shard(v, r * L, es);
    j->o = shard(o, r * L, es);
    j->lse = lse ? lse + r * L : NULL;
    j->lse_ld = c->seq_len;
    j->exec = rank_exec;
    j->stats = &st[r];
  }
  /* Rank 0 runs on the calling thread; a rank whose thread cannot start
   * runs nowhere, so the world is aborted and its peers return. */
  int started = 1;
  for (int r = 1; r < ranks; r++, started++)
    if (pthread_create(&tid[r], NULL, rank_main, &jobs[r]) != 0) {
      jobs[r].status = ra_fail(RA_ERR_INTERNAL, "could not start the thread of rank %d", r);
      snprintf(jobs[r].message, sizeof jobs[r].message, "%s", ra_last_error());
      ra_transport t0 = ra_inproc_transport(world, 0);
      t0.ops->abort(t0.ctx);
      break;
    }
  rank_main(&jobs[0]);
  for (int r = 1; r < started; r++) pthread_join(tid[r], NULL);

  /* Report the root cause: a rank's own failure before its peers' echoes. */
  ra_status result = RA_OK;
  const char *msg = "";
  for (int pass = 0; pass < 2 && result == RA_OK; pass++)
    for (int r = 0; r < ranks; r++)
      if (jobs[r].status != RA_OK && (pass == 1 || jobs[r].status != RA_ERR_TRANSPORT)) {
        result = jobs[r].status;
        msg = jobs[r].message;
        break;
      }
  if (result != RA_OK) ra_fail(result, "%s", msg);
  free(jobs);
  free(tid);
  if (!stats) free(st);
  ra_inproc_world_destroy(world);
  return result;
}
