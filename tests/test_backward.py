"""Gradients: ringattn's backward against float64 references.

reference_backward (analytic, float64) is first checked by central finite
differences of reference_attention on tiny shapes; ringattn is then checked
against it on larger ones, through every ring size, both modes, causal,
local and spanning branches (sub-rings), float32 and float16.
"""

import numpy as np
import pytest

import ringattn
from conftest import RING_TIMEOUT, as_f32, assert_f16_is_rounded_f32, make_qkv
from memory_model import backward_workspace_bytes, forward_workspace_bytes
from reference import reference_attention, reference_backward
from memory_model import backward_workspace_bytes, forward_workspace_bytes

# every call here may cross ranks: a deadlocked ring fails within RING_TIMEOUT
pytestmark = pytest.mark.timeout(RING_TIMEOUT)


def rel_err(x, ref):
    x = np.asarray(x).astype(np.float64)
    return float(np.abs(x - ref).max()) / max(float(np.abs(ref).max()), 1e-6)


CASES = [
    # (b, n, h, d, segs, rates, causal, mode)
    (1, 16, 2, 4, [16], [1], False, "groups"),
    (1, 16, 3, 4, [8, 16], [1, 2], True, "groups"),
    (1, 12, 3, 3, [6, 12], [2, 3], True, "longnet"),
    (2, 8, 2, 4, [4, 8], [1, 2], False, "longnet"),
]


@pytest.mark.parametrize("case", CASES)
def test_reference_backward_matches_finite_differences(case):
    b, n, h, d, segs, rates, causal, mode = case
    rng = np.random.default_rng(1)
    q, k, v, g = (rng.standard_normal((b, n, h, d)) for _ in range(4))
    grads = reference_backward(q, k, v, g, segs, rates, causal, mode)

    def loss(qq, kk, vv):
        return float((reference_attention(qq, kk, vv, segs, rates, causal, mode)[0] * g).sum())

    eps = 1e-6
    for which, grad in enumerate(grads):
        x = [q, k, v][which]
        for idx in [tuple(rng.integers(0, s) for s in x.shape) for _ in range(12)]:
            args = [q.copy(), k.copy(), v.copy()]
            args[which][idx] += eps
            up = loss(*args)
            args[which][idx] -= 2 * eps
            fd = (up - loss(*args)) / (2 * eps)
            assert abs(fd - grad[idx]) <= 1e-6 + 1e-5 * abs(fd), (which, idx, fd, grad[idx])


GRAD_CASES = [
    (1, 128, 2, 32, [128], [1], False, "groups"),
    (1, 128, 2, 32, [128], [1], True, "groups"),
    (2, 96, 3, 16, [32, 96], [1, 3], True, "groups"),
    (1, 128, 5, 24, [16, 64, 128], [1, 2, 4], False, "longnet"),
    (1, 128, 4, 64, [32, 128], [2, 2], True, "longnet"),
    (1, 200, 2, 80, [200], [1], True, "groups"),  # more than one kernel block, odd head dim
]


@pytest.mark.parametrize("case", GRAD_CASES)
def test_backward_matches_reference(case):
    b, n, h, d, segs, rates, causal, mode = case
    q, k, v = make_qkv(7, b, n, h, d)
    g = np.random.default_rng(8).standard_normal(q.shape).astype(np.float32)
    o, lse = ringattn.dilated_attention(q, k, v, segs, rates, causal=causal, mode=mode, return_lse=True)
    got = ringattn.dilated_attention_backward(q, k, v, o, lse, g, segs, rates, causal=causal, mode=mode)
    want = reference_backward(q, k, v, g, segs, rates, causal, mode)
    for name, x, ref in zip(("dq", "dk", "dv"), got, want):
        assert x.dtype == np.float32 and x.shape == q.shape
        assert rel_err(x, ref) < 1e-4, (name, rel_err(x, ref))


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 6, 8])
@pytest.mark.parametrize("causal,mode", [(False, "groups"), (True, "groups"), (True, "longnet")])
def test_ring_gradients_equal_single_rank(world_size, causal, mode):
    # n = 96: L = 96 / k; the 96-segment branch spans every rank (a sub-ring of
    # k), the 48-segment one spans k/2 ranks or is local, 12 is local for k <= 8.
    n, segs, rates = 96, [12, 48, 96], [1, 2, 3]
    if any(not (n // world_size % s == 0 or s % (n // world_size) == 0) for s in segs):
        pytest.skip("segments and shards do not divide one another")
    q, k, v = make_qkv(3, 1, n, 6, 16)
    g = np.random.default_rng(4).standard_normal(q.shape).astype(np.float32)
    single = ringattn.RingDilatedAttention(segs, rates, causal=causal, mode=mode)
    single(q, k, v, requires_grad=True)
    want = single.backward(g)
    ring = ringattn.RingDilatedAttention(segs, rates, causal=causal, mode=mode, world_size=world_size)
    ring(q, k, v, requires_grad=True)
    got = ring.backward(g)
    for x, ref in zip(got, want):
        assert float(np.abs(x - ref).max()) <= 1e-5 * float(np.abs(ref).max())
    ref64 = reference_backward(q, k, v, g, segs, rates, causal, mode)
    for x, ref in zip(got, ref64):
        assert rel_err(x, ref) < 1e-4
    stats = ring.last_stats
    assert len(stats["peak_bytes"]) == world_size
    if world_size > 1:
        assert all(s > 0 for s in stats["bytes_sent"])  # the 96-segment branch always travels


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_float16_gradients_keep_dtype(world_size):
    """float16 gradients are the float32 path's gradients on the same values
    (q, k, v, o, dout widened exactly; the lse is float32 already), rounded
    once to nearest even: bit for bit on one rank.  Through rings (whose
    partial sums add in another order) against float64 at float16 rounding."""
    q, k, v = make_qkv(5, 1, 64, 3, 32, dtype=np.float16)
    g = np.random.default_rng(6).standard_normal(q.shape).astype(np.float16)
    segs, rates = [16, 64], [1, 2]
    ring = ringattn.RingDilatedAttention(segs, rates, causal=True, mode="longnet", world_size=world_size)
    o, lse = ring(q, k, v, return_lse=True, requires_grad=True)
    got = ring.backward(g)
    want32 = ringattn.dilated_attention_backward(*as_f32(q, k, v, o), lse, *as_f32(g), segs, rates,
                                                 causal=True, mode="longnet")
    ref = reference_backward(q, k, v, g, segs, rates, True, "longnet")
    for name, x, x32, r in zip(("dq", "dk", "dv"), got, want32, ref):
        assert x.dtype == np.float16, name
        if world_size == 1:
            assert_f16_is_rounded_f32(x, x32, what=name)
        # against float64: float16 rounding (4.9e-4) of the gradients and of o,
        # which enters through delta = rowsum(dout * o)
        assert rel_err(x, r) < 2e-3, (name, rel_err(x, r))


def test_backward_memory_falls_with_ranks():
    q, k, v = make_qkv(9, 1, 1024, 2, 64)
    g = np.ones_like(q)
    peaks = []
    for world_size in (2, 4, 8):
        ring = ringattn.RingDilatedAttention([1024], [1], world_size=world_size, num_threads=1)
        ring(q, k, v, requires_grad=True)
        ring.backward(g)
        peaks.append(max(ring.last_stats["peak_bytes"]))
    assert peaks[0] > peaks[1] > peaks[2]
    # halves per doubling, once the per-thread workspaces (one thread per rank,
    # the same at every k) are set aside
    ws = forward_workspace_bytes(64, np.float32) + backward_workspace_bytes(64, np.float32)
    assert (peaks[2] - ws) * 4 < (peaks[0] - ws) * 1.3


def test_backward_errors_name_the_argument():
    q, k, v = make_qkv(2, 1, 16, 1, 8)
    o, lse = ringattn.dilated_attention(q, k, v, [16], [1], return_lse=True)
    with pytest.raises(ValueError, match="dout"):
        ringattn.dilated_attention_backward(q, k, v, o, lse, q[:, :8], [16], [1])
    with pytest.raises(TypeError, match="lse"):
        ringattn.dilated_attention_backward(q, k, v, o, lse.astype(np.float64), q, [16], [1])
    with pytest.raises(ValueError, match="lse"):
        ringattn.dilated_attention_backward(q, k, v, o, lse[:, :, :8], q, [16], [1])
    bad = q.copy()
    bad[0, 3, 0, 1] = np.nan
    with pytest.raises(ValueError, match="dout"):
        ringattn.dilated_attention_backward(q, k, v, o, lse, bad, [16], [1])
    with pytest.raises(RuntimeError, match="requires_grad"):
        ringattn.RingDilatedAttention([16], [1]).backward(q)
