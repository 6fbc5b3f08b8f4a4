/*
 * cuda.c -- the few CUDA runtime calls the Python layer needs (allocation,
 * synchronous host <-> device copies, stream synchronisation, pointer
 * queries), all through the core's ra_cuda_* so that only the core links
 * CUDA.  In a build without CUDA, or without a device, they raise
 * RuntimeError with the core's message.
 */
#include "ext.h"

/* A status of a runtime helper: None, or the exception. */
static PyObject *done(ra_status st) {
  if (st != RA_OK) return ext_raise_runtime(st);
  Py_RETURN_NONE;
}

/* A cudaStream_t as an int (0: the legacy default stream) or None (= 0). */
static int stream_arg(PyObject *obj, void **stream) {
  uintptr_t s = 0;
  if (obj != Py_None && ext_address(obj, "stream", &s)) return -1;
  *stream = (void *)s;
  return 0;
}

static PyObject *py_cuda_device_count(PyObject *self, PyObject *unused) {
  (void)self;
  (void)unused;
  return PyLong_FromLong(ra_cuda_device_count());
}

static PyObject *py_current_device(PyObject *self, PyObject *unused) {
  (void)self;
  (void)unused;
  int device = -1;
  ra_status st = ra_cuda_current_device(&device);
  if (st != RA_OK) return ext_raise_runtime(st);
  return PyLong_FromLong(device);
}

static PyObject *py_alloc(PyObject *self, PyObject *args) {
  (void)self;
  Py_ssize_t nbytes;
  int device = -1;
  if (!PyArg_ParseTuple(args, "n|i:alloc", &nbytes, &device)) return NULL;
  if (nbytes < 0) return PyErr_Format(PyExc_ValueError, "nbytes must be >= 0, got %zd", nbytes);
  void *ptr = NULL;
  ra_status st;
  Py_BEGIN_ALLOW_THREADS
  st = ra_cuda_malloc(device, nbytes ? (size_t)nbytes : 1, &ptr); /* a unique address even for 0 bytes */
  Py_END_ALLOW_THREADS
  if (st != RA_OK) return ext_raise_runtime(st);
  return PyLong_FromVoidPtr(ptr);
}

static PyObject *py_free(PyObject *self, PyObject *args) {
  (void)self;
  PyObject *ptr_obj;
  int device = -1;
  uintptr_t ptr;
  if (!PyArg_ParseTuple(args, "O|i:free", &ptr_obj, &device) || ext_address(ptr_obj, "ptr", &ptr)) return NULL;
  ra_status st;
  Py_BEGIN_ALLOW_THREADS
  st = ra_cuda_free(device, (void *)ptr);
  Py_END_ALLOW_THREADS
  return done(st);
}

/* Both copies, synchronous: `buf` is the host side (released here),
 * `ptr_obj` the device address. */
static PyObject *copy_buffer(Py_buffer *buf, PyObject *ptr_obj, int device, int to_device) {
  uintptr_t ptr;
  if (ext_address(ptr_obj, to_device ? "dst_ptr" : "src_ptr", &ptr)) {
    PyBuffer_Release(buf);
    return NULL;
  }
  ra_status st;
  Py_BEGIN_ALLOW_THREADS
  st = to_device ? ra_cuda_copy_to_device(device, (void *)ptr, buf->buf, (size_t)buf->len)
                 : ra_cuda_copy_to_host(device, buf->buf, (const void *)ptr, (size_t)buf->len);
  Py_END_ALLOW_THREADS
  PyBuffer_Release(buf);
  return done(st);
}

/* copy_to_device(dst_ptr, buffer, device=-1): a C-contiguous host buffer to device memory. */
static PyObject *py_copy_to_device(PyObject *self, PyObject *args) {
  (void)self;
  PyObject *ptr_obj;
  Py_buffer buf;
  int device = -1;
  if (!PyArg_ParseTuple(args, "Oy*|i:copy_to_device", &ptr_obj, &buf, &device)) return NULL;
  return copy_buffer(&buf, ptr_obj, device, 1);
}

/* copy_to_host(buffer, src_ptr, device=-1): fill a writable C-contiguous host buffer. */
static PyObject *py_copy_to_host(PyObject *self, PyObject *args) {
  (void)self;
  PyObject *ptr_obj;
  Py_buffer buf;
  int device = -1;
  if (!PyArg_ParseTuple(args, "w*O|i:copy_to_host", &buf, &ptr_obj, &device)) return NULL;
  return copy_buffer(&buf, ptr_obj, device, 0);
}

static PyObject *py_synchronize(PyObject *self, PyObject *args, PyObject *kw) {
  (void)self;
  static char *names[] = {"stream", "device", NULL};
  PyObject *stream_obj = Py_None;
  int device = -1;
  void *stream;
  if (!PyArg_ParseTupleAndKeywords(args, kw, "|Oi:synchronize", names, &stream_obj, &device) ||
      stream_arg(stream_obj, &stream))
    return NULL;
  ra_status st;
  Py_BEGIN_ALLOW_THREADS
  st = ra_cuda_synchronize(device, stream);
  Py_END_ALLOW_THREADS
  return done(st);
}

static PyObject *py_pointer_info(PyObject *self, PyObject *arg) {
  (void)self;
  uintptr_t ptr;
  if (ext_address(arg, "ptr", &ptr)) return NULL;
  ra_memory_kind kind;
  int device = -1;
  ra_status st = ra_cuda_pointer_info((const void *)ptr, &kind, &device);
  if (st != RA_OK) return ext_raise_runtime(st);
  const char *name = kind == RA_MEMORY_DEVICE    ? "device"
                     : kind == RA_MEMORY_MANAGED ? "managed"
                     : kind == RA_MEMORY_HOST    ? "host"
                                                 : "unregistered";
  return Py_BuildValue("(si)", name, device);
}

PyMethodDef ext_cuda_methods[] = {
    {"cuda_device_count", py_cuda_device_count, METH_NOARGS,
     "CUDA devices this build can use (0 without CUDA, a driver or a device)."},
    {"current_device", py_current_device, METH_NOARGS, "The current CUDA device ordinal."},
    {"alloc", py_alloc, METH_VARARGS, "alloc(nbytes, device=-1) -> address of new device memory."},
    {"free", py_free, METH_VARARGS, "free(ptr, device=-1): free memory from alloc()."},
    {"copy_to_device", py_copy_to_device, METH_VARARGS,
     "copy_to_device(dst_ptr, buffer, device=-1): host buffer -> device memory (synchronous)."},
    {"copy_to_host", py_copy_to_host, METH_VARARGS,
     "copy_to_host(buffer, src_ptr, device=-1): device memory -> writable host buffer (synchronous)."},
    {"synchronize", (PyCFunction)(void (*)(void))py_synchronize, METH_VARARGS | METH_KEYWORDS,
     "synchronize(stream=None, device=-1): wait until the stream (None/0: legacy default) is idle."},
    {"pointer_info", py_pointer_info, METH_O,
     "pointer_info(ptr) -> (kind, device): kind 'device', 'managed', 'host' or 'unregistered'."},
    {NULL, NULL, 0, NULL}};
