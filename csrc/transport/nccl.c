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
 */
#include <cuda_runtime_api.h>
#include <dlfcn.h>
#include <nccl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "transport/transport.h"

/* ------------------------------------------------------- the NCCL library */

static struct {
  int loaded;
  ncclResult_t (*get_unique_id)(ncclUniqueId *);
  ncclResult_t (*comm_init_rank)(ncclComm_t *, int, ncclUniqueId, int);
  ncclResult_t (*comm_destroy)(ncclComm_t);
  ncclResult_t (*send)(const void *, size_t, ncclDataType_t, int, ncclComm_t, cudaStream_t);
  ncclResult_t (*recv)(void *, size_t, ncclDataType_t, int, ncclComm_t, cudaStream_t);
  ncclResult_t (*group_start)(void);
  ncclResult_t (*group_end)(void);
  ncclResult_t (*all_gather)(const void *, void *, size_t, ncclDataType_t, ncclComm_t, cudaStream_t);
  const char *(*error_string)(ncclResult_t);
} nccl;

static ra_status load_nccl(void) {
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
  SYM(send, "ncclSend")
  SYM(recv, "ncclRecv")
  SYM(group_start, "ncclGroupStart")
  SYM(group_end, "ncclGroupEnd")
  SYM(all_gather, "ncclAllGather")
  SYM(error_string, "ncclGetErrorString")
#undef SYM
  nccl.loaded = 1;
  return RA_OK;
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
  pending_op pending[MAX_PENDING];
  int npending;
} nccl_impl;

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
  if (r != ncclSuccess) return nccl_error(r, "ncclSend/ncclRecv");
  if (e != ncclSuccess) return nccl_error(e, "ncclGroupEnd");
  return RA_OK;
}

static ra_status nccl_wait(void *ctx, ra_request *req) {
  (void)req;
  nccl_impl *n = ctx;
  RA_TRY(flush(n));
  cudaError_t e = cudaStreamSynchronize(n->stream);
  return e == cudaSuccess ? RA_OK : cuda_error(e, "cudaStreamSynchronize (NCCL stream)");
}

static const ra_transport_ops nccl_ops = {"nccl", nccl_isend, nccl_irecv, nccl_wait, NULL};

/* ----------------------------------------------------------- communicator */

static ra_status nccl_allgather(ra_comm *c, const void *send, size_t bytes, void *recv) {
  nccl_impl *n = c->impl;
  ncclResult_t r = nccl.all_gather(send, recv, bytes, ncclUint8, n->comm, n->stream);
  if (r != ncclSuccess) return nccl_error(r, "ncclAllGather");
  cudaError_t e = cudaStreamSynchronize(n->stream);
  return e == cudaSuccess ? RA_OK : cuda_error(e, "cudaStreamSynchronize");
}

/* The agreement gathers host headers: stage them through device memory. */
static ra_status nccl_allgather_host(ra_comm *c, const void *send, size_t bytes, void *recv) {
  void *d = NULL;
  cudaError_t e = cudaMalloc(&d, bytes * (size_t)(c->size + 1));
  if (e != cudaSuccess) return cuda_error(e, "cudaMalloc");
  ra_status st = RA_OK;
  char *dsend = (char *)d + bytes * (size_t)c->size;
  if ((e = cudaMemcpy(dsend, send, bytes, cudaMemcpyHostToDevice)) != cudaSuccess)
    st = cuda_error(e, "cudaMemcpy");
  if (st == RA_OK) st = nccl_allgather(c, dsend, bytes, d);
  if (st == RA_OK && (e = cudaMemcpy(recv, d, bytes * (size_t)c->size, cudaMemcpyDeviceToHost)) != cudaSuccess)
    st = cuda_error(e, "cudaMemcpy");
  cudaFree(d);
  return st;
}

static void nccl_destroy(ra_comm *c) {
  nccl_impl *n = c->impl;
  nccl.comm_destroy(n->comm);
  cudaStreamDestroy(n->stream);
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

ra_status ra_comm_create_nccl(const unsigned char id[RA_NCCL_UNIQUE_ID_BYTES], int world_size, int rank,
                              int device, ra_comm **out) {
  *out = NULL;
  if (world_size < 1) return ra_fail(RA_ERR_INVALID_ARGUMENT, "world_size must be >= 1, got %d", world_size);
  if (rank < 0 || rank >= world_size)
    return ra_fail(RA_ERR_INVALID_ARGUMENT, "rank must be in [0, %d), got %d", world_size, rank);
  RA_TRY(load_nccl());
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    cudaGetLastError();
    return ra_fail(RA_ERR_UNSUPPORTED, "device: no CUDA device is available");
  }
  if (device < 0 || device >= count)
    return ra_fail(RA_ERR_INVALID_ARGUMENT, "device must be in [0, %d), got %d", count, device);
  cudaError_t e = cudaSetDevice(device);
  if (e != cudaSuccess) return cuda_error(e, "cudaSetDevice");
  ra_comm *c = calloc(1, sizeof *c);
  nccl_impl *n = calloc(1, sizeof *n);
  if (!c || !n) {
    free(c);
    free(n);
    return ra_fail(RA_ERR_OUT_OF_MEMORY, "could not allocate a communicator");
  }
  n->device = device;
  if ((e = cudaStreamCreateWithFlags(&n->stream, cudaStreamNonBlocking)) != cudaSuccess) {
    free(c);
    free(n);
    return cuda_error(e, "cudaStreamCreate");
  }
  ncclUniqueId uid;
  memcpy(&uid, id, sizeof uid);
  ncclResult_t r = nccl.comm_init_rank(&n->comm, world_size, uid, rank);
  if (r != ncclSuccess) {
    cudaStreamDestroy(n->stream);
    free(c);
    free(n);
    return nccl_error(r, "ncclCommInitRank");
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
  c->destroy = nccl_destroy;
  *out = c;
  return RA_OK;
}

ra_status ra_comm_create_nccl_from_mpi(const void *mpi_comm, int device, ra_comm **out) {
  *out = NULL;
  ra_comm *m = NULL;
  RA_TRY(ra_comm_create_mpi(mpi_comm, &m));
  unsigned char id[RA_NCCL_UNIQUE_ID_BYTES] = {0};
  ra_status local = m->rank == 0 ? ra_nccl_unique_id(id) : RA_OK;
  char message[256];
  snprintf(message, sizeof message, "%s", local == RA_OK ? "" : ra_last_error());
  ra_status st = ra_comm_agree(m, local, message, NULL); /* rank 0's failure reaches everybody */
  unsigned char *all = NULL;
  if (st == RA_OK && !(all = malloc((size_t)m->size * sizeof id))) st = ra_fail(RA_ERR_OUT_OF_MEMORY, "out of memory");
  if (st == RA_OK) st = m->allgather_host(m, id, sizeof id, all);
  if (st == RA_OK) st = ra_comm_create_nccl(all, m->size, m->rank, device, out); /* rank 0's id */
  free(all);
  ra_comm_destroy(m);
  return st;
}
