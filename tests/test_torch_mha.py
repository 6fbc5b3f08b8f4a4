"""ringattn.torch.MultiheadDilatedAttention against a plain torch module with the same weights.

The plain module is the definition written in torch: the four projections
(F.linear with the module's weights), the spec's attention (softmax weighted
by the multiplicity matrix, reference.multiplicity), the sub-layer LayerNorm
and the output projection, differentiated by torch itself in float64.
Skipped when torch is not installed.
"""

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
import ringattn  # noqa: E402
import ringattn.torch as rt  # noqa: E402
from torch_reference import torch_reference as attention_reference  # noqa: E402
from conftest import RING_TIMEOUT  # noqa: E402

pytestmark = pytest.mark.timeout(RING_TIMEOUT)




def plain_module(params, x_q, x_k, x_v, num_heads, segs, rates, causal, mode, layer_norm, eps=1e-5):
    """The same module in plain torch; params: name -> tensor (float64)."""
    b, n, e = x_q.shape
    h, d = num_heads, e // num_heads
    q = F.linear(x_q, params["q_proj.weight"], params.get("q_proj.bias")).view(b, n, h, d)
    k = F.linear(x_k, params["k_proj.weight"], params.get("k_proj.bias")).view(b, n, h, d)
    v = F.linear(x_v, params["v_proj.weight"], params.get("v_proj.bias")).view(b, n, h, d)
    x = attention_reference(q, k, v, segs, rates, causal, mode).reshape(b, n, e)
    if layer_norm:
        x = F.layer_norm(x, (e,), params["norm.weight"], params["norm.bias"], eps)
    return F.linear(x, params["out_proj.weight"], params.get("out_proj.bias"))


CASES = [  # segs, rates, causal, mode, heads
    ([32], [1], False, "groups", 2),
    ([8, 32], [1, 2], True, "groups", 4),
    ([8, 16, 32], [1, 2, 4], True, "longnet", 3),
    ([16, 32], [2, 4], False, "longnet", 2),
]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-4), (torch.float64, 1e-11)])
@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("segs,rates,causal,mode,heads", CASES)
@pytest.mark.parametrize("layer_norm,bias", [(True, True), (False, False)])
def test_equals_plain_torch_module(segs, rates, causal, mode, heads, world_size, dtype, tol, layer_norm, bias):
    torch.manual_seed(0)
    e = 8 * heads
    mha = rt.MultiheadDilatedAttention(e, heads, segs, rates, causal=causal, mode=mode, world_size=world_size,
                                       layer_norm=layer_norm, bias=bias, dtype=dtype)
    if layer_norm:  # not the identity, so that the test sees the norm's parameters
        with torch.no_grad():
            mha.norm.weight.uniform_(0.5, 1.5)
            mha.norm.bias.uniform_(-0.5, 0.5)
    gen = torch.Generator().manual_seed(1)
    xq, xk, xv, g = (torch.randn(2, 32, e, generator=gen, dtype=dtype) for _ in range(4))
    xs = [x.clone().requires_grad_(True) for x in (xq, xk, xv)]
    out, weights = mha(*xs)
    assert weights is None and out.dtype == dtype and out.shape == (2, 32, e)
    out.backward(g)
    params = {name: p.detach().double().requires_grad_(True) for name, p in mha.named_parameters()}
    ys = [x.double().requires_grad_(True) for x in (xq, xk, xv)]
    want = plain_module(params, *ys, heads, segs, rates, causal, mode, layer_norm)
    want.backward(g.double())

    def close(x, ref, name):
        # relative, with a floor of 1: dk_proj.bias's gradient is zero in exact arithmetic
        # (softmax does not see a shift of every key by one vector)
        err = float((x.double() - ref).abs().max()) / max(float(ref.abs().max()), 1.0)
        assert err < tol, (name, err)

    close(out.detach(), want.detach(), "output")
    for name, x, y in zip(("query", "key", "value"), xs, ys):
        assert x.grad.dtype == dtype
        close(x.grad, y.grad, "d" + name)
    for name, p in mha.named_parameters():
        close(p.grad, params[name].grad, "d" + name)
    assert len(mha.last_stats["peak_bytes"]) == world_size


def test_is_causal_overrides_and_batch_first_false():
    torch.manual_seed(0)
    mha = rt.MultiheadDilatedAttention(16, 2, [8, 16], [1, 2], causal=False, dtype=torch.float64)
    x = torch.randn(3, 16, 16, dtype=torch.float64)
    params = {name: p.detach() for name, p in mha.named_parameters()}
    for is_causal, causal in ((None, False), (True, True), (False, False)):
        got, _ = mha(x, x, x, is_causal=is_causal)
        want = plain_module(params, x, x, x, 2, [8, 16], [1, 2], causal, "groups", True)
        assert torch.allclose(got, want, atol=1e-12)
    # the same weights with batch_first=False take and give (seq, batch, embed)
    seq_first = rt.MultiheadDilatedAttention(16, 2, [8, 16], [1, 2], batch_first=False, dtype=torch.float64)
    seq_first.load_state_dict(mha.state_dict())
    got, _ = seq_first(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), is_causal=True)
    assert got.shape == (16, 3, 16)
    want = plain_module(params, x, x, x, 2, [8, 16], [1, 2], True, "groups", True)
    assert torch.allclose(got.transpose(0, 1), want, atol=1e-12)


def test_initialisation_and_structure():
    torch.manual_seed(0)
    mha = rt.MultiheadDilatedAttention(256, 4, [16], [1])
    for proj in (mha.q_proj, mha.k_proj, mha.v_proj, mha.out_proj):
        assert proj.weight.shape == (256, 256)
        assert torch.all(proj.bias == 0)
        # xavier_normal_ with gain 1: std sqrt(2 / (fan_in + fan_out)) = 1/16
        assert abs(float(proj.weight.detach().std()) - 1 / 16) < 0.005
    assert isinstance(mha.norm, torch.nn.LayerNorm)
    assert rt.MultiheadDilatedAttention(256, 4, [16], [1], layer_norm=False).norm is None
    assert all(p.q_proj.bias is None for p in [rt.MultiheadDilatedAttention(16, 2, [16], [1], bias=False)])


def test_errors():
    with pytest.raises(ValueError, match="num_kv_heads"):
        rt.MultiheadDilatedAttention(16, 4, [16], [1], num_kv_heads=3)  # does not divide num_heads
    rt.MultiheadDilatedAttention(16, 4, [16], [1], num_kv_heads=4)  # equal to num_heads: fine
    assert rt.MultiheadDilatedAttention(16, 4, [16], [1], num_kv_heads=2).k_proj.weight.shape == (8, 16)
    with pytest.raises(RuntimeError, match="init_process_group"):  # no process group in this process
        rt.MultiheadDilatedAttention(16, 4, [16], [1], process_group=object())
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        rt.MultiheadDilatedAttention(18, 4, [16], [1])
    with pytest.raises(TypeError, match="comm must be a ringattn.Communicator"):
        rt.MultiheadDilatedAttention(16, 4, [16], [1], comm=object())
    with pytest.raises(ValueError):
        rt.MultiheadDilatedAttention(16, 4, [16, 32], [1], world_size=2)  # lengths differ
    mha = rt.MultiheadDilatedAttention(16, 2, [16], [1], world_size=2)
    with pytest.raises(ValueError):
        mha(*(torch.randn(1, 15, 16),) * 3)  # 15 is not divisible by the segment / ranks


@pytest.mark.timeout(200)  # two processes importing torch
def test_comm_takes_this_ranks_shard_under_mpirun():
    import os
    import shutil
    import subprocess
    import sys
    if shutil.which("mpirun") is None or not ringattn._ext.have()["mpi"]:
        pytest.skip("mpirun or ringattn's MPI build not available")
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", RINGATTN_NUM_THREADS="1", OMP_NUM_THREADS="1")
    cmd = [shutil.which("mpirun"), "--oversubscribe", "-n", "2", sys.executable,
           os.path.join(here, "mpi_torch_checks.py")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 0 and "MPI TORCH CHECKS PASSED" in r.stdout, r.stdout + r.stderr
