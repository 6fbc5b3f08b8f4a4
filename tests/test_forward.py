"""ringattn.dilated_attention against the float64 reference."""

import math
import zlib

import numpy as np
import pytest

import ringattn
from ringattn import _arrays, _validate
from conftest import (RING_TIMEOUT, as_f32, assert_f16_is_rounded_f32, assert_lse_close, assert_out_close,
                      make_qkv, poison_heap)
from reference import dense_attention, group_head_ranges, reference_attention

# every call here may cross ranks: a deadlocked ring fails within RING_TIMEOUT
pytestmark = pytest.mark.timeout(RING_TIMEOUT)

# (b, n, h, d, segment_lengths, dilation_rates, causal, mode, scale)
EXPLICIT = [
    (1, 64, 1, 16, [64], [1], False, "groups", None),
    (1, 64, 1, 16, [64], [1], True, "groups", None),
    (2, 128, 3, 32, [32, 64, 128], [1, 2, 4], True, "groups", None),
    (2, 128, 3, 32, [32, 64, 128], [1, 2, 4], False, "longnet", None),
    (3, 96, 5, 80, [32, 96], [2, 3], False, "longnet", None),
    (3, 96, 5, 80, [32, 96], [2, 3], True, "groups", None),
    (1, 512, 7, 64, [128, 256, 512], [1, 2, 4], True, "groups", None),
    (1, 512, 7, 64, [128, 256, 512], [1, 2, 4], True, "longnet", None),
    (2, 256, 4, 128, [64, 256], [1, 4], True, "longnet", 0.05),
    (2, 256, 4, 128, [64, 256], [1, 4], False, "groups", 0.3),
    # effective segment min(s, n): s > n
    (1, 128, 2, 16, [1024, 64], [4, 2], False, "groups", None),
    (1, 96, 6, 16, [1000], [1], True, "longnet", None),
    (2, 48, 3, 16, [4096, 12], [3, 4], True, "longnet", None),
    # r > h in longnet (some offsets unused -> inactive queries), r == S
    (1, 64, 3, 32, [32], [4], False, "longnet", None),
    (1, 64, 3, 32, [8, 64], [8, 1], True, "longnet", None),
    (2, 64, 2, 16, [8, 16], [8, 16], True, "groups", None),
    # negative and tiny scales are finite, hence valid
    (1, 64, 2, 32, [64], [1], True, "groups", -0.7),
    (1, 64, 2, 32, [32, 64], [1, 2], False, "longnet", 1e-4),
    # large logits (stress the running max)
    (1, 128, 2, 64, [128], [1], False, "groups", 2.0),
    (1, 128, 2, 64, [64, 128], [1, 2], True, "longnet", 1.5),
    # head counts not divisible by G
    (1, 64, 7, 16, [16, 32, 64], [1, 2, 4], False, "groups", None),
    (1, 64, 5, 16, [64, 64], [1, 2], True, "groups", None),
]


def _divisors(x, choices):
    return [c for c in choices if x % c == 0]


def _random_cases(count, seed):
    rng = np.random.default_rng(seed)
    cases = []
    while len(cases) < count:
        b = int(rng.integers(1, 4))
        n = int(rng.choice([32, 48, 64, 96, 128, 192, 256, 384, 512]))
        h = int(rng.choice([1, 2, 3, 4, 5, 6, 7]))
        d = int(rng.choice([16, 32, 64, 80, 128]))
        G = int(rng.integers(1, 4))
        mode = str(rng.choice(["groups", "longnet"]))
        if mode == "groups" and h < G:
            h = G
        segs, rates = [], []
        for _ in range(G):
            if rng.random() < 0.15:
                s = n * int(rng.choice([2, 4]))  # longer than n: clipped
            else:
                s = int(rng.choice(_divisors(n, [8, 16, 24, 32, 48, 64, 96, 128, 256, 512])))
            S = min(s, n)
            r = int(rng.choice(_divisors(S, [1, 2, 3, 4, 8])))
            segs.append(s)
            rates.append(r)
        causal = bool(rng.random() < 0.5)
        scale = None if rng.random() < 0.6 else float(rng.uniform(0.02, 0.5))
        if b * n * n * h * d > 60_000_000:  # keep the reference cheap
            continue
        cases.append((b, n, h, d, segs, rates, causal, mode, scale))
    return cases


RANDOM = _random_cases(30, seed=1234)


def _ids(cases):
    return [f"b{c[0]}n{c[1]}h{c[2]}d{c[3]}s{c[4]}r{c[5]}{'c' if c[6] else ''}{c[7][0]}"
            + ("" if c[8] is None else f"sc{c[8]:.3g}") for c in cases]


def _run(case, dtype, seed):
    b, n, h, d, segs, rates, causal, mode, scale = case
    q, k, v = make_qkv(seed, b, n, h, d, dtype)
    qc, kc, vc = q.copy(), k.copy(), v.copy()
    o, lse = ringattn.dilated_attention(q, k, v, segs, rates, causal=causal, mode=mode,
                                        scale=scale, return_lse=True)
    # inputs are not modified
    assert np.array_equal(q, qc) and np.array_equal(k, kc) and np.array_equal(v, vc)
    assert isinstance(o, np.ndarray)
    assert o.shape == q.shape and o.dtype == q.dtype
    ro, rl = reference_attention(q, k, v, segs, rates, causal=causal, mode=mode, scale=scale)
    assert_out_close(o, ro, dtype)
    assert_lse_close(lse, rl, dtype)
    # inactive rows are exactly zero
    inactive = np.isneginf(rl)  # (b, h, n)
    if inactive.any():
        o_bhn = np.moveaxis(np.asarray(o), 2, 1)  # (b, h, n, d)
        assert np.all(o_bhn[inactive] == 0)
    if np.dtype(dtype) == np.float16:
        # bit for bit the float32 path's result on the same values, rounded once
        o32, lse32 = ringattn.dilated_attention(*as_f32(q, k, v), segs, rates, causal=causal, mode=mode,
                                                scale=scale, return_lse=True)
        assert_f16_is_rounded_f32(o, o32, lse, lse32)
    return o


@pytest.mark.parametrize("case", EXPLICIT, ids=_ids(EXPLICIT))
def test_explicit_float32(case):
    _run(case, np.float32, seed=11)


@pytest.mark.parametrize("case", RANDOM, ids=_ids(RANDOM))
def test_random_float32(case):
    _run(case, np.float32, seed=zlib.crc32(repr(case).encode()))


F16_CASES = [EXPLICIT[i] for i in (0, 2, 4, 8, 10, 13, 20)] + RANDOM[:5]


@pytest.mark.parametrize("case", F16_CASES, ids=_ids(F16_CASES))
def test_float16(case):
    _run(case, np.float16, seed=5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mode", ["groups", "longnet"])
def test_dense_config_is_plain_attention(causal, mode):
    q, k, v = make_qkv(3, 2, 160, 3, 64)
    o = ringattn.dilated_attention(q, k, v, [160], [1], causal=causal, mode=mode)
    assert isinstance(o, np.ndarray) and o.shape == q.shape and o.dtype == np.float32
    ro, _ = dense_attention(q, k, v, causal=causal)
    assert_out_close(o, ro, np.float32)


def test_return_lse_false_returns_array_only():
    q, k, v = make_qkv(4, 1, 32, 2, 16)
    o = ringattn.dilated_attention(q, k, v, [32], [1], return_lse=False)
    assert isinstance(o, np.ndarray)
    o2 = ringattn.dilated_attention(q, k, v, [32], [1])
    assert isinstance(o2, np.ndarray)
    assert np.array_equal(o, o2)
    res = ringattn.dilated_attention(q, k, v, [32], [1], return_lse=True)
    assert isinstance(res, tuple) and len(res) == 2
    assert res[1].shape == (1, 2, 32) and res[1].dtype == np.float32


def test_default_scale_is_inv_sqrt_d():
    q, k, v = make_qkv(6, 1, 64, 2, 80)
    o1 = ringattn.dilated_attention(q, k, v, [32, 64], [1, 2], causal=True)
    o2 = ringattn.dilated_attention(q, k, v, [32, 64], [1, 2], causal=True, scale=1 / math.sqrt(80))
    assert np.array_equal(o1, o2)  # the same scale, hence the same arithmetic
    o3 = ringattn.dilated_attention(q, k, v, [32, 64], [1, 2], causal=True, scale=0.5)
    assert np.abs(o3 - o1).max() > 1e-3


def test_zero_scale_is_uniform_or_rejected():
    """scale=0.0 is finite, so either it is honoured (uniform attention over the
    key set) or it is rejected naming 'scale'; it must not silently mean the
    default scale."""
    q, k, v = make_qkv(8, 1, 64, 2, 16)
    try:
        o = ringattn.dilated_attention(q, k, v, [64], [1], causal=True, scale=0.0)
    except ValueError as e:
        assert "scale" in str(e)
        return
    ro, _ = reference_attention(q, k, v, [64], [1], causal=True, scale=0.0)
    assert_out_close(o, ro, np.float32)


def test_inactive_rows_exactly_zero_groups_poisoned():
    """Groups mode with r > 1: rows inactive for a head must be exactly 0 and
    their lse exactly -inf, even when the allocator hands out dirty memory."""
    b, n, h, d = 1, 64, 4, 16
    segs, rates = [32, 64], [2, 4]
    q, k, v = make_qkv(9, b, n, h, d)
    ro, rl = reference_attention(q, k, v, segs, rates, causal=True)
    for _ in range(3):
        poison_heap(q.nbytes)
        poison_heap(b * h * n * 4)
        o, lse = ringattn.dilated_attention(q, k, v, segs, rates, causal=True, return_lse=True)
        ranges = group_head_ranges(h, 2)
        for i, (lo, hi) in enumerate(ranges):
            S, r = segs[i], rates[i]
            off = i % r
            act = ((np.arange(n) % S) % r) == off
            assert np.all(o[:, ~act, lo:hi, :] == 0)
            assert np.all(np.isneginf(lse[:, lo:hi, ~act]))
            assert np.all(np.isfinite(o[:, act, lo:hi, :]))
            assert np.all(np.isfinite(lse[:, lo:hi, act]))
        assert_out_close(o, ro, np.float32)
        assert_lse_close(lse, rl, np.float32)


def test_longnet_query_in_no_branch_is_zero():
    # one head, r=2: offset 0 only, odd positions are active in no branch
    q, k, v = make_qkv(10, 2, 32, 1, 16)
    poison_heap(q.nbytes)
    o, lse = ringattn.dilated_attention(q, k, v, [32], [2], mode="longnet", return_lse=True)
    assert np.all(o[:, 1::2] == 0)
    assert np.all(np.isneginf(lse[:, :, 1::2]))
    assert np.all(np.isfinite(lse[:, :, 0::2]))
    ro, rl = reference_attention(q, k, v, [32], [2], mode="longnet")
    assert_out_close(o, ro, np.float32)
    assert_lse_close(lse, rl, np.float32)


def _noncontig_variants(q):
    b, n, h, d = q.shape
    # transposed view: stored (b, h, n, d)
    t = np.ascontiguousarray(q.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    # negative stride along n
    rev = np.ascontiguousarray(q[:, ::-1])[:, ::-1]
    # every other element of a wider last axis (head dim not contiguous)
    wide = np.zeros((b, n, h, 2 * d), q.dtype)
    wide[..., ::2] = q
    strided_d = wide[..., ::2]
    # batch-reversed, Fortran order
    fort = np.asfortranarray(q)
    return {"transposed": t, "reversed": rev, "strided_d": strided_d, "fortran": fort}


@pytest.mark.parametrize("kind", ["transposed", "reversed", "strided_d", "fortran"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_noncontiguous_inputs(kind, dtype):
    q, k, v = make_qkv(12, 2, 64, 3, 16, dtype)
    segs, rates = [32, 64], [1, 2]
    expected = ringattn.dilated_attention(q, k, v, segs, rates, causal=True, mode="longnet")
    qn = _noncontig_variants(q)[kind]
    kn = _noncontig_variants(k)[kind]
    vn = _noncontig_variants(v)[kind]
    assert np.array_equal(qn, q) and not qn.flags.c_contiguous
    o = ringattn.dilated_attention(qn, kn, vn, segs, rates, causal=True, mode="longnet")
    ro, _ = reference_attention(q, k, v, segs, rates, causal=True, mode="longnet")
    assert_out_close(o, ro, dtype)
    # strides change only where values are read from, not the arithmetic
    assert np.array_equal(o, expected), float(np.abs(o.astype(np.float64) - expected).max())


def test_mixed_layouts_between_q_k_v():
    q, k, v = make_qkv(13, 1, 64, 2, 32)
    kn = _noncontig_variants(k)["transposed"]
    vn = _noncontig_variants(v)["reversed"]
    o = ringattn.dilated_attention(q, kn, vn, [64], [1], causal=True)
    ro, _ = dense_attention(q, k, v, causal=True)
    assert_out_close(o, ro, np.float32)


def test_k_and_v_with_different_strides():
    """k and v need not share a layout: the core reads each with its own
    strides, so neither is copied (the result is still exact)."""
    q, k, v = make_qkv(18, 2, 64, 3, 16)
    kt = _noncontig_variants(k)["transposed"]                                 # (b, h, n, d) storage
    vs = np.ascontiguousarray(v.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)  # sequence-major storage
    assert kt.strides != vs.strides and kt.strides[1:3] != vs.strides[1:3]
    tensors = _arrays.describe_all({"q": q, "k": kt, "v": vs})
    try:
        assert _validate.arguments(tensors, ["q", "k", "v"], [], "cpu") == []  # nothing to copy
    finally:
        _arrays.release_all(tensors)
    segs, rates = [32, 64], [1, 2]
    ro, rl = reference_attention(q, k, v, segs, rates, causal=True, mode="longnet")
    for kk, vv in ((kt, v), (k, vs), (kt, vs)):
        o, lse = ringattn.dilated_attention(q, kk, vv, segs, rates, causal=True, mode="longnet", return_lse=True)
        assert_out_close(o, ro, np.float32)
        assert_lse_close(lse, rl, np.float32)
    o = ringattn.RingDilatedAttention(segs, rates, causal=True, mode="longnet", world_size=2)(q, kt, vs)
    assert_out_close(o, ro, np.float32)
    dout = make_qkv(19, 2, 64, 3, 16)[0]
    o, lse = ringattn.dilated_attention(q, k, v, segs, rates, causal=True, mode="longnet", return_lse=True)
    want = ringattn.dilated_attention_backward(q, k, v, o, lse, dout, segs, rates, causal=True, mode="longnet")
    got = ringattn.dilated_attention_backward(q, kt, vs, o, lse, dout, segs, rates, causal=True, mode="longnet")
    for name, g, r in zip(("dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(g, r, rtol=0, atol=1e-5, err_msg=name)


def test_thread_counts_agree_and_roundtrip():
    q, k, v = make_qkv(14, 2, 256, 3, 64)
    segs, rates = [64, 256], [1, 2]
    old = ringattn.get_num_threads()
    assert isinstance(old, int) and old >= 1
    try:
        ringattn.set_num_threads(1)
        assert ringattn.get_num_threads() == 1
        o1 = ringattn.dilated_attention(q, k, v, segs, rates, causal=True)
        ringattn.set_num_threads(2)
        assert ringattn.get_num_threads() == 2
        o2 = ringattn.dilated_attention(q, k, v, segs, rates, causal=True)
        o3 = ringattn.dilated_attention(q, k, v, segs, rates, causal=True, num_threads=3)
    finally:
        ringattn.set_num_threads(old)
    assert ringattn.get_num_threads() == old
    ro, _ = reference_attention(q, k, v, segs, rates, causal=True)
    for o in (o1, o2, o3):
        assert_out_close(o, ro, np.float32)
    # a (task, query block) is computed the same way whichever thread takes it
    assert np.array_equal(o1, o2) and np.array_equal(o1, o3)


def test_repeated_calls_are_deterministic():
    q, k, v = make_qkv(15, 1, 128, 4, 32)
    a = ringattn.dilated_attention(q, k, v, [64, 128], [1, 2], mode="longnet", num_threads=2)
    b = ringattn.dilated_attention(q, k, v, [64, 128], [1, 2], mode="longnet", num_threads=2)
    assert np.array_equal(a, b)


def test_batches_and_heads_are_independent():
    q, k, v = make_qkv(16, 3, 64, 4, 16)
    o = ringattn.dilated_attention(q, k, v, [64], [1], causal=True)
    o_b1 = ringattn.dilated_attention(q[1:2], k[1:2], v[1:2], [64], [1], causal=True)
    assert np.array_equal(o[1:2], o_b1)
    # changing head 2 of batch 0 leaves every other (batch, head) unchanged
    q2 = q.copy()
    q2[0, :, 2] = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
    o2 = ringattn.dilated_attention(q2, k, v, [64], [1], causal=True)
    mask = np.ones(o.shape, bool)
    mask[0, :, 2] = False
    assert np.array_equal(o[mask], o2[mask])
    assert not np.allclose(o[0, :, 2], o2[0, :, 2])


def test_causal_prefix_independent_of_future():
    q, k, v = make_qkv(17, 1, 128, 2, 32)
    o = ringattn.dilated_attention(q, k, v, [64, 128], [1, 2], causal=True, mode="longnet")
    k2, v2 = k.copy(), v.copy()
    k2[:, 100:] = 5.0
    v2[:, 100:] = -3.0
    o2 = ringattn.dilated_attention(q, k2, v2, [64, 128], [1, 2], causal=True, mode="longnet")
    # masked keys contribute exactly nothing (probability 0), whatever their values
    assert np.array_equal(o[:, :100], o2[:, :100])
    assert not np.array_equal(o[:, 100:], o2[:, 100:])  # (the change is seen where it may be)


# ------------------------------------------------------------------ out= (poison)

@pytest.mark.parametrize("mode", ["groups", "longnet"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_out_argument_is_fully_overwritten(mode, dtype):
    """out= prefilled with NaN: every element is written (inactive rows with 0)."""
    b, n, h, d = 2, 128, 5, 32
    segs, rates = [32, 128], [4, 2]
    q, k, v = make_qkv(40, b, n, h, d, dtype)
    out = np.full(q.shape, np.nan, dtype)
    res = ringattn.dilated_attention(q, k, v, segs, rates, causal=True, mode=mode, out=out)
    assert res is out
    ro, rl = reference_attention(q, k, v, segs, rates, causal=True, mode=mode)
    assert_out_close(out, ro, dtype)
    if dtype == np.float16:
        o32 = ringattn.dilated_attention(*as_f32(q, k, v), segs, rates, causal=True, mode=mode)
        assert_f16_is_rounded_f32(out, o32)
    inactive = np.moveaxis(np.isneginf(rl), 1, 2)  # (b, n, h)
    assert np.all(out[inactive] == 0)
    # also with return_lse
    out2 = np.full(q.shape, np.inf, dtype)
    res2, lse = ringattn.dilated_attention(q, k, v, segs, rates, causal=True, mode=mode, out=out2,
                                          return_lse=True)
    assert res2 is out2
    assert_out_close(out2, ro, dtype)
    assert_lse_close(lse, rl, dtype)


def test_out_argument_noncontiguous_rows():
    """out whose (b, n, h) strides are not C order but whose head dim is contiguous."""
    q, k, v = make_qkv(41, 2, 64, 3, 16)
    store = np.full((2, 3, 64, 16), np.nan, np.float32)
    out = store.transpose(0, 2, 1, 3)
    res = ringattn.dilated_attention(q, k, v, [64], [1], causal=True, out=out)
    assert res is out
    ro, _ = dense_attention(q, k, v, causal=True)
    assert_out_close(store.transpose(0, 2, 1, 3), ro, np.float32)


@pytest.mark.parametrize("bad", ["dtype", "shape", "reversed", "strided_d", "readonly"])
def test_out_argument_errors(bad):
    q, k, v = make_qkv(42, 1, 64, 2, 16)
    out = {
        "dtype": lambda: np.empty(q.shape, np.float16),
        "shape": lambda: np.empty((1, 64, 2, 8), np.float32),
        "reversed": lambda: np.empty(q.shape, np.float32)[:, ::-1],
        "strided_d": lambda: np.empty((1, 64, 2, 32), np.float32)[..., ::2],
        "readonly": lambda: np.broadcast_to(np.empty((1, 1, 2, 16), np.float32), q.shape),
    }[bad]()
    with pytest.raises((ValueError, TypeError), match=r"(?<![A-Za-z0-9_])out(?![A-Za-z0-9_])"):
        ringattn.dilated_attention(q, k, v, [64], [1], out=out)


def test_ring_out_argument_poisoned():
    q, k, v = make_qkv(43, 1, 256, 4, 16)
    attn = ringattn.RingDilatedAttention([64, 256], [4, 2], causal=True, world_size=4)
    out = np.full(q.shape, np.nan, np.float32)
    res = attn(q, k, v, out=out)
    assert res is out
    ro, _ = reference_attention(q, k, v, [64, 256], [4, 2], causal=True)
    assert_out_close(out, ro, np.float32)
