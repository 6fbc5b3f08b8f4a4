"""Raw device addresses (cuda_forward_ptr), the extension's own memory checks
(_ext.run on Tensors), and what needs a GPU without one."""

import numpy as np
import pytest

import ringattn
from fakes import BASE, FakeCAI, w
from ringattn import _ext

HAVE_GPU = ringattn.cuda_device_count() > 0


def test_cuda_forward_ptr_argument_checks():
    args = (BASE, BASE + 4096, BASE + 8192, BASE + 12288, (1, 64, 4, 16))
    with pytest.raises(TypeError, match="dtype"):
        ringattn.cuda_forward_ptr(*args, "float64", [64], [1])
    with pytest.raises(ValueError, match="shape"):
        ringattn.cuda_forward_ptr(BASE, BASE, BASE, BASE, (64, 4, 16), "float32", [64], [1])
    with pytest.raises(ValueError, match="q_ptr"):
        ringattn.cuda_forward_ptr(0, BASE, BASE, BASE, (1, 64, 4, 16), "float32", [64], [1])
    with pytest.raises(ValueError, match="lse_ptr"):
        ringattn.cuda_forward_ptr(*args, "float32", [64], [1], lse_ptr=-8)
    with pytest.raises(ValueError, match="mode"):
        ringattn.cuda_forward_ptr(*args, "float32", [64], [1], mode="bogus")
    with pytest.raises(TypeError, match="stream"):
        ringattn.cuda_forward_ptr(*args, "float32", [64], [1], stream=-1)
    with pytest.raises(ValueError, match="strides"):
        ringattn.cuda_forward_ptr(*args, "float32", [64], [1], strides=[(4096, 64, 16)] * 3)
    with pytest.raises(ValueError, match="device"):
        ringattn.cuda_forward_ptr(*args, "float32", [64], [1], device="cpu")


@pytest.mark.skipif(HAVE_GPU, reason="checks the no-GPU behaviour")
def test_cuda_forward_ptr_rules_then_gpu_check():
    mib = 1 << 20  # apart by more than a tensor's 16 KiB: overlapping outputs are refused first
    args = (BASE, BASE + mib, BASE + 2 * mib, BASE + 3 * mib, (1, 64, 4, 16))
    with pytest.raises(ValueError, match="segment"):
        ringattn.cuda_forward_ptr(*args, "float32", [48], [1])
    with pytest.raises(ValueError, match=w("k") + ".*contiguous"):
        ringattn.cuda_forward_ptr(*args, "float32", [64], [1],
                                  strides=[(4096, 64, 16, 1), (4096, 64, 16, 2), (4096, 64, 16, 1), (4096, 64, 16, 1)])
    with pytest.raises(ValueError, match=w("q") + ".*aligned"):
        ringattn.cuda_forward_ptr(BASE + 2, *args[1:], "float32", [64], [1])
    for dtype in ("float32", "float16", "bfloat16"):
        with pytest.raises(RuntimeError, match="CUDA"):
            ringattn.cuda_forward_ptr(*args, dtype, [64], [1], lse_ptr=BASE + 4 * mib, strides=(4096, 64, 16))


@pytest.mark.skipif(HAVE_GPU, reason="checks the no-GPU behaviour")
def test_device_array_needs_a_gpu():
    with pytest.raises(RuntimeError, match="CUDA"):
        ringattn.DeviceArray((2, 3), "float32")
    with pytest.raises(RuntimeError, match="CUDA"):
        ringattn.DeviceArray.from_numpy(np.zeros(3, np.float32))


def test_device_array_argument_checks():
    with pytest.raises(TypeError, match="dtype"):
        ringattn.DeviceArray((2, 3), "float64")
    with pytest.raises(ValueError, match="shape"):
        ringattn.DeviceArray((2, -3))
    with pytest.raises(ValueError, match="device"):
        ringattn.DeviceArray((2, 3), device="cpu")


# ---------------------------------------------------- the extension's own checks

def _tensors(shape=(1, 64, 2, 16), dtype=np.float32, **arrays):
    """Tensors for q, k, v, o (+ more): zero-filled NumPy arrays unless given."""
    names = ("q", "k", "v", "o")
    objs = {n: np.zeros(shape, dtype) for n in names}
    objs.update(arrays)
    return {n: _ext.intake(a, n) for n, a in objs.items()}


def _run(tensors, **kw):
    args = dict(backward=False, lse=None, device_type=_ext.DEVICE_CPU, segment_lengths=[64], dilation_rates=[1],
                causal=False, mode=0, scale=0.0, world_size=1)
    args.update(kw)
    args = {key: value for key, value in args.items() if key not in tensors}
    try:
        return _ext.run(**tensors, **args)
    finally:
        for t in tensors.values():
            t.release()


def test_run_forward_on_tensors():
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, 64, 2, 16)).astype(np.float32) for _ in range(3))
    o = np.full_like(q, np.nan)
    lse = np.full((1, 2, 64), np.nan, np.float32)
    stats = _run(_tensors(q=q, k=k, v=v, o=o, lse=lse))
    assert len(stats) == 1 and stats[0]["peak_bytes"] > 0
    want, want_lse = ringattn.dilated_attention(q, k, v, [64], [1], return_lse=True)
    np.testing.assert_allclose(o, want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(lse, want_lse, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["k", "v", "o"])
def test_run_refuses_a_shape_mismatch(name):
    with pytest.raises(ValueError, match=w(name)):
        _run(_tensors(**{name: np.zeros((1, 64, 2, 8), np.float32)}))


@pytest.mark.parametrize("name", ["q", "k", "o"])
def test_run_refuses_a_strided_head_dim(name):
    wide = np.zeros((1, 64, 2, 32), np.float32)[..., ::2]
    with pytest.raises(ValueError, match=w(name)):
        _run(_tensors(**{name: wide}))


def test_run_refuses_negative_strides_and_read_only_output():
    with pytest.raises(ValueError, match=w("v")):
        _run(_tensors(v=np.zeros((1, 64, 2, 16), np.float32)[:, ::-1]))
    ro = np.zeros((1, 64, 2, 16), np.float32)
    ro.setflags(write=False)
    with pytest.raises(ValueError, match=w("o")):
        _run(_tensors(o=ro))


def test_run_refuses_a_dtype_mismatch():
    with pytest.raises(TypeError, match=w("k")):
        _run(_tensors(k=np.zeros((1, 64, 2, 16), np.float16)))


def test_run_refuses_a_bad_lse():
    with pytest.raises(ValueError, match=w("lse")):
        _run(_tensors(lse=np.zeros((1, 2, 32), np.float32)))
    with pytest.raises((TypeError, ValueError), match=w("lse")):
        _run(_tensors(lse=np.zeros((1, 2, 64), np.float64)))
    with pytest.raises(ValueError, match=w("lse")):
        _run(_tensors(lse=np.zeros((1, 64, 2), np.float32).transpose(0, 2, 1)))
    with pytest.raises(ValueError, match=w("lse")):  # the backward needs it
        _run(_tensors(dout=np.zeros((1, 64, 2, 16), np.float32), dq=np.zeros((1, 64, 2, 16), np.float32),
                      dk=np.zeros((1, 64, 2, 16), np.float32), dv=np.zeros((1, 64, 2, 16), np.float32)),
             backward=True)


def test_run_refuses_tensors_of_the_other_kind():
    """CPU kernels never get device pointers, and CUDA kernels never host ones."""
    with pytest.raises(ValueError, match=w("q")):
        _run(_tensors(q=FakeCAI(shape=(1, 64, 2, 16))))
    with pytest.raises(ValueError, match=w("q")):
        _run(_tensors(), device_type=_ext.DEVICE_CUDA)


@pytest.mark.skipif(HAVE_GPU, reason="checks the no-GPU behaviour")
def test_run_on_cuda_without_a_gpu_is_refused():
    fakes = {n: FakeCAI(shape=(1, 64, 2, 16), ptr=BASE + i * 2 ** 20) for i, n in enumerate("qkvo")}
    with pytest.raises((RuntimeError, TypeError, ValueError)):
        _run({n: _ext.intake(f, n) for n, f in fakes.items()}, device_type=_ext.DEVICE_CUDA)
