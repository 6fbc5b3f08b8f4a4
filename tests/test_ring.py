"""RingDilatedAttention: k in-process ranks give the single-rank output."""

import numpy as np
import pytest

import ringattn
from conftest import (RING_TIMEOUT, as_f32, assert_f16_is_rounded_f32, assert_lse_close, assert_out_close,
                      make_qkv, ring_valid, run_with_timeout, spans)
from reference import reference_attention

# every call here may cross ranks: a deadlocked ring fails within RING_TIMEOUT
pytestmark = pytest.mark.timeout(RING_TIMEOUT)

WORLD_SIZES = [1, 2, 3, 4, 6, 8]
STAT_KEYS = ("peak_bytes", "bytes_sent", "bytes_received", "steps", "steps_skipped")
L = 64  # positions per rank in the parametrized ring tests


def _configs(k):
    """(name, segment_lengths, dilation_rates) valid for world size k with L = 64."""
    n = L * k
    cfgs = [
        ("dense", [n], [1]),
        ("local_and_full", [32, n], [2, 4]),
        ("L_and_full", [L, n], [1, 2]),
        ("local_only", [16, L], [2, 4]),
        ("clipped", [4 * n], [2]),  # s > n: clipped to n, spans all ranks
    ]
    if k % 2 == 0 and k > 2:
        cfgs.append(("subring2", [32, 2 * L, n], [1, 2, 4]))
    if k % 4 == 0 and k > 4:
        cfgs.append(("subring4", [4 * L, 2 * L], [8, 1]))
    out = []
    for name, s, r in cfgs:
        assert ring_valid(n, k, s, r), (name, k)
        out.append((name, s, r))
    return out


def _ring_cases():
    cases = []
    for k in WORLD_SIZES:
        for name, s, r in _configs(k):
            cases.append(pytest.param(k, s, r, id=f"k{k}-{name}"))
    return cases


def _check_stats(stats, k):
    assert isinstance(stats, dict)
    for key in STAT_KEYS:
        assert key in stats, key
        vals = stats[key]
        assert len(vals) == k, (key, vals)
        assert all(isinstance(x, (int, np.integer)) for x in vals), (key, vals)
        assert all(x >= 0 for x in vals), (key, vals)
    assert all(x > 0 for x in stats["peak_bytes"])
    assert all(x > 0 for x in stats["steps"])
    assert sum(stats["bytes_sent"]) == sum(stats["bytes_received"])


@pytest.mark.parametrize("k,segs,rates", _ring_cases())
@pytest.mark.parametrize("mode", ["groups", "longnet"])
@pytest.mark.parametrize("causal", [False, True])
def test_ring_equals_single_rank_and_reference(k, segs, rates, mode, causal):
    n, b, h, d = L * k, 2, 3, 32
    q, k_, v = make_qkv(100 + k, b, n, h, d)
    single, lse1 = ringattn.dilated_attention(q, k_, v, segs, rates, causal=causal, mode=mode,
                                              return_lse=True)
    attn = ringattn.RingDilatedAttention(segs, rates, causal=causal, mode=mode, world_size=k)
    o, lse = run_with_timeout(lambda: attn(q, k_, v, return_lse=True))
    assert o.shape == q.shape and o.dtype == q.dtype
    denom = max(float(np.abs(single).max()), 1e-3)
    err = float(np.abs(o.astype(np.float64) - single.astype(np.float64)).max())
    assert err <= 1e-5 * denom, f"ring vs single rank: {err:.3e}"
    ro, rl = reference_attention(q, k_, v, segs, rates, causal=causal, mode=mode)
    assert_out_close(o, ro, np.float32)
    assert_lse_close(lse, rl, np.float32)
    assert np.array_equal(np.isneginf(lse), np.isneginf(lse1))
    _check_stats(attn.last_stats, k)
    sp = spans(n, k, segs)
    sent = attn.last_stats["bytes_sent"]
    if max(sp) == 1:
        assert all(x == 0 for x in sent), sent
        assert all(x == 0 for x in attn.last_stats["bytes_received"])
    else:
        assert sum(sent) > 0, sent
        # every rank lies in a segment of a spanning branch, so every rank
        # receives key/value blocks -- with causal=True every rank that is not
        # the first of its segment in some spanning branch (the first needs
        # nothing from the others)
        received = attn.last_stats["bytes_received"]
        needs = [r for r in range(k) if any(s > 1 and (not causal or r % s) for s in sp)]
        assert needs and all(received[r] > 0 for r in needs), (needs, received)
    if causal and max(sp) > 1:
        assert sum(attn.last_stats["steps_skipped"]) > 0


@pytest.mark.parametrize("k", [2, 4, 8])
def test_float16_ring(k):
    n = 32 * k
    q, k_, v = make_qkv(7, 1, n, 4, 64, np.float16)
    attn = ringattn.RingDilatedAttention([16, n], [1, 2], causal=True, world_size=k)
    o, lse = run_with_timeout(lambda: attn(q, k_, v, return_lse=True))
    assert o.dtype == np.float16 and o.shape == q.shape
    ro, rl = reference_attention(q, k_, v, [16, n], [1, 2], causal=True)
    assert_out_close(o, ro, np.float16)
    assert_lse_close(lse, rl, np.float16)
    # the same ring in float32 on the same values: float16 is its result rounded, bit for bit
    o32, lse32 = run_with_timeout(lambda: attn(*as_f32(q, k_, v), return_lse=True))
    assert_f16_is_rounded_f32(o, o32, lse, lse32)


def test_causal_sends_less_than_noncausal():
    """Non-causal: every rank sends k - 1 blocks; causal (a pipeline): rank p
    sends p + 1 blocks and the last none, k(k-1)/2 in all, and rank p skips
    the k - 1 - p steps whose blocks come from later ranks."""
    k, n = 4, 256
    block = 2 * 1 * (n // k) * 2 * 32 * 4  # keys and values of one shard
    q, k_, v = make_qkv(21, 1, n, 2, 32)
    sent = {}
    for causal in (False, True):
        attn = ringattn.RingDilatedAttention([n], [1], causal=causal, world_size=k)
        run_with_timeout(lambda: attn(q, k_, v))
        st = attn.last_stats
        sent[causal] = sum(st["bytes_sent"])
        if causal:
            assert st["bytes_sent"] == [(p + 1) * block for p in range(k - 1)] + [0], st
            assert st["bytes_received"] == [p * block for p in range(k)], st
            assert st["steps_skipped"] == [k - 1 - p for p in range(k)], st
            assert st["steps"] == [p + 1 for p in range(k)], st
        else:
            assert st["bytes_sent"] == st["bytes_received"] == [(k - 1) * block] * k, st
            assert st["steps_skipped"] == [0] * k and st["steps"] == [k] * k, st
    assert 2 * sent[True] == sent[False], sent


def test_causal_subring_sends_less():
    k, n = 8, 512  # L = 64, branch of 256 spans 4 ranks (two sub-rings)
    q, k_, v = make_qkv(22, 1, n, 2, 32)
    sent = {}
    for causal in (False, True):
        attn = ringattn.RingDilatedAttention([256], [2], causal=causal, world_size=k)
        run_with_timeout(lambda: attn(q, k_, v))
        sent[causal] = sum(attn.last_stats["bytes_sent"])
        if causal:
            assert sum(attn.last_stats["steps_skipped"]) > 0
            # each sub-ring of 4 is a pipeline: position p sends p + 1 blocks, the last none
            per = attn.last_stats["bytes_sent"][0]
            assert attn.last_stats["bytes_sent"] == [per, 2 * per, 3 * per, 0] * 2, attn.last_stats
    assert 2 * sent[True] == sent[False] > 0, sent  # m(m-1)/2 blocks instead of m(m-1)


def test_dense_noncausal_receives_all_other_shards():
    """Lower bound: in dense non-causal attention each rank needs every other
    rank's keys and values."""
    k, n, b, h, d = 4, 256, 2, 3, 32
    q, k_, v = make_qkv(23, b, n, h, d)
    attn = ringattn.RingDilatedAttention([n], [1], world_size=k)
    run_with_timeout(lambda: attn(q, k_, v))
    need = (k - 1) * 2 * b * (n // k) * h * d * 4
    # exactly the other shards, once each: nothing is sent twice
    assert attn.last_stats["bytes_received"] == [need] * k, (attn.last_stats, need)
    assert attn.last_stats["steps"] == [k] * k, attn.last_stats


def test_dilation_reduces_traffic():
    """Only keys/values active in a branch's cells travel: with r = 2 in groups
    mode (one branch, offset 0) half the positions are active."""
    k, n = 4, 256
    q, k_, v = make_qkv(24, 1, n, 4, 32)
    sent = {}
    for r in (1, 2, 4):
        attn = ringattn.RingDilatedAttention([n], [r], world_size=k)
        o = run_with_timeout(lambda: attn(q, k_, v))
        ro, _ = reference_attention(q, k_, v, [n], [r])
        assert_out_close(o, ro, np.float32)
        sent[r] = sum(attn.last_stats["bytes_sent"])
    # 1/r of the positions are active (L = 64 is a multiple of every r): exactly 1/r of the bytes
    assert sent[1] == 4 * 3 * 2 * (n // k) * 4 * 32 * 4, sent  # k ranks x (k-1) blocks of keys and values
    assert sent[2] * 2 == sent[1] and sent[4] * 4 == sent[1], sent


def test_local_branches_never_communicate():
    for k in (2, 4, 8):
        n = 64 * k
        q, k_, v = make_qkv(25, 1, n, 3, 16)
        attn = ringattn.RingDilatedAttention([16, 32, 64], [1, 2, 4], causal=True, world_size=k)
        o = run_with_timeout(lambda: attn(q, k_, v))
        assert attn.last_stats["bytes_sent"] == [0] * k
        assert attn.last_stats["bytes_received"] == [0] * k
        ro, _ = reference_attention(q, k_, v, [16, 32, 64], [1, 2, 4], causal=True)
        assert_out_close(o, ro, np.float32)


def test_module_reusable_across_lengths():
    attn = ringattn.RingDilatedAttention([32, 64], [1, 2], causal=True, world_size=2,
                                         mode="longnet")
    for n in (64, 128, 256):
        q, k_, v = make_qkv(n, 1, n, 2, 16)
        o = run_with_timeout(lambda: attn(q, k_, v))
        ro, _ = reference_attention(q, k_, v, [32, 64], [1, 2], causal=True, mode="longnet")
        assert_out_close(o, ro, np.float32)
        _check_stats(attn.last_stats, 2)


def test_ring_with_custom_scale_and_threads():
    k, n = 4, 256
    q, k_, v = make_qkv(26, 2, n, 5, 80)
    attn = ringattn.RingDilatedAttention([64, 128, 256], [1, 2, 4], causal=True, mode="longnet",
                                         scale=0.07, world_size=k, num_threads=2)
    o = run_with_timeout(lambda: attn(q, k_, v))
    ro, _ = reference_attention(q, k_, v, [64, 128, 256], [1, 2, 4], causal=True,
                                mode="longnet", scale=0.07)
    assert_out_close(o, ro, np.float32)


def test_ring_noncontiguous_inputs():
    k, n = 4, 128
    q, k_, v = make_qkv(27, 2, n, 3, 16)
    qt = np.ascontiguousarray(q.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    kr = np.ascontiguousarray(k_[:, ::-1])[:, ::-1]
    vf = np.asfortranarray(v)
    attn = ringattn.RingDilatedAttention([32, n], [1, 2], causal=True, world_size=k)
    o = run_with_timeout(lambda: attn(qt, kr, vf))
    ro, _ = reference_attention(q, k_, v, [32, n], [1, 2], causal=True)
    assert_out_close(o, ro, np.float32)


def test_ring_split_gather_roundtrip_matches():
    k, n = 4, 128
    q, k_, v = make_qkv(28, 1, n, 2, 16)
    attn = ringattn.RingDilatedAttention([n], [1], causal=True, world_size=k)
    o = run_with_timeout(lambda: attn(q, k_, v))
    shards = [ringattn.split_sequence(o, k, r) for r in range(k)]
    assert np.array_equal(ringattn.gather_sequence(shards), o)


def test_plan_describes_the_schedule():
    ring = ringattn.RingDilatedAttention([64, 256], [1, 2], causal=True, world_size=2)
    plan = ring.plan((1, 256, 4, 16))
    assert plan["local_len"] == 128 and plan["scale"] == 0.25
    assert [(b["segment"], b["rate"], b["span"]) for b in plan["branches"]] == [(64, 1, 1), (256, 2, 2)]
    assert [(b["head_begin"], b["head_end"]) for b in plan["branches"]] == [(0, 2), (2, 4)]
    with pytest.raises(ValueError, match="world_size"):
        ringattn.RingDilatedAttention([64], [1], world_size=3).plan((1, 64, 4, 16))


def _large_score_qkv(seed, b, n, h, d, sign, c=40.0):
    """q and k both along one unit vector per (batch, head), times c, plus unit
    noise: every score is about sign * c^2 / sqrt(d) = +-400 (d = 16), spread
    by about +-10, so every partial lse is about +-400."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((b, 1, h, d))
    a /= np.linalg.norm(a, axis=-1, keepdims=True)
    q = c * a + rng.standard_normal((b, n, h, d))
    k = sign * c * a + rng.standard_normal((b, n, h, d))
    v = rng.standard_normal((b, n, h, d))
    return tuple(x.astype(np.float32) for x in (q, k, v))


@pytest.mark.parametrize("sign", [1, -1], ids=["lse+400", "lse-400"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mode", ["groups", "longnet"])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_merge_of_large_magnitude_scores(k, mode, causal, sign):
    """Every ring step (k >= 2) and every longnet branch is merged by
    log-sum-exp (merge.c).  With partial lse values near +-400, e^lse
    overflows (e^89 > FLT_MAX) or underflows to 0 in float32 unless each merge
    is taken relative to the larger lse: without that, inf/inf or 0/0 = NaN."""
    b, n, h, d = 2, 48 * k, 4, 16
    segs, rates = [24, n], [1, 2]  # 24 local; n spans every rank
    q, k_, v = _large_score_qkv(90 + k, b, n, h, d, sign)
    attn = ringattn.RingDilatedAttention(segs, rates, causal=causal, mode=mode, world_size=k)
    o, lse = run_with_timeout(lambda: attn(q, k_, v, return_lse=True))
    ro, rl = reference_attention(q, k_, v, segs, rates, causal=causal, mode=mode)
    fin = np.isfinite(rl)
    assert np.abs(rl[fin]).min() > 200  # far beyond float32 exp range (|x| < 88) on every row
    assert np.all(np.isfinite(o)), "non-finite output"
    # float32 scores of magnitude 400 are only good to ~1e-4 absolute, so the
    # probabilities (and outputs) to ~1e-4 relative: 2e-4, not F32_TOL
    err = float(np.abs(o.astype(np.float64) - ro).max()) / float(np.abs(ro).max())
    assert err <= 2e-4, f"max error {err:.3e} of max |o|"
    assert_lse_close(lse, rl, np.float32)
    if k > 1:
        assert sum(attn.last_stats["bytes_sent"]) > 0  # the n branch travelled the ring
