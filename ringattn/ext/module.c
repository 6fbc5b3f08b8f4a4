/*
 * module.c -- ringattn._ext, the one extension module of ringattn: the
 * module itself, its exception, the mapping of core statuses to Python
 * exceptions, constants, and the small queries of the build.  The other
 * files add their functions (see ext.h).
 */
#include "ext.h"

PyObject *ext_error;

/* ---------------------------------------------------------------- errors */

static PyObject *raise_with_message(PyObject *type, ra_status st) {
  const char *msg = ra_last_error();
  PyErr_SetString(type, (msg && *msg) ? msg : ra_status_string(st));
  return NULL;
}

PyObject *ext_raise_status(ra_status st) {
  switch (st) {
    case RA_ERR_INVALID_ARGUMENT:
    case RA_ERR_NONFINITE: return raise_with_message(PyExc_ValueError, st);
    case RA_ERR_UNSUPPORTED: return raise_with_message(PyExc_TypeError, st);
    case RA_ERR_OUT_OF_MEMORY: return raise_with_message(PyExc_MemoryError, st);
    default: return raise_with_message(ext_error, st);
  }
}

PyObject *ext_raise_runtime(ra_status st) {
  if (st == RA_ERR_UNSUPPORTED) return raise_with_message(PyExc_RuntimeError, st);
  return ext_raise_status(st);
}

/* --------------------------------------------------------------- helpers */

int ext_address(PyObject *obj, const char *what, uintptr_t *out) {
  if (!PyLong_Check(obj) || PyBool_Check(obj)) {
    PyErr_Format(PyExc_TypeError, "%s must be an int (an address), got %.100s", what, Py_TYPE(obj)->tp_name);
    return -1;
  }
  unsigned long long v = PyLong_AsUnsignedLongLong(obj);
  if (v == (unsigned long long)-1 && PyErr_Occurred()) {
    PyErr_Clear();
    PyErr_Format(PyExc_ValueError, "%s must be a non-negative address that fits 64 bits", what);
    return -1;
  }
  *out = (uintptr_t)v;
  return 0;
}

int ext_read_i64s(PyObject *seq, const char *what, int64_t *dst, int max, int *count) {
  PyObject *fast = PySequence_Fast(seq, what);
  if (!fast) return -1;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
  if (n > max) {
    Py_DECREF(fast);
    PyErr_Format(PyExc_ValueError, "%s: at most %d values are supported, got %zd", what, max, n);
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
  *count = (int)n;
  return 0;
}

/* ------------------------------------------------------ build queries */

static PyObject *py_have(PyObject *self, PyObject *unused) {
  (void)self;
  (void)unused;
  return Py_BuildValue("{sNsNsN}", "mpi", PyBool_FromLong(ra_have_mpi()), "nccl",
                       PyBool_FromLong(ra_have_nccl()), "cuda", PyBool_FromLong(ra_have_cuda()));
}

static PyObject *py_default_num_threads(PyObject *self, PyObject *unused) {
  (void)self;
  (void)unused;
  return PyLong_FromLong(ra_default_num_threads());
}

static PyObject *py_exec_default(PyObject *self, PyObject *unused) {
  (void)self;
  (void)unused;
  const ra_exec e = ra_exec_default();
  return Py_BuildValue("{sisisN}", "num_threads", e.num_threads, "kernel", (int)e.kernel, "deterministic",
                       PyBool_FromLong(e.deterministic));
}

/* {"selected": the ISA a default call runs (None if RINGATTN_CPU_ISA is
 * unusable), "supported": [...], "compiled": [...]} */
static PyObject *py_cpu_isa(PyObject *self, PyObject *unused) {
  (void)self;
  (void)unused;
  PyObject *supported = PyList_New(0), *compiled = PyList_New(0);
  if (!supported || !compiled) goto fail;
  for (int i = RA_CPU_ISA_BASELINE; ra_cpu_isa_name((ra_cpu_isa)i); i++) {
    PyObject *name = PyUnicode_FromString(ra_cpu_isa_name((ra_cpu_isa)i));
    int bad = !name || (ra_cpu_isa_compiled((ra_cpu_isa)i) && PyList_Append(compiled, name) < 0) ||
              (ra_cpu_isa_supported((ra_cpu_isa)i) && PyList_Append(supported, name) < 0);
    Py_XDECREF(name);
    if (bad) goto fail;
  }
  const ra_cpu_isa isa = ra_cpu_isa_resolve(ra_exec_default().cpu_isa);
  return Py_BuildValue("{szsNsN}", "selected", ra_cpu_isa_supported(isa) ? ra_cpu_isa_name(isa) : NULL,
                       "supported", supported, "compiled", compiled);
fail:
  Py_XDECREF(supported);
  Py_XDECREF(compiled);
  return NULL;
}

static PyObject *py_status_string(PyObject *self, PyObject *arg) {
  (void)self;
  long code = PyLong_AsLong(arg);
  if (code == -1 && PyErr_Occurred()) return NULL;
  return PyUnicode_FromString(ra_status_string((ra_status)code));
}

static PyMethodDef module_methods[] = {
    {"have", py_have, METH_NOARGS, "have() -> {'mpi', 'nccl', 'cuda'}: the optional parts of this build."},
    {"default_num_threads", py_default_num_threads, METH_NOARGS, "Cores the CPU kernels use by default."},
    {"exec_default", py_exec_default, METH_NOARGS,
     "exec_default() -> {num_threads, kernel, deterministic}: the defaults from the environment."},
    {"status_string", py_status_string, METH_O, "status_string(code): description of a core status code."},
    {"cpu_isa", py_cpu_isa, METH_NOARGS,
     "cpu_isa() -> {selected, supported, compiled}: the CPU kernels' instruction sets (RINGATTN_CPU_ISA)."},
    {NULL, NULL, 0, NULL}};

/* ---------------------------------------------------------------- module */

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "ringattn._ext",
    "The C core of ringattn as one extension module (private; use the ringattn package).", -1,
    module_methods, NULL, NULL, NULL, NULL};

static int add_constants(PyObject *m) {
  static const struct {
    const char *name;
    int value;
  } constants[] = {
      {"FLOAT32", RA_FLOAT32},         {"FLOAT16", RA_FLOAT16},         {"BFLOAT16", RA_BFLOAT16},
      {"FLOAT64", RA_FLOAT64},         {"DEVICE_CPU", RA_DEVICE_CPU},   {"DEVICE_CUDA", RA_DEVICE_CUDA},
      {"KERNEL_AUTO", RA_KERNEL_AUTO}, {"KERNEL_SIMT", RA_KERNEL_SIMT},
  };
  for (size_t i = 0; i < sizeof constants / sizeof constants[0]; i++)
    if (PyModule_AddIntConstant(m, constants[i].name, constants[i].value) < 0) return -1;
  return 0;
}

static int add_functions(PyObject *m) {
  PyMethodDef *tables[] = {ext_intake_methods, ext_export_methods, ext_call_methods, ext_comm_methods,
                           ext_pycomm_methods, ext_cuda_methods};
  for (size_t i = 0; i < sizeof tables / sizeof tables[0]; i++)
    if (PyModule_AddFunctions(m, tables[i]) < 0) return -1;
  return 0;
}

PyMODINIT_FUNC PyInit__ext(void) {
  PyObject *m = PyModule_Create(&module_def);
  if (!m) return NULL;
  ext_error = PyErr_NewExceptionWithDoc("ringattn.RingAttnError",
                                        "A failure inside the ringattn core (transport, internal).",
                                        PyExc_RuntimeError, NULL);
  if (!ext_error) goto fail;
  Py_INCREF(ext_error); /* the module's reference; ext_error keeps its own */
  if (PyModule_AddObject(m, "RingAttnError", ext_error) < 0) {
    Py_DECREF(ext_error);
    goto fail;
  }
  if (add_constants(m) < 0 || add_functions(m) < 0 || ext_intake_init(m) < 0) goto fail;
  return m;
fail:
  Py_DECREF(m);
  return NULL;
}
