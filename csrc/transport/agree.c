/*
 * agree.c -- the agreement that starts every collective call and turns one
 * rank's failure, or a disagreement between ranks, into the same error on
 * every rank.
 *
 * A distributed run must never hang or corrupt memory because one rank
 * refused its input or made another call than its peers.  So before any
 * traffic of a call every rank contributes a fixed-size header -- the
 * operation, this communicator's call number, its local status and message,
 * its configuration and device type (or, for a gather, its byte count) --
 * to an exchange, and all ranks decide from the same table: go on together,
 * or fail together with the same cause.  The exchange is the transport's
 * (allgather_host): over MPI it is bounded by the communicator's timeout and
 * ends as soon as a peer is known to have failed or exited (mpi.c).
 */
#include <stdio.h>
#include <string.h>

#include "transport/transport.h"

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
  FIELD(num_kv_heads, "%lld", long long)
  FIELD(head_dim, "%lld", long long)
  FIELD(num_branches, "%d", int)
  FIELD(causal, "%d", int)
  FIELD(mode, "%d", int)
  FIELD(scale, "%g", double)
  FIELD(world_size, "%d", int)
  FIELD(dtype, "%d", int)
  FIELD(partition, "%d", int)
#undef FIELD
  const int branches = a->num_branches > 0 && a->num_branches <= RA_MAX_BRANCHES ? a->num_branches : 0;
  for (int i = 0; i < branches; i++) {
    if (a->segment_lengths[i] != b->segment_lengths[i] || a->dilation_rates[i] != b->dilation_rates[i]) {
      snprintf(what, size, "branch %d is (%lld, %lld) on rank %%d but (%lld, %lld) on rank %%d", i,
               (long long)a->segment_lengths[i], (long long)a->dilation_rates[i],
               (long long)b->segment_lengths[i], (long long)b->dilation_rates[i]);
      return 1;
    }
  }
  return 0;
}

static const char *device_type_name(int32_t type) {
  return type == RA_DEVICE_CPU ? "cpu" : type == RA_DEVICE_CUDA ? "cuda" : "unknown";
}

/* The decision every rank takes from the same table `all`, rank 0's header
 * being the reference: RA_OK, or the failure (with its message). */
static ra_status decide(ra_comm *comm, const ra_agree_header *all, const ra_agree_header *mine, ra_status local) {
  const int n = comm->size;
  for (int r = 0; r < n; r++)
    if (all[r].magic != RA_AGREE_MAGIC || all[r].comm_id != mine->comm_id)
      return ra_fail(RA_ERR_TRANSPORT, "rank %d sent a malformed or stale agreement header", r);
  for (int r = 1; r < n; r++)
    if (all[r].call != all[0].call) {
      char why[160];
      snprintf(why, sizeof why, "the ranks are out of step: call %llu on rank 0 but call %llu on rank %d",
               (unsigned long long)all[0].call, (unsigned long long)all[r].call, r);
      ra_comm_break(comm, RA_ERR_TRANSPORT, why); /* counters never meet again */
      return ra_fail(RA_ERR_TRANSPORT, "%s", why);
    }
  for (int r = 1; r < n; r++)
    if (all[r].op != all[0].op)
      return ra_fail(RA_ERR_TRANSPORT, "operation differs between ranks: %s on rank 0 but %s on rank %d (call %llu)",
                     ra_comm_op_name((ra_comm_op)all[0].op), ra_comm_op_name((ra_comm_op)all[r].op), r,
                     (unsigned long long)all[0].call);
  for (int r = 0; r < n; r++)
    if (all[r].status != RA_OK)
      return r == comm->rank ? ra_fail(local, "%s", mine->message)
                             : ra_fail((ra_status)all[r].status, "rank %d: %s", r, all[r].message);
  for (int r = 1; r < n; r++) {
    if (all[r].has_cfg != all[0].has_cfg)
      return ra_fail(RA_ERR_INVALID_ARGUMENT,
                     "configuration differs between ranks: a configuration is given on rank %d but not on rank %d",
                     all[0].has_cfg ? 0 : r, all[0].has_cfg ? r : 0);
    if (all[0].has_cfg && all[r].device_type != all[0].device_type)
      return ra_fail(RA_ERR_INVALID_ARGUMENT, "device type differs between ranks: %s on rank 0 but %s on rank %d",
                     device_type_name(all[0].device_type), device_type_name(all[r].device_type), r);
    if (all[0].has_cfg && all[r].ring_sub_blocks != all[0].ring_sub_blocks)
      return ra_fail(RA_ERR_INVALID_ARGUMENT,
                     "ring_sub_blocks differs between ranks: %d on rank 0 but %d on rank %d "
                     "(RINGATTN_RING_SUB_BLOCKS must be the same on every rank)",
                     (int)all[0].ring_sub_blocks, (int)all[r].ring_sub_blocks, r);
    char what[384];
    if (all[0].has_cfg && config_differs(&all[0].cfg, &all[r].cfg, what, sizeof what)) {
      char msg[448];
      snprintf(msg, sizeof msg, what, 0, r);
      return ra_fail(RA_ERR_INVALID_ARGUMENT, "configuration differs between ranks: %s", msg);
    }
    if (all[r].bytes != all[0].bytes)
      return ra_fail(RA_ERR_INVALID_ARGUMENT, "%s: byte counts differ between ranks: %llu on rank 0 but %llu on rank %d",
                     ra_comm_op_name((ra_comm_op)all[0].op), (unsigned long long)all[0].bytes,
                     (unsigned long long)all[r].bytes, r);
  }
  return RA_OK;
}

ra_status ra_comm_agree_call(ra_comm *comm, const ra_agreement *a) {
  if (!comm) return ra_fail(RA_ERR_INVALID_ARGUMENT, "comm is NULL");
  if (!a) return ra_fail(RA_ERR_INVALID_ARGUMENT, "agreement is NULL");
  RA_TRY(ra_comm_check_usable(comm));
  comm->calls++;
  comm->op = a->op;
  ra_agree_header mine;
  memset(&mine, 0, sizeof mine);
  mine.magic = RA_AGREE_MAGIC;
  mine.op = (int32_t)a->op;
  mine.status = (int32_t)a->status;
  mine.comm_id = comm->id;
  mine.call = comm->calls;
  mine.bytes = a->bytes;
  snprintf(mine.message, sizeof mine.message, "%s", a->status != RA_OK && a->message ? a->message : "");
  if (a->cfg) {
    mine.has_cfg = 1;
    mine.cfg = *a->cfg;
    mine.device_type = (int32_t)a->device_type;
    mine.ring_sub_blocks = (int32_t)a->ring_sub_blocks;
  }
  ra_agree_header *all = ra_alloc(NULL, sizeof mine * (size_t)comm->size);
  if (!all) {
    ra_status st = ra_fail(RA_ERR_OUT_OF_MEMORY, "could not allocate the agreement of %d ranks", comm->size);
    ra_comm_give_up(comm, st, ra_last_error()); /* the peers must not wait for this rank */
    return st;
  }
  ra_status st = comm->allgather_host(comm, &mine, sizeof mine, all);
  if (st != RA_OK)
    ra_comm_give_up(comm, st, ra_last_error()); /* a no-op when the transport gave up already */
  else
    st = decide(comm, all, &mine, a->status);
  ra_free(NULL, all, 0);
  return st;
}

ra_status ra_comm_agree(ra_comm *comm, ra_status local, const char *local_message, const ra_config *cfg) {
  ra_agreement a = {RA_OP_COLLECTIVE, local, local_message, cfg, comm ? comm->device_type : RA_DEVICE_CPU, 0, 0};
  return ra_comm_agree_call(comm, &a);
}
