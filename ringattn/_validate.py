"""Argument checking and conversion for the public API.

Every rule produces a TypeError or ValueError whose message starts with the
argument's name.  The C core checks the configuration rules again (and its
messages use the same names), so nothing that passes here can crash it.
"""

import math
import numbers

import numpy as np

_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.float64))  # float64: the CPU only
MODES = {"groups": 0, "longnet": 1}
NAN_POLICIES = ("raise", "propagate")


def array(x, name):
    """A (b, n, h, d) float32/float16/float64 array the core can read in place.

    Arrays whose head dimension is not contiguous (or that have negative or
    misaligned strides) are copied once; everything else is used as is.
    """
    if not isinstance(x, np.ndarray):
        if not hasattr(x, "__array__") and not isinstance(x, (list, tuple)):
            raise TypeError(f"{name} must be a NumPy array, got {type(x).__name__}")
        x = np.asarray(x)
    if x.dtype.kind == "f" and not x.dtype.isnative:
        x = x.astype(x.dtype.newbyteorder("="))  # same numbers, native byte order
    if x.dtype not in _DTYPES:
        hint = " (convert with .astype(np.float32))" if x.dtype.kind in "fiub" else ""
        raise TypeError(f"{name} must have dtype float32, float16 or float64, got {x.dtype}{hint}")
    if x.ndim != 4:
        raise ValueError(f"{name} must have 4 dimensions (batch, seq, heads, head_dim), got shape {x.shape}")
    if 0 in x.shape:
        raise ValueError(f"{name} must not be empty, got shape {x.shape}")
    es = x.itemsize
    s = x.strides
    if (s[3] != es or any(st < 0 or st % es for st in s[:3])
            or x.ctypes.data % es):
        x = np.array(x, order="C", copy=True)  # a fresh, aligned copy
    return x


def qkv(q, k, v):
    q = array(q, "q")
    k = array(k, "k")
    v = array(v, "v")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; they must match")
        if t.shape != q.shape:
            raise ValueError(f"{name} has shape {t.shape} but q has {q.shape}; they must match")
    if k.strides[1:3] != v.strides[1:3]:  # the core reads k and v with one index table
        k, v = np.ascontiguousarray(k), np.ascontiguousarray(v)
    return q, k, v


def int_list(values, name):
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
    if value not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {value!r}")
    return MODES[value]


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
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def num_threads(value):
    return 0 if value is None else positive_int(value, "num_threads")


def nan_policy(value):
    if value not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {value!r}")
    return value == "raise"


def out_array(out, q):
    if out is None:
        return np.empty_like(q, order="C")
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a NumPy array, got {type(out).__name__}")
    if out.dtype != q.dtype or out.shape != q.shape:
        raise ValueError(f"out must have shape {q.shape} and dtype {q.dtype}, got {out.shape} {out.dtype}")
    if not out.flags.writeable:
        raise ValueError("out is not writeable")
    es = out.itemsize
    if out.strides[3] != es or any(st < 0 or st % es for st in out.strides[:3]) or out.ctypes.data % es:
        raise ValueError("out must have a contiguous head dimension and non-negative strides")
    return out


def like(x, q, name):
    """A tensor that must match q's shape and dtype (o, dout in the backward)."""
    x = array(x, name)
    if x.dtype != q.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but q has {q.dtype}; they must match")
    if x.shape != q.shape:
        raise ValueError(f"{name} has shape {x.shape} but q has {q.shape}; they must match")
    return x


def lse_dtype(dtype):
    """The log-sum-exp's dtype for inputs of `dtype`: float64 for float64
    (computed in double throughout), float32 otherwise."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def lse(x, shape, dtype):
    """The forward's log-sum-exp for inputs of `dtype`: (b, h, n) of
    lse_dtype(dtype), made C-contiguous."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"lse must be a NumPy array from return_lse=True, got {type(x).__name__}")
    want = lse_dtype(dtype)
    if x.dtype != want:
        raise TypeError(f"lse must have dtype {want} for {np.dtype(dtype)} inputs, got {x.dtype}")
    if x.shape != tuple(shape):
        raise ValueError(f"lse must have shape {tuple(shape)} (batch, heads, seq), got {x.shape}")
    return np.ascontiguousarray(x)
