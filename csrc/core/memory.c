/*
 * memory.c -- allocations counted per rank.
 *
 * Every buffer a rank allocates goes through ra_alloc so that ra_stats
 * reports what the rank really holds; memory the caller owns (the rank's
 * shards) is counted with ra_hold.  The peak is what proves O(n/k).
 */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

static void account(ra_stats *stats, int64_t delta) {
  if (!stats) return;
  stats->current_bytes += delta;
  if (stats->current_bytes > stats->peak_bytes)
    stats->peak_bytes = stats->current_bytes;
}

void ra_hold(ra_stats *stats, int64_t bytes) { account(stats, bytes); }
void ra_release(ra_stats *stats, int64_t bytes) { account(stats, -bytes); }

void *ra_alloc(ra_stats *stats, size_t bytes) {
  void *p = NULL;
  size_t rounded = (bytes + 63) / 64 * 64;
  if (rounded == 0) rounded = 64;
  if (bytes > (size_t)INT64_MAX - 63 || posix_memalign(&p, 64, rounded) != 0) { /* the rounding must not wrap */
    ra_fail(RA_ERR_OUT_OF_MEMORY, "could not allocate %zu bytes", bytes);
    return NULL;
  }
  account(stats, (int64_t)bytes);
  return p;
}

void ra_free(ra_stats *stats, void *ptr, size_t bytes) {
  if (!ptr) return;
  free(ptr);
  account(stats, -(int64_t)bytes);
}
