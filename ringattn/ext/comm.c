/*
 * comm.c -- communicators as "ringattn.comm" capsules.  Collective calls run
 * with the GIL released; while one runs, the communicator is marked busy so
 * that comm_close from another thread cannot free it underneath.
 */
#include "ext.h"

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

/* A collective agreement in which this rank reports `local`; the caller
 * raises its own exception. */
static void agree_failure(ext_comm *c, ra_status local, const char *message) {
  c->busy++;
  Py_BEGIN_ALLOW_THREADS
  (void)ra_comm_agree(c->comm, local, message, NULL);
  Py_END_ALLOW_THREADS
  c->busy--;
}

void ext_comm_refuse(ext_comm *c) {
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  PyErr_NormalizeException(&type, &value, &tb);
  const ra_status local =
      type && PyErr_GivenExceptionMatches(type, PyExc_TypeError) ? RA_ERR_UNSUPPORTED : RA_ERR_INVALID_ARGUMENT;
  PyObject *text = value ? PyObject_Str(value) : NULL;
  const char *message = text ? PyUnicode_AsUTF8(text) : NULL;
  if (!message) PyErr_Clear();
  agree_failure(c, local, message ? message : "invalid input");
  Py_XDECREF(text);
  PyErr_Restore(type, value, tb);
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
  if (!PyArg_ParseTuple(args, "y*iii:comm_nccl", &id, &world, &rank, &device)) return NULL;
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
  return wrap(st, c);
}

static PyObject *py_comm_nccl_from_mpi(PyObject *self, PyObject *args) {
  (void)self;
  PyObject *h;
  int device;
  void *handle;
  if (!PyArg_ParseTuple(args, "Oi:comm_nccl_from_mpi", &h, &device) || mpi_handle(h, &handle)) return NULL;
  ra_comm *c = NULL;
  ra_status st;
  Py_BEGIN_ALLOW_THREADS
  st = ra_comm_create_nccl_from_mpi(handle, device, &c);
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
                       ra_comm_kind(c->comm) == RA_COMM_MPI ? "mpi" : "nccl", ra_comm_device(c->comm));
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

/* A rank whose Python-side validation failed still takes part in the
 * agreement, so that its peers raise instead of hanging. */
static PyObject *py_comm_fail(PyObject *self, PyObject *args) {
  (void)self;
  PyObject *capsule;
  const char *message;
  int is_type_error;
  if (!PyArg_ParseTuple(args, "Osp:comm_fail", &capsule, &message, &is_type_error)) return NULL;
  ext_comm *c = ext_comm_get(capsule);
  if (!c) return NULL;
  agree_failure(c, is_type_error ? RA_ERR_UNSUPPORTED : RA_ERR_INVALID_ARGUMENT, message);
  Py_RETURN_NONE;
}

static PyObject *py_comm_allgather(PyObject *self, PyObject *args) {
  (void)self;
  PyObject *capsule;
  Py_buffer in, out;
  if (!PyArg_ParseTuple(args, "Oy*w*:comm_allgather", &capsule, &in, &out)) return NULL;
  ext_comm *c = ext_comm_get(capsule);
  PyObject *result = NULL;
  if (c && out.len != in.len * ra_comm_size(c->comm)) {
    PyErr_Format(PyExc_ValueError, "out_buffer must hold world_size * %zd bytes, got %zd", in.len, out.len);
  } else if (c) {
    ra_status st;
    c->busy++;
    Py_BEGIN_ALLOW_THREADS
    st = ra_comm_allgather(c->comm, in.buf, (size_t)in.len, out.buf);
    Py_END_ALLOW_THREADS
    c->busy--;
    result = st == RA_OK ? Py_NewRef(Py_None) : ext_raise_status(st);
  }
  PyBuffer_Release(&in);
  PyBuffer_Release(&out);
  return result;
}

PyMethodDef ext_comm_methods[] = {
    {"comm_mpi", py_comm_mpi, METH_O, "comm_mpi(address|None): MPI communicator (None: MPI_COMM_WORLD)."},
    {"comm_nccl", py_comm_nccl, METH_VARARGS, "comm_nccl(unique_id, world_size, rank, device): NCCL communicator."},
    {"comm_nccl_from_mpi", py_comm_nccl_from_mpi, METH_VARARGS,
     "comm_nccl_from_mpi(address|None, device): NCCL communicator whose id is shared over MPI."},
    {"nccl_unique_id", py_nccl_unique_id, METH_NOARGS, "A fresh NCCL unique id (bytes)."},
    {"comm_info", py_comm_info, METH_O, "comm_info(c) -> (rank, world_size, 'mpi'|'nccl', device)."},
    {"comm_close", py_comm_close, METH_O, "comm_close(c): destroy a communicator (collective)."},
    {"comm_fail", py_comm_fail, METH_VARARGS,
     "comm_fail(c, message, is_type_error): tell the other ranks this rank's input was refused."},
    {"comm_allgather", py_comm_allgather, METH_VARARGS,
     "comm_allgather(c, in_buffer, out_buffer): gather bytes from every rank (collective)."},
    {NULL, NULL, 0, NULL}};
