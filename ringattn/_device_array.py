"""DeviceArray: CUDA device memory owned by ringattn.

The GPU path returns its results as DeviceArrays (unless out= is given).
Memory comes from ``_ext.alloc`` and goes back through ``_ext.free`` when
the last owner -- the array, or a DLPack consumer holding its capsule --
is gone.  Both standard protocols are exported, so ``torch.from_dlpack(a)``
and ``cupy.asarray(a)`` use the memory without a copy.
"""

import weakref

import numpy as np

from . import _arrays, _ext

__all__ = ["DeviceArray"]

_CAI_TYPESTR = {"float32": "<f4", "float16": "<f2", "bfloat16": "<V2"}


class _Allocation:
    """Device memory, freed when the last owner goes away."""

    __slots__ = ("ptr", "nbytes", "device", "__weakref__")

    def __init__(self, nbytes, device):
        _arrays.require_gpu()
        if device is None:
            device = _ext.current_device()
        self.ptr = _ext.alloc(int(nbytes), int(device))
        self.nbytes = int(nbytes)
        self.device = int(device)
        fin = weakref.finalize(self, _free, self.ptr, self.device)
        fin.atexit = False  # at exit the driver reclaims everything; no CUDA calls then


def _free(ptr, device):
    try:
        _ext.free(ptr, device)
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
        name = _arrays.dtype_name(dtype)
        if name is None:
            raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
        shape = _arrays.int_tuple(shape if isinstance(shape, (tuple, list)) else (shape,), "shape")
        if any(n < 0 for n in shape):
            raise ValueError(f"shape must not be negative, got {shape}")
        if device is not None:
            dev = _arrays.parse_device(device)
            if dev[0] != "cuda":
                raise ValueError(f"DeviceArray lives on a CUDA device, got device={device!r}")
            device = dev[1]
        self._dtype = name
        self.shape = shape
        self.size = int(np.prod(shape, dtype=np.int64)) if shape else 1
        self.itemsize = _arrays.ITEMSIZE[name]
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
        name = _arrays.dtype_name(a.dtype if dtype is None else dtype)
        if name is None:
            raise TypeError(f"dtype must be float32, float16 or bfloat16, got {a.dtype if dtype is None else dtype}")
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
        _ext.copy_to_device(self.ptr, _arrays.device_bits(a, self._dtype), self.device)

    def numpy(self):
        """A host copy: float32/float16 as is, bfloat16 as float32."""
        return _arrays.caller_array(self._raw_numpy(), self._dtype, np.float32)

    def _raw_numpy(self):
        """A host copy holding the raw elements (bfloat16 as uint16 bits)."""
        host = np.empty(self.shape, dtype=np.uint16 if self._dtype == "bfloat16" else self._dtype)
        _ext.copy_to_host(host, self.ptr, self.device)
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
        return tuple(s * self.itemsize for s in _arrays.contiguous_strides(self.shape))

    def __len__(self):
        if not self.shape:
            raise TypeError("len() of a 0-d DeviceArray")
        return self.shape[0]

    def __repr__(self):
        return f"DeviceArray(shape={self.shape}, dtype={self._dtype}, device='cuda:{self.device}')"

    # ---- protocols
    @property
    def __cuda_array_interface__(self):
        cai = {"shape": self.shape, "typestr": _CAI_TYPESTR[self._dtype], "data": (self.ptr, False),
               "strides": None, "version": 3, "stream": None}  # our writes are complete: no ordering needed
        if self._dtype == "bfloat16":
            cai["descr"] = [("bfloat16", "<V2")]
        return cai

    def __dlpack_device__(self):
        return (_arrays.KDL_CUDA, self.device)

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        # Every ringattn call is synchronous, so the data is ready on any stream.
        if stream == 0:
            raise ValueError("stream 0 is ambiguous for CUDA; use 1 (legacy default) or 2 (per-thread)")
        if dl_device is not None and tuple(dl_device) != (_arrays.KDL_CUDA, self.device):
            raise BufferError(f"DeviceArray is on cuda:{self.device}; it cannot be exported to {dl_device}")
        if copy:
            raise BufferError("DeviceArray cannot export a copy through DLPack")
        versioned = max_version is not None and int(max_version[0]) >= 1
        return _ext.to_dlpack(self, self.ptr, _arrays.KDL_CUDA, self.device, self.shape, None, self._dtype,
                              versioned=versioned, readonly=False)
