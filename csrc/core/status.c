/*
 * status.c -- status codes and the per-thread last-error message.
 */
#include <stdarg.h>
#include <stdio.h>

#include "internal.h"

#if defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L && !defined(__STDC_NO_THREADS__)
#define RA_THREAD_LOCAL _Thread_local
#else
#define RA_THREAD_LOCAL __thread
#endif

static RA_THREAD_LOCAL char last_error[512];

const char *ra_status_string(ra_status status) {
  switch (status) {
    case RA_OK: return "no error";
    case RA_ERR_INVALID_ARGUMENT: return "invalid argument";
    case RA_ERR_UNSUPPORTED: return "unsupported";
    case RA_ERR_OUT_OF_MEMORY: return "out of memory";
    case RA_ERR_TRANSPORT: return "transport error";
    case RA_ERR_NONFINITE: return "non-finite input";
    case RA_ERR_INTERNAL: return "internal error";
  }
  return "unknown status";
}

const char *ra_last_error(void) { return last_error; }

ra_status ra_fail(ra_status status, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(last_error, sizeof last_error, fmt, ap);
  va_end(ap);
  return status;
}
