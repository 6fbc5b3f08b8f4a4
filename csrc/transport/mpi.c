/*
 * mpi.c -- the MPI communicator and transport (CPU processes).
 *
 * Blocks move with MPI_Isend / MPI_Irecv of bytes on a duplicate of the
 * caller's communicator, so ringattn's tags never meet the application's.
 * Errors return (MPI_ERRORS_RETURN) and become RA_ERR_TRANSPORT.  MPI has
 * no way to cancel a peer's pending receive, so a rank that fails *inside*
 * the ring (after the agreement of agree.c has checked everything that can
 * be checked) aborts the job rather than leave its peers waiting forever.
 */
#include <limits.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "transport/transport.h"

typedef struct mpi_impl {
  MPI_Comm comm;
} mpi_impl;

enum { REQ_SEND = 1, REQ_RECV = 2 };

_Static_assert(sizeof(MPI_Request) <= sizeof(uint64_t), "MPI_Request must fit in a request word");

static ra_status mpi_error(int code, const char *what) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(code, text, &len);
  return ra_fail(RA_ERR_TRANSPORT, "%s failed: %.*s", what, len, text);
}

static ra_status check_size(size_t bytes) {
  if (bytes > (size_t)INT_MAX)
    return ra_fail(RA_ERR_UNSUPPORTED, "a key/value block of %zu bytes exceeds MPI's 2 GiB message limit; "
                                       "use more ranks", bytes);
  return RA_OK;
}

static ra_status mpi_isend(void *ctx, const void *buf, size_t bytes, int dst, int tag, ra_request *req) {
  mpi_impl *m = ctx;
  RA_TRY(check_size(bytes));
  MPI_Request r;
  int rc = MPI_Isend(buf, (int)bytes, MPI_BYTE, dst, tag, m->comm, &r);
  if (rc != MPI_SUCCESS) return mpi_error(rc, "MPI_Isend");
  memset(req, 0, sizeof *req);
  memcpy(&req->words[0], &r, sizeof r);
  req->words[1] = bytes;
  req->words[2] = REQ_SEND;
  return RA_OK;
}

static ra_status mpi_irecv(void *ctx, void *buf, size_t bytes, int src, int tag, ra_request *req) {
  mpi_impl *m = ctx;
  RA_TRY(check_size(bytes));
  MPI_Request r;
  int rc = MPI_Irecv(buf, (int)bytes, MPI_BYTE, src, tag, m->comm, &r);
  if (rc != MPI_SUCCESS) return mpi_error(rc, "MPI_Irecv");
  memset(req, 0, sizeof *req);
  memcpy(&req->words[0], &r, sizeof r);
  req->words[1] = bytes;
  req->words[2] = REQ_RECV;
  return RA_OK;
}

static ra_status mpi_wait(void *ctx, ra_request *req) {
  (void)ctx;
  MPI_Request r;
  MPI_Status status;
  memcpy(&r, &req->words[0], sizeof r);
  int rc = MPI_Wait(&r, &status);
  if (rc != MPI_SUCCESS) return mpi_error(rc, "MPI_Wait");
  if (req->words[2] == REQ_RECV) {
    int count = 0;
    MPI_Get_count(&status, MPI_BYTE, &count);
    if ((uint64_t)count != req->words[1])
      return ra_fail(RA_ERR_TRANSPORT, "expected %llu bytes from rank %d, got %d",
                     (unsigned long long)req->words[1], status.MPI_SOURCE, count);
  }
  return RA_OK;
}

static void mpi_abort(void *ctx) {
  mpi_impl *m = ctx;
  int rank = 0;
  MPI_Comm_rank(m->comm, &rank);
  fprintf(stderr, "ringattn: rank %d failed inside the ring: %s; aborting the MPI job\n", rank, ra_last_error());
  fflush(stderr);
  MPI_Abort(m->comm, 1);
}

static const ra_transport_ops mpi_ops = {"mpi", mpi_isend, mpi_irecv, mpi_wait, mpi_abort};

static ra_status mpi_allgather(ra_comm *c, const void *send, size_t bytes, void *recv) {
  mpi_impl *m = c->impl;
  RA_TRY(check_size(bytes));
  int rc = MPI_Allgather(send, (int)bytes, MPI_BYTE, recv, (int)bytes, MPI_BYTE, m->comm);
  return rc == MPI_SUCCESS ? RA_OK : mpi_error(rc, "MPI_Allgather");
}

static void mpi_destroy(ra_comm *c) {
  mpi_impl *m = c->impl;
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Comm_free(&m->comm);
  free(m);
  free(c);
}

/* Finalize MPI at exit if ringattn was the one to initialise it. */
static void finalize_at_exit(void) {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

static ra_status ensure_initialized(void) {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (finalized) return ra_fail(RA_ERR_TRANSPORT, "MPI has already been finalized");
  if (initialized) return RA_OK;
  int provided = 0;
  int rc = MPI_Init_thread(NULL, NULL, MPI_THREAD_SERIALIZED, &provided);
  if (rc != MPI_SUCCESS) return mpi_error(rc, "MPI_Init_thread");
  atexit(finalize_at_exit);
  return RA_OK;
}

int ra_have_mpi(void) { return 1; }

ra_status ra_comm_create_mpi(const void *mpi_comm, ra_comm **out) {
  *out = NULL;
  RA_TRY(ensure_initialized());
  ra_comm *c = calloc(1, sizeof *c);
  mpi_impl *m = calloc(1, sizeof *m);
  if (!c || !m) {
    free(c);
    free(m);
    return ra_fail(RA_ERR_OUT_OF_MEMORY, "could not allocate a communicator");
  }
  MPI_Comm base = mpi_comm ? *(const MPI_Comm *)mpi_comm : MPI_COMM_WORLD;
  int rc = MPI_Comm_dup(base, &m->comm);
  if (rc != MPI_SUCCESS) {
    free(c);
    free(m);
    return mpi_error(rc, "MPI_Comm_dup");
  }
  MPI_Comm_set_errhandler(m->comm, MPI_ERRORS_RETURN);
  MPI_Comm_rank(m->comm, &c->rank);
  MPI_Comm_size(m->comm, &c->size);
  c->kind = RA_COMM_MPI;
  c->device_type = RA_DEVICE_CPU;
  c->device = -1;
  c->impl = m;
  c->transport = (ra_transport){&mpi_ops, m, c->rank, c->size};
  c->allgather_host = mpi_allgather;
  c->allgather = mpi_allgather;
  c->destroy = mpi_destroy;
  *out = c;
  return RA_OK;
}
