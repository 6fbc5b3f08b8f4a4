/*
 * double.c -- the float64 path of the CPU backend.
 *
 * For float64 inputs everything is double: q, k, v, o, the accumulators
 * (acc, lse, delta, dQ, dK, dV -- the driver sizes them with ra_acc_size),
 * the log-sum-exp merge and the dK/dV that travel the ring.  This path is
 * there for accuracy (gradient checks by finite differences need ~1e-12),
 * not speed: plain scalar loops over one query row at a time, parallel over
 * tasks.  A task owns its query rows (and, in the backward, its key rows:
 * the driver never gives two tasks of one batch the same keys), so no two
 * threads write the same row.
 *
 * Softmax is the one of docs/semantics.md evaluated exactly as written,
 * without the fp32 kernel's base-2 tricks: s = scale q.k, the forward keeps
 * a running max and sum (online softmax), the backward recomputes
 * P = exp(s - lse) from the final lse.
 */
#include <math.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu/double.h"

static int thread_id(void) {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

static double dot(const double *a, const double *b, int64_t d) {
  double s = 0.0;
  for (int64_t c = 0; c < d; c++) s += a[c] * b[c];
  return s;
}

/* y += a x */
static void axpy(double *y, double a, const double *x, int64_t d) {
  for (int64_t c = 0; c < d; c++) y[c] += a * x[c];
}

/* How many keys of a run (key j at kpos0 + j*rate) a query at qpos sees:
 * all nk, or with causality those at positions <= qpos. */
static int64_t visible_keys(int causal, int64_t rate, int64_t qpos, int64_t kpos0, int64_t nk) {
  if (!causal) return nk;
  const int64_t diff = qpos - kpos0, upto = diff < 0 ? 0 : diff / rate + 1;
  return upto < nk ? upto : nk;
}

size_t ra_f64_workspace_bytes(int64_t head_dim) { return sizeof(double) * (size_t)head_dim; }

ra_status ra_f64_init_state(void *ctx, float *acc, int64_t acc_n, float *lse, int64_t lse_n) {
  (void)ctx;
  memset(acc, 0, sizeof(double) * (size_t)acc_n);
  for (int64_t i = 0; i < lse_n; i++) ((double *)lse)[i] = -INFINITY;
  return RA_OK;
}

/* ------------------------------------------------------------- forward */

/* Attention of one query q over nk keys/values (rows k_stride / v_stride
 * apart): o (d doubles) <- the normalised output; returns its log-sum-exp,
 * -inf when nk == 0 (o is then 0).  NaN scores make o and lse NaN. */
static double attend_row(const double *q, const double *k, int64_t k_stride, const double *v,
                         int64_t v_stride, int64_t nk, int64_t d, double scale, double *o) {
  double m = -INFINITY, l = 0.0; /* running max and sum of exp(s - m) */
  memset(o, 0, sizeof(double) * (size_t)d);
  for (int64_t j = 0; j < nk; j++) {
    const double s = scale * dot(q, k + j * k_stride, d);
    if (s > m) { /* rescale what was summed against the old max */
      const double alpha = exp(m - s); /* 0 while m is -inf */
      l *= alpha;
      for (int64_t c = 0; c < d; c++) o[c] *= alpha;
      m = s;
    }
    const double p = exp(s - m);
    l += p;
    axpy(o, p, v + j * v_stride, d);
  }
  if (!(l > 0.0)) return l == l ? -INFINITY : NAN; /* no keys, or NaN: keep it visible */
  for (int64_t c = 0; c < d; c++) o[c] /= l;
  return m + log(l);
}

ra_status ra_f64_attend(void *ctx, const ra_attend_batch *a) {
  const ra_cpu_backend *cpu = ctx;
  const double *q = a->q, *k = a->k, *v = a->v;
  double *acc = (double *)a->acc, *lse = (double *)a->lse;
  const int64_t d = a->head_dim;
#pragma omp parallel for num_threads(cpu->threads) schedule(dynamic, 1)
  for (int64_t i = 0; i < a->ntasks; i++) {
    const ra_attend_task *t = &a->tasks[i];
    double *o = cpu->ws[thread_id()];
    for (int64_t r = 0; r < t->nq; r++) {
      const int64_t nk = visible_keys(a->causal, a->rate, t->qpos0 + r * a->rate, t->kpos0, t->nk);
      const double part = attend_row(q + t->q + r * a->q_stride, k + t->k, a->k_stride, v + t->v, a->v_stride,
                                     nk, d, a->scale64, o);
      ra_merge_rows_f64(acc + t->acc + r * a->acc_stride, 0, lse + t->lse + r * a->lse_stride, 0, o, 0, &part, 1, d);
    }
  }
  return RA_OK;
}

/* ------------------------------------------------------------ backward */

static const double *row_of(ra_tensor t, int64_t bb, int64_t p, int64_t h) {
  return (const double *)t.data + bb * t.stride_b + p * t.stride_n + h * t.stride_h;
}

ra_status ra_f64_row_dot(void *ctx, const ra_config *c, int64_t L, ra_tensor dout, ra_tensor o,
                         float *delta, int64_t ld) {
  const ra_cpu_backend *cpu = ctx;
  const int64_t H = c->num_heads, d = c->head_dim, rows = c->batch * H * L;
  double *out = (double *)delta;
#pragma omp parallel for num_threads(cpu->threads) schedule(static)
  for (int64_t i = 0; i < rows; i++) {
    const int64_t p = i % L, h = (i / L) % H, bb = i / L / H;
    out[(bb * H + h) * ld + p] = dot(row_of(dout, bb, p, h), row_of(o, bb, p, h), d);
  }
  return RA_OK;
}

/* The flash backward of backward.h, one (query, key) pair at a time:
 * P = exp(scale q.k - lse), dS = P (dO.v - D); dV += P dO, dK += scale dS q,
 * dQ += scale dS k.  Rows whose lse is -inf attend to nothing. */
ra_status ra_f64_attend_backward(void *ctx, const ra_backward_batch *bw) {
  const ra_cpu_backend *cpu = ctx;
  const ra_attend_batch *a = &bw->a;
  const double *q = a->q, *k = a->k, *v = a->v, *dout = bw->dout;
  const double *lse = (const double *)a->lse, *delta = (const double *)bw->delta;
  double *dq = (double *)a->acc, *dk = (double *)bw->dk, *dv = (double *)bw->dv;
  const int64_t d = a->head_dim;
  const double scale = a->scale64;
#pragma omp parallel for num_threads(cpu->threads) schedule(dynamic, 1)
  for (int64_t i = 0; i < a->ntasks; i++) {
    const ra_attend_task *t = &a->tasks[i];
    for (int64_t r = 0; r < t->nq; r++) {
      const double lse_r = lse[t->lse + r * a->lse_stride], D = delta[t->delta + r * a->lse_stride];
      if (lse_r == -INFINITY) continue;
      const double *qr = q + t->q + r * a->q_stride, *g = dout + t->dout + r * bw->dout_stride;
      double *dqr = dq + t->acc + r * a->acc_stride;
      const int64_t nk = visible_keys(a->causal, a->rate, t->qpos0 + r * a->rate, t->kpos0, t->nk);
      for (int64_t j = 0; j < nk; j++) {
        const double *kj = k + t->k + j * a->k_stride, *vj = v + t->v + j * a->v_stride;
        const double p = exp(scale * dot(qr, kj, d) - lse_r), ds = p * (dot(g, vj, d) - D);
        axpy(dv + t->dkv + j * bw->dkv_stride, p, g, d);
        axpy(dk + t->dkv + j * bw->dkv_stride, scale * ds, qr, d);
        axpy(dqr, scale * ds, kj, d);
      }
    }
  }
  return RA_OK;
}

ra_status ra_f64_scatter_add(void *ctx, const ra_scatter_batch *sc) {
  const ra_cpu_backend *cpu = ctx;
  const double *src = (const double *)sc->src;
  double *dst = (double *)sc->dst;
#pragma omp parallel for num_threads(cpu->threads) schedule(static)
  for (int64_t i = 0; i < sc->ntasks; i++) {
    const ra_copy_task *t = &sc->tasks[i];
    for (int64_t r = 0; r < t->count; r++)
      axpy(dst + t->dst + r * sc->dst_stride, 1.0, src + t->src + r * sc->head_dim, sc->head_dim);
  }
  return RA_OK;
}
