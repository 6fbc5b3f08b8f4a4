/*
 * naive.c -- reference of docs/semantics.md: for every query and every
 * branch cell it uses, list the visible keys and take a softmax in double.
 * O(n^2) and obviously correct; used only by the C tests.
 */
#include "naive.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static int64_t eff_segment(const ra_config *c, int i) {
  return c->segment_lengths[i] < c->seq_len ? c->segment_lengths[i] : c->seq_len;
}

/* Offset of head h in branch i, or -1 when the head does not use it. */
static int64_t offset_of(const ra_config *c, int i, int64_t h) {
  int64_t r = c->dilation_rates[i], H = c->num_heads, G = c->num_branches;
  if (c->mode == RA_MODE_LONGNET) return h / ((H + r - 1) / r);
  int64_t begin = 0;
  for (int g = 0; g < G; g++) {
    int64_t size = H / G + (g < H % G ? 1 : 0);
    if (h >= begin && h < begin + size) return g == i ? g % r : -1;
    begin += size;
  }
  return -1;
}

static int active(int64_t p, int64_t S, int64_t r, int64_t off) {
  return (p % S) % r == off;
}

void naive_attention(const ra_config *c, const float *q, const float *k,
                     const float *v, double *o, double *lse) {
  const int64_t B = c->batch, N = c->seq_len, H = c->num_heads, D = c->head_dim;
  const double scale = c->scale != 0.0 ? c->scale : 1.0 / sqrt((double)D);
  double *s = malloc(sizeof(double) * (size_t)(N * c->num_branches));
  int64_t *key = malloc(sizeof(int64_t) * (size_t)(N * c->num_branches));
#define AT(t, b, p, h) ((t) + (((b) * N + (p)) * H + (h)) * D)
  for (int64_t b = 0; b < B; b++)
    for (int64_t h = 0; h < H; h++)
      for (int64_t p = 0; p < N; p++) {
        int64_t nk = 0;
        for (int i = 0; i < c->num_branches; i++) {
          int64_t S = eff_segment(c, i), r = c->dilation_rates[i], off = offset_of(c, i, h);
          if (off < 0 || !active(p, S, r, off)) continue;
          for (int64_t pk = (p / S) * S; pk < (p / S + 1) * S; pk++) {
            if (!active(pk, S, r, off) || (c->causal && pk > p)) continue;
            double dot = 0;
            for (int64_t x = 0; x < D; x++) dot += (double)AT(q, b, p, h)[x] * AT(k, b, pk, h)[x];
            s[nk] = dot * scale;
            key[nk++] = pk;
          }
        }
        double *out = AT(o, b, p, h);
        memset(out, 0, sizeof(double) * (size_t)D);
        if (nk == 0) {
          lse[(b * H + h) * N + p] = -INFINITY;
          continue;
        }
        double mx = s[0], sum = 0;
        for (int64_t j = 1; j < nk; j++) mx = s[j] > mx ? s[j] : mx;
        for (int64_t j = 0; j < nk; j++) sum += exp(s[j] - mx);
        for (int64_t j = 0; j < nk; j++) {
          double w = exp(s[j] - mx) / sum;
          for (int64_t x = 0; x < D; x++) out[x] += w * AT(v, b, key[j], h)[x];
        }
        lse[(b * H + h) * N + p] = mx + log(sum);
      }
#undef AT
  free(s);
  free(key);
}
