/*
 * comm.c -- what all communicators share: the agreement that turns one
 * rank's failure into an error on every rank, and the distributed forward.
 *
 * A distributed run must never hang because one rank refused its input.
 * So before any ring traffic every rank contributes a fixed-size header --
 * its local status, message and configuration -- to an allgather, and all
 * ranks decide from the same table: go on together, or fail together with
 * the same cause.
 */
#include <stdio.h>
#include <string.h>

#include "internal.h"

#define AGREE_MAGIC 0x52415431 /* "RAT1" */

typedef struct agree_header {
  int32_t magic, status, has_cfg, pad;
  char message[256];
  ra_config cfg;
} agree_header;

/* Name the first field in which two configurations differ, or return 0. */
static int config_differs(const ra_config *a, const ra_config *b, char *what, size_t size) {
#define FIELD(name, fmt, cast)                                                        \
  if (a->name != b->name) {                                                           \
    snprintf(what, size, #name " is " fmt " on rank %%d but " fmt " on rank %%d",      \
             (cast)a->name, (cast)b->name);                                           \
    return 1;                                                                         \
  }
  FIELD(batch, "%lld", long long)
  FIELD(seq_len, "%lld", long long)
  FIELD(num_heads, "%lld", long long)
  FIELD(head_dim, "%lld", long long)
  FIELD(num_branches, "%d", int)
  FIELD(causal, "%d", int)
  FIELD(mode, "%d", int)
  FIELD(scale, "%g", double)
  FIELD(world_size, "%d", int)
  FIELD(dtype, "%d", int)
#undef FIELD
  for (int i = 0; i < a->num_branches; i++) {
    if (a->segment_lengths[i] != b->segment_lengths[i] || a->dilation_rates[i] != b->dilation_rates[i]) {
      snprintf(what, size, "branch %d is (%lld, %lld) on rank %%d but (%lld, %lld) on rank %%d", i,
               (long long)a->segment_lengths[i], (long long)a->dilation_rates[i],
               (long long)b->segment_lengths[i], (long long)b->dilation_rates[i]);
      return 1;
    }
  }
  return 0;
}

ra_status ra_comm_agree(ra_comm *comm, ra_status local, const char *local_message,
                        const ra_config *cfg) {
  if (!comm) return ra_fail(RA_ERR_INVALID_ARGUMENT, "comm is NULL");
  agree_header mine;
  memset(&mine, 0, sizeof mine);
  mine.magic = AGREE_MAGIC;
  mine.status = (int32_t)local;
  snprintf(mine.message, sizeof mine.message, "%s", local_message ? local_message : "");
  if (cfg) {
    mine.has_cfg = 1;
    mine.cfg = *cfg;
  }
  agree_header *all = ra_alloc(NULL, sizeof mine * (size_t)comm->size);
  if (!all) return RA_ERR_OUT_OF_MEMORY; /* nobody can be told; the peers' allgather fails too */
  ra_status st = comm->allgather_host(comm, &mine, sizeof mine, all);
  if (st == RA_OK) {
    for (int r = 0; r < comm->size && st == RA_OK; r++) {
      if (all[r].magic != AGREE_MAGIC)
        st = ra_fail(RA_ERR_TRANSPORT, "rank %d sent a malformed agreement header", r);
      else if (all[r].status != RA_OK)
        st = r == comm->rank ? ra_fail(local, "%s", mine.message)
                             : ra_fail((ra_status)all[r].status, "rank %d: %s", r, all[r].message);
    }
    for (int r = 0; r < comm->size && st == RA_OK; r++) {
      char what[384];
      if (all[r].has_cfg != all[0].has_cfg ||
          (all[r].has_cfg && config_differs(&all[0].cfg, &all[r].cfg, what, sizeof what))) {
        char msg[448];
        if (all[r].has_cfg != all[0].has_cfg) snprintf(what, sizeof what, "a configuration is given on rank %%d but not on rank %%d");
        snprintf(msg, sizeof msg, what, 0, r);
        st = ra_fail(RA_ERR_INVALID_ARGUMENT, "configuration differs between ranks: %s", msg);
      }
    }
  }
  ra_free(NULL, all, 0);
  return st;
}

ra_status ra_comm_allgather(ra_comm *comm, const void *send, size_t bytes, void *recv) {
  if (!comm) return ra_fail(RA_ERR_INVALID_ARGUMENT, "comm is NULL");
  return comm->allgather(comm, send, bytes, recv);
}

/* Plan, scan this rank's inputs, agree, then run the ring (t: q, k, v, o
 * and for the backward dout, dq, dk, dv). */
static ra_status comm_run(const ra_config *cfg, ra_comm *comm, int backward, const ra_tensor *t,
                          void *lse, int64_t lse_ld, const ra_exec *exec, ra_stats *stats) {
  if (!comm) return ra_fail(RA_ERR_INVALID_ARGUMENT, "comm is NULL");
  ra_plan *plan = NULL;
  ra_status local = RA_OK;
  if (!cfg)
    local = ra_fail(RA_ERR_INVALID_ARGUMENT, "config is NULL");
  else if (cfg->world_size != comm->size)
    local = ra_fail(RA_ERR_INVALID_ARGUMENT, "world_size=%d but the communicator has %d ranks",
                    cfg->world_size, comm->size);
  else
    local = ra_plan_create(cfg, &plan);
  if (local == RA_OK && exec && exec->check_finite && comm->kind == RA_COMM_MPI) {
    static const char *const name[5] = {"q", "k", "v", "o", "dout"};
    for (int i = 0; i < 5 && local == RA_OK; i++) {
      if (i == 3 || (i == 4 && !backward)) continue;
      if (!t[i].data)
        local = ra_fail(RA_ERR_INVALID_ARGUMENT, "%s: data is NULL", name[i]);
      else if (!ra_tensor_finite(t[i], cfg->dtype, cfg->batch, plan->local_len, cfg->num_heads, cfg->head_dim,
                                 exec->num_threads > 0 ? exec->num_threads : 1))
        local = ra_fail(RA_ERR_NONFINITE, "%s contains NaN or Inf (nan_policy=\"raise\")", name[i]);
    }
  }
  char message[256];
  snprintf(message, sizeof message, "%s", local == RA_OK ? "" : ra_last_error());
  ra_status st = ra_comm_agree(comm, local, message, local == RA_OK ? cfg : NULL);
  if (st == RA_OK) {
    ra_exec run = {exec ? exec->num_threads : 0, 0}; /* inputs were scanned above */
    /* the communicators' ring functions take lse as float *: an opaque base
     * that holds doubles for RA_FLOAT64 (see ra_ring_forward) */
    st = backward ? comm->ring_backward(comm, plan, t, (const float *)lse, lse_ld, &run, stats)
                  : comm->ring(comm, plan, t[0], t[1], t[2], t[3], (float *)lse, lse_ld, &run, stats);
  }
  ra_plan_destroy(plan);
  return st;
}

ra_status ra_comm_forward(const ra_config *cfg, ra_comm *comm, ra_tensor q, ra_tensor k,
                          ra_tensor v, ra_tensor o, void *lse, int64_t lse_ld,
                          const ra_exec *exec, ra_stats *stats) {
  const ra_tensor t[4] = {q, k, v, o};
  return comm_run(cfg, comm, 0, t, lse, lse_ld, exec, stats);
}

ra_status ra_comm_backward(const ra_config *cfg, ra_comm *comm, ra_tensor q, ra_tensor k, ra_tensor v,
                           ra_tensor o, ra_tensor dout, const void *lse, int64_t lse_ld, ra_tensor dq,
                           ra_tensor dk, ra_tensor dv, const ra_exec *exec, ra_stats *stats) {
  const ra_tensor t[8] = {q, k, v, o, dout, dq, dk, dv};
  return comm_run(cfg, comm, 1, t, (void *)lse, lse_ld, exec, stats); /* the backward only reads lse */
}

void ra_comm_destroy(ra_comm *comm) {
  if (comm) comm->destroy(comm);
}

int ra_comm_rank(const ra_comm *comm) { return comm->rank; }
int ra_comm_size(const ra_comm *comm) { return comm->size; }
ra_comm_backend ra_comm_kind(const ra_comm *comm) { return comm->kind; }
ra_transport ra_comm_transport(ra_comm *comm) { return comm->transport; }
