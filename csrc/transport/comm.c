/*
 * comm.c -- what every communicator shares: accessors, the allgather of
 * the transport's own memory, and destruction.  Creating one is the
 * business of its transport (mpi.c, nccl.c).
 */
#include "transport/transport.h"

ra_status ra_comm_allgather(ra_comm *comm, const void *send, size_t bytes, void *recv) {
  if (!comm) return ra_fail(RA_ERR_INVALID_ARGUMENT, "comm is NULL");
  return comm->allgather(comm, send, bytes, recv);
}

void ra_comm_destroy(ra_comm *comm) {
  if (comm) comm->destroy(comm);
}

int ra_comm_rank(const ra_comm *comm) { return comm->rank; }
int ra_comm_size(const ra_comm *comm) { return comm->size; }
ra_comm_backend ra_comm_kind(const ra_comm *comm) { return comm->kind; }
ra_device_type ra_comm_device_type(const ra_comm *comm) { return comm->device_type; }
int ra_comm_device(const ra_comm *comm) { return comm->device; }
