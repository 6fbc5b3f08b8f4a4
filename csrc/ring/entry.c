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

/* A tensor the C side must be able to index: data set, strides >= 0. */
static ra_status check_tensor(ra_tensor t, const char *name) {
  if (!t.data) return ra_fail(RA_ERR_INVALID_ARGUMENT, "%s: data is NULL", name);
  if (t.stride_b < 0 || t.stride_n < 0 || t.stride_h < 0)
    return ra_fail(RA_ERR_INVALID_ARGUMENT, "%s: strides must be non-negative", name);
  return RA_OK;
}

/* What the plan does not check: the call's tensors, lse and device. */
static ra_status check_call(const ra_call *call) {
  const ra_fwd_params *f = &call->p.fwd;
  if (f->device_type != RA_DEVICE_CPU && f->device_type != RA_DEVICE_CUDA)
    return ra_fail(RA_ERR_INVALID_ARGUMENT, "device_type: unknown device type %d", (int)f->device_type);
  RA_TRY(check_tensor(f->q, "q"));
  RA_TRY(check_tensor(f->k, "k"));
  RA_TRY(check_tensor(f->v, "v"));
  RA_TRY(check_tensor(f->o, "out"));
  if (call->backward) {
    RA_TRY(check_tensor(call->p.dout, "dout"));
    RA_TRY(check_tensor(call->p.dq, "dq"));
    RA_TRY(check_tensor(call->p.dk, "dk"));
    RA_TRY(check_tensor(call->p.dv, "dv"));
    if (!f->lse) return ra_fail(RA_ERR_INVALID_ARGUMENT, "lse: the backward needs the forward's lse");
  }
  if (f->lse && f->lse_ld < call->rows)
    return ra_fail(RA_ERR_INVALID_ARGUMENT, "lse: row stride %lld below the %lld rows of the call",
                   (long long)f->lse_ld, (long long)call->rows);
  if (f->comm && f->comm->device_type != f->device_type)
    return ra_fail(RA_ERR_UNSUPPORTED, "the %s communicator computes on the %s but the tensors are %s memory",
                   f->comm->kind == RA_COMM_MPI ? "MPI" : "NCCL", device_name(f->comm->device_type),
                   f->device_type == RA_DEVICE_CUDA ? "CUDA device" : "host");
  if (f->comm && f->comm->device_type == RA_DEVICE_CUDA && f->exec.device != f->comm->device)
    return ra_fail(RA_ERR_INVALID_ARGUMENT, "q is on cuda:%d but the communicator is on cuda:%d", f->exec.device,
                   f->comm->device);
  return RA_OK;
}

/* Plan and check everything this process can check on its own. */
static ra_status prepare(ra_call *call, const ra_backend_iface *iface, ra_plan **plan) {
  const ra_fwd_params *f = &call->p.fwd;
  if (f->comm && f->cfg.world_size != f->comm->size)
    return ra_fail(RA_ERR_INVALID_ARGUMENT, "world_size=%d but the communicator has %d ranks", f->cfg.world_size,
                   f->comm->size);
  RA_TRY(ra_plan_create(&f->cfg, plan));
  call->plan = *plan;
  call->rows = f->comm ? (*plan)->local_len : f->cfg.seq_len;
  RA_TRY(check_call(call));
  RA_TRY(iface->supports(call));
  return iface->check_inputs ? iface->check_inputs(call) : RA_OK;
}

/* This rank of a communicator: agree with the peers (a rank whose
 * preparation failed brings its failure, so that every rank raises it),
 * then run. */
static ra_status run_comm(ra_call *call, const ra_backend_iface *iface, ra_status local) {
  ra_comm *comm = call->p.fwd.comm;
  char message[256];
  snprintf(message, sizeof message, "%s", local == RA_OK ? "" : ra_last_error());
  RA_TRY(ra_comm_agree(comm, local, message, local == RA_OK ? &call->p.fwd.cfg : NULL));
  call->rank = comm->rank;
  void *shared = NULL;
  ra_status st = iface->call_open ? iface->call_open(call, &shared) : RA_OK;
  if (st == RA_OK) {
    st = ra_run_rank(iface, shared, call, &comm->transport);
    if (iface->call_close) iface->call_close(shared);
  } else if (comm->transport.ops->abort) {
    comm->transport.ops->abort(comm->transport.ctx);
  }
  return st;
}

static ra_status run(ra_call *call) {
  ra_fwd_params *f = &call->p.fwd;
  if (f->exec.num_threads <= 0) f->exec.num_threads = ra_default_num_threads();
  if (f->comm && f->comm->device_type == RA_DEVICE_CUDA && f->exec.device < 0) f->exec.device = f->comm->device;
  const int ranks = f->comm ? 1 : (f->cfg.world_size > 0 ? f->cfg.world_size : 1);
  ra_stats *own = NULL;
  if (!f->stats && !(f->stats = own = calloc((size_t)ranks, sizeof *own)))
    return ra_fail(RA_ERR_OUT_OF_MEMORY, "could not allocate the statistics of %d ranks", ranks);
  memset(f->stats, 0, sizeof *f->stats * (size_t)ranks);
  const ra_backend_iface *iface = choose_backend(f->device_type);
  ra_plan *plan = NULL;
  ra_status st = prepare(call, iface, &plan);
  if (f->comm)
    st = run_comm(call, iface, st);
  else if (st == RA_OK)
    st = ra_run_ranks(call, iface);
  ra_plan_destroy(plan);
  free(own);
  return st;
}

ra_status ra_forward(const ra_fwd_params *p) {
  if (!p) return ra_fail(RA_ERR_INVALID_ARGUMENT, "params is NULL");
  ra_call call;
  memset(&call, 0, sizeof call);
  call.p.fwd = *p;
  return run(&call);
}

ra_status ra_backward(const ra_bwd_params *p) {
  if (!p) return ra_fail(RA_ERR_INVALID_ARGUMENT, "params is NULL");
  ra_call call;
  memset(&call, 0, sizeof call);
  call.p = *p;
  call.backward = 1;
  return run(&call);
}
