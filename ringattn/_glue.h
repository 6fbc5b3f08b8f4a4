/*
 * _glue.h -- conversions the two extension modules (_core.c, _cuda.c)
 * share: core statuses to Python exceptions, integer sequences to arrays,
 * per-rank statistics to dicts.  Header-only: each module includes it once.
 */
#ifndef RINGATTN_GLUE_H
#define RINGATTN_GLUE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "ringattn.h"

/* Raise the Python exception of a core status with ra_last_error()'s
 * message; `fallback` (ringattn.RingAttnError) for transport and internal
 * failures. */
static PyObject *glue_raise_status(ra_status st, PyObject *fallback) {
  PyObject *type = fallback;
  switch (st) {
    case RA_ERR_INVALID_ARGUMENT:
    case RA_ERR_NONFINITE: type = PyExc_ValueError; break;
    case RA_ERR_UNSUPPORTED: type = PyExc_TypeError; break;
    case RA_ERR_OUT_OF_MEMORY: type = PyExc_MemoryError; break;
    default: break;
  }
  const char *msg = ra_last_error();
  PyErr_Format(type, "%s", (msg && *msg) ? msg : ra_status_string(st));
  return NULL;
}

/* Read exactly `count` int64 values (count < 0: up to RA_MAX_BRANCHES, and
 * *got is set to how many). */
static int glue_read_i64s(PyObject *seq, const char *name, int64_t *dst, int count, int *got) {
  PyObject *fast = PySequence_Fast(seq, name);
  if (!fast) return -1;
  Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
  if ((count >= 0 && n != count) || (count < 0 && n > RA_MAX_BRANCHES)) {
    Py_DECREF(fast);
    if (count >= 0)
      PyErr_Format(PyExc_ValueError, "%s must have %d values, got %zd", name, count, n);
    else
      PyErr_Format(PyExc_ValueError, "%s: at most %d branches are supported, got %zd", name, RA_MAX_BRANCHES, n);
    return -1;
  }
  for (Py_ssize_t i = 0; i < n; i++) {
    long long v = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(fast, i));
    if (v == -1 && PyErr_Occurred()) {
      Py_DECREF(fast);
      return -1;
    }
    dst[i] = v;
  }
  Py_DECREF(fast);
  if (got) *got = (int)n;
  return 0;
}

/* A tuple of one dict per rank with the keys of last_stats. */
static PyObject *glue_stats_tuple(const ra_stats *s, int n) {
  PyObject *out = PyTuple_New(n);
  if (!out) return NULL;
  for (int i = 0; i < n; i++) {
    PyObject *item = Py_BuildValue("{sLsLsLsLsL}", "peak_bytes", (long long)s[i].peak_bytes, "bytes_sent",
                                   (long long)s[i].bytes_sent, "bytes_received", (long long)s[i].bytes_received,
                                   "steps", (long long)s[i].steps, "steps_skipped", (long long)s[i].steps_skipped);
    if (!item) {
      Py_DECREF(out);
      return NULL;
    }
    PyTuple_SET_ITEM(out, i, item);
  }
  return out;
}

#endif /* RINGATTN_GLUE_H */
