"""Every rule on the arguments, once, for the CPU and the GPU alike.

Each rule raises a TypeError or ValueError whose message starts with the
argument's name.  Configuration rules read Python values; tensor rules read
the ``_ext.Tensor`` descriptions that ``_ext.intake`` makes of the arrays.
The plan's own rules (divisibility, branch limits, head counts) live in the
C core.  A CPU call leaves the tensor rules and the plan's to ``_ext.run``
(ext/call.c), which applies each once with the same messages; a GPU call
applies them here (``arguments``, ``plan_rules``) before anything is copied
to or allocated on the device, and ``_ext.run`` checks again what protects
memory.
"""

import math
import numbers
import os
import sys
from typing import NamedTuple

import numpy as np

from . import _arrays, _ext

MODES = {"groups": 0, "longnet": 1}
PARTITIONS = {"contiguous": 0, "zigzag": 1}
NAN_POLICIES = ("raise", "propagate")


# ------------------------------------------------------------ configuration

class Config(NamedTuple):
    """A checked configuration: what every call hands the core."""
    segment_lengths: list
    dilation_rates: list
    causal: bool
    mode: int            # MODES value
    scale: float         # 0.0: 1/sqrt(head_dim)
    world_size: int      # in-process ranks (a communicator's size with comm=)
    check_finite: bool   # nan_policy == "raise"
    num_threads: int     # 0: the default
    partition: int = 0   # PARTITIONS value


def config(segment_lengths, dilation_rates, causal=False, mode_="groups", scale_=None, world_size=1,
           nan_policy_="raise", num_threads_=None, partition_="contiguous"):
    segs, rates = branches(segment_lengths, dilation_rates)
    return Config(segs, rates, bool(causal), mode(mode_), scale(scale_), positive_int(world_size, "world_size"),
                  nan_policy(nan_policy_), num_threads(num_threads_), partition(partition_))


def int_list(values, name):
    if type(values) in (list, tuple) and values and all(type(x) is int and x >= 1 for x in values):
        return list(values)  # the common case, without the checks below
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise TypeError(f"{name} must be a sequence of integers, got {type(values).__name__}")
    out = []
    for i, x in enumerate(values):
        if isinstance(x, bool) or not isinstance(x, numbers.Integral):
            raise TypeError(f"{name}[{i}] must be an integer, got {x!r}")
        if x < 1:
            raise ValueError(f"{name}[{i}] must be >= 1, got {x}")
        out.append(int(x))
    if not out:
        raise ValueError(f"{name} must not be empty")
    return out


def branches(segment_lengths, dilation_rates):
    segs = int_list(segment_lengths, "segment_lengths")
    rates = int_list(dilation_rates, "dilation_rates")
    if len(segs) != len(rates):
        raise ValueError(f"dilation_rates has {len(rates)} values but segment_lengths has {len(segs)}; "
                         "they must have the same length")
    return segs, rates


def mode(value):
    if not isinstance(value, str) or value not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {value!r}")
    return MODES[value]


def partition(value):
    """Which positions each rank holds: "contiguous" (rank j: [j*L, (j+1)*L))
    or "zigzag" (rank j: chunks j and 2k-1-j of n/(2k) positions)."""
    if not isinstance(value, str) or value not in PARTITIONS:
        raise ValueError(f"partition must be one of {sorted(PARTITIONS)}, got {value!r}")
    return PARTITIONS[value]


def scale(value):
    """The softmax scale; 0.0 tells the core to use 1/sqrt(head_dim)."""
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value == 0.0:
        raise ValueError(f"scale must be finite and nonzero, got {value}")
    return value


def positive_int(value, name):
    if type(value) is int and value >= 1:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


CORES = os.cpu_count() or 1  # read once: os.cpu_count() reads /sys on every call


def max_threads():
    """The most CPU threads a call may use: 4 x the cores (os.cpu_count()).
    The core clamps to the same bound (csrc/core/settings.c)."""
    return 4 * CORES


def num_threads(value):
    """num_threads= and set_num_threads: None (the default) or 1 to
    max_threads(); more would only oversubscribe the cores, and thousands of
    threads can fail to start under a memory limit."""
    if value is None:
        return 0
    n = positive_int(value, "num_threads")
    if n > max_threads():
        raise ValueError(f"num_threads must be at most {max_threads()} (4 x the {CORES} cores of "
                         f"this machine), got {n}")
    return n


def nan_policy(value):
    if not isinstance(value, str) or value not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {value!r}")
    return value == "raise"


# The core's working sizes (accumulators, ring blocks with their dK/dV in
# double, task lists) are at most 128 bytes per element of a (b, n, h, d)
# tensor; csrc/core/plan.c refuses shapes for which that does not fit.
BYTES_PER_ELEMENT_BOUND = 128
MAX_ELEMENTS = min(2**63 - 1, sys.maxsize) // BYTES_PER_ELEMENT_BOUND


def addressable(shape, name="q"):
    """A (b, n, h, d) shape whose sizes this machine can address at all: its
    elements times the core's 128-byte bound fit a signed 64-bit size (and
    Py_ssize_t), the plan's own limit.  ValueError before anything is
    allocated; shapes below the bound that do not fit in memory raise
    MemoryError where they are allocated."""
    elements = math.prod(int(x) for x in shape)
    if elements > MAX_ELEMENTS:
        raise ValueError(f"{name}: shape {tuple(shape)} holds {elements} elements, more than this machine can "
                         f"address (at most {MAX_ELEMENTS})")


def plan_rules(cfg, shape, ranks=1, num_kv_heads=0):
    """The core's plan rules for inputs of `shape` (this rank's shard when
    `ranks` processes hold one each) with num_kv_heads key/value heads (0:
    as many as q): ValueError/TypeError naming the argument, before anything
    is allocated or a GPU is looked for."""
    b, n, h, d = shape
    addressable((b, n * ranks, h, d))
    _ext.plan(b, n * ranks, h, d, cfg.segment_lengths, cfg.dilation_rates, cfg.causal, cfg.mode, cfg.scale,
              cfg.world_size, num_kv_heads, cfg.partition)


def lse_dtype(dtype):
    """The log-sum-exp's dtype for inputs of `dtype` (a name): float64 for
    float64 (computed in double throughout), float32 otherwise."""
    return "float64" if dtype == "float64" else "float32"


# ------------------------------------------------------------------ placement

def placement(tensors, inputs, device, backend=None):
    """Where a call runs, from where its arguments are: "cpu", "cuda" (device
    arrays in, device arrays out) or "host" (host arrays with device='cuda':
    copied to the GPU and back).  tensors: name -> Tensor; inputs: the names
    that are inputs (the others are outputs given by the caller); device:
    parse_device's value; backend: a communicator's, or None."""
    on_cpu = backend in ("mpi", "gloo")
    if backend is not None and device is not None and device[0] != ("cpu" if on_cpu else "cuda"):
        raise ValueError(f"device is {device[0]!r} but the {backend.upper()} communicator runs on the "
                         f"{'CPU' if on_cpu else 'GPU'}")
    if on_cpu:
        for name, t in tensors.items():
            if t.kind == "cuda":
                raise TypeError(f"{name} is a CUDA array but the {backend.upper()} communicator runs on the CPU; "
                                "pass NumPy arrays, or use Communicator.nccl() for GPU arrays")
        return "cpu"
    if backend == "nccl":
        for name, t in tensors.items():
            if t.kind != "cuda":
                raise TypeError(f"{name}: an NCCL communicator runs on the GPU and takes CUDA arrays "
                                f"(torch/CuPy tensors, DeviceArray), got {_arrays.what(t)}")
        return "cuda"
    cuda = [n for n, t in tensors.items() if t.kind == "cuda"]
    if device is not None and device[0] == "cpu":
        if cuda:
            raise ValueError(f"device='cpu' but {cuda[0]} is a CUDA array; copy it to the host first "
                             "or leave device=None")
        return "cpu"
    if device is None and not cuda:
        return "cpu"
    host = [n for n in inputs if tensors[n].kind != "cuda"]
    if host and len(host) < len(inputs):
        gpu = next(n for n in inputs if tensors[n].kind == "cuda")
        raise ValueError(f"{host[0]} is {_arrays.what(tensors[host[0]])} but {gpu} is "
                         f"{_arrays.what(tensors[gpu])}; pass {', '.join(inputs)} on one device")
    if host:
        if device is None:
            out = cuda[0]
            raise ValueError(f"{', '.join(inputs)} are host arrays but {out} is {_arrays.what(tensors[out])}; "
                             "pass device='cuda' to run on the GPU")
        return "host"
    for name, t in tensors.items():
        if t.kind != "cuda":
            raise ValueError(f"{name} is {_arrays.what(t)} but {inputs[0]} is {_arrays.what(tensors[inputs[0]])}; "
                             f"{name} must be a CUDA array on the device of {inputs[0]}")
    return "cuda"


def one_device(tensors, requested=()):
    """The CUDA ordinal shared by every CUDA tensor whose device is known and
    the requested ones ((label, ordinal) pairs, e.g. ("the requested device",
    1)), or None when none is known."""
    known = [(label, d) for label, d in requested if d is not None]
    known += [(n, t.device) for n, t in tensors.items() if t.kind == "cuda" and t.device >= 0]
    for name, dev in known[1:]:
        if dev != known[0][1]:
            raise ValueError(f"{name} is on cuda:{dev} but {known[0][0]} is on cuda:{known[0][1]}; "
                             "all arrays must be on one CUDA device")
    return known[0][1] if known else None


def device_memory(tensors):
    """Every CUDA tensor points at device (or managed) memory; needs a GPU."""
    for name, t in tensors.items():
        if t.kind == "cuda" and t.source != "cai":  # intake checked CAI pointers already
            kind, _ = _ext.pointer_info(t.ptr)
            if kind not in ("device", "managed"):
                raise ValueError(f"{name}: its data pointer {t.ptr:#x} is {kind} memory, not CUDA device memory")


# ---------------------------------------------------------------- tensors

def _dtype(t, on):
    allowed = _arrays.CPU_DTYPES if on == "cpu" else _arrays.GPU_DTYPES
    if t.dtype not in allowed:
        where = "on the CPU" if on == "cpu" else "on the GPU"
        raise TypeError(f"{t.name} must have dtype {', '.join(allowed[:-1])} or {allowed[-1]} {where}, "
                        f"got {t.dtype}")


def _shape(t):
    if len(t.shape) != 4:
        raise ValueError(f"{t.name} must have 4 dimensions (batch, seq, heads, head_dim), got shape {t.shape}")
    if 0 in t.shape:
        raise ValueError(f"{t.name} must not be empty, got shape {t.shape}")
    addressable(t.shape, t.name)


def like_q(t, q):
    if t.dtype != q.dtype:
        raise TypeError(f"{t.name} has dtype {t.dtype} but {q.name} has {q.dtype}; they must match")
    if t.shape != q.shape:
        raise ValueError(f"{t.name} has shape {t.shape} but {q.name} has {q.shape}; they must match")


def kv_shape(k, q):
    """k of a grouped-query call: q's batch, length and head dim, with h_kv
    heads dividing q's h (h_kv = h: multi-head, 1: multi-query)."""
    if k.dtype != q.dtype:
        raise TypeError(f"{k.name} has dtype {k.dtype} but {q.name} has {q.dtype}; they must match")
    b, n, h, d = q.shape
    if len(k.shape) != 4 or (k.shape[0], k.shape[1], k.shape[3]) != (b, n, d) or h % k.shape[2]:
        raise ValueError(f"{k.name} has shape {k.shape} but must be ({b}, {n}, h_kv, {d}) with h_kv dividing the "
                         f"{h} heads of {q.name} (grouped-query attention), given {q.name} of shape {q.shape}")


def layout_problem(t, contiguous=False):
    """What keeps the core from reading t in place, or None: the head
    dimension contiguous, strides non-negative (C-contiguous when
    `contiguous`), the pointer aligned to the element and not null."""
    st = t.strides
    if contiguous:
        if st != _arrays.contiguous_strides(t.shape):
            return f"{t.name} must be C-contiguous, got strides {st} (elements)"
    elif st[-1] != 1 or any(s < 0 for s in st):
        return (f"{t.name} must have a contiguous head dimension (last axis) and non-negative strides, "
                f"got strides {st} (elements)")
    if t.ptr % t.itemsize:
        return f"{t.name}: the data pointer {t.ptr:#x} is not aligned to its {t.itemsize}-byte elements"
    if t.ptr == 0:
        return f"{t.name}: null data pointer"
    return None


def writable(t):
    if t.readonly:
        raise ValueError(f"{t.name} is read-only")


def lse(t, q, ranks_shape):
    """The forward's log-sum-exp: (b, h, n) of lse_dtype(q.dtype)."""
    want = lse_dtype(q.dtype)
    if t.dtype != want:
        raise TypeError(f"{t.name} must have dtype {want} for {q.dtype} inputs (the forward's return_lse=True "
                        f"result), got {t.dtype}")
    if t.shape != ranks_shape:
        raise ValueError(f"{t.name} must have shape {ranks_shape} (batch, heads, seq), got {t.shape}")


def query_shape(q):
    """q's shape is a (b, n, h, d) the outputs can be allocated from."""
    _shape(q)


def host_copies(tensors, inputs):
    """A CPU call's host inputs whose layout the core cannot read: copied
    once (every other rule is _ext.run's)."""
    return [name for name in inputs if not tensors[name].in_place]


def arguments(tensors, inputs, outputs, on, host_copied=False):
    """The tensor rules for one call.  tensors: name -> Tensor; inputs: the
    input names, q first (q, k, v[, o, lse, dout]); outputs: the names of
    outputs given by the caller (out[, lse]); on: "cpu" or "cuda" (the device
    that computes).  Returns the names of host inputs whose layout the core
    cannot read, to be copied once (NumPy on the CPU); any other layout
    problem raises ValueError.  host_copied: host arrays are copied to the
    GPU (device="cuda"), so their layout does not matter."""
    for name in inputs + outputs:
        if name != "lse":
            _dtype(tensors[name], on)
            _shape(tensors[name])
    q = tensors[inputs[0]]
    k = tensors[inputs[1]]
    kv_shape(k, q)
    for name in inputs[2:] + outputs:
        if name != "lse":
            like_q(tensors[name], k if name in ("v", "dk", "dv") else q)
    if "lse" in tensors:
        b, n, h, _ = q.shape
        lse(tensors["lse"], q, (b, h, n))
    for name in outputs:
        writable(tensors[name])
    copies = []
    for name in inputs + outputs:
        t = tensors[name]
        if host_copied and t.kind == "cpu":
            continue
        problem = layout_problem(t, contiguous=(name == "lse"))
        if problem is None:
            continue
        if t.kind == "cpu" and name in inputs:
            copies.append(name)  # a fresh, aligned copy
        else:
            raise ValueError(problem)
    return copies


# ----------------------------------------------------------------- aliasing

# The exact test of np.shares_memory solves a small integer program; layouts
# for which it gives up within this much work count as overlapping.
_OVERLAP_WORK = 1 << 20
_TOO_HARD = getattr(np, "exceptions", np).TooHardError


class _Ghost:
    """A Tensor's memory layout as a NumPy array that is never read: the
    same address, shape and byte strides, with opaque elements of its
    itemsize.  np.shares_memory only does arithmetic on those, so it serves
    host and device arrays alike."""

    def __init__(self, t):
        self.__array_interface__ = {
            "data": (t.ptr, False), "shape": tuple(t.shape), "typestr": f"|V{t.itemsize}",
            "strides": tuple(s * t.itemsize for s in t.strides), "version": 3}


def _ghost(t):
    return np.asarray(_Ghost(t))


def _same_memory_space(a, b):
    """Could a and b address the same bytes? Host and device memory never do,
    nor do two known, different CUDA devices."""
    if a.kind != b.kind:
        return False
    return a.kind != "cuda" or a.device < 0 or b.device < 0 or a.device == b.device


def _overlap(a, b):
    if 0 in a.shape or 0 in b.shape or not _same_memory_space(a, b):
        return False
    try:
        return bool(np.shares_memory(_ghost(a), _ghost(b), max_work=_OVERLAP_WORK))
    except _TOO_HARD:
        return True


def _overlaps_itself(t):
    """Do two elements of t share memory (a broadcast or otherwise
    self-overlapping view)?  Axes of size > 1 sorted by stride must each step
    past the whole extent of the ones before; anything else counts as
    overlapping."""
    axes = sorted((abs(s), n) for s, n in zip(t.strides, t.shape) if n > 1)
    extent = 1  # elements spanned by the axes so far
    for stride, size in axes:
        if stride < extent:
            return True
        extent = stride * (size - 1) + extent
    return False


def _exactly(a, b):
    return (a.kind == b.kind and a.device == b.device and a.ptr == b.ptr and a.dtype == b.dtype
            and tuple(a.shape) == tuple(b.shape) and tuple(a.strides) == tuple(b.strides))


def no_overlap(tensors, inputs, outputs, in_place=True):
    """Outputs given by the caller must not share memory with an input, with
    another output or with themselves: a ring writes a rank's rows while
    other ranks still read theirs, so any partial overlap gives wrong
    results.  The one exception is an output that is exactly the first input
    (out=q: same address, shape, strides and dtype), which each rank reads
    in full before writing it -- unless in_place is False (a call whose
    inputs are kept for a backward).  tensors: name -> Tensor (host or
    device: the pointer ranges come from ptr, shape and strides)."""
    for i, name in enumerate(outputs):
        t = tensors[name]
        if _overlaps_itself(t):
            raise ValueError(f"{name}: its elements overlap one another (strides {tuple(t.strides)} for shape "
                             f"{tuple(t.shape)}, e.g. a broadcast view); pass a writable array with distinct elements")
        for other in list(inputs) + list(outputs[:i]):
            u = tensors[other]
            if other == inputs[0] and _exactly(t, u):
                if not in_place:
                    raise ValueError(f"{name} is {other}, which backward() needs: an in-place call cannot be "
                                     f"differentiated (pass another {name}=, or none)")
                continue  # in place: out is q
            if _overlap(t, u):
                hint = (f" (only exactly {inputs[0]} may be passed as {name}, for an in-place call)"
                        if other in inputs else "")
                raise ValueError(f"{name} overlaps {other} in memory; {name} must not share memory with "
                                 f"{'an input' if other in inputs else 'another output'}{hint}")


def copy_for_core(t):
    """A fresh C-contiguous copy of a host Tensor's array."""
    return np.array(_arrays.host_array(t), order="C", copy=True)
