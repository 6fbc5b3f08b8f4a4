"""The call sequence of the GPU path (ringattn/_call.py) on a fake CUDA runtime.

The CUDA runtime functions of ringattn._ext are replaced by a fake whose
"device memory" is host memory at fake addresses, and whose run() computes
on the CPU: it views the device tensors as NumPy arrays and hands them to
the real _ext.run.  So, without a GPU, this checks what the Python side of
a GPU call does -- copies in and out for device="cuda", DeviceArray results,
out= and lse, the stream each call runs on and the streams it waits for,
the device it asks for -- and that every intake is released.  test_gpu.py
checks the same paths on a real GPU.
"""

import gc

import numpy as np
import pytest

import ringattn
from conftest import assert_lse_close, assert_out_close, make_qkv
from fakes import FakeCAI
from reference import reference_attention, reference_backward
from ringattn import DeviceArray, _ext

HAVE_GPU = ringattn.cuda_device_count() > 0
# a real GPU makes the real intake check where CAI pointers live: these fake ones are host memory
fake_cai = pytest.mark.skipif(HAVE_GPU, reason="fake CAI pointers are refused on a machine with a GPU")
REAL_RUN, REAL_INTAKE = _ext.run, _ext.intake  # the real ones, before any monkeypatch
TENSORS = ("q", "k", "v", "o", "lse", "dout", "dq", "dk", "dv")


class FakeRuntime:
    """Device memory at fake addresses, backed by host buffers."""

    def __init__(self):
        self.memory = {}       # base address -> uint8 buffer
        self.next = 0x7E00_0000_0000
        self.runs = []         # the keyword arguments of every run()
        self.synchronized = []

    def install(self, monkeypatch):
        for name in ("alloc", "free", "copy_to_device", "copy_to_host", "pointer_info", "current_device",
                     "synchronize", "run", "cuda_device_count", "have"):
            monkeypatch.setattr(_ext, name, getattr(self, name))

    # -- the runtime
    def have(self):
        return {"mpi": False, "nccl": False, "cuda": True}

    def cuda_device_count(self):
        return 1

    def current_device(self):
        return 0

    def alloc(self, nbytes, device=-1):
        ptr = self.next
        self.memory[ptr] = np.zeros(max(int(nbytes), 1), np.uint8)
        self.next += (int(nbytes) + 4095) // 4096 * 4096 + 4096
        return ptr

    def free(self, ptr, device=-1):
        del self.memory[ptr]

    def _buffer(self, ptr):
        for base, buf in self.memory.items():
            if base <= ptr < base + buf.nbytes:
                return buf, ptr - base
        raise AssertionError(f"{ptr:#x} is not fake device memory")

    def copy_to_device(self, dst, buffer, device=-1):
        buf, off = self._buffer(dst)
        src = np.ascontiguousarray(buffer).view(np.uint8).reshape(-1)
        buf[off:off + src.nbytes] = src

    def copy_to_host(self, buffer, src, device=-1):
        buf, off = self._buffer(src)
        dst = buffer.view(np.uint8).reshape(-1)
        dst[...] = buf[off:off + dst.nbytes]

    def pointer_info(self, ptr):
        self._buffer(ptr)
        return ("device", 0)

    def synchronize(self, stream=None, device=-1):
        self.synchronized.append(stream)

    # -- run(): the CPU computes on views of the fake device memory
    def _view(self, t):
        buf, off = self._buffer(t.ptr)
        return np.ndarray(t.shape, t.dtype, buffer=buf, offset=off, strides=[s * t.itemsize for s in t.strides])

    def run(self, **kw):
        # recorded without the Tensors, which would keep their arrays alive
        self.runs.append({key: getattr(x, "name", x) for key, x in kw.items()})
        if kw["device_type"] == _ext.DEVICE_CPU:
            return REAL_RUN(**kw)
        assert kw["device"] == 0 and kw["num_threads"] == 0 and not kw["check_finite"]
        views = {n: REAL_INTAKE(self._view(kw[n]), n) for n in TENSORS if kw.get(n) is not None}
        args = dict(kw, device_type=_ext.DEVICE_CPU, device=-1, stream=0, **views)
        try:
            return REAL_RUN(**args)
        finally:
            for t in views.values():
                t.release()


@pytest.fixture
def rt(monkeypatch):
    fake = FakeRuntime()
    fake.install(monkeypatch)
    return fake


def test_device_arrays_in_and_out(rt):
    q, k, v = make_qkv(1, 2, 64, 3, 16)
    dq, dk, dv = (DeviceArray.from_numpy(x) for x in (q, k, v))
    o, lse = ringattn.dilated_attention(dq, dk, dv, [32, 64], [1, 2], causal=True, return_lse=True)
    assert isinstance(o, DeviceArray) and isinstance(lse, DeviceArray) and lse.shape == (2, 3, 64)
    ro, rl = reference_attention(q, k, v, [32, 64], [1, 2], causal=True)
    assert_out_close(o.numpy(), ro, np.float32)
    assert_lse_close(lse.numpy(), rl, np.float32)
    (run,) = rt.runs
    assert run["device_type"] == _ext.DEVICE_CUDA and run["stream"] == 0 and run["comm"] is None
    assert run["o"] == "out" and run["lse"] == "lse"


def test_out_and_ring(rt):
    q, k, v = make_qkv(2, 1, 128, 2, 16, np.float16)
    args = [DeviceArray.from_numpy(x) for x in (q, k, v)]
    out = DeviceArray.full(q.shape, np.nan, "float16")
    ring = ringattn.RingDilatedAttention([64, 128], [1, 2], world_size=2)
    assert ring(*args, out=out) is out
    assert len(ring.last_stats["peak_bytes"]) == 2 and rt.runs[0]["world_size"] == 2
    ro, _ = reference_attention(q, k, v, [64, 128], [1, 2])
    assert_out_close(out.numpy(), ro, np.float16)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_host_arrays_with_device_cuda(rt, dtype):
    q, k, v = make_qkv(3, 2, 64, 2, 16, dtype)
    out = np.full(q.shape, np.nan, dtype)
    o, lse = ringattn.dilated_attention(q, np.asfortranarray(k), v, [64], [1], causal=True, device="cuda",
                                       return_lse=True, out=out)
    assert o is out and isinstance(lse, np.ndarray) and lse.dtype == np.float32
    ro, rl = reference_attention(q, k, v, [64], [1], causal=True)
    assert_out_close(out, ro, dtype)
    assert_lse_close(lse, rl, dtype)
    assert rt.runs[0]["device_type"] == _ext.DEVICE_CUDA
    assert not rt.memory  # every device copy freed
    o2 = ringattn.dilated_attention(q, k, v, [64], [1], causal=True, device="cuda:0")
    assert isinstance(o2, np.ndarray) and o2.dtype == dtype and np.array_equal(o2, out)


def test_backward_on_the_device_and_from_the_host(rt):
    q, k, v, g = make_qkv(4, 1, 64, 2, 16) + make_qkv(5, 1, 64, 2, 16)[:1]
    want = reference_backward(q, k, v, g, [32, 64], [1, 2], causal=True)
    args = [DeviceArray.from_numpy(x) for x in (q, k, v, g)]
    ring = ringattn.RingDilatedAttention([32, 64], [1, 2], causal=True, world_size=2)
    ring(*args[:3], requires_grad=True)
    grads = ring.backward(args[3])
    assert all(isinstance(x, DeviceArray) for x in grads)
    o, lse = ringattn.dilated_attention(q, k, v, [32, 64], [1, 2], causal=True, return_lse=True)
    host = ringattn.dilated_attention_backward(q, k, v, o, lse, g, [32, 64], [1, 2], causal=True, device="cuda")
    assert all(isinstance(x, np.ndarray) and x.dtype == np.float32 for x in host)
    for name, a, b, r in zip(("dq", "dk", "dv"), grads, host, want):
        err = np.abs(a.numpy() - r).max() / np.abs(r).max()
        assert err < 1e-4, (name, err)
        np.testing.assert_allclose(b, a.numpy(), rtol=0, atol=1e-6, err_msg=name)
    assert rt.runs[1]["backward"] and rt.runs[1]["lse"] == "lse"


class _CAIOf:
    """A DeviceArray seen through __cuda_array_interface__ with a chosen stream."""

    def __init__(self, a, stream):
        self.a = a
        self.__cuda_array_interface__ = dict(a.__cuda_array_interface__, stream=stream)


@fake_cai
def test_streams(rt):
    q, k, v = make_qkv(6, 1, 64, 2, 16)
    dq, dk, dv = (DeviceArray.from_numpy(x) for x in (q, k, v))
    # the first CAI stream named is the one the call runs on; the others are waited for
    ringattn.dilated_attention(_CAIOf(dq, 0x5000), _CAIOf(dk, None), _CAIOf(dv, 0x6000), [64], [1])
    assert rt.runs[-1]["stream"] == 0x5000 and rt.synchronized == [0x6000]
    # the legacy default stream (1) is spelled 0 for the core; DLPack producers get it
    ringattn.dilated_attention(_CAIOf(dq, 1), dk, dv, [64], [1])
    assert rt.runs[-1]["stream"] == 0


@fake_cai
def test_cuda_forward_ptr(rt):
    q, k, v = make_qkv(7, 1, 64, 2, 16)
    dq, dk, dv = (DeviceArray.from_numpy(x) for x in (q, k, v))
    o = DeviceArray.full(q.shape, np.nan)
    lse = DeviceArray.full((1, 2, 64), np.nan)
    stats = ringattn.cuda_forward_ptr(dq.ptr, dk.ptr, dv.ptr, o.ptr, q.shape, "float32", [64], [1], causal=True,
                                      lse_ptr=lse.ptr, stream=0x7000, world_size=2)
    assert isinstance(stats, list) and len(stats) == 2
    assert rt.runs[-1]["stream"] == 0x7000 and rt.runs[-1]["world_size"] == 2
    ro, rl = reference_attention(q, k, v, [64], [1], causal=True)
    assert_out_close(o.numpy(), ro, np.float32)
    assert_lse_close(lse.numpy(), rl, np.float32)


def test_every_intake_is_released(rt):
    """A consumed DLPack capsule keeps its DeviceArray alive until the deleter
    runs: once the arrays are dropped, all memory must be free again --
    after successful calls and after refused ones."""
    q, k, v = make_qkv(8, 1, 64, 2, 16)
    dq, dk, dv = (DeviceArray.from_numpy(x) for x in (q, k, v))
    o = ringattn.dilated_attention(dq, dk, dv, [64], [1])
    with pytest.raises(ValueError, match="out"):
        ringattn.dilated_attention(dq, dk, dv, [64], [1], out=DeviceArray((1, 64, 2, 8)))
    with pytest.raises(ValueError, match="segment"):
        ringattn.dilated_attention(dq, dk, dv, [48], [1])
    with pytest.raises(TypeError, match="dout"):
        ringattn.dilated_attention_backward(dq, dk, dv, o, DeviceArray((1, 2, 64)), DeviceArray(q.shape, "float16"),
                                            [64], [1])
    assert rt.memory
    del dq, dk, dv, o
    gc.collect()
    assert not rt.memory, f"{len(rt.memory)} allocations still alive"


@fake_cai
def test_requested_device_must_match(rt):
    a = DeviceArray.from_numpy(np.zeros((1, 64, 2, 16), np.float32))
    with pytest.raises(ValueError, match="q is on cuda:0 but the requested device is on cuda:1"):
        ringattn.dilated_attention(a, a, a, [64], [1], device="cuda:1")
    cai = FakeCAI(shape=(1, 64, 2, 16), ptr=a.ptr)  # device unknown (-1) without a real GPU: fine
    ringattn.dilated_attention(cai, a, a, [64], [1])
