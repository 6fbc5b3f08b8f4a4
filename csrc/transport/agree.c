/*
 * agree.c -- the agreement that turns one rank's failure into an error on
 * every rank.
 *
 * A distributed run must never hang because one rank refused its input.
 * So before any ring traffic every rank contributes a fixed-size header --
 * its local status, message and configuration -- to an allgather, and all
 * ranks decide from the same table: go on together, or fail together with
 * the same cause.
 */
#include <stdio.h>
#include <string.h>

#include "transport/transport.h"

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
