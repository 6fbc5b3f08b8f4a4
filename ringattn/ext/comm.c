/*
 * comm.c -- communicators as "ringattn.comm" capsules.  Collective calls run
 * with the GIL released; while one runs, the communicator is marked busy so
 * that comm_close from another thread cannot free it underneath.
 */
#include "ext.h"

#include <stdio.h>
#include <string.h>

static const char CLOSED_NAME[] = "ringattn.comm.closed";
static char closed_marker; /* what a closed capsule points at (it cannot hold NULL) */

static void capsule_destroy(PyObject *capsule) {
  ext_comm *c = PyCapsule_GetPointer(capsule, EXT_COMM_CAPSULE);
  if (!c) {
    PyErr_Clear();
    return;
  }
  ra_comm_destroy(c->comm);
  PyMem_Free(c);
}

static PyObject *wrap(ra_status st, ra_comm *comm) {
  if (st != RA_OK) return ext_raise_status(st);
  ext_comm *c = PyMem_Calloc(1, sizeof *c);
  if (!c) {
    ra_comm_destroy(comm);
    return PyErr_NoMemory();
  }
  c->comm = comm;
  PyObject *capsule = PyCapsule_New(c, EXT_COMM_CAPSULE, capsule_destroy);
  if (!capsule) {
    ra_comm_destroy(comm);
    PyMem_Free(c);
  }
  return capsule;
}

PyObject *ext_comm_wrap(ra_comm *comm) { return wrap(RA_OK, comm); }

ext_comm *ext_comm_get(PyObject *capsule) {
  if (PyCapsule_IsValid(capsule, CLOSED_NAME)) {
    PyErr_SetString(PyExc_ValueError, "comm has been closed");
    return NULL;
  }
  if (!PyCapsule_IsValid(capsule, EXT_COMM_CAPSULE)) {
    PyErr_Format(PyExc_TypeError, "comm must be a communicator (a '%s' capsule), got %.100s", EXT_COMM_CAPSULE,
                 Py_TYPE(capsule)->tp_name);
    return NULL;
  }
  return PyCapsule_GetPointer(capsule, EXT_COMM_CAPSULE);
}

/* A collective agreement in which this rank reports `local` for the
 * operation `op`; the caller raises its own exception.  (On a broken
 * communicator it returns at once: nobody waits for a refusal there.) */
static void agree_failure(ext_comm *c, ra_comm_op op, ra_status local, const char *message) {
  const ra_agreement a = {op, local, message, NULL, ra_comm_device_type(c->comm), 0, 0};
  c->busy++;
  Py_BEGIN_ALLOW_THREADS
  (void)ra_comm_agree_call(c->comm, &a);
  Py_END_ALLOW_THREADS
  c->busy--;
}

/* How the peers see a refusal: a TypeError as unsupported (TypeError), a
 * ValueError as an invalid argument (ValueError), anything else -- a
 * MemoryError, a KeyboardInterrupt, a bug -- as RingAttnError, its message
 * prefixed with the exception's type. */
static ra_status refusal_status(PyObject *type) {
  if (type && PyErr_GivenExceptionMatches(type, PyExc_TypeError)) return RA_ERR_UNSUPPORTED;
  if (type && PyErr_GivenExceptionMatches(type, PyExc_ValueError)) return RA_ERR_INVALID_ARGUMENT;
  return RA_ERR_TRANSPORT;
}

/* An exception's public name: numpy's _ArrayMemoryError is a MemoryError. */
static const char *exception_name(PyObject *type) {
  if (!type || !PyType_Check(type)) return "error";
  PyObject *mro = ((PyTypeObject *)type)->tp_mro;
  const Py_ssize_t n = mro && PyTuple_Check(mro) ? PyTuple_GET_SIZE(mro) : 0;
  for (Py_ssize_t i = 0; i < n; i++) {
    const char *name = ((PyTypeObject *)PyTuple_GET_ITEM(mro, i))->tp_name;
    const char *dot = strrchr(name, '.');
    if (dot) name = dot + 1;
    if (name[0] != '_') return name;
  }
  return "error";
}

void ext_comm_refuse(ext_comm *c, ra_comm_op op) {
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  PyErr_NormalizeException(&type, &value, &tb);
  const ra_status local = refusal_status(type);
  PyObject *text = value ? PyObject_Str(value) : NULL;
  const char *message = text ? PyUnicode_AsUTF8(text) : NULL;
  if (!message) PyErr_Clear();
  char full[256];
  if (local == RA_ERR_TRANSPORT)
    snprintf(full, sizeof full, "%s: %s", exception_name(type), message && *message ? message : "(no message)");
  else
    snprintf(full, sizeof full, "%s", message ? message : "invalid input");
  agree_failure(c, op, local, full);
  Py_XDECREF(text);
  PyErr_Restore(type, value, tb);
}

/* "forward" / "backward" / "gather" -> the operation; -1 (with ValueError) otherwise. */
static int parse_op(const char *name, ra_comm_op *op) {
  static const ra_comm_op ops[] = {RA_OP_FORWARD, RA_OP_BACKWARD, RA_OP_GATHER};
  for (size_t i = 0; i < sizeof ops / sizeof ops[0]; i++)
    if (strcmp(name, ra_comm_op_name(ops[i])) == 0) {
      *op = ops[i];
      return 0;
    }
  PyErr_Format(PyExc_ValueError, "op must be 'forward', 'backward' or 'gather', got %.100s", name);
  return -1;
}

/* The address of an MPI_Comm, or None for MPI_COMM_WORLD. */
static int mpi_handle(PyObject *obj, void **handle) {
  *handle = NULL;
  if (obj == Py_None) return 0;
  *handle = PyLong_AsVoidPtr(obj);
  return (!*handle && PyErr_Occurred()) ? -1 : 0;
}

static PyObject *py_comm_mpi(PyObject *self, PyObject *arg) {
  (void)self;
  void *handle;
  if (mpi_handle(arg, &handle)) return NULL;
  ra_comm *c = NULL;
  ra_status st;
  Py_BEGIN_ALLOW_THREADS
  st = ra_comm_create_mpi(handle, &c);
  Py_END_ALLOW_THREADS
  return wrap(st, c);
}

static PyObject *py_comm_nccl(PyObject *self, PyObject *args) {
  (void)self;
  Py_buffer id;
  int world, rank, device;
  double timeout = 0; /* seconds; 0: NCCL's blocking behaviour */
  if (!PyArg_ParseTuple(args, "y*iii|d:comm_nccl", &id, &world, &rank, &device, &timeout)) return NULL;
  if (id.len != RA_NCCL_UNIQUE_ID_BYTES) {
    PyBuffer_Release(&id);
    return PyErr_Format(PyExc_ValueError, "unique_id must be %d bytes, got %zd", RA_NCCL_UNIQUE_ID_BYTES, id.len);
  }
  ra_comm *c = NULL;
  ra_status st;
  Py_BEGIN_ALLOW_THREADS
  st = ra_comm_create_nccl(id.buf, world, rank, device, timeout, &c);
  Py_END_ALLOW_THREADS
  PyBuffer_Release(&id);
  return wrap(st, c);
}

static PyObject *py_comm_nccl_from_mpi(PyObject *self, PyObject *args) {
  (void)self;
  PyObject *h;
  int device;
  double timeout = 0;
  void *handle;
  if (!PyArg_ParseTuple(args, "Oi|d:comm_nccl_from_mpi", &h, &device, &timeout) || mpi_handle(h, &handle)) return NULL;
  ra_comm *c = NULL;
  ra_status st;
  Py_BEGIN_ALLOW_THREADS
  st = ra_comm_create_nccl_from_mpi(handle, device, timeout, &c);
  Py_END_ALLOW_THREADS
  return wrap(st, c);
}

static PyObject *py_nccl_unique_id(PyObject *self, PyObject *unused) {
  (void)self;
  (void)unused;
  unsigned char id[RA_NCCL_UNIQUE_ID_BYTES];
  ra_status st = ra_nccl_unique_id(id);
  if (st != RA_OK) return ext_raise_status(st);
  return PyBytes_FromStringAndSize((const char *)id, sizeof id);
}

static PyObject *py_comm_info(PyObject *self, PyObject *capsule) {
  (void)self;
  ext_comm *c = ext_comm_get(capsule);
  if (!c) return NULL;
  return Py_BuildValue("(iisi)", ra_comm_rank(c->comm), ra_comm_size(c->comm),
                       ra_comm_kind(c->comm) == RA_COMM_MPI    ? "mpi"
                       : ra_comm_kind(c->comm) == RA_COMM_NCCL ? "nccl"
                                                               : "external",
                       ra_comm_device(c->comm));
}

static PyObject *py_comm_close(PyObject *self, PyObject *capsule) {
  (void)self;
  ext_comm *c = ext_comm_get(capsule);
  if (!c) return NULL;
  if (c->busy) return PyErr_Format(PyExc_RuntimeError, "comm is in use by a running call");
  if (PyCapsule_SetDestructor(capsule, NULL) < 0 || PyCapsule_SetName(capsule, CLOSED_NAME) < 0 ||
      PyCapsule_SetPointer(capsule, &closed_marker) < 0)
    return NULL;
  ra_comm *comm = c->comm;
  PyMem_Free(c);
  Py_BEGIN_ALLOW_THREADS
  ra_comm_destroy(comm); /* collective */
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

/* A rank whose Python-side preparation of a call failed -- any exception --
 * still takes part in the call's agreement, so that its peers raise
 * instead of waiting: comm_fail(c, message, kind, op) with kind "type",
 * "value" or any other exception's type name, op the call it was about to
 * make. */
static PyObject *py_comm_fail(PyObject *self, PyObject *args) {
  (void)self;
  PyObject *capsule;
  const char *message, *kind, *op_name;
  if (!PyArg_ParseTuple(args, "Osss:comm_fail", &capsule, &message, &kind, &op_name)) return NULL;
  ext_comm *c = ext_comm_get(capsule);
  ra_comm_op op;
  if (!c || parse_op(op_name, &op)) return NULL;
  ra_status local = RA_ERR_TRANSPORT;
  char full[256];
  if (strcmp(kind, "type") == 0) local = RA_ERR_UNSUPPORTED;
  if (strcmp(kind, "value") == 0) local = RA_ERR_INVALID_ARGUMENT;
  if (local == RA_ERR_TRANSPORT)
    snprintf(full, sizeof full, "%s: %s", kind, *message ? message : "(no message)");
  else
    snprintf(full, sizeof full, "%s", message);
  agree_failure(c, op, local, full);
  Py_RETURN_NONE;
}

/* The gather behind gather_sequence: an agreement (operation gather and the
 * byte count), then the exchange.  A wrong out_buffer is refused through
 * the agreement as well. */
static PyObject *py_comm_allgather(PyObject *self, PyObject *args) {
  (void)self;
  PyObject *capsule;
  Py_buffer in, out;
  if (!PyArg_ParseTuple(args, "Oy*w*:comm_allgather", &capsule, &in, &out)) return NULL;
  ext_comm *c = ext_comm_get(capsule);
  PyObject *result = NULL;
  if (c && out.len != in.len * ra_comm_size(c->comm)) {
    PyErr_Format(PyExc_ValueError, "out_buffer must hold world_size * %zd bytes, got %zd", in.len, out.len);
    ext_comm_refuse(c, RA_OP_GATHER);
  } else if (c) {
    ra_status st;
    c->busy++;
    Py_BEGIN_ALLOW_THREADS
    st = ra_comm_allgather_host(c->comm, in.buf, (size_t)in.len, out.buf); /* Python buffers: host memory */
    Py_END_ALLOW_THREADS
    c->busy--;
    if (st == RA_OK) {
      Py_INCREF(Py_None);
      result = Py_None;
    } else {
      result = ext_raise_status(st);
    }
  }
  PyBuffer_Release(&in);
  PyBuffer_Release(&out);
  return result;
}

/* comm_set_timeout(c, seconds): how long each wait of a call may last (<= 0: forever). */
static PyObject *py_comm_set_timeout(PyObject *self, PyObject *args) {
  (void)self;
  PyObject *capsule;
  double seconds;
  if (!PyArg_ParseTuple(args, "Od:comm_set_timeout", &capsule, &seconds)) return NULL;
  ext_comm *c = ext_comm_get(capsule);
  if (!c) return NULL;
  ra_status st = ra_comm_set_timeout(c->comm, seconds);
  if (st != RA_OK) return ext_raise_status(st);
  Py_RETURN_NONE;
}

/* comm_state(c) -> {"timeout", "calls", "broken"}: broken is None or why. */
static PyObject *py_comm_state(PyObject *self, PyObject *capsule) {
  (void)self;
  ext_comm *c = ext_comm_get(capsule);
  if (!c) return NULL;
  const char *broken = ra_comm_broken(c->comm);
  return Py_BuildValue("{sdsKsz}", "timeout", ra_comm_timeout(c->comm), "calls",
                       (unsigned long long)ra_comm_calls(c->comm), "broken", broken);
}

/* comm_exiting(): the process is exiting; every communicator tells its peers. */
static PyObject *py_comm_exiting(PyObject *self, PyObject *unused) {
  (void)self;
  (void)unused;
  Py_BEGIN_ALLOW_THREADS
  ra_comm_exiting();
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

PyMethodDef ext_comm_methods[] = {
    {"comm_mpi", py_comm_mpi, METH_O, "comm_mpi(address|None): MPI communicator (None: MPI_COMM_WORLD)."},
    {"comm_nccl", py_comm_nccl, METH_VARARGS, "comm_nccl(unique_id, world_size, rank, device, timeout=0): NCCL communicator."},
    {"comm_nccl_from_mpi", py_comm_nccl_from_mpi, METH_VARARGS,
     "comm_nccl_from_mpi(address|None, device, timeout=0): NCCL communicator whose id is shared over MPI."},
    {"nccl_unique_id", py_nccl_unique_id, METH_NOARGS, "A fresh NCCL unique id (bytes)."},
    {"comm_info", py_comm_info, METH_O, "comm_info(c) -> (rank, world_size, 'mpi'|'nccl'|'external', device)."},
    {"comm_close", py_comm_close, METH_O, "comm_close(c): destroy a communicator (collective)."},
    {"comm_fail", py_comm_fail, METH_VARARGS,
     "comm_fail(c, message, kind, op): this rank refuses the call `op` ('forward', 'backward', 'gather');\n"
     "kind 'type' / 'value' makes the peers raise TypeError / ValueError, any other (an exception's type\n"
     "name) RingAttnError."},
    {"comm_allgather", py_comm_allgather, METH_VARARGS,
     "comm_allgather(c, in_buffer, out_buffer): gather bytes from every rank (collective)."},
    {"comm_set_timeout", py_comm_set_timeout, METH_VARARGS,
     "comm_set_timeout(c, seconds): how long each wait of a call may last (<= 0: forever)."},
    {"comm_state", py_comm_state, METH_O, "comm_state(c) -> {'timeout', 'calls', 'broken'} (broken: None or why)."},
    {"comm_exiting", py_comm_exiting, METH_NOARGS,
     "comm_exiting(): the process is exiting; every communicator tells its peers (atexit)."},
    {NULL, NULL, 0, NULL}};
