"""torch.compile(fullgraph=True) through ringattn.torch's custom ops, on CPU.

The forward and backward are torch.library custom ops
(torch.ops.ringattn.dilated_attention / dilated_attention_backward) with fake
implementations, so dynamo traces a model that uses MultiheadDilatedAttention
without a graph break, and the compiled model's outputs and gradients equal
eager mode's.  Shapes are tiny: compiling takes the time here.
Skipped when torch is not installed.
"""

import pytest

torch = pytest.importorskip("torch")
import ringattn  # noqa: E402
import ringattn.torch as rt  # noqa: E402

pytestmark = pytest.mark.timeout(600)


def test_custom_ops_are_registered_and_pass_opcheck():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 16, 2, 4, generator=gen, requires_grad=True) for _ in range(3))
    args = (q, k, v, [8, 16], [1, 2], True, "groups", None, 2, "raise", 0, -1, "")
    torch.library.opcheck(torch.ops.ringattn.dilated_attention.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    o, lse = torch.ops.ringattn.dilated_attention(*args)
    assert o.shape == q.shape and lse.shape == (1, 2, 16) and lse.dtype == torch.float32
    g = torch.randn(1, 16, 2, 4, generator=gen)
    bargs = (q.detach(), k.detach(), v.detach(), o.detach(), lse, g) + args[3:]
    torch.library.opcheck(torch.ops.ringattn.dilated_attention_backward.default, bargs,
                          test_utils=("test_schema", "test_faketensor"))


class TinyModel(torch.nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.attn = rt.MultiheadDilatedAttention(8, 2, [8, 16], [1, 2], **kwargs)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        y, _ = self.attn(x, x, x)
        return self.head(torch.relu(y + x))


HAVE_CUDA = torch.cuda.is_available() and ringattn.cuda_device_count() > 0


@pytest.mark.parametrize("device,kwargs", [
    ("cpu", dict(causal=True, world_size=2)),
    ("cpu", dict(mode="longnet", dtype=torch.float64)),
    pytest.param("cuda", dict(causal=True, world_size=2),
                 marks=pytest.mark.skipif(not HAVE_CUDA, reason="no CUDA device or ringattn built without CUDA")),
])
def test_compile_fullgraph_equals_eager(device, kwargs):
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = TinyModel(**kwargs)
    dtype = kwargs.get("dtype", torch.float32)
    model = model.to(device=device, dtype=dtype)
    x = torch.randn(2, 16, 8, dtype=dtype, device=device)

    def run(m):
        m.zero_grad()
        xs = x.clone().requires_grad_(True)
        out = m(xs)
        out.pow(2).sum().backward()
        return [out.detach(), xs.grad] + [p.grad.clone() for p in m.parameters()]

    eager = run(model)
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    got = run(compiled)
    got_again = run(compiled)  # a second call reuses the compiled graph
    tol = 1e-12 if dtype == torch.float64 else 1e-5 if device == "cpu" else 1e-4
    for a, b, c in zip(got, eager, got_again):
        assert torch.allclose(a, b, rtol=tol, atol=tol), float((a - b).abs().max())
        assert torch.equal(a, c) if device == "cpu" else torch.allclose(a, c, rtol=tol, atol=tol)


def test_compile_functional_fullgraph():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 16, 2, 4, generator=gen, dtype=torch.float64) for _ in range(3))

    def f(q, k, v):
        return rt.dilated_attention(q * 2, k, v, [16], [2], causal=True).sin().sum()

    qs = [x.clone().requires_grad_(True) for x in (q, k, v)]
    f(*qs).backward()
    qc = [x.clone().requires_grad_(True) for x in (q, k, v)]
    torch.compile(f, fullgraph=True, backend="aot_eager")(*qc).backward()
    for a, b in zip(qs, qc):
        assert torch.allclose(a.grad, b.grad, rtol=1e-12, atol=1e-12)
