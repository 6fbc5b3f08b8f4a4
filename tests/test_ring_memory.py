"""Ring buffers at the Ring Attention memory bound (ring/stream.c).

A spanning branch's blocks travel in sub-blocks through two slots, so a rank
holds two sub-blocks in flight rather than two whole blocks.  With
u = b * (n/k) * h * d input elements (one unit of n/k), dense attention
(one branch, segment n, rate 1) at k >= 2 holds per rank, forward:

    q, k, v, o shards                 4 u * es
    accumulator and lse state         u * acc + b h L * acc
    two slots of one sub-block        2 * 2 b h d ceil(L / S) * es   (= 4 u es / S)
    task and copy lists, workspaces   (constants, memory_model.py)

with S = 8 sub-blocks on the CPU, es the input's bytes per element and acc
the accumulator's (4; 8 for float64).  For float32 that is 5.5 u plus the
lse (u / d) and the constants: at most 6 units (the paper's 6 b c h bytes)
and at most 1.2 / k of the one-rank peak (5 u_1 + ...) once the per-thread
workspace is small next to a unit.  Backward: 8 shards, dQ/dK/dV accumulators
and delta, and two slots that carry their dK/dV: 4 u (es + acc) / S.
memory_model.py derives every term and the tests compare to the byte.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import ringattn
from conftest import RING_TIMEOUT, make_qkv, run_with_timeout
from memory_model import expected_peaks, peak_terms

pytestmark = pytest.mark.timeout(RING_TIMEOUT * 4)

SUB_BLOCKS = 8  # the CPU default (ring/stream.c)
# dense: units large next to a thread's workspace (~230 KB at d = 64)
B, N, H, D = 1, 1024, 32, 64
WORLD = [1, 2, 4, 8]
THREADS = 2


def unit_bytes(k, es=4):
    """One unit of n/k: the bytes of one rank's shard of q (b, n/k, h, d)."""
    return B * (N // k) * H * D * es


@pytest.fixture(scope="module")
def dense_runs():
    """Per k: (forward peaks, ring_buffer_bytes, backward peaks) of dense causal attention."""
    q, k_, v = make_qkv(41, B, N, H, D)
    out = {}
    for ws in WORLD:
        attn = ringattn.RingDilatedAttention([N], [1], causal=True, world_size=ws, num_threads=THREADS)
        run_with_timeout(lambda: attn(q, k_, v, requires_grad=True), 60)
        fwd = dict(attn.last_stats)
        run_with_timeout(lambda: attn.backward(v), 60)
        out[ws] = (fwd, dict(attn.last_stats))
    return out


def test_dense_peak_is_the_exact_formula(dense_runs):
    for ws, (fwd, bwd) in dense_runs.items():
        args = ((B, N, H, D), np.float32, [N], [1], "groups", ws, THREADS)
        assert list(fwd["peak_bytes"]) == expected_peaks(*args, lse=True), ws
        assert list(bwd["peak_bytes"]) == expected_peaks(*args, backward=True), ws
        # the slots, as the formula in the module docstring has them
        L = N // ws
        slots = 0 if ws == 1 else 2 * 2 * B * H * D * -(-L // SUB_BLOCKS) * 4
        assert list(fwd["ring_buffer_bytes"]) == [slots] * ws
        assert list(bwd["ring_buffer_bytes"]) == [2 * slots] * ws  # + float32 dK/dV
        assert peak_terms(*args)[1] == [slots] * ws


def test_dense_peak_within_six_units(dense_runs):
    for ws in WORLD[1:]:
        fwd, bwd = dense_runs[ws]
        units = max(fwd["peak_bytes"]) / unit_bytes(ws)
        assert units <= 6.0, f"k={ws}: forward peak {units:.2f} units of n/k"
        # in flight: half a unit (4 u / 8), not the 4 u of two whole blocks
        assert max(fwd["ring_buffer_bytes"]) == unit_bytes(ws) // 2
        # backward: 8 shards, 3 accumulators, lse and delta, the workspaces (0.4
        # units at k = 8) and 1 unit in flight (keys, values and their dK/dV)
        assert max(bwd["ring_buffer_bytes"]) == unit_bytes(ws)
        units = max(bwd["peak_bytes"]) / unit_bytes(ws)
        assert units <= 13, f"k={ws}: backward peak {units:.2f} units of n/k"


def test_dense_peak_at_most_1_2_over_k_of_one_rank(dense_runs):
    one_fwd, one_bwd = max(dense_runs[1][0]["peak_bytes"]), max(dense_runs[1][1]["peak_bytes"])
    for ws in WORLD[1:]:
        fwd, bwd = dense_runs[ws]
        assert max(fwd["peak_bytes"]) <= 1.2 * one_fwd / ws, (ws, max(fwd["peak_bytes"]) * ws / one_fwd)
        assert max(bwd["peak_bytes"]) <= 1.2 * one_bwd / ws, (ws, max(bwd["peak_bytes"]) * ws / one_bwd)


# ----------------------------------------------- other sub-block counts

_SCRIPT = """
import sys
import numpy as np
import ringattn
sys.path.insert(0, {tests!r})
from memory_model import expected_peaks
from reference import reference_attention, reference_backward

b, n, h, d = 2, 96, 3, 8
rng = np.random.default_rng(7)
q, k, v, do = (rng.standard_normal((b, n, h, d)) for _ in range(4))
for segs, rates, mode in (([96], [1], "groups"), ([48, 96], [2, 3], "longnet")):
    for causal in (False, True):
        ref = reference_attention(q, k, v, segs, rates, causal=causal, mode=mode)[0]
        gref = reference_backward(q, k, v, do, segs, rates, causal=causal, mode=mode)
        for ws in (2, 4):
            attn = ringattn.RingDilatedAttention(segs, rates, causal=causal, mode=mode, world_size=ws,
                                                 num_threads=ws)
            o = attn(q, k, v, requires_grad=True)
            assert np.abs(o - ref).max() < 1e-12, (segs, causal, ws)
            args = ((b, n, h, d), np.float64, segs, rates, mode, ws, ws)
            assert list(attn.last_stats["peak_bytes"]) == expected_peaks(*args, lse=True, sub_blocks={sub})
            grads = attn.backward(do)
            for g, r in zip(grads, gref):
                assert np.abs(g - r).max() < 1e-11, (segs, causal, ws)
            assert list(attn.last_stats["peak_bytes"]) == expected_peaks(*args, backward=True, sub_blocks={sub})
print("ok")
"""


@pytest.mark.parametrize("sub", [1, 3, 1000])
def test_sub_block_counts_are_exact(sub):
    """RINGATTN_RING_SUB_BLOCKS: 1 is the whole-block path (the CUDA default),
    3 cuts unevenly, 1000 more sub-blocks than keys (one key each): float64
    results and gradients match the reference, the peak the formula."""
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, RINGATTN_RING_SUB_BLOCKS=str(sub))
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(_SCRIPT.format(tests=tests, sub=sub))],
                       capture_output=True, text=True, env=env, timeout=RING_TIMEOUT * 3, check=False)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


# ---------------------------------------------------------------- over MPI

def _mpirun(*argv, timeout=120):
    import shutil
    mpirun = shutil.which("mpirun")
    if mpirun is None or not ringattn._ext.have()["mpi"]:
        pytest.skip("no mpirun, or ringattn built without MPI")
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", RINGATTN_NUM_THREADS="1")
    env.pop("RINGATTN_RING_SUB_BLOCKS", None)
    try:
        return subprocess.run([mpirun, "--oversubscribe", *argv], capture_output=True, text=True,
                              timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"mpirun hung for {timeout}s:\n{e.stdout}\n{e.stderr}")


_CHECKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mpi_stream_checks.py")


@pytest.mark.parametrize("sub", [None, 5])
def test_mpi_stream_is_exact(sub):
    extra = ["-x", f"RINGATTN_RING_SUB_BLOCKS={sub}"] if sub else []
    r = _mpirun(*extra, "-n", "3", sys.executable, _CHECKS, "exact")
    assert r.returncode == 0 and r.stdout.count("STREAM CHECKS PASSED") == 3, r.stdout + r.stderr


def test_mpi_ranks_with_different_sub_blocks_refuse_the_call():
    r = _mpirun("-n", "1", "env", "RINGATTN_RING_SUB_BLOCKS=1", sys.executable, _CHECKS, "mismatch",
                ":", "-n", "1", sys.executable, _CHECKS, "mismatch")
    assert r.returncode == 0 and r.stdout.count("MISMATCH REFUSED") == 2, r.stdout + r.stderr
