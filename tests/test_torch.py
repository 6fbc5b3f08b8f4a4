"""ringattn.torch: autograd through the ring, against torch autograd of a float64 reference.

Skipped when torch is not installed.  The reference is the definition
written in torch (softmax weighted by the multiplicity matrix of the cells,
see reference.multiplicity), differentiated by torch itself in float64.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import ringattn.torch as rt  # noqa: E402
from reference import multiplicity  # noqa: E402


def torch_reference(q, k, v, segs, rates, causal, mode):
    b, n, h, d = q.shape
    M = torch.as_tensor(multiplicity(n, h, segs, rates, causal, mode), dtype=q.dtype)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / d ** 0.5
    s = s.masked_fill(M == 0, float("-inf"))
    w = torch.exp(s - s.amax(dim=-1, keepdim=True).clamp_min(-1e30)) * M
    w = w / w.sum(dim=-1, keepdim=True).clamp_min(1e-300)
    return torch.einsum("bhqk,bkhd->bqhd", w, v)


def grads_of(fn, q, k, v, g):
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(g)
    return out.detach(), q.grad, k.grad, v.grad


CASES = [
    ([64], [1], False, "groups"),
    ([16, 64], [1, 2], True, "groups"),
    ([16, 32, 64], [1, 2, 4], True, "longnet"),
]


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("segs,rates,causal,mode", CASES)
def test_gradients_match_torch_autograd_of_the_definition(segs, rates, causal, mode, world_size):
    gen = torch.Generator().manual_seed(0)
    q, k, v, g = (torch.randn(2, 64, 3, 16, generator=gen) for _ in range(4))
    want = grads_of(lambda a, b, c: torch_reference(a, b, c, segs, rates, causal, mode),
                    q.double(), k.double(), v.double(), g.double())
    layer = rt.RingDilatedAttention(segs, rates, causal=causal, mode=mode, world_size=world_size)
    got = grads_of(layer, q, k, v, g)
    for name, x, ref in zip(("o", "dq", "dk", "dv"), got, want):
        assert x.dtype == torch.float32
        err = float((x.double() - ref).abs().max()) / max(float(ref.abs().max()), 1e-6)
        assert err < 1e-4, (name, err)
    assert len(layer.last_stats["peak_bytes"]) == world_size


def test_gradcheck_float32():
    # the core computes in float32 (float64 is refused), so gradcheck runs in
    # float32 with a step and tolerances that fit it
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 8, 2, 4, generator=gen, requires_grad=True) for _ in range(3))
    fn = lambda a, b, c: rt.dilated_attention(a, b, c, [8], [2], causal=True, mode="longnet")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-2, atol=2e-3, rtol=2e-2, fast_mode=False)


def test_float16_gradients_keep_dtype_and_noncontiguous_inputs():
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(1, 3, 32, 16, generator=gen)
    q = base.transpose(1, 2).half().requires_grad_(True)  # (1, 32, 3, 16), non-contiguous
    k, v = (torch.randn(1, 32, 3, 16, generator=gen).half().requires_grad_(True) for _ in range(2))
    out = rt.dilated_attention(q, k, v, [32], [1], causal=True)
    out.float().sum().backward()
    assert out.dtype == torch.float16
    assert q.grad.dtype == k.grad.dtype == v.grad.dtype == torch.float16
    want = grads_of(lambda a, b, c: torch_reference(a, b, c, [32], [1], True, "groups"),
                    q.detach().double(), k.detach().double(), v.detach().double(),
                    torch.ones(1, 32, 3, 16, dtype=torch.float64))
    err = float((q.grad.double() - want[1]).abs().max()) / float(want[1].abs().max())
    assert err < 2e-2


def test_two_calls_in_one_graph_keep_their_own_state():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 32, 2, 8, generator=gen, requires_grad=True) for _ in range(3))
    layer = rt.RingDilatedAttention([32], [1], world_size=2)
    (layer(q, k, v).sum() + layer(k, q, v).pow(2).sum()).backward()
    want = grads_of(lambda a, b, c: torch_reference(a, b, c, [32], [1], False, "groups").sum()
                    + torch_reference(b, a, c, [32], [1], False, "groups").pow(2).sum(),
                    q.double(), k.double(), v.double(), torch.tensor(1.0, dtype=torch.float64))
    for x, ref in zip((q.grad, k.grad, v.grad), want[1:]):
        assert float((x.double() - ref).abs().max()) / float(ref.abs().max()) < 1e-4


def test_errors():
    q = torch.randn(1, 16, 1, 8, dtype=torch.float64, requires_grad=True)
    with pytest.raises(TypeError, match="float64"):
        rt.dilated_attention(q, q, q, [16], [1])
    with pytest.raises(TypeError, match="torch.Tensor"):
        rt.dilated_attention(np.zeros((1, 16, 1, 8), np.float32), q, q, [16], [1])
