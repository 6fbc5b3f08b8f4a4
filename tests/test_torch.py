"""ringattn.torch: autograd through the ring, against torch autograd of a float64 reference.

Skipped when torch is not installed.  The reference is the definition
written in torch (softmax weighted by the multiplicity matrix of the cells,
see reference.multiplicity), differentiated by torch itself in float64.
float64 tensors run ringattn's double path, so torch.autograd.gradcheck
checks the gradients by finite differences with its default tolerances.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import ringattn.torch as rt  # noqa: E402
from torch_reference import torch_reference  # noqa: E402
from conftest import RING_TIMEOUT  # noqa: E402

# the layers run rings of 2 and 4 ranks: a deadlocked ring fails within RING_TIMEOUT
pytestmark = pytest.mark.timeout(RING_TIMEOUT)




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


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-12)])
@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("segs,rates,causal,mode", CASES)
def test_gradients_match_torch_autograd_of_the_definition(segs, rates, causal, mode, world_size, dtype, tol):
    gen = torch.Generator().manual_seed(0)
    q, k, v, g = (torch.randn(2, 64, 3, 16, generator=gen, dtype=dtype) for _ in range(4))
    want = grads_of(lambda a, b, c: torch_reference(a, b, c, segs, rates, causal, mode),
                    q.double(), k.double(), v.double(), g.double())
    layer = rt.RingDilatedAttention(segs, rates, causal=causal, mode=mode, world_size=world_size)
    got = grads_of(layer, q, k, v, g)
    for name, x, ref in zip(("o", "dq", "dk", "dv"), got, want):
        assert x.dtype == dtype
        err = float((x.double() - ref).abs().max()) / max(float(ref.abs().max()), 1e-6)
        assert err < tol, (name, err)
    assert len(layer.last_stats["peak_bytes"]) == world_size


GRADCHECK_CASES = [
    # (n, segs, rates, causal, mode): a dilated branch in each, local and spanning at world_size > 1
    (16, [16], [1], False, "groups"),
    (16, [8, 16], [1, 2], True, "groups"),
    (32, [8, 32], [2, 2], False, "longnet"),
    (32, [8, 16, 32], [1, 2, 4], True, "longnet"),
]


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("n,segs,rates,causal,mode", GRADCHECK_CASES)
def test_gradcheck_float64(n, segs, rates, causal, mode, world_size):
    # finite differences (eps 1e-6) against the analytic backward, default tolerances
    gen = torch.Generator().manual_seed(n + world_size)
    q, k, v = (torch.randn(1, n, 2, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    layer = rt.RingDilatedAttention(segs, rates, causal=causal, mode=mode, world_size=world_size, num_threads=1)
    assert torch.autograd.gradcheck(layer, (q, k, v))
    if world_size > 1 and max(segs) > n // world_size:
        assert max(layer.last_stats["bytes_sent"]) > 0  # blocks travelled the ring


def test_gradcheck_float64_functional():
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 16, 2, 4, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    fn = lambda a, b, c: rt.dilated_attention(a, b, c, [16], [2], causal=True, scale=0.7, num_threads=1)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


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
    # float16 rounding of the gradients (2^-11 = 4.9e-4) and of o (through delta)
    for name, x, ref in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad), want[1:]):
        err = float((x.double() - ref).abs().max()) / float(ref.abs().max())
        assert err < 2e-3, (name, err)


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
    with pytest.raises(TypeError, match="k has dtype float32"):
        rt.dilated_attention(q, q.float(), q, [16], [1])
    with pytest.raises(TypeError, match="q must have dtype"):
        rt.dilated_attention(torch.ones(1, 16, 1, 8, dtype=torch.int32), q, q, [16], [1])
    with pytest.raises(TypeError, match="torch.Tensor"):
        rt.dilated_attention(np.zeros((1, 16, 1, 8), np.float32), q, q, [16], [1])
