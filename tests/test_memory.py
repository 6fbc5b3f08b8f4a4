"""Per-rank memory is O(n / k): the point of ring attention.

peak_bytes counts what one rank holds (its shards of q, k, v, o, the key/value
blocks in flight and its workspace).  At fixed n the maximum over ranks must
fall like 1/k.
"""

import numpy as np
import pytest

import ringattn
from conftest import make_qkv, run_with_timeout

B, N, H, D = 1, 4096, 2, 64
WORLD = [1, 2, 4, 8]


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


def _check(peaks):
    shard_bytes = 4 * B * N * H * D * 4  # q, k, v, o of the whole sequence at k = 1
    assert peaks[1] >= shard_bytes, peaks
    for ws in WORLD[1:]:
        ideal = peaks[1] / ws
        assert 0.75 * ideal <= peaks[ws] <= 1.25 * ideal, (
            f"k={ws}: peak {peaks[ws]} not within 25% of peak(1)/k = {ideal:.0f}; all: {peaks}")
    for a, b in zip(WORLD, WORLD[1:]):
        assert peaks[b] < peaks[a], peaks


@pytest.fixture(scope="module")
def dense_peaks():
    return _peaks([N], [1])


def test_dense_peak_scales_as_one_over_k(dense_peaks):
    _check(dense_peaks)


def test_dense_peak_scaling_among_multi_rank(dense_peaks):
    """Among k >= 2 (all of which hold a ring buffer) peak * k is constant."""
    base = dense_peaks[2] * 2
    for ws in WORLD[2:]:
        assert 0.8 * base <= dense_peaks[ws] * ws <= 1.2 * base, dense_peaks


def test_dilated_spanning_peak_scales_as_one_over_k():
    _check(_peaks([N // 2, N], [2, 4], mode="longnet"))
