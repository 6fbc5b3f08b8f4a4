/*
 * driver.h -- the ring layer: one rank's share of a call (driver.c) and
 * every rank of a call as threads of this process (ranks.c).
 */
#ifndef RINGATTN_DRIVER_H
#define RINGATTN_DRIVER_H

#include "ring/backend.h"
#include "transport/transport.h"

/* One rank of the ring: rank_call's tensors are this rank's shards, its
 * stats this rank's (not NULL); blocks move over `transport` and are
 * computed by `backend`.  Forward or backward as rank_call says. */
ra_status ra_ring_rank(const ra_call *rank_call, const ra_transport *transport, const ra_backend *backend);

/* Sub-blocks per ring block of a call (stream.c): exec.ring_sub_blocks when
 * positive, else 8 on the CPU and 1 (whole blocks) for CUDA tensors. */
int ra_ring_sub_blocks(const ra_fwd_params *params);

/* One rank on a backend opened for it: iface->rank_open, the driver,
 * rank_close; a rank that fails aborts its transport so that no peer
 * waits for it forever. */
ra_status ra_run_rank(const ra_backend_iface *iface, void *shared, const ra_call *rank_call,
                      const ra_transport *transport);

/* Every rank of `call` (no communicator; full-length tensors) as a thread
 * of this process over the in-process transport, each on its own backend
 * from `iface`: rank 0 on the calling thread.  The result is the root
 * cause (a rank's own failure before its peers' echoes of it). */
ra_status ra_run_ranks(const ra_call *call, const ra_backend_iface *iface);

/* The worker threads of ranks.c.  ra_workers_init registers their fork()
 * handlers (the entry point calls it before any CPU work);
 * ra_forked_child() is nonzero in the child of a fork() made after that:
 * there the calling thread's OpenMP team is gone (libgomp cannot restart
 * it), so the entry point runs multi-threaded calls on a worker, a thread
 * the child made itself.  ra_run_on_worker runs fn(arg) on a worker and
 * returns its status (and its message, on the calling thread). */
void ra_workers_init(void);
int ra_forked_child(void);
ra_status ra_run_on_worker(ra_status (*fn)(void *arg), void *arg);

/* rank r's view of an in-process call: its shards of every tensor, its lse
 * rows, its stats entry, its share of the threads. */
ra_call ra_rank_view(const ra_call *call, int rank);

#endif /* RINGATTN_DRIVER_H */
