"""float64 on the CPU: computed in double throughout, so accurate to rounding.

Inputs, outputs, every accumulator (output and lse state, delta, dQ/dK/dV),
the log-sum-exp merge and the dK/dV that travel the ring are double, and so
is the public lse.  Checked against the float64 references to ~1e-12 (the
float32 path is only ~1e-5 accurate, so these tolerances catch anything
rounded through float on the way), through every ring size, both modes,
causal, local and spanning branches.
"""

import zlib

import numpy as np
import pytest

import ringattn
from conftest import RING_TIMEOUT, make_qkv, ring_valid, spans
from memory_model import peak_terms
from reference import reference_attention, reference_backward

# every call here may cross ranks: a deadlocked ring fails within RING_TIMEOUT
pytestmark = pytest.mark.timeout(RING_TIMEOUT)

F64 = np.float64

CASES = [
    # (b, n, h, d, segs, rates, causal, mode)
    (1, 64, 2, 16, [64], [1], False, "groups"),
    (1, 64, 2, 16, [64], [1], True, "groups"),
    (2, 96, 3, 8, [32, 96], [1, 3], True, "groups"),
    (1, 128, 5, 12, [16, 64, 128], [1, 2, 4], False, "longnet"),
    (1, 128, 4, 8, [32, 128], [2, 2], True, "longnet"),
    (1, 96, 4, 5, [24, 48], [3, 2], True, "groups"),  # odd head dim, rate 3
]


def rel_err(x, ref):
    return float(np.abs(np.asarray(x) - ref).max()) / max(float(np.abs(ref).max()), 1e-12)


def assert_lse_exact(lse, ref_lse):
    assert lse.dtype == F64, f"lse dtype {lse.dtype}, want float64"
    assert lse.shape == ref_lse.shape
    ninf = np.isneginf(ref_lse)
    assert np.array_equal(np.isneginf(lse), ninf), "lse: -inf pattern differs from the reference"
    assert np.all(np.isfinite(lse[~ninf]))
    assert float(np.abs(lse[~ninf] - ref_lse[~ninf]).max(initial=0.0)) < 1e-12


def _seed(case):
    return zlib.crc32(repr(case).encode())  # different inputs per case, the same in every run


@pytest.mark.parametrize("case", CASES)
def test_forward_matches_reference(case):
    b, n, h, d, segs, rates, causal, mode = case
    q, k, v = make_qkv(_seed(case), b, n, h, d, F64)
    ref, ref_lse = reference_attention(q, k, v, segs, rates, causal, mode)
    out = np.full_like(q, np.nan)  # poison: an unwritten row fails
    o, lse = ringattn.dilated_attention(q, k, v, segs, rates, causal=causal, mode=mode, return_lse=True, out=out)
    assert o is out and o.dtype == F64
    assert rel_err(o, ref) < 1e-12
    assert_lse_exact(lse, ref_lse)


@pytest.mark.parametrize("world_size", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("case", CASES)
def test_ring_equals_single_rank(case, world_size):
    b, n, h, d, segs, rates, causal, mode = case
    if not ring_valid(n, world_size, segs, rates):
        pytest.skip("configuration not valid for this world size")
    q, k, v = make_qkv(_seed(case) + world_size, b, n, h, d, F64)
    single, single_lse = ringattn.dilated_attention(q, k, v, segs, rates, causal=causal, mode=mode,
                                                    return_lse=True)
    ring = ringattn.RingDilatedAttention(segs, rates, causal=causal, mode=mode, world_size=world_size)
    out = np.full_like(q, np.nan)
    o, lse = ring(q, k, v, out=out, return_lse=True, requires_grad=True)
    assert o.dtype == lse.dtype == F64
    assert float(np.abs(o - single).max()) < 1e-13 * max(1.0, float(np.abs(single).max()))
    fin = np.isfinite(single_lse)
    assert np.array_equal(fin, np.isfinite(lse)) and float(np.abs(lse[fin] - single_lse[fin]).max()) < 1e-13
    if max(spans(n, world_size, segs)) > 1:
        assert max(ring.last_stats["bytes_sent"]) > 0  # blocks did travel the ring

    # the backward through the ring (dK/dV travel with the blocks) equals the single-rank one
    g = make_qkv(_seed(case) + 100 + world_size, b, n, h, d, F64)[0]
    want = ringattn.dilated_attention_backward(q, k, v, single, single_lse, g, segs, rates, causal=causal,
                                               mode=mode)
    got = ring.backward(g)
    for name, x, ref in zip(("dq", "dk", "dv"), got, want):
        assert x.dtype == F64, name
        assert float(np.abs(x - ref).max()) < 1e-13 * max(1.0, float(np.abs(ref).max())), name


@pytest.mark.parametrize("case", CASES)
def test_backward_matches_reference(case):
    b, n, h, d, segs, rates, causal, mode = case
    q, k, v = make_qkv(_seed(case) + 7, b, n, h, d, F64)
    g = make_qkv(_seed(case) + 8, b, n, h, d, F64)[0]
    o, lse = ringattn.dilated_attention(q, k, v, segs, rates, causal=causal, mode=mode, return_lse=True)
    got = ringattn.dilated_attention_backward(q, k, v, o, lse, g, segs, rates, causal=causal, mode=mode)
    want = reference_backward(q, k, v, g, segs, rates, causal, mode)
    for name, x, ref in zip(("dq", "dk", "dv"), got, want):
        assert x.dtype == F64 and x.shape == q.shape, name
        assert np.all(np.isfinite(x)), name
        assert rel_err(x, ref) < 1e-11, (name, rel_err(x, ref))


def test_strided_inputs_are_read_in_place():
    # (b, h, n, d) storage seen as (b, n, h, d): strided, head dim contiguous
    rng = np.random.default_rng(11)
    q, k, v = (rng.standard_normal((2, 3, 48, 8)).transpose(0, 2, 1, 3) for _ in range(3))
    ref, _ = reference_attention(q, k, v, [16, 48], [1, 2], True, "longnet")
    o = ringattn.RingDilatedAttention([16, 48], [1, 2], causal=True, mode="longnet", world_size=3)(q, k, v)
    assert rel_err(o, ref) < 1e-12


@pytest.mark.parametrize("world_size", [1, 2])
def test_memory_counts_double_accumulators(world_size):
    # per rank: q, k, v, o and the lse (caller's) + the double accumulator and lse
    # state, and at 2 ranks two ring slots of float64 keys and values, each an
    # eighth of a block (a sub-block); backward: 8 shards and the lse + dQ, dK,
    # dV accumulators and delta, all double, and slots carrying double dK/dV.
    # Exact: memory_model.py.
    b, n, h, d = 1, 256, 2, 32
    q, k, v = make_qkv(12, b, n, h, d, F64)
    u, lse_bytes = b * (n // world_size) * h * d * 8, b * h * (n // world_size) * 8
    ring = ringattn.RingDilatedAttention([n], [1], world_size=world_size, num_threads=world_size)
    ring(q, k, v, requires_grad=True)
    fixed, buffers = peak_terms((b, n, h, d), F64, [n], [1], "groups", world_size, world_size, lse=True)
    assert fixed["accumulator"] == u and fixed["lse state"] == lse_bytes  # double, not float
    assert buffers == [0 if world_size == 1 else 2 * 2 * u // 8] * world_size
    assert ring.last_stats["peak_bytes"] == [sum(fixed.values()) + x for x in buffers], (fixed, buffers)
    ring.backward(q)
    fixed, buffers = peak_terms((b, n, h, d), F64, [n], [1], "groups", world_size, world_size, backward=True)
    assert fixed["dq, dk, dv accumulators"] == 3 * u and fixed["delta"] == lse_bytes
    assert buffers == [0 if world_size == 1 else 2 * 2 * (u + u) // 8] * world_size  # + double dK/dV
    assert ring.last_stats["peak_bytes"] == [sum(fixed.values()) + x for x in buffers], (fixed, buffers)


def test_lse_dtype_must_match_the_inputs():
    q, k, v = make_qkv(13, 1, 16, 1, 8, F64)
    o, lse = ringattn.dilated_attention(q, k, v, [16], [1], return_lse=True)
    with pytest.raises(TypeError, match="lse.*float64"):
        ringattn.dilated_attention_backward(q, k, v, o, lse.astype(np.float32), q, [16], [1])


def test_mixed_and_nonfinite_float64_inputs_are_refused():
    q, k, v = make_qkv(14, 1, 16, 1, 8, F64)
    with pytest.raises(TypeError, match="k has dtype float32"):
        ringattn.dilated_attention(q, k.astype(np.float32), v, [16], [1])
    bad = v.copy()
    bad[0, 5, 0, 3] = np.inf
    with pytest.raises(ValueError, match="v contains"):
        ringattn.dilated_attention(q, k, bad, [16], [1])
    bad = q.copy()
    bad[0, 2, 0, 1] = np.nan
    o, lse = ringattn.dilated_attention(q, k, v, [16], [1], return_lse=True)
    with pytest.raises(ValueError, match="dout"):
        ringattn.dilated_attention_backward(q, k, v, o, lse, bad, [16], [1])


def test_gpu_path_refuses_float64():
    # float64 is a CPU dtype: device="cuda" refuses it by name, with or without a GPU
    q, k, v = make_qkv(15, 1, 64, 2, 16, F64)
    with pytest.raises(TypeError, match="q must have dtype"):
        ringattn.dilated_attention(q, k, v, [64], [1], device="cuda")
