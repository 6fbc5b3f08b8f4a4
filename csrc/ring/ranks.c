/*
 * ranks.c -- every rank of a call as a thread of this process.
 *
 * Each rank thread gets a view of the call holding only its own shards and
 * talks to the others through the in-process transport, exactly as
 * separate processes would through MPI or NCCL; nothing here knows the
 * algorithm or the backend beyond its interface.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ring/driver.h"

/* ------------------------------------------------------------ rank views */

/* Bytes from a tensor's data to position `first` (checked, internal.h). */
static int shard_bytes(const ra_tensor *t, int64_t first, size_t es, size_t *bytes) {
  int64_t elems;
  return ra_mul_ok(first, t->stride_n, &elems) && ra_bytes_ok(elems, es, bytes);
}

/* The tensor from position `first` on.  check_views has made sure that the
 * offset fits; should it not, the view has no data and the driver refuses it. */
static ra_tensor shard(ra_tensor t, int64_t first, size_t es) {
  size_t bytes;
  if (t.data) t.data = shard_bytes(&t, first, es, &bytes) ? (char *)t.data + bytes : NULL;
  return t;
}

/* Every rank's view is addressable: offsets grow with the rank (strides
 * are non-negative), so checking the last rank's covers them all. */
static ra_status check_views(const ra_call *call) {
  const ra_config *c = &call->plan->cfg;
  const size_t es = ra_dtype_size(c->dtype);
  int64_t first;
  size_t bytes;
  /* the furthest chunk from its tensors' data: the last rank's (contiguous),
   * rank 0's second (zigzag: chunk 2k-1, n - C) */
  const int64_t last = c->partition == RA_PARTITION_ZIGZAG ? 2 * (int64_t)c->world_size - 1 : c->world_size - 1;
  if (!ra_mul_ok(last, call->plan->chunk_len, &first))
    return ra_fail(RA_ERR_INVALID_ARGUMENT, "world_size=%d: the shard offsets do not fit", c->world_size);
  const ra_tensor *t[8] = {&call->p.fwd.q, &call->p.fwd.k, &call->p.fwd.v, &call->p.fwd.o,
                           &call->p.dout,  &call->p.dq,    &call->p.dk,    &call->p.dv};
  static const char *const names[8] = {"q", "k", "v", "out", "dout", "dq", "dk", "dv"};
  for (int i = 0; i < 8; i++)
    if (t[i]->data && !shard_bytes(t[i], first, es, &bytes))
      return ra_fail(RA_ERR_INVALID_ARGUMENT, "%s: the offset of the last rank's shard does not fit", names[i]);
  if (call->p.fwd.lse && !ra_bytes_ok(first, ra_acc_size(c->dtype), &bytes))
    return ra_fail(RA_ERR_INVALID_ARGUMENT, "lse: the offset of the last rank's shard does not fit");
  return RA_OK;
}

ra_call ra_rank_view(const ra_call *call, int rank) {
  const ra_config *c = &call->plan->cfg;
  const int64_t L = call->plan->local_len, C = call->plan->chunk_len, first = rank * C;
  const size_t es = ra_dtype_size(c->dtype);
  ra_call v = *call;
  ra_fwd_params *f = &v.p.fwd;
  v.rank = rank;
  v.rows = L;
  /* zigzag: chunks rank and 2k-1-rank, the second (2k-1-2 rank) C rows on */
  v.second_row = c->partition == RA_PARTITION_ZIGZAG ? (2 * (int64_t)c->world_size - 1 - 2 * rank) * C : 0;
  f->q = shard(f->q, first, es);
  f->k = shard(f->k, first, es);
  f->v = shard(f->v, first, es);
  f->o = shard(f->o, first, es);
  v.p.dout = shard(v.p.dout, first, es);
  v.p.dq = shard(v.p.dq, first, es);
  v.p.dk = shard(v.p.dk, first, es);
  v.p.dv = shard(v.p.dv, first, es);
  size_t lse_bytes = 0;
  if (f->lse) f->lse = ra_bytes_ok(first, ra_acc_size(c->dtype), &lse_bytes) ? (char *)f->lse + lse_bytes : NULL;
  f->stats = call->p.fwd.stats + rank;
  /* the ranks share the call's threads */
  const int ranks = c->world_size;
  f->exec.num_threads = f->exec.num_threads / ranks > 0 ? f->exec.num_threads / ranks : 1;
  return v;
}

/* ------------------------------------------------------------- one rank */

ra_status ra_run_rank(const ra_backend_iface *iface, void *shared, const ra_call *rank_call,
                      const ra_transport *tr) {
  ra_backend be;
  memset(&be, 0, sizeof be);
  ra_status st = iface->rank_open(shared, rank_call, &be);
  if (st == RA_OK) {
    st = ra_ring_rank(rank_call, tr, &be);
    iface->rank_close(&be);
  }
  if (st != RA_OK && tr->ops->abort) tr->ops->abort(tr->ctx); /* no peer may wait for it forever */
  return st;
}

/* ------------------------------------------------------------- threads */

typedef struct rank_latch {
  pthread_mutex_t lock;
  pthread_cond_t done;
  int pending; /* ranks still running on workers */
} rank_latch;

typedef struct rank_thread {
  const ra_call *call;
  const ra_backend_iface *iface;
  void *shared;
  ra_call view;
  ra_transport tr;
  ra_status status;
  rank_latch *latch;
  char message[512];
} rank_thread;

static void run_one(rank_thread *t) {
  t->status = ra_run_rank(t->iface, t->shared, &t->view, &t->tr);
  if (t->status != RA_OK) snprintf(t->message, sizeof t->message, "%s", ra_last_error());
}

/* ------------------------------------------------------- rank workers
 *
 * Ranks 1.. of in-process calls run on worker threads kept between calls,
 * so that a call starts no thread (nor the OpenMP team a rank thread
 * creates on its first parallel region).  Every rank of a call needs its
 * own thread at once -- ranks wait for one another -- so a call takes as
 * many idle workers as it needs and starts the missing ones; a worker goes
 * back to the idle list when its rank ends, and exits when the list holds
 * ra_max_num_threads() already.
 *
 * fork(): the child has none of the parent's workers.  The atfork handlers
 * keep the pool's lock consistent and give the child an empty idle list
 * (its workers' records are leaked, once); it starts its own as needed. */

typedef struct worker_job {
  void (*fn)(void *arg); /* runs on the worker; the caller learns of its end from fn */
  void *arg;
} worker_job;

typedef struct worker {
  struct worker *next; /* in the idle list */
  pthread_cond_t wake;
  worker_job job; /* fn set by the caller, cleared by the worker */
} worker;

static struct {
  pthread_mutex_t lock;
  worker *idle;
  int n_idle;
} pool = {PTHREAD_MUTEX_INITIALIZER, NULL, 0};

static pthread_once_t pool_once = PTHREAD_ONCE_INIT;
static int forked; /* this process is the child of a fork() after a call */

static void pool_lock(void) { pthread_mutex_lock(&pool.lock); }
static void pool_unlock(void) { pthread_mutex_unlock(&pool.lock); }
static void pool_child(void) {
  pool.idle = NULL;
  pool.n_idle = 0;
  forked = 1;
  pthread_mutex_unlock(&pool.lock);
}
static void pool_init(void) { pthread_atfork(pool_lock, pool_unlock, pool_child); }

void ra_workers_init(void) { pthread_once(&pool_once, pool_init); }
int ra_forked_child(void) { return forked; }

static void latch_count_down(rank_latch *latch) {
  pthread_mutex_lock(&latch->lock);
  if (--latch->pending == 0) pthread_cond_signal(&latch->done);
  pthread_mutex_unlock(&latch->lock);
}

static void *worker_main(void *arg) {
  worker *w = arg;
  pool_lock();
  for (;;) {
    while (!w->job.fn) pthread_cond_wait(&w->wake, &pool.lock);
    const worker_job job = w->job;
    pool_unlock();
    job.fn(job.arg); /* the caller may return once it ends: job.arg is gone after */
    pool_lock();
    w->job.fn = NULL;
    if (pool.n_idle >= ra_max_num_threads()) break;
    w->next = pool.idle;
    pool.idle = w;
    pool.n_idle++;
  }
  pool_unlock();
  pthread_cond_destroy(&w->wake);
  free(w);
  return NULL;
}

/* Run `job` on an idle worker, or on a new one; nonzero when no thread
 * could be started. */
static int pool_submit(worker_job job) {
  pool_lock();
  worker *w = pool.idle;
  if (w) {
    pool.idle = w->next;
    pool.n_idle--;
    w->job = job;
    pthread_cond_signal(&w->wake);
    pool_unlock();
    return 0;
  }
  pool_unlock();
  if (!(w = calloc(1, sizeof *w))) return -1;
  w->job = job;
  pthread_t tid;
  pthread_attr_t attr;
  int ok = pthread_cond_init(&w->wake, NULL) == 0;
  if (ok && pthread_attr_init(&attr) == 0) {
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    ok = pthread_create(&tid, &attr, worker_main, w) == 0;
    pthread_attr_destroy(&attr);
  } else if (ok) {
    ok = 0;
    pthread_cond_destroy(&w->wake);
  }
  if (!ok) free(w);
  return ok ? 0 : -1;
}

static void rank_job(void *arg) {
  rank_thread *t = arg;
  run_one(t);
  latch_count_down(t->latch);
}

/* ra_run_on_worker: a function run on a worker while the caller waits. */
typedef struct call_job {
  ra_status (*fn)(void *arg);
  void *arg;
  ra_status status;
  char message[512];
  rank_latch latch;
} call_job;

static void call_job_main(void *arg) {
  call_job *j = arg;
  j->status = j->fn(j->arg);
  if (j->status != RA_OK) snprintf(j->message, sizeof j->message, "%s", ra_last_error());
  latch_count_down(&j->latch);
}

ra_status ra_run_on_worker(ra_status (*fn)(void *arg), void *arg) {
  call_job j;
  j.fn = fn;
  j.arg = arg;
  j.status = RA_OK;
  pthread_mutex_init(&j.latch.lock, NULL);
  pthread_cond_init(&j.latch.done, NULL);
  j.latch.pending = 1;
  ra_workers_init();
  ra_status st;
  if (pool_submit((worker_job){call_job_main, &j}) != 0) {
    st = ra_fail(RA_ERR_INTERNAL, "could not start a thread for the call");
  } else {
    pthread_mutex_lock(&j.latch.lock);
    while (j.latch.pending > 0) pthread_cond_wait(&j.latch.done, &j.latch.lock);
    pthread_mutex_unlock(&j.latch.lock);
    st = j.status == RA_OK ? RA_OK : ra_fail(j.status, "%s", j.message); /* the message, on this thread */
  }
  pthread_cond_destroy(&j.latch.done);
  pthread_mutex_destroy(&j.latch.lock);
  return st;
}

/* Hand ranks 1.. to workers and run rank 0 here.  The result is the root
 * cause: a rank's own failure before its peers' echoes. */
static ra_status run_threads(rank_thread *t, int ranks) {
  rank_latch latch;
  pthread_mutex_init(&latch.lock, NULL);
  pthread_cond_init(&latch.done, NULL);
  latch.pending = 0;
  ra_workers_init();
  for (int r = 1; r < ranks; r++) {
    t[r].latch = &latch;
    pthread_mutex_lock(&latch.lock);
    latch.pending++;
    pthread_mutex_unlock(&latch.lock);
    if (pool_submit((worker_job){rank_job, &t[r]}) != 0) {
      latch_count_down(&latch); /* no worker will */
      t[r].status = ra_fail(RA_ERR_INTERNAL, "could not start the thread of rank %d", r);
      snprintf(t[r].message, sizeof t[r].message, "%s", ra_last_error());
      t[0].tr.ops->abort(t[0].tr.ctx); /* a rank that never runs must not be waited for */
      break;
    }
  }
  run_one(&t[0]);
  pthread_mutex_lock(&latch.lock);
  while (latch.pending > 0) pthread_cond_wait(&latch.done, &latch.lock);
  pthread_mutex_unlock(&latch.lock);
  pthread_cond_destroy(&latch.done);
  pthread_mutex_destroy(&latch.lock);
  ra_status result = RA_OK;
  for (int pass = 0; pass < 2 && result == RA_OK; pass++)
    for (int r = 0; r < ranks; r++)
      if (t[r].status != RA_OK && (pass == 1 || t[r].status != RA_ERR_TRANSPORT)) {
        result = ra_fail(t[r].status, "%s", t[r].message);
        break;
      }
  return result;
}

/* Transport of a world of one rank: nothing to move (every branch of a
 * single rank is local), so nothing of it is ever called. */
static ra_status solo_isend(void *ctx, const void *buf, size_t bytes, int dst, int tag, ra_request *req) {
  (void)ctx, (void)buf, (void)bytes, (void)dst, (void)tag, (void)req;
  return ra_fail(RA_ERR_INTERNAL, "a single rank has no peer to send to");
}
static ra_status solo_irecv(void *ctx, void *buf, size_t bytes, int src, int tag, ra_request *req) {
  (void)ctx, (void)buf, (void)bytes, (void)src, (void)tag, (void)req;
  return ra_fail(RA_ERR_INTERNAL, "a single rank has no peer to receive from");
}
static ra_status solo_wait(void *ctx, ra_request *req) {
  (void)ctx, (void)req;
  return ra_fail(RA_ERR_INTERNAL, "a single rank has nothing to wait for");
}
static const ra_transport_ops solo_ops = {"solo", solo_isend, solo_irecv, solo_wait, NULL};

/* One rank: no world, no rank job, no thread -- the driver on the calling thread. */
static ra_status run_solo(const ra_call *call, const ra_backend_iface *iface) {
  void *shared = NULL;
  RA_TRY(iface->call_open ? iface->call_open(call, &shared) : RA_OK);
  const ra_call view = ra_rank_view(call, 0);
  const ra_transport tr = {&solo_ops, NULL, 0, 1};
  ra_status st = ra_run_rank(iface, shared, &view, &tr);
  if (iface->call_close) iface->call_close(shared);
  return st;
}

ra_status ra_run_ranks(const ra_call *call, const ra_backend_iface *iface) {
  const int ranks = call->plan->cfg.world_size;
  if (ranks == 1) return run_solo(call, iface);
  void *shared = NULL;
  RA_TRY(check_views(call));
  RA_TRY(iface->call_open ? iface->call_open(call, &shared) : RA_OK);
  ra_inproc_world *world = NULL;
  rank_thread *t = NULL;
  ra_status st = ra_inproc_world_create(ranks, &world);
  if (st == RA_OK && !(t = calloc((size_t)ranks, sizeof *t)))
    st = ra_fail(RA_ERR_OUT_OF_MEMORY, "could not allocate %d rank jobs", ranks);
  if (st == RA_OK) {
    if (iface->copy) ra_inproc_world_set_copy(world, iface->copy, shared);
    for (int r = 0; r < ranks; r++) {
      t[r].call = call;
      t[r].iface = iface;
      t[r].shared = shared;
      t[r].view = ra_rank_view(call, r);
      t[r].tr = ra_inproc_transport(world, r);
    }
    st = run_threads(t, ranks);
  }
  free(t);
  if (world) ra_inproc_world_destroy(world);
  if (iface->call_close) iface->call_close(shared);
  return st;
}
