"""_ext.to_dlpack, ringattn's DLPack export (what DeviceArray.__dlpack__
uses), exercised on host memory: NumPy consumes the capsules, and ringattn's
own intake reads them back (no GPU needed)."""

import gc
import weakref

import numpy as np
import pytest

from ringattn import _ext


class _Owner:
    def __init__(self, a):
        self.a = a


class _Exporter:
    """Exports host memory through _ext.to_dlpack (device type CPU unless told)."""

    def __init__(self, owner, device=(1, 0), dtype="float32", shape=None, strides=None, readonly=False):
        self.owner, self.device, self.dtype = owner, device, dtype
        self.shape, self.strides, self.readonly = shape, strides, readonly

    def __dlpack_device__(self):
        return self.device

    def __dlpack__(self, stream=None, max_version=None, dl_device=None, copy=None):
        a = self.owner.a
        versioned = max_version is not None and max_version[0] >= 1
        return _ext.to_dlpack(self.owner, a.ctypes.data, self.device[0], self.device[1],
                              a.shape if self.shape is None else self.shape, self.strides, self.dtype,
                              versioned=versioned, readonly=self.readonly)


class _LegacyOnly(_Exporter):
    def __dlpack__(self, stream=None):
        return super().__dlpack__(stream)


def test_consumed_by_numpy():
    a = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    owner = _Owner(a)
    ref = weakref.ref(owner)
    b = np.from_dlpack(_Exporter(owner))
    assert b.ctypes.data == a.ctypes.data and np.array_equal(a, b)
    del owner
    gc.collect()
    assert ref() is not None  # b keeps the owner alive
    del b
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("dtype", ["float16", "float64"])
def test_strided(dtype):
    base = np.arange(4 * 6, dtype=dtype).reshape(4, 6)
    c = np.from_dlpack(_LegacyOnly(_Owner(base), dtype=dtype, shape=(4, 3), strides=(6, 1)))  # the left half
    assert c.dtype == np.dtype(dtype) and np.array_equal(c, base[:, :3])


@pytest.mark.parametrize("cls", [_Exporter, _LegacyOnly])
def test_parsed_back(cls):
    """ringattn's capsule read by ringattn's intake, as a CUDA bfloat16 tensor."""
    a = np.zeros((1, 8, 2, 16), np.uint16)
    owner = _Owner(a)
    ref = weakref.ref(owner)
    exp = cls(owner, device=(2, 0), dtype="bfloat16", readonly=True)
    t = _ext.intake(exp, "q")
    assert (t.kind, t.device, t.dtype, t.shape, t.ptr) == ("cuda", 0, "bfloat16", a.shape, a.ctypes.data)
    assert t.strides == (256, 32, 16, 1)
    assert t.readonly == (cls is _Exporter)  # the flag exists only in versioned capsules
    del owner, exp
    gc.collect()
    assert ref() is not None  # the consumed tensor holds the owner
    t.release()
    del t  # the Tensor keeps its producer (exp, holding owner) as t.obj
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("versioned", [True, False])
def test_unconsumed_capsule_frees_owner(versioned):
    owner = _Owner(np.zeros(4, np.float32))
    ref = weakref.ref(owner)
    cap = _ext.to_dlpack(owner, owner.a.ctypes.data, 2, 0, (4,), None, "float32", versioned=versioned)
    assert ("dltensor_versioned" if versioned else "dltensor") in repr(cap)
    del owner
    gc.collect()
    assert ref() is not None
    del cap
    gc.collect()
    assert ref() is None


def test_bad_dtype_refused():
    owner = _Owner(np.zeros(4, np.float32))
    with pytest.raises((TypeError, ValueError), match="int32"):
        _ext.to_dlpack(owner, owner.a.ctypes.data, 1, 0, (4,), None, "int32")
