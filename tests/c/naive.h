/* naive.h -- the semantics written as plainly as possible, in double. */
#ifndef RINGATTN_TEST_NAIVE_H
#define RINGATTN_TEST_NAIVE_H
#include "ringattn.h"

/* o (b, n, h, d) and lse (b, h, n) for contiguous float inputs. */
void naive_attention(const ra_config *cfg, const float *q, const float *k,
                     const float *v, double *o, double *lse);
#endif
