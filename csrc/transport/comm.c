/*
 * comm.c -- what every communicator shares: accessors, the timeout, the
 * call counter and the broken state of the failure model, the gather, and
 * destruction.  Creating one is the business of its transport (mpi.c,
 * nccl.c); the agreement that starts every call is agree.c.
 */
#include <stdio.h>
#include <string.h>

#include "transport/transport.h"

const char *ra_comm_op_name(ra_comm_op op) {
  switch (op) {
    case RA_OP_FORWARD: return "forward";
    case RA_OP_BACKWARD: return "backward";
    case RA_OP_GATHER: return "gather";
    case RA_OP_COLLECTIVE: break;
  }
  return "collective call";
}

void ra_comm_call_name(const ra_comm *comm, char *out, size_t size) {
  snprintf(out, size, "%s (call %llu)", ra_comm_op_name(comm->op), (unsigned long long)comm->calls);
}

const char *ra_comm_strip_call(const ra_comm *comm, const char *why) {
  char call[64];
  ra_comm_call_name(comm, call, sizeof call);
  const size_t len = strlen(call);
  if (!why || strncmp(why, call, len) != 0) return why ? why : "";
  why += len;
  if (*why == ':') why++;
  while (*why == ' ') why++;
  return why;
}

void ra_comm_break(ra_comm *comm, ra_status status, const char *why) {
  if (comm->broken != RA_OK) return;
  char call[64];
  ra_comm_call_name(comm, call, sizeof call);
  why = ra_comm_strip_call(comm, why);
  comm->broken = status != RA_OK ? status : RA_ERR_TRANSPORT;
  snprintf(comm->broken_why, sizeof comm->broken_why, "%s failed: %s", call, *why ? why : "unknown error");
}

void ra_comm_give_up(ra_comm *comm, ra_status status, const char *why) {
  if (!comm || (comm->calls && comm->gave_up == comm->calls)) return;
  char copy[512]; /* why may be ra_last_error(), which the transport may overwrite */
  snprintf(copy, sizeof copy, "%s", why ? why : "");
  comm->gave_up = comm->calls;
  ra_comm_break(comm, status, copy);
  if (comm->give_up) comm->give_up(comm, status, copy);
  ra_fail(status, "%s", copy);
}

ra_status ra_comm_check_usable(const ra_comm *comm) {
  if (comm->broken == RA_OK) return RA_OK;
  return ra_fail(RA_ERR_TRANSPORT, "the communicator is broken and cannot be used any more (create a new one): %s",
                 comm->broken_why);
}

/* A gather: the agreement (operation and byte count), then the exchange. */
static ra_status gather(ra_comm *comm, const void *send, size_t bytes, void *recv, int host) {
  if (!comm) return ra_fail(RA_ERR_INVALID_ARGUMENT, "comm is NULL");
  ra_agreement a = {RA_OP_GATHER, RA_OK, NULL, NULL, comm->device_type, (uint64_t)bytes, 0};
  RA_TRY(ra_comm_agree_call(comm, &a));
  ra_status st = host ? comm->allgather_host(comm, send, bytes, recv) : comm->allgather(comm, send, bytes, recv);
  if (st != RA_OK) ra_comm_give_up(comm, st, ra_last_error());
  return st;
}

ra_status ra_comm_allgather(ra_comm *comm, const void *send, size_t bytes, void *recv) {
  return gather(comm, send, bytes, recv, 0);
}

ra_status ra_comm_allgather_host(ra_comm *comm, const void *send, size_t bytes, void *recv) {
  return gather(comm, send, bytes, recv, 1);
}

ra_status ra_comm_set_timeout(ra_comm *comm, double seconds) {
  if (!comm) return ra_fail(RA_ERR_INVALID_ARGUMENT, "comm is NULL");
  if (seconds != seconds) return ra_fail(RA_ERR_INVALID_ARGUMENT, "timeout must be a number of seconds, got NaN");
  comm->timeout = seconds > 0 ? seconds : 0;
  return RA_OK;
}

double ra_comm_timeout(const ra_comm *comm) { return comm->timeout; }
uint64_t ra_comm_calls(const ra_comm *comm) { return comm->calls; }
const char *ra_comm_broken(const ra_comm *comm) { return comm->broken == RA_OK ? NULL : comm->broken_why; }

void ra_comm_destroy(ra_comm *comm) {
  if (comm) comm->destroy(comm);
}

int ra_comm_rank(const ra_comm *comm) { return comm->rank; }
int ra_comm_size(const ra_comm *comm) { return comm->size; }
ra_comm_backend ra_comm_kind(const ra_comm *comm) { return comm->kind; }
ra_device_type ra_comm_device_type(const ra_comm *comm) { return comm->device_type; }
int ra_comm_device(const ra_comm *comm) { return comm->device; }
