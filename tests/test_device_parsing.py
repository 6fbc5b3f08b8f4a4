"""Parsing of device arrays (__cuda_array_interface__, DLPack) and the checks of
the GPU path -- everything that needs no GPU.

Fake producers stand in for torch/CuPy: objects exposing a hand-made
__cuda_array_interface__, and objects whose __dlpack__ returns a capsule built
here with ctypes (legacy "dltensor" and versioned "dltensor_versioned").
NumPy's own __dlpack__ exercises a real producer (CPU device type), and
numpy.from_dlpack a real consumer of ringattn's exported capsules.
"""

import ctypes
import gc
import weakref

import numpy as np
import pytest

import ringattn
from ringattn import _device

try:
    from ringattn import _cuda
except ImportError:  # pragma: no cover
    _cuda = None

HAVE_GPU = ringattn.cuda_device_count() > 0
BASE = 0x7F00_0000_0000  # a fake, aligned device address


def _w(name):
    """Regex matching the argument name as a word."""
    return rf"(?<![A-Za-z0-9_]){name}(?![A-Za-z0-9_])"


# ------------------------------------------------------------- fake producers

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
            m = _device.DLManagedTensorVersioned()
            m.version.major, m.version.minor = self.version
            m.flags = _device.DLPACK_FLAG_READ_ONLY if self.readonly else 0
        else:
            m = _device.DLManagedTensor()
        t = m.dl_tensor
        t.data = self.ptr
        t.device.device_type, t.device.device_id = self.device
        t.ndim = nd
        t.dtype.code, t.dtype.bits, t.dtype.lanes = self.code, self.bits, self.lanes
        t.shape = ctypes.cast(shape, ctypes.POINTER(ctypes.c_int64))
        if strides is not None:
            t.strides = ctypes.cast(strides, ctypes.POINTER(ctypes.c_int64))
        t.byte_offset = self.byte_offset
        cb = _device._deleter_t(self._on_delete)
        m.deleter = cb
        self._keep.append((m, shape, strides, cb))
        self.capsule_kinds.append("versioned" if versioned else "legacy")
        return _PyCapsule_New(ctypes.addressof(m), _CAP_VERSIONED if versioned else _CAP_LEGACY, None)


class FakeDLLegacy(FakeDL):
    """An older producer: __dlpack__ knows no max_version (legacy capsules only)."""

    def __dlpack__(self, stream=None):
        self.streams.append(stream)
        return self._capsule(False)


class DLPackOnly:
    """Hides everything of a NumPy array but its DLPack methods."""

    def __init__(self, a):
        self.a = a

    def __dlpack__(self, **kw):
        return self.a.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self.a.__dlpack_device__()


def _fakes(kind="cai", shape=(1, 64, 4, 16), **kw):
    """Three fake q, k, v at distinct aligned addresses."""
    cls = {"cai": FakeCAI, "dl": FakeDL, "dl_legacy": FakeDLLegacy}[kind]
    size = int(np.prod(shape)) * 4
    return tuple(cls(shape=shape, ptr=BASE + i * (size + 256), **kw) for i in range(3))


def _call(q, k, v, segs=(64,), rates=(1,), **kw):
    return ringattn.dilated_attention(q, k, v, list(segs), list(rates), **kw)


# -------------------------------------------------------------------- CAI parsing

@pytest.mark.parametrize("version", [2, 3])
def test_cai_contiguous(version):
    r = _device.parse_cai(FakeCAI(shape=(2, 8, 3, 16), version=version, readonly=True), "q")
    assert r.kind == "cuda" and r.device is None and r.source == "cai"
    assert r.ptr == BASE and r.shape == (2, 8, 3, 16) and r.dtype == "float32"
    assert r.strides == (8 * 3 * 16, 3 * 16, 16, 1)
    assert r.readonly and r.stream is None


def test_cai_strides_in_bytes_and_size_one_axes():
    # (b=1, n=8, h=3, d=16) float16 view with a padded head axis
    r = _device.parse_cai(FakeCAI(shape=(1, 8, 3, 16), typestr="<f2", strides=(999 * 2, 64 * 2, 20 * 2, 2)), "k")
    assert r.dtype == "float16"
    assert r.strides == (384, 64, 20, 1)  # size-1 batch axis: its C-contiguous stride


def test_cai_strides_not_multiple_of_itemsize():
    with pytest.raises(ValueError, match=_w("v")):
        _device.parse_cai(FakeCAI(shape=(1, 8, 3, 16), strides=(4096, 192, 66, 4)), "v")


def test_cai_stream_v3_and_v2():
    assert _device.parse_cai(FakeCAI(stream=12345), "q").stream == 12345
    assert _device.parse_cai(FakeCAI(stream=1), "q").stream == 1
    assert _device.parse_cai(FakeCAI(stream=2), "q").stream == 2
    cai = FakeCAI(version=2)
    cai.__cuda_array_interface__["stream"] = 999  # not part of v2: ignored
    assert _device.parse_cai(cai, "q").stream is None


def test_cai_stream_zero_refused():
    with pytest.raises(ValueError, match=_w("k") + ".*stream 0"):
        _device.parse_cai(FakeCAI(stream=0), "k")
    with pytest.raises(ValueError, match=_w("k")):
        _device.parse_cai(FakeCAI(stream=-3), "k")


@pytest.mark.parametrize("typestr,expect", [("<f4", "float32"), ("<f2", "float16"), ("=f4", "float32")])
def test_cai_typestr(typestr, expect):
    assert _device.parse_cai(FakeCAI(typestr=typestr), "q").dtype == expect


@pytest.mark.parametrize("typestr", ["<f8", "<i4", "|b1", "<u2", "<c8"])
def test_cai_bad_typestr(typestr):
    with pytest.raises(TypeError, match=_w("q")):
        _device.parse_cai(FakeCAI(typestr=typestr), "q")


def test_cai_big_endian_refused():
    with pytest.raises(TypeError, match=_w("q") + ".*big-endian"):
        _device.parse_cai(FakeCAI(typestr=">f4"), "q")


def test_cai_bfloat16():
    r = _device.parse_cai(FakeCAI(typestr="<V2", descr=[("bfloat16", "<V2")]), "q")
    assert r.dtype == "bfloat16"
    with pytest.raises(TypeError, match=_w("q") + ".*bfloat16"):
        _device.parse_cai(FakeCAI(typestr="<V2"), "q")


def test_cai_mask_and_missing_keys():
    with pytest.raises(ValueError, match=_w("q") + ".*mask"):
        _device.parse_cai(FakeCAI(mask=object()), "q")
    for key in ("shape", "typestr", "data"):
        with pytest.raises(ValueError, match=_w("k") + f".*{key}"):
            _device.parse_cai(FakeCAI(omit=(key,)), "k")


def test_cai_bad_data():
    f = FakeCAI()
    f.__cuda_array_interface__["data"] = (-5, False)
    with pytest.raises(ValueError, match=_w("q")):
        _device.parse_cai(f, "q")
    f.__cuda_array_interface__["data"] = BASE
    with pytest.raises(ValueError, match=_w("q")):
        _device.parse_cai(f, "q")


# ----------------------------------------------------------------- DLPack parsing

@pytest.mark.parametrize("versioned", [True, False])
def test_dlpack_fake_cuda(versioned):
    f = FakeDL(shape=(2, 8, 3, 16), device=(2, 1), byte_offset=64)
    r = _device.parse_dlpack(f, "q", stream=7, versioned=versioned)
    assert f.capsule_kinds == ["versioned" if versioned else "legacy"]
    assert f.streams == [7]
    assert r.kind == "cuda" and r.device == 1 and r.source == "dlpack"
    assert r.ptr == BASE + 64 and r.shape == (2, 8, 3, 16) and r.dtype == "float32"
    assert r.strides == (384, 48, 16, 1)  # strides NULL: compact row-major
    assert f.deleted == 0  # held for the call
    r.release()
    r.release()  # idempotent
    assert f.deleted == 1


def test_dlpack_legacy_fallback():
    f = FakeDLLegacy()
    r = _device.parse_dlpack(f, "q")
    assert f.capsule_kinds == ["legacy"] and f.streams == [1]  # legacy default stream asked for
    r.release()
    assert f.deleted == 1


def test_dlpack_capsule_renamed_on_consumption():
    f = FakeDL()
    cap = f.__dlpack__(stream=1, max_version=(1, 0))
    imp = _device.DLPackImport(cap, "q")
    assert _device._cap_get_name(cap) == b"used_dltensor_versioned"
    with pytest.raises(ValueError, match="already consumed"):
        _device.DLPackImport(cap, "q")
    imp.release()
    assert f.deleted == 1
    cap = f.__dlpack__(stream=1)
    imp = _device.DLPackImport(cap, "q")
    assert _device._cap_get_name(cap) == b"used_dltensor"
    del imp
    gc.collect()
    assert f.deleted == 2  # a dropped import still calls the deleter


def test_dlpack_not_a_capsule():
    class Bad(FakeDL):
        def __dlpack__(self, stream=None, max_version=None):
            return object()
    with pytest.raises(TypeError, match=_w("q") + ".*PyCapsule"):
        _device.parse_dlpack(Bad(), "q")


def test_dlpack_readonly_flag():
    f = FakeDL(readonly=True)
    r = _device.parse_dlpack(f, "out")
    assert r.readonly
    r.release()


def test_dlpack_unknown_major_version():
    f = FakeDL(version=(2, 0))
    with pytest.raises(ValueError, match=_w("q") + ".*version 2"):
        _device.parse_dlpack(f, "q")
    assert f.deleted == 1


@pytest.mark.parametrize("code,bits,expect", [(2, 32, "float32"), (2, 16, "float16"), (4, 16, "bfloat16")])
def test_dlpack_dtypes(code, bits, expect):
    f = FakeDL(code=code, bits=bits)
    r = _device.parse_dlpack(f, "q")
    assert r.dtype == expect
    r.release()


@pytest.mark.parametrize("code,bits,lanes", [(2, 64, 1), (0, 32, 1), (1, 8, 1), (2, 32, 4), (5, 64, 1), (6, 8, 1)])
def test_dlpack_bad_dtype_releases(code, bits, lanes):
    f = FakeDL(code=code, bits=bits, lanes=lanes)
    with pytest.raises(TypeError, match=_w("k")):
        _device.parse_dlpack(f, "k")
    assert f.deleted == 1


def test_dlpack_unsupported_device():
    f = FakeDL(device=(10, 0))  # ROCm
    assert _device.classify(f) == "other"
    with pytest.raises(ValueError, match=_w("q") + ".*rocm"):
        _device.parse_dlpack(f, "q")
    assert f.deleted == 1
    with pytest.raises(ValueError, match=_w("q") + ".*rocm"):
        _call(f, *_fakes("dl")[1:])


@pytest.mark.parametrize("versioned", [True, False])
def test_dlpack_numpy_producer(versioned):
    """NumPy as a real producer (kDLCPU): pointer, strides in elements, dtype."""
    base = np.arange(2 * 16 * 6 * 8, dtype=np.float32).reshape(2, 16, 6, 8)
    a = base[:, ::2, 1:5]  # a strided view
    r = _device.parse_dlpack(a, "q", versioned=versioned)
    assert r.kind == "cpu" and r.dtype == "float32" and r.shape == a.shape
    assert r.ptr == a.ctypes.data
    assert r.strides == tuple(s // 4 for s in a.strides)
    r.release()
    assert np.array_equal(a, base[:, ::2, 1:5])  # still alive and intact
    h = np.zeros((1, 4, 2, 8), np.float16)
    r = _device.parse_dlpack(h, "k", versioned=versioned)
    assert r.dtype == "float16" and r.strides == (64, 16, 8, 1)
    r.release()
    with pytest.raises(TypeError, match=_w("v") + ".*float64"):
        _device.parse_dlpack(np.zeros((1, 4, 2, 8)), "v", versioned=versioned)


# ---------------------------------------------------------- classification, device=

def test_classify_and_wants_gpu():
    q, k, v = _fakes()
    a = np.zeros((1, 64, 4, 16), np.float32)
    assert _device.classify(a) == "cpu"
    assert _device.classify(DLPackOnly(a)) == "cpu"
    assert _device.classify(q) == "cuda"
    assert _device.classify(FakeDL()) == "cuda"
    assert _device.classify(FakeDL(device=(13, 0))) == "cuda"  # managed memory
    assert not _device.wants_gpu(None, a, a, a)
    assert _device.wants_gpu(None, q, k, v)
    assert _device.wants_gpu(None, a, a, a, out=q)
    assert _device.wants_gpu("cuda", a, a, a)
    assert _device.wants_gpu("cuda:1", a, a, a)
    assert not _device.wants_gpu("cpu", a, a, a)


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "cuda:-1", -1, 1.5, True])
def test_bad_device(device):
    a = np.zeros((1, 64, 4, 16), np.float32)
    with pytest.raises((TypeError, ValueError), match=_w("device")):
        _call(a, a, a, device=device)
    with pytest.raises((TypeError, ValueError), match=_w("device")):
        ringattn.RingDilatedAttention([64], [1], device=device)


def test_parse_device():
    assert _device.parse_device(None) is None
    assert _device.parse_device("cpu") == ("cpu", None)
    assert _device.parse_device("cuda") == ("cuda", None)
    assert _device.parse_device("CUDA:3") == ("cuda", 3)
    assert _device.parse_device(2) == ("cuda", 2)


def test_device_cpu_with_cuda_inputs():
    q, k, v = _fakes()
    with pytest.raises(ValueError, match=_w("q") + ".*CUDA"):
        _call(q, k, v, device="cpu")


def test_numpy_path_unchanged():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 64, 4, 16)).astype(np.float32) for _ in range(3))
    o1 = _call(q, k, v)
    o2 = _call(q, k, v, device="cpu")
    assert isinstance(o1, np.ndarray) and np.array_equal(o1, o2)


# --------------------------------------------------- validation through the API

def _expect(exc, name, q, k, v, **kw):
    with pytest.raises(exc, match=_w(name)):
        _call(q, k, v, **kw)


@pytest.mark.parametrize("kind", ["cai", "dl", "dl_legacy"])
def test_valid_fakes_reach_the_gpu_check(kind):
    q, k, v = _fakes(kind)
    if HAVE_GPU:  # the fake addresses are then refused as not device memory
        with pytest.raises(ValueError, match=_w("q")):
            _call(q, k, v)
    else:
        with pytest.raises(RuntimeError, match="CUDA"):
            _call(q, k, v)
    if kind != "cai":
        assert [f.deleted for f in (q, k, v)] == [1, 1, 1]  # every capsule handed back


def test_device_mismatch_dlpack():
    q, k, v = _fakes("dl")
    k.device = (2, 1)
    _expect(ValueError, "k", q, k, v)
    assert [f.deleted for f in (q, k, v)] == [1, 1, 1]


def test_device_mismatch_requested():
    q, k, v = _fakes("dl")
    with pytest.raises(ValueError, match=_w("q") + ".*cuda:0.*cuda:1"):
        _call(q, k, v, device="cuda:1")


def test_cpu_dlpack_mixed_with_cuda():
    q, k, v = _fakes("dl")
    host = DLPackOnly(np.zeros((1, 64, 4, 16), np.float32))
    _expect(ValueError, "v", q, k, host)
    _expect(ValueError, "q", host, k, v)


def test_numpy_mixed_with_cuda():
    q, k, v = _fakes("cai")
    a = np.zeros((1, 64, 4, 16), np.float32)
    with pytest.raises(ValueError, match=_w("k") + ".*" + _w("q")):
        _call(q, a, v)
    with pytest.raises(ValueError, match=_w("k") + ".*" + _w("q")):
        _call(q, a, v, device="cuda")


def test_numpy_inputs_with_cuda_out_need_device():
    a = np.zeros((1, 64, 4, 16), np.float32)
    out = FakeCAI()
    with pytest.raises(ValueError, match=_w("out") + ".*device='cuda'"):
        _call(a, a, a, out=out)


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_bad_dtype(which):
    fakes = dict(zip("qkv", _fakes("cai")))
    fakes[which] = FakeCAI(typestr="<f8", ptr=BASE)
    _expect(TypeError, which, fakes["q"], fakes["k"], fakes["v"])


@pytest.mark.parametrize("which", ["k", "v"])
def test_mixed_dtypes(which):
    fakes = dict(zip("qkv", _fakes("dl")))
    fakes[which] = FakeDL(bits=16, ptr=BASE + 2 ** 20)
    _expect(TypeError, which, fakes["q"], fakes["k"], fakes["v"])
    assert all(f.deleted == 1 for f in fakes.values())


def test_mixed_protocols_are_fine_until_the_gpu_check():
    q = FakeCAI(ptr=BASE)
    k = FakeDL(ptr=BASE + 2 ** 20)
    v = FakeDLLegacy(ptr=BASE + 2 ** 21)
    with pytest.raises((RuntimeError, ValueError)):
        _call(q, k, v)
    assert k.deleted == 1 and v.deleted == 1


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_not_4d(which):
    fakes = dict(zip("qkv", _fakes("cai")))
    fakes[which] = FakeCAI(shape=(64, 4, 16))
    _expect(ValueError, which, fakes["q"], fakes["k"], fakes["v"])


@pytest.mark.parametrize("which", ["k", "v"])
def test_shape_mismatch(which):
    fakes = dict(zip("qkv", _fakes("cai")))
    fakes[which] = FakeCAI(shape=(1, 64, 4, 32))
    _expect(ValueError, which, fakes["q"], fakes["k"], fakes["v"])


def test_empty():
    q, k, v = _fakes("cai", shape=(1, 0, 4, 16))
    _expect(ValueError, "q", q, k, v)


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_head_dim_not_contiguous(which):
    fakes = dict(zip("qkv", _fakes("cai")))
    # (1, 64, 4, 16) float32 with the head dim strided by 2 elements
    fakes[which] = FakeCAI(strides=(64 * 4 * 32 * 4, 4 * 32 * 4, 32 * 4, 8))
    with pytest.raises(ValueError, match=_w(which) + ".*contiguous"):
        _call(fakes["q"], fakes["k"], fakes["v"])


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_negative_stride(which):
    fakes = dict(zip("qkv", _fakes("dl")))
    fakes[which] = FakeDL(strides=(4096, -64, 16, 1))
    with pytest.raises(ValueError, match=_w(which) + ".*non-negative"):
        _call(fakes["q"], fakes["k"], fakes["v"])
    assert all(f.deleted == 1 for f in fakes.values())


def test_strided_but_valid_layouts_pass():
    # sequence-major (n, b, h, d) memory seen as (b, n, h, d): valid, not copied
    shape = (2, 64, 4, 16)
    st = (4 * 16 * 4, 2 * 4 * 16 * 4, 16 * 4, 4)
    q, k, v = (FakeCAI(shape=shape, strides=st, ptr=BASE + i * 2 ** 20) for i in range(3))
    with pytest.raises((RuntimeError, ValueError)) as info:
        _call(q, k, v)
    assert "contiguous" not in str(info.value)


def test_misaligned_pointer():
    q, k, v = _fakes("cai")
    q = FakeCAI(ptr=BASE + 2)
    _expect(ValueError, "q", q, k, v)


def test_null_pointer():
    q, k, v = _fakes("cai")
    _expect(ValueError, "k", q, FakeCAI(ptr=0), v)


def test_out_checks():
    q, k, v = _fakes("cai")
    _expect(ValueError, "out", q, k, v, out=FakeCAI(ptr=BASE + 2 ** 22, readonly=True))
    _expect(ValueError, "out", q, k, v, out=FakeCAI(ptr=BASE + 2 ** 22, shape=(1, 64, 4, 8)))
    _expect(TypeError, "out", q, k, v, out=FakeCAI(ptr=BASE + 2 ** 22, typestr="<f2"))
    _expect(ValueError, "out", q, k, v, out=np.zeros((1, 64, 4, 16), np.float32))
    ro = FakeDL(ptr=BASE + 2 ** 22, readonly=True)
    _expect(ValueError, "out", q, k, v, out=ro)
    assert ro.deleted == 1


def test_config_errors_before_the_gpu_check():
    q, k, v = _fakes("cai")
    with pytest.raises(ValueError, match="segment"):
        _call(q, k, v, segs=(48,), rates=(1,))
    with pytest.raises(ValueError, match="world_size"):
        ringattn.RingDilatedAttention([64], [1], world_size=3)(q, k, v)


def test_ring_class_dispatches():
    q, k, v = _fakes("dl")
    k.device = (2, 3)
    ring = ringattn.RingDilatedAttention([64], [1], world_size=2)
    with pytest.raises(ValueError, match=_w("k")):
        ring(q, k, v)
    assert ring.last_stats is None


def test_cai_stream_is_passed_to_dlpack_producers():
    q = FakeCAI(ptr=BASE, stream=0xABC0)
    k = FakeDL(ptr=BASE + 2 ** 20)
    v = FakeDLLegacy(ptr=BASE + 2 ** 21)
    with pytest.raises((RuntimeError, ValueError)):
        _call(q, k, v)
    assert k.streams == [0xABC0] and v.streams == [0xABC0]
    q, k, v = _fakes("dl")
    with pytest.raises((RuntimeError, ValueError)):
        _call(q, k, v)
    assert q.streams == [1]  # no CAI stream: the legacy default stream


def test_choose_stream():
    refs = {"q": _device.parse_cai(FakeCAI(stream=5), "q"), "k": _device.parse_cai(FakeCAI(stream=None), "k"),
            "v": _device.parse_cai(FakeCAI(stream=9), "v"), "out": _device.parse_cai(FakeCAI(stream=5), "out")}
    assert _device._choose_stream(refs) == (5, [9])


def test_host_path_checks_without_gpu():
    a = np.zeros((1, 64, 4, 16), np.float32)
    with pytest.raises(TypeError, match=_w("k")):
        _call(a, a.astype(np.float64), a, device="cuda")
    with pytest.raises(TypeError, match=_w("v")):
        _call(a, a, a.astype(np.float16), device="cuda")
    with pytest.raises(ValueError, match=_w("k")):
        _call(a, a[:, :32], a, device="cuda")
    with pytest.raises(ValueError, match=_w("out")):
        _call(a, a, a, device="cuda", out=np.zeros((1, 64, 4, 8), np.float32))
    if not HAVE_GPU:
        with pytest.raises(RuntimeError, match="CUDA"):
            _call(a, a, a, device="cuda")


# ------------------------------------------------------------------ raw pointers

def test_cuda_forward_ptr_argument_checks():
    args = (BASE, BASE + 4096, BASE + 8192, BASE + 12288, (1, 64, 4, 16))
    with pytest.raises(TypeError, match="dtype"):
        ringattn.cuda_forward_ptr(*args, "float64", [64], [1])
    with pytest.raises(ValueError, match="shape"):
        ringattn.cuda_forward_ptr(BASE, BASE, BASE, BASE, (64, 4, 16), "float32", [64], [1])
    with pytest.raises(ValueError, match="q_ptr"):
        ringattn.cuda_forward_ptr(0, BASE, BASE, BASE, (1, 64, 4, 16), "float32", [64], [1])
    with pytest.raises(ValueError, match="mode"):
        ringattn.cuda_forward_ptr(*args, "float32", [64], [1], mode="bogus")
    with pytest.raises(TypeError, match="stream"):
        ringattn.cuda_forward_ptr(*args, "float32", [64], [1], stream=-1)
    if not HAVE_GPU:
        with pytest.raises(RuntimeError, match="CUDA"):
            ringattn.cuda_forward_ptr(*args, "bfloat16", [64], [1])


@pytest.mark.skipif(HAVE_GPU, reason="checks the no-GPU behaviour")
def test_device_array_needs_a_gpu():
    with pytest.raises(RuntimeError, match="CUDA"):
        ringattn.DeviceArray((2, 3), "float32")


@pytest.mark.skipif(_cuda is None, reason="ringattn._cuda not built")
def test_raw_forward_without_gpu_is_refused():
    if HAVE_GPU:
        pytest.skip("a GPU is present")
    # the C entry point itself: plan errors first, then "no device"/"no CUDA"
    with pytest.raises(ValueError, match="segment"):
        _cuda.run([BASE] * 4, None, (1, 64, 4, 16), [(4096, 64, 16, 1)] * 4, 0, [48], [1],
                   False, 0, 0.0, 1)
    with pytest.raises(ValueError, match=_w("k") + ".*contiguous"):
        _cuda.run([BASE] * 4, None, (1, 64, 4, 16), [(4096, 64, 16, 1), (4096, 64, 16, 2)] * 2,
                      0, [64], [1], False, 0, 0.0, 1)
    with pytest.raises(TypeError, match="dtype"):
        _cuda.run([BASE] * 4, None, (1, 64, 4, 16), [(4096, 64, 16, 1)] * 4, 7, [64], [1],
                   False, 0, 0.0, 1)
    with pytest.raises(Exception):  # noqa: B017 - no device: a RingAttnError or TypeError from the core
        _cuda.run([BASE] * 4, None, (1, 64, 4, 16), [(4096, 64, 16, 1)] * 4, 0, [64], [1],
                   False, 0, 0.0, 1)
    # the backward: 8 tensors and the forward's lse
    with pytest.raises(ValueError, match="lse"):
        _cuda.run([BASE] * 8, None, (1, 64, 4, 16), [(4096, 64, 16, 1)] * 8, 0, [64], [1], False, 0, 0.0, 1)
    with pytest.raises(ValueError, match="4 .forward. or 8"):
        _cuda.run([BASE] * 5, BASE, (1, 64, 4, 16), [(4096, 64, 16, 1)] * 5, 0, [64], [1], False, 0, 0.0, 1)
    with pytest.raises(ValueError, match="one stride tuple per tensor"):
        _cuda.run([BASE] * 8, BASE, (1, 64, 4, 16), [(4096, 64, 16, 1)] * 4, 0, [64], [1], False, 0, 0.0, 1)
    with pytest.raises(Exception):  # noqa: B017 - no device
        _cuda.run([BASE] * 8, BASE, (1, 64, 4, 16), [(4096, 64, 16, 1)] * 8, 0, [64], [1], False, 0, 0.0, 1)


# ------------------------------------------------------------- bfloat16 helpers

def test_bf16_conversion():
    x = np.array([0.0, -0.0, 1.0, -2.5, 3.140625, 1e-40, np.inf, -np.inf, np.nan, 65504.0], np.float32)
    bits = _device.f32_to_bf16_bits(x)
    back = _device.bf16_bits_to_f32(bits)
    fin = np.isfinite(x)
    assert np.allclose(back[fin], x[fin], rtol=2 ** -8, atol=1e-38)
    assert np.isnan(back[8]) and back[6] == np.inf and back[7] == -np.inf
    # round to nearest even: 1 + 2^-8 is halfway between 1 and 1 + 2^-7 -> 1
    halfway = np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8], np.float32)
    assert list(_device.bf16_bits_to_f32(_device.f32_to_bf16_bits(halfway))) == [1.0, 1 + 2 ** -6]
    rng = np.random.default_rng(1)
    y = rng.standard_normal(1000).astype(np.float32)
    assert np.max(np.abs(_device.bf16_bits_to_f32(_device.f32_to_bf16_bits(y)) - y) / np.abs(y)) <= 2 ** -8


# ------------------------------------------------------------------- DLPack export

needs_cuda_ext = pytest.mark.skipif(_cuda is None, reason="ringattn._cuda not built")


class _Owner:
    def __init__(self, a):
        self.a = a


class _Exporter:
    """Exports host memory through ringattn._cuda.to_dlpack (device type CPU)."""

    def __init__(self, owner, device=(1, 0), code=2, bits=32, strides=None, readonly=False):
        self.owner, self.device, self.code, self.bits = owner, device, code, bits
        self.strides, self.readonly = strides, readonly

    def __dlpack_device__(self):
        return self.device

    def __dlpack__(self, stream=None, max_version=None, dl_device=None, copy=None):
        a = self.owner.a
        versioned = max_version is not None and max_version[0] >= 1
        return _cuda.to_dlpack(self.owner, a.ctypes.data, self.device[0], self.device[1], a.shape, self.strides,
                               self.code, self.bits, versioned, self.readonly)


@needs_cuda_ext
def test_export_consumed_by_numpy():
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


@needs_cuda_ext
@pytest.mark.parametrize("versioned", [True, False])
def test_export_strided_float16(versioned):
    base = np.arange(4 * 6, dtype=np.float16).reshape(4, 6)

    class Strided(_Exporter):  # the (4, 3) left half of base: element strides (6, 1)
        def __dlpack__(self, stream=None, max_version=None, dl_device=None, copy=None):
            v = versioned and max_version is not None and max_version[0] >= 1  # NumPy < 2.1: legacy only
            return _cuda.to_dlpack(self.owner, base.ctypes.data, 1, 0, (4, 3), (6, 1), 2, 16, v)

    c = np.from_dlpack(Strided(_Owner(base)))
    assert c.dtype == np.float16 and np.array_equal(c, base[:, :3])


@needs_cuda_ext
@pytest.mark.parametrize("versioned", [True, False])
def test_export_parsed_back(versioned):
    """ringattn's capsule read by ringattn's parser, as a CUDA bfloat16 tensor."""
    a = np.zeros((1, 8, 2, 16), np.uint16)
    owner = _Owner(a)
    ref = weakref.ref(owner)
    exp = _Exporter(owner, device=(2, 0), code=4, bits=16, readonly=True)
    r = _device.parse_dlpack(exp, "q", versioned=versioned)
    assert (r.kind, r.device, r.dtype, r.shape, r.ptr) == ("cuda", 0, "bfloat16", a.shape, a.ctypes.data)
    assert r.strides == (256, 32, 16, 1)
    assert r.readonly == versioned  # the flag exists only in versioned capsules
    r.release()
    del r
    imp = _device.dlpack_export(exp, "q", stream=1, versioned=versioned)
    assert imp.versioned == versioned and imp.address == a.ctypes.data
    del owner, exp
    gc.collect()
    assert ref() is not None  # the consumed tensor holds the owner
    imp.release()
    gc.collect()
    assert ref() is None


@needs_cuda_ext
@pytest.mark.parametrize("versioned", [True, False])
def test_export_unconsumed_capsule_frees_owner(versioned):
    owner = _Owner(np.zeros(4, np.float32))
    ref = weakref.ref(owner)
    cap = _cuda.to_dlpack(owner, owner.a.ctypes.data, 2, 0, (4,), None, 2, 32, versioned)
    del owner
    gc.collect()
    assert ref() is not None
    del cap
    gc.collect()
    assert ref() is None
