"""Per-rank memory is O(n / k): the point of ring attention.

peak_bytes counts what one rank holds: its shards of q, k, v, o (caller owned),
the key/value blocks in flight, and its workspace.  At fixed n the maximum over
ranks must fall like 1/k.

Why the bound is not "peak(k) <= 1.25 * peak(1) / k": at k = 1 a rank holds
q, k, v, o (4 units of n*h*d*b elements); at k >= 2 it holds its 4 shards plus
at least one received key/value block (2 more shards), and a ring that overlaps
communication with compute holds two (the block being computed on and the one
arriving).  So peak(k) is about 1.5 to 2 times peak(1) / k for every k >= 2,
which is still O(n / k).  The tests below check (i) exact 1/k scaling among
k >= 2 (+-25%, the per-rank share times k is constant), (ii) that the ring's
overhead over peak(1)/k is at most two key/value blocks (factor 2.25), and
(iii) a lower bound: the caller's shards are counted.
"""

import pytest

import ringattn
from conftest import make_qkv, run_with_timeout

B, N, H, D = 1, 4096, 2, 64
WORLD = [1, 2, 4, 8]
UNIT = B * N * H * D * 4  # bytes of one fp32 (b, n, h, d) tensor


def _peaks(segs, rates, causal=False, mode="groups"):
    q, k, v = make_qkv(31, B, N, H, D)
    peaks = {}
    for ws in WORLD:
        attn = ringattn.RingDilatedAttention(segs, rates, causal=causal, mode=mode,
                                             world_size=ws, num_threads=1)
        run_with_timeout(lambda: attn(q, k, v), timeout=120)
        stats = attn.last_stats
        assert len(stats["peak_bytes"]) == ws
        peaks[ws] = max(stats["peak_bytes"])
    return peaks


def _check(peaks, spanning=True, same_spans=True):
    # (iii) the caller's shards of q, k, v, o are counted
    for ws in WORLD:
        assert peaks[ws] >= 4 * UNIT / ws, peaks
    # strictly decreasing
    for a, b in zip(WORLD, WORLD[1:]):
        assert peaks[b] < peaks[a], peaks
    # (i) among k >= 2 the per-rank share scales exactly as 1/k (when the set of
    # spanning branches, hence the kind of blocks in flight, is the same for all k)
    base = peaks[2] * 2
    for ws in WORLD[2:] if same_spans else []:
        assert 0.75 * base <= peaks[ws] * ws <= 1.25 * base, (
            f"k={ws}: peak*k = {peaks[ws] * ws} not within 25% of peak(2)*2 = {base}; {peaks}")
    # (ii) the ring's overhead is at most two key/value blocks in flight
    for ws in WORLD[1:]:
        ideal = peaks[1] / ws
        hi = 2.25 if spanning else 1.25
        assert 0.75 * ideal <= peaks[ws] <= hi * ideal, (
            f"k={ws}: peak {peaks[ws]} not within [0.75, {hi}] * peak(1)/k = {ideal:.0f}; {peaks}")


@pytest.fixture(scope="module")
def dense_peaks():
    return _peaks([N], [1])


def test_dense_peak_scales_as_one_over_k(dense_peaks):
    _check(dense_peaks)


def test_dense_peak_at_one_rank_is_about_qkvo(dense_peaks):
    # q, k, v, o plus a small workspace (num_threads=1); not, e.g., an n x n matrix
    assert dense_peaks[1] <= 1.5 * 4 * UNIT, dense_peaks


def test_dilated_spanning_peak_scales_as_one_over_k():
    _check(_peaks([N], [2], mode="longnet"))


def test_mixed_spans_peak_scales_as_one_over_k():
    # branch 0 is local at k = 2 and spans ranks at k = 4, 8; only (ii), (iii)
    _check(_peaks([N // 2, N], [2, 4], mode="longnet"), same_spans=False)


def test_causal_dense_peak_scales_as_one_over_k():
    _check(_peaks([N], [1], causal=True))


def test_local_branches_peak_is_exactly_sharded():
    # every branch local for k <= 8 (L >= 512): no key/value blocks travel, so the
    # per-rank share is q, k, v, o shards + workspace: within 25% of peak(1)/k
    _check(_peaks([256, 512], [1, 2], causal=True), spanning=False)
