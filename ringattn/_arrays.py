"""Array protocols as ringattn sees them.

Nothing here imports torch or CuPy, and nothing parses a protocol by hand:
``_ext.intake`` (C) reads NumPy arrays, ``__cuda_array_interface__`` (CAI,
versions 0 to 3) and DLPack (versioned and legacy capsules) into one
``_ext.Tensor`` description each.  This module decides what to hand it:

- ``classify(obj)``: "cpu", "cuda" or "other" (a DLPack array on another
  device), without consuming anything.
- ``describe(obj, name, stream)`` / ``describe_all(objs)``: the intake of one
  or several arguments.  CAI v3 arguments may name the stream their data is
  ready on; the first one named is the stream the call runs on, arguments on
  other streams are synchronized first (``choose_stream``), and DLPack
  producers on a CUDA device are asked for their data on that stream (1, the
  legacy default stream, when no CAI argument named one).  An object that
  offers DLPack is read through DLPack even when it also has CAI.
- ``parse_device(device)``: the ``device=`` argument (where a call runs
  follows from it and the Tensors: ``_validate.placement``).
- dtype names, the bfloat16 bit helpers, and the conversions of host arrays
  for ``device="cuda"`` (copied in as the device dtype, copied back in the
  caller's representation).

bfloat16: CAI has no standard typestr for it; ringattn accepts ``'<V2'`` when
``descr`` or the object's ``dtype`` names ``bfloat16`` (what ``DeviceArray``
exports); other producers should use DLPack (PyTorch exports bfloat16 only
that way).  On the host, ``ml_dtypes.bfloat16`` NumPy arrays are bfloat16.
"""

import numbers

import numpy as np

from . import _ext

KDL_CPU, KDL_CUDA, KDL_CUDA_HOST, KDL_CUDA_MANAGED = 1, 2, 3, 13
_DLPACK_CUDA = (KDL_CUDA, KDL_CUDA_MANAGED)
_DLPACK_HOST = (KDL_CPU, KDL_CUDA_HOST)
LEGACY_STREAM = 1

GPU_DTYPES = ("float32", "float16", "bfloat16")
CPU_DTYPES = ("float32", "float16", "bfloat16", "float64")
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


# ------------------------------------------------------------ classification

def dlpack_device(obj):
    """(device_type, device_id) from obj.__dlpack_device__(), or None (also
    for NumPy arrays, which ringattn reads as NumPy)."""
    if isinstance(obj, (np.ndarray, np.generic)):
        return None
    fn = getattr(obj, "__dlpack_device__", None)
    if fn is None or not hasattr(obj, "__dlpack__"):
        return None
    try:
        dev = fn()
        return int(dev[0]), int(dev[1])
    except Exception:  # noqa: BLE001 - a broken producer: intake reports it
        return None


def has_cai(obj):
    """True when obj exposes __cuda_array_interface__ (a property that raises
    counts as absent: torch raises it for CPU tensors)."""
    try:
        return getattr(obj, "__cuda_array_interface__", None) is not None
    except Exception:  # noqa: BLE001
        return False


def classify(obj):
    """'cuda' for a CUDA array (DLPack on a CUDA device, or CAI), 'cpu' for a
    host array (NumPy, DLPack on the CPU, anything else intake may convert),
    'other' for DLPack arrays on other devices."""
    if isinstance(obj, (np.ndarray, np.generic)):
        return "cpu"
    dev = dlpack_device(obj)
    if dev is not None:
        if dev[0] in _DLPACK_CUDA:
            return "cuda"
        return "cpu" if dev[0] in _DLPACK_HOST else "other"
    return "cuda" if has_cai(obj) else "cpu"


def what(t):
    """A Tensor in words, for messages: 'a host array (ndarray)', 'a CUDA array (cuda:0)'."""
    if t.kind == "cuda":
        return f"a CUDA array (cuda:{t.device})" if t.device >= 0 else "a CUDA array"
    return f"a host array ({type(t.obj).__name__})"


# ------------------------------------------------------------------- device=

_DEVICE_FORMS = "None, 'cpu', 'cuda', 'cuda:N' or an int"


def parse_device(device):
    """None, ('cpu', None) or ('cuda', ordinal or None)."""
    if device is None:
        return None
    if isinstance(device, bool):
        raise TypeError(f"device must be {_DEVICE_FORMS}, got {device!r}")
    if isinstance(device, (int, np.integer)):
        if device < 0:
            raise ValueError(f"device must be a non-negative CUDA ordinal, got {device}")
        return ("cuda", int(device))
    if isinstance(device, str):
        text = device.strip().lower()
        if text == "cpu":
            return ("cpu", None)
        if text in ("cuda", "gpu"):
            return ("cuda", None)
        if text.startswith("cuda:") and text[5:].isdigit():
            return ("cuda", int(text[5:]))
        raise ValueError(f"device must be {_DEVICE_FORMS}, got {device!r}")
    if type(device).__name__ == "device":  # torch.device and the like: their string form
        return parse_device(str(device))
    raise TypeError(f"device must be {_DEVICE_FORMS}, got {device!r}")


def require_gpu():
    """Raise RuntimeError unless this build has CUDA and a device is visible."""
    if not _ext.have()["cuda"]:
        raise RuntimeError("ringattn was built without CUDA: rebuild with nvcc available "
                           "(meson setup -Dcuda=enabled) to run on GPU arrays")
    if _ext.cuda_device_count() < 1:
        raise RuntimeError("no CUDA device is visible (ringattn.cuda_device_count() == 0)")


# -------------------------------------------------------------------- intake

def host_input(obj):
    """An input as intake should see it: lists, scalars and objects with
    __array__ (but neither DLPack nor CAI) become NumPy arrays, and NumPy
    floats in non-native byte order are converted (same numbers).  Anything
    else is returned as is; intake names what it cannot read."""
    if not isinstance(obj, np.ndarray):
        if dlpack_device(obj) is not None or has_cai(obj):
            return obj
        if not (isinstance(obj, (list, tuple, np.generic)) or hasattr(obj, "__array__")):
            return obj
        obj = np.asarray(obj)
    if obj.dtype.kind == "f" and not obj.dtype.isnative:
        obj = obj.astype(obj.dtype.newbyteorder("="))
    return obj


def describe(obj, name, stream=None):
    """_ext.intake(obj, name, stream): a Tensor.  `stream` is handed only to
    DLPack producers on a CUDA device (a CPU producer gets None)."""
    if stream is not None:
        dev = dlpack_device(obj)
        if dev is None or dev[0] not in _DLPACK_CUDA:
            stream = None
    return _ext.intake(obj, name, stream)


def release_all(tensors):
    for t in tensors.values():
        t.release()


def describe_all(objs):
    """Tensors for objs (name -> object), in objs' order.  NumPy and CAI
    arguments are read first, since they may name a stream; DLPack producers
    are then asked for their data on it.  On failure every Tensor made so far
    is released."""
    if all(type(obj) is np.ndarray and obj.dtype.isnative for obj in objs.values()):
        return describe_numpy(objs)  # the common case: nothing offers a stream
    tensors = {}
    try:
        later = []
        for name, obj in objs.items():
            if dlpack_device(obj) is not None:
                later.append(name)
            else:
                tensors[name] = describe(obj, name)
        stream, _ = choose_stream(tensors.values())
        for name in later:
            tensors[name] = describe(objs[name], name, stream)
    except BaseException:
        release_all(tensors)
        raise
    return {name: tensors[name] for name in objs}


def describe_numpy(objs):
    """describe_all for NumPy arrays only."""
    tensors = {}
    try:
        for name, obj in objs.items():
            tensors[name] = _ext.intake(obj, name)
    except BaseException:
        release_all(tensors)
        raise
    return tensors


def choose_stream(tensors):
    """The CAI stream to run on (None: any) and the other streams named,
    which the call synchronizes before it starts."""
    streams = []
    for t in tensors:
        if t.stream is not None and t.stream not in streams:
            streams.append(t.stream)
    if not streams:
        return None, []
    return streams[0], streams[1:]


# -------------------------------------------------------------------- dtypes

def _is_bf16(dt):
    """True for a NumPy dtype that is bfloat16 (ml_dtypes' bfloat16)."""
    return dt.itemsize == 2 and dt.kind == "V" and "bfloat16" in dt.name


def dtype_name(x, allowed=GPU_DTYPES):
    """'float32' / 'float16' / 'bfloat16' / 'float64' for a dtype-like, if
    it is among `allowed`, else None."""
    name = None
    if isinstance(x, str) and x in ("bfloat16", "bf16"):
        name = "bfloat16"
    else:
        try:
            dt = np.dtype(x)
        except TypeError:
            return None
        if _is_bf16(dt):
            name = "bfloat16"
        elif dt in (np.float32, np.float16, np.float64):
            name = dt.name
    return name if name in allowed else None


def host_dtype(name, like=None):
    """The NumPy dtype of a host array of dtype `name`: the dtype of `like`
    (a host Tensor's NumPy array) when it is one, else NumPy's; bfloat16
    is ml_dtypes' (TypeError when ml_dtypes is not installed)."""
    if like is not None and isinstance(like.obj, np.ndarray):
        return like.obj.dtype
    if name != "bfloat16":
        return np.dtype(name)
    try:
        import ml_dtypes
    except ImportError:
        raise TypeError("a bfloat16 result on the host is a NumPy array of ml_dtypes.bfloat16: pip install "
                        "ml_dtypes, or pass out= (ringattn.torch does)") from None
    return np.dtype(ml_dtypes.bfloat16)


def int_tuple(values, what):
    """A tuple of Python ints (TypeError naming `what` otherwise)."""
    try:
        values = tuple(values)
    except TypeError:
        raise TypeError(f"{what} must be a tuple of integers, got {values!r}") from None
    if any(isinstance(x, bool) or not isinstance(x, numbers.Integral) for x in values):
        raise TypeError(f"{what} must be a tuple of integers, got {values!r}")
    return tuple(int(x) for x in values)


def contiguous_strides(shape):
    """C-contiguous strides, in elements."""
    strides, s = [], 1
    for n in reversed(shape):
        strides.append(s)
        s *= n
    return tuple(reversed(strides))


# ------------------------------------------------------------ bfloat16 bits

def f32_to_bf16_bits(a):
    """float32 values -> bfloat16 bit patterns (uint16), round to nearest even."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(np.asarray(a, dtype=np.float32))
    if nan.any():
        bits[nan] = 0x7FC0
    return bits


def bf16_bits_to_f32(bits):
    """bfloat16 bit patterns (uint16) -> float32 (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


# ------------------------------------------------------- host <-> device data

def host_array(t):
    """The NumPy array behind a host Tensor (a DLPack producer on the CPU is
    viewed through numpy.from_dlpack)."""
    if isinstance(t.obj, np.ndarray):
        return t.obj
    return np.from_dlpack(t.obj)


def device_bits(a, dtype):
    """A C-contiguous host array holding a's values as elements of `dtype`
    (bfloat16 as uint16 bit patterns): what is copied to the device."""
    a = np.asarray(a)
    if dtype == "bfloat16":
        if _is_bf16(a.dtype):
            return np.ascontiguousarray(a).view(np.uint16)
        if a.dtype == np.uint16:
            return np.ascontiguousarray(a)  # already bit patterns
        return f32_to_bf16_bits(a.astype(np.float32, copy=False))
    return np.ascontiguousarray(a, dtype=dtype)


def caller_array(raw, dtype, like):
    """Raw elements copied back from the device, in the caller's
    representation: bfloat16 as the caller's bfloat16 dtype (ml_dtypes) if
    `like` is one, else as float32 (exact)."""
    if dtype == "bfloat16":
        return raw.view(like) if _is_bf16(np.dtype(like)) else bf16_bits_to_f32(raw)
    return raw
