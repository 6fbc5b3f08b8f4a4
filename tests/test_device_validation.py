"""The rules on device arrays, through the public API (no GPU needed).

Every refusal names the argument and happens before a GPU is looked for;
valid fake arrays reach the GPU check (RuntimeError without CUDA; on a
machine with a GPU their fake addresses are refused as not device memory).
Every consumed DLPack capsule is handed back, whatever the outcome.
"""

import numpy as np
import pytest

import ringattn
from fakes import BASE, DLPackOnly, FakeCAI, FakeDL, FakeDLLegacy, fakes, w

HAVE_GPU = ringattn.cuda_device_count() > 0
no_gpu = pytest.mark.skipif(HAVE_GPU, reason="fake CAI pointers are refused on a machine with a GPU")


def _call(q, k, v, segs=(64,), rates=(1,), **kw):
    return ringattn.dilated_attention(q, k, v, list(segs), list(rates), **kw)


def _expect(exc, name, q, k, v, **kw):
    with pytest.raises(exc, match=w(name)):
        _call(q, k, v, **kw)


@pytest.mark.parametrize("kind", ["cai", "dl", "dl_legacy"])
def test_valid_fakes_reach_the_gpu_check(kind):
    q, k, v = fakes(kind)
    if HAVE_GPU:  # the fake addresses are then refused as not device memory
        with pytest.raises(ValueError, match=w("q")):
            _call(q, k, v)
    else:
        with pytest.raises(RuntimeError, match="CUDA"):
            _call(q, k, v)
    if kind != "cai":
        assert [f.deleted for f in (q, k, v)] == [1, 1, 1]  # every capsule handed back


def test_device_mismatch_dlpack():
    q, k, v = fakes("dl")
    k.device = (2, 1)
    _expect(ValueError, "k", q, k, v)
    assert [f.deleted for f in (q, k, v)] == [1, 1, 1]


def test_device_mismatch_requested():
    q, k, v = fakes("dl")
    with pytest.raises(ValueError, match=w("q") + ".*cuda:0.*cuda:1"):
        _call(q, k, v, device="cuda:1")


def test_cpu_dlpack_mixed_with_cuda():
    q, k, v = fakes("dl")
    host = DLPackOnly(np.zeros((1, 64, 4, 16), np.float32))
    _expect(ValueError, "v", q, k, host)
    _expect(ValueError, "q", host, k, v)


@no_gpu
def test_numpy_mixed_with_cuda():
    q, k, v = fakes("cai")
    a = np.zeros((1, 64, 4, 16), np.float32)
    with pytest.raises(ValueError, match=w("k") + ".*" + w("q")):
        _call(q, a, v)
    with pytest.raises(ValueError, match=w("k") + ".*" + w("q")):
        _call(q, a, v, device="cuda")


@no_gpu
def test_numpy_inputs_with_cuda_out_need_device():
    a = np.zeros((1, 64, 4, 16), np.float32)
    with pytest.raises(ValueError, match=w("out") + ".*device='cuda'"):
        _call(a, a, a, out=FakeCAI())


@no_gpu
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_bad_dtype(which):
    args = dict(zip("qkv", fakes("cai")))
    args[which] = FakeCAI(typestr="<f8", ptr=BASE)  # float64: a CPU dtype
    with pytest.raises(TypeError, match=w(which) + ".*float64"):
        _call(args["q"], args["k"], args["v"])


@pytest.mark.parametrize("which", ["k", "v"])
def test_mixed_dtypes(which):
    args = dict(zip("qkv", fakes("dl")))
    args[which] = FakeDL(bits=16, ptr=BASE + 2 ** 20)
    _expect(TypeError, which, args["q"], args["k"], args["v"])
    assert all(f.deleted == 1 for f in args.values())


@no_gpu
def test_mixed_protocols_are_fine_until_the_gpu_check():
    q = FakeCAI(ptr=BASE)
    k = FakeDL(ptr=BASE + 2 ** 20)
    v = FakeDLLegacy(ptr=BASE + 2 ** 21)
    with pytest.raises(RuntimeError, match="CUDA"):
        _call(q, k, v)
    assert k.deleted == 1 and v.deleted == 1


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_not_4d(which):
    args = dict(zip("qkv", fakes("dl")))
    args[which] = FakeDL(shape=(64, 4, 16))
    _expect(ValueError, which, args["q"], args["k"], args["v"])


@pytest.mark.parametrize("which", ["k", "v"])
def test_shape_mismatch(which):
    args = dict(zip("qkv", fakes("dl")))
    args[which] = FakeDL(shape=(1, 64, 4, 32))
    _expect(ValueError, which, args["q"], args["k"], args["v"])


def test_empty():
    q, k, v = fakes("dl", shape=(1, 0, 4, 16))
    _expect(ValueError, "q", q, k, v)


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_head_dim_not_contiguous(which):
    args = dict(zip("qkv", fakes("dl")))
    # (1, 64, 4, 16) float32 with the head dim strided by 2 elements
    args[which] = FakeDL(strides=(64 * 4 * 32, 4 * 32, 32, 2))
    with pytest.raises(ValueError, match=w(which) + ".*contiguous"):
        _call(args["q"], args["k"], args["v"])
    assert all(f.deleted == 1 for f in args.values())


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_negative_stride(which):
    args = dict(zip("qkv", fakes("dl")))
    args[which] = FakeDL(strides=(4096, -64, 16, 1))
    with pytest.raises(ValueError, match=w(which) + ".*non-negative"):
        _call(args["q"], args["k"], args["v"])
    assert all(f.deleted == 1 for f in args.values())


@no_gpu
def test_strided_but_valid_layouts_pass():
    # sequence-major (n, b, h, d) memory seen as (b, n, h, d): valid, not copied
    shape = (2, 64, 4, 16)
    st = (4 * 16 * 4, 2 * 4 * 16 * 4, 16 * 4, 4)
    q, k, v = (FakeCAI(shape=shape, strides=st, ptr=BASE + i * 2 ** 20) for i in range(3))
    with pytest.raises(RuntimeError, match="CUDA"):
        _call(q, k, v)


@no_gpu
def test_k_and_v_with_different_strides_pass():
    q, k, _ = fakes("cai")
    v = FakeCAI(shape=(1, 64, 4, 16), strides=(64 * 8 * 16 * 4, 8 * 16 * 4, 16 * 4, 4), ptr=BASE + 2 ** 22)
    with pytest.raises(RuntimeError, match="CUDA"):
        _call(q, k, v)


def test_misaligned_pointer():
    q, k, v = fakes("dl")
    _expect(ValueError, "q", FakeDL(ptr=BASE + 2), k, v)


def test_null_pointer():
    q, k, v = fakes("dl")
    _expect(ValueError, "k", q, FakeDL(ptr=0), v)


def test_out_checks():
    q, k, v = fakes("dl")
    out = BASE + 2 ** 22
    ro = FakeDL(ptr=out, readonly=True)
    _expect(ValueError, "out", q, k, v, out=ro)
    assert ro.deleted == 1
    _expect(ValueError, "out", q, k, v, out=FakeDL(ptr=out, shape=(1, 64, 4, 8)))
    _expect(TypeError, "out", q, k, v, out=FakeDL(ptr=out, bits=16))
    _expect(ValueError, "out", q, k, v, out=np.zeros((1, 64, 4, 16), np.float32))
    _expect(ValueError, "out", q, k, v, out=FakeDL(ptr=out, strides=(4096, 64, 16, 2)))
    _expect(TypeError, "out", q, k, v, out=[0.0])
    assert all(f.deleted == len(f.capsules) for f in (q, k, v))


@no_gpu
def test_cai_readonly_out():
    q, k, v = fakes("cai")
    _expect(ValueError, "out", q, k, v, out=FakeCAI(ptr=BASE + 2 ** 22, readonly=True))


@no_gpu
def test_config_errors_before_the_gpu_check():
    q, k, v = fakes("cai")
    with pytest.raises(ValueError, match="segment"):
        _call(q, k, v, segs=(48,), rates=(1,))
    with pytest.raises(ValueError, match="world_size"):
        ringattn.RingDilatedAttention([64], [1], world_size=3)(q, k, v)


def test_unsupported_device_through_the_api():
    f = FakeDL(device=(10, 0))  # ROCm
    with pytest.raises(ValueError, match=w("q") + ".*unsupported device"):
        _call(f, *fakes("dl")[1:])
    assert f.deleted == 1


def test_backward_rules():
    q, k, v = fakes("dl")
    o, dout = FakeDL(ptr=BASE + 2 ** 22), FakeDL(ptr=BASE + 2 ** 23)
    lse = FakeDL(shape=(1, 4, 64), ptr=BASE + 2 ** 24)
    args = (q, k, v, o, lse, dout, [64], [1])
    bwd = ringattn.dilated_attention_backward
    with pytest.raises(ValueError, match=w("dout")):
        bwd(*args[:5], np.zeros((1, 64, 4, 16), np.float32), [64], [1])
    with pytest.raises(ValueError, match=w("lse") + ".*shape"):
        bwd(q, k, v, o, FakeDL(shape=(1, 4, 32)), dout, [64], [1])
    with pytest.raises(TypeError, match=w("lse") + ".*float32"):
        bwd(q, k, v, o, FakeDL(shape=(1, 4, 64), bits=16), dout, [64], [1])
    with pytest.raises(ValueError, match=w("lse") + ".*contiguous"):
        bwd(q, k, v, o, FakeDL(shape=(1, 4, 64), strides=(256, 1, 4)), dout, [64], [1])
    with pytest.raises(TypeError, match=w("o")):
        bwd(q, k, v, FakeDL(bits=16), lse, dout, [64], [1])
    with pytest.raises((RuntimeError, ValueError)):
        bwd(*args)
    assert all(f.deleted == len(f.capsules) == 6 for f in (q, k, v))


def test_host_path_checks_without_gpu():
    a = np.zeros((1, 64, 4, 16), np.float32)
    with pytest.raises(TypeError, match=w("k")):
        _call(a, a.astype(np.float64), a, device="cuda")
    with pytest.raises(TypeError, match=w("v")):
        _call(a, a, a.astype(np.float16), device="cuda")
    with pytest.raises(ValueError, match=w("k")):
        _call(a, a[:, :32], a, device="cuda")
    with pytest.raises(ValueError, match=w("out")):
        _call(a, a, a, device="cuda", out=np.zeros((1, 64, 4, 8), np.float32))
    with pytest.raises(ValueError, match=w("out")):
        _call(a, a, a, device="cuda", out=np.broadcast_to(a[:1], a.shape))  # read-only
    if not HAVE_GPU:
        with pytest.raises(RuntimeError, match="CUDA"):
            _call(a, a, a, device="cuda")
        with pytest.raises(RuntimeError, match="CUDA"):
            ringattn.dilated_attention_backward(a, a, a, a, np.zeros((1, 4, 64), np.float32), a, [64], [1],
                                                device="cuda")
