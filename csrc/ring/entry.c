/*
 * entry.c -- ra_forward and ra_backward: the one way into the core.
 *
 * A call is validated here (what the plan cannot see: the tensors, the
 * device, the communicator), planned, given the backend of its device
 * type, and run: every rank as a thread of this process (ranks.c), or,
 * with a communicator, this rank after the agreement with its peers
 * (transport/agree.c).  Nothing below this file chooses a backend, and no
 * transport calls into a backend.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ring/driver.h"

static const ra_backend_iface *choose_backend(ra_device_type type) {
  return type == RA_DEVICE_CUDA ? ra_cuda_backend_iface() : ra_cpu_backend_iface();
}

static const char *device_name(ra_device_type type) { return type == RA_DEVICE_CUDA ? "CUDA" : "CPU"; }

/* `elems` elements of `es` bytes from `data` fit the address space: every
 * offset the core computes below them is then free of overflow. */
static int reach_ok(const void *data, int64_t elems, size_t es) {
  size_t bytes;
  return ra_bytes_ok(elems, es, &bytes) && (uintptr_t)data <= UINTPTR_MAX - bytes;
}

/* A tensor the C side must be able to index: data set, strides >= 0, and
 * every element of the call's shape (`rows` positions; k, v, dk and dv
 * with the key/value heads) within reach. */
static ra_status check_tensor(const ra_call *call, ra_tensor t, const char *name) {
  const ra_config *c = &call->plan->cfg;
  const int kv = name[0] == 'k' || name[0] == 'v' || !strcmp(name, "dk") || !strcmp(name, "dv");
  const int64_t heads = kv ? c->num_kv_heads : c->num_heads;
  if (!t.data) return ra_fail(RA_ERR_INVALID_ARGUMENT, "%s: data is NULL", name);
  if (t.stride_b < 0 || t.stride_n < 0 || t.stride_h < 0)
    return ra_fail(RA_ERR_INVALID_ARGUMENT, "%s: strides must be non-negative", name);
  int64_t span;
  if (!ra_tensor_span_ok(&t, c->batch, call->rows, heads, c->head_dim, &span) ||
      !reach_ok(t.data, span, ra_dtype_size(c->dtype)))
    return ra_fail(RA_ERR_INVALID_ARGUMENT,
                   "%s: strides (%lld, %lld, %lld) reach beyond the address space for shape (%lld, %lld, %lld, %lld)",
                   name, (long long)t.stride_b, (long long)t.stride_n, (long long)t.stride_h, (long long)c->batch,
                   (long long)call->rows, (long long)heads, (long long)c->head_dim);
  return RA_OK;
}

/* lse: (batch, heads) rows of `rows` values, lse_ld apart, within reach. */
static ra_status check_lse(const ra_call *call) {
  const ra_fwd_params *f = &call->p.fwd;
  const ra_config *c = &call->plan->cfg;
  if (f->lse_ld < call->rows)
    return ra_fail(RA_ERR_INVALID_ARGUMENT, "lse: row stride %lld below the %lld rows of the call",
                   (long long)f->lse_ld, (long long)call->rows);
  int64_t lines, before, span;
  if (!ra_mul_ok(c->batch, c->num_heads, &lines) || !ra_mul_ok(lines - 1, f->lse_ld, &before) ||
      !ra_add_ok(before, call->rows, &span) || !reach_ok(f->lse, span, ra_acc_size(c->dtype)))
    return ra_fail(RA_ERR_INVALID_ARGUMENT, "lse: row stride %lld reaches beyond the address space",
                   (long long)f->lse_ld);
  return RA_OK;
}

/* What the plan does not check: the call's tensors, lse and device. */
static ra_status check_call(const ra_call *call) {
  const ra_fwd_params *f = &call->p.fwd;
  if (f->device_type != RA_DEVICE_CPU && f->device_type != RA_DEVICE_CUDA)
    return ra_fail(RA_ERR_INVALID_ARGUMENT, "device_type: unknown device type %d", (int)f->device_type);
  RA_TRY(check_tensor(call, f->q, "q"));
  RA_TRY(check_tensor(call, f->k, "k"));
  RA_TRY(check_tensor(call, f->v, "v"));
  RA_TRY(check_tensor(call, f->o, "out"));
  if (call->backward) {
    RA_TRY(check_tensor(call, call->p.dout, "dout"));
    RA_TRY(check_tensor(call, call->p.dq, "dq"));
    RA_TRY(check_tensor(call, call->p.dk, "dk"));
    RA_TRY(check_tensor(call, call->p.dv, "dv"));
    if (!f->lse) return ra_fail(RA_ERR_INVALID_ARGUMENT, "lse: the backward needs the forward's lse");
  }
  if (f->lse) RA_TRY(check_lse(call));
  if (f->comm && f->comm->device_type != f->device_type)
    return ra_fail(RA_ERR_UNSUPPORTED, "the %s communicator computes on the %s but the tensors are %s memory",
                   f->comm->kind == RA_COMM_MPI    ? "MPI"
                   : f->comm->kind == RA_COMM_NCCL ? "NCCL"
                                                   : f->comm->transport.ops->name,
                   device_name(f->comm->device_type),
                   f->device_type == RA_DEVICE_CUDA ? "CUDA device" : "host");
  if (f->comm && f->comm->device_type == RA_DEVICE_CUDA && f->exec.device != f->comm->device)
    return ra_fail(RA_ERR_INVALID_ARGUMENT, "q is on cuda:%d but the communicator is on cuda:%d", f->exec.device,
                   f->comm->device);
  return RA_OK;
}

/* Attention work of a call in floating-point operations (about: causal
 * halves the pairs, the backward does 2.5 times the forward's products). */
static double call_flops(const ra_plan *plan, int backward) {
  const ra_config *c = &plan->cfg;
  double pairs = 0.0; /* (query, key) pairs of one batch and head dimension */
  for (int i = 0; i < c->num_branches; i++) {
    const ra_branch_info *b = &plan->branch[i];
    const double keys = (double)b->segment / (double)b->rate, queries = (double)c->seq_len / (double)b->rate;
    pairs += (double)(b->head_end - b->head_begin) * queries * keys * (c->causal ? 0.5 : 1.0);
  }
  return 4.0 * (double)c->batch * (double)c->head_dim * pairs * (backward ? 2.5 : 1.0);
}

/* Work below which another thread costs more (waking it, sharing the
 * blocks, joining) than it saves: a few microseconds of kernel time. */
#define RA_FLOPS_PER_THREAD 2.0e6

/* The call's thread count: the one its caller chose (num_threads=,
 * RINGATTN_NUM_THREADS), else the default cut down so that every thread
 * has RA_FLOPS_PER_THREAD of work: a tiny call runs on one core. */
static int call_threads(const ra_call *call) {
  const int requested = call->p.fwd.exec.num_threads, threads = ra_resolve_num_threads(requested);
  if (ra_num_threads_explicit(requested)) return threads;
  const double ranks = call->p.fwd.comm ? (double)call->plan->cfg.world_size : 1.0; /* this process's share */
  const double useful = call_flops(call->plan, call->backward) / ranks / RA_FLOPS_PER_THREAD;
  return useful < 1.0 ? 1 : (useful < (double)threads ? (int)useful : threads);
}

/* Plan and check everything this process can check on its own. */
static ra_status prepare(ra_call *call, const ra_backend_iface *iface, const ra_plan **plan) {
  ra_fwd_params *f = &call->p.fwd;
  if (f->comm && f->cfg.world_size != f->comm->size)
    return ra_fail(RA_ERR_INVALID_ARGUMENT, "world_size=%d but the communicator has %d ranks", f->cfg.world_size,
                   f->comm->size);
  RA_TRY(ra_plan_acquire(&f->cfg, plan));
  call->plan = *plan;
  call->rows = f->comm ? (*plan)->local_len : f->cfg.seq_len;
  f->exec.num_threads = call_threads(call);
  RA_TRY(check_call(call));
  RA_TRY(iface->supports(call));
  return iface->check_inputs ? iface->check_inputs(call) : RA_OK;
}

/* This rank of a communicator: agree with the peers on the operation, the
 * call number and the configuration (a rank whose preparation failed brings
 * its failure, so that every rank raises it), then run. */
static ra_status run_comm(ra_call *call, const ra_backend_iface *iface, ra_status local) {
  ra_comm *comm = call->p.fwd.comm;
  char message[256];
  snprintf(message, sizeof message, "%s", local == RA_OK ? "" : ra_last_error());
  const ra_agreement agreement = {call->backward ? RA_OP_BACKWARD : RA_OP_FORWARD, local, message,
                                  local == RA_OK ? &call->p.fwd.cfg : NULL, call->p.fwd.device_type, 0,
                                  local == RA_OK ? ra_ring_sub_blocks(&call->p.fwd) : 0};
  RA_TRY(ra_comm_agree_call(comm, &agreement));
  call->rank = comm->rank;
  void *shared = NULL;
  ra_status st = iface->call_open ? iface->call_open(call, &shared) : RA_OK;
  if (st == RA_OK) {
    st = ra_run_rank(iface, shared, call, &comm->transport);
    if (iface->call_close) iface->call_close(shared);
  }
  /* A failure after the agreement: no peer may wait for this rank, and the
   * ring's messages are out of step, so the communicator is broken. */
  if (st != RA_OK) ra_comm_give_up(comm, st, ra_last_error());
  return st;
}

static ra_status run(ra_call *call) {
  ra_fwd_params *f = &call->p.fwd;
  if (f->comm && f->comm->device_type == RA_DEVICE_CUDA && f->exec.device < 0) f->exec.device = f->comm->device;
  const int ranks = f->comm ? 1 : (f->cfg.world_size > 0 ? f->cfg.world_size : 1);
  ra_stats *own = NULL;
  if (!f->stats && !(f->stats = own = calloc((size_t)ranks, sizeof *own))) {
    const ra_status st = ra_fail(RA_ERR_OUT_OF_MEMORY, "could not allocate the statistics of %d ranks", ranks);
    return f->comm ? run_comm(call, choose_backend(f->device_type), st) : st; /* the peers must hear of it */
  }
  memset(f->stats, 0, sizeof *f->stats * (size_t)ranks);
  const ra_backend_iface *iface = choose_backend(f->device_type);
  const ra_plan *plan = NULL;
  ra_status st = prepare(call, iface, &plan);
  if (f->comm)
    st = run_comm(call, iface, st);
  else if (st == RA_OK)
    st = ra_run_ranks(call, iface);
  ra_plan_release(plan);
  free(own);
  return st;
}

static ra_status run_job(void *call) { return run(call); }

/* In the child of a fork() the calling thread's OpenMP team is gone: a
 * call that may use more than one thread runs on a worker thread the child
 * made (ring/ranks.c).  A communicator's call stays on the caller's thread. */
static ra_status start(ra_call *call) {
  ra_workers_init();
  if (ra_forked_child() && !call->p.fwd.comm && call->p.fwd.device_type == RA_DEVICE_CPU &&
      ra_resolve_num_threads(call->p.fwd.exec.num_threads) > 1)
    return ra_run_on_worker(run_job, call);
  return run(call);
}

ra_status ra_forward(const ra_fwd_params *p) {
  if (!p) return ra_fail(RA_ERR_INVALID_ARGUMENT, "params is NULL");
  ra_call call;
  memset(&call, 0, sizeof call);
  call.p.fwd = *p;
  return start(&call);
}

ra_status ra_backward(const ra_bwd_params *p) {
  if (!p) return ra_fail(RA_ERR_INVALID_ARGUMENT, "params is NULL");
  ra_call call;
  memset(&call, 0, sizeof call);
  call.p = *p;
  call.backward = 1;
  return start(&call);
}
