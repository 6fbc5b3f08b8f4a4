/*
 * ext.h -- what the files of the extension module ringattn._ext share.
 *
 * module.c   the module, its exception, status -> exception, small helpers
 * intake.c   the Tensor type: NumPy / __cuda_array_interface__ / DLPack import
 * export.c   DLPack export (to_dlpack)
 * call.c     the configuration reader, plan() and run()
 * comm.c     communicators
 * pycomm.c   communicators whose transport is a Python object (torch.distributed)
 * cuda.c     the CUDA runtime helpers (through the core's ra_cuda_*)
 *
 * Only intake.c includes NumPy's header (and so imports its C API).
 */
#ifndef RINGATTN_EXT_H
#define RINGATTN_EXT_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#include "ringattn.h"

/* ------------------------------------------------------------ module.c */

extern PyObject *ext_error; /* RingAttnError, a RuntimeError */

/* Raise the exception of a core status with ra_last_error()'s message:
 * ValueError (invalid argument, non-finite input), TypeError (unsupported),
 * MemoryError, or RingAttnError.  Always returns NULL. */
PyObject *ext_raise_status(ra_status st);

/* The same for the CUDA runtime helpers, except that RA_ERR_UNSUPPORTED
 * (no CUDA in this build, or no device) is a RuntimeError. */
PyObject *ext_raise_runtime(ra_status st);

/* A Python int as an address: non-negative, fitting 64 bits (0 allowed). */
int ext_address(PyObject *obj, const char *what, uintptr_t *out);

/* Up to `max` integers of a sequence into dst; *count <- how many. */
int ext_read_i64s(PyObject *seq, const char *what, int64_t *dst, int max, int *count);

/* ------------------------------------------------------------ dtypes */

/* One row per ra_dtype: its name, size and DLPack (code, bits). */
typedef struct ext_dtype {
  ra_dtype dtype;
  const char *name;
  int itemsize;
  uint8_t dl_code, dl_bits;
} ext_dtype;

const ext_dtype *ext_dtype_of(ra_dtype dtype);
const ext_dtype *ext_dtype_named(const char *name);               /* NULL if unknown */
const ext_dtype *ext_dtype_dlpack(uint8_t code, uint8_t bits);    /* NULL if unknown */

/* ------------------------------------------------------------ intake.c */

#define EXT_MAX_NDIM 32

/* A tensor argument, parsed once from whatever protocol it came through.
 * Strides are in elements, and axes of size 1 carry their C-contiguous
 * stride.  A consumed DLPack tensor is owned here: its deleter runs exactly
 * once, on release() or when the Tensor is deallocated.  release() also
 * drops the producer (obj becomes None). */
typedef struct ext_tensor {
  PyObject_HEAD
  PyObject *name;      /* str */
  PyObject *obj;       /* the producer, kept alive until release() */
  PyObject *stream;    /* the CAI v3 stream (int) or None */
  const char *source;  /* "numpy", "cai" or "dlpack" */
  ra_device_type kind; /* RA_DEVICE_CPU or RA_DEVICE_CUDA */
  int device;          /* CUDA ordinal; -1: host memory or unknown */
  uintptr_t ptr;       /* address of element (0, ..., 0) */
  const ext_dtype *dtype;
  int readonly;
  int ndim;
  int64_t shape[EXT_MAX_NDIM];
  int64_t strides[EXT_MAX_NDIM];
  void *managed;       /* consumed DLManagedTensor[Versioned], or NULL */
  int versioned;       /* which of the two `managed` is */
  int busy;            /* run() calls using the tensor; release() refuses meanwhile */
} ext_tensor;

extern PyTypeObject ext_tensor_type;

/* Ready the Tensor type and NumPy's C API; add Tensor to the module. */
int ext_intake_init(PyObject *module);

/* ------------------------------------------------------------ comm.c */

#define EXT_COMM_CAPSULE "ringattn.comm"

/* What a "ringattn.comm" capsule points at. */
typedef struct ext_comm {
  ra_comm *comm;
  int busy; /* calls running with the GIL released; comm_close refuses meanwhile */
} ext_comm;

/* A new communicator as a capsule (which owns it from now on). */
PyObject *ext_comm_wrap(ra_comm *comm);

/* The communicator of a capsule; NULL (with an exception) once closed. */
ext_comm *ext_comm_get(PyObject *capsule);

/* This rank refuses the call `op`: take part in the communicator's
 * agreement with the pending Python exception (TypeError -> unsupported,
 * ValueError -> invalid argument, anything else -> transport error named
 * by its type) so that the other ranks raise instead of waiting.  The
 * exception stays set. */
void ext_comm_refuse(ext_comm *c, ra_comm_op op);

/* ------------------------------------------------------------ method tables */

extern PyMethodDef ext_intake_methods[];
extern PyMethodDef ext_export_methods[];
extern PyMethodDef ext_call_methods[];
extern PyMethodDef ext_comm_methods[];
extern PyMethodDef ext_pycomm_methods[];
extern PyMethodDef ext_cuda_methods[];

#endif /* RINGATTN_EXT_H */
