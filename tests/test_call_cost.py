"""What keeps a small call cheap (issue 11, item 4), checked for behaviour:

- kernel workspaces are kept between calls (csrc/cpu/backend.c), yet every
  call reports them as held: peak_bytes is the same on the first call and
  on later ones that reuse them;
- a call that does not choose its thread count gets as many threads as its
  work can use (csrc/ring/entry.c): a tiny call runs on one thread, which
  its peak_bytes shows (one workspace); an explicit num_threads is honoured;
- the plan cache (csrc/core/plan.c) gives the right plan when more
  configurations than it holds come and go;
- in-process ranks run on worker threads kept between calls
  (csrc/ring/ranks.c): concurrent rings from several threads, and calls in
  a child process after fork(), give the single-threaded results.
"""

import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from conftest import RING_TIMEOUT, make_qkv

import ringattn

pytestmark = pytest.mark.timeout(RING_TIMEOUT)

SEGS, RATES = [16, 64], [1, 2]


def _peaks(attn, q, k, v):
    attn(q, k, v)
    return attn.last_stats["peak_bytes"]


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reused_workspaces_are_still_counted(world_size, dtype):
    q, k, v = make_qkv(1, 1, 128, 4, 16, dtype)
    attn = ringattn.RingDilatedAttention(SEGS, RATES, world_size=world_size, num_threads=2 * world_size)
    first = _peaks(attn, q, k, v)
    again = [_peaks(attn, q, k, v) for _ in range(3)]
    assert all(p == first for p in again)
    # the backward too (its own workspaces, reused as well)
    o, lse = attn(q, k, v, return_lse=True)
    peaks = []
    for _ in range(3):
        attn._backward((q, k, v, o, lse), q)
        peaks.append(attn.last_stats["peak_bytes"])
    assert peaks[0] == peaks[1] == peaks[2]


@pytest.mark.skipif(os.environ.get("RINGATTN_NUM_THREADS") or (os.cpu_count() or 1) < 2,
                    reason="needs the default thread count, and 2 cores")
def test_a_tiny_call_runs_on_one_thread_unless_told():
    q, k, v = make_qkv(2, 1, 64, 4, 32)
    peak = {}
    for threads in (None, 1, 2):
        attn = ringattn.RingDilatedAttention([64], [1], num_threads=threads)
        peak[threads] = _peaks(attn, q, k, v)
    assert peak[None] == peak[1]  # sized by its work: one thread, one workspace
    assert peak[2] > peak[1]      # an explicit count is honoured: two workspaces
    # set_num_threads counts as explicit too
    ringattn.set_num_threads(2)
    try:
        assert _peaks(ringattn.RingDilatedAttention([64], [1]), q, k, v) == peak[2]
    finally:
        ringattn.set_num_threads(None)


def test_plan_cache_eviction_keeps_results_right():
    """More configurations than the cache holds (16), twice over."""
    rng = np.random.default_rng(5)
    shapes = [(1, 8 * i, 2, 8) for i in range(1, 21)]
    arrays = [tuple(rng.standard_normal(s).astype(np.float32) for _ in range(3)) for s in shapes]
    first = [ringattn.dilated_attention(q, k, v, [q.shape[1]], [1]) for q, k, v in arrays]
    for (q, k, v), want in zip(reversed(arrays), reversed(first)):
        got = ringattn.dilated_attention(q, k, v, [q.shape[1]], [1])
        assert np.array_equal(got, want)
        q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
        assert np.allclose(got, ringattn.dilated_attention(q64, k64, v64, [q.shape[1]], [1]), atol=1e-5)


def test_plan_cache_tells_apart_kv_heads_and_partitions():
    """Configurations that differ only in num_kv_heads or the partition get
    plans of their own: alternating them, every result is the float64 one."""
    rng = np.random.default_rng(6)
    q = rng.standard_normal((1, 64, 4, 8))
    kv = {h: (rng.standard_normal((1, 64, h, 8)), rng.standard_normal((1, 64, h, 8))) for h in (4, 2, 1)}
    want = {h: ringattn.dilated_attention(q, *kv[h], [16, 64], [1, 2], causal=True) for h in kv}
    for _ in range(2):
        for h in kv:
            for partition in ("contiguous", "zigzag"):
                ring = ringattn.RingDilatedAttention([16, 64], [1, 2], causal=True, world_size=2,
                                                     partition=partition)
                got = ring(*(x.astype(np.float32) for x in (q, *kv[h])))
                assert np.allclose(got, want[h], atol=1e-5), (h, partition)


def test_rings_from_several_threads_share_the_workers():
    q, k, v = make_qkv(3, 1, 128, 4, 16)
    want = ringattn.dilated_attention(q, k, v, SEGS, RATES, causal=True)
    errors = []

    def body():
        try:
            attn = ringattn.RingDilatedAttention(SEGS, RATES, causal=True, world_size=4, num_threads=4)
            for _ in range(10):
                assert np.allclose(attn(q, k, v), want, atol=1e-5)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=body, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(RING_TIMEOUT - 5)
    assert not any(t.is_alive() for t in threads), "a ring did not finish"
    assert not errors, errors[0]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_calls_after_fork():
    """Workers, cached workspaces and plans of the parent: a child process
    made by fork() after calls of every kind still computes the same."""
    script = textwrap.dedent("""
        import os, sys, numpy as np, ringattn
        rng = np.random.default_rng(0)
        q, k, v = (rng.standard_normal((1, 128, 4, 16)).astype(np.float32) for _ in range(3))
        ring = ringattn.RingDilatedAttention([16, 64], [1, 2], world_size=2, num_threads=2)
        want = ring(q, k, v)
        one = ringattn.dilated_attention(q, k, v, [16, 64], [1, 2], num_threads=2)
        pid = os.fork()
        if pid == 0:
            ok = np.allclose(ring(q, k, v), want, atol=1e-5) and np.allclose(
                ringattn.dilated_attention(q, k, v, [16, 64], [1, 2], num_threads=2), one, atol=1e-5)
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert np.allclose(ring(q, k, v), want, atol=1e-5)
        sys.exit(os.waitstatus_to_exitcode(status))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=RING_TIMEOUT - 5)
    assert r.returncode == 0, r.stderr
