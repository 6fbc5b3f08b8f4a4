/*
 * inproc.c -- ranks that are threads of one process.
 *
 * A send posts a record {buffer, size, tag} on the queue of its (src, dst)
 * channel and returns; the receiver's wait takes the first record with its
 * tag from that queue, copies the bytes straight into its own buffer and
 * marks the record done, which completes the sender's wait.  So a block is
 * copied exactly once, from the sender's buffer to the receiver's, as a
 * network would.  One mutex and condition variable serve the whole world:
 * the ranks exchange a handful of large blocks, never many small ones.
 *
 * A rank that fails calls abort(); every wait then returns an error instead
 * of blocking forever on a peer that will never come.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "transport/transport.h"

typedef struct send_rec {
  const void *buf;
  size_t bytes;
  int tag;
  int taken, done;
  struct send_rec *next;
} send_rec;

typedef struct endpoint {
  ra_inproc_world *world;
  int rank;
} endpoint;

struct ra_inproc_world {
  int size;
  ra_copy_fn copy; /* how bytes move between ranks' buffers */
  void *copy_ctx;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int aborted;
  send_rec **queue;   /* queue[src * size + dst]: pending sends, oldest first */
  endpoint *ends;
};

enum { REQ_SEND = 1, REQ_RECV = 2 };

static ra_status inproc_isend(void *ctx, const void *buf, size_t bytes, int dst,
                              int tag, ra_request *req) {
  endpoint *e = ctx;
  ra_inproc_world *w = e->world;
  if (dst < 0 || dst >= w->size) return ra_fail(RA_ERR_TRANSPORT, "send to rank %d outside [0, %d)", dst, w->size);
  send_rec *rec = calloc(1, sizeof *rec);
  if (!rec) return ra_fail(RA_ERR_OUT_OF_MEMORY, "could not allocate a send record");
  rec->buf = buf;
  rec->bytes = bytes;
  rec->tag = tag;
  pthread_mutex_lock(&w->mu);
  send_rec **tail = &w->queue[e->rank * w->size + dst];
  while (*tail) tail = &(*tail)->next;
  *tail = rec;
  pthread_cond_broadcast(&w->cv);
  pthread_mutex_unlock(&w->mu);
  memset(req, 0, sizeof *req);
  req->handle = rec;
  req->words[0] = REQ_SEND;
  req->words[1] = (uint64_t)dst;
  return RA_OK;
}

static ra_status inproc_irecv(void *ctx, void *buf, size_t bytes, int src,
                              int tag, ra_request *req) {
  endpoint *e = ctx;
  if (src < 0 || src >= e->world->size)
    return ra_fail(RA_ERR_TRANSPORT, "receive from rank %d outside [0, %d)", src, e->world->size);
  memset(req, 0, sizeof *req);
  req->handle = buf;
  req->words[0] = REQ_RECV;
  req->words[1] = bytes;
  req->words[2] = ((uint64_t)(uint32_t)src << 32) | (uint32_t)tag;
  return RA_OK;
}

/* Take the oldest send from src to me with this tag, or NULL. */
static send_rec *take(ra_inproc_world *w, int src, int me, int tag) {
  for (send_rec **p = &w->queue[src * w->size + me]; *p; p = &(*p)->next)
    if ((*p)->tag == tag && !(*p)->taken) {
      send_rec *rec = *p;
      *p = rec->next;
      rec->taken = 1;
      return rec;
    }
  return NULL;
}

static ra_status wait_recv(endpoint *e, ra_request *req) {
  ra_inproc_world *w = e->world;
  int src = (int)(req->words[2] >> 32), tag = (int)(uint32_t)req->words[2];
  size_t bytes = (size_t)req->words[1];
  send_rec *rec = NULL;
  pthread_mutex_lock(&w->mu);
  while (!(rec = take(w, src, e->rank, tag)) && !w->aborted) pthread_cond_wait(&w->cv, &w->mu);
  pthread_mutex_unlock(&w->mu);
  if (!rec) return ra_fail(RA_ERR_TRANSPORT, "rank %d: a peer rank failed while rank %d waited for it", e->rank, src);
  ra_status st = RA_OK;
  if (rec->bytes != bytes)
    st = ra_fail(RA_ERR_TRANSPORT, "rank %d: expected %zu bytes from rank %d, got %zu", e->rank, bytes, src, rec->bytes);
  else if (w->copy)
    st = w->copy(w->copy_ctx, e->rank, req->handle, rec->buf, bytes);
  else
    memcpy(req->handle, rec->buf, bytes);
  pthread_mutex_lock(&w->mu);
  rec->done = st == RA_OK ? 1 : -1;
  if (st != RA_OK) w->aborted = 1;
  pthread_cond_broadcast(&w->cv);
  pthread_mutex_unlock(&w->mu);
  return st;
}

/* A send completes when its receiver has copied it.  After an abort a send
 * nobody took is withdrawn; one being copied is waited for, since the
 * receiver is reading the sender's buffer. */
static ra_status wait_send(endpoint *e, ra_request *req) {
  ra_inproc_world *w = e->world;
  send_rec *rec = req->handle;
  int dst = (int)req->words[1];
  pthread_mutex_lock(&w->mu);
  while (!rec->done && !(w->aborted && !rec->taken)) pthread_cond_wait(&w->cv, &w->mu);
  if (!rec->taken) {
    for (send_rec **p = &w->queue[e->rank * w->size + dst]; *p; p = &(*p)->next)
      if (*p == rec) {
        *p = rec->next;
        break;
      }
  }
  int done = rec->done;
  pthread_mutex_unlock(&w->mu);
  free(rec);
  if (done == 1) return RA_OK;
  return ra_fail(RA_ERR_TRANSPORT, "rank %d: send to rank %d failed: a peer rank failed", e->rank, dst);
}

static ra_status inproc_wait(void *ctx, ra_request *req) {
  if (req->words[0] == REQ_SEND) return wait_send(ctx, req);
  if (req->words[0] == REQ_RECV) return wait_recv(ctx, req);
  return ra_fail(RA_ERR_INTERNAL, "wait on a request that was never started");
}

static void inproc_abort(void *ctx) {
  ra_inproc_world *w = ((endpoint *)ctx)->world;
  pthread_mutex_lock(&w->mu);
  w->aborted = 1;
  pthread_cond_broadcast(&w->cv);
  pthread_mutex_unlock(&w->mu);
}

static const ra_transport_ops inproc_ops = {"inproc", inproc_isend, inproc_irecv, inproc_wait, inproc_abort};

ra_status ra_inproc_world_create(int world_size, ra_inproc_world **out) {
  *out = NULL;
  if (world_size < 1) return ra_fail(RA_ERR_INVALID_ARGUMENT, "world_size must be >= 1, got %d", world_size);
  ra_inproc_world *w = calloc(1, sizeof *w);
  if (w) {
    w->queue = calloc((size_t)world_size * (size_t)world_size, sizeof *w->queue);
    w->ends = calloc((size_t)world_size, sizeof *w->ends);
  }
  if (!w || !w->queue || !w->ends) {
    if (w) {
      free(w->queue);
      free(w->ends);
    }
    free(w);
    return ra_fail(RA_ERR_OUT_OF_MEMORY, "could not allocate an in-process world");
  }
  w->size = world_size;
  pthread_mutex_init(&w->mu, NULL);
  pthread_cond_init(&w->cv, NULL);
  for (int i = 0; i < world_size; i++) w->ends[i] = (endpoint){w, i};
  *out = w;
  return RA_OK;
}

void ra_inproc_world_destroy(ra_inproc_world *w) {
  if (!w) return;
  for (int i = 0; i < w->size * w->size; i++)
    for (send_rec *r = w->queue[i], *n; r; r = n) {
      n = r->next;
      free(r);
    }
  pthread_mutex_destroy(&w->mu);
  pthread_cond_destroy(&w->cv);
  free(w->queue);
  free(w->ends);
  free(w);
}

void ra_inproc_world_set_copy(ra_inproc_world *w, ra_copy_fn copy, void *ctx) {
  w->copy = copy;
  w->copy_ctx = ctx;
}

ra_transport ra_inproc_transport(ra_inproc_world *w, int rank) {
  ra_transport t = {&inproc_ops, &w->ends[rank], rank, w->size};
  return t;
}
