/*
 * transport.h -- transports and communicators (internal).
 *
 * A transport only connects ranks and moves bytes: isend, irecv, wait and
 * abort.  It knows nothing of attention, and never chooses how anything
 * is computed: the entry point (ring/entry.c) picks the compute backend
 * from the call's device and hands the driver the communicator's
 * transport.  Transports: in-process threads (inproc.c), MPI (mpi.c) and
 * NCCL (nccl.c), with stubs for builds without them (*_absent.c); the
 * agreement every communicator runs before a call is agree.c.
 */
#ifndef RINGATTN_TRANSPORT_H
#define RINGATTN_TRANSPORT_H

#include "internal.h"

/* Opaque space for one outstanding operation of a transport. */
typedef struct ra_request {
  void *handle;
  uint64_t words[3];
} ra_request;

/* A transport connects `world_size` ranks.  isend/irecv start an operation
 * and return at once; the buffer must stay untouched until wait() returns.
 * Messages between one pair of ranks with one tag arrive in order.  A send
 * may complete only once its receiver waits for it (a rendezvous), so a
 * rank waits for its receives before its sends. */
typedef struct ra_transport_ops {
  const char *name;
  ra_status (*isend)(void *ctx, const void *buf, size_t bytes, int dst, int tag,
                     ra_request *req);
  ra_status (*irecv)(void *ctx, void *buf, size_t bytes, int src, int tag,
                     ra_request *req);
  ra_status (*wait)(void *ctx, ra_request *req);
  /* Tell the peers this rank failed so that none waits forever (may be NULL). */
  void (*abort)(void *ctx);
} ra_transport_ops;

typedef struct ra_transport {
  const ra_transport_ops *ops;
  void *ctx;
  int rank, world_size;
} ra_transport;

/* ------------------------------------------------------------ in-process */

/* world_size ranks that are threads of this process. */
typedef struct ra_inproc_world ra_inproc_world;
ra_status ra_inproc_world_create(int world_size, ra_inproc_world **world);
void ra_inproc_world_destroy(ra_inproc_world *world);
/* The transport endpoint of one rank of the world. */
ra_transport ra_inproc_transport(ra_inproc_world *world, int rank);
/* How a receive copies bytes from the sender's buffer (memcpy by default;
 * ranks whose buffers live on a GPU set a device-to-device copy).  The copy
 * runs on the thread of the receiving rank `rank` and must be complete on
 * return. */
typedef ra_status (*ra_copy_fn)(void *ctx, int rank, void *dst, const void *src, size_t bytes);
void ra_inproc_world_set_copy(ra_inproc_world *world, ra_copy_fn copy, void *ctx);

/* ------------------------------------------------------------ communicators */

/* What every communicator provides; mpi.c and nccl.c fill it. */
struct ra_comm {
  ra_comm_backend kind;
  int rank, size;
  ra_device_type device_type; /* where the transport's buffers live       */
  int device;                 /* CUDA ordinal for NCCL, -1 for MPI        */
  ra_transport transport;
  /* allgather of host memory (the agreement uses it on every backend) */
  ra_status (*allgather_host)(ra_comm *comm, const void *send, size_t bytes, void *recv);
  /* allgather of the transport's own memory (device memory for NCCL) */
  ra_status (*allgather)(ra_comm *comm, const void *send, size_t bytes, void *recv);
  void (*destroy)(ra_comm *comm);
  void *impl;
};

#endif /* RINGATTN_TRANSPORT_H */
