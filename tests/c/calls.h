/*
 * calls.h -- the C tests' way into the core: one in-process call on
 * full-length host (or device) tensors through ra_forward / ra_backward.
 * Header-only, like harness.h.
 */
#ifndef RINGATTN_TEST_CALLS_H
#define RINGATTN_TEST_CALLS_H

#include "ringattn.h"

/* A configuration of G branches (segments s, rates r). */
static inline ra_config make_config(int64_t b, int64_t n, int64_t h, int64_t d, int G, const int64_t *s,
                                    const int64_t *r, int causal, ra_mode mode, int world) {
  ra_config c;
  ra_config_init(&c);
  c.batch = b;
  c.seq_len = n;
  c.num_heads = h;
  c.head_dim = d;
  c.num_branches = G;
  for (int i = 0; i < G; i++) {
    c.segment_lengths[i] = s[i];
    c.dilation_rates[i] = r[i];
  }
  c.causal = causal;
  c.mode = mode;
  c.world_size = world;
  return c;
}

/* The forward of `cfg` over cfg->world_size in-process ranks; lse (b, h, n)
 * may be NULL; stats has world_size entries or is NULL. */
static inline ra_status call_forward(const ra_config *cfg, ra_device_type device, ra_tensor q, ra_tensor k, ra_tensor v,
                              ra_tensor o, void *lse, const ra_exec *exec, ra_stats *stats) {
  ra_fwd_params p;
  ra_fwd_params_init(&p);
  p.cfg = *cfg;
  p.device_type = device;
  p.q = q;
  p.k = k;
  p.v = v;
  p.o = o;
  p.lse = lse;
  p.lse_ld = cfg->seq_len;
  if (exec) p.exec = *exec;
  p.stats = stats;
  return ra_forward(&p);
}

/* Its backward: dq, dk, dv for dout, given the forward's o and lse. */
static inline ra_status call_backward(const ra_config *cfg, ra_device_type device, ra_tensor q, ra_tensor k, ra_tensor v,
                               ra_tensor o, ra_tensor dout, void *lse, ra_tensor dq, ra_tensor dk, ra_tensor dv,
                               const ra_exec *exec, ra_stats *stats) {
  ra_bwd_params p;
  ra_bwd_params_init(&p);
  p.fwd.cfg = *cfg;
  p.fwd.device_type = device;
  p.fwd.q = q;
  p.fwd.k = k;
  p.fwd.v = v;
  p.fwd.o = o;
  p.fwd.lse = lse;
  p.fwd.lse_ld = cfg->seq_len;
  if (exec) p.fwd.exec = *exec;
  p.fwd.stats = stats;
  p.dout = dout;
  p.dq = dq;
  p.dk = dk;
  p.dv = dv;
  return ra_backward(&p);
}

/* CPU execution settings: `threads` threads, NaN/Inf scan when check. */
static inline ra_exec cpu_exec(int threads, int check) {
  ra_exec e = ra_exec_default();
  e.num_threads = threads;
  e.check_finite = check;
  return e;
}

#endif /* RINGATTN_TEST_CALLS_H */
