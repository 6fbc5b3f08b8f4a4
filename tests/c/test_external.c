/*
 * test_external.c -- communicators whose bytes move through the caller's
 * functions (csrc/transport/external.c), as the Python package's
 * torch.distributed transport uses them.
 *
 * Two ranks are threads; the caller's functions move bytes with the
 * in-process transport and gather through a shared table, and give_up
 * aborts that world (as the torch transport closes its group's
 * connections).  A ring forward over the external communicators must equal
 * the in-process ring; a failing transfer must give up the call once, name
 * it, and end the call on both ranks.  The torch.distributed side itself is
 * tested under torchrun (tests/test_torch_dist.py).
 */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "calls.h"
#include "harness.h"
#include "transport/transport.h"

#define RANKS 2

typedef struct world {
  ra_inproc_world *bytes;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  unsigned char table[RANKS][1024]; /* the allgather's slots */
  int arrived, round;
  int fail_send_on; /* this rank's first send fails (-1: none) */
} world;

typedef struct endpoint {
  world *w;
  int rank, sends, give_ups, destroyed;
  char give_up_call[64], give_up_why[256];
} endpoint;

typedef struct op {
  ra_request req;
} op;

static ra_status x_isend(void *ctx, const void *buf, size_t bytes, int dst, int tag, void **out) {
  endpoint *e = ctx;
  if (e->w->fail_send_on == e->rank && e->sends++ == 0)
    return ra_fail(RA_ERR_TRANSPORT, "the link broke (scripted) sending to rank %d", dst);
  ra_transport t = ra_inproc_transport(e->w->bytes, e->rank);
  op *o = calloc(1, sizeof *o);
  ra_status st = t.ops->isend(t.ctx, buf, bytes, dst, tag, &o->req);
  *out = o;
  return st;
}

static ra_status x_irecv(void *ctx, void *buf, size_t bytes, int src, int tag, void **out) {
  endpoint *e = ctx;
  ra_transport t = ra_inproc_transport(e->w->bytes, e->rank);
  op *o = calloc(1, sizeof *o);
  ra_status st = t.ops->irecv(t.ctx, buf, bytes, src, tag, &o->req);
  *out = o;
  return st;
}

static ra_status x_wait(void *ctx, void *handle, int abandon, const char *call, const char *waiting_for) {
  (void)abandon;
  (void)call;
  (void)waiting_for;
  endpoint *e = ctx;
  op *o = handle;
  ra_transport t = ra_inproc_transport(e->w->bytes, e->rank);
  ra_status st = t.ops->wait(t.ctx, &o->req); /* after an abort: returns at once */
  free(o);
  return st;
}

static ra_status x_allgather(void *ctx, const void *send, size_t bytes, void *recv, const char *call,
                             const char *waiting_for) {
  (void)call;
  (void)waiting_for;
  endpoint *e = ctx;
  world *w = e->w;
  if (bytes > sizeof w->table[0]) return ra_fail(RA_ERR_INTERNAL, "test table too small");
  pthread_mutex_lock(&w->mu);
  const int round = w->round;
  memcpy(w->table[e->rank], send, bytes);
  if (++w->arrived == RANKS) {
    w->arrived = 0;
    w->round++;
    pthread_cond_broadcast(&w->cv);
  }
  while (w->round == round) pthread_cond_wait(&w->cv, &w->mu);
  for (int r = 0; r < RANKS; r++) memcpy((char *)recv + (size_t)r * bytes, w->table[r], bytes);
  pthread_mutex_unlock(&w->mu);
  return RA_OK;
}

static void x_give_up(void *ctx, const char *call, const char *why) {
  endpoint *e = ctx;
  e->give_ups++;
  snprintf(e->give_up_call, sizeof e->give_up_call, "%s", call);
  snprintf(e->give_up_why, sizeof e->give_up_why, "%s", why);
  ra_transport t = ra_inproc_transport(e->w->bytes, e->rank);
  t.ops->abort(t.ctx); /* no peer waits for this rank */
}

static void x_destroy(void *ctx) { ((endpoint *)ctx)->destroyed++; }

static const ra_external_ops OPS = {x_isend, x_irecv, x_wait, x_allgather, x_give_up, x_destroy};

/* ------------------------------------------------------------ the ring */

enum { B = 1, N = 256, H = 2, D = 16, L = N / RANKS };

typedef struct rank_job {
  endpoint *e;
  ra_comm *comm;
  const ra_config *cfg;
  float *q, *k, *v, *o; /* full-length tensors: the rank reads and writes its shard */
  ra_status status;
  char error[512];
} rank_job;

static ra_tensor shard(float *x, int rank) {
  ra_tensor t = {x + (size_t)rank * L * H * D, (int64_t)N * H * D, H * D, D};
  return t;
}

static void *run_rank(void *p) {
  rank_job *j = p;
  ra_fwd_params f;
  ra_fwd_params_init(&f);
  f.cfg = *j->cfg;
  f.q = shard(j->q, j->e->rank);
  f.k = shard(j->k, j->e->rank);
  f.v = shard(j->v, j->e->rank);
  f.o = shard(j->o, j->e->rank);
  f.exec = cpu_exec(1, 1);
  f.comm = j->comm;
  j->status = ra_forward(&f);
  snprintf(j->error, sizeof j->error, "%s", j->status == RA_OK ? "" : ra_last_error());
  return NULL;
}

/* Both ranks' forward over external communicators; o receives both shards. */
static void run_world(world *w, endpoint *ends, rank_job *jobs, const ra_config *cfg, float *q, float *k, float *v,
                      float *o) {
  CHECK(ra_inproc_world_create(RANKS, &w->bytes) == RA_OK);
  pthread_mutex_init(&w->mu, NULL);
  pthread_cond_init(&w->cv, NULL);
  pthread_t tid[RANKS];
  for (int r = 0; r < RANKS; r++) {
    ends[r] = (endpoint){.w = w, .rank = r};
    jobs[r] = (rank_job){.e = &ends[r], .cfg = cfg, .q = q, .k = k, .v = v, .o = o};
    CHECK(ra_comm_create_external(&OPS, &ends[r], r, RANKS, 77, &jobs[r].comm) == RA_OK);
  }
  for (int r = 0; r < RANKS; r++) pthread_create(&tid[r], NULL, run_rank, &jobs[r]);
  for (int r = 0; r < RANKS; r++) pthread_join(tid[r], NULL);
}

static void close_world(world *w, endpoint *ends, rank_job *jobs) {
  for (int r = 0; r < RANKS; r++) {
    ra_comm_destroy(jobs[r].comm);
    CHECK(ends[r].destroyed == 1);
  }
  ra_inproc_world_destroy(w->bytes);
  pthread_mutex_destroy(&w->mu);
  pthread_cond_destroy(&w->cv);
}

static ra_config ring_config(void) {
  const int64_t s[2] = {64, N}, r[2] = {1, 2};
  return make_config(B, N, H, D, 2, s, r, 1, RA_MODE_LONGNET, RANKS);
}

static float *random_tensor(void) {
  float *x = malloc(sizeof(float) * B * N * H * D);
  for (size_t i = 0; i < (size_t)B * N * H * D; i++) x[i] = uniform();
  return x;
}

static void test_ring_equals_in_process(void) {
  const ra_config cfg = ring_config();
  float *q = random_tensor(), *k = random_tensor(), *v = random_tensor();
  float *o = malloc(sizeof(float) * B * N * H * D), *ref = malloc(sizeof(float) * B * N * H * D);
  const ra_tensor full = {NULL, (int64_t)N * H * D, H * D, D};
  ra_tensor tq = full, tk = full, tv = full, to = full;
  tq.data = q, tk.data = k, tv.data = v, to.data = ref;
  const ra_exec exec = cpu_exec(1, 1);
  CHECK(call_forward(&cfg, RA_DEVICE_CPU, tq, tk, tv, to, NULL, &exec, NULL) == RA_OK);

  world w = {.fail_send_on = -1};
  endpoint ends[RANKS];
  rank_job jobs[RANKS];
  for (size_t i = 0; i < (size_t)B * N * H * D; i++) o[i] = NAN; /* poison: every element must be written */
  run_world(&w, ends, jobs, &cfg, q, k, v, o);
  float worst = 0;
  for (size_t i = 0; i < (size_t)B * N * H * D; i++)
    worst = fmaxf(worst, isnan(o[i]) ? INFINITY : fabsf(o[i] - ref[i]));
  for (int r = 0; r < RANKS; r++) {
    CHECK(jobs[r].status == RA_OK);
    CHECK(ends[r].give_ups == 0);
    CHECK(ra_comm_calls(jobs[r].comm) == 1 && ra_comm_broken(jobs[r].comm) == NULL);
    CHECK(ra_comm_kind(jobs[r].comm) == RA_COMM_EXTERNAL && ra_comm_device_type(jobs[r].comm) == RA_DEVICE_CPU);
  }
  CHECK(worst <= 1e-6f);
  close_world(&w, ends, jobs);
  free(q), free(k), free(v), free(o), free(ref);
}

/* Rank 0's send fails inside the ring: rank 0 gives up the call, once, and
 * rank 1, waiting for that block, fails too instead of waiting forever. */
static void test_failed_send_ends_the_call_on_every_rank(void) {
  const ra_config cfg = ring_config();
  float *q = random_tensor(), *k = random_tensor(), *v = random_tensor();
  float *o = malloc(sizeof(float) * B * N * H * D);
  world w = {.fail_send_on = 0};
  endpoint ends[RANKS];
  rank_job jobs[RANKS];
  run_world(&w, ends, jobs, &cfg, q, k, v, o);
  CHECK(jobs[0].status == RA_ERR_TRANSPORT && strstr(jobs[0].error, "the link broke (scripted)"));
  CHECK(jobs[1].status == RA_ERR_TRANSPORT); /* its peer gave up: it is not left waiting */
  CHECK(ends[0].give_ups == 1 && strcmp(ends[0].give_up_call, "forward (call 1)") == 0);
  CHECK(strncmp(ends[0].give_up_why, "the link broke", 14) == 0);
  CHECK(ends[1].give_ups == 1); /* rank 1 gives up in turn */
  for (int r = 0; r < RANKS; r++) {
    const char *broken = ra_comm_broken(jobs[r].comm);
    CHECK(broken && strstr(broken, "forward (call 1) failed"));
  }
  close_world(&w, ends, jobs);
  free(q), free(k), free(v), free(o);
}

static void test_creation_errors(void) {
  endpoint e = {0};
  ra_comm *c = (ra_comm *)&e;
  ra_external_ops missing = OPS;
  missing.give_up = NULL;
  CHECK(ra_comm_create_external(&missing, &e, 0, 2, 1, &c) == RA_ERR_INVALID_ARGUMENT && c == NULL);
  CHECK(strstr(ra_last_error(), "every function"));
  CHECK(ra_comm_create_external(&OPS, &e, 2, 2, 1, &c) == RA_ERR_INVALID_ARGUMENT);
  CHECK(strstr(ra_last_error(), "rank 2 is not in [0, world_size=2)"));
  CHECK(ra_comm_create_external(&OPS, &e, 0, 2, 0, &c) == RA_ERR_INVALID_ARGUMENT);
  CHECK(strstr(ra_last_error(), "id must be nonzero"));
  CHECK(ra_comm_create_external(&OPS, &e, 0, 1, 5, &c) == RA_OK);
  CHECK(ra_comm_timeout(c) == RA_COMM_DEFAULT_TIMEOUT && ra_comm_size(c) == 1 && ra_comm_rank(c) == 0);
  ra_comm_destroy(c);
  CHECK(e.destroyed == 1);
}

int main(void) {
  const test_case tests[] = {
      {"ring_equals_in_process", test_ring_equals_in_process},
      {"failed_send_ends_the_call", test_failed_send_ends_the_call_on_every_rank},
      {"creation_errors", test_creation_errors},
  };
  return run_tests(tests, sizeof tests / sizeof tests[0]);
}
