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

/* What every communicator provides; mpi.c and nccl.c fill it.  A
 * transport that leaves a hook NULL or a field zero keeps the plain
 * behaviour: no give_up notices, timeout 0 (wait forever). */
struct ra_comm {
  ra_comm_backend kind;
  int rank, size;
  ra_device_type device_type; /* where the transport's buffers live       */
  int device;                 /* CUDA ordinal for NCCL, -1 for MPI        */
  ra_transport transport;
  /* allgather of host memory: the agreement's exchange.  A transport that
   * implements the failure model (mpi.c) bounds it by `timeout`, ends it
   * early when a peer gave up, and gives up the call itself on failure. */
  ra_status (*allgather_host)(ra_comm *comm, const void *send, size_t bytes, void *recv);
  /* allgather of the transport's own memory (device memory for NCCL) */
  ra_status (*allgather)(ra_comm *comm, const void *send, size_t bytes, void *recv);
  /* This rank gives up the current call: tell every peer (so that no one
   * waits for it) after settling what it was receiving.  Run once per
   * call, through ra_comm_give_up; NULL: the transport cannot tell. */
  void (*give_up)(ra_comm *comm, ra_status status, const char *why);
  void (*destroy)(ra_comm *comm);
  void *impl;

  /* The failure model (comm.c, agree.c), the same for every transport. */
  uint64_t id;         /* the same on every rank, new per communicator (0: none) */
  double timeout;      /* seconds each wait of a call may last; <= 0: forever */
  uint64_t calls;      /* collective calls entered; during one, its number     */
  ra_comm_op op;       /* the current (or last) call's operation              */
  uint64_t gave_up;    /* the call this rank gave up (0: none)                */
  ra_status broken;    /* RA_OK while usable                                   */
  char broken_why[640];
};

/* The call's name in messages: "forward (call 3)". */
void ra_comm_call_name(const ra_comm *comm, char *out, size_t size);

/* `why` without a leading "forward (call 3)" (and ": "), to name the call once. */
const char *ra_comm_strip_call(const ra_comm *comm, const char *why);

/* Mark the communicator broken (the first cause wins):
 * "forward (call 3) failed: <why>".  Every later call fails at once. */
void ra_comm_break(ra_comm *comm, ra_status status, const char *why);

/* This rank gives up the current call after it began: break the
 * communicator and tell the peers (comm->give_up), once per call.  `why` may
 * be ra_last_error(); the last error is left as it was. */
void ra_comm_give_up(ra_comm *comm, ra_status status, const char *why);

/* RA_OK, or the failure of a broken communicator (RA_ERR_TRANSPORT). */
ra_status ra_comm_check_usable(const ra_comm *comm);

/* The header each rank contributes to the agreement (agree.c). */
#define RA_AGREE_MAGIC 0x52415432 /* "RAT2" */
typedef struct ra_agree_header {
  int32_t magic, op, status, has_cfg, device_type, ring_sub_blocks;
  uint64_t comm_id, call, bytes;
  char message[256];
  ra_config cfg;
} ra_agree_header;

#endif /* RINGATTN_TRANSPORT_H */
