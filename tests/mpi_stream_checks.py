"""Run under mpirun by test_ring_memory.py: the streamed ring over MPI.

"exact": float64 forward and gradients of dense causal attention equal the
reference on every rank, and the slots are the size the formula says (with
RINGATTN_RING_SUB_BLOCKS, or the CPU's 8).  "mismatch": the ranks were
started with different RINGATTN_RING_SUB_BLOCKS; every rank must refuse the
call with the same ValueError instead of exchanging mis-sized sub-blocks.
"""

import os
import sys

import numpy as np

import ringattn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memory_model import peak_terms  # noqa: E402
from reference import reference_attention, reference_backward  # noqa: E402

comm = ringattn.Communicator.mpi(timeout=60)
k = comm.world_size
b, n, h, d = 1, 48 * k, 2, 8
rng = np.random.default_rng(3)
q, kk, v, do = (rng.standard_normal((b, n, h, d)) for _ in range(4))


def shard(x):
    return np.ascontiguousarray(ringattn.split_sequence(x, comm=comm))


attn = ringattn.RingDilatedAttention([n], [1], causal=True, comm=comm)
if sys.argv[1] == "mismatch":
    try:
        attn(shard(q), shard(kk), shard(v))
        raise SystemExit("the call went ahead with different sub-block counts")
    except ValueError as e:
        assert "ring_sub_blocks differs between ranks" in str(e), e
    print("MISMATCH REFUSED", flush=True)
else:
    o = attn(shard(q), shard(kk), shard(v), requires_grad=True)
    assert np.abs(o - shard(reference_attention(q, kk, v, [n], [1], causal=True)[0])).max() < 1e-12
    sub = int(os.environ.get("RINGATTN_RING_SUB_BLOCKS") or 8)
    args = ((b, n, h, d), np.float64, [n], [1], "groups", k, 1)
    slots = peak_terms(*args, sub_blocks=sub)[1][comm.rank]
    assert attn.last_stats["ring_buffer_bytes"] == [slots] and slots > 0, attn.last_stats
    grads = attn.backward(shard(do))
    for g, r in zip(grads, reference_backward(q, kk, v, do, [n], [1], causal=True)):
        assert np.abs(g - shard(r)).max() < 1e-11
    slots = peak_terms(*args, backward=True, sub_blocks=sub)[1][comm.rank]
    assert attn.last_stats["ring_buffer_bytes"] == [slots], attn.last_stats  # with double dK/dV
    print("STREAM CHECKS PASSED", flush=True)
comm.close()
