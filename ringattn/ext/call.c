/*
 * call.c -- plan() and run(): the configuration reader and the one call
 * path, Tensors -> one ra_bwd_params -> ra_forward / ra_backward.
 *
 * run() is where the tensor rules live (dimensions, shapes and dtypes
 * like q's, strides, pointers, writability, device, the lse), each once,
 * with messages naming the argument; the core checks the configuration
 * (the plan).  On the CPU the Python layer checks neither again; the GPU
 * path checks the tensors before it copies or allocates device memory.
 */
#include "ext.h"
#include "internal.h" /* the core's checked sizes */

#include <string.h>

/* ------------------------------------------------------------ config */

/* The configuration fields shared by plan() and run(). */
static int read_config(ra_config *cfg, PyObject *segs, PyObject *rates, int causal, int mode, double scale,
                       int world_size, int partition) {
  int ns = 0, nr = 0;
  if (ext_read_i64s(segs, "segment_lengths", cfg->segment_lengths, RA_MAX_BRANCHES, &ns) ||
      ext_read_i64s(rates, "dilation_rates", cfg->dilation_rates, RA_MAX_BRANCHES, &nr))
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
  cfg->partition = (ra_partition)partition;
  return 0;
}

static PyObject *branch_dict(const ra_plan *plan, int i) {
  ra_branch_info b;
  ra_status st = ra_plan_branch(plan, i, &b);
  if (st != RA_OK) return ext_raise_status(st);
  return Py_BuildValue("{sLsLsLsLsL}", "segment", (long long)b.segment, "rate", (long long)b.rate, "span",
                       (long long)b.span, "head_begin", (long long)b.head_begin, "head_end",
                       (long long)b.head_end);
}

static PyObject *plan_dict(const ra_plan *plan) {
  const ra_config *cfg = ra_plan_config(plan);
  PyObject *branches = PyList_New(cfg->num_branches);
  for (int i = 0; branches && i < cfg->num_branches; i++) {
    PyObject *b = branch_dict(plan, i);
    if (!b) {
      Py_CLEAR(branches);
      break;
    }
    PyList_SET_ITEM(branches, i, b);
  }
  if (!branches) return NULL;
  return Py_BuildValue("{sLsLsLsdsN}", "local_len", (long long)ra_plan_local_len(plan), "chunk_len",
                       (long long)ra_plan_chunk_len(plan), "num_kv_heads", (long long)cfg->num_kv_heads, "scale",
                       cfg->scale, "branches", branches);
}

static PyObject *py_plan(PyObject *self, PyObject *args, PyObject *kw) {
  (void)self;
  static char *names[] = {"batch",  "seq_len", "num_heads", "head_dim", "segment_lengths", "dilation_rates",
                          "causal", "mode",    "scale",     "world_size", "num_kv_heads", "partition", NULL};
  long long b, n, h, d, hkv = 0;
  PyObject *segs, *rates;
  int causal, mode, world, partition = 0;
  double scale;
  if (!PyArg_ParseTupleAndKeywords(args, kw, "LLLLOOpidi|Li:plan", names, &b, &n, &h, &d, &segs, &rates, &causal,
                                   &mode, &scale, &world, &hkv, &partition))
    return NULL;
  ra_config cfg;
  ra_config_init(&cfg);
  cfg.batch = b;
  cfg.seq_len = n;
  cfg.num_heads = h;
  cfg.num_kv_heads = hkv;
  cfg.head_dim = d;
  if (read_config(&cfg, segs, rates, causal, mode, scale, world, partition)) return NULL;
  ra_plan *plan;
  ra_status st = ra_plan_create(&cfg, &plan);
  if (st != RA_OK) return ext_raise_status(st);
  PyObject *out = plan_dict(plan);
  ra_plan_destroy(plan);
  return out;
}

/* ----------------------------------------------------- tensor checks */

static const char *const device_names[] = {"CPU", "CUDA"};

/* obj as a Tensor of the call's kind (NULL with an exception if not). */
static ext_tensor *as_tensor(PyObject *obj, const char *name, ra_device_type device_type) {
  if (!obj || obj == Py_None) {
    PyErr_Format(PyExc_ValueError, "the backward needs %s", name);
    return NULL;
  }
  if (!PyObject_TypeCheck(obj, &ext_tensor_type)) {
    PyErr_Format(PyExc_TypeError, "%s must be a Tensor (from intake()), got %.100s", name, Py_TYPE(obj)->tp_name);
    return NULL;
  }
  ext_tensor *t = (ext_tensor *)obj;
  if (t->kind != device_type) {
    PyErr_Format(PyExc_ValueError, "%s is in %s memory but the call runs on the %s (device_type)", name,
                 t->kind == RA_DEVICE_CUDA ? "CUDA device" : "host", device_names[device_type]);
    return NULL;
  }
  return t;
}

/* What every tensor must satisfy for the kernels to stay inside memory. */
static int check_memory(const ext_tensor *t, const char *name, int writable, int device) {
  if (!t->ptr) {
    PyErr_Format(PyExc_ValueError, "%s: null data pointer", name);
    return -1;
  }
  if (t->ptr % (uintptr_t)t->dtype->itemsize) {
    PyErr_Format(PyExc_ValueError, "%s: the data pointer is not aligned to the item size %d", name,
                 t->dtype->itemsize);
    return -1;
  }
  if (writable && t->readonly) {
    PyErr_Format(PyExc_ValueError, "%s is read-only", name);
    return -1;
  }
  if (t->kind == RA_DEVICE_CUDA && device >= 0 && t->device >= 0 && t->device != device) {
    PyErr_Format(PyExc_ValueError, "%s is on cuda:%d but the call runs on cuda:%d", name, t->device, device);
    return -1;
  }
  return 0;
}

/* A (b, n, h, d) tensor with the shape of `like` (q, or k for v, dk and
 * dv: grouped-query attention) and q's dtype, the head dimension
 * contiguous and non-negative strides. */
static int check_bnhd(const ext_tensor *t, const char *name, const ext_tensor *q, const ext_tensor *like,
                      int writable, int device, ra_tensor *out) {
  if (t->ndim != 4) {
    PyErr_Format(PyExc_ValueError, "%s must have 4 dimensions (batch, seq, heads, head_dim), got %d", name,
                 t->ndim);
    return -1;
  }
  if (memcmp(t->shape, like->shape, 4 * sizeof(int64_t))) {
    PyErr_Format(PyExc_ValueError, "%s has shape (%lld, %lld, %lld, %lld) but %s has (%lld, %lld, %lld, %lld); they must match",
                 name, (long long)t->shape[0], (long long)t->shape[1], (long long)t->shape[2], (long long)t->shape[3],
                 like == q ? "q" : "k", (long long)like->shape[0], (long long)like->shape[1],
                 (long long)like->shape[2], (long long)like->shape[3]);
    return -1;
  }
  if (t->dtype != q->dtype) {
    PyErr_Format(PyExc_TypeError, "%s has dtype %s but q has %s; they must match", name, t->dtype->name,
                 q->dtype->name);
    return -1;
  }
  if (t->strides[3] != 1 || t->strides[0] < 0 || t->strides[1] < 0 || t->strides[2] < 0) {
    PyErr_Format(PyExc_ValueError,
                 "%s: the head dimension must be contiguous (stride 1) and the strides non-negative, "
                 "got strides (%lld, %lld, %lld, %lld)",
                 name, (long long)t->strides[0], (long long)t->strides[1], (long long)t->strides[2],
                 (long long)t->strides[3]);
    return -1;
  }
  if (check_memory(t, name, writable, device)) return -1;
  out->data = (void *)t->ptr;
  out->stride_b = t->strides[0];
  out->stride_n = t->strides[1];
  out->stride_h = t->strides[2];
  return 0;
}

/* lse: (b, h, n_local), C-contiguous, float32 (float64 for float64 inputs). */
static int check_lse(const ext_tensor *t, const ext_tensor *q, int writable, int device) {
  const ext_dtype *want = ext_dtype_of(q->dtype->dtype == RA_FLOAT64 ? RA_FLOAT64 : RA_FLOAT32);
  const int64_t b = q->shape[0], n = q->shape[1], h = q->shape[2];
  int64_t hn = -1;
  if (t->dtype != want) {
    PyErr_Format(PyExc_TypeError,
                 "lse must have dtype %s for %s inputs (the forward's return_lse=True result), got %s", want->name,
                 q->dtype->name, t->dtype->name);
    return -1;
  }
  const int ok = t->ndim == 3 && t->shape[0] == b && t->shape[1] == h && t->shape[2] == n &&
                 ra_mul_ok(h, n, &hn) && t->strides[2] == 1 && t->strides[1] == n && t->strides[0] == hn;
  if (!ok) {
    PyErr_Format(PyExc_ValueError, "lse must be a C-contiguous %s tensor of shape (%lld, %lld, %lld)", want->name,
                 (long long)b, (long long)h, (long long)n);
    return -1;
  }
  return check_memory(t, "lse", writable, device);
}

/* ------------------------------------------------------------ the call */

enum { Q, K, V, O, DOUT, DQ, DK, DV, NUM_SLOTS };
static const char *const slot_names[NUM_SLOTS] = {"q", "k", "v", "o", "dout", "dq", "dk", "dv"};

typedef struct call_args {
  int backward;
  PyObject *obj[NUM_SLOTS], *lse, *segs, *rates, *kernel, *deterministic, *stream, *comm;
  int device_type, causal, mode, world_size, num_threads, check_finite, device, partition;
  double scale;
} call_args;

/* k: q's batch, length and head dim, and key/value heads dividing q's. */
static int check_kv_heads(const ext_tensor *k, const ext_tensor *q) {
  if (k->ndim != 4) return 0; /* check_bnhd says so */
  const int64_t h = q->shape[2], hkv = k->shape[2];
  if (hkv < 1 || h % hkv != 0 || k->shape[0] != q->shape[0] || k->shape[1] != q->shape[1] ||
      k->shape[3] != q->shape[3]) {
    PyErr_Format(PyExc_ValueError,
                 "k has shape (%lld, %lld, %lld, %lld) but must be (%lld, %lld, h_kv, %lld) with h_kv dividing the "
                 "%lld heads of q (grouped-query attention)",
                 (long long)k->shape[0], (long long)k->shape[1], (long long)hkv, (long long)k->shape[3],
                 (long long)q->shape[0], (long long)q->shape[1], (long long)q->shape[3], (long long)h);
    return -1;
  }
  return 0;
}

/* The tensors of the call, checked, into p; the Tensors in use are listed
 * in used[] (count in *n_used) so that run() can mark them busy. */
static int fill_tensors(const call_args *a, ra_bwd_params *p, ext_tensor **used, int *n_used) {
  const ra_device_type dev = (ra_device_type)a->device_type;
  ra_tensor *slots[NUM_SLOTS] = {&p->fwd.q, &p->fwd.k, &p->fwd.v, &p->fwd.o, &p->dout, &p->dq, &p->dk, &p->dv};
  const int count = a->backward ? NUM_SLOTS : DOUT;
  ext_tensor *q = as_tensor(a->obj[Q], "q", dev);
  if (!q) return -1;
  if (q->ndim != 4) {
    PyErr_Format(PyExc_ValueError, "q must have 4 dimensions (batch, seq, heads, head_dim), got %d", q->ndim);
    return -1;
  }
  ext_tensor *k = NULL;
  for (int i = 0; i < count; i++) {
    ext_tensor *t = as_tensor(a->obj[i], slot_names[i], dev);
    if (!t) return -1;
    /* messages name the argument as the caller does: the Tensor's own name
     * (the Python layer's "out" for the forward's o), else run()'s keyword */
    const char *name = PyUnicode_Check(t->name) ? PyUnicode_AsUTF8(t->name) : NULL;
    if (!name) {
      PyErr_Clear();
      name = slot_names[i];
    }
    const int writable = i >= DQ || (i == O && !a->backward);
    if (i == K && check_kv_heads(t, q)) return -1;
    const ext_tensor *like = i == V || i == DK || i == DV ? k : i == K ? t : q;
    if (check_bnhd(t, name, q, like, writable, a->device, slots[i])) return -1;
    if (i == K) k = t;
    used[(*n_used)++] = t;
  }
  if (a->lse == Py_None) {
    if (a->backward) {
      PyErr_SetString(PyExc_ValueError, "lse: the backward needs the forward's lse");
      return -1;
    }
    return 0;
  }
  ext_tensor *lse = as_tensor(a->lse, "lse", dev);
  if (!lse || check_lse(lse, q, !a->backward, a->device)) return -1;
  used[(*n_used)++] = lse;
  p->fwd.lse = (void *)lse->ptr;
  p->fwd.lse_ld = q->shape[1];
  return 0;
}

/* Everything but the tensors: configuration and execution settings. */
static int fill_settings(const call_args *a, const ext_tensor *q, const ext_tensor *k, ext_comm *comm,
                         ra_bwd_params *p) {
  ra_fwd_params *f = &p->fwd;
  f->cfg.batch = q->shape[0];
  /* with comm, q is this rank's shard */
  const int ranks = comm ? ra_comm_size(comm->comm) : 1;
  if (!ra_mul_ok(q->shape[1], ranks, &f->cfg.seq_len)) {
    PyErr_Format(PyExc_ValueError, "q: %lld positions on each of %d ranks are more than this machine can address",
                 (long long)q->shape[1], ranks);
    return -1;
  }
  f->cfg.num_heads = q->shape[2];
  f->cfg.num_kv_heads = k->shape[2];
  f->cfg.head_dim = q->shape[3];
  f->cfg.dtype = q->dtype->dtype;
  /* with comm, the core checks that world_size is the communicator's size */
  if (read_config(&f->cfg, a->segs, a->rates, a->causal, a->mode, a->scale, a->world_size, a->partition)) return -1;
  f->device_type = (ra_device_type)a->device_type;
  f->comm = comm ? comm->comm : NULL;
  ra_exec *e = &f->exec; /* ra_exec_default() already: override what was given */
  if (a->num_threads > 0) e->num_threads = a->num_threads;
  e->check_finite = a->check_finite;
  if (a->kernel != Py_None) {
    const long k = PyLong_AsLong(a->kernel);
    if (k == -1 && PyErr_Occurred()) return -1;
    e->kernel = (ra_kernel)k;
  }
  if (a->deterministic != Py_None) {
    const int d = PyObject_IsTrue(a->deterministic);
    if (d < 0) return -1;
    e->deterministic = d;
  }
  e->device = a->device;
  uintptr_t stream = 0;
  if (a->stream != Py_None && ext_address(a->stream, "stream", &stream)) return -1;
  e->stream = (void *)stream;
  return 0;
}

static PyObject *stats_tuple(const ra_stats *s, int n) {
  PyObject *out = PyTuple_New(n);
  for (int i = 0; out && i < n; i++) {
    PyObject *item = Py_BuildValue("{sLsLsLsLsLsLsL}", "peak_bytes", (long long)s[i].peak_bytes, "bytes_sent",
                                   (long long)s[i].bytes_sent, "bytes_received", (long long)s[i].bytes_received,
                                   "steps", (long long)s[i].steps, "steps_skipped", (long long)s[i].steps_skipped,
                                   "ring_buffer_bytes", (long long)s[i].ring_buffer_bytes, "pairs",
                                   (long long)s[i].pairs);
    if (!item) {
      Py_CLEAR(out);
      break;
    }
    PyTuple_SET_ITEM(out, i, item);
  }
  return out;
}

/* Run the call with the GIL released.  The Tensors and the communicator are
 * marked busy meanwhile: release() / comm_close() from another thread
 * would otherwise free memory the kernels are using. */
static ra_status call_core(const ra_bwd_params *p, int backward, ext_tensor **used, int n_used, ext_comm *comm) {
  ra_status st;
  for (int i = 0; i < n_used; i++) used[i]->busy++;
  if (comm) comm->busy++;
  Py_BEGIN_ALLOW_THREADS
  st = backward ? ra_backward(p) : ra_forward(&p->fwd);
  Py_END_ALLOW_THREADS
  for (int i = 0; i < n_used; i++) used[i]->busy--;
  if (comm) comm->busy--;
  return st;
}

/* The number of ranks run here, once the configuration is known to be valid
 * (so that world_size can size the statistics). */
static int ranks_here(const ra_bwd_params *p) {
  if (p->fwd.comm) return 1;
  const ra_plan *plan; /* from the core's plan cache: the call below takes the same one */
  ra_status st = ra_plan_acquire(&p->fwd.cfg, &plan);
  if (st != RA_OK) {
    ext_raise_status(st);
    return -1;
  }
  ra_plan_release(plan);
  return p->fwd.cfg.world_size;
}

/* The call once its arguments are parsed. */
static PyObject *run_parsed(const call_args *a) {
  if (a->device_type != RA_DEVICE_CPU && a->device_type != RA_DEVICE_CUDA)
    return PyErr_Format(PyExc_ValueError, "device_type must be DEVICE_CPU (0) or DEVICE_CUDA (1), got %d",
                        a->device_type);
  ext_comm *comm = NULL;
  if (a->comm != Py_None && !(comm = ext_comm_get(a->comm))) return NULL;

  ra_bwd_params p;
  ra_bwd_params_init(&p); /* the environment's defaults first */
  ext_tensor *used[NUM_SLOTS + 1];
  int n_used = 0, ranks = 0;
  ra_stats *stats = NULL;
  if (fill_tensors(a, &p, used, &n_used) || fill_settings(a, used[0], used[1], comm, &p) || (ranks = ranks_here(&p)) < 0 ||
      !(stats = PyMem_Calloc((size_t)ranks, sizeof *stats))) {
    if (!PyErr_Occurred()) PyErr_NoMemory();
    if (comm) ext_comm_refuse(comm, a->backward ? RA_OP_BACKWARD : RA_OP_FORWARD); /* the peers raise too */
    return NULL;
  }
  p.fwd.stats = stats;
  ra_status st = call_core(&p, a->backward, used, n_used, comm);
  PyObject *out = st == RA_OK ? stats_tuple(stats, ranks) : ext_raise_status(st);
  PyMem_Free(stats);
  return out;
}

static PyObject *py_run(PyObject *self, PyObject *args, PyObject *kw) {
  (void)self;
  static char *names[] = {"backward", "q", "k", "v", "o", "lse", "device_type", "segment_lengths",
                          "dilation_rates", "causal", "mode", "scale", "world_size", "dout", "dq", "dk", "dv",
                          "num_threads", "check_finite", "kernel", "deterministic", "device", "stream", "comm",
                          "partition", NULL};
  if (PyTuple_GET_SIZE(args)) return PyErr_Format(PyExc_TypeError, "run() takes keyword arguments only");
  call_args a;
  memset(&a, 0, sizeof a);
  a.obj[DOUT] = a.obj[DQ] = a.obj[DK] = a.obj[DV] = Py_None;
  a.kernel = a.deterministic = a.stream = a.comm = Py_None; /* stream None is 0, the legacy default */
  a.device = -1;
  if (!PyArg_ParseTupleAndKeywords(args, kw, "pOOOOOiOOpidi|OOOOipOOiOOi:run", names, &a.backward, &a.obj[Q],
                                   &a.obj[K], &a.obj[V], &a.obj[O], &a.lse, &a.device_type, &a.segs, &a.rates,
                                   &a.causal, &a.mode, &a.scale, &a.world_size, &a.obj[DOUT], &a.obj[DQ],
                                   &a.obj[DK], &a.obj[DV], &a.num_threads, &a.check_finite, &a.kernel,
                                   &a.deterministic, &a.device, &a.stream, &a.comm, &a.partition))
    return NULL;
  return run_parsed(&a);
}

PyMethodDef ext_call_methods[] = {
    {"plan", (PyCFunction)(void (*)(void))py_plan, METH_VARARGS | METH_KEYWORDS,
     "plan(batch, seq_len, num_heads, head_dim, segment_lengths, dilation_rates, causal, mode,\n"
     "     scale, world_size, num_kv_heads=0, partition=0) -> {'local_len', 'chunk_len', 'num_kv_heads',\n"
     "     'scale', 'branches': [{segment, rate, span,\n"
     "     head_begin, head_end}]}: validate a configuration and return its schedule."},
    {"run", (PyCFunction)(void (*)(void))py_run, METH_VARARGS | METH_KEYWORDS,
     "run(*, backward, q, k, v, o, lse, dout=None, dq=None, dk=None, dv=None, device_type,\n"
     "    segment_lengths, dilation_rates, causal, mode, scale, world_size, num_threads=0,\n"
     "    check_finite=False, kernel=None, deterministic=None, device=-1, stream=0, comm=None,\n"
     "    partition=0)\n"
     "    -> tuple of per-rank stats dicts\n\n"
     "The forward (o, lse written) or the backward (dq, dk, dv written) on Tensors from intake(),\n"
     "over world_size ranks in this process or, with comm, as this rank of a communicator\n"
     "(the tensors are then this rank's shards).  The GIL is released while the kernels run."},
    {NULL, NULL, 0, NULL}};
