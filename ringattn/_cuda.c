/*
 * _cuda.c -- the CPython extension of the GPU path: raw device pointers in,
 * ra_cuda_forward / ra_cuda_backward out, plus the few CUDA runtime calls the Python side needs
 * (allocation, host/device copies, stream synchronisation, pointer queries)
 * and the export of device memory as a DLPack capsule.
 *
 * Everything that parses __cuda_array_interface__ / DLPack objects and checks
 * arguments lives in ringattn/_device.py; this module trusts integers as
 * pointers and only checks what would otherwise crash the C core.  In a build
 * without CUDA (no RA_WITH_CUDA) the module still imports: device_count() is
 * 0, run() reports the core's RA_ERR_UNSUPPORTED, and the runtime calls
 * raise RuntimeError.  to_dlpack() works in every build (it only builds a
 * struct), which is how the CPU test suite checks the exported layout.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "ringattn.h"
#include "_glue.h"

#ifdef RA_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

static PyObject *RingAttnError; /* ringattn._core.RingAttnError (or RuntimeError) */

/* ------------------------------------------------------------ DLPack ABI */
/* The DLPack ABI (dlpack.h, v0.8 legacy and v1.x versioned), written out here
 * from the published struct layouts so that no header is needed. */

typedef struct {
  int32_t device_type; /* DLDeviceType: 1 CPU, 2 CUDA, ... */
  int32_t device_id;
} DLDevice;

typedef struct {
  uint8_t code; /* 0 int, 1 uint, 2 float, 4 bfloat */
  uint8_t bits;
  uint16_t lanes;
} DLDataType;

typedef struct {
  void *data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t *shape;
  int64_t *strides; /* in elements; NULL means compact row-major */
  uint64_t byte_offset;
} DLTensor;

typedef struct DLManagedTensor {
  DLTensor dl_tensor;
  void *manager_ctx;
  void (*deleter)(struct DLManagedTensor *self);
} DLManagedTensor;

typedef struct {
  uint32_t major;
  uint32_t minor;
} DLPackVersion;

typedef struct DLManagedTensorVersioned {
  DLPackVersion version;
  void *manager_ctx;
  void (*deleter)(struct DLManagedTensorVersioned *self);
  uint64_t flags;
  DLTensor dl_tensor;
} DLManagedTensorVersioned;

#define RA_DLPACK_FLAG_READ_ONLY ((uint64_t)1 << 0)

/* ---------------------------------------------------------------- errors */

static PyObject *raise_status(ra_status st) { return glue_raise_status(st, RingAttnError); }

#ifdef RA_WITH_CUDA
static PyObject *raise_cuda(cudaError_t err, const char *what) {
  cudaGetLastError(); /* clear a non-sticky error so the next call starts clean */
  PyObject *type = err == cudaErrorMemoryAllocation ? PyExc_MemoryError : RingAttnError;
  PyErr_Format(type, "%s: CUDA error %d (%s)", what, (int)err, cudaGetErrorString(err));
  return NULL;
}

/* Make `device` current for the duration of a call (device < 0: leave as is). */
typedef struct {
  int prev;
  int changed;
} device_guard;

static cudaError_t guard_enter(device_guard *g, int device) {
  g->prev = -1;
  g->changed = 0;
  if (device < 0) return cudaSuccess;
  cudaError_t err = cudaGetDevice(&g->prev);
  if (err != cudaSuccess) return err;
  if (g->prev == device) return cudaSuccess;
  err = cudaSetDevice(device);
  if (err == cudaSuccess) g->changed = 1;
  return err;
}

static void guard_exit(device_guard *g) {
  if (g->changed) cudaSetDevice(g->prev);
}
#else
static PyObject *no_cuda(void) {
  PyErr_SetString(PyExc_RuntimeError,
                  "ringattn was built without CUDA: rebuild with nvcc available "
                  "(meson setup -Dcuda=enabled) to use GPU arrays");
  return NULL;
}
#endif

/* -------------------------------------------------------------- helpers */

/* A Python int as an address (0 allowed). */
/* A stream handle: an int (0 = the default stream) or None (= 0). */
static int as_stream(PyObject *obj, void **out) {
  if (obj == Py_None) {
    *out = NULL;
    return 0;
  }
  uintptr_t s;
  if (glue_address(obj, "stream", &s)) return -1;
  *out = (void *)s;
  return 0;
}


/* ------------------------------------------------------- forward, backward */

/* ra_cuda_forward (4 tensors: q, k, v, out) or ra_cuda_backward (8: q, k, v,
 * out, dout, dq, dk, dv) on device addresses. */
static PyObject *py_run(PyObject *self, PyObject *args, PyObject *kw) {
  (void)self;
  static char *names[] = {"tensors", "lse", "shape", "strides", "dtype", "segment_lengths", "dilation_rates",
                          "causal", "mode", "scale", "world_size", "stream", "device", "sync", NULL};
  PyObject *ptrs_obj, *lse_obj, *shape_obj, *strides_obj, *segs, *rates, *stream_obj = Py_None;
  int dtype, causal, mode, world, device = -1, sync = 1;
  double scale;
  if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOiOOpidi|Oip", names, &ptrs_obj, &lse_obj, &shape_obj,
                                   &strides_obj, &dtype, &segs, &rates, &causal, &mode, &scale, &world,
                                   &stream_obj, &device, &sync))
    return NULL;
  ra_tensor t[8];
  int64_t shape[4];
  int count;
  if (glue_device_tensors(ptrs_obj, strides_obj, shape_obj, shape, t, &count)) return NULL;
  const int backward = count == 8;
  uintptr_t lse = 0;
  ra_config cfg;
  ra_config_init(&cfg);
  if (lse_obj != Py_None && glue_address(lse_obj, "lse", &lse)) return NULL;
  if (backward && !lse) return PyErr_Format(PyExc_ValueError, "lse: the backward needs the forward's lse");
  void *stream;
  if (as_stream(stream_obj, &stream)) return NULL;
  if (dtype != RA_FLOAT32 && dtype != RA_FLOAT16 && dtype != RA_BFLOAT16)
    return PyErr_Format(PyExc_TypeError, "dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16), got %d", dtype);

  cfg.batch = shape[0];
  cfg.seq_len = shape[1];
  cfg.num_heads = shape[2];
  cfg.head_dim = shape[3];
  cfg.dtype = (ra_dtype)dtype;
  cfg.causal = causal;
  cfg.mode = (ra_mode)mode;
  cfg.scale = scale;
  cfg.world_size = world;
  int ns = 0, nr = 0;
  if (glue_read_i64s(segs, "segment_lengths", cfg.segment_lengths, -1, &ns) ||
      glue_read_i64s(rates, "dilation_rates", cfg.dilation_rates, -1, &nr))
    return NULL;
  if (ns != nr)
    return PyErr_Format(PyExc_ValueError, "dilation_rates: %d values for %d segment_lengths", nr, ns);
  cfg.num_branches = ns;

  ra_plan *plan;
  ra_status st = ra_plan_create(&cfg, &plan);
  if (st != RA_OK) return raise_status(st);
  ra_stats *stats = PyMem_Calloc((size_t)cfg.world_size, sizeof *stats);
  if (!stats) {
    ra_plan_destroy(plan);
    return PyErr_NoMemory();
  }
  const char *who = backward ? "ra_cuda_backward" : "ra_cuda_forward";
#ifdef RA_WITH_CUDA
  device_guard g;
  cudaError_t cerr = cudaSuccess;
#endif
  Py_BEGIN_ALLOW_THREADS
#ifdef RA_WITH_CUDA
  cerr = guard_enter(&g, device);
  if (cerr == cudaSuccess) {
#else
  (void)device;
  (void)sync;
#endif
    st = backward ? ra_cuda_backward(plan, t[0], t[1], t[2], t[3], t[4], (const float *)lse, t[5], t[6], t[7],
                                     stream, stats)
                  : ra_cuda_forward(plan, t[0], t[1], t[2], t[3], (float *)lse, stream, stats);
#ifdef RA_WITH_CUDA
    if (st == RA_OK && sync) cerr = cudaStreamSynchronize((cudaStream_t)stream);
  }
  guard_exit(&g);
#endif
  Py_END_ALLOW_THREADS
  ra_plan_destroy(plan);
  PyObject *out;
#ifdef RA_WITH_CUDA
  if (cerr != cudaSuccess) {
    char what[96];
    snprintf(what, sizeof what, st == RA_OK ? "synchronizing the stream after %s" : "selecting the device", who);
    out = raise_cuda(cerr, what);
  } else
#endif
    out = st == RA_OK ? glue_stats_tuple(stats, cfg.world_size) : raise_status(st);
  (void)who;
  PyMem_Free(stats);
  return out;
}

/* ------------------------------------------------------- runtime helpers */

static PyObject *py_device_count(PyObject *self, PyObject *unused) {
  (void)self;
  (void)unused;
  return PyLong_FromLong(ra_cuda_device_count());
}

static PyObject *py_built_with_cuda(PyObject *self, PyObject *unused) {
  (void)self;
  (void)unused;
#ifdef RA_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

static PyObject *py_current_device(PyObject *self, PyObject *unused) {
  (void)self;
  (void)unused;
#ifdef RA_WITH_CUDA
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return raise_cuda(err, "cudaGetDevice");
  return PyLong_FromLong(dev);
#else
  return no_cuda();
#endif
}

static PyObject *py_alloc(PyObject *self, PyObject *args) {
  (void)self;
  Py_ssize_t nbytes;
  int device = -1;
  if (!PyArg_ParseTuple(args, "n|i", &nbytes, &device)) return NULL;
  if (nbytes < 0) return PyErr_Format(PyExc_ValueError, "nbytes must be >= 0");
#ifdef RA_WITH_CUDA
  void *p = NULL;
  device_guard g;
  cudaError_t err;
  Py_BEGIN_ALLOW_THREADS
  err = guard_enter(&g, device);
  if (err == cudaSuccess) err = cudaMalloc(&p, nbytes ? (size_t)nbytes : 1);
  guard_exit(&g);
  Py_END_ALLOW_THREADS
  if (err != cudaSuccess) return raise_cuda(err, "cudaMalloc");
  return PyLong_FromVoidPtr(p);
#else
  (void)device;
  return no_cuda();
#endif
}

static PyObject *py_free(PyObject *self, PyObject *args) {
  (void)self;
  PyObject *ptr_obj;
  int device = -1;
  if (!PyArg_ParseTuple(args, "O|i", &ptr_obj, &device)) return NULL;
  uintptr_t p;
  if (glue_address(ptr_obj, "ptr", &p)) return NULL;
#ifdef RA_WITH_CUDA
  device_guard g;
  cudaError_t err;
  Py_BEGIN_ALLOW_THREADS
  err = guard_enter(&g, device);
  if (err == cudaSuccess) err = cudaFree((void *)p);
  guard_exit(&g);
  Py_END_ALLOW_THREADS
  if (err != cudaSuccess) return raise_cuda(err, "cudaFree");
  Py_RETURN_NONE;
#else
  (void)device;
  return no_cuda();
#endif
}

/* The copy of both memcpy entries, synchronous: `buf` is the host side
 * (released here), `ptr_obj` the device address. */
static PyObject *copy_host_device(Py_buffer *buf, PyObject *ptr_obj, int device, int to_device) {
  uintptr_t p;
  if (glue_address(ptr_obj, to_device ? "dst" : "src", &p)) {
    PyBuffer_Release(buf);
    return NULL;
  }
#ifdef RA_WITH_CUDA
  device_guard g;
  cudaError_t err;
  Py_BEGIN_ALLOW_THREADS
  err = guard_enter(&g, device);
  if (err == cudaSuccess && buf->len)
    err = to_device ? cudaMemcpy((void *)p, buf->buf, (size_t)buf->len, cudaMemcpyHostToDevice)
                    : cudaMemcpy(buf->buf, (const void *)p, (size_t)buf->len, cudaMemcpyDeviceToHost);
  guard_exit(&g);
  Py_END_ALLOW_THREADS
  PyBuffer_Release(buf);
  if (err != cudaSuccess)
    return raise_cuda(err, to_device ? "cudaMemcpy (host to device)" : "cudaMemcpy (device to host)");
  Py_RETURN_NONE;
#else
  (void)device;
  PyBuffer_Release(buf);
  return no_cuda();
#endif
}

/* memcpy_htod(dst_ptr, src_buffer[, device]): a C-contiguous host buffer to device memory. */
static PyObject *py_memcpy_htod(PyObject *self, PyObject *args) {
  (void)self;
  PyObject *ptr_obj;
  Py_buffer buf;
  int device = -1;
  if (!PyArg_ParseTuple(args, "Oy*|i", &ptr_obj, &buf, &device)) return NULL;
  return copy_host_device(&buf, ptr_obj, device, 1);
}

/* memcpy_dtoh(dst_buffer, src_ptr[, device]): fill a writable C-contiguous host buffer. */
static PyObject *py_memcpy_dtoh(PyObject *self, PyObject *args) {
  (void)self;
  PyObject *ptr_obj;
  Py_buffer buf;
  int device = -1;
  if (!PyArg_ParseTuple(args, "w*O|i", &buf, &ptr_obj, &device)) return NULL;
  return copy_host_device(&buf, ptr_obj, device, 0);
}

/* synchronize(stream[, device]): wait on the host until `stream` is idle. */
static PyObject *py_synchronize(PyObject *self, PyObject *args) {
  (void)self;
  PyObject *stream_obj = Py_None;
  int device = -1;
  if (!PyArg_ParseTuple(args, "|Oi", &stream_obj, &device)) return NULL;
  void *stream;
  if (as_stream(stream_obj, &stream)) return NULL;
#ifdef RA_WITH_CUDA
  device_guard g;
  cudaError_t err;
  Py_BEGIN_ALLOW_THREADS
  err = guard_enter(&g, device);
  if (err == cudaSuccess) err = cudaStreamSynchronize((cudaStream_t)stream);
  guard_exit(&g);
  Py_END_ALLOW_THREADS
  if (err != cudaSuccess) return raise_cuda(err, "cudaStreamSynchronize");
  Py_RETURN_NONE;
#else
  (void)device;
  return no_cuda();
#endif
}

/* pointer_device(ptr) -> (kind, device): kind is "device", "managed", "host"
 * (page-locked host memory) or "unregistered" (ordinary host memory or an
 * address CUDA does not know); device is the ordinal or -1. */
static PyObject *py_pointer_device(PyObject *self, PyObject *arg) {
  (void)self;
  uintptr_t p;
  if (glue_address(arg, "ptr", &p)) return NULL;
#ifdef RA_WITH_CUDA
  struct cudaPointerAttributes attr;
  memset(&attr, 0, sizeof attr);
  cudaError_t err = cudaPointerGetAttributes(&attr, (const void *)p);
  if (err == cudaErrorInvalidValue) {
    cudaGetLastError();
    return Py_BuildValue("(si)", "unregistered", -1);
  }
  if (err != cudaSuccess) return raise_cuda(err, "cudaPointerGetAttributes");
  switch (attr.type) {
    case cudaMemoryTypeDevice: return Py_BuildValue("(si)", "device", attr.device);
    case cudaMemoryTypeManaged: return Py_BuildValue("(si)", "managed", attr.device);
    case cudaMemoryTypeHost: return Py_BuildValue("(si)", "host", -1);
    default: return Py_BuildValue("(si)", "unregistered", -1);
  }
#else
  return no_cuda();
#endif
}

/* ------------------------------------------------------- DLPack export */

static const char DLTENSOR[] = "dltensor";
static const char USED_DLTENSOR[] = "used_dltensor";
static const char DLTENSOR_V[] = "dltensor_versioned";
static const char USED_DLTENSOR_V[] = "used_dltensor_versioned";

/* Both managed-tensor kinds sit at the start of one PyMem_RawMalloc block
 * followed by shape[ndim] and strides[ndim]; manager_ctx holds a strong
 * reference to the owner of the memory. */
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

/* A capsule nobody consumed still owns its tensor: delete it. */
static void legacy_capsule_destructor(PyObject *cap) {
  if (PyCapsule_IsValid(cap, USED_DLTENSOR)) return;
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  DLManagedTensor *m = PyCapsule_GetPointer(cap, DLTENSOR);
  if (m && m->deleter) m->deleter(m);
  else PyErr_Clear();
  PyErr_Restore(type, value, tb);
}

static void versioned_capsule_destructor(PyObject *cap) {
  if (PyCapsule_IsValid(cap, USED_DLTENSOR_V)) return;
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  DLManagedTensorVersioned *m = PyCapsule_GetPointer(cap, DLTENSOR_V);
  if (m && m->deleter) m->deleter(m);
  else PyErr_Clear();
  PyErr_Restore(type, value, tb);
}

/* to_dlpack(owner, ptr, device_type, device_id, shape, strides, code, bits,
 *           versioned=False, readonly=False) -> capsule
 * strides (elements) may be None for C-contiguous. */
static PyObject *py_to_dlpack(PyObject *self, PyObject *args, PyObject *kw) {
  (void)self;
  static char *names[] = {"owner", "ptr", "device_type", "device_id", "shape", "strides", "code",
                          "bits", "versioned", "readonly", NULL};
  PyObject *owner, *ptr_obj, *shape_obj, *strides_obj;
  int device_type, device_id, code, bits, versioned = 0, readonly = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kw, "OOiiOOii|pp", names, &owner, &ptr_obj, &device_type,
                                   &device_id, &shape_obj, &strides_obj, &code, &bits, &versioned,
                                   &readonly))
    return NULL;
  uintptr_t p;
  if (glue_address(ptr_obj, "ptr", &p)) return NULL;
  if (code < 0 || code > 255 || bits < 1 || bits > 255)
    return PyErr_Format(PyExc_ValueError, "dtype code/bits out of range");
  PyObject *shape_fast = PySequence_Fast(shape_obj, "shape must be a sequence");
  if (!shape_fast) return NULL;
  Py_ssize_t ndim = PySequence_Fast_GET_SIZE(shape_fast);
  Py_DECREF(shape_fast);
  if (ndim > 32) return PyErr_Format(PyExc_ValueError, "at most 32 dimensions");
  int64_t shape[32], strides[32];
  if (glue_read_i64s(shape_obj, "shape", shape, (int)ndim, NULL)) return NULL;
  int have_strides = strides_obj != Py_None;
  if (have_strides && glue_read_i64s(strides_obj, "strides", strides, (int)ndim, NULL)) return NULL;
  if (!have_strides) { /* always export explicit strides: some consumers want them */
    int64_t s = 1;
    for (Py_ssize_t i = ndim - 1; i >= 0; i--) {
      strides[i] = s;
      s *= shape[i];
    }
  }
  size_t head = versioned ? sizeof(DLManagedTensorVersioned) : sizeof(DLManagedTensor);
  head = (head + 7) & ~(size_t)7;
  char *block = PyMem_RawMalloc(head + 2 * (size_t)(ndim ? ndim : 1) * sizeof(int64_t));
  if (!block) return PyErr_NoMemory();
  int64_t *dshape = (int64_t *)(block + head), *dstrides = dshape + ndim;
  memcpy(dshape, shape, (size_t)ndim * sizeof(int64_t));
  memcpy(dstrides, strides, (size_t)ndim * sizeof(int64_t));
  DLTensor *t;
  if (versioned) {
    DLManagedTensorVersioned *m = (DLManagedTensorVersioned *)block;
    memset(m, 0, sizeof *m);
    m->version.major = 1;
    m->version.minor = 0;
    m->manager_ctx = owner;
    m->deleter = versioned_deleter;
    m->flags = readonly ? RA_DLPACK_FLAG_READ_ONLY : 0;
    t = &m->dl_tensor;
  } else {
    DLManagedTensor *m = (DLManagedTensor *)block;
    memset(m, 0, sizeof *m);
    m->manager_ctx = owner;
    m->deleter = legacy_deleter;
    t = &m->dl_tensor;
  }
  t->data = (void *)p;
  t->device.device_type = device_type;
  t->device.device_id = device_id;
  t->ndim = (int32_t)ndim;
  t->dtype.code = (uint8_t)code;
  t->dtype.bits = (uint8_t)bits;
  t->dtype.lanes = 1;
  t->shape = dshape;
  t->strides = dstrides;
  t->byte_offset = 0;
  PyObject *cap = PyCapsule_New(block, versioned ? DLTENSOR_V : DLTENSOR,
                                versioned ? versioned_capsule_destructor : legacy_capsule_destructor);
  if (!cap) {
    PyMem_RawFree(block);
    return NULL;
  }
  Py_INCREF(owner); /* released by the deleter */
  return cap;
}

/* ------------------------------------------------------------------ module */

static PyMethodDef methods[] = {
    {"run", (PyCFunction)(void (*)(void))py_run, METH_VARARGS | METH_KEYWORDS,
     "run(tensors, lse, shape, strides, dtype, segment_lengths, dilation_rates, causal,\n"
     "    mode, scale, world_size, stream=None, device=-1, sync=True) -> per-rank stats\n\n"
     "ra_cuda_forward on device pointers (ints) when tensors is (q, k, v, out), ra_cuda_backward\n"
     "when it is (q, k, v, out, dout, dq, dk, dv); lse is an address (or None in the forward).\n"
     "strides: one (stride_b, stride_n, stride_h[, 1]) tuple in elements for each tensor.\n"
     "dtype: 0 float32, 1 float16, 2 bfloat16.  stream: a cudaStream_t as int (None/0: default).\n"
     "device >= 0 is made current for the call.  With sync the stream is synchronized before\n"
     "returning.  The GIL is released while the kernels run."},
    {"device_count", py_device_count, METH_NOARGS, "CUDA devices this build can use."},
    {"built_with_cuda", py_built_with_cuda, METH_NOARGS, "Whether this build has the CUDA backend."},
    {"current_device", py_current_device, METH_NOARGS, "The current CUDA device ordinal."},
    {"alloc", py_alloc, METH_VARARGS, "alloc(nbytes[, device]) -> address (cudaMalloc)."},
    {"free", py_free, METH_VARARGS, "free(ptr[, device]) (cudaFree)."},
    {"memcpy_htod", py_memcpy_htod, METH_VARARGS,
     "memcpy_htod(dst_ptr, src_buffer[, device]): host buffer -> device (synchronous)."},
    {"memcpy_dtoh", py_memcpy_dtoh, METH_VARARGS,
     "memcpy_dtoh(dst_buffer, src_ptr[, device]): device -> writable host buffer (synchronous)."},
    {"synchronize", py_synchronize, METH_VARARGS, "synchronize(stream=None[, device]): cudaStreamSynchronize."},
    {"pointer_device", py_pointer_device, METH_O,
     "pointer_device(ptr) -> (kind, device) from cudaPointerGetAttributes."},
    {"to_dlpack", (PyCFunction)(void (*)(void))py_to_dlpack, METH_VARARGS | METH_KEYWORDS,
     "to_dlpack(owner, ptr, device_type, device_id, shape, strides, code, bits, versioned=False,\n"
     "          readonly=False) -> a 'dltensor' (or 'dltensor_versioned') capsule keeping owner alive."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "ringattn._cuda",
                                    "CUDA entry points of ringattn (private; use the ringattn package).",
                                    -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__cuda(void) {
  PyObject *m = PyModule_Create(&module);
  if (!m) return NULL;
  /* Share the package's exception class when _core is there. */
  PyObject *core = PyImport_ImportModule("ringattn._core");
  if (core) {
    RingAttnError = PyObject_GetAttrString(core, "RingAttnError");
    Py_DECREF(core);
  }
  if (!RingAttnError) {
    PyErr_Clear();
    RingAttnError = PyExc_RuntimeError;
    Py_INCREF(RingAttnError);
  }
  Py_INCREF(RingAttnError);
  if (PyModule_AddObject(m, "RingAttnError", RingAttnError) < 0) {
    Py_DECREF(RingAttnError);
    Py_DECREF(m);
    return NULL;
  }
  if (PyModule_AddIntConstant(m, "FLOAT32", RA_FLOAT32) || PyModule_AddIntConstant(m, "FLOAT16", RA_FLOAT16) ||
      PyModule_AddIntConstant(m, "BFLOAT16", RA_BFLOAT16)) {
    Py_DECREF(m);
    return NULL;
  }
  return m;
}
