/*
 * export.c -- to_dlpack(): memory that a Python object owns, handed to
 * another library as a DLPack capsule ("dltensor" or "dltensor_versioned").
 *
 * The managed tensor, its shape and its strides sit in one PyMem_RawMalloc
 * block (freeable without the GIL); manager_ctx holds a strong reference to
 * the owner, dropped by the deleter.  Consumers may call the deleter from
 * any thread, with or without the GIL.
 */
#include "ext.h"
#include "dlpack.h"

#include <string.h>

static const char NAME_LEGACY[] = "dltensor";
static const char NAME_VERSIONED[] = "dltensor_versioned";

static void release_owner(void *owner) {
  if (!owner || !Py_IsInitialized()) return; /* at exit: leak rather than crash */
  PyGILState_STATE gs = PyGILState_Ensure();
  Py_DECREF((PyObject *)owner);
  PyGILState_Release(gs);
}

static void legacy_deleter(DLManagedTensor *self) {
  if (!self) return;
  release_owner(self->manager_ctx);
  PyMem_RawFree(self);
}

static void versioned_deleter(DLManagedTensorVersioned *self) {
  if (!self) return;
  release_owner(self->manager_ctx);
  PyMem_RawFree(self);
}

/* A capsule that nobody consumed (its name unchanged) still owns its
 * tensor: delete it.  A consumer renames it "used_..." and takes over. */
static void capsule_destructor(PyObject *cap) {
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  if (PyCapsule_IsValid(cap, NAME_VERSIONED)) {
    DLManagedTensorVersioned *m = PyCapsule_GetPointer(cap, NAME_VERSIONED);
    if (m->deleter) m->deleter(m);
  } else if (PyCapsule_IsValid(cap, NAME_LEGACY)) {
    DLManagedTensor *m = PyCapsule_GetPointer(cap, NAME_LEGACY);
    if (m->deleter) m->deleter(m);
  }
  PyErr_Restore(type, value, tb);
}

/* The shape and element strides of the export (None: C-contiguous, which
 * is still exported explicitly: some consumers want strides). */
static int read_layout(PyObject *shape_obj, PyObject *strides_obj, int64_t *shape, int64_t *strides, int *ndim) {
  if (ext_read_i64s(shape_obj, "shape", shape, EXT_MAX_NDIM, ndim)) return -1;
  for (int i = 0; i < *ndim; i++)
    if (shape[i] < 0) {
      PyErr_SetString(PyExc_ValueError, "shape must hold non-negative sizes");
      return -1;
    }
  if (strides_obj != Py_None) {
    int n;
    if (ext_read_i64s(strides_obj, "strides", strides, EXT_MAX_NDIM, &n)) return -1;
    if (n != *ndim) {
      PyErr_Format(PyExc_ValueError, "strides must hold %d values (one per axis), got %d", *ndim, n);
      return -1;
    }
    return 0;
  }
  int64_t s = 1;
  for (int i = *ndim - 1; i >= 0; i--) {
    strides[i] = s;
    s *= shape[i];
  }
  return 0;
}

/* One block: the managed tensor (either kind), then shape[ndim], strides[ndim]. */
static void *new_managed(int versioned, int ndim, DLTensor **t) {
  size_t head = versioned ? sizeof(DLManagedTensorVersioned) : sizeof(DLManagedTensor);
  head = (head + 7) & ~(size_t)7;
  char *block = PyMem_RawCalloc(1, head + 2 * (size_t)(ndim > 0 ? ndim : 1) * sizeof(int64_t));
  if (!block) return NULL;
  *t = versioned ? &((DLManagedTensorVersioned *)block)->dl_tensor : &((DLManagedTensor *)block)->dl_tensor;
  (*t)->shape = (int64_t *)(block + head);
  (*t)->strides = (*t)->shape + ndim;
  return block;
}

static PyObject *py_to_dlpack(PyObject *self, PyObject *args, PyObject *kw) {
  (void)self;
  static char *names[] = {"owner", "ptr", "device_type", "device_id", "shape", "strides", "dtype",
                          "versioned", "readonly", NULL};
  PyObject *owner, *ptr_obj, *shape_obj, *strides_obj;
  const char *dtype_name;
  int device_type, device_id, versioned = 0, readonly = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kw, "OOiiOOs|pp:to_dlpack", names, &owner, &ptr_obj, &device_type,
                                   &device_id, &shape_obj, &strides_obj, &dtype_name, &versioned, &readonly))
    return NULL;
  uintptr_t ptr;
  if (ext_address(ptr_obj, "ptr", &ptr)) return NULL;
  const ext_dtype *dt = ext_dtype_named(dtype_name);
  if (!dt)
    return PyErr_Format(PyExc_TypeError, "dtype must be 'float32', 'float16', 'bfloat16' or 'float64', got '%s'",
                        dtype_name);
  int ndim;
  int64_t shape[EXT_MAX_NDIM], strides[EXT_MAX_NDIM];
  if (read_layout(shape_obj, strides_obj, shape, strides, &ndim)) return NULL;

  DLTensor *t;
  void *block = new_managed(versioned, ndim, &t);
  if (!block) return PyErr_NoMemory();
  if (versioned) {
    DLManagedTensorVersioned *m = block;
    m->version.major = 1;
    m->version.minor = 0;
    m->manager_ctx = owner;
    m->deleter = versioned_deleter;
    m->flags = readonly ? DLPACK_FLAG_BITMASK_READ_ONLY : 0;
  } else {
    DLManagedTensor *m = block;
    m->manager_ctx = owner;
    m->deleter = legacy_deleter;
  }
  t->data = (void *)ptr;
  t->device.device_type = device_type;
  t->device.device_id = device_id;
  t->ndim = ndim;
  t->dtype.code = dt->dl_code;
  t->dtype.bits = dt->dl_bits;
  t->dtype.lanes = 1;
  memcpy(t->shape, shape, (size_t)ndim * sizeof(int64_t));
  memcpy(t->strides, strides, (size_t)ndim * sizeof(int64_t));
  t->byte_offset = 0;
  PyObject *cap = PyCapsule_New(block, versioned ? NAME_VERSIONED : NAME_LEGACY, capsule_destructor);
  if (!cap) {
    PyMem_RawFree(block);
    return NULL;
  }
  Py_INCREF(owner); /* dropped by the deleter */
  return cap;
}

PyMethodDef ext_export_methods[] = {
    {"to_dlpack", (PyCFunction)(void (*)(void))py_to_dlpack, METH_VARARGS | METH_KEYWORDS,
     "to_dlpack(owner, ptr, device_type, device_id, shape, strides, dtype, versioned=False,\n"
     "          readonly=False) -> capsule\n\n"
     "A 'dltensor' (or 'dltensor_versioned', version 1.0) capsule describing memory that owner\n"
     "keeps alive until the consumer's deleter runs.  device_type is a DLPack device type\n"
     "(1 CPU, 2 CUDA, 3 CUDA host, 13 CUDA managed); dtype a name ('float32', 'float16',\n"
     "'bfloat16', 'float64'); strides in elements, or None for C-contiguous."},
    {NULL, NULL, 0, NULL}};
