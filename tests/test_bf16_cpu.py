"""bfloat16 on the CPU (issue 11, item 5): inputs and outputs bfloat16,
computed in float32, through NumPy (ml_dtypes' bfloat16; skipped without
it) and torch CPU tensors (DLPack), forward and backward, against the
float64 reference of the same (bfloat16-rounded) inputs.  Outputs are
poisoned with NaN before every run, so an element the kernels skip shows.

Tolerances: the float32 computation adds ~1e-6; what remains is one
bfloat16 rounding of each output (half an ulp: 2^-9 relative), so outputs
are compared with rtol 2^-8 plus a small atol for values near zero (the
NumPy backward's reference takes the same bfloat16 o and lse; against
torch's float64 autograd, whose o is exact, gradients get 2^-7 of their
largest value).
"""

import numpy as np
import pytest
from conftest import make_qkv

import ringattn
from ringattn import _arrays

ml_dtypes = pytest.importorskip("ml_dtypes", reason="NumPy bfloat16 needs ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)

CONFIGS = [  # (segment_lengths, dilation_rates, causal, mode)
    ([64], [1], False, "groups"),
    ([16, 64], [1, 2], True, "groups"),
    ([32, 64], [2, 4], False, "longnet"),
]


def _bf16(*arrays):
    return tuple(a.astype(BF16) for a in arrays)


def _f64(*arrays):
    return tuple(np.asarray(a).astype(np.float64) for a in arrays)


def _close(got, want, what, atol=2e-3):
    got = np.asarray(got).astype(np.float64)
    err = np.abs(got - want) - (2 ** -8 * np.abs(want) + atol)
    assert np.isfinite(got).all(), f"{what}: non-finite values (an element never written?)"
    assert err.max() <= 0, f"{what}: off by {err.max()} beyond the bfloat16 tolerance"


@pytest.mark.parametrize("segs, rates, causal, mode", CONFIGS)
def test_numpy_forward_and_backward_match_float64(segs, rates, causal, mode):
    q, k, v = _bf16(*make_qkv(3, 2, 64, 4, 32))
    dout = _bf16(np.random.default_rng(7).standard_normal(q.shape))[0]
    kw = dict(causal=causal, mode=mode)
    out = np.full(q.shape, np.nan, BF16)  # poisoned
    o, lse = ringattn.dilated_attention(q, k, v, segs, rates, out=out, return_lse=True, **kw)
    assert o is out and o.dtype == BF16 and lse.dtype == np.float32
    o64, lse64 = ringattn.dilated_attention(*_f64(q, k, v), segs, rates, return_lse=True, **kw)
    _close(o, o64, "o")
    fin = np.isfinite(lse64)
    assert np.array_equal(fin, np.isfinite(lse)) and np.allclose(lse[fin], lse64[fin], atol=1e-4)

    ring = ringattn.RingDilatedAttention(segs, rates, **kw)
    grads = tuple(np.full(q.shape, np.nan, BF16) for _ in range(3))  # poisoned
    got = ring._backward((q, k, v, o, lse), dout, grads=grads)
    want = ringattn.dilated_attention_backward(*_f64(q, k, v, o), lse.astype(np.float64), *_f64(dout), segs,
                                               rates, **kw)
    for name, g, w, buf in zip(("dq", "dk", "dv"), got, want, grads):
        assert g is buf and g.dtype == BF16
        _close(g, w, name)


@pytest.mark.parametrize("world_size", [2, 4])
def test_numpy_ring_equals_single_rank(world_size):
    q, k, v = _bf16(*make_qkv(5, 1, 128, 4, 16))
    segs, rates = [32, 128], [1, 2]
    one = ringattn.dilated_attention(q, k, v, segs, rates, causal=True)
    ring = ringattn.RingDilatedAttention(segs, rates, causal=True, world_size=world_size)(q, k, v)
    o64 = ringattn.dilated_attention(*_f64(q, k, v), segs, rates, causal=True)
    _close(ring, o64, "ring")
    _close(one, o64, "single rank")


def test_store_rounds_to_nearest_even_and_keeps_nan():
    """Two keys with equal scores (q = 0): o = (v1 + v2) / 2, exact in float32,
    often a tie for bfloat16: the stored bits must be NumPy's round to
    nearest even (_arrays.f32_to_bf16_bits); NaN stays NaN, inf stays inf."""
    rng = np.random.default_rng(11)
    n, h, d = 2, 1, 4096
    v = rng.standard_normal((1, n, h, d)).astype(BF16)
    v[0, 0, 0, :3] = [np.nan, np.inf, -np.inf]
    v[0, 1, 0, :3] = [1.0, 1.0, 1.0]
    q = np.zeros((1, n, h, d), BF16)
    o = ringattn.dilated_attention(q, q, v, [n], [1], nan_policy="propagate")[0, 1, 0]
    v32 = v.astype(np.float32)
    mean = (v32[0, 0, 0] + v32[0, 1, 0]) / np.float32(2)
    want = _arrays.f32_to_bf16_bits(mean)
    got = o.view(np.uint16)
    assert np.isnan(o[0].astype(np.float32)) and o[1] == np.inf and o[2] == -np.inf
    assert np.array_equal(got[3:], want[3:])
    ties = (mean[3:].view(np.uint32) & 0xFFFF) == 0x8000
    assert ties.sum() > 50  # the test does exercise ties


def test_nan_policy_raise_scans_bfloat16():
    q, k, v = _bf16(*make_qkv(2, 1, 32, 2, 8))
    v[0, 5, 1, 3] = np.nan
    with pytest.raises(ValueError, match="v contains NaN"):
        ringattn.dilated_attention(q, k, v, [32], [1])
    k[0, 1, 0, 0] = np.inf
    with pytest.raises(ValueError, match="k contains NaN or Inf"):
        ringattn.dilated_attention(q, k, v, [32], [1])


def test_bfloat16_and_float32_do_not_mix():
    q, k, v = make_qkv(2, 1, 32, 2, 8)
    with pytest.raises(TypeError, match="k has dtype"):
        ringattn.dilated_attention(q.astype(BF16), k, v, [32], [1])


# ------------------------------------------------------------------- torch

def test_torch_bfloat16_cpu_tensors():
    torch = pytest.importorskip("torch")
    import ringattn.torch as rt
    segs, rates = [16, 64], [1, 2]
    q, k, v = (torch.from_numpy(a).to(torch.bfloat16).requires_grad_() for a in make_qkv(4, 2, 64, 4, 32))
    # plain ringattn with torch tensors: a NumPy (ml_dtypes) result
    o_np = ringattn.dilated_attention(q.detach(), k.detach(), v.detach(), segs, rates, causal=True)
    assert o_np.dtype == BF16
    o = rt.dilated_attention(q, k, v, segs, rates, causal=True)
    assert o.dtype == torch.bfloat16
    assert np.array_equal(o.detach().view(torch.int16).numpy(), o_np.view(np.int16))
    g = torch.from_numpy(np.random.default_rng(3).standard_normal(o.shape)).to(torch.bfloat16)
    o.backward(g)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o64 = rt.dilated_attention(q64, k64, v64, segs, rates, causal=True)
    o64.backward(g.double())
    _close(o.detach().float().numpy(), o64.detach().numpy(), "o")
    for name, t, t64 in (("dq", q, q64), ("dk", k, k64), ("dv", v, v64)):
        assert t.grad.dtype == torch.bfloat16
        # the reference's delta = dO . o uses the exact o, ringattn's the stored bfloat16 o
        want = t64.grad.numpy()
        _close(t.grad.float().numpy(), want, name, atol=2 ** -7 * np.abs(want).max())


def test_torch_module_bfloat16():
    torch = pytest.importorskip("torch")
    import ringattn.torch as rt
    torch.manual_seed(0)
    mha = rt.MultiheadDilatedAttention(64, 4, [16, 32], [1, 2], causal=True, dtype=torch.bfloat16)
    x = torch.randn(2, 32, 64, dtype=torch.bfloat16, requires_grad=True)
    y, _ = mha(x, x, x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()
