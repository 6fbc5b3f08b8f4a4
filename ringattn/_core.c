/*
 * _core.c -- the CPython extension: conversion between NumPy arrays and the
 * C core, nothing else.  Argument rules are checked in ringattn/_validate.py
 * (for friendly messages) and again by the core (so that no call can crash);
 * a core failure becomes a Python exception carrying ra_last_error().
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <numpy/arrayobject.h>
#include <string.h>

#include "ringattn.h"
#include "_glue.h"

static PyObject *RingAttnError; /* ringattn.RingAttnError */

static PyObject *raise_status(ra_status st) { return glue_raise_status(st, RingAttnError); }

static int read_ints(PyObject *seq, const char *name, int64_t *dst, int *count) {
  return glue_read_i64s(seq, name, dst, -1, count);
}

static int dtype_code(PyArrayObject *a, ra_dtype *out) {
  switch (PyArray_TYPE(a)) {
    case NPY_FLOAT32: *out = RA_FLOAT32; return 0;
    case NPY_FLOAT16: *out = RA_FLOAT16; return 0;
    case NPY_FLOAT64: *out = RA_FLOAT64; return 0; /* the CPU's double path */
    default: return -1;
  }
}

/* A (b, n, h, d) array as a core tensor; the last axis must be contiguous. */
static int as_tensor(PyObject *obj, const char *name, ra_dtype dtype, const npy_intp *shape,
                     int writable, ra_tensor *t) {
  if (!PyArray_Check(obj)) {
    PyErr_Format(PyExc_TypeError, "%s must be a numpy.ndarray", name);
    return -1;
  }
  PyArrayObject *a = (PyArrayObject *)obj;
  ra_dtype dt;
  if (PyArray_NDIM(a) != 4 || dtype_code(a, &dt) != 0 || dt != dtype) {
    PyErr_Format(PyExc_TypeError, "%s must be a 4-d array of the dtype of q", name);
    return -1;
  }
  const npy_intp *dims = PyArray_DIMS(a), *st = PyArray_STRIDES(a);
  npy_intp es = PyArray_ITEMSIZE(a);
  for (int i = 0; i < 4; i++)
    if (dims[i] != shape[i]) {
      PyErr_Format(PyExc_ValueError, "%s must have the shape of q", name);
      return -1;
    }
  if (st[3] != es || st[0] % es || st[1] % es || st[2] % es || st[0] < 0 || st[1] < 0 || st[2] < 0 ||
      ((uintptr_t)PyArray_DATA(a)) % (uintptr_t)es) {
    PyErr_Format(PyExc_ValueError, "%s: the head dimension must be contiguous, aligned, with non-negative strides", name);
    return -1;
  }
  if (writable && !PyArray_ISWRITEABLE(a)) {
    PyErr_Format(PyExc_ValueError, "%s is not writeable", name);
    return -1;
  }
  t->data = PyArray_DATA(a);
  t->stride_b = st[0] / es;
  t->stride_n = st[1] / es;
  t->stride_h = st[2] / es;
  return 0;
}


/* Fill a config from the keyword form shared by plan() and forward(). */
static int read_config(ra_config *cfg, PyObject *segs, PyObject *rates, int causal, int mode,
                       double scale, int world_size) {
  int ns = 0, nr = 0;
  if (read_ints(segs, "segment_lengths", cfg->segment_lengths, &ns) ||
      read_ints(rates, "dilation_rates", cfg->dilation_rates, &nr))
    return -1;
  if (ns != nr) {
    PyErr_Format(PyExc_ValueError, "dilation_rates: %d values for %d segment_lengths", nr, ns);
    return -1;
  }
  cfg->num_branches = ns;
  cfg->causal = causal;
  cfg->mode = (ra_mode)mode;
  cfg->scale = scale;
  cfg->world_size = world_size;
  return 0;
}

static PyObject *py_plan(PyObject *self, PyObject *args, PyObject *kw) {
  (void)self;
  static char *names[] = {"batch", "seq_len", "num_heads", "head_dim", "segment_lengths",
                          "dilation_rates", "causal", "mode", "scale", "world_size", NULL};
  long long b, n, h, d;
  PyObject *segs, *rates;
  int causal, mode, world;
  double scale;
  if (!PyArg_ParseTupleAndKeywords(args, kw, "LLLLOOpidi", names, &b, &n, &h, &d, &segs, &rates,
                                   &causal, &mode, &scale, &world))
    return NULL;
  ra_config cfg;
  ra_config_init(&cfg);
  cfg.batch = b;
  cfg.seq_len = n;
  cfg.num_heads = h;
  cfg.head_dim = d;
  if (read_config(&cfg, segs, rates, causal, mode, scale, world)) return NULL;
  ra_plan *plan;
  ra_status st = ra_plan_create(&cfg, &plan);
  if (st != RA_OK) return raise_status(st);
  PyObject *branches = PyList_New(cfg.num_branches);
  for (int i = 0; branches && i < cfg.num_branches; i++) {
    ra_branch_info bi;
    ra_plan_branch(plan, i, &bi);
    PyList_SET_ITEM(branches, i, Py_BuildValue("{sLsLsLsLsL}", "segment", (long long)bi.segment,
                                               "rate", (long long)bi.rate, "span", (long long)bi.span,
                                               "head_begin", (long long)bi.head_begin, "head_end",
                                               (long long)bi.head_end));
  }
  PyObject *out = branches ? Py_BuildValue("{sLsdsN}", "local_len", (long long)ra_plan_local_len(plan),
                                           "scale", ra_plan_config(plan)->scale, "branches", branches)
                           : NULL;
  ra_plan_destroy(plan);
  return out;
}

/* ------------------------------------------------------------ communicators */

#define COMM_CAPSULE "ringattn.comm"

static void comm_capsule_destroy(PyObject *capsule) {
  ra_comm *c = PyCapsule_GetPointer(capsule, COMM_CAPSULE);
  if (c) ra_comm_destroy(c);
}

static PyObject *wrap_comm(ra_status st, ra_comm *c) {
  if (st != RA_OK) return raise_status(st);
  return PyCapsule_New(c, COMM_CAPSULE, comm_capsule_destroy);
}

/* The communicator of a capsule; NULL (with an exception) once closed. */
static ra_comm *get_comm(PyObject *capsule) {
  ra_comm *c = PyCapsule_GetPointer(capsule, COMM_CAPSULE);
  if (!c && !PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "comm has been closed");
  return c;
}

static PyObject *py_comm_mpi(PyObject *self, PyObject *arg) {
  (void)self;
  void *handle = NULL; /* address of an MPI_Comm, or None for MPI_COMM_WORLD */
  if (arg != Py_None && !(handle = PyLong_AsVoidPtr(arg)) && PyErr_Occurred()) return NULL;
  ra_comm *c = NULL;
  ra_status st;
  Py_BEGIN_ALLOW_THREADS
  st = ra_comm_create_mpi(handle, &c);
  Py_END_ALLOW_THREADS
  return wrap_comm(st, c);
}

static PyObject *py_comm_nccl(PyObject *self, PyObject *args) {
  (void)self;
  Py_buffer id;
  int world, rank, device;
  if (!PyArg_ParseTuple(args, "y*iii", &id, &world, &rank, &device)) return NULL;
  if (id.len != RA_NCCL_UNIQUE_ID_BYTES) {
    PyBuffer_Release(&id);
    return PyErr_Format(PyExc_ValueError, "unique_id must be %d bytes, got %zd", RA_NCCL_UNIQUE_ID_BYTES, id.len);
  }
  ra_comm *c = NULL;
  ra_status st;
  Py_BEGIN_ALLOW_THREADS
  st = ra_comm_create_nccl(id.buf, world, rank, device, &c);
  Py_END_ALLOW_THREADS
  PyBuffer_Release(&id);
  return wrap_comm(st, c);
}

static PyObject *py_comm_nccl_from_mpi(PyObject *self, PyObject *args) {
  (void)self;
  PyObject *h;
  int device;
  if (!PyArg_ParseTuple(args, "Oi", &h, &device)) return NULL;
  void *handle = NULL;
  if (h != Py_None && !(handle = PyLong_AsVoidPtr(h)) && PyErr_Occurred()) return NULL;
  ra_comm *c = NULL;
  ra_status st;
  Py_BEGIN_ALLOW_THREADS
  st = ra_comm_create_nccl_from_mpi(handle, device, &c);
  Py_END_ALLOW_THREADS
  return wrap_comm(st, c);
}

static PyObject *py_nccl_unique_id(PyObject *self, PyObject *unused) {
  (void)self;
  (void)unused;
  unsigned char id[RA_NCCL_UNIQUE_ID_BYTES];
  ra_status st = ra_nccl_unique_id(id);
  if (st != RA_OK) return raise_status(st);
  return PyBytes_FromStringAndSize((const char *)id, sizeof id);
}

static PyObject *py_comm_info(PyObject *self, PyObject *capsule) {
  (void)self;
  ra_comm *c = get_comm(capsule);
  if (!c) return NULL;
  return Py_BuildValue("(iis)", ra_comm_rank(c), ra_comm_size(c), ra_comm_kind(c) == RA_COMM_MPI ? "mpi" : "nccl");
}

static PyObject *py_comm_close(PyObject *self, PyObject *capsule) {
  (void)self;
  ra_comm *c = get_comm(capsule);
  if (!c) return NULL;
  if (PyCapsule_SetDestructor(capsule, NULL) < 0) return NULL;
  ra_comm_destroy(c);
  /* a capsule cannot hold NULL: point it at a name-mismatched dummy */
  PyCapsule_SetName(capsule, "ringattn.comm.closed");
  Py_RETURN_NONE;
}

/* A rank whose Python-side validation failed still takes part in the
 * agreement, so its peers raise instead of hanging. */
static PyObject *py_comm_fail(PyObject *self, PyObject *args) {
  (void)self;
  PyObject *capsule;
  const char *message;
  int kind; /* 0: ValueError, 1: TypeError */
  if (!PyArg_ParseTuple(args, "Osi", &capsule, &message, &kind)) return NULL;
  ra_comm *c = get_comm(capsule);
  if (!c) return NULL;
  ra_status st;
  Py_BEGIN_ALLOW_THREADS
  st = ra_comm_agree(c, kind ? RA_ERR_UNSUPPORTED : RA_ERR_INVALID_ARGUMENT, message, NULL);
  Py_END_ALLOW_THREADS
  (void)st; /* the caller raises its own exception */
  Py_RETURN_NONE;
}

static PyObject *py_comm_allgather(PyObject *self, PyObject *args) {
  (void)self;
  PyObject *capsule;
  Py_buffer in, out;
  if (!PyArg_ParseTuple(args, "Oy*w*", &capsule, &in, &out)) return NULL;
  ra_comm *c = get_comm(capsule);
  PyObject *result = NULL;
  if (c && out.len != in.len * ra_comm_size(c)) {
    PyErr_Format(PyExc_ValueError, "out must hold world_size * %zd bytes", in.len);
  } else if (c) {
    ra_status st;
    Py_BEGIN_ALLOW_THREADS
    st = ra_comm_allgather(c, in.buf, (size_t)in.len, out.buf);
    Py_END_ALLOW_THREADS
    if (st == RA_OK) {
      Py_INCREF(Py_None);
      result = Py_None;
    }
    else raise_status(st);
  }
  PyBuffer_Release(&in);
  PyBuffer_Release(&out);
  return result;
}

/* The lse array of a call: (b, h, n_local), C-contiguous, float32 -- or
 * float64 for float64 inputs, whose accumulators are double. */
static int as_lse(PyObject *obj, ra_dtype dtype, const npy_intp *shape, int writable, void **lse) {
  *lse = NULL;
  if (obj == Py_None) return 0;
  PyArrayObject *a = (PyArrayObject *)obj;
  const int type = dtype == RA_FLOAT64 ? NPY_FLOAT64 : NPY_FLOAT32;
  if (!PyArray_Check(obj) || PyArray_TYPE(a) != type || PyArray_NDIM(a) != 3 || !PyArray_IS_C_CONTIGUOUS(a) ||
      (writable && !PyArray_ISWRITEABLE(a)) || PyArray_DIMS(a)[0] != shape[0] || PyArray_DIMS(a)[1] != shape[2] ||
      PyArray_DIMS(a)[2] != shape[1]) {
    PyErr_Format(PyExc_ValueError, "lse must be a C-contiguous %s array of shape (%zd, %zd, %zd)",
                 type == NPY_FLOAT64 ? "float64" : "float32", (Py_ssize_t)shape[0], (Py_ssize_t)shape[2],
                 (Py_ssize_t)shape[1]);
    return -1;
  }
  *lse = PyArray_DATA(a);
  return 0;
}

/* Forward or backward, over in-process ranks (comm None: full-length arrays)
 * or one rank of a communicator (this rank's shards). */
static PyObject *py_run(PyObject *self, PyObject *args, PyObject *kw) {
  (void)self;
  static char *names[] = {"comm", "backward", "q", "k", "v", "out", "lse", "dout", "dq", "dk", "dv",
                          "segment_lengths", "dilation_rates", "causal", "mode", "scale", "world_size",
                          "num_threads", "check_finite", NULL};
  PyObject *capsule, *qo, *ko, *vo, *oo, *lo, *go, *dqo, *dko, *dvo, *segs, *rates;
  int backward, causal, mode, world, threads, check;
  double scale;
  if (!PyArg_ParseTupleAndKeywords(args, kw, "OpOOOOOOOOOOOpidiip", names, &capsule, &backward, &qo, &ko, &vo,
                                   &oo, &lo, &go, &dqo, &dko, &dvo, &segs, &rates, &causal, &mode, &scale, &world,
                                   &threads, &check))
    return NULL;
  ra_comm *comm = NULL;
  if (capsule != Py_None && !(comm = get_comm(capsule))) return NULL;
  if (!PyArray_Check(qo)) return PyErr_Format(PyExc_TypeError, "q must be a numpy.ndarray");
  PyArrayObject *qa = (PyArrayObject *)qo;
  ra_config cfg;
  ra_config_init(&cfg);
  if (PyArray_NDIM(qa) != 4 || dtype_code(qa, &cfg.dtype) != 0)
    return PyErr_Format(PyExc_TypeError, "q must be a 4-d float32, float16 or float64 array");
  const npy_intp *shape = PyArray_DIMS(qa);
  const int ranks = comm ? ra_comm_size(comm) : world;
  cfg.batch = shape[0];
  cfg.seq_len = comm ? shape[1] * ranks : shape[1]; /* with comm, q is this rank's shard */
  cfg.num_heads = shape[2];
  cfg.head_dim = shape[3];
  if (read_config(&cfg, segs, rates, causal, mode, scale, ranks)) return NULL;

  ra_tensor t[8]; /* q, k, v, o, dout, dq, dk, dv */
  PyObject *objs[8] = {qo, ko, vo, oo, go, dqo, dko, dvo};
  static const char *const tnames[8] = {"q", "k", "v", "out", "dout", "dq", "dk", "dv"};
  memset(t, 0, sizeof t);
  for (int i = 0; i < (backward ? 8 : 4); i++)
    if (as_tensor(objs[i], tnames[i], cfg.dtype, shape, (i == 3 && !backward) || i >= 5, &t[i])) return NULL;
  void *lse;
  if (as_lse(lo, cfg.dtype, shape, !backward, &lse)) return NULL;
  if (backward && !lse) return PyErr_Format(PyExc_ValueError, "lse: the backward needs the forward's lse");

  ra_stats *stats = PyMem_Calloc((size_t)(comm ? 1 : ranks > 0 ? ranks : 1), sizeof *stats);
  if (!stats) return PyErr_NoMemory();
  ra_exec exec = {threads, check};
  ra_status st = RA_OK;
  ra_plan *plan = NULL;
  if (!comm) st = ra_plan_create(&cfg, &plan);
  if (st == RA_OK) {
    Py_BEGIN_ALLOW_THREADS
    if (comm && backward)
      st = ra_comm_backward(&cfg, comm, t[0], t[1], t[2], t[3], t[4], lse, shape[1], t[5], t[6], t[7], &exec, stats);
    else if (comm)
      st = ra_comm_forward(&cfg, comm, t[0], t[1], t[2], t[3], lse, shape[1], &exec, stats);
    else if (backward)
      st = ra_inproc_backward(plan, t[0], t[1], t[2], t[3], t[4], lse, t[5], t[6], t[7], &exec, stats);
    else
      st = ra_inproc_forward(plan, t[0], t[1], t[2], t[3], lse, &exec, stats);
    Py_END_ALLOW_THREADS
  }
  ra_plan_destroy(plan);
  PyObject *out = st == RA_OK ? glue_stats_tuple(stats, comm ? 1 : ranks) : raise_status(st);
  PyMem_Free(stats);
  return out;
}

/* One rank of an NCCL communicator on device memory: `tensors` holds the
 * addresses of this rank's shards (q, k, v, out, or q, k, v, out, dout, dq,
 * dk, dv for the backward), `shape` the shard's (b, n_local, h, d). */
static PyObject *py_run_device(PyObject *self, PyObject *args, PyObject *kw) {
  (void)self;
  static char *names[] = {"comm", "tensors", "strides", "lse", "shape", "dtype", "segment_lengths",
                          "dilation_rates", "causal", "mode", "scale", NULL};
  PyObject *capsule, *ptrs, *strides, *lse_obj, *shape_obj, *segs, *rates;
  int dtype, causal, mode;
  double scale;
  if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOOiOOpid", names, &capsule, &ptrs, &strides, &lse_obj,
                                   &shape_obj, &dtype, &segs, &rates, &causal, &mode, &scale))
    return NULL;
  ra_comm *comm = get_comm(capsule);
  if (!comm) return NULL;
  ra_tensor t[8];
  int64_t shape[4];
  int count;
  if (glue_device_tensors(ptrs, strides, shape_obj, shape, t, &count)) return NULL;
  uintptr_t lse = 0;
  if (lse_obj != Py_None && glue_address(lse_obj, "lse", &lse)) return NULL;
  if (dtype != RA_FLOAT32 && dtype != RA_FLOAT16 && dtype != RA_BFLOAT16)
    return PyErr_Format(PyExc_TypeError, "dtype code must be 0, 1 or 2, got %d", dtype);
  const int ranks = ra_comm_size(comm);
  ra_config cfg;
  ra_config_init(&cfg);
  cfg.batch = shape[0];
  cfg.seq_len = shape[1] * ranks;
  cfg.num_heads = shape[2];
  cfg.head_dim = shape[3];
  cfg.dtype = (ra_dtype)dtype;
  if (read_config(&cfg, segs, rates, causal, mode, scale, ranks)) return NULL;
  ra_stats stats;
  memset(&stats, 0, sizeof stats);
  ra_exec exec = {0, 0}; /* device inputs are not scanned for NaN */
  ra_status st;
  Py_BEGIN_ALLOW_THREADS
  if (count == 8)
    st = ra_comm_backward(&cfg, comm, t[0], t[1], t[2], t[3], t[4], (const float *)lse, shape[1], t[5], t[6],
                          t[7], &exec, &stats);
  else
    st = ra_comm_forward(&cfg, comm, t[0], t[1], t[2], t[3], (float *)lse, shape[1], &exec, &stats);
  Py_END_ALLOW_THREADS
  return st == RA_OK ? glue_stats_tuple(&stats, 1) : raise_status(st);
}

static PyObject *py_have(PyObject *self, PyObject *unused) {
  (void)self;
  (void)unused;
  return Py_BuildValue("{sOsO}", "mpi", ra_have_mpi() ? Py_True : Py_False, "nccl",
                       ra_have_nccl() ? Py_True : Py_False);
}

static PyObject *py_default_num_threads(PyObject *self, PyObject *unused) {
  (void)self;
  (void)unused;
  return PyLong_FromLong(ra_default_num_threads());
}

static PyObject *py_cuda_device_count(PyObject *self, PyObject *unused) {
  (void)self;
  (void)unused;
  return PyLong_FromLong(ra_cuda_device_count());
}

static PyObject *py_status_string(PyObject *self, PyObject *arg) {
  (void)self;
  long code = PyLong_AsLong(arg);
  if (code == -1 && PyErr_Occurred()) return NULL;
  return PyUnicode_FromString(ra_status_string((ra_status)code));
}

static PyMethodDef methods[] = {
    {"plan", (PyCFunction)(void (*)(void))py_plan, METH_VARARGS | METH_KEYWORDS,
     "Validate a configuration; return its schedule (local_len, scale, branches)."},
    {"run", (PyCFunction)(void (*)(void))py_run, METH_VARARGS | METH_KEYWORDS,
     "Forward or backward over in-process ranks or a communicator; returns per-rank stats."},
    {"run_device", (PyCFunction)(void (*)(void))py_run_device, METH_VARARGS | METH_KEYWORDS,
     "One rank of an NCCL communicator on device addresses; returns this rank's stats."},
    {"comm_mpi", py_comm_mpi, METH_O, "MPI communicator (address of an MPI_Comm, or None for WORLD)."},
    {"comm_nccl", py_comm_nccl, METH_VARARGS, "NCCL communicator (unique_id, world_size, rank, device)."},
    {"comm_nccl_from_mpi", py_comm_nccl_from_mpi, METH_VARARGS, "NCCL communicator with its id shared over MPI."},
    {"nccl_unique_id", py_nccl_unique_id, METH_NOARGS, "A fresh NCCL unique id (bytes)."},
    {"comm_info", py_comm_info, METH_O, "(rank, world_size, backend) of a communicator."},
    {"comm_close", py_comm_close, METH_O, "Destroy a communicator (collective)."},
    {"comm_fail", py_comm_fail, METH_VARARGS, "Tell the other ranks this rank's input was refused."},
    {"comm_allgather", py_comm_allgather, METH_VARARGS, "Allgather bytes into a writable buffer."},
    {"have", py_have, METH_NOARGS, "Which optional parts this build has."},
    {"default_num_threads", py_default_num_threads, METH_NOARGS, "Cores the CPU kernels use by default."},
    {"cuda_device_count", py_cuda_device_count, METH_NOARGS,
     "CUDA devices this build can use (0 without CUDA, driver or device)."},
    {"status_string", py_status_string, METH_O, "Description of a core status code."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "ringattn._core",
                                    "C core of ringattn (private; use the ringattn package).", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__core(void) {
  import_array();
  PyObject *m = PyModule_Create(&module);
  if (!m) return NULL;
  RingAttnError = PyErr_NewExceptionWithDoc("ringattn.RingAttnError",
                                            "A failure inside the ringattn core (transport, internal).",
                                            PyExc_RuntimeError, NULL);
  if (!RingAttnError || PyModule_AddObject(m, "RingAttnError", RingAttnError) < 0) {
    Py_XDECREF(RingAttnError);
    Py_DECREF(m);
    return NULL;
  }
  Py_INCREF(RingAttnError);
  return m;
}
