/*
 * pycomm.c -- a communicator whose transport is a Python object
 * (ringattn/_torch_comm.py: torch.distributed over a gloo group), through
 * the core's ra_comm_create_external.
 *
 * The ring driver calls these functions with the GIL released, from the
 * thread that made the call (comm_external's callers release it around
 * every call on a communicator); each takes the GIL for as long as it runs
 * Python (PyGILState_Ensure also works where the GIL is already held: a
 * capsule destructor).  Buffers reach Python as memoryviews of the ring's
 * memory, valid only until the function they were handed to, or the wait
 * of their transfer, returns: the Python side releases them then.  A
 * Python exception becomes RA_ERR_TRANSPORT with its text.
 */
#include "ext.h"
#include "internal.h" /* ra_fail: a Python failure becomes the call's last error */

typedef struct py_transport {
  PyObject *obj; /* the Python transport                              */
  ra_comm *comm; /* its communicator: the call counter and the timeout */
} py_transport;

/* The pending exception as the call's failure. */
static ra_status failure(void) {
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  PyErr_NormalizeException(&type, &value, &tb);
  PyObject *text = value ? PyObject_Str(value) : NULL;
  const char *message = text ? PyUnicode_AsUTF8(text) : NULL;
  ra_status st = ra_fail(RA_ERR_TRANSPORT, "%s", message && *message ? message : "the transport failed");
  PyErr_Clear();
  Py_XDECREF(text);
  Py_XDECREF(type);
  Py_XDECREF(value);
  Py_XDECREF(tb);
  return st;
}

static PyObject *view(const void *buf, size_t bytes, int writable) {
  static char empty;
  return PyMemoryView_FromMemory(bytes ? (char *)buf : &empty, (Py_ssize_t)bytes, writable ? PyBUF_WRITE : PyBUF_READ);
}

/* transport.isend(view, dst, tag) / transport.irecv(view, src, tag) -> op */
static ra_status start(void *ctx, const char *method, const void *buf, size_t bytes, int peer, int tag, int recv,
                       void **op) {
  py_transport *t = ctx;
  PyGILState_STATE g = PyGILState_Ensure();
  ra_status st = RA_OK;
  PyObject *mv = view(buf, bytes, recv);
  PyObject *r = mv ? PyObject_CallMethod(t->obj, method, "Oii", mv, peer, tag) : NULL;
  if (r) *op = r; /* the reference goes to wait() */
  else st = failure();
  Py_XDECREF(mv);
  PyGILState_Release(g);
  return st;
}

static ra_status py_isend(void *ctx, const void *buf, size_t bytes, int dst, int tag, void **op) {
  return start(ctx, "isend", buf, bytes, dst, tag, 0, op);
}

static ra_status py_irecv(void *ctx, void *buf, size_t bytes, int src, int tag, void **op) {
  return start(ctx, "irecv", buf, bytes, src, tag, 1, op);
}

/* The call's arguments every wait passes on: its name, number and timeout. */
static PyObject *call_info(py_transport *t, const char *call, const char *waiting_for) {
  return Py_BuildValue("(sKsd)", call, (unsigned long long)ra_comm_calls(t->comm), waiting_for,
                       ra_comm_timeout(t->comm));
}

/* transport.wait(op, abandon, (call, number, waiting_for, timeout)) */
static ra_status py_wait(void *ctx, void *op, int abandon, const char *call, const char *waiting_for) {
  py_transport *t = ctx;
  PyGILState_STATE g = PyGILState_Ensure();
  ra_status st = RA_OK;
  PyObject *info = call_info(t, call, waiting_for);
  PyObject *r = info ? PyObject_CallMethod(t->obj, "wait", "OiO", (PyObject *)op, abandon, info) : NULL;
  if (!r && abandon) PyErr_Clear(); /* the call's cause stays the last error */
  else if (!r) st = failure();
  Py_XDECREF(r);
  Py_XDECREF(info);
  Py_DECREF((PyObject *)op);
  PyGILState_Release(g);
  return abandon ? RA_ERR_TRANSPORT : st;
}

/* transport.allgather(send_view, recv_view, (call, number, waiting_for, timeout)) */
static ra_status py_allgather(void *ctx, const void *send, size_t bytes, void *recv, const char *call,
                              const char *waiting_for) {
  py_transport *t = ctx;
  PyGILState_STATE g = PyGILState_Ensure();
  ra_status st = RA_OK;
  PyObject *in = view(send, bytes, 0), *out = view(recv, bytes * (size_t)ra_comm_size(t->comm), 1);
  PyObject *info = call_info(t, call, waiting_for);
  PyObject *r = in && out && info ? PyObject_CallMethod(t->obj, "allgather", "OOO", in, out, info) : NULL;
  if (!r) st = failure();
  Py_XDECREF(r);
  Py_XDECREF(info);
  Py_XDECREF(in);
  Py_XDECREF(out);
  PyGILState_Release(g);
  return st;
}

/* transport.give_up(call, number, why): tell the peers; never raises into C. */
static void py_give_up(void *ctx, const char *call, const char *why) {
  py_transport *t = ctx;
  PyGILState_STATE g = PyGILState_Ensure();
  PyObject *r = PyObject_CallMethod(t->obj, "give_up", "sKs", call, (unsigned long long)ra_comm_calls(t->comm), why);
  if (!r) PyErr_WriteUnraisable(t->obj);
  Py_XDECREF(r);
  PyGILState_Release(g);
}

/* transport.close(calls) */
static void py_destroy(void *ctx) {
  py_transport *t = ctx;
  PyGILState_STATE g = PyGILState_Ensure();
  PyObject *r = PyObject_CallMethod(t->obj, "close", "K", (unsigned long long)ra_comm_calls(t->comm));
  if (!r) PyErr_WriteUnraisable(t->obj);
  Py_XDECREF(r);
  Py_DECREF(t->obj);
  PyMem_RawFree(t);
  PyGILState_Release(g);
}

static const ra_external_ops python_ops = {py_isend, py_irecv, py_wait, py_allgather, py_give_up, py_destroy};

/* comm_external(transport, rank, world_size, id) -> communicator capsule */
static PyObject *py_comm_external(PyObject *self, PyObject *args) {
  (void)self;
  PyObject *obj;
  int rank, world;
  unsigned long long id;
  if (!PyArg_ParseTuple(args, "OiiK:comm_external", &obj, &rank, &world, &id)) return NULL;
  py_transport *t = PyMem_RawCalloc(1, sizeof *t);
  if (!t) return PyErr_NoMemory();
  ra_comm *c = NULL;
  ra_status st = ra_comm_create_external(&python_ops, t, rank, world, (uint64_t)id, &c);
  if (st != RA_OK) {
    PyMem_RawFree(t);
    return ext_raise_status(st);
  }
  Py_INCREF(obj);
  t->obj = obj;
  t->comm = c;
  return ext_comm_wrap(c);
}

PyMethodDef ext_pycomm_methods[] = {
    {"comm_external", py_comm_external, METH_VARARGS,
     "comm_external(transport, rank, world_size, id): a communicator whose bytes move through the Python\n"
     "object `transport` (isend, irecv, wait, allgather, give_up, close; see ringattn/_torch_comm.py)."},
    {NULL, NULL, 0, NULL}};
