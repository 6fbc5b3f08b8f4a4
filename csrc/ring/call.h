/*
 * call.h -- a call as the layers below the entry point see it.
 *
 * ra_forward / ra_backward (ring/entry.c) wrap the caller's parameters in
 * one ra_call with the validated plan; the in-process runner
 * (ring/ranks.c) derives one ra_call per rank whose tensors, lse and stats
 * are views of that rank's shard; the driver (ring/driver.c) and the
 * backends (ring/backend.h) take that struct and nothing else.
 */
#ifndef RINGATTN_CALL_H
#define RINGATTN_CALL_H

#include "internal.h"

typedef struct ra_call {
  ra_bwd_params p;     /* the caller's parameters; a forward leaves dout,
                        * dq, dk, dv empty (data NULL) */
  int backward;
  const ra_plan *plan;
  int rank;            /* this rank of the call's world (a rank's view)   */
  int64_t rows;        /* sequence positions the tensors hold: n in
                        * process without comm, L for a rank's view       */
  int64_t second_row;  /* zigzag: the row of the rank's second chunk in
                        * its tensors (0: right after the first, C)       */
} ra_call;

/* The call's configuration (the plan's: scale resolved). */
static inline const ra_config *ra_call_config(const ra_call *c) { return &c->plan->cfg; }

#endif /* RINGATTN_CALL_H */
