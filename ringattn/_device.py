"""The GPU path of ringattn: device arrays in, ra_cuda_forward, device arrays out.

Nothing here imports torch or CuPy.  Device arrays are read through the two
standard protocols:

``__cuda_array_interface__`` (CAI, versions 0 to 3)
    ``shape``, ``typestr`` (``'<f4'`` float32, ``'<f2'`` float16), ``data``
    ``(ptr, readonly)``, ``strides`` in bytes (``None``: C-contiguous), no
    ``mask``.  CAI has no standard typestr for bfloat16; ringattn accepts
    ``'<V2'`` (or ``'|V2'``) when ``descr`` or the object's ``dtype`` names
    ``bfloat16`` (what ringattn's own ``DeviceArray`` exports).  Other
    producers should hand bfloat16 over through DLPack (PyTorch exports
    bfloat16 only that way).  The v3 ``stream`` key is honoured: ringattn runs
    its kernels on that stream, so they are ordered after the producer's work
    (``None``: no ordering needed; 1: legacy default stream; 2: per-thread
    default stream; 0 is refused, as the protocol says).  When arguments name
    different streams, the others are synchronized first.  The device is not
    part of CAI; it is read from the pointer (``cudaPointerGetAttributes``).

DLPack (``__dlpack__`` / ``__dlpack_device__``)
    A versioned capsule (``"dltensor_versioned"``, DLPack >= 1.0) is asked for
    with ``max_version=(1, 0)``; producers that do not know the keyword are
    asked again without it and give a legacy ``"dltensor"``.  The capsule is
    renamed ``"used_..."`` on consumption and its deleter is called once the
    kernels are done.  ``stream`` is the stream ringattn runs on (1, the
    legacy default stream, unless a CAI argument named one), so the producer
    orders its pending work before ours.  Device type 2 (kDLCUDA) or 13
    (kDLCUDAManaged); dtype float (code 2) 32/16 bits or bfloat (code 4) 16.
    An object that offers DLPack is read through DLPack even when it also
    has CAI.

Every call is synchronous: it returns when the output is written, so its
results can be used on any stream.  Results come back as ``DeviceArray``
(device memory owned by ringattn, exporting both protocols; PyTorch's
``torch.from_dlpack`` and CuPy's ``cupy.asarray`` take it without a copy)
unless ``out=`` is given, in which case ``out`` itself is returned.

NumPy inputs with ``device="cuda"`` are copied to the GPU and the results
copied back as NumPy arrays.  The GPU path does not scan inputs for NaN/Inf
(``nan_policy`` is treated as ``"propagate"`` there).
"""

import ctypes
import numbers
import weakref

import numpy as np

__all__ = ["DeviceArray", "cuda_forward_ptr"]

DTYPES = ("float32", "float16", "bfloat16")
_CODE = {"float32": 0, "float16": 1, "bfloat16": 2}
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
_DLPACK_DTYPE = {(2, 32): "float32", (2, 16): "float16", (4, 16): "bfloat16"}
_DLPACK_CODE = {"float32": (2, 32), "float16": (2, 16), "bfloat16": (4, 16)}
_DL_TYPE_NAMES = {0: "int", 1: "uint", 2: "float", 3: "opaque handle", 4: "bfloat", 5: "complex",
                  6: "bool"}

kDLCPU, kDLCUDA, kDLCUDAHost, kDLCUDAManaged = 1, 2, 3, 13
_DL_DEVICE_NAMES = {1: "cpu", 2: "cuda", 3: "cuda_host", 4: "opencl", 7: "vulkan", 8: "metal",
                    9: "vpi", 10: "rocm", 11: "rocm_host", 12: "ext_dev", 13: "cuda_managed",
                    14: "oneapi", 15: "webgpu", 16: "hexagon", 17: "maia"}

_LEGACY_STREAM = 1


# ---------------------------------------------------------------- the _cuda module

def _cuda_module():
    try:
        from . import _cuda
    except ImportError as e:  # pragma: no cover - a build without the extension
        raise RuntimeError(f"ringattn's GPU extension (ringattn._cuda) is not built: {e}") from e
    return _cuda


def _require_gpu():
    """The _cuda module, once it is known that a CUDA device can be used."""
    mod = _cuda_module()
    if not mod.built_with_cuda():
        raise RuntimeError("ringattn was built without CUDA: rebuild with nvcc available "
                           "(meson setup -Dcuda=enabled) to run on GPU arrays")
    if mod.device_count() < 1:
        raise RuntimeError("no CUDA device is visible (ringattn.cuda_device_count() == 0)")
    return mod


# ------------------------------------------------------------------------ dtypes

def _bf16_numpy_dtype(dt):
    """True for a NumPy dtype that is bfloat16 (ml_dtypes' bfloat16)."""
    return dt.itemsize == 2 and dt.kind == "V" and "bfloat16" in dt.name


def dtype_name(x):
    """'float32' / 'float16' / 'bfloat16' for a dtype-like, or None."""
    if isinstance(x, str):
        if x in DTYPES:
            return x
        if x in ("bf16",):
            return "bfloat16"
    try:
        dt = np.dtype(x)
    except TypeError:
        return None
    if dt == np.float32:
        return "float32"
    if dt == np.float16:
        return "float16"
    if _bf16_numpy_dtype(dt):
        return "bfloat16"
    return None


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


# --------------------------------------------------------------- parsed arguments

class DeviceRef:
    """One argument as the C call sees it.

    kind: "cuda" or "cpu"; device: CUDA ordinal (None while unknown, for CAI);
    ptr: address of element (0, 0, 0, 0); shape; strides in elements (size-1
    axes get their C-contiguous stride); dtype: 'float32' / 'float16' / 'bfloat16';
    readonly; stream: the CAI stream (int) or None; source: "cai" / "dlpack".
    """

    __slots__ = ("name", "kind", "device", "ptr", "shape", "strides", "dtype", "readonly", "stream",
                 "source", "obj", "_import", "__weakref__")

    def __init__(self, name, kind, device, ptr, shape, strides, dtype, readonly, stream, source, obj,
                 imported=None):
        self.name = name
        self.kind = kind
        self.device = device
        self.ptr = ptr
        self.shape = tuple(shape)
        self.strides = tuple(strides)
        self.dtype = dtype
        self.readonly = readonly
        self.stream = stream
        self.source = source
        self.obj = obj  # keeps the producer alive for the duration of the call
        self._import = imported

    def release(self):
        """Give a consumed DLPack tensor back to its producer (idempotent)."""
        imp, self._import = self._import, None
        if imp is not None:
            imp.release()

    def __repr__(self):
        dev = f"{self.kind}:{'?' if self.device is None else self.device}"
        return (f"DeviceRef({self.name}, {dev}, {self.dtype}, shape={self.shape}, "
                f"strides={self.strides}, ptr={self.ptr:#x}, source={self.source})")


def _ints(values, what):
    try:
        values = tuple(values)
    except TypeError:
        raise TypeError(f"{what} must be a tuple of integers, got {values!r}") from None
    if any(isinstance(x, bool) or not isinstance(x, numbers.Integral) for x in values):
        raise TypeError(f"{what} must be a tuple of integers, got {values!r}")
    return tuple(int(x) for x in values)


def _contiguous_strides(shape):
    strides, s = [], 1
    for n in reversed(shape):
        strides.append(s)
        s *= n
    return tuple(reversed(strides))


def _normalise_strides(shape, strides):
    """Strides of size-1 axes are meaningless (producers put anything there,
    even negative values): give them their C-contiguous value."""
    return tuple(c if n == 1 else s for n, s, c in zip(shape, strides, _contiguous_strides(shape)))


# ------------------------------------------------------------------------ CAI

def get_cai(obj):
    """obj.__cuda_array_interface__ or None (a property that raises counts as absent)."""
    try:
        return obj.__cuda_array_interface__
    except AttributeError:
        return None
    except Exception:  # noqa: BLE001 - e.g. torch raises for CPU tensors
        return None


def _cai_dtype(typestr, descr, obj, name):
    if not isinstance(typestr, str) or len(typestr) < 3:
        raise TypeError(f"{name}: __cuda_array_interface__ typestr must be a string like '<f4', got {typestr!r}")
    order, body = typestr[0], typestr[1:]
    if order == ">":
        raise TypeError(f"{name}: big-endian data (typestr {typestr!r}) is not supported")
    if order not in "<=|":
        raise TypeError(f"{name}: bad __cuda_array_interface__ typestr {typestr!r}")
    if body == "f4":
        return "float32"
    if body == "f2":
        return "float16"
    if body == "V2":
        names = []
        if isinstance(descr, (list, tuple)):
            names = [str(d[0]) for d in descr if isinstance(d, (list, tuple)) and d]
        if any("bfloat16" in n for n in names) or str(getattr(obj, "dtype", "")).endswith("bfloat16"):
            return "bfloat16"
        raise TypeError(f"{name}: typestr {typestr!r} is not a known dtype (bfloat16 needs a descr "
                        "naming 'bfloat16'; or pass the array through DLPack)")
    raise TypeError(f"{name} must have dtype float32, float16 or bfloat16, got typestr {typestr!r}")


def parse_cai(obj, name, cai=None):
    """A DeviceRef from an object exposing __cuda_array_interface__."""
    if cai is None:
        cai = get_cai(obj)
    if not isinstance(cai, dict):
        raise TypeError(f"{name}: __cuda_array_interface__ must be a dict, got {type(cai).__name__}")
    version = cai.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"{name}: bad __cuda_array_interface__ version {version!r}")
    for key in ("shape", "typestr", "data"):
        if key not in cai:
            raise ValueError(f"{name}: __cuda_array_interface__ has no {key!r}")
    shape = _ints(cai["shape"], f"{name}: __cuda_array_interface__ shape")
    dtype = _cai_dtype(cai["typestr"], cai.get("descr"), obj, name)
    itemsize = _ITEMSIZE[dtype]
    data = cai["data"]
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise ValueError(f"{name}: __cuda_array_interface__ data must be (pointer, readonly), got {data!r}")
    ptr, readonly = data
    if isinstance(ptr, bool) or not isinstance(ptr, int) or ptr < 0:
        raise ValueError(f"{name}: __cuda_array_interface__ pointer must be a non-negative int, got {ptr!r}")
    if cai.get("mask") is not None:
        raise ValueError(f"{name}: masked arrays (__cuda_array_interface__ mask) are not supported")
    strides = cai.get("strides")
    if strides is None:
        strides = _contiguous_strides(shape)
    else:
        sb = _ints(strides, f"{name}: __cuda_array_interface__ strides")
        if len(sb) != len(shape):
            raise ValueError(f"{name}: __cuda_array_interface__ strides {sb} do not match shape {shape}")
        if any(s % itemsize for n, s in zip(shape, sb) if n > 1):
            raise ValueError(f"{name}: strides {sb} (bytes) are not multiples of the item size {itemsize}")
        strides = tuple(s // itemsize for s in sb)
    stream = None
    if version >= 3 and "stream" in cai:
        stream = cai["stream"]
        if stream is not None:
            if isinstance(stream, bool) or not isinstance(stream, int) or stream < 0:
                raise ValueError(f"{name}: __cuda_array_interface__ stream must be None or a "
                                 f"positive int, got {stream!r}")
            if stream == 0:
                raise ValueError(f"{name}: __cuda_array_interface__ stream 0 is ambiguous and not "
                                 "allowed by the protocol (use 1 for the legacy default stream, "
                                 "2 for the per-thread default stream)")
    return DeviceRef(name, "cuda", None, ptr, shape, _normalise_strides(shape, strides), dtype,
                     bool(readonly), stream, "cai", obj)


# --------------------------------------------------------------------- DLPack

_deleter_t = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", _deleter_t)]


class DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [("version", DLPackVersion), ("manager_ctx", ctypes.c_void_p), ("deleter", _deleter_t),
                ("flags", ctypes.c_uint64), ("dl_tensor", DLTensor)]


DLPACK_FLAG_READ_ONLY = 1 << 0
DLPACK_FLAG_IS_COPIED = 1 << 1

# Our own handle on the C API, so that ctypes.pythonapi's signatures stay untouched.
_pyapi = ctypes.PyDLL(ctypes.pythonapi._name, handle=ctypes.pythonapi._handle)
_cap_is_valid = _pyapi.PyCapsule_IsValid
_cap_is_valid.restype = ctypes.c_int
_cap_is_valid.argtypes = [ctypes.py_object, ctypes.c_char_p]
_cap_get_pointer = _pyapi.PyCapsule_GetPointer
_cap_get_pointer.restype = ctypes.c_void_p
_cap_get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_cap_set_name = _pyapi.PyCapsule_SetName
_cap_set_name.restype = ctypes.c_int
_cap_set_name.argtypes = [ctypes.py_object, ctypes.c_char_p]
_cap_get_name = _pyapi.PyCapsule_GetName
_cap_get_name.restype = ctypes.c_char_p
_cap_get_name.argtypes = [ctypes.py_object]

# PyCapsule_SetName keeps the pointer: these buffers live as long as the module.
_NAME_LEGACY = b"dltensor"
_NAME_VERSIONED = b"dltensor_versioned"
_USED_LEGACY = ctypes.create_string_buffer(b"used_dltensor")
_USED_VERSIONED = ctypes.create_string_buffer(b"used_dltensor_versioned")


class DLPackImport:
    """A consumed DLPack capsule: the tensor's description plus the duty to
    call its deleter once (release(); also on garbage collection)."""

    def __init__(self, capsule, name="array"):
        if type(capsule).__name__ != "PyCapsule":
            raise TypeError(f"{name}: __dlpack__ must return a PyCapsule, got {type(capsule).__name__}")
        if _cap_is_valid(capsule, _NAME_VERSIONED):
            self.versioned = True
            addr = _cap_get_pointer(capsule, _NAME_VERSIONED)
            managed = DLManagedTensorVersioned.from_address(addr)
        elif _cap_is_valid(capsule, _NAME_LEGACY):
            self.versioned = False
            addr = _cap_get_pointer(capsule, _NAME_LEGACY)
            managed = DLManagedTensor.from_address(addr)
        else:
            cap_name = _cap_get_name(capsule)
            if cap_name is not None and cap_name.startswith(b"used_"):
                raise ValueError(f"{name}: the DLPack capsule was already consumed")
            raise TypeError(f"{name}: not a DLPack capsule (capsule name {cap_name!r})")
        # From here on we own the tensor: the producer's capsule destructor
        # sees the "used_" name and leaves the deleter to us.
        if _cap_set_name(capsule, _USED_VERSIONED if self.versioned else _USED_LEGACY) != 0:
            raise RuntimeError(f"{name}: could not rename the DLPack capsule")
        self._addr = addr
        self._managed = managed
        self.version = (managed.version.major, managed.version.minor) if self.versioned else (0, 0)
        self.flags = managed.flags if self.versioned else 0
        t = managed.dl_tensor
        self.data = t.data or 0
        self.byte_offset = int(t.byte_offset)
        self.device_type = int(t.device.device_type)
        self.device_id = int(t.device.device_id)
        self.ndim = int(t.ndim)
        self.code, self.bits, self.lanes = int(t.dtype.code), int(t.dtype.bits), int(t.dtype.lanes)
        self.shape = tuple(int(t.shape[i]) for i in range(self.ndim)) if self.ndim else ()
        self.strides = (tuple(int(t.strides[i]) for i in range(self.ndim)) if t.strides
                        else _contiguous_strides(self.shape))
        self.readonly = bool(self.flags & DLPACK_FLAG_READ_ONLY)
        self._released = False
        if self.versioned and self.version[0] != 1:
            self.release()
            raise ValueError(f"{name}: DLPack version {self.version[0]}.{self.version[1]} is not supported "
                             "(ringattn reads major version 1)")

    @property
    def address(self):
        """Address of the first element (data + byte_offset)."""
        return self.data + self.byte_offset

    def release(self):
        if self._released:
            return
        self._released = True
        deleter = self._managed.deleter
        self._managed = None
        if deleter:
            deleter(self._addr)

    def __del__(self):
        try:
            self.release()
        except Exception:  # noqa: BLE001 - never raise from a finaliser
            pass


def dlpack_device(obj):
    """(device_type, device_id) from obj.__dlpack_device__(), or None."""
    fn = getattr(obj, "__dlpack_device__", None)
    if fn is None or not hasattr(obj, "__dlpack__"):
        return None
    try:
        dev = fn()
        return int(dev[0]), int(dev[1])
    except Exception:  # noqa: BLE001
        return None


def dlpack_export(obj, name, stream=None, versioned=True):
    """Call obj.__dlpack__ (versioned first when asked, legacy on TypeError)
    and consume the capsule: a DLPackImport."""
    try:
        if versioned:
            try:
                cap = obj.__dlpack__(stream=stream, max_version=(1, 0))
            except TypeError:
                cap = obj.__dlpack__(stream=stream)
        else:
            cap = obj.__dlpack__(stream=stream)
    except (BufferError, RuntimeError, ValueError) as e:
        raise ValueError(f"{name}: __dlpack__ failed: {e}") from e
    return DLPackImport(cap, name)


def _dlpack_dtype(imp, name):
    key = (imp.code, imp.bits)
    if imp.lanes == 1 and key in _DLPACK_DTYPE:
        return _DLPACK_DTYPE[key]
    what = f"{_DL_TYPE_NAMES.get(imp.code, f'code {imp.code}')}{imp.bits}"
    if imp.lanes != 1:
        what += f"x{imp.lanes}"
    raise TypeError(f"{name} must have dtype float32, float16 or bfloat16, got DLPack {what}")


def parse_dlpack(obj, name, stream=_LEGACY_STREAM, versioned=True):
    """A DeviceRef from a DLPack producer (CUDA or, for tests, CPU)."""
    dev = dlpack_device(obj)
    if dev is None:
        raise TypeError(f"{name}: {type(obj).__name__} has no usable __dlpack_device__")
    on_cuda = dev[0] in (kDLCUDA, kDLCUDAManaged)
    imp = dlpack_export(obj, name, stream=stream if on_cuda else None, versioned=versioned)
    try:
        dtype = _dlpack_dtype(imp, name)
        if imp.device_type in (kDLCUDA, kDLCUDAManaged):
            kind = "cuda"
        elif imp.device_type in (kDLCPU, kDLCUDAHost):
            kind = "cpu"
        else:
            raise ValueError(f"{name} is on an unsupported device "
                             f"({_DL_DEVICE_NAMES.get(imp.device_type, imp.device_type)})")
        ref = DeviceRef(name, kind, imp.device_id, imp.address, imp.shape,
                        _normalise_strides(imp.shape, imp.strides), dtype, imp.readonly, None, "dlpack",
                        obj, imp)
    except BaseException:
        imp.release()
        raise
    return ref


# ------------------------------------------------------------ classification

def classify(obj):
    """'cuda' for a CUDA array (CAI, or DLPack on a CUDA device), 'cpu' for a
    host array (NumPy, DLPack on the CPU, anything with __array__), 'other'
    for DLPack arrays on other devices."""
    if isinstance(obj, (np.ndarray, np.generic)):
        return "cpu"
    dev = dlpack_device(obj)
    if dev is not None:
        if dev[0] in (kDLCUDA, kDLCUDAManaged):
            return "cuda"
        if dev[0] in (kDLCPU, kDLCUDAHost):
            return "cpu"
        return "other"
    if get_cai(obj) is not None:
        return "cuda"
    return "cpu"


def _describe(obj, kind):
    if kind == "cuda":
        dev = dlpack_device(obj)
        return f"a CUDA array (cuda:{dev[1]})" if dev else "a CUDA array"
    if kind == "cpu":
        return f"a host array ({type(obj).__name__})"
    dev = dlpack_device(obj)
    return f"on device {_DL_DEVICE_NAMES.get(dev[0], dev[0])}" if dev else "not an array"


def parse_device(device):
    """None, ('cpu', None) or ('cuda', ordinal or None)."""
    if device is None:
        return None
    if isinstance(device, bool):
        raise TypeError(f"device must be None, 'cpu', 'cuda', 'cuda:N' or an int, got {device!r}")
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
        raise ValueError(f"device must be None, 'cpu', 'cuda', 'cuda:N' or an int, got {device!r}")
    # torch.device and the like: use their string form
    if type(device).__name__ == "device":
        return parse_device(str(device))
    raise TypeError(f"device must be None, 'cpu', 'cuda', 'cuda:N' or an int, got {device!r}")


def wants_gpu(device, q, k, v, out=None, **more):
    """True when the call goes to the GPU path (device='cuda', or a CUDA array
    among the arguments and device not given).  `more`: further named arrays
    (the backward's o, lse, dout)."""
    dev = parse_device(device)
    objs = {"q": q, "k": k, "v": v, "out": out, **more}
    if dev is not None and dev[0] == "cpu":
        for name, obj in objs.items():
            if obj is not None and classify(obj) == "cuda":
                raise ValueError(f"device='cpu' but {name} is a CUDA array; copy it to the host first "
                                 "or leave device=None")
        return False
    if dev is not None:
        return True
    return any(obj is not None and classify(obj) == "cuda" for obj in objs.values())


# ---------------------------------------------------------------- validation

def check_refs(refs, requested=None):
    """Check parsed q, k, v (and out) against each other; return (device, dtype, shape).

    refs: dict name -> DeviceRef with "q", "k", "v" and optionally "out".
    requested: an ordinal from device='cuda:N', or None.
    """
    q = refs["q"]
    for name, r in refs.items():
        if r.kind != "cuda":
            raise ValueError(f"{name} is on the host ({r.source} on the CPU) but the call runs on the GPU; "
                             "pass all of q, k, v (and out) as CUDA arrays, or NumPy arrays with device='cuda'")
    known = [(n, r.device) for n, r in refs.items() if r.device is not None]
    if requested is not None:
        known.insert(0, ("device", requested))
    for name, dev in known[1:]:
        if dev != known[0][1]:
            first = "the requested device" if known[0][0] == "device" else known[0][0]
            raise ValueError(f"{name} is on cuda:{dev} but {first} is on cuda:{known[0][1]}; "
                             "all arrays must be on one CUDA device")
    device = known[0][1] if known else None
    if q.dtype not in DTYPES:
        raise TypeError(f"q must have dtype float32, float16 or bfloat16, got {q.dtype}")
    for name, r in refs.items():
        if r.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {r.dtype} but q has {q.dtype}; they must match")
    if len(q.shape) != 4:
        raise ValueError(f"q must have 4 dimensions (batch, seq, heads, head_dim), got shape {q.shape}")
    if 0 in q.shape:
        raise ValueError(f"q must not be empty, got shape {q.shape}")
    for name, r in refs.items():
        if r.shape != q.shape:
            raise ValueError(f"{name} has shape {r.shape} but q has {q.shape}; they must match")
    itemsize = _ITEMSIZE[q.dtype]
    for name, r in refs.items():
        st = r.strides
        if (st[3] != 1 and r.shape[3] > 1) or any(s < 0 for s in st):
            raise ValueError(f"{name}: the head dimension (last axis) must be contiguous and the strides "
                             f"non-negative, got strides {st} (elements); make it contiguous first")
        if r.ptr % itemsize:
            raise ValueError(f"{name}: the data pointer {r.ptr:#x} is not aligned to its {itemsize}-byte elements")
        if r.ptr == 0:
            raise ValueError(f"{name}: null data pointer")
    if "out" in refs and refs["out"].readonly:
        raise ValueError("out is read-only")
    return device, q.dtype, q.shape


# ------------------------------------------------------------------ DeviceArray

class _Allocation:
    """cudaMalloc'd memory, freed when the last owner goes away."""

    __slots__ = ("ptr", "nbytes", "device", "__weakref__")

    def __init__(self, nbytes, device):
        mod = _require_gpu()
        if device is None:
            device = mod.current_device()
        self.ptr = mod.alloc(int(nbytes), int(device))
        self.nbytes = int(nbytes)
        self.device = int(device)
        fin = weakref.finalize(self, _free, mod, self.ptr, self.device)
        fin.atexit = False  # at exit the driver reclaims everything; no CUDA calls then


def _free(mod, ptr, device):
    try:
        mod.free(ptr, device)
    except Exception:  # noqa: BLE001 - never raise from a finaliser
        pass


class DeviceArray:
    """A C-contiguous array in CUDA device memory owned by ringattn.

    ``shape``, ``dtype`` (a NumPy dtype for float32/float16, the string
    ``'bfloat16'`` for bfloat16), ``device`` (CUDA ordinal), ``ptr``,
    ``strides`` (bytes, NumPy style).  Exports ``__cuda_array_interface__``
    (version 3; bfloat16 as typestr ``'<V2'`` with descr naming bfloat16) and
    DLPack (``__dlpack__`` / ``__dlpack_device__``, legacy or versioned
    capsule), so ``torch.from_dlpack(a)`` and ``cupy.asarray(a)`` use it
    without a copy.  ``numpy()`` copies it to the host (bfloat16 comes back
    as float32, exactly).
    """

    def __init__(self, shape, dtype="float32", device=None):
        name = dtype_name(dtype)
        if name is None:
            raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
        shape = _ints(shape if isinstance(shape, (tuple, list)) else (shape,), "shape")
        if any(n < 0 for n in shape):
            raise ValueError(f"shape must not be negative, got {shape}")
        if device is not None:
            dev = parse_device(device)
            if dev[0] != "cuda":
                raise ValueError(f"DeviceArray lives on a CUDA device, got device={device!r}")
            device = dev[1]
        self._dtype = name
        self.shape = shape
        self.size = int(np.prod(shape, dtype=np.int64)) if shape else 1
        self.itemsize = _ITEMSIZE[name]
        self.nbytes = self.size * self.itemsize
        self._mem = _Allocation(self.nbytes, device)
        self.device = self._mem.device
        self.ptr = self._mem.ptr

    # ---- construction helpers
    @classmethod
    def empty(cls, shape, dtype="float32", device=None):
        return cls(shape, dtype, device)

    @classmethod
    def from_numpy(cls, a, dtype=None, device=None):
        """Copy a host array to a new DeviceArray (converted to dtype if given;
        float arrays become bfloat16 by rounding to nearest even)."""
        a = np.asarray(a)
        src = dtype_name(a.dtype)
        name = src if dtype is None else dtype_name(dtype)
        if name is None:
            raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype if dtype is not None else a.dtype}")
        out = cls(a.shape, name, device)
        out.copy_from(a)
        return out

    @classmethod
    def full(cls, shape, value, dtype="float32", device=None):
        return cls.from_numpy(np.full(shape, value, dtype=np.float32), dtype, device)

    def copy_from(self, a):
        """Overwrite the contents with a host array of the same shape."""
        a = np.asarray(a)
        if a.shape != self.shape:
            raise ValueError(f"shape {a.shape} does not match the DeviceArray's {self.shape}")
        host = _host_bits(a, self._dtype)
        _require_gpu().memcpy_htod(self.ptr, host, self.device)

    def numpy(self):
        """A host copy: float32/float16 as is, bfloat16 as float32."""
        mod = _require_gpu()
        if self._dtype == "bfloat16":
            bits = np.empty(self.shape, dtype=np.uint16)
            mod.memcpy_dtoh(bits, self.ptr, self.device)
            return bf16_bits_to_f32(bits)
        host = np.empty(self.shape, dtype=self._dtype)
        mod.memcpy_dtoh(host, self.ptr, self.device)
        return host

    def _raw_numpy(self):
        """A host copy holding the raw elements (bfloat16 as uint16 bits)."""
        host = np.empty(self.shape, dtype=np.uint16 if self._dtype == "bfloat16" else self._dtype)
        _require_gpu().memcpy_dtoh(host, self.ptr, self.device)
        return host

    # ---- properties
    @property
    def dtype(self):
        return "bfloat16" if self._dtype == "bfloat16" else np.dtype(self._dtype)

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def strides(self):
        return tuple(s * self.itemsize for s in _contiguous_strides(self.shape))

    def __len__(self):
        if not self.shape:
            raise TypeError("len() of a 0-d DeviceArray")
        return self.shape[0]

    def __repr__(self):
        return f"DeviceArray(shape={self.shape}, dtype={self._dtype}, device='cuda:{self.device}')"

    # ---- protocols
    @property
    def __cuda_array_interface__(self):
        typestr = {"float32": "<f4", "float16": "<f2", "bfloat16": "<V2"}[self._dtype]
        cai = {"shape": self.shape, "typestr": typestr, "data": (self.ptr, False), "strides": None,
               "version": 3, "stream": None}  # our writes are complete: no ordering needed
        if self._dtype == "bfloat16":
            cai["descr"] = [("bfloat16", "<V2")]
        return cai

    def __dlpack_device__(self):
        return (kDLCUDA, self.device)

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        # Every ringattn call is synchronous, so the data is ready on any stream.
        if stream == 0:
            raise ValueError("stream 0 is ambiguous for CUDA; use 1 (legacy default) or 2 (per-thread)")
        if dl_device is not None and tuple(dl_device) != (kDLCUDA, self.device):
            raise BufferError(f"DeviceArray is on cuda:{self.device}; it cannot be exported to {dl_device}")
        if copy:
            raise BufferError("DeviceArray cannot export a copy through DLPack")
        versioned = max_version is not None and int(max_version[0]) >= 1
        code, bits = _DLPACK_CODE[self._dtype]
        return _cuda_module().to_dlpack(self, self.ptr, kDLCUDA, self.device, self.shape, None, code, bits,
                                        versioned, False)


def _host_bits(a, dtype):
    """A C-contiguous host array holding a's values as the elements of dtype
    (bfloat16 as uint16 bits)."""
    if dtype == "bfloat16":
        if _bf16_numpy_dtype(a.dtype):
            return np.ascontiguousarray(a).view(np.uint16)
        if a.dtype == np.uint16:
            return np.ascontiguousarray(a)  # already bit patterns
        return f32_to_bf16_bits(a.astype(np.float32, copy=False))
    return np.ascontiguousarray(a, dtype=dtype)


# ----------------------------------------------------------------------- calls

def _ref_of_device_array(a, name):
    return DeviceRef(name, "cuda", a.device, a.ptr, a.shape, _normalise_strides(a.shape, _contiguous_strides(a.shape)),
                     a._dtype, False, None, "dlpack", a)


def _choose_stream(refs):
    """The CAI stream to run on (None: any) and the other streams to wait for."""
    streams = []
    for r in refs.values():
        if r.stream is not None and r.stream not in streams:
            streams.append(r.stream)
    if not streams:
        return None, []
    return streams[0], streams[1:]


def _parse_cuda_args(objs, requested):
    """Parse the CUDA arguments: CAI first (they may name a stream), then DLPack
    with that stream.  Returns (refs, stream)."""
    refs = {}
    try:
        dl_names = []
        for name, obj in objs.items():
            if isinstance(obj, DeviceArray):
                refs[name] = _ref_of_device_array(obj, name)
            elif dlpack_device(obj) is not None:
                dl_names.append(name)
            else:
                cai = get_cai(obj)
                if cai is None:
                    raise TypeError(f"{name} must be a CUDA array (exposing __cuda_array_interface__ "
                                    f"or __dlpack__), got {type(obj).__name__}")
                refs[name] = parse_cai(obj, name, cai)
        stream, _ = _choose_stream(refs)
        for name in dl_names:
            refs[name] = parse_dlpack(objs[name], name, stream=_LEGACY_STREAM if stream is None else stream)
        refs = {n: refs[n] for n in objs}  # q, k, v, out order
        check_refs(refs, requested)
        return refs, stream
    except BaseException:
        for r in refs.values():
            r.release()
        raise


def _check_config(shape, segs, rates, causal, mode, scale, world_size):
    from . import _core  # the plan rules are the same for every backend
    b, n, h, d = shape
    _core.plan(batch=b, seq_len=n, num_heads=h, head_dim=d, segment_lengths=segs, dilation_rates=rates,
               causal=bool(causal), mode=mode, scale=scale, world_size=world_size)


def _resolve_devices(refs, requested, mod):
    """Fill in the device of CAI arguments from their pointers; return the ordinal."""
    for name, r in refs.items():
        if r.device is None:
            kind, dev = mod.pointer_device(r.ptr)
            if kind not in ("device", "managed") or dev < 0:
                raise ValueError(f"{name}: __cuda_array_interface__ points at {kind} memory, "
                                 "not at CUDA device memory")
            r.device = dev
    device, _, _ = check_refs(refs, requested)
    return device


def run(q, k, v, segs, rates, causal, mode, scale, world_size, return_lse, out, device=None):
    """The GPU path of dilated_attention / RingDilatedAttention.__call__.

    segs, rates, mode (int code), scale (0.0 = default) are already checked by
    the caller.  Returns (result, stats) like the CPU path.
    """
    dev = parse_device(device)
    requested = dev[1] if dev is not None else None
    objs = {"q": q, "k": k, "v": v}
    if out is not None:
        objs["out"] = out
    kinds = {name: classify(obj) for name, obj in objs.items()}
    for name, kind in kinds.items():
        if kind == "other":
            raise ValueError(f"{name} is {_describe(objs[name], kind)}; ringattn runs on the CPU or CUDA")
    inputs_on_host = [n for n in ("q", "k", "v") if kinds[n] == "cpu"]
    if inputs_on_host and len(inputs_on_host) < 3:
        host = inputs_on_host[0]
        gpu = next(n for n in ("q", "k", "v") if kinds[n] == "cuda")
        raise ValueError(f"{host} is {_describe(objs[host], 'cpu')} but {gpu} is "
                         f"{_describe(objs[gpu], 'cuda')}; pass q, k, v on one device")
    if inputs_on_host:
        if dev is None:
            where = f"out is {_describe(out, 'cuda')}" if out is not None else "no device was given"
            raise ValueError(f"q, k, v are host arrays but {where}; pass device='cuda' to run on the GPU")
        return _run_host(q, k, v, segs, rates, causal, mode, scale, world_size, return_lse, out, requested)
    if out is not None and kinds["out"] == "cpu":
        raise ValueError(f"out is {_describe(out, 'cpu')} but q is {_describe(q, 'cuda')}; "
                         "out must be a CUDA array on the device of q")
    refs, stream = _parse_cuda_args(objs, requested)
    try:
        _check_config(refs["q"].shape, segs, rates, causal, mode, scale, world_size)
        mod = _require_gpu()
        device = _resolve_devices(refs, requested, mod)
        return _launch(mod, refs, device, stream, segs, rates, causal, mode, scale, world_size, return_lse,
                       out)
    finally:
        for r in refs.values():
            r.release()


def _launch(mod, refs, device, stream, segs, rates, causal, mode, scale, world_size, return_lse, out):
    q = refs["q"]
    b, n, h, d = q.shape
    if device is None:
        device = mod.current_device()
    result = out
    if out is None:
        result = DeviceArray(q.shape, q.dtype, device)
        refs = dict(refs, out=_ref_of_device_array(result, "out"))
    lse = DeviceArray((b, h, n), "float32", device) if return_lse else None
    _, waits = _choose_stream(refs)
    for s in waits:  # arguments ordered on other streams: wait for them on the host
        mod.synchronize(s, device)
    c_stream = 0 if stream in (None, _LEGACY_STREAM) else stream
    names = ("q", "k", "v", "out")
    stats = mod.run([refs[nm].ptr for nm in names], None if lse is None else lse.ptr, q.shape,
                    [refs[nm].strides for nm in names], _CODE[q.dtype], list(segs), list(rates),
                    bool(causal), int(mode), float(scale), int(world_size), c_stream, int(device), True)
    return ((result, lse) if return_lse else result), stats


def _host_array(x, name):
    if not isinstance(x, np.ndarray):
        if classify(x) == "cpu" and dlpack_device(x) is not None and not hasattr(x, "__array__"):
            x = np.from_dlpack(x)
        else:
            x = np.asarray(x)
    dt = dtype_name(x.dtype)
    if dt is None:
        hint = " (convert with .astype(np.float32))" if x.dtype.kind in "fiub" else ""
        raise TypeError(f"{name} must have dtype float32, float16 or bfloat16, got {x.dtype}{hint}")
    return x, dt


def _to_host(a, dt, like):
    """A DeviceArray's contents as NumPy in the caller's representation:
    bfloat16 as the caller's bfloat16 dtype (ml_dtypes) or else float32."""
    raw = a._raw_numpy()
    if dt == "bfloat16":
        raw = raw.view(like) if _bf16_numpy_dtype(like) else bf16_bits_to_f32(raw)
    return raw


def _run_host(q, k, v, segs, rates, causal, mode, scale, world_size, return_lse, out, requested):
    """device='cuda' with host inputs: copy in, run, copy the results back."""
    arrs = {}
    for name, x in (("q", q), ("k", k), ("v", v)):
        arrs[name] = _host_array(x, name)
    qa, dt = arrs["q"]
    if qa.ndim != 4:
        raise ValueError(f"q must have 4 dimensions (batch, seq, heads, head_dim), got shape {qa.shape}")
    if 0 in qa.shape:
        raise ValueError(f"q must not be empty, got shape {qa.shape}")
    for name in ("k", "v"):
        a, t = arrs[name]
        if t != dt:
            raise TypeError(f"{name} has dtype {t} but q has {dt}; they must match")
        if a.shape != qa.shape:
            raise ValueError(f"{name} has shape {a.shape} but q has {qa.shape}; they must match")
    out_host = None
    if out is not None:
        if classify(out) == "cpu":
            if not isinstance(out, np.ndarray):
                raise TypeError(f"out must be a NumPy array or a CUDA array, got {type(out).__name__}")
            if dtype_name(out.dtype) != dt or out.shape != qa.shape:
                raise ValueError(f"out must have shape {qa.shape} and dtype {qa.dtype}, got {out.shape} {out.dtype}")
            if not out.flags.writeable:
                raise ValueError("out is not writeable")
            out_host = out
    _check_config(qa.shape, segs, rates, causal, mode, scale, world_size)
    mod = _require_gpu()
    device = requested if requested is not None else mod.current_device()
    dq, dk, dv = (DeviceArray.from_numpy(arrs[n][0], dt, device) for n in ("q", "k", "v"))
    objs = {"q": dq, "k": dk, "v": dv}
    if out is not None and out_host is None:
        objs["out"] = out
    refs, stream = _parse_cuda_args(objs, device)
    try:
        device = _resolve_devices(refs, device, mod)
        result, stats = _launch(mod, refs, device, stream, segs, rates, causal, mode, scale, world_size,
                                return_lse, objs.get("out"))
    finally:
        for r in refs.values():
            r.release()
    o, lse = result if return_lse else (result, None)
    if out is not None and out_host is None:
        o_host = out  # written in place on the device
    else:
        raw = _to_host(o, dt, qa.dtype)
        if out_host is not None:
            out_host[...] = raw
            o_host = out_host
        else:
            o_host = raw
    if return_lse:
        return (o_host, lse.numpy()), stats
    return o_host, stats


# ------------------------------------------------------------------- backward

def _parse_lse(lse, shape, stream, requested, mod):
    """The forward's lse as a DeviceRef: float32 (b, h, n), C-contiguous, CUDA."""
    b, n, h, _ = shape
    if isinstance(lse, DeviceArray):
        ref = _ref_of_device_array(lse, "lse")
    elif dlpack_device(lse) is not None:
        ref = parse_dlpack(lse, "lse", stream=_LEGACY_STREAM if stream is None else stream)
    else:
        cai = get_cai(lse)
        if cai is None:
            raise TypeError(f"lse must be a CUDA array like the other arguments, got {type(lse).__name__}")
        ref = parse_cai(lse, "lse", cai)
    try:
        if ref.kind != "cuda":
            raise ValueError("lse is on the host but the other arguments are CUDA arrays")
        if ref.dtype != "float32" or tuple(ref.shape) != (b, h, n) or \
                tuple(ref.strides) != tuple(_contiguous_strides((b, h, n))):
            raise ValueError(f"lse must be a C-contiguous float32 array of shape {(b, h, n)} (the forward's "
                             f"return_lse=True result), got {ref.dtype} {tuple(ref.shape)}")
        if ref.device is None:
            kind, ref.device = mod.pointer_device(ref.ptr)
            if kind not in ("device", "managed"):
                raise ValueError("lse: __cuda_array_interface__ points at host memory, not at CUDA device memory")
        if requested is not None and ref.device != requested:
            raise ValueError(f"lse is on cuda:{ref.device} but q is on cuda:{requested}; "
                             "all arrays must be on one CUDA device")
    except BaseException:
        ref.release()
        raise
    return ref


def run_backward(q, k, v, o, lse, dout, segs, rates, causal, mode, scale, world_size, device=None):
    """The GPU path of dilated_attention_backward / RingDilatedAttention.backward:
    (dq, dk, dv) as DeviceArrays (NumPy when the inputs are host arrays and
    device="cuda"), and the per-rank stats."""
    dev = parse_device(device)
    requested = dev[1] if dev is not None else None
    objs = {"q": q, "k": k, "v": v, "o": o, "dout": dout}
    kinds = {name: classify(obj) for name, obj in objs.items()}
    kinds["lse"] = classify(lse)
    for name, kind in kinds.items():
        if kind == "other":
            obj = lse if name == "lse" else objs[name]
            raise ValueError(f"{name} is {_describe(obj, kind)}; ringattn runs on the CPU or CUDA")
    host = [n for n, kd in kinds.items() if kd == "cpu"]
    if host and len(host) < len(kinds):
        gpu = next(n for n, kd in kinds.items() if kd == "cuda")
        raise ValueError(f"{host[0]} is a host array but {gpu} is a CUDA array; the backward takes "
                         "q, k, v, o, lse and dout all on the host or all on one GPU")
    if host:
        return _run_backward_host(objs, lse, segs, rates, causal, mode, scale, world_size, requested)
    refs, stream = _parse_cuda_args(objs, requested)
    lse_ref = None
    try:
        _check_config(refs["q"].shape, segs, rates, causal, mode, scale, world_size)
        mod = _require_gpu()
        device = _resolve_devices(refs, requested, mod)
        if device is None:
            device = mod.current_device()
        lse_ref = _parse_lse(lse, refs["q"].shape, stream, device, mod)
        shape, dtype = refs["q"].shape, refs["q"].dtype
        grads = [DeviceArray(shape, dtype, device) for _ in range(3)]
        _, waits = _choose_stream(dict(refs, lse=lse_ref))
        for st in waits:
            mod.synchronize(st, device)
        c_stream = 0 if stream in (None, _LEGACY_STREAM) else stream
        names = ("q", "k", "v", "o", "dout")
        strides = [refs[nm].strides for nm in names] + [_contiguous_strides(shape)] * 3
        stats = mod.run([refs[nm].ptr for nm in names] + [g.ptr for g in grads], lse_ref.ptr, shape, strides,
                        _CODE[dtype], list(segs), list(rates), bool(causal), int(mode), float(scale),
                        int(world_size), c_stream, int(device), True)
        return tuple(grads), stats
    finally:
        for r in refs.values():
            r.release()
        if lse_ref is not None:
            lse_ref.release()


def _run_backward_host(objs, lse, segs, rates, causal, mode, scale, world_size, requested):
    """device="cuda" with host arrays: copy in, run, copy the gradients back."""
    arrs = {name: _host_array(x, name) for name, x in objs.items()}
    qa, dt = arrs["q"]
    for name, (a, t) in arrs.items():
        if t != dt:
            raise TypeError(f"{name} has dtype {t} but q has {dt}; they must match")
        if a.shape != qa.shape:
            raise ValueError(f"{name} has shape {a.shape} but q has {qa.shape}; they must match")
    if qa.ndim != 4 or 0 in qa.shape:
        raise ValueError(f"q must have 4 non-empty dimensions (batch, seq, heads, head_dim), got shape {qa.shape}")
    lse = np.asarray(lse)
    b, n, h, _ = qa.shape
    if lse.dtype != np.float32 or lse.shape != (b, h, n):
        raise ValueError(f"lse must be a float32 array of shape {(b, h, n)}, got {lse.dtype} {lse.shape}")
    mod = _require_gpu()
    device = requested if requested is not None else mod.current_device()
    dev_objs = {name: DeviceArray.from_numpy(a, dt, device) for name, (a, _) in arrs.items()}
    dev_lse = DeviceArray.from_numpy(lse, "float32", device)
    grads, stats = run_backward(dev_objs["q"], dev_objs["k"], dev_objs["v"], dev_objs["o"], dev_lse,
                                dev_objs["dout"], segs, rates, causal, mode, scale, world_size, f"cuda:{device}")
    return tuple(_to_host(g, dt, qa.dtype) for g in grads), stats


# ------------------------------------------------------------- communicators

def run_comm(comm, arrays, lse, segs, rates, causal, mode, scale, return_lse=False, out=None):
    """One rank of an NCCL communicator on CUDA arrays (this rank's shards).

    arrays: (q, k, v) for the forward, returning (out[, lse]) as DeviceArrays
    (or out=); (q, k, v, o, dout) with the forward's lse for the backward,
    returning (dq, dk, dv).  Input that fails validation here is refused
    through the communicator's agreement, so the other ranks raise too."""
    from . import _core
    backward = len(arrays) == 5
    names = ("q", "k", "v", "o", "dout") if backward else ("q", "k", "v")
    objs = dict(zip(names, arrays))
    if out is not None:
        objs["out"] = out
    refs, lse_ref = {}, None
    try:
        try:
            for name, obj in list(objs.items()) + ([("lse", lse)] if backward else []):
                if classify(obj) != "cuda":
                    raise TypeError(f"{name}: an NCCL communicator runs on the GPU and takes CUDA arrays "
                                    f"(torch/CuPy tensors, DeviceArray), got {_describe(obj, classify(obj))}")
            refs, stream = _parse_cuda_args(objs, None)
            mod = _require_gpu()
            device = _resolve_devices(refs, None, mod)
            q = refs["q"]
            b, n, h, _ = q.shape
            if backward:
                lse_ref = _parse_lse(lse, q.shape, stream, device, mod)
        except (TypeError, ValueError) as e:
            comm.refuse(e)
            raise
        results = [DeviceArray(q.shape, q.dtype, device) for _ in range(3)] if backward else \
            [objs.get("out") or DeviceArray(q.shape, q.dtype, device)]
        if not backward and out is None:
            refs["out"] = _ref_of_device_array(results[0], "out")
        lse_out = DeviceArray((b, h, n), "float32", device) if return_lse and not backward else None
        mod.synchronize(stream if stream is not None else _LEGACY_STREAM, device)  # inputs are ready
        tensors = [refs[nm].ptr for nm in names] if backward else [refs[nm].ptr for nm in ("q", "k", "v", "out")]
        strides = [refs[nm].strides for nm in names] if backward else \
            [refs[nm].strides for nm in ("q", "k", "v", "out")]
        if backward:
            tensors += [g.ptr for g in results]
            strides += [_contiguous_strides(q.shape)] * 3
        lse_ptr = lse_ref.ptr if backward else (lse_out.ptr if lse_out is not None else None)
        stats = _core.run_device(comm.handle(), tensors, strides, lse_ptr, q.shape, _CODE[q.dtype], list(segs),
                                 list(rates), bool(causal), int(mode), float(scale))
    finally:
        for r in refs.values():
            r.release()
        if lse_ref is not None:
            lse_ref.release()
    if backward:
        return tuple(results), stats
    return ((results[0], lse_out) if return_lse else results[0]), stats


# ---------------------------------------------------------------- raw pointers

def cuda_forward_ptr(q_ptr, k_ptr, v_ptr, o_ptr, shape, dtype, segment_lengths, dilation_rates, *,
                     causal=False, mode="groups", scale=None, world_size=1, lse_ptr=None, strides=None,
                     stream=0, device=None):
    """ra_cuda_forward on raw device addresses (ints).

    shape: (b, n, h, d); dtype: 'float32', 'float16' or 'bfloat16' (or a NumPy
    dtype).  strides: None for C-contiguous tensors, one (stride_b, stride_n,
    stride_h[, 1]) tuple in elements for all four, or four such tuples (q, k,
    v, o).  lse_ptr: address of a float32 (b, h, n) buffer or None.  stream: a
    cudaStream_t as an int (0 or None: the default stream); the call synchronizes it
    before returning.  device: ordinal to make current (None: the current one).
    Returns one dict of statistics per rank (device bytes held, sent, ...).
    """
    from . import _validate as check
    name = dtype_name(dtype)
    if name is None:
        raise TypeError(f"dtype must be 'float32', 'float16' or 'bfloat16', got {dtype!r}")
    shape = _ints(shape, "shape")
    if len(shape) != 4 or any(x < 1 for x in shape):
        raise ValueError(f"shape must be 4 positive sizes (batch, seq, heads, head_dim), got {shape}")
    segs, rates = check.branches(segment_lengths, dilation_rates)
    mode_code = check.mode(mode)
    scale_v = check.scale(scale)
    world = check.positive_int(world_size, "world_size")
    if strides is None:
        st = [_contiguous_strides(shape)] * 4
    else:
        strides = list(strides)
        if strides and isinstance(strides[0], (tuple, list)):
            if len(strides) != 4:
                raise ValueError("strides must be one stride tuple or four (q, k, v, o)")
            st = [_ints(s, "strides") for s in strides]
        else:
            st = [_ints(strides, "strides")] * 4
    ptrs = {}
    for nm, p in (("q_ptr", q_ptr), ("k_ptr", k_ptr), ("v_ptr", v_ptr), ("o_ptr", o_ptr)):
        if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or p <= 0:
            raise ValueError(f"{nm} must be a non-zero device address (int), got {p!r}")
        ptrs[nm] = int(p)
    if lse_ptr is not None and (isinstance(lse_ptr, bool) or not isinstance(lse_ptr, (int, np.integer))):
        raise TypeError(f"lse_ptr must be an int address or None, got {lse_ptr!r}")
    if stream is None:
        stream = 0
    if isinstance(stream, bool) or not isinstance(stream, (int, np.integer)) or stream < 0:
        raise TypeError(f"stream must be a cudaStream_t as a non-negative int, got {stream!r}")
    dev = parse_device(device)
    if dev is not None and dev[0] != "cuda":
        raise ValueError(f"device must be a CUDA device, got {device!r}")
    mod = _require_gpu()
    stats = mod.run([ptrs["q_ptr"], ptrs["k_ptr"], ptrs["v_ptr"], ptrs["o_ptr"]],
                    None if lse_ptr is None else int(lse_ptr), shape, st, _CODE[name], segs, rates,
                    bool(causal), mode_code, scale_v, world, int(stream),
                    -1 if dev is None or dev[1] is None else dev[1], True)
    return list(stats)
