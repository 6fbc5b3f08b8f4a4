"""Fake array producers for the tests that need no GPU.

They stand in for torch/CuPy: FakeCAI exposes a hand-made
__cuda_array_interface__; FakeDL's __dlpack__ returns a capsule built here
with ctypes from the DLPack spec (legacy "dltensor" and versioned
"dltensor_versioned"), independently of ringattn's own C declarations, and
counts the deleter calls.  The addresses are fake: nothing may dereference
them.  (ctypes lives only here, in the tests; the package has none.)
"""

import ctypes

import numpy as np

BASE = 0x7F00_0000_0000  # a fake, aligned device address


def w(name):
    """Regex matching the argument name as a word."""
    return rf"(?<![A-Za-z0-9_]){name}(?![A-Za-z0-9_])"


class FakeCAI:
    """An object exposing only __cuda_array_interface__."""

    def __init__(self, shape=(1, 64, 4, 16), typestr="<f4", ptr=BASE, strides=None, version=3,
                 stream=None, readonly=False, descr=None, mask=None, omit=()):
        cai = {"shape": tuple(shape), "typestr": typestr, "data": (ptr, readonly), "strides": strides,
               "version": version}
        if version >= 3:
            cai["stream"] = stream
        if descr is not None:
            cai["descr"] = descr
        if mask is not None:
            cai["mask"] = mask
        for key in omit:
            cai.pop(key)
        self.__cuda_array_interface__ = cai


# ------------------------------------------------------------- the DLPack ABI

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

_PyCapsule_New = ctypes.pythonapi.PyCapsule_New
_PyCapsule_New.restype = ctypes.py_object
_PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
_CAP_LEGACY = ctypes.create_string_buffer(b"dltensor")
_CAP_VERSIONED = ctypes.create_string_buffer(b"dltensor_versioned")


class FakeDL:
    """A DLPack producer (knows max_version) on a fake CUDA device.  Counts
    deleter calls and records the streams it was asked for."""

    def __init__(self, shape=(1, 64, 4, 16), code=2, bits=32, lanes=1, ptr=BASE, strides=None, device=(2, 0),
                 readonly=False, byte_offset=0, version=(1, 0)):
        self.shape, self.code, self.bits, self.lanes = tuple(shape), code, bits, lanes
        self.ptr, self.strides, self.device, self.readonly = ptr, strides, device, readonly
        self.byte_offset, self.version = byte_offset, version
        self.deleted = 0
        self.streams = []
        self.capsule_kinds = []
        self.capsules = []
        self._keep = []

    def __dlpack_device__(self):
        return self.device

    def __dlpack__(self, stream=None, max_version=None):
        self.streams.append(stream)
        return self._capsule(max_version is not None and max_version[0] >= 1)

    def _on_delete(self, addr):
        self.deleted += 1

    def _capsule(self, versioned):
        nd = len(self.shape)
        shape = (ctypes.c_int64 * nd)(*self.shape)
        strides = (ctypes.c_int64 * nd)(*self.strides) if self.strides is not None else None
        if versioned:
            m = DLManagedTensorVersioned()
            m.version.major, m.version.minor = self.version
            m.flags = DLPACK_FLAG_READ_ONLY if self.readonly else 0
        else:
            m = DLManagedTensor()
        t = m.dl_tensor
        t.data = self.ptr
        t.device.device_type, t.device.device_id = self.device
        t.ndim = nd
        t.dtype.code, t.dtype.bits, t.dtype.lanes = self.code, self.bits, self.lanes
        t.shape = ctypes.cast(shape, ctypes.POINTER(ctypes.c_int64))
        if strides is not None:
            t.strides = ctypes.cast(strides, ctypes.POINTER(ctypes.c_int64))
        t.byte_offset = self.byte_offset
        cb = _deleter_t(self._on_delete)
        m.deleter = cb
        self._keep.append((m, shape, strides, cb))
        self.capsule_kinds.append("versioned" if versioned else "legacy")
        cap = _PyCapsule_New(ctypes.addressof(m), _CAP_VERSIONED if versioned else _CAP_LEGACY, None)
        self.capsules.append(cap)
        return cap


class FakeDLLegacy(FakeDL):
    """An older producer: __dlpack__ knows no max_version (legacy capsules only)."""

    def __dlpack__(self, stream=None):
        self.streams.append(stream)
        return self._capsule(False)


class DLPackOnly:
    """Hides everything of an array but its DLPack methods."""

    def __init__(self, a):
        self.a = a

    def __dlpack__(self, **kw):
        return self.a.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self.a.__dlpack_device__()


def capsule_name(cap):
    """The name of a PyCapsule, from its repr (<capsule object "NAME" at ...>)."""
    return repr(cap).split('"')[1]


def fakes(kind="cai", shape=(1, 64, 4, 16), **kw):
    """Three fake q, k, v at distinct aligned addresses."""
    cls = {"cai": FakeCAI, "dl": FakeDL, "dl_legacy": FakeDLLegacy}[kind]
    size = int(np.prod(shape)) * 4
    return tuple(cls(shape=shape, ptr=BASE + i * (size + 256), **kw) for i in range(3))
