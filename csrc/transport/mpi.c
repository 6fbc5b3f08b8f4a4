/*
 * mpi.c -- the MPI communicator and transport (CPU processes).
 *
 * Blocks move with MPI_Isend / MPI_Irecv of bytes on a duplicate of the
 * caller's communicator, so ringattn's tags never meet the application's.
 * Errors return (MPI_ERRORS_RETURN) and become RA_ERR_TRANSPORT.
 *
 * No rank waits forever (docs/design.md, "Failure model"):
 *
 *  - Nothing blocks in MPI.  Every wait -- the agreement's exchange, each
 *    ring transfer, the gather -- polls its own requests with MPI_Test and
 *    a short back-off sleep, against a deadline of the communicator's
 *    timeout.
 *  - Each communicator keeps a receive posted for *notices* (a tag of its
 *    own).  A rank that gives up a call (a failure inside its ring, a
 *    timeout, a peer's failure) cancels its receives and sends a FAIL
 *    notice to every peer -- to one whose transfer into this rank was
 *    already under way only once that finished, since a FAIL also tells
 *    the peer it may let go of its sends; a rank that closes the communicator or exits
 *    sends CLOSE / EXIT with the number of calls it made.  A wait tests its
 *    own requests first and then the notices: it fails at once when a peer
 *    will not complete the current call (FAIL for this call or an earlier
 *    one, EXIT/CLOSE after fewer calls), and ignores a peer that left after
 *    completing it, which is how every normal shutdown looks.
 *  - After a failure, a send is let go of once its receiver has settled
 *    (its FAIL or EXIT notice arrived), else after a short grace (see
 *    release()).  A receive that a transfer already matched but that does
 *    not finish within the timeout aborts the job: MPI could still write
 *    into memory the ring is about to free.
 *  - A communicator on which a call failed is never freed, so that late
 *    messages of that call cannot reach a later communicator that reuses
 *    its context id; notices carry the communicator's id for the same
 *    reason.
 *  - At process exit (Python's atexit through ra_comm_exiting, or
 *    MPI_Finalize, whose first act deletes MPI_COMM_SELF's attributes and
 *    so runs at_finalize) every live communicator sends EXIT.  If a wait
 *    has timed out in this process, a peer may be stuck and MPI_Finalize,
 *    which synchronises every process, could wait for it forever: the job
 *    is aborted (MPI_Abort) instead, after saying why.
 */
#include <limits.h>
#include <math.h>
#include <mpi.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "transport/transport.h"

/* The ring's own transfers are tagged with their branch (< RA_MAX_BRANCHES). */
enum { TAG_AGREE = 32000, TAG_NOTICE = 32001, TAG_GATHER = 32002 };
enum { NOTICE_FAIL = 1, NOTICE_EXIT = 2, NOTICE_CLOSE = 3 };
enum { OUT_FAIL = 0, OUT_LEAVE = 1 }; /* this rank's two notices: it gives up once, leaves once */
enum { REQ_SEND = 1, REQ_RECV = 2 };

/* What a rank tells its peers outside the calls' own messages. */
typedef struct notice {
  uint64_t comm_id; /* the communicator's id: a notice for another one is ignored */
  uint64_t calls;   /* FAIL: the call given up; EXIT / CLOSE: the calls made        */
  int32_t kind, from, origin, pad;
  char text[448];   /* FAIL: what the peers raise                                  */
} notice;

#define MAX_SLOTS 8 /* a ring has at most one send and one receive in flight */

/* One transfer of the ring. */
typedef struct req_slot {
  MPI_Request req;
  int used, is_recv, peer, settled;
  size_t bytes;
} req_slot;

typedef struct mpi_impl {
  ra_comm *c;
  MPI_Comm comm;
  int finalized;           /* MPI is finalized: no more MPI calls      */
  int left;                /* EXIT or CLOSE sent                        */
  int failed;              /* FAIL sent                                 */
  notice inbox;            /* the notice being received                 */
  MPI_Request inbox_req;
  uint64_t *gone_after;    /* per rank: the calls it completes at most (UINT64_MAX: all) */
  notice *gone;            /* per rank: the notice that said so         */
  int *left_peer;          /* per rank: it sent EXIT or CLOSE           */
  notice outbox[2];        /* OUT_FAIL, OUT_LEAVE                       */
  MPI_Request *out_req;    /* [2][size]: their sends                    */
  uint64_t echo_call;      /* this call failed because of a peer's notice ... */
  int echo_origin;         /* ... about this rank                           */
  req_slot slots[MAX_SLOTS];
  MPI_Request *x_recv;     /* the receives of the exchange under way ... */
  const int *x_peers;      /* ... from these ranks ...                   */
  int x_n;                 /* ... how many                               */
  int *waiting_on;         /* per rank: a receive from it is not settled */
  struct mpi_impl *next;   /* the registry of live communicators        */
} mpi_impl;

_Static_assert(sizeof(notice) < 4096, "a notice must go eagerly");

/* ---------------------------------------------------------------- process */

static pthread_mutex_t registry_mu = PTHREAD_MUTEX_INITIALIZER;
static mpi_impl *registry;     /* live communicators                          */
static int exiting;            /* ra_comm_exiting ran: destroy says EXIT       */
static int stuck;              /* a wait timed out: a peer may never finalize  */
static char stuck_why[640];
static int hook_keyval = MPI_KEYVAL_INVALID;

static ra_status mpi_error(int code, const char *what) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(code, text, &len);
  return ra_fail(RA_ERR_TRANSPORT, "%s failed: %.*s", what, len, text);
}

static ra_status check_size(size_t bytes) {
  if (bytes > (size_t)INT_MAX)
    return ra_fail(RA_ERR_UNSUPPORTED, "a message of %zu bytes exceeds MPI's 2 GiB message limit; "
                                       "use more ranks", bytes);
  return RA_OK;
}

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static double deadline_of(const ra_comm *c) { return c->timeout > 0 ? now() + c->timeout : INFINITY; }

/* Between two tests of a wait: a few quick tests, then sleeps growing from
 * 8 us to 512 us -- never a hot spin, at most half a millisecond late. */
static void backoff(int iter) {
  if (iter < 32) return;
  const int level = (iter - 32) / 16;
  struct timespec t = {0, (8L << (level < 6 ? level : 6)) * 1000L};
  nanosleep(&t, NULL);
}

/* MPI may still use memory the caller is about to free: the only safe way
 * out is to end the job. */
static void fatal(const mpi_impl *m, const char *why) {
  fprintf(stderr, "ringattn: rank %d: %s; aborting the MPI job (MPI_Abort) rather than free memory MPI may "
                  "still use\n", m->c->rank, why);
  fflush(stderr);
  MPI_Abort(MPI_COMM_WORLD, 1);
}

/* ---------------------------------------------------------------- notices */

static void post_inbox(mpi_impl *m) {
  if (MPI_Irecv(&m->inbox, (int)sizeof m->inbox, MPI_BYTE, MPI_ANY_SOURCE, TAG_NOTICE, m->comm, &m->inbox_req) !=
      MPI_SUCCESS)
    m->inbox_req = MPI_REQUEST_NULL;
}

static void take_notice(mpi_impl *m, const notice *n, int from) {
  if (n->comm_id != m->c->id || from < 0 || from >= m->c->size || from == m->c->rank || n->from != from) return;
  if (n->kind == NOTICE_EXIT || n->kind == NOTICE_CLOSE) m->left_peer[from] = 1;
  const uint64_t after = n->kind == NOTICE_FAIL ? (n->calls ? n->calls - 1 : 0) : n->calls;
  if (after < m->gone_after[from]) {
    m->gone_after[from] = after;
    m->gone[from] = *n;
    m->gone[from].text[sizeof n->text - 1] = 0;
  }
}

/* Take every notice that has arrived. */
static void read_notices(mpi_impl *m) {
  while (m->inbox_req != MPI_REQUEST_NULL) {
    int flag = 0;
    MPI_Status s;
    if (MPI_Test(&m->inbox_req, &flag, &s) != MPI_SUCCESS) {
      m->inbox_req = MPI_REQUEST_NULL;
      return;
    }
    if (!flag) return;
    take_notice(m, &m->inbox, s.MPI_SOURCE);
    post_inbox(m);
  }
}

/* A peer that will not complete the current call, or -1.  A rank whose own
 * failure or exit began the trouble is named before the ranks that echo it. */
static int absent_peer(const mpi_impl *m) {
  int found = -1;
  for (int r = 0; r < m->c->size; r++)
    if (r != m->c->rank && m->gone_after[r] < m->c->calls) {
      if (m->gone[r].origin == r) return r;
      if (found < 0) found = r;
    }
  return found;
}

static ra_status absent_error(mpi_impl *m, int r) {
  const notice *n = &m->gone[r];
  m->echo_call = m->c->calls; /* the peers are told this very cause */
  m->echo_origin = n->origin;
  if (n->kind == NOTICE_FAIL) return ra_fail(RA_ERR_TRANSPORT, "%s", n->text);
  char call[64];
  ra_comm_call_name(m->c, call, sizeof call);
  return ra_fail(RA_ERR_TRANSPORT, "rank %d %s after %llu call%s and will not take part in %s", r,
                 n->kind == NOTICE_EXIT ? "exited" : "closed the communicator", (unsigned long long)n->calls,
                 n->calls == 1 ? "" : "s", call);
}

/* Send this rank's notice `which` (in the outbox) to peer r, unless it left. */
static void send_notice_to(mpi_impl *m, int which, int r) {
  MPI_Request *q = &m->out_req[which * m->c->size + r];
  if (r == m->c->rank || m->left_peer[r] || *q != MPI_REQUEST_NULL) return; /* sent already */
  if (MPI_Isend(&m->outbox[which], (int)sizeof(notice), MPI_BYTE, r, TAG_NOTICE, m->comm, q) != MPI_SUCCESS)
    *q = MPI_REQUEST_NULL;
}

/* Send this rank's notice `which` to every peer still there. */
static void send_notice(mpi_impl *m, int which, const notice *n) {
  m->outbox[which] = *n;
  for (int r = 0; r < m->c->size; r++) send_notice_to(m, which, r);
}

/* Let the notices go out (they are small: MPI sends them eagerly).
 * Returns 0, or 1 when some could not be finished and their buffer must
 * be kept. */
static int finish_outbox(mpi_impl *m) {
  const int n = 2 * m->c->size;
  const double deadline = now() + 1.0;
  for (int iter = 0;; iter++) {
    int done = 0;
    if (MPI_Testall(n, m->out_req, &done, MPI_STATUSES_IGNORE) != MPI_SUCCESS) done = 0;
    if (done) return 0;
    if (now() >= deadline) break;
    backoff(iter);
  }
  for (int i = 0; i < n; i++)
    if (m->out_req[i] != MPI_REQUEST_NULL) MPI_Request_free(&m->out_req[i]);
  return 1;
}

/* EXIT or CLOSE, once. */
static void leave(mpi_impl *m, int kind) {
  if (m->left || m->finalized) return;
  m->left = 1;
  read_notices(m);
  notice n;
  memset(&n, 0, sizeof n);
  n.comm_id = m->c->id;
  n.calls = m->c->calls;
  n.kind = kind;
  n.from = n.origin = m->c->rank;
  send_notice(m, OUT_LEAVE, &n);
}

/* ------------------------------------------------------------------ waits */

/* The peers of the incomplete requests, as "rank 1" or "ranks 1, 3". */
static void name_missing(int n, MPI_Request *reqs, const int *peers, char *out, size_t size) {
  int count = 0, listed[4];
  for (int i = 0; i < n && count < 4; i++) {
    int flag = 1;
    if (reqs[i] != MPI_REQUEST_NULL) MPI_Request_get_status(reqs[i], &flag, MPI_STATUS_IGNORE);
    int seen = 0;
    for (int j = 0; j < count; j++) seen |= listed[j] == peers[i];
    if (!flag && !seen) listed[count++] = peers[i];
  }
  size_t at = (size_t)snprintf(out, size, "rank%s", count > 1 ? "s" : "");
  for (int j = 0; j < count && at < size; j++)
    at += (size_t)snprintf(out + at, size - at, "%s %d", j ? "," : "", listed[j]);
  if (count == 0) snprintf(out, size, "its peers");
}

static ra_status timed_out(mpi_impl *m, int n, MPI_Request *reqs, const int *peers, const char *waiting_for) {
  char call[64], who[64];
  ra_comm_call_name(m->c, call, sizeof call);
  name_missing(n, reqs, peers, who, sizeof who);
  ra_status st = ra_fail(RA_ERR_TRANSPORT, "%s timed out after %g s waiting for %s %s", call, m->c->timeout, who,
                         waiting_for);
  pthread_mutex_lock(&registry_mu);
  if (!stuck) snprintf(stuck_why, sizeof stuck_why, "%s", ra_last_error());
  stuck = 1;
  pthread_mutex_unlock(&registry_mu);
  return st;
}

/* Poll until every request completes (RA_OK, statuses filled), a peer is
 * known not to complete the current call, or the deadline passes.  Own
 * requests first: a peer that left after completing its part is no error. */
static ra_status await(mpi_impl *m, int n, MPI_Request *reqs, MPI_Status *statuses, const int *peers,
                       const char *waiting_for) {
  const double deadline = deadline_of(m->c);
  for (int iter = 0;; iter++) {
    int done = 0;
    int rc = MPI_Testall(n, reqs, &done, statuses);
    if (rc != MPI_SUCCESS) return mpi_error(rc, "MPI_Testall");
    if (done) return RA_OK;
    read_notices(m);
    const int r = absent_peer(m);
    if (r >= 0) return absent_error(m, r);
    if (now() >= deadline) return timed_out(m, n, reqs, peers, waiting_for);
    backoff(iter);
  }
}

/* How long a send may keep its buffer after the call failed when its
 * receiver has not settled (it may be stuck): a live receiver settles
 * within milliseconds. */
#define SEND_GRACE 1.0

/* After a failure, wait until MPI lets go of a request's buffer.
 *
 * A receive (cancelled first) completes at once unless a transfer into it
 * is under way, which then finishes; if it does not within the timeout,
 * MPI could still write into memory the caller frees, so the job is
 * aborted.  A send is done when it completes, or when its receiver has
 * settled its side of the call (its FAIL or EXIT notice arrived): nobody
 * will match it any more.  Otherwise it is abandoned after `grace` seconds
 * (MPI_Request_free): a small message was copied when it was sent; of a
 * large one, a receiver that wakes up later may still read the abandoned
 * buffer (its own call fails on this rank's notice). */
static void release(mpi_impl *m, MPI_Request *req, int is_recv, int peer, double grace) {
  const double deadline = is_recv ? deadline_of(m->c) : now() + grace;
  for (int iter = 0; *req != MPI_REQUEST_NULL; iter++) {
    int flag = 0;
    if (MPI_Test(req, &flag, MPI_STATUS_IGNORE) != MPI_SUCCESS || flag) return;
    if (!is_recv) {
      read_notices(m);
      if (m->gone_after[peer] < m->c->calls || now() >= deadline) {
        MPI_Request_free(req);
        return;
      }
    } else if (now() >= deadline) {
      char call[64], why[800];
      ra_comm_call_name(m->c, call, sizeof call);
      snprintf(why, sizeof why, "%s: a receive from rank %d did not finish within the timeout after the call failed (%s)",
               call, peer, m->c->broken_why);
      fatal(m, why);
    }
    backoff(iter);
  }
}

/* A receive after a failure: cancel it, then wait until MPI lets go. */
static void settle_recv(mpi_impl *m, MPI_Request *req, int peer) {
  if (*req == MPI_REQUEST_NULL) return;
  MPI_Cancel(req);
  release(m, req, 1, peer, 0);
}

/* The give_up hook: cancel every receive in flight and tell the peers.  A
 * FAIL to peer r also says "nothing of yours is being received here any
 * more" (r may then let go of its sends), so it goes to r only once every
 * receive from r is settled: at once for the cancelled ones, after the
 * transfer for one that a transfer had already matched. */
static void mpi_give_up(ra_comm *c, ra_status status, const char *why) {
  (void)status;
  mpi_impl *m = c->impl;
  if (m->finalized || m->failed) return;
  m->failed = 1;
  notice n;
  memset(&n, 0, sizeof n);
  n.comm_id = c->id;
  n.calls = c->calls;
  n.kind = NOTICE_FAIL;
  n.from = c->rank;
  if (m->echo_call == c->calls) { /* the cause is a peer's failure or exit: pass it on as it is */
    n.origin = m->echo_origin;
    snprintf(n.text, sizeof n.text, "%s", why);
  } else {
    char call[64];
    ra_comm_call_name(c, call, sizeof call);
    n.origin = c->rank;
    snprintf(n.text, sizeof n.text, "rank %d failed in %s: %s", c->rank, call, ra_comm_strip_call(c, why));
  }
  m->outbox[OUT_FAIL] = n;

  /* every receive in flight: the ring's, and an exchange's */
  const int total = MAX_SLOTS + m->x_n;
  for (int pass = 0; pass < 3; pass++) {
    for (int i = 0; i < total; i++) {
      MPI_Request *req = i < MAX_SLOTS ? &m->slots[i].req : &m->x_recv[i - MAX_SLOTS];
      const int peer = i < MAX_SLOTS ? m->slots[i].peer : m->x_peers[i - MAX_SLOTS];
      if (i < MAX_SLOTS && !(m->slots[i].used && m->slots[i].is_recv && !m->slots[i].settled)) continue;
      if (*req == MPI_REQUEST_NULL) continue;
      if (pass == 0) { /* cancel; a receive no transfer matched completes at once */
        int flag = 0;
        MPI_Cancel(req);
        if (MPI_Test(req, &flag, MPI_STATUS_IGNORE) != MPI_SUCCESS) *req = MPI_REQUEST_NULL;
        if (*req != MPI_REQUEST_NULL) m->waiting_on[peer] = 1;
      } else if (pass == 2) { /* a matched transfer: let it finish (or end the job) */
        release(m, req, 1, peer, 0);
        send_notice_to(m, OUT_FAIL, peer);
      }
    }
    if (pass == 0) /* 1: tell every peer nothing is awaited from */
      for (int r = 0; r < c->size; r++)
        if (!m->waiting_on[r]) send_notice_to(m, OUT_FAIL, r);
  }
  for (int i = 0; i < MAX_SLOTS; i++)
    if (m->slots[i].used && m->slots[i].is_recv) m->slots[i].settled = 1;
}

/* ------------------------------------------------------------ the transport */

static ra_status start(mpi_impl *m, int is_recv, void *buf, size_t bytes, int peer, int tag, ra_request *req) {
  RA_TRY(check_size(bytes));
  int i = 0;
  while (i < MAX_SLOTS && m->slots[i].used) i++;
  if (i == MAX_SLOTS) return ra_fail(RA_ERR_INTERNAL, "too many MPI transfers in flight");
  req_slot *s = &m->slots[i];
  int rc = is_recv ? MPI_Irecv(buf, (int)bytes, MPI_BYTE, peer, tag, m->comm, &s->req)
                   : MPI_Isend(buf, (int)bytes, MPI_BYTE, peer, tag, m->comm, &s->req);
  if (rc != MPI_SUCCESS) return mpi_error(rc, is_recv ? "MPI_Irecv" : "MPI_Isend");
  s->used = 1;
  s->is_recv = is_recv;
  s->peer = peer;
  s->settled = 0;
  s->bytes = bytes;
  memset(req, 0, sizeof *req);
  req->handle = m;
  req->words[0] = (uint64_t)i;
  req->words[1] = bytes;
  req->words[2] = is_recv ? REQ_RECV : REQ_SEND;
  return RA_OK;
}

static ra_status mpi_isend(void *ctx, const void *buf, size_t bytes, int dst, int tag, ra_request *req) {
  return start(ctx, 0, (void *)buf, bytes, dst, tag, req);
}

static ra_status mpi_irecv(void *ctx, void *buf, size_t bytes, int src, int tag, ra_request *req) {
  return start(ctx, 1, buf, bytes, src, tag, req);
}

static ra_status mpi_wait(void *ctx, ra_request *req) {
  mpi_impl *m = ctx;
  if (req->handle != m || req->words[0] >= MAX_SLOTS || !m->slots[req->words[0]].used)
    return ra_fail(RA_ERR_INTERNAL, "wait on an MPI request that was never started");
  req_slot *s = &m->slots[req->words[0]];
  ra_comm *c = m->c;
  ra_status st = RA_ERR_TRANSPORT;
  if (m->failed) {
    /* after this rank gave up the call: only let go of the buffer (and
     * leave the last error, the call's cause, alone) */
    if (s->is_recv && !s->settled) settle_recv(m, &s->req, s->peer);
    if (!s->is_recv) release(m, &s->req, 0, s->peer, SEND_GRACE);
  } else {
    MPI_Status status;
    st = await(m, 1, &s->req, &status, &s->peer, s->is_recv ? "to send its ring block" : "to take this rank's ring block");
    if (st == RA_OK && s->is_recv) {
      int count = 0;
      MPI_Get_count(&status, MPI_BYTE, &count);
      if ((size_t)count != s->bytes)
        st = ra_fail(RA_ERR_TRANSPORT, "expected %zu bytes from rank %d, got %d", s->bytes, s->peer, count);
    }
    if (st != RA_OK) {
      /* the driver frees the buffer once this returns: settle it first */
      ra_comm_give_up(c, st, ra_last_error());
      if (!s->is_recv) release(m, &s->req, 0, s->peer, SEND_GRACE);
    }
  }
  s->used = 0;
  return st;
}

static void mpi_abort(void *ctx) {
  mpi_impl *m = ctx;
  ra_comm_give_up(m->c, RA_ERR_TRANSPORT, ra_last_error());
}

static const ra_transport_ops mpi_ops = {"mpi", mpi_isend, mpi_irecv, mpi_wait, mpi_abort};

/* ---------------------------------------------------- the exchange (allgather) */

/* Every rank's `bytes` to every rank, point to point, so that each wait can
 * end at the deadline or on a notice, and each request can be settled. */
static ra_status exchange(ra_comm *c, const void *send, size_t bytes, void *recv, int tag,
                          const char *waiting_for, double grace) {
  mpi_impl *m = c->impl;
  RA_TRY(check_size(bytes));
  if (bytes) memcpy((char *)recv + (size_t)c->rank * bytes, send, bytes);
  const int peers_n = c->size - 1;
  if (peers_n == 0) return RA_OK;
  MPI_Request *reqs = malloc(sizeof *reqs * 2 * (size_t)peers_n);
  MPI_Status *statuses = malloc(sizeof *statuses * 2 * (size_t)peers_n);
  int *peers = malloc(sizeof *peers * 2 * (size_t)peers_n);
  ra_status st = RA_OK;
  int posted = 0;
  if (!reqs || !statuses || !peers) st = ra_fail(RA_ERR_OUT_OF_MEMORY, "could not allocate an exchange of %d ranks", c->size);
  for (int k = 1; k <= peers_n && st == RA_OK; k++) { /* receives first, then sends */
    const int r = (c->rank + k) % c->size;
    int rc = MPI_Irecv((char *)recv + (size_t)r * bytes, (int)bytes, MPI_BYTE, r, tag, m->comm, &reqs[posted]);
    if (rc != MPI_SUCCESS) st = mpi_error(rc, "MPI_Irecv");
    else peers[posted++] = r;
  }
  for (int k = 1; k <= peers_n && st == RA_OK; k++) {
    const int r = (c->rank + c->size - k) % c->size;
    int rc = MPI_Isend(send, (int)bytes, MPI_BYTE, r, tag, m->comm, &reqs[posted]);
    if (rc != MPI_SUCCESS) st = mpi_error(rc, "MPI_Isend");
    else peers[posted++] = r;
  }
  if (st == RA_OK) st = await(m, posted, reqs, statuses, peers, waiting_for);
  for (int i = 0; i < peers_n && st == RA_OK; i++) {
    int count = 0;
    MPI_Get_count(&statuses[i], MPI_BYTE, &count);
    if ((size_t)count != bytes)
      st = ra_fail(RA_ERR_TRANSPORT, "expected %zu bytes from rank %d, got %d", bytes, peers[i], count);
  }
  if (st != RA_OK) {
    m->x_recv = reqs; /* give_up settles them with the ring's */
    m->x_peers = peers;
    m->x_n = posted < peers_n ? posted : peers_n;
    ra_comm_give_up(c, st, ra_last_error());
    for (int i = 0; i < m->x_n; i++) settle_recv(m, &reqs[i], peers[i]); /* when gave up before */
    m->x_recv = NULL;
    m->x_peers = NULL;
    m->x_n = 0;
    for (int i = peers_n; i < posted; i++) release(m, &reqs[i], 0, peers[i], grace);
  }
  free(reqs);
  free(statuses);
  free(peers);
  return st;
}

static ra_status mpi_allgather_host(ra_comm *c, const void *send, size_t bytes, void *recv) {
  /* headers are small: their sends can be let go of at once */
  return exchange(c, send, bytes, recv, TAG_AGREE, "to join the call", 0);
}

static ra_status mpi_allgather(ra_comm *c, const void *send, size_t bytes, void *recv) {
  return exchange(c, send, bytes, recv, TAG_GATHER, "to exchange its share of the gather", SEND_GRACE);
}

/* ------------------------------------------------------------- lifetime */

static void registry_add(mpi_impl *m) {
  pthread_mutex_lock(&registry_mu);
  m->next = registry;
  registry = m;
  pthread_mutex_unlock(&registry_mu);
}

static void registry_remove(mpi_impl *m) {
  pthread_mutex_lock(&registry_mu);
  for (mpi_impl **p = &registry; *p; p = &(*p)->next)
    if (*p == m) {
      *p = m->next;
      break;
    }
  pthread_mutex_unlock(&registry_mu);
}

static void impl_free(mpi_impl *m) {
  if (!m) return;
  free(m->gone_after);
  free(m->gone);
  free(m->left_peer);
  free(m->out_req);
  free(m->waiting_on);
  free(m);
}

static void mpi_destroy(ra_comm *c) {
  mpi_impl *m = c->impl;
  registry_remove(m);
  int finalized = 0, keep = 0;
  MPI_Finalized(&finalized);
  if (!finalized && !m->finalized) {
    leave(m, exiting ? NOTICE_EXIT : NOTICE_CLOSE);
    if (m->inbox_req != MPI_REQUEST_NULL) {
      MPI_Cancel(&m->inbox_req);
      const double deadline = now() + 1.0;
      for (int iter = 0, flag = 0; !flag; iter++) {
        if (MPI_Test(&m->inbox_req, &flag, MPI_STATUS_IGNORE) != MPI_SUCCESS || now() >= deadline) {
          if (m->inbox_req != MPI_REQUEST_NULL) MPI_Request_free(&m->inbox_req);
          keep = 1; /* the inbox may still be written */
          break;
        }
        backoff(iter);
      }
    }
    keep |= finish_outbox(m);
    for (int i = 0; i < MAX_SLOTS; i++) keep |= m->slots[i].used;
    /* A communicator on which a call failed may still carry messages of
     * that call.  Freed, MPI could hand them to a later communicator that
     * reuses its context id; kept, they stay where they belong. */
    int failed = c->broken != RA_OK;
    for (int r = 0; r < c->size; r++) failed |= m->gone[r].kind == NOTICE_FAIL;
    if (!failed && !keep) MPI_Comm_free(&m->comm);
  }
  if (!keep) impl_free(m); /* else MPI may still write the inbox or read the outbox */
  free(c);
}

/* Every live communicator says EXIT; with a timeout behind us, abort. */
static void exit_all(int finalizing) {
  pthread_mutex_lock(&registry_mu);
  exiting = 1;
  if (finalizing && stuck) {
    fprintf(stderr,
            "ringattn: a call timed out in this process (%s), so a peer may be stuck and MPI_Finalize could wait "
            "for it forever: aborting the MPI job (MPI_Abort) instead\n",
            stuck_why);
    fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  for (mpi_impl *m = registry; m; m = m->next) {
    leave(m, NOTICE_EXIT);
    if (finalizing) {
      if (m->inbox_req != MPI_REQUEST_NULL) {
        MPI_Cancel(&m->inbox_req);
        MPI_Request_free(&m->inbox_req);
      }
      finish_outbox(m);
      m->finalized = 1;
    }
  }
  pthread_mutex_unlock(&registry_mu);
}

void ra_comm_exiting(void) {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (initialized && !finalized) exit_all(0);
}

/* MPI_Finalize deletes MPI_COMM_SELF's attributes first: whoever finalizes
 * (ringattn, mpi4py, the application), this runs while MPI still works. */
static int at_finalize(MPI_Comm comm, int keyval, void *value, void *extra) {
  (void)comm;
  (void)keyval;
  (void)value;
  (void)extra;
  exit_all(1);
  return MPI_SUCCESS;
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
  if (!initialized) {
    int provided = 0;
    int rc = MPI_Init_thread(NULL, NULL, MPI_THREAD_SERIALIZED, &provided);
    if (rc != MPI_SUCCESS) return mpi_error(rc, "MPI_Init_thread");
    atexit(finalize_at_exit);
  }
  pthread_mutex_lock(&registry_mu);
  if (hook_keyval == MPI_KEYVAL_INVALID &&
      MPI_Comm_create_keyval(MPI_COMM_NULL_COPY_FN, at_finalize, &hook_keyval, NULL) == MPI_SUCCESS)
    MPI_Comm_set_attr(MPI_COMM_SELF, hook_keyval, NULL);
  pthread_mutex_unlock(&registry_mu);
  return RA_OK;
}

/* An id all ranks share, new for every communicator: rank 0 draws it. */
static uint64_t new_id(const mpi_impl *m) {
  static uint64_t counter;
  struct timespec t;
  clock_gettime(CLOCK_REALTIME, &t);
  uint64_t x = ((uint64_t)getpid() << 32) ^ (uint64_t)t.tv_nsec ^ ((uint64_t)t.tv_sec << 20) ^ (uintptr_t)m ^
               (++counter * 0x9e3779b97f4a7c15ull);
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  return x ? x : 1;
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
  const size_t n = (size_t)c->size;
  m->gone_after = malloc(n * sizeof *m->gone_after);
  m->gone = calloc(n, sizeof *m->gone);
  m->left_peer = calloc(n, sizeof *m->left_peer);
  m->out_req = malloc(2 * n * sizeof *m->out_req);
  m->waiting_on = calloc(n, sizeof *m->waiting_on);
  uint64_t id = c->rank == 0 ? new_id(m) : 0;
  rc = MPI_Bcast(&id, 1, MPI_UINT64_T, 0, m->comm); /* creation is collective and blocking anyway */
  if (rc != MPI_SUCCESS || !m->gone_after || !m->gone || !m->left_peer || !m->out_req || !m->waiting_on) {
    ra_status st = rc != MPI_SUCCESS ? mpi_error(rc, "MPI_Bcast")
                                     : ra_fail(RA_ERR_OUT_OF_MEMORY, "could not allocate a communicator");
    MPI_Comm_free(&m->comm);
    impl_free(m);
    free(c);
    return st;
  }
  for (size_t r = 0; r < n; r++) m->gone_after[r] = UINT64_MAX;
  for (size_t i = 0; i < 2 * n; i++) m->out_req[i] = MPI_REQUEST_NULL;
  m->c = c;
  c->kind = RA_COMM_MPI;
  c->device_type = RA_DEVICE_CPU;
  c->device = -1;
  c->id = id;
  c->timeout = RA_COMM_DEFAULT_TIMEOUT;
  c->impl = m;
  c->transport = (ra_transport){&mpi_ops, m, c->rank, c->size};
  c->allgather_host = mpi_allgather_host;
  c->allgather = mpi_allgather;
  c->give_up = mpi_give_up;
  c->destroy = mpi_destroy;
  post_inbox(m);
  registry_add(m);
  *out = c;
  return RA_OK;
}
