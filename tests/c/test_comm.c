/*
 * test_comm.c -- the communicator layer every transport shares
 * (csrc/transport/agree.c, comm.c): the agreement's decisions, the call
 * counter, the broken state, give_up and the gather's agreement.
 *
 * A fake communicator stands in for the transport: it is rank 0 (or 1) of
 * three, and its allgather_host puts this rank's header in its slot and a
 * scripted variant of it in every other slot, so each rule of the
 * agreement is exercised without processes.  The MPI transport itself is
 * tested under mpirun (tests/test_mpi*.py).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "transport/transport.h"

typedef struct fake {
  ra_comm comm;
  void (*peer)(ra_agree_header *h, int rank); /* how peer `rank` differs (NULL: not at all) */
  ra_status exchange_status;                  /* != RA_OK: the exchange itself fails */
  int exchanges, give_ups, gathers;
  char last_give_up[256];
} fake;

static ra_status fake_allgather_host(ra_comm *c, const void *send, size_t bytes, void *recv) {
  fake *f = (fake *)c;
  f->exchanges++;
  if (f->exchange_status != RA_OK) return ra_fail(f->exchange_status, "rank 2 never came (scripted)");
  CHECK(bytes == sizeof(ra_agree_header));
  for (int r = 0; r < c->size; r++) {
    ra_agree_header *h = (ra_agree_header *)((char *)recv + (size_t)r * bytes);
    memcpy(h, send, bytes);
    if (r != c->rank && f->peer) f->peer(h, r);
  }
  return RA_OK;
}

static ra_status fake_allgather(ra_comm *c, const void *send, size_t bytes, void *recv) {
  fake *f = (fake *)c;
  f->gathers++;
  for (int r = 0; r < c->size; r++) memcpy((char *)recv + (size_t)r * bytes, send, bytes);
  return RA_OK;
}

static void fake_give_up(ra_comm *c, ra_status status, const char *why) {
  fake *f = (fake *)c;
  (void)status;
  f->give_ups++;
  snprintf(f->last_give_up, sizeof f->last_give_up, "%s", why);
  ra_fail(RA_ERR_INTERNAL, "the transport may overwrite the last error");
}

static void fake_init(fake *f, int rank) {
  memset(f, 0, sizeof *f);
  f->comm.kind = RA_COMM_MPI;
  f->comm.rank = rank;
  f->comm.size = 3;
  f->comm.device_type = RA_DEVICE_CPU;
  f->comm.device = -1;
  f->comm.id = 42;
  f->comm.timeout = RA_COMM_DEFAULT_TIMEOUT;
  f->comm.allgather_host = fake_allgather_host;
  f->comm.allgather = fake_allgather;
  f->comm.give_up = fake_give_up;
}

static ra_config config(void) {
  ra_config c;
  ra_config_init(&c);
  c.batch = 1;
  c.seq_len = 96;
  c.num_heads = 2;
  c.head_dim = 8;
  c.num_branches = 1;
  c.segment_lengths[0] = 96;
  c.dilation_rates[0] = 1;
  c.world_size = 3;
  return c;
}

static ra_status agree(fake *f, ra_comm_op op, ra_status local, const char *message, const ra_config *cfg,
                       uint64_t bytes) {
  const ra_agreement a = {op, local, message, cfg, RA_DEVICE_CPU, bytes, 0};
  return ra_comm_agree_call(&f->comm, &a);
}

static int has(const char *text, const char *part) { return strstr(text, part) != NULL; }

/* ------------------------------------------------------------------ peers */

static void peer_backward_on_1(ra_agree_header *h, int r) {
  if (r == 1) h->op = RA_OP_BACKWARD;
}
static void peer_one_call_behind(ra_agree_header *h, int r) {
  if (r == 2) h->call -= 1;
}
static void peer_refuses(ra_agree_header *h, int r) {
  if (r == 2) {
    h->status = RA_ERR_OUT_OF_MEMORY;
    h->has_cfg = 0;
    snprintf(h->message, sizeof h->message, "MemoryError: no room (scripted)");
  }
}
static void peer_seq_len(ra_agree_header *h, int r) {
  if (r == 1) h->cfg.seq_len = 192;
}
static void peer_branch(ra_agree_header *h, int r) {
  if (r == 2) h->cfg.dilation_rates[0] = 2;
}
static void peer_device(ra_agree_header *h, int r) {
  if (r == 2) h->device_type = RA_DEVICE_CUDA;
}
static void peer_0_seq_len(ra_agree_header *h, int r) {
  if (r == 0) h->cfg.seq_len = 192;
}
static void peer_bytes(ra_agree_header *h, int r) {
  if (r == 2) h->bytes = 8;
}
static void peer_stale(ra_agree_header *h, int r) {
  if (r == 1) h->comm_id = 7;
}
static void peer_garbage(ra_agree_header *h, int r) {
  if (r == 2) h->magic = 0;
}
static void peer_wild_branches(ra_agree_header *h, int r) {
  if (r == 2) h->cfg.num_branches = 1000; /* the other fields equal: must not read past the arrays */
}

/* ------------------------------------------------------------------ tests */

static void test_agreement_counts_calls(void) {
  fake f;
  fake_init(&f, 0);
  ra_config c = config();
  CHECK(ra_comm_calls(&f.comm) == 0);
  CHECK(agree(&f, RA_OP_FORWARD, RA_OK, NULL, &c, 0) == RA_OK);
  CHECK(agree(&f, RA_OP_BACKWARD, RA_OK, NULL, &c, 0) == RA_OK);
  CHECK(ra_comm_calls(&f.comm) == 2 && f.exchanges == 2 && f.give_ups == 0);
  CHECK(ra_comm_broken(&f.comm) == NULL);
  CHECK(strcmp(ra_comm_op_name(RA_OP_FORWARD), "forward") == 0);
  CHECK(strcmp(ra_comm_op_name(RA_OP_BACKWARD), "backward") == 0);
  CHECK(strcmp(ra_comm_op_name(RA_OP_GATHER), "gather") == 0);
  CHECK(strcmp(ra_comm_op_name(RA_OP_COLLECTIVE), "collective call") == 0);
}

static void test_operation_must_agree(void) {
  fake f;
  fake_init(&f, 0);
  ra_config c = config();
  f.peer = peer_backward_on_1;
  CHECK(agree(&f, RA_OP_FORWARD, RA_OK, NULL, &c, 0) == RA_ERR_TRANSPORT);
  CHECK(strcmp(ra_last_error(), "operation differs between ranks: forward on rank 0 but backward on rank 1 (call 1)") ==
        0);
  /* a refusal carries its operation too: the mismatch is named first */
  CHECK(agree(&f, RA_OP_FORWARD, RA_ERR_INVALID_ARGUMENT, "q: bad", NULL, 0) == RA_ERR_TRANSPORT);
  CHECK(has(ra_last_error(), "forward on rank 0 but backward on rank 1 (call 2)"));
  CHECK(ra_comm_broken(&f.comm) == NULL); /* the ranks agree that they disagree: still usable */
  f.peer = NULL;
  CHECK(agree(&f, RA_OP_FORWARD, RA_OK, NULL, &c, 0) == RA_OK);
}

static void test_call_numbers_must_agree(void) {
  fake f;
  fake_init(&f, 0);
  ra_config c = config();
  f.peer = peer_one_call_behind;
  CHECK(agree(&f, RA_OP_FORWARD, RA_OK, NULL, &c, 0) == RA_ERR_TRANSPORT);
  CHECK(has(ra_last_error(), "call 1 on rank 0 but call 0 on rank 2"));
  /* counters never meet again: broken, and the next call fails at once */
  CHECK(ra_comm_broken(&f.comm) != NULL && has(ra_comm_broken(&f.comm), "forward (call 1) failed: the ranks are out of step"));
  f.peer = NULL;
  const int exchanges = f.exchanges;
  CHECK(agree(&f, RA_OP_FORWARD, RA_OK, NULL, &c, 0) == RA_ERR_TRANSPORT);
  CHECK(f.exchanges == exchanges && has(ra_last_error(), "broken") && has(ra_last_error(), "out of step"));
  CHECK(ra_comm_calls(&f.comm) == 1);
}

static void test_refusals_reach_everyone(void) {
  fake f;
  fake_init(&f, 0);
  ra_config c = config();
  f.peer = peer_refuses;
  CHECK(agree(&f, RA_OP_BACKWARD, RA_OK, NULL, &c, 0) == RA_ERR_OUT_OF_MEMORY);
  CHECK(strcmp(ra_last_error(), "rank 2: MemoryError: no room (scripted)") == 0);
  /* this rank's own refusal: its own status and message */
  f.peer = NULL;
  CHECK(agree(&f, RA_OP_BACKWARD, RA_ERR_UNSUPPORTED, "q: int32 is not supported", NULL, 0) == RA_ERR_UNSUPPORTED);
  CHECK(strcmp(ra_last_error(), "q: int32 is not supported") == 0);
  CHECK(ra_comm_broken(&f.comm) == NULL && f.give_ups == 0);
}

static void test_configuration_must_agree(void) {
  fake f;
  fake_init(&f, 1); /* every rank names the same ranks: rank 0 is the reference */
  ra_config c = config();
  f.peer = peer_0_seq_len;
  CHECK(agree(&f, RA_OP_FORWARD, RA_OK, NULL, &c, 0) == RA_ERR_INVALID_ARGUMENT);
  CHECK(strcmp(ra_last_error(), "configuration differs between ranks: seq_len is 192 on rank 0 but 96 on rank 1") == 0);
  f.peer = peer_branch;
  CHECK(agree(&f, RA_OP_FORWARD, RA_OK, NULL, &c, 0) == RA_ERR_INVALID_ARGUMENT);
  CHECK(strcmp(ra_last_error(), "configuration differs between ranks: branch 0 is (96, 1) on rank 0 but (96, 2) "
                                "on rank 2") == 0);
  f.peer = peer_device;
  CHECK(agree(&f, RA_OP_FORWARD, RA_OK, NULL, &c, 0) == RA_ERR_INVALID_ARGUMENT);
  CHECK(strcmp(ra_last_error(), "device type differs between ranks: cpu on rank 0 but cuda on rank 2") == 0);
  f.peer = peer_wild_branches;
  CHECK(agree(&f, RA_OP_FORWARD, RA_OK, NULL, &c, 0) == RA_ERR_INVALID_ARGUMENT);
  CHECK(has(ra_last_error(), "num_branches"));
  CHECK(ra_comm_broken(&f.comm) == NULL);
}

static void test_configuration_names_rank_0(void) {
  fake f;
  fake_init(&f, 0);
  ra_config c = config();
  f.peer = peer_seq_len;
  CHECK(agree(&f, RA_OP_FORWARD, RA_OK, NULL, &c, 0) == RA_ERR_INVALID_ARGUMENT);
  CHECK(strcmp(ra_last_error(), "configuration differs between ranks: seq_len is 96 on rank 0 but 192 on rank 1") == 0);
}

static void test_gather_agrees_on_bytes(void) {
  fake f;
  fake_init(&f, 0);
  f.peer = peer_bytes;
  char send[16] = "0123456789abcde", recv[48];
  CHECK(ra_comm_allgather(&f.comm, send, sizeof send, recv) == RA_ERR_INVALID_ARGUMENT);
  CHECK(strcmp(ra_last_error(), "gather: byte counts differ between ranks: 16 on rank 0 but 8 on rank 2") == 0);
  CHECK(f.gathers == 0); /* nothing moved */
  f.peer = NULL;
  CHECK(ra_comm_allgather(&f.comm, send, sizeof send, recv) == RA_OK);
  CHECK(f.gathers == 1 && memcmp(recv + 32, send, 16) == 0 && ra_comm_calls(&f.comm) == 2);
}

static void test_malformed_headers(void) {
  fake f;
  fake_init(&f, 0);
  ra_config c = config();
  f.peer = peer_stale;
  CHECK(agree(&f, RA_OP_FORWARD, RA_OK, NULL, &c, 0) == RA_ERR_TRANSPORT);
  CHECK(has(ra_last_error(), "rank 1 sent a malformed or stale agreement header"));
  f.peer = peer_garbage;
  CHECK(agree(&f, RA_OP_FORWARD, RA_OK, NULL, &c, 0) == RA_ERR_TRANSPORT);
  CHECK(has(ra_last_error(), "rank 2 sent a malformed"));
}

static void test_failed_exchange_gives_up_once(void) {
  fake f;
  fake_init(&f, 0);
  ra_config c = config();
  f.exchange_status = RA_ERR_TRANSPORT;
  CHECK(agree(&f, RA_OP_FORWARD, RA_OK, NULL, &c, 0) == RA_ERR_TRANSPORT);
  CHECK(strcmp(ra_last_error(), "rank 2 never came (scripted)") == 0); /* not the transport's overwrite */
  CHECK(f.give_ups == 1 && strcmp(f.last_give_up, "rank 2 never came (scripted)") == 0);
  CHECK(strcmp(ra_comm_broken(&f.comm), "forward (call 1) failed: rank 2 never came (scripted)") == 0);
  ra_comm_give_up(&f.comm, RA_ERR_TRANSPORT, "again"); /* the same call: nothing more */
  CHECK(f.give_ups == 1);
  f.exchange_status = RA_OK;
  CHECK(agree(&f, RA_OP_FORWARD, RA_OK, NULL, &c, 0) == RA_ERR_TRANSPORT); /* broken: at once */
  CHECK(f.exchanges == 1 && has(ra_last_error(), "create a new one") && has(ra_last_error(), "never came"));
  char buf[8] = {0}, out[24];
  CHECK(ra_comm_allgather(&f.comm, buf, sizeof buf, out) == RA_ERR_TRANSPORT && f.gathers == 0);
}

static void test_give_up_after_the_agreement(void) {
  fake f;
  fake_init(&f, 0);
  ra_config c = config();
  CHECK(agree(&f, RA_OP_BACKWARD, RA_OK, NULL, &c, 0) == RA_OK);
  ra_fail(RA_ERR_OUT_OF_MEMORY, "backward (call 1): could not allocate the ring buffers of rank 0");
  ra_comm_give_up(&f.comm, RA_ERR_OUT_OF_MEMORY, ra_last_error());
  CHECK(f.give_ups == 1);
  CHECK(strcmp(ra_last_error(), "backward (call 1): could not allocate the ring buffers of rank 0") == 0);
  /* the call is named once */
  CHECK(strcmp(ra_comm_broken(&f.comm), "backward (call 1) failed: could not allocate the ring buffers of rank 0") == 0);
}

static void test_timeout_setting(void) {
  fake f;
  fake_init(&f, 0);
  CHECK(ra_comm_timeout(&f.comm) == RA_COMM_DEFAULT_TIMEOUT);
  CHECK(ra_comm_set_timeout(&f.comm, 2.5) == RA_OK && ra_comm_timeout(&f.comm) == 2.5);
  CHECK(ra_comm_set_timeout(&f.comm, -1) == RA_OK && ra_comm_timeout(&f.comm) == 0); /* forever */
  double nan = 0.0;
  nan = nan / nan;
  CHECK(ra_comm_set_timeout(&f.comm, nan) == RA_ERR_INVALID_ARGUMENT);
  CHECK(ra_comm_set_timeout(NULL, 1) == RA_ERR_INVALID_ARGUMENT);
  CHECK(ra_comm_agree_call(NULL, NULL) == RA_ERR_INVALID_ARGUMENT);
  ra_comm_exiting(); /* no MPI communicator here: nothing to tell */
}

int main(void) {
  static const test_case tests[] = {
      {"agreement_counts_calls", test_agreement_counts_calls},
      {"operation_must_agree", test_operation_must_agree},
      {"call_numbers_must_agree", test_call_numbers_must_agree},
      {"refusals_reach_everyone", test_refusals_reach_everyone},
      {"configuration_must_agree", test_configuration_must_agree},
      {"configuration_names_rank_0", test_configuration_names_rank_0},
      {"gather_agrees_on_bytes", test_gather_agrees_on_bytes},
      {"malformed_headers", test_malformed_headers},
      {"failed_exchange_gives_up_once", test_failed_exchange_gives_up_once},
      {"give_up_after_the_agreement", test_give_up_after_the_agreement},
      {"timeout_setting", test_timeout_setting},
  };
  return run_tests(tests, sizeof tests / sizeof tests[0]);
}
