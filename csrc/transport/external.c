/*
 * external.c -- a communicator whose bytes move through the caller's
 * functions (ra_external_ops): the Python package's transport over a
 * torch.distributed gloo group (ringattn/ext/pycomm.c, ringattn/_torch_comm.py).
 *
 * The caller's functions only move bytes.  Everything else is the same as
 * for every communicator: the agreement (agree.c, whose exchange is the
 * caller's allgather), the call counter, the broken state and the give-up
 * of the failure model (comm.c).  What a wait is waiting for and which call
 * it belongs to are named here, so that the caller's messages read like
 * the MPI communicator's.
 */
#include <stdlib.h>
#include <string.h>

#include "transport/transport.h"

typedef struct external_impl {
  ra_comm *c;
  ra_external_ops ops;
  void *ctx;
} external_impl;

enum { REQ_SEND = 1, REQ_RECV = 2 };

static ra_status ext_isend(void *ctx, const void *buf, size_t bytes, int dst, int tag, ra_request *req) {
  external_impl *x = ctx;
  memset(req, 0, sizeof *req);
  ra_status st = x->ops.isend(x->ctx, buf, bytes, dst, tag, &req->handle);
  req->words[0] = st == RA_OK ? REQ_SEND : 0;
  return st;
}

static ra_status ext_irecv(void *ctx, void *buf, size_t bytes, int src, int tag, ra_request *req) {
  external_impl *x = ctx;
  memset(req, 0, sizeof *req);
  ra_status st = x->ops.irecv(x->ctx, buf, bytes, src, tag, &req->handle);
  req->words[0] = st == RA_OK ? REQ_RECV : 0;
  return st;
}

/* Once this rank gave up the call, a wait only lets go of the transfer
 * (and leaves the last error, the call's cause, alone). */
static ra_status ext_wait(void *ctx, ra_request *req) {
  external_impl *x = ctx;
  ra_comm *c = x->c;
  if (req->words[0] != REQ_SEND && req->words[0] != REQ_RECV)
    return ra_fail(RA_ERR_INTERNAL, "wait on a transfer that was never started");
  const int abandon = c->calls && c->gave_up == c->calls;
  char call[64];
  ra_comm_call_name(c, call, sizeof call);
  const char *what = req->words[0] == REQ_RECV ? "to send its ring block" : "to take this rank's ring block";
  ra_status st = x->ops.wait(x->ctx, req->handle, abandon, call, what);
  req->words[0] = 0;
  if (abandon) return RA_ERR_TRANSPORT;
  if (st != RA_OK) ra_comm_give_up(c, st, ra_last_error()); /* the peers must not wait for this rank */
  return st;
}

static void ext_abort(void *ctx) {
  external_impl *x = ctx;
  ra_comm_give_up(x->c, RA_ERR_TRANSPORT, ra_last_error());
}

static const ra_transport_ops external_ops = {"torch.distributed", ext_isend, ext_irecv, ext_wait, ext_abort};

/* The agreement's exchange and the gather's: on failure this rank gives up
 * the call, as the MPI communicator does. */
static ra_status ext_allgather(ra_comm *c, const void *send, size_t bytes, void *recv) {
  external_impl *x = c->impl;
  char call[64];
  ra_comm_call_name(c, call, sizeof call);
  ra_status st = x->ops.allgather(x->ctx, send, bytes, recv, call, "to join the call");
  if (st != RA_OK) ra_comm_give_up(c, st, ra_last_error());
  return st;
}

static void ext_give_up(ra_comm *c, ra_status status, const char *why) {
  (void)status;
  external_impl *x = c->impl;
  char call[64];
  ra_comm_call_name(c, call, sizeof call);
  x->ops.give_up(x->ctx, call, ra_comm_strip_call(c, why));
}

static void ext_destroy(ra_comm *c) {
  external_impl *x = c->impl;
  x->ops.destroy(x->ctx);
  free(x);
  free(c);
}

ra_status ra_comm_create_external(const ra_external_ops *ops, void *ctx, int rank, int world_size, uint64_t id,
                                  ra_comm **out) {
  *out = NULL;
  if (!ops || !ops->isend || !ops->irecv || !ops->wait || !ops->allgather || !ops->give_up || !ops->destroy)
    return ra_fail(RA_ERR_INVALID_ARGUMENT, "ops: every function of ra_external_ops is required");
  if (world_size < 1 || rank < 0 || rank >= world_size)
    return ra_fail(RA_ERR_INVALID_ARGUMENT, "rank %d is not in [0, world_size=%d)", rank, world_size);
  if (id == 0) return ra_fail(RA_ERR_INVALID_ARGUMENT, "id must be nonzero (the same on every rank)");
  ra_comm *c = calloc(1, sizeof *c);
  external_impl *x = calloc(1, sizeof *x);
  if (!c || !x) {
    free(c);
    free(x);
    return ra_fail(RA_ERR_OUT_OF_MEMORY, "could not allocate a communicator");
  }
  x->c = c;
  x->ops = *ops;
  x->ctx = ctx;
  c->kind = RA_COMM_EXTERNAL;
  c->rank = rank;
  c->size = world_size;
  c->device_type = RA_DEVICE_CPU;
  c->device = -1;
  c->id = id;
  c->timeout = RA_COMM_DEFAULT_TIMEOUT;
  c->impl = x;
  c->transport = (ra_transport){&external_ops, x, rank, world_size};
  c->allgather_host = ext_allgather;
  c->allgather = ext_allgather; /* host memory too: the communicator computes on the CPU */
  c->give_up = ext_give_up;
  c->destroy = ext_destroy;
  *out = c;
  return RA_OK;
}
