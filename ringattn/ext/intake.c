/*
 * intake.c -- the Tensor type and intake(obj, name, stream=None): one
 * argument read through the protocol it speaks, in this order:
 *
 *   numpy.ndarray               host memory, read directly
 *   __dlpack__ (+ _device__)    a consumed DLPack capsule, owned by the Tensor
 *   __cuda_array_interface__    a CUDA array (versions 0 to 3)
 *
 * The result describes the memory (address, shape, element strides, dtype,
 * device) and keeps the producer alive; nothing is copied.  Every rule of
 * the protocols lives here, so that the Python layer stays thin.
 */
#include "ext.h"
#include "dlpack.h"
#include "internal.h" /* the core's checked sizes */

#include <stdio.h>
#include <string.h>

#ifndef NPY_NO_DEPRECATED_API
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#endif
#include <numpy/arrayobject.h>

/* ---------------------------------------------------------------- dtypes */

static const ext_dtype dtypes[] = {
    {RA_FLOAT32, "float32", 4, kDLFloat, 32},
    {RA_FLOAT16, "float16", 2, kDLFloat, 16},
    {RA_BFLOAT16, "bfloat16", 2, kDLBfloat, 16},
    {RA_FLOAT64, "float64", 8, kDLFloat, 64},
};
#define NUM_DTYPES (sizeof dtypes / sizeof dtypes[0])

const ext_dtype *ext_dtype_of(ra_dtype dtype) {
  for (size_t i = 0; i < NUM_DTYPES; i++)
    if (dtypes[i].dtype == dtype) return &dtypes[i];
  return &dtypes[0];
}

const ext_dtype *ext_dtype_named(const char *name) {
  for (size_t i = 0; i < NUM_DTYPES; i++)
    if (strcmp(dtypes[i].name, name) == 0) return &dtypes[i];
  return NULL;
}

const ext_dtype *ext_dtype_dlpack(uint8_t code, uint8_t bits) {
  for (size_t i = 0; i < NUM_DTYPES; i++)
    if (dtypes[i].dl_code == code && dtypes[i].dl_bits == bits) return &dtypes[i];
  return NULL;
}

#define DTYPE_CHOICES "float32, float16, bfloat16 or float64"

/* ------------------------------------------------------------ the Tensor */

static const char USED_LEGACY[] = "used_dltensor";
static const char USED_VERSIONED[] = "used_dltensor_versioned";
static const char NAME_LEGACY[] = "dltensor";
static const char NAME_VERSIONED[] = "dltensor_versioned";

/* Give a consumed DLPack tensor back to its producer: its deleter runs once.
 * A pending exception survives (the deleter may run Python code). */
static void release_managed(ext_tensor *t) {
  void *m = t->managed;
  if (!m) return;
  t->managed = NULL;
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  if (t->versioned) {
    DLManagedTensorVersioned *mv = m;
    if (mv->deleter) mv->deleter(mv);
  } else {
    DLManagedTensor *ml = m;
    if (ml->deleter) ml->deleter(ml);
  }
  PyErr_Restore(type, value, tb);
}

static ext_tensor *tensor_new(PyObject *name, PyObject *obj, const char *source) {
  ext_tensor *t = (ext_tensor *)ext_tensor_type.tp_alloc(&ext_tensor_type, 0);
  if (!t) return NULL;
  Py_INCREF(name);
  t->name = name;
  Py_INCREF(obj);
  t->obj = obj;
  Py_INCREF(Py_None);
  t->stream = Py_None;
  t->source = source;
  t->device = -1;
  t->dtype = &dtypes[0];
  return t;
}

/* Shape and element strides (NULL: C-contiguous).  Axes of size 1 get their
 * C-contiguous stride: producers put anything there, even negative values.
 * The products are checked: once they no longer fit (a shape no memory
 * holds, refused by check_extent unless an axis is empty or broadcast),
 * the remaining contiguous strides are 0, which only ever multiplies 0. */
static void set_layout(ext_tensor *t, int ndim, const int64_t *shape, const int64_t *strides) {
  int64_t contiguous = 1;
  int fits = 1;
  t->ndim = ndim;
  for (int i = ndim - 1; i >= 0; i--) {
    t->shape[i] = shape[i];
    t->strides[i] = (strides && shape[i] != 1) ? strides[i] : (fits ? contiguous : 0);
    if (fits && !ra_mul_ok(contiguous, shape[i] > 0 ? shape[i] : 0, &contiguous)) fits = 0;
  }
}

static PyObject *int64_tuple(const int64_t *v, int n);

/* The bytes a Tensor reaches must lie inside the address space: no
 * negative sizes, and ptr + every (index . strides) * itemsize computed
 * without wrapping.  NumPy arrays always pass; a DLPack or CUDA array
 * interface producer may claim anything.  Empty tensors reach nothing. */
static int check_extent(ext_tensor *t) {
  int64_t below = 0, above = 0, step; /* elements before and after element (0, ..., 0) */
  int empty = 0;
  for (int i = 0; i < t->ndim; i++) {
    if (t->shape[i] < 0) {
      PyObject *sh = int64_tuple(t->shape, t->ndim);
      if (sh) PyErr_Format(PyExc_ValueError, "%U: shape %R has a negative size", t->name, sh);
      Py_XDECREF(sh);
      return -1;
    }
    empty |= t->shape[i] == 0;
  }
  if (empty) return 0;
  int ok = 1;
  for (int i = 0; i < t->ndim && ok; i++) {
    const int64_t s = t->strides[i];
    const int64_t mag = s >= 0 ? s : (s == INT64_MIN ? -1 : -s); /* -1: no int64 magnitude */
    ok = mag >= 0 && ra_mul_ok(t->shape[i] - 1, mag, &step) && ra_add_ok(s >= 0 ? above : below, step,
                                                                         s >= 0 ? &above : &below);
  }
  size_t lo, hi; /* bytes before the pointer, and from it to the end of the last element */
  ok = ok && ra_add_ok(above, 1, &above) && ra_bytes_ok(below, (size_t)t->dtype->itemsize, &lo) &&
       ra_bytes_ok(above, (size_t)t->dtype->itemsize, &hi) && t->ptr >= lo && t->ptr <= UINTPTR_MAX - hi;
  if (ok) return 0;
  PyObject *sh = int64_tuple(t->shape, t->ndim), *st = int64_tuple(t->strides, t->ndim);
  if (sh && st)
    PyErr_Format(PyExc_ValueError,
                 "%U: shape %R with strides %R (elements) from address %p reaches outside the address space", t->name,
                 sh, st, (void *)t->ptr);
  Py_XDECREF(sh);
  Py_XDECREF(st);
  return -1;
}

static int check_ndim(PyObject *name, Py_ssize_t ndim) {
  if (ndim < 0 || ndim > EXT_MAX_NDIM) {
    PyErr_Format(PyExc_ValueError, "%U has %zd dimensions; at most %d are supported", name, ndim, EXT_MAX_NDIM);
    return -1;
  }
  return 0;
}

static PyObject *int64_tuple(const int64_t *v, int n) {
  PyObject *out = PyTuple_New(n);
  for (int i = 0; out && i < n; i++) {
    PyObject *x = PyLong_FromLongLong(v[i]);
    if (!x) {
      Py_CLEAR(out);
      break;
    }
    PyTuple_SET_ITEM(out, i, x);
  }
  return out;
}

/* Byte strides to element strides, in place: each (for axes of size > 1)
 * must be a multiple of the item size. */
static int byte_strides_to_elements(PyObject *name, int ndim, const int64_t *shape, int64_t *strides,
                                    int itemsize) {
  for (int i = 0; i < ndim; i++)
    if (shape[i] > 1 && strides[i] % itemsize) {
      PyObject *st = int64_tuple(strides, ndim);
      if (st)
        PyErr_Format(PyExc_ValueError, "%U: strides %R (bytes) are not multiples of the item size %d", name, st,
                     itemsize);
      Py_XDECREF(st);
      return -1;
    }
  for (int i = 0; i < ndim; i++) strides[i] /= itemsize;
  return 0;
}

/* ----------------------------------------------------------------- NumPy */

/* A 2-byte void dtype named "...bfloat16..." is ml_dtypes' bfloat16. */
static int is_numpy_bfloat16(PyArrayObject *a) {
  PyArray_Descr *d = PyArray_DESCR(a);
  if (d->kind != 'V' || PyArray_ITEMSIZE(a) != 2) return 0;
  PyObject *name = PyObject_GetAttrString((PyObject *)d, "name");
  if (!name) {
    PyErr_Clear();
    return 0;
  }
  const char *s = PyUnicode_Check(name) ? PyUnicode_AsUTF8(name) : NULL;
  const int yes = s && strstr(s, "bfloat16") != NULL;
  if (!s) PyErr_Clear();
  Py_DECREF(name);
  return yes;
}

static const ext_dtype *numpy_dtype(PyArrayObject *a, PyObject *name) {
  if (PyArray_ISNOTSWAPPED(a)) {
    switch (PyArray_TYPE(a)) {
      case NPY_FLOAT32: return ext_dtype_of(RA_FLOAT32);
      case NPY_FLOAT16: return ext_dtype_of(RA_FLOAT16);
      case NPY_FLOAT64: return ext_dtype_of(RA_FLOAT64);
      default: break;
    }
    if (is_numpy_bfloat16(a)) return ext_dtype_of(RA_BFLOAT16);
  }
  PyErr_Format(PyExc_TypeError, "%U must have dtype " DTYPE_CHOICES ", got %S", name,
               (PyObject *)PyArray_DESCR(a));
  return NULL;
}

static PyObject *intake_numpy(PyArrayObject *a, PyObject *name) {
  const ext_dtype *dt = numpy_dtype(a, name);
  if (!dt) return NULL;
  const int ndim = PyArray_NDIM(a);
  if (check_ndim(name, ndim)) return NULL;
  int64_t shape[EXT_MAX_NDIM], strides[EXT_MAX_NDIM];
  for (int i = 0; i < ndim; i++) {
    shape[i] = PyArray_DIMS(a)[i];
    strides[i] = PyArray_STRIDES(a)[i];
  }
  if (byte_strides_to_elements(name, ndim, shape, strides, dt->itemsize)) return NULL;
  ext_tensor *t = tensor_new(name, (PyObject *)a, "numpy");
  if (!t) return NULL;
  t->kind = RA_DEVICE_CPU;
  t->ptr = (uintptr_t)PyArray_DATA(a);
  t->dtype = dt;
  t->readonly = !PyArray_ISWRITEABLE(a);
  set_layout(t, ndim, shape, strides);
  return (PyObject *)t;
}

/* ---------------------------------------------------------------- DLPack */

static const char *dl_device_name(int32_t type) {
  static const char *const names[] = {NULL,     "cpu",       "cuda",    "cuda_host",    "opencl",
                                      NULL,     NULL,        "vulkan",  "metal",        "vpi",
                                      "rocm",   "rocm_host", "ext_dev", "cuda_managed", "oneapi",
                                      "webgpu", "hexagon",   "maia"};
  if (type >= 0 && type < (int32_t)(sizeof names / sizeof names[0]) && names[type]) return names[type];
  return "an unknown device type";
}

/* The device type of obj.__dlpack_device__() -> (device_type, device_id). */
static int dlpack_device_type(PyObject *obj, PyObject *name, int *type) {
  PyObject *dev = PyObject_CallMethod(obj, "__dlpack_device__", NULL);
  if (!dev) return -1;
  int ok = PyTuple_Check(dev) && PyTuple_GET_SIZE(dev) == 2;
  if (ok) {
    *type = (int)PyLong_AsLong(PyTuple_GET_ITEM(dev, 0));
    ok = !PyErr_Occurred();
    PyErr_Clear();
  }
  Py_DECREF(dev);
  if (!ok) PyErr_Format(PyExc_TypeError, "%U: __dlpack_device__ must return (device_type, device_id)", name);
  return ok ? 0 : -1;
}

/* Replace the pending exception by `type`("{name}: {what}: {old message}"),
 * chained to the old one. */
static void rewrap_error(PyObject *type, PyObject *name, const char *what) {
  PyObject *et, *ev, *tb;
  PyErr_Fetch(&et, &ev, &tb);
  PyErr_NormalizeException(&et, &ev, &tb);
  if (tb && ev) PyException_SetTraceback(ev, tb);
  PyErr_Format(type, "%U: %s: %S", name, what, ev ? ev : Py_None);
  PyObject *nt, *nv, *ntb;
  PyErr_Fetch(&nt, &nv, &ntb);
  PyErr_NormalizeException(&nt, &nv, &ntb);
  if (nv && ev) {
    Py_INCREF(ev);
    PyException_SetCause(nv, ev); /* steals */
    PyException_SetContext(nv, ev); /* steals ev: the reference of the fetch */
    ev = NULL;
  }
  PyErr_Restore(nt, nv, ntb);
  Py_XDECREF(et);
  Py_XDECREF(ev);
  Py_XDECREF(tb);
}

/* obj.__dlpack__(stream=stream, max_version=(1, 0)); producers that do not
 * know max_version raise TypeError and are asked again without it. */
static PyObject *call_dlpack(PyObject *obj, PyObject *name, PyObject *stream) {
  PyObject *method = PyObject_GetAttrString(obj, "__dlpack__");
  if (!method) return NULL;
  PyObject *cap = NULL, *empty = PyTuple_New(0);
  PyObject *kw = Py_BuildValue("{sOs(ii)}", "stream", stream, "max_version", 1, 0);
  if (empty && kw) {
    cap = PyObject_Call(method, empty, kw);
    if (!cap && PyErr_ExceptionMatches(PyExc_TypeError)) {
      PyErr_Clear();
      if (PyDict_DelItemString(kw, "max_version") == 0) cap = PyObject_Call(method, empty, kw);
    }
  }
  Py_XDECREF(kw);
  Py_XDECREF(empty);
  Py_DECREF(method);
  if (!cap && (PyErr_ExceptionMatches(PyExc_BufferError) || PyErr_ExceptionMatches(PyExc_ValueError) ||
               PyErr_ExceptionMatches(PyExc_RuntimeError)))
    rewrap_error(PyExc_ValueError, name, "__dlpack__ failed");
  return cap;
}

/* Take the managed tensor out of a fresh capsule: rename the capsule
 * "used_...", so that its destructor leaves the tensor to us. */
static int consume_capsule(ext_tensor *t, PyObject *cap, PyObject *name) {
  if (!PyCapsule_CheckExact(cap)) {
    PyErr_Format(PyExc_TypeError, "%U: __dlpack__ must return a PyCapsule, got %.100s", name,
                 Py_TYPE(cap)->tp_name);
    return -1;
  }
  int versioned;
  if (PyCapsule_IsValid(cap, NAME_VERSIONED)) {
    versioned = 1;
  } else if (PyCapsule_IsValid(cap, NAME_LEGACY)) {
    versioned = 0;
  } else {
    const char *cap_name = PyCapsule_GetName(cap);
    if (cap_name && strncmp(cap_name, "used_", 5) == 0)
      PyErr_Format(PyExc_ValueError, "%U: the DLPack capsule was already consumed", name);
    else
      PyErr_Format(PyExc_TypeError, "%U: not a DLPack capsule (capsule name %s)", name,
                   cap_name ? cap_name : "NULL");
    return -1;
  }
  void *m = PyCapsule_GetPointer(cap, versioned ? NAME_VERSIONED : NAME_LEGACY);
  if (!m) return -1;
  /* SetName keeps the pointer: the names are static strings */
  if (PyCapsule_SetName(cap, versioned ? USED_VERSIONED : USED_LEGACY) < 0) return -1;
  t->managed = m;
  t->versioned = versioned;
  return 0;
}

/* "int32", "float16x4", "code 9, 8 bits": a DLPack dtype for messages. */
static void dl_dtype_text(DLDataType t, char *out, size_t size) {
  static const char *const codes[] = {"int", "uint", "float", "opaque handle", "bfloat", "complex", "bool"};
  int n;
  if (t.code < sizeof codes / sizeof codes[0])
    n = snprintf(out, size, "%s%u", codes[t.code], (unsigned)t.bits);
  else
    n = snprintf(out, size, "code %u, %u bits", (unsigned)t.code, (unsigned)t.bits);
  if (t.lanes != 1 && n > 0 && (size_t)n < size) snprintf(out + n, size - (size_t)n, "x%u", (unsigned)t.lanes);
}

static int dlpack_dtype(ext_tensor *t, const DLTensor *dl, PyObject *name) {
  const ext_dtype *dt = dl->dtype.lanes == 1 ? ext_dtype_dlpack(dl->dtype.code, dl->dtype.bits) : NULL;
  if (dt) {
    t->dtype = dt;
    return 0;
  }
  char what[48];
  dl_dtype_text(dl->dtype, what, sizeof what);
  PyErr_Format(PyExc_TypeError, "%U must have dtype " DTYPE_CHOICES ", got %s (DLPack)", name, what);
  return -1;
}

/* Fill the Tensor from the managed tensor it now owns. */
static int describe_dlpack(ext_tensor *t, PyObject *name) {
  const DLTensor *dl;
  if (t->versioned) {
    const DLManagedTensorVersioned *mv = t->managed;
    if (mv->version.major != 1) {
      PyErr_Format(PyExc_ValueError, "%U: DLPack version %u.%u is not supported (ringattn reads major version 1)",
                   name, (unsigned)mv->version.major, (unsigned)mv->version.minor);
      return -1;
    }
    t->readonly = (mv->flags & DLPACK_FLAG_BITMASK_READ_ONLY) != 0;
    dl = &mv->dl_tensor;
  } else {
    dl = &((const DLManagedTensor *)t->managed)->dl_tensor;
  }
  switch (dl->device.device_type) {
    case kDLCUDA:
    case kDLCUDAManaged:
      t->kind = RA_DEVICE_CUDA;
      t->device = dl->device.device_id;
      break;
    case kDLCPU:
    case kDLCUDAHost: t->kind = RA_DEVICE_CPU; break;
    default:
      PyErr_Format(PyExc_ValueError, "%U is on an unsupported device (%s)", name,
                   dl_device_name(dl->device.device_type));
      return -1;
  }
  if (dlpack_dtype(t, dl, name) || check_ndim(name, dl->ndim)) return -1;
  if (dl->ndim > 0 && !dl->shape) {
    PyErr_Format(PyExc_ValueError, "%U: the DLPack tensor has no shape", name);
    return -1;
  }
  t->ptr = (uintptr_t)dl->data + (uintptr_t)dl->byte_offset;
  set_layout(t, dl->ndim, dl->shape, dl->strides);
  return 0;
}

static PyObject *intake_dlpack(PyObject *obj, PyObject *name, PyObject *stream) {
  int type;
  if (dlpack_device_type(obj, name, &type)) return NULL;
  /* A CUDA producer orders its pending work before the stream we run on
   * (1: the legacy default stream); a host producer takes no stream. */
  const int on_cuda = type == kDLCUDA || type == kDLCUDAManaged;
  PyObject *legacy = NULL;
  if (!on_cuda) stream = Py_None;
  else if (stream == Py_None && !(stream = legacy = PyLong_FromLong(1))) return NULL;
  PyObject *cap = call_dlpack(obj, name, stream);
  Py_XDECREF(legacy);
  if (!cap) return NULL;
  ext_tensor *t = tensor_new(name, obj, "dlpack");
  int bad = !t || consume_capsule(t, cap, name) || describe_dlpack(t, name);
  Py_DECREF(cap); /* an unconsumed capsule deletes its tensor itself */
  if (bad) {
    if (t) release_managed(t); /* before the exception reaches the caller */
    Py_XDECREF(t);
    return NULL;
  }
  return (PyObject *)t;
}

/* ------------------------------------------------ CUDA array interface */

/* obj.__cuda_array_interface__, or NULL without an exception when absent
 * (a property that raises, as torch's does for CPU tensors, counts as absent). */
static PyObject *get_cai(PyObject *obj) {
  PyObject *cai = PyObject_GetAttrString(obj, "__cuda_array_interface__");
  if (!cai && PyErr_ExceptionMatches(PyExc_Exception)) PyErr_Clear();
  return cai;
}

/* A non-bool int, or -1 with an exception. */
static int cai_int(PyObject *v, PyObject *name, const char *what, long long *out) {
  if (!PyLong_Check(v) || PyBool_Check(v)) {
    PyErr_Format(PyExc_ValueError, "%U: __cuda_array_interface__ %s must be an int, got %R", name, what, v);
    return -1;
  }
  *out = PyLong_AsLongLong(v);
  if (*out == -1 && PyErr_Occurred()) return -1;
  return 0;
}

/* A tuple of ints (shape or strides) of at most EXT_MAX_NDIM values. */
static int cai_ints(PyObject *seq, PyObject *name, const char *what, int64_t *dst, int *n) {
  if (!PyTuple_Check(seq) && !PyList_Check(seq)) {
    PyErr_Format(PyExc_ValueError, "%U: __cuda_array_interface__ %s must be a tuple of ints, got %R", name, what,
                 seq);
    return -1;
  }
  const Py_ssize_t len = PySequence_Fast_GET_SIZE(seq);
  if (check_ndim(name, len)) return -1;
  for (Py_ssize_t i = 0; i < len; i++) {
    long long v;
    if (cai_int(PySequence_Fast_GET_ITEM(seq, i), name, what, &v)) return -1;
    dst[i] = v;
  }
  *n = (int)len;
  return 0;
}

/* bfloat16 has no typestr: '<V2' counts as bfloat16 when the descr or the
 * object's dtype names it (as ringattn's own arrays do). */
static int cai_names_bfloat16(PyObject *obj, PyObject *descr) {
  if (descr && (PyList_Check(descr) || PyTuple_Check(descr))) {
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(descr); i++) {
      PyObject *d = PySequence_Fast_GET_ITEM(descr, i);
      if ((!PyTuple_Check(d) && !PyList_Check(d)) || PySequence_Fast_GET_SIZE(d) < 1) continue;
      PyObject *s = PyObject_Str(PySequence_Fast_GET_ITEM(d, 0));
      const char *c = s ? PyUnicode_AsUTF8(s) : NULL;
      const int yes = c && strstr(c, "bfloat16");
      Py_XDECREF(s);
      PyErr_Clear();
      if (yes) return 1;
    }
  }
  int yes = 0;
  PyObject *dt = PyObject_GetAttrString(obj, "dtype");
  PyObject *s = dt ? PyObject_Str(dt) : NULL;
  const char *c = s ? PyUnicode_AsUTF8(s) : NULL;
  if (c) {
    const size_t n = strlen(c);
    yes = n >= 8 && strcmp(c + n - 8, "bfloat16") == 0;
  }
  Py_XDECREF(s);
  Py_XDECREF(dt);
  PyErr_Clear();
  return yes;
}

static const ext_dtype *cai_dtype(PyObject *obj, PyObject *name, PyObject *typestr, PyObject *descr) {
  const char *s = PyUnicode_Check(typestr) ? PyUnicode_AsUTF8(typestr) : NULL;
  if (!s || strlen(s) < 3) {
    PyErr_Clear();
    PyErr_Format(PyExc_TypeError, "%U: __cuda_array_interface__ typestr must be a string like '<f4', got %R", name,
                 typestr);
    return NULL;
  }
  if (s[0] == '>') {
    PyErr_Format(PyExc_TypeError, "%U: big-endian data (typestr %R) is not supported", name, typestr);
    return NULL;
  }
  if (!strchr("<=|", s[0])) {
    PyErr_Format(PyExc_TypeError, "%U: bad __cuda_array_interface__ typestr %R", name, typestr);
    return NULL;
  }
  const char *body = s + 1;
  if (!strcmp(body, "f4")) return ext_dtype_of(RA_FLOAT32);
  if (!strcmp(body, "f2")) return ext_dtype_of(RA_FLOAT16);
  if (!strcmp(body, "f8")) return ext_dtype_of(RA_FLOAT64);
  if (!strcmp(body, "V2")) {
    if (cai_names_bfloat16(obj, descr)) return ext_dtype_of(RA_BFLOAT16);
    PyErr_Format(PyExc_TypeError,
                 "%U: typestr %R is not a known dtype (bfloat16 needs a descr naming 'bfloat16'; "
                 "or pass the array through DLPack)",
                 name, typestr);
    return NULL;
  }
  PyErr_Format(PyExc_TypeError, "%U must have dtype " DTYPE_CHOICES ", got typestr %R", name, typestr);
  return NULL;
}

/* data = (pointer, readonly) */
static int cai_data(PyObject *data, PyObject *name, uintptr_t *ptr, int *readonly) {
  if ((!PyTuple_Check(data) && !PyList_Check(data)) || PySequence_Fast_GET_SIZE(data) != 2) {
    PyErr_Format(PyExc_ValueError, "%U: __cuda_array_interface__ data must be (pointer, readonly), got %R", name,
                 data);
    return -1;
  }
  PyObject *pobj = PySequence_Fast_GET_ITEM(data, 0);
  unsigned long long p = 0;
  if (PyLong_Check(pobj) && !PyBool_Check(pobj)) p = PyLong_AsUnsignedLongLong(pobj); /* negative: an error */
  if (!PyLong_Check(pobj) || PyBool_Check(pobj) || PyErr_Occurred()) {
    PyErr_Clear();
    PyErr_Format(PyExc_ValueError, "%U: __cuda_array_interface__ pointer must be a non-negative int, got %R", name,
                 pobj);
    return -1;
  }
  const int ro = PyObject_IsTrue(PySequence_Fast_GET_ITEM(data, 1));
  if (ro < 0) return -1;
  *ptr = (uintptr_t)p;
  *readonly = ro;
  return 0;
}

/* The v3 "stream": None, or a positive int (0 is ambiguous and refused). */
static int cai_stream(PyObject *stream, PyObject *name) {
  long long s = 0;
  if (stream == Py_None) return 0;
  if (!PyLong_Check(stream) || PyBool_Check(stream) ||
      ((s = PyLong_AsLongLong(stream)) == -1 && PyErr_Occurred()) || s < 0) {
    PyErr_Clear();
    PyErr_Format(PyExc_ValueError, "%U: __cuda_array_interface__ stream must be None or a positive int, got %R",
                 name, stream);
    return -1;
  }
  if (s == 0) {
    PyErr_Format(PyExc_ValueError,
                 "%U: __cuda_array_interface__ stream 0 is ambiguous and not allowed by the protocol "
                 "(use 1 for the legacy default stream, 2 for the per-thread default stream)",
                 name);
    return -1;
  }
  return 0;
}

/* CAI does not say where the memory is: ask CUDA, when there is one. */
static int cai_device(ext_tensor *t, PyObject *name) {
  if (!t->ptr || !ra_have_cuda() || ra_cuda_device_count() < 1) return 0; /* unknown: stays -1 */
  ra_memory_kind kind;
  int device = -1;
  ra_status st = ra_cuda_pointer_info((const void *)t->ptr, &kind, &device);
  if (st != RA_OK) {
    ext_raise_runtime(st);
    return -1;
  }
  if (kind != RA_MEMORY_DEVICE && kind != RA_MEMORY_MANAGED) {
    PyErr_Format(PyExc_ValueError, "%U: __cuda_array_interface__ points at host memory, not at CUDA device memory",
                 name);
    return -1;
  }
  t->device = device;
  return 0;
}

/* dict[key], which must be there (borrowed). */
static PyObject *cai_required(PyObject *cai, PyObject *name, const char *key) {
  PyObject *v = PyDict_GetItemString(cai, key);
  if (!v) PyErr_Format(PyExc_ValueError, "%U: __cuda_array_interface__ has no '%s'", name, key);
  return v;
}

static PyObject *intake_cai(PyObject *obj, PyObject *name, PyObject *cai) {
  if (!PyDict_Check(cai)) {
    PyErr_Format(PyExc_TypeError, "%U: __cuda_array_interface__ must be a dict, got %.100s", name,
                 Py_TYPE(cai)->tp_name);
    return NULL;
  }
  long long version = 0;
  PyObject *v = PyDict_GetItemString(cai, "version");
  if (v && (cai_int(v, name, "version", &version) || version < 0 || version > 3)) {
    PyErr_Clear();
    PyErr_Format(PyExc_ValueError, "%U: __cuda_array_interface__ version %R is not supported (0 to 3)", name, v);
    return NULL;
  }
  PyObject *shape_obj = cai_required(cai, name, "shape");
  PyObject *typestr = shape_obj ? cai_required(cai, name, "typestr") : NULL;
  PyObject *data = typestr ? cai_required(cai, name, "data") : NULL;
  if (!data) return NULL;

  int ndim, nstrides;
  int64_t shape[EXT_MAX_NDIM], strides[EXT_MAX_NDIM];
  if (cai_ints(shape_obj, name, "shape", shape, &ndim)) return NULL;
  for (int i = 0; i < ndim; i++)
    if (shape[i] < 0) {
      PyErr_Format(PyExc_ValueError, "%U: __cuda_array_interface__ shape %R has a negative size", name, shape_obj);
      return NULL;
    }
  const ext_dtype *dt = cai_dtype(obj, name, typestr, PyDict_GetItemString(cai, "descr"));
  if (!dt) return NULL;
  uintptr_t ptr;
  int readonly;
  if (cai_data(data, name, &ptr, &readonly)) return NULL;
  PyObject *mask = PyDict_GetItemString(cai, "mask");
  if (mask && mask != Py_None) {
    PyErr_Format(PyExc_ValueError, "%U: masked arrays (__cuda_array_interface__ mask) are not supported", name);
    return NULL;
  }
  PyObject *st_obj = PyDict_GetItemString(cai, "strides");
  const int have_strides = st_obj && st_obj != Py_None;
  if (have_strides) {
    if (cai_ints(st_obj, name, "strides", strides, &nstrides)) return NULL;
    if (nstrides != ndim) {
      PyErr_Format(PyExc_ValueError, "%U: __cuda_array_interface__ strides %R do not match shape %R", name, st_obj,
                   shape_obj);
      return NULL;
    }
    if (byte_strides_to_elements(name, ndim, shape, strides, dt->itemsize)) return NULL;
  }
  PyObject *stream = version >= 3 ? PyDict_GetItemString(cai, "stream") : NULL;
  if (stream && cai_stream(stream, name)) return NULL;

  ext_tensor *t = tensor_new(name, obj, "cai");
  if (!t) return NULL;
  t->kind = RA_DEVICE_CUDA;
  t->ptr = ptr;
  t->dtype = dt;
  t->readonly = readonly;
  set_layout(t, ndim, shape, have_strides ? strides : NULL);
  if (stream) {
    Py_INCREF(stream);
    Py_SETREF(t->stream, stream);
  }
  if (cai_device(t, name)) {
    Py_DECREF(t);
    return NULL;
  }
  return (PyObject *)t;
}

/* ---------------------------------------------------------------- intake */

static PyObject *py_intake(PyObject *self, PyObject *args, PyObject *kw) {
  (void)self;
  static char *names[] = {"obj", "name", "stream", NULL};
  PyObject *obj, *name, *stream = Py_None;
  if (!PyArg_ParseTupleAndKeywords(args, kw, "OU|O:intake", names, &obj, &name, &stream)) return NULL;
  if (stream != Py_None && (!PyLong_Check(stream) || PyBool_Check(stream))) {
    PyErr_Format(PyExc_TypeError, "stream must be None or an int, got %.100s", Py_TYPE(stream)->tp_name);
    return NULL;
  }
  PyObject *t = NULL;
  if (PyArray_Check(obj)) {
    t = intake_numpy((PyArrayObject *)obj, name);
  } else if (PyObject_HasAttrString(obj, "__dlpack__") && PyObject_HasAttrString(obj, "__dlpack_device__")) {
    t = intake_dlpack(obj, name, stream);
  } else {
    PyObject *cai = get_cai(obj);
    if (cai) {
      t = intake_cai(obj, name, cai);
      Py_DECREF(cai);
    } else if (PyErr_Occurred()) {
      return NULL;
    }
  }
  if (t && check_extent((ext_tensor *)t)) Py_CLEAR(t); /* a consumed DLPack tensor goes back to its producer */
  if (t || PyErr_Occurred()) return t;
  return PyErr_Format(PyExc_TypeError,
                      "%U must be a NumPy array or a CUDA array (__cuda_array_interface__ or DLPack), got %.100s",
                      name, Py_TYPE(obj)->tp_name);
}

PyMethodDef ext_intake_methods[] = {
    {"intake", (PyCFunction)(void (*)(void))py_intake, METH_VARARGS | METH_KEYWORDS,
     "intake(obj, name, stream=None) -> Tensor\n\n"
     "Read a NumPy array, a DLPack producer (__dlpack__) or a CUDA array (__cuda_array_interface__)\n"
     "without copying.  stream: the CUDA stream (int) a DLPack producer is asked to order its work\n"
     "before (None: 1, the legacy default stream)."},
    {NULL, NULL, 0, NULL}};

/* ------------------------------------------------------ Tensor methods */

static PyObject *tensor_release(ext_tensor *t, PyObject *unused) {
  (void)unused;
  if (t->busy) {
    PyErr_Format(PyExc_RuntimeError, "%U is in use by a running call", t->name);
    return NULL;
  }
  release_managed(t);
  Py_INCREF(Py_None);
  Py_SETREF(t->obj, Py_None); /* the Tensor holds nothing any more */
  Py_RETURN_NONE;
}

static int tensor_traverse(ext_tensor *t, visitproc visit, void *arg) {
  Py_VISIT(t->name);
  Py_VISIT(t->obj);
  Py_VISIT(t->stream);
  return 0;
}

static int tensor_clear(ext_tensor *t) {
  release_managed(t);
  Py_CLEAR(t->name);
  Py_CLEAR(t->obj);
  Py_CLEAR(t->stream);
  return 0;
}

static void tensor_dealloc(ext_tensor *t) {
  PyObject_GC_UnTrack(t);
  tensor_clear(t);
  Py_TYPE(t)->tp_free((PyObject *)t);
}

static PyObject *kind_name(const ext_tensor *t) {
  return PyUnicode_FromString(t->kind == RA_DEVICE_CUDA ? "cuda" : "cpu");
}

static PyObject *tensor_repr(ext_tensor *t) {
  PyObject *shape = int64_tuple(t->shape, t->ndim), *strides = int64_tuple(t->strides, t->ndim);
  PyObject *dev = t->kind == RA_DEVICE_CPU ? PyUnicode_FromString("cpu")
                  : t->device >= 0         ? PyUnicode_FromFormat("cuda:%d", t->device)
                                           : PyUnicode_FromString("cuda:?");
  PyObject *out = NULL;
  if (shape && strides && dev)
    out = PyUnicode_FromFormat("Tensor(%U, %U, %s, shape=%R, strides=%R, ptr=%p, source=%s)", t->name, dev,
                               t->dtype->name, shape, strides, (void *)t->ptr, t->source);
  Py_XDECREF(shape);
  Py_XDECREF(strides);
  Py_XDECREF(dev);
  return out;
}

static PyObject *get_object(PyObject *o) {
  Py_INCREF(o);
  return o;
}

static PyObject *get_name(ext_tensor *t, void *c) { (void)c; return get_object(t->name); }
static PyObject *get_obj(ext_tensor *t, void *c) { (void)c; return get_object(t->obj); }
static PyObject *get_stream(ext_tensor *t, void *c) { (void)c; return get_object(t->stream); }
static PyObject *get_kind(ext_tensor *t, void *c) { (void)c; return kind_name(t); }
static PyObject *get_device(ext_tensor *t, void *c) { (void)c; return PyLong_FromLong(t->device); }
static PyObject *get_ptr(ext_tensor *t, void *c) { (void)c; return PyLong_FromUnsignedLongLong(t->ptr); }
static PyObject *get_shape(ext_tensor *t, void *c) { (void)c; return int64_tuple(t->shape, t->ndim); }
static PyObject *get_strides(ext_tensor *t, void *c) { (void)c; return int64_tuple(t->strides, t->ndim); }
static PyObject *get_dtype(ext_tensor *t, void *c) { (void)c; return PyUnicode_FromString(t->dtype->name); }
static PyObject *get_itemsize(ext_tensor *t, void *c) { (void)c; return PyLong_FromLong(t->dtype->itemsize); }
static PyObject *get_readonly(ext_tensor *t, void *c) { (void)c; return PyBool_FromLong(t->readonly); }

/* The core reads it in place: the last axis contiguous, strides
 * non-negative, the pointer set and aligned (ext/call.c's rules). */
static PyObject *get_in_place(ext_tensor *t, void *c) {
  (void)c;
  int ok = t->ndim >= 1 && t->strides[t->ndim - 1] == 1 && t->ptr && t->ptr % (uintptr_t)t->dtype->itemsize == 0;
  for (int i = 0; ok && i < t->ndim; i++) ok = t->strides[i] >= 0;
  return PyBool_FromLong(ok);
}
static PyObject *get_source(ext_tensor *t, void *c) { (void)c; return PyUnicode_FromString(t->source); }

#define GETTER(attr, doc) {#attr, (getter)get_##attr, NULL, doc, NULL}
static PyGetSetDef tensor_getset[] = {
    GETTER(name, "the argument's name, for messages"),
    GETTER(kind, "'cpu' or 'cuda'"),
    GETTER(device, "CUDA ordinal; -1 for host memory or when unknown"),
    GETTER(ptr, "address of the first element"),
    GETTER(shape, "shape (tuple)"),
    GETTER(strides, "strides in elements (size-1 axes: their C-contiguous value)"),
    GETTER(dtype, "'float32', 'float16', 'bfloat16' or 'float64'"),
    GETTER(itemsize, "bytes per element"),
    GETTER(readonly, "whether the producer forbids writes"),
    GETTER(in_place, "whether the core can read it in place (last axis contiguous, strides >= 0, aligned)"),
    GETTER(stream, "the __cuda_array_interface__ v3 stream (int) or None"),
    GETTER(source, "'numpy', 'cai' or 'dlpack'"),
    GETTER(obj, "the producer, kept alive by the Tensor until release()"),
    {NULL, NULL, NULL, NULL, NULL}};

static PyMethodDef tensor_methods[] = {
    {"release", (PyCFunction)tensor_release, METH_NOARGS,
     "Give a consumed DLPack tensor back to its producer and drop the producer (obj becomes\n"
     "None; ptr must not be used any more).  Idempotent."},
    {NULL, NULL, 0, NULL}};

PyTypeObject ext_tensor_type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "ringattn._ext.Tensor",
    .tp_basicsize = sizeof(ext_tensor),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "One argument of a call as intake() read it (read-only; made by intake()).",
    .tp_dealloc = (destructor)tensor_dealloc,
    .tp_traverse = (traverseproc)tensor_traverse,
    .tp_clear = (inquiry)tensor_clear,
    .tp_repr = (reprfunc)tensor_repr,
    .tp_methods = tensor_methods,
    .tp_getset = tensor_getset,
};

int ext_intake_init(PyObject *module) {
  import_array1(-1);
  if (PyType_Ready(&ext_tensor_type) < 0) return -1;
  Py_INCREF(&ext_tensor_type);
  if (PyModule_AddObject(module, "Tensor", (PyObject *)&ext_tensor_type) < 0) {
    Py_DECREF(&ext_tensor_type);
    return -1;
  }
  return 0;
}
