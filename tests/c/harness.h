/*
 * harness.h -- the minimal test harness of the C tests: CHECK records a
 * failure with its line and carries on; run_tests runs a table of tests and
 * prints one line each, then "N passed, N failed" last.  Header-only: each
 * test program is a single translation unit that includes it once.
 */
#ifndef RINGATTN_TEST_HARNESS_H
#define RINGATTN_TEST_HARNESS_H

#include <stdint.h>
#include <stdio.h>

static int failures_in_test;

#define CHECK(cond)                                                                   \
  do {                                                                                \
    if (!(cond)) {                                                                    \
      fprintf(stderr, "  %s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);      \
      failures_in_test++;                                                             \
    }                                                                                 \
  } while (0)

/* xorshift64*: a fixed, portable sequence in [-1, 1) */
static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static inline float uniform(void) {
  rng_state ^= rng_state >> 12;
  rng_state ^= rng_state << 25;
  rng_state ^= rng_state >> 27;
  return (float)((rng_state * 2685821657736338717ull) >> 40) / (float)(1 << 23) - 1.0f;
}

typedef struct test_case {
  const char *name;
  void (*fn)(void);
} test_case;

/* Run every test; 0 when all passed. */
static int run_tests(const test_case *tests, size_t count) {
  int passed = 0, failed = 0;
  for (size_t i = 0; i < count; i++) {
    failures_in_test = 0;
    tests[i].fn();
    printf("%-36s %s\n", tests[i].name, failures_in_test ? "FAIL" : "ok");
    if (failures_in_test) failed++;
    else passed++;
  }
  printf("%d passed, %d failed\n", passed, failed);
  return failed ? 1 : 0;
}

#endif /* RINGATTN_TEST_HARNESS_H */
