"""_ext.intake of DLPack producers: capsules, deleters, streams, dtypes.

FakeDL builds its capsules with ctypes (tests/fakes.py) at fake device
addresses that nothing dereferences; NumPy's own __dlpack__ is a real
producer on the CPU.
"""

import gc

import numpy as np
import pytest

from fakes import BASE, DLPackOnly, FakeDL, FakeDLLegacy, capsule_name, w
from ringattn import _arrays, _ext


@pytest.mark.parametrize("cls,kind", [(FakeDL, "versioned"), (FakeDLLegacy, "legacy")])
def test_fake_cuda(cls, kind):
    f = cls(shape=(2, 8, 3, 16), device=(2, 1), byte_offset=64)
    t = _ext.intake(f, "q", 7)
    assert f.capsule_kinds == [kind]
    assert f.streams == [7]
    assert t.kind == "cuda" and t.device == 1 and t.source == "dlpack" and t.obj is f
    assert t.ptr == BASE + 64 and t.shape == (2, 8, 3, 16) and t.dtype == "float32"
    assert t.strides == (384, 48, 16, 1)  # strides NULL: compact row-major
    assert t.stream is None  # a CAI v3 notion
    assert f.deleted == 0  # held for the call
    t.release()
    t.release()  # idempotent
    assert f.deleted == 1


def test_legacy_default_stream():
    f = FakeDLLegacy()
    t = _ext.intake(f, "q")
    assert f.capsule_kinds == ["legacy"] and f.streams == [1]  # the legacy default stream asked for
    t.release()
    assert f.deleted == 1


def test_explicit_strides_and_size_one_axes():
    f = FakeDL(shape=(1, 8, 3, 16), strides=(-7, 64, 20, 1))
    t = _ext.intake(f, "k")
    assert t.strides == (384, 64, 20, 1)  # size-1 axis: its C-contiguous stride
    t.release()


def test_capsule_renamed_on_consumption():
    f = FakeDL()
    t = _ext.intake(f, "q")
    assert capsule_name(f.capsules[-1]) == "used_dltensor_versioned"
    t.release()
    assert f.deleted == 1
    g = FakeDLLegacy()
    t = _ext.intake(g, "q")
    assert capsule_name(g.capsules[-1]) == "used_dltensor"
    del t
    gc.collect()
    assert g.deleted == 1  # a dropped Tensor still calls the deleter


def test_consumed_capsule_refused():
    f = FakeDL()
    _ext.intake(f, "q").release()

    class Again(FakeDL):
        def __dlpack__(self, stream=None, max_version=None):
            return f.capsules[-1]  # already used

    with pytest.raises((TypeError, ValueError), match=w("q")):
        _ext.intake(Again(), "q")
    assert f.deleted == 1


def test_not_a_capsule():
    class Bad(FakeDL):
        def __dlpack__(self, stream=None, max_version=None):
            return object()

    with pytest.raises((TypeError, ValueError), match=w("q")):
        _ext.intake(Bad(), "q")


def test_readonly_flag():
    f = FakeDL(readonly=True)
    t = _ext.intake(f, "out")
    assert t.readonly
    t.release()
    g = FakeDLLegacy(readonly=True)  # legacy capsules have no flags
    t = _ext.intake(g, "out")
    assert not t.readonly
    t.release()


def test_unknown_major_version():
    f = FakeDL(version=(2, 0))
    with pytest.raises(ValueError, match=w("q")):
        _ext.intake(f, "q")
    assert f.deleted == 1


@pytest.mark.parametrize("code,bits,expect", [(2, 32, "float32"), (2, 16, "float16"), (4, 16, "bfloat16"),
                                              (2, 64, "float64")])
def test_dtypes(code, bits, expect):
    f = FakeDL(code=code, bits=bits)
    t = _ext.intake(f, "q")
    assert t.dtype == expect and t.itemsize == bits // 8
    t.release()


@pytest.mark.parametrize("code,bits,lanes", [(0, 32, 1), (1, 8, 1), (2, 32, 4), (5, 64, 1), (6, 8, 1),
                                             (4, 32, 1)])
def test_bad_dtype_releases(code, bits, lanes):
    f = FakeDL(code=code, bits=bits, lanes=lanes)
    with pytest.raises(TypeError, match=w("k")):
        _ext.intake(f, "k")
    assert f.deleted == 1


def test_bad_dtype_named():
    with pytest.raises(TypeError, match=w("k") + ".*int32"):
        _ext.intake(FakeDL(code=0, bits=32), "k")


def test_unsupported_device():
    f = FakeDL(device=(10, 0))  # ROCm
    assert _arrays.classify(f) == "other"
    with pytest.raises(ValueError, match=w("q") + ".*unsupported device"):
        _ext.intake(f, "q")
    assert f.deleted == 1


@pytest.mark.parametrize("device", [(1, 0), (3, 0)])
def test_host_devices(device):
    f = FakeDL(device=device)
    assert _arrays.classify(f) == "cpu"
    t = _ext.intake(f, "q")
    assert t.kind == "cpu"
    if device[0] == 1:
        assert f.streams == [None]  # no stream for a CPU producer
    t.release()


def test_managed_memory_is_cuda():
    f = FakeDL(device=(13, 2))
    t = _ext.intake(f, "q")
    assert (t.kind, t.device) == ("cuda", 2)
    t.release()


def test_numpy_producer():
    """NumPy as a real DLPack producer (kDLCPU): pointer, strides in elements, dtype."""
    base = np.arange(2 * 16 * 6 * 8, dtype=np.float32).reshape(2, 16, 6, 8)
    a = base[:, ::2, 1:5]  # a strided view
    t = _ext.intake(DLPackOnly(a), "q")
    assert t.kind == "cpu" and t.source == "dlpack" and t.dtype == "float32" and t.shape == a.shape
    assert t.ptr == a.ctypes.data
    assert t.strides == tuple(s // 4 for s in a.strides)
    t.release()
    assert np.array_equal(a, base[:, ::2, 1:5])  # still alive and intact
    t = _ext.intake(DLPackOnly(np.zeros((1, 4, 2, 8), np.float16)), "k")
    assert t.dtype == "float16" and t.strides == (64, 16, 8, 1)
    t.release()
    t = _ext.intake(DLPackOnly(np.zeros((1, 4, 2, 8))), "k")
    assert t.dtype == "float64"
    t.release()
    with pytest.raises(TypeError, match=w("v") + ".*int32"):
        _ext.intake(DLPackOnly(np.zeros((1, 4, 2, 8), np.int32)), "v")


def test_dlpack_preferred_over_cai():
    class Both(FakeDL):
        __cuda_array_interface__ = {"shape": (1,), "typestr": "<f4", "data": (BASE, False), "version": 3}

    f = Both()
    t = _ext.intake(f, "q")
    assert t.source == "dlpack" and t.shape == (1, 64, 4, 16)
    t.release()
