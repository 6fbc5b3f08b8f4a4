/*
 * _glue.h -- conversions the two extension modules (_core.c, _cuda.c)
 * share: core statuses to Python exceptions, integer sequences to arrays,
 * per-rank statistics to dicts.  Header-only: each module includes it once.
 */
#ifndef RINGATTN_GLUE_H
#define RINGATTN_GLUE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

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

/* A device address: a non-negative int that fits 64 bits. */
static int glue_address(PyObject *obj, const char *name, uintptr_t *out) {
  if (!PyLong_Check(obj)) {
    PyErr_Format(PyExc_TypeError, "%s must be an int (a device address), got %.100s", name,
                 Py_TYPE(obj)->tp_name);
    return -1;
  }
  unsigned long long v = PyLong_AsUnsignedLongLong(obj);
  if (v == (unsigned long long)-1 && PyErr_Occurred()) {
    PyErr_Clear();
    PyErr_Format(PyExc_ValueError, "%s must be a non-negative address that fits 64 bits", name);
    return -1;
  }
  *out = (uintptr_t)v;
  return 0;
}

/* One (stride_b, stride_n, stride_h[, stride_d]) tuple in elements into t. */
static int glue_strides(PyObject *one, const char *name, int64_t head_dim, ra_tensor *t) {
  int64_t st[4] = {0, 0, 0, 1};
  PyObject *f = PySequence_Fast(one, "strides entries must be sequences");
  if (!f) return -1;
  Py_ssize_t len = PySequence_Fast_GET_SIZE(f);
  Py_DECREF(f);
  if (len != 3 && len != 4) {
    PyErr_Format(PyExc_ValueError, "%s: strides must hold 3 or 4 values, got %zd", name, len);
    return -1;
  }
  int got = 0;
  if (glue_read_i64s(one, name, st, (int)len, &got)) return -1;
  if ((st[3] != 1 && head_dim > 1) || st[0] < 0 || st[1] < 0 || st[2] < 0) {
    PyErr_Format(PyExc_ValueError, "%s: the head dimension must be contiguous and the strides non-negative", name);
    return -1;
  }
  t->stride_b = st[0];
  t->stride_n = st[1];
  t->stride_h = st[2];
  return 0;
}

static const char *const glue_tensor_names[8] = {"q", "k", "v", "out", "dout", "dq", "dk", "dv"};

/* Device tensors of a call: `ptrs` holds 4 addresses (q, k, v, out: the
 * forward) or 8 (and dout, dq, dk, dv: the backward), `strides` one stride
 * tuple each, `shape_obj` the 4 sizes; *count <- 4 or 8. */
static int glue_device_tensors(PyObject *ptrs_obj, PyObject *strides_obj, PyObject *shape_obj, int64_t shape[4],
                               ra_tensor t[8], int *count) {
  if (glue_read_i64s(shape_obj, "shape", shape, 4, NULL)) return -1;
  for (int i = 0; i < 4; i++)
    if (shape[i] < 1) {
      PyErr_Format(PyExc_ValueError, "shape must hold 4 positive sizes");
      return -1;
    }
  PyObject *ptrs = PySequence_Fast(ptrs_obj, "tensors must be a sequence of device addresses");
  if (!ptrs) return -1;
  PyObject *strides = PySequence_Fast(strides_obj, "strides must be a sequence of stride tuples");
  if (!strides) {
    Py_DECREF(ptrs);
    return -1;
  }
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(ptrs);
  int bad = 0;
  if (n != 4 && n != 8) {
    PyErr_Format(PyExc_ValueError, "tensors must hold 4 (forward) or 8 (backward) addresses, got %zd", n);
    bad = 1;
  } else if (PySequence_Fast_GET_SIZE(strides) != n) {
    PyErr_Format(PyExc_ValueError, "strides must hold one stride tuple per tensor (%zd)", n);
    bad = 1;
  }
  for (Py_ssize_t i = 0; !bad && i < n; i++) {
    uintptr_t p = 0;
    memset(&t[i], 0, sizeof t[i]);
    if (glue_address(PySequence_Fast_GET_ITEM(ptrs, i), glue_tensor_names[i], &p) ||
        glue_strides(PySequence_Fast_GET_ITEM(strides, i), glue_tensor_names[i], shape[3], &t[i])) {
      bad = 1;
    } else if (!p) {
      PyErr_Format(PyExc_ValueError, "%s: null device pointer", glue_tensor_names[i]);
      bad = 1;
    }
    t[i].data = (void *)p;
  }
  Py_DECREF(ptrs);
  Py_DECREF(strides);
  *count = (int)n;
  return bad ? -1 : 0;
}

#endif /* RINGATTN_GLUE_H */
