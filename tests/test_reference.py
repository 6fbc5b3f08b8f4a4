"""Sanity checks of the float64 reference itself (no ringattn needed)."""

import math

import numpy as np
import pytest

from reference import (attended_pairs, bruteforce_attention, dense_attention,
                       group_head_ranges, longnet_offset, reference_attention)


def _rand(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape)


@pytest.mark.parametrize("mode", ["groups", "longnet"])
@pytest.mark.parametrize("causal", [False, True])
def test_dense_config_is_plain_attention(mode, causal):
    q, k, v = (_rand(s, 2, 48, 3, 16) for s in (1, 2, 3))
    o, lse = reference_attention(q, k, v, [48], [1], causal=causal, mode=mode)
    od, lsed = dense_attention(q, k, v, causal=causal)
    np.testing.assert_allclose(o, od, rtol=0, atol=1e-12)
    np.testing.assert_allclose(lse, lsed, rtol=0, atol=1e-12)
    # segment longer than n is clipped to n
    o2, _ = reference_attention(q, k, v, [4096], [1], causal=causal, mode=mode)
    np.testing.assert_allclose(o2, od, rtol=0, atol=1e-12)


def test_tiny_hand_case():
    n, d = 4, 2
    q = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, -1.0]]).reshape(1, n, 1, d)
    k = np.array([[0.5, 0.5], [1.0, -1.0], [0.0, 2.0], [3.0, 0.0]]).reshape(1, n, 1, d)
    v = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]]).reshape(1, n, 1, d)
    o, lse = reference_attention(q, k, v, [4], [1], causal=True, scale=1.0)
    # row 0 only sees key 0
    np.testing.assert_allclose(o[0, 0, 0], v[0, 0, 0], atol=1e-15)
    assert lse[0, 0, 0] == pytest.approx(0.5)
    # row 1 sees keys 0, 1: logits 0.5, -1
    w = np.exp([0.5, -1.0])
    np.testing.assert_allclose(o[0, 1, 0], (w[0] * v[0, 0, 0] + w[1] * v[0, 1, 0]) / w.sum())
    assert lse[0, 0, 1] == pytest.approx(math.log(w.sum()))
    # dilation 2 (groups, one branch, offset 0): rows 1 and 3 inactive, row 2 sees keys 0, 2
    o, lse = reference_attention(q, k, v, [4], [2], causal=True, scale=1.0)
    assert np.all(o[0, 1] == 0) and np.all(o[0, 3] == 0)
    assert np.isneginf(lse[0, 0, 1]) and np.isneginf(lse[0, 0, 3])
    np.testing.assert_allclose(o[0, 0, 0], v[0, 0, 0])
    w = np.exp([1.0, 2.0])  # q2.k0 = 1, q2.k2 = 2
    np.testing.assert_allclose(o[0, 2, 0], (w[0] * v[0, 0, 0] + w[1] * v[0, 2, 0]) / w.sum())


def test_identical_keys_give_mean_of_values():
    q = _rand(0, 1, 8, 1, 4)
    k = np.ones((1, 8, 1, 4))
    v = _rand(1, 1, 8, 1, 4)
    o, _ = reference_attention(q, k, v, [8], [1])
    np.testing.assert_allclose(o[0, :, 0], np.broadcast_to(v[0, :, 0].mean(0), (8, 4)), atol=1e-14)


def test_head_groups_and_offsets():
    assert group_head_ranges(5, 3) == [(0, 2), (2, 4), (4, 5)]
    assert group_head_ranges(12, 2) == [(0, 6), (6, 12)]
    assert group_head_ranges(3, 3) == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(ValueError):
        group_head_ranges(2, 3)
    assert [longnet_offset(h, 12, 4) for h in range(12)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert [longnet_offset(h, 3, 4) for h in range(3)] == [0, 1, 2]
    assert [longnet_offset(h, 5, 2) for h in range(5)] == [0, 0, 0, 1, 1]


def test_longnet_duplicate_branch_is_multiset_union():
    q, k, v = (_rand(s, 1, 32, 2, 8) for s in (4, 5, 6))
    od, lsed = dense_attention(q, k, v, causal=True)
    o, lse = reference_attention(q, k, v, [32, 32], [1, 1], causal=True, mode="longnet")
    np.testing.assert_allclose(o, od, atol=1e-12)
    np.testing.assert_allclose(lse, lsed + math.log(2), atol=1e-12)


CASES = [
    (12, 3, [4, 12], [2, 3]),
    (16, 5, [4, 8, 16], [1, 2, 4]),
    (8, 1, [8], [2]),
    (24, 7, [6, 12], [3, 4]),
    (16, 4, [32], [4]),
    (16, 3, [16, 8], [4, 8]),
]


@pytest.mark.parametrize("n,h,seg,rates", CASES)
@pytest.mark.parametrize("mode", ["groups", "longnet"])
@pytest.mark.parametrize("causal", [False, True])
def test_vectorized_equals_bruteforce(n, h, seg, rates, mode, causal):
    if mode == "groups" and h < len(seg):
        pytest.skip("groups mode needs h >= G")
    q, k, v = (_rand(s, 2, n, h, 8) for s in (7, 8, 9))
    o1, l1 = reference_attention(q, k, v, seg, rates, causal, mode, scale=0.4)
    o2, l2 = bruteforce_attention(q, k, v, seg, rates, causal, mode, scale=0.4)
    assert np.array_equal(np.isneginf(l1), np.isneginf(l2))
    fin = np.isfinite(l1)
    np.testing.assert_allclose(l1[fin], l2[fin], atol=1e-12)
    np.testing.assert_allclose(o1, o2, atol=1e-12)
    # inactive rows are exactly zero
    for bb, hh, p in zip(*np.nonzero(~fin)):
        assert np.all(o1[bb, p, hh] == 0)
    # pair counting used by the benchmark agrees with brute force
    cnt = 0
    S_r = [(min(s, n), r) for s, r in zip(seg, rates)]
    if mode == "groups":
        cells = [[(i, i % S_r[i][1])] for i, (lo, hi) in enumerate(group_head_ranges(h, len(seg)))
                 for _ in range(lo, hi)]
    else:
        cells = [[(i, longnet_offset(hh, h, r)) for i, (_, r) in enumerate(S_r)] for hh in range(h)]
    for hh in range(h):
        for i, off in cells[hh]:
            S, r = S_r[i]
            for p in range(n):
                for pk in range(n):
                    if ((p % S) % r == off and (pk % S) % r == off and p // S == pk // S
                            and (not causal or pk <= p)):
                        cnt += 1
    assert attended_pairs(n, h, seg, rates, causal, mode) == cnt
