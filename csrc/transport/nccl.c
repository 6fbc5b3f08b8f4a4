/*
 * nccl.c -- the NCCL communicator and transport (GPUs).
 *
 * libnccl is opened at run time (dlopen), so the library builds and links
 * on machines without a GPU or NCCL and fails with a clear message only
 * when an NCCL communicator is asked for.
 *
 * Sends and receives of one ring step go out as one group (ncclGroupStart /
 * ncclGroupEnd) on the communicator's own stream: issued separately, every
 * rank's send would wait for a receive queued behind it.  isend/irecv only
 * record the operation; the first wait launches the group, the waits then
 * synchronise the communication stream.  The ring driver has enqueued the
 * step's compute on the backend's stream before it waits, so the transfer
 * overlaps the compute.
 *
 * Failure model (see docs/design.md): with a timeout set on the
 * communicator (opt-in for NCCL: it has not run on a multi-rank GPU job
 * yet), every wait polls its stream and ncclCommGetAsyncError against the
 * deadline instead of blocking, and a rank that gives up a call aborts its
 * NCCL communicator (ncclCommAbort), which ends its own pending kernels;
 * the communicator is then broken.  Every CUDA call here runs on the
 * communicator's device and leaves the caller's current device as it was.
 */
#include <cuda_runtime_api.h>
#include <dlfcn.h>
#include <nccl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "transport/transport.h"

/* ------------------------------------------------------- the NCCL library */

static struct {
  int loaded;
  ncclResult_t (*get_unique_id)(ncclUniqueId *);
  ncclResult_t (*comm_init_rank)(ncclComm_t *, int, ncclUniqueId, int);
  ncclResult_t (*comm_init_rank_config)(ncclComm_t *, int, ncclUniqueId, int, ncclConfig_t *); /* may be NULL */
  ncclResult_t (*comm_destroy)(ncclComm_t);
  ncclResult_t (*comm_abort)(ncclComm_t);
  ncclResult_t (*comm_get_async_error)(ncclComm_t, ncclResult_t *);
  ncclResult_t (*send)(const void *, size_t, ncclDataType_t, int, ncclComm_t, cudaStream_t);
  ncclResult_t (*recv)(void *, size_t, ncclDataType_t, int, ncclComm_t, cudaStream_t);
  ncclResult_t (*group_start)(void);
  ncclResult_t (*group_end)(void);
  ncclResult_t (*all_gather)(const void *, void *, size_t, ncclDataType_t, ncclComm_t, cudaStream_t);
  const char *(*error_string)(ncclResult_t);
} nccl;

/* Threads may create communicators at once: the library is loaded once,
 * under this lock. */
static pthread_mutex_t load_lock = PTHREAD_MUTEX_INITIALIZER;

static ra_status load_nccl_locked(void) {
  if (nccl.loaded) return RA_OK;
  /* RINGATTN_NCCL_LIBRARY names the library when it is not on the loader's
   * path (e.g. the copy inside the nvidia-nccl Python wheel). */
  const char *path = ra_env_nccl_library();
  void *lib = dlopen(path && *path ? path : "libnccl.so.2", RTLD_NOW | RTLD_LOCAL);
  if (!lib && !(path && *path)) lib = dlopen("libnccl.so", RTLD_NOW | RTLD_LOCAL);
  if (!lib)
    return ra_fail(RA_ERR_UNSUPPORTED, "NCCL is not available: could not load %s (%s); set RINGATTN_NCCL_LIBRARY",
                   path && *path ? path : "libnccl.so.2", dlerror());
#define SYM(field, name)                                                              \
  if (!(*(void **)&nccl.field = dlsym(lib, name)))                                    \
    return ra_fail(RA_ERR_UNSUPPORTED, "libnccl.so.2 lacks %s", name);
  SYM(get_unique_id, "ncclGetUniqueId")
  SYM(comm_init_rank, "ncclCommInitRank")
  SYM(comm_destroy, "ncclCommDestroy")
  SYM(comm_abort, "ncclCommAbort")
  SYM(comm_get_async_error, "ncclCommGetAsyncError")
  SYM(send, "ncclSend")
  SYM(recv, "ncclRecv")
  SYM(group_start, "ncclGroupStart")
  SYM(group_end, "ncclGroupEnd")
  SYM(all_gather, "ncclAllGather")
  SYM(error_string, "ncclGetErrorString")
#undef SYM
  *(void **)&nccl.comm_init_rank_config = dlsym(lib, "ncclCommInitRankConfig"); /* NCCL >= 2.14 */
  nccl.loaded = 1;
  return RA_OK;
}

static ra_status load_nccl(void) {
  pthread_mutex_lock(&load_lock);
  ra_status st = load_nccl_locked();
  pthread_mutex_unlock(&load_lock);
  return st;
}

static ra_status nccl_error(ncclResult_t r, const char *what) {
  return ra_fail(RA_ERR_TRANSPORT, "%s failed: %s", what, nccl.error_string(r));
}

static ra_status cuda_error(cudaError_t e, const char *what) {
  return ra_fail(RA_ERR_TRANSPORT, "%s failed: %s", what, cudaGetErrorString(e));
}

/* ----------------------------------------------------------- the transport */

#define MAX_PENDING 8

typedef struct pending_op {
  int is_send, peer;
  void *buf;
  size_t bytes;
} pending_op;

typedef struct nccl_impl {
  ncclComm_t comm;
  cudaStream_t stream;
  int device;
  int aborted;      /* ncclCommAbort ran: the NCCL communicator is gone */
  int nonblocking;  /* created with a timeout: NCCL calls may return ncclInProgress */
  ra_comm *owner;   /* for the timeout and the failure model            */
  pending_op pending[MAX_PENDING];
  int npending;
} nccl_impl;

/* The communicator's device made current for a few CUDA calls, and the
 * caller's restored afterwards. */
typedef struct device_guard {
  int prev;
} device_guard;

static ra_status guard_enter(device_guard *g, int device) {
  g->prev = -1;
  cudaError_t e = cudaGetDevice(&g->prev);
  if (e == cudaSuccess && g->prev != device) e = cudaSetDevice(device);
  return e == cudaSuccess ? RA_OK : cuda_error(e, "cudaSetDevice (NCCL communicator)");
}

static void guard_exit(const device_guard *g) {
  if (g->prev >= 0) cudaSetDevice(g->prev);
}

static double now_seconds(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Wait until the communicator's stream is idle.  Without a timeout this is
 * cudaStreamSynchronize, as it always was; with one, poll the stream and
 * NCCL's asynchronous error with a short back-off until the deadline, and
 * give the call up (ncclCommAbort ends this rank's pending kernels) when a
 * peer never arrives or NCCL reports a failure. */
static ra_status sync_stream(nccl_impl *n, const char *what) {
  const double timeout = n->owner ? n->owner->timeout : 0;
  if (timeout <= 0) {
    cudaError_t e = cudaStreamSynchronize(n->stream);
    return e == cudaSuccess ? RA_OK : cuda_error(e, what);
  }
  const double deadline = now_seconds() + timeout;
  long sleep_ns = 1000;
  for (;;) {
    cudaError_t e = cudaStreamQuery(n->stream);
    if (e == cudaSuccess) return RA_OK;
    if (e != cudaErrorNotReady) return cuda_error(e, what);
    ncclResult_t async = ncclSuccess;
    ncclResult_t r = nccl.comm_get_async_error(n->comm, &async);
    if (r != ncclSuccess) return nccl_error(r, "ncclCommGetAsyncError");
    if (async != ncclSuccess && async != ncclInProgress) return nccl_error(async, what);
    if (now_seconds() > deadline)
      return ra_fail(RA_ERR_TRANSPORT, "%s timed out after %g s (a peer did not take part)", what, timeout);
    struct timespec pause = {0, sleep_ns};
    nanosleep(&pause, NULL);
    if (sleep_ns < 1000000) sleep_ns *= 2;
  }
}

/* A nonblocking communicator's call may return ncclInProgress: poll its
 * asynchronous error until the operation is issued, a failure, or the
 * deadline (then the communicator is aborted). */
static ra_status settle(nccl_impl *n, ncclResult_t r, const char *what, double timeout) {
  if (r == ncclSuccess) return RA_OK;
  if (r != ncclInProgress) return nccl_error(r, what);
  const double deadline = now_seconds() + timeout;
  long sleep_ns = 1000;
  for (;;) {
    ncclResult_t async = ncclSuccess;
    ncclResult_t q = nccl.comm_get_async_error(n->comm, &async);
    if (q != ncclSuccess) return nccl_error(q, "ncclCommGetAsyncError");
    if (async == ncclSuccess) return RA_OK;
    if (async != ncclInProgress) return nccl_error(async, what);
    if (timeout > 0 && now_seconds() > deadline) {
      nccl.comm_abort(n->comm);
      n->aborted = 1;
      return ra_fail(RA_ERR_TRANSPORT, "%s timed out after %g s (a peer did not take part)", what, timeout);
    }
    struct timespec pause = {0, sleep_ns};
    nanosleep(&pause, NULL);
    if (sleep_ns < 1000000) sleep_ns *= 2;
  }
}

static ra_status post(nccl_impl *n, int is_send, void *buf, size_t bytes, int peer, ra_request *req) {
  if (n->npending == MAX_PENDING) return ra_fail(RA_ERR_INTERNAL, "too many NCCL operations in one group");
  n->pending[n->npending++] = (pending_op){is_send, peer, buf, bytes};
  memset(req, 0, sizeof *req);
  req->handle = n;
  return RA_OK;
}

static ra_status nccl_isend(void *ctx, const void *buf, size_t bytes, int dst, int tag, ra_request *req) {
  (void)tag; /* one group per step; NCCL orders operations per peer */
  return post(ctx, 1, (void *)buf, bytes, dst, req);
}

static ra_status nccl_irecv(void *ctx, void *buf, size_t bytes, int src, int tag, ra_request *req) {
  (void)tag;
  return post(ctx, 0, buf, bytes, src, req);
}

/* Launch the recorded operations as one group. */
static ra_status flush(nccl_impl *n) {
  if (n->npending == 0) return RA_OK;
  ncclResult_t r = nccl.group_start();
  for (int i = 0; i < n->npending && r == ncclSuccess; i++) {
    pending_op *p = &n->pending[i];
    r = p->is_send ? nccl.send(p->buf, p->bytes, ncclUint8, p->peer, n->comm, n->stream)
                   : nccl.recv(p->buf, p->bytes, ncclUint8, p->peer, n->comm, n->stream);
  }
  ncclResult_t e = nccl.group_end();
  n->npending = 0;
  if (r != ncclSuccess && r != ncclInProgress) return nccl_error(r, "ncclSend/ncclRecv");
  return settle(n, e, "ncclGroupEnd", n->owner ? n->owner->timeout : 0);
}

static ra_status nccl_wait(void *ctx, ra_request *req) {
  (void)req;
  nccl_impl *n = ctx;
  if (n->aborted) return ra_fail(RA_ERR_TRANSPORT, "the NCCL communicator was aborted");
  RA_TRY(flush(n));
  return sync_stream(n, "NCCL ring transfer");
}

static const ra_transport_ops nccl_ops = {"nccl", nccl_isend, nccl_irecv, nccl_wait, NULL};

/* ----------------------------------------------------------- communicator */

/* Device memory on the communicator's device, with its current device set. */
static ra_status allgather_device(nccl_impl *n, const void *send, size_t bytes, void *recv) {
  if (n->aborted) return ra_fail(RA_ERR_TRANSPORT, "the NCCL communicator was aborted");
  ncclResult_t r = nccl.all_gather(send, recv, bytes, ncclUint8, n->comm, n->stream);
  RA_TRY(settle(n, r, "ncclAllGather", n->owner ? n->owner->timeout : 0));
  return sync_stream(n, "ncclAllGather");
}

static ra_status nccl_allgather(ra_comm *c, const void *send, size_t bytes, void *recv) {
  nccl_impl *n = c->impl;
  device_guard g;
  RA_TRY(guard_enter(&g, n->device));
  ra_status st = allgather_device(n, send, bytes, recv);
  guard_exit(&g);
  return st;
}

/* Host memory (the agreement's headers, gather_sequence of host arrays):
 * staged through pinned host memory and device memory on the
 * communicator's device, every copy ordered on the communicator's stream. */
static ra_status nccl_allgather_host(ra_comm *c, const void *send, size_t bytes, void *recv) {
  nccl_impl *n = c->impl;
  const size_t total = bytes * (size_t)c->size;
  device_guard g;
  RA_TRY(guard_enter(&g, n->device));
  void *d = NULL, *h = NULL;
  ra_status st = RA_OK;
  cudaError_t e = cudaMalloc(&d, total + bytes);
  if (e == cudaSuccess) e = cudaMallocHost(&h, total + bytes);
  if (e != cudaSuccess) st = cuda_error(e, "staging the NCCL allgather");
  char *dsend = (char *)d + total, *hsend = (char *)h + total;
  if (st == RA_OK) {
    memcpy(hsend, send, bytes);
    if ((e = cudaMemcpyAsync(dsend, hsend, bytes, cudaMemcpyHostToDevice, n->stream)) != cudaSuccess)
      st = cuda_error(e, "cudaMemcpyAsync (NCCL allgather)");
  }
  if (st == RA_OK) st = allgather_device(n, dsend, bytes, d);
  if (st == RA_OK && (e = cudaMemcpyAsync(h, d, total, cudaMemcpyDeviceToHost, n->stream)) != cudaSuccess)
    st = cuda_error(e, "cudaMemcpyAsync (NCCL allgather)");
  if (st == RA_OK) st = sync_stream(n, "NCCL allgather");
  if (st == RA_OK) memcpy(recv, h, total);
  if (h) cudaFreeHost(h);
  if (d) cudaFree(d);
  guard_exit(&g);
  return st;
}

/* This rank gives up the current call: abort the NCCL communicator, which
 * ends this rank's pending NCCL kernels (so its streams and buffers can be
 * released); the peers' own waits end at their timeout or on the error
 * NCCL reports to them. */
static void nccl_give_up(ra_comm *c, ra_status status, const char *why) {
  (void)status;
  (void)why;
  nccl_impl *n = c->impl;
  if (n->aborted) return;
  device_guard g;
  if (guard_enter(&g, n->device) != RA_OK) return;
  nccl.comm_abort(n->comm);
  n->aborted = 1;
  n->npending = 0;
  guard_exit(&g);
}

static void nccl_destroy(ra_comm *c) {
  nccl_impl *n = c->impl;
  device_guard g;
  const int on_device = guard_enter(&g, n->device) == RA_OK;
  /* every operation has completed here; a nonblocking communicator is
   * released with ncclCommAbort, which never waits */
  if (!n->aborted) n->nonblocking ? nccl.comm_abort(n->comm) : nccl.comm_destroy(n->comm);
  cudaStreamDestroy(n->stream);
  if (on_device) guard_exit(&g);
  free(n);
  free(c);
}

int ra_have_nccl(void) { return 1; }

ra_status ra_nccl_unique_id(unsigned char id[RA_NCCL_UNIQUE_ID_BYTES]) {
  RA_TRY(load_nccl());
  ncclUniqueId uid;
  _Static_assert(sizeof uid == RA_NCCL_UNIQUE_ID_BYTES, "ncclUniqueId is 128 bytes");
  ncclResult_t r = nccl.get_unique_id(&uid);
  if (r != ncclSuccess) return nccl_error(r, "ncclGetUniqueId");
  memcpy(id, &uid, sizeof uid);
  return RA_OK;
}

/* The communicator on `device`, which the caller made current. */
static ra_status create_on_device(const unsigned char id[RA_NCCL_UNIQUE_ID_BYTES], int world_size, int rank,
                                  int device, double timeout, ra_comm **out) {
  ra_comm *c = calloc(1, sizeof *c);
  nccl_impl *n = calloc(1, sizeof *n);
  if (!c || !n) {
    free(c);
    free(n);
    return ra_fail(RA_ERR_OUT_OF_MEMORY, "could not allocate a communicator");
  }
  n->device = device;
  cudaError_t e;
  if ((e = cudaStreamCreateWithFlags(&n->stream, cudaStreamNonBlocking)) != cudaSuccess) {
    free(c);
    free(n);
    return cuda_error(e, "cudaStreamCreate");
  }
  ncclUniqueId uid;
  memcpy(&uid, id, sizeof uid);
  ra_status st;
  if (timeout > 0 && nccl.comm_init_rank_config) {
    /* nonblocking: a rank that never joins ends the creation at the timeout */
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    n->nonblocking = 1;
    st = settle(n, nccl.comm_init_rank_config(&n->comm, world_size, uid, rank, &config), "ncclCommInitRankConfig",
                timeout);
  } else {
    ncclResult_t r = nccl.comm_init_rank(&n->comm, world_size, uid, rank);
    st = r == ncclSuccess ? RA_OK : nccl_error(r, "ncclCommInitRank");
  }
  if (st != RA_OK) {
    cudaStreamDestroy(n->stream);
    free(c);
    free(n);
    return st;
  }
  c->kind = RA_COMM_NCCL;
  c->device_type = RA_DEVICE_CUDA;
  c->device = device;
  c->rank = rank;
  c->size = world_size;
  c->impl = n;
  c->transport = (ra_transport){&nccl_ops, n, rank, world_size};
  c->allgather_host = nccl_allgather_host;
  c->allgather = nccl_allgather;
  c->give_up = nccl_give_up;
  c->destroy = nccl_destroy;
  c->timeout = timeout > 0 ? timeout : 0;
  n->owner = c;
  *out = c;
  return RA_OK;
}

/* What a rank can check on its own before it joins: NCCL loads, the
 * device exists. */
static ra_status check_local(int device) {
  RA_TRY(load_nccl());
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    cudaGetLastError();
    return ra_fail(RA_ERR_UNSUPPORTED, "device: no CUDA device is available");
  }
  if (device < 0 || device >= count)
    return ra_fail(RA_ERR_INVALID_ARGUMENT, "device must be in [0, %d), got %d", count, device);
  return RA_OK;
}

ra_status ra_comm_create_nccl(const unsigned char id[RA_NCCL_UNIQUE_ID_BYTES], int world_size, int rank,
                              int device, double timeout, ra_comm **out) {
  *out = NULL;
  if (world_size < 1) return ra_fail(RA_ERR_INVALID_ARGUMENT, "world_size must be >= 1, got %d", world_size);
  if (rank < 0 || rank >= world_size)
    return ra_fail(RA_ERR_INVALID_ARGUMENT, "rank must be in [0, %d), got %d", world_size, rank);
  RA_TRY(check_local(device));
  device_guard g;
  RA_TRY(guard_enter(&g, device));
  ra_status st = create_on_device(id, world_size, rank, device, timeout, out);
  guard_exit(&g);
  return st;
}

/* Every rank checks what it can on its own and rank 0 makes the id; the
 * ranks agree over MPI before any of them enters NCCL's initialisation, so
 * that a rank failing early makes every rank fail instead of leaving the
 * others blocked in ncclCommInitRank. */
ra_status ra_comm_create_nccl_from_mpi(const void *mpi_comm, int device, double timeout, ra_comm **out) {
  *out = NULL;
  ra_comm *m = NULL;
  RA_TRY(ra_comm_create_mpi(mpi_comm, &m));
  if (timeout > 0) ra_comm_set_timeout(m, timeout);
  unsigned char id[RA_NCCL_UNIQUE_ID_BYTES] = {0};
  ra_status local = check_local(device);
  if (local == RA_OK && m->rank == 0) local = ra_nccl_unique_id(id);
  char message[256];
  snprintf(message, sizeof message, "%s", local == RA_OK ? "" : ra_last_error());
  ra_status st = ra_comm_agree(m, local, message, NULL); /* any rank's failure reaches everybody */
  unsigned char *all = NULL;
  if (st == RA_OK && !(all = malloc((size_t)m->size * sizeof id))) st = ra_fail(RA_ERR_OUT_OF_MEMORY, "out of memory");
  if (st == RA_OK) st = m->allgather_host(m, id, sizeof id, all);
  if (st == RA_OK) st = ra_comm_create_nccl(all, m->size, m->rank, device, timeout, out); /* rank 0's id */
  free(all);
  ra_comm_destroy(m);
  return st;
}
