"""Run by tests/test_partition_gqa.py under `mpirun -n 2`: the zigzag
partition and grouped-query attention over a real MPI communicator.  Each
rank passes its zigzag shard (split_sequence(partition="zigzag")); its
output, lse and gradients must equal its shard of the float64 reference,
and gather_sequence must rebuild the whole output.  Rank 0 prints
"MPI PARTITION CHECKS PASSED".
"""

import os
import sys
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ringattn  # noqa: E402
from reference import reference_attention, reference_backward  # noqa: E402

comm = ringattn.Communicator.mpi()


def check(name, b, n, h, h_kv, d, segs, rates, causal, mode, partition):
    rng = np.random.default_rng(42)  # the same full inputs on every rank
    q = rng.standard_normal((b, n, h, d))
    k, v = (rng.standard_normal((b, n, h_kv, d)) for _ in range(2))
    dout = rng.standard_normal(q.shape)
    split = [ringattn.split_sequence(x, comm=comm, partition=partition) for x in (q, k, v, dout)]
    ring = ringattn.RingDilatedAttention(segs, rates, causal=causal, mode=mode, comm=comm, partition=partition)
    o, lse = ring(*split[:3], return_lse=True, requires_grad=True)
    ref_o, ref_lse = reference_attention(q, k, v, segs, rates, causal=causal, mode=mode)
    mine = ringattn.split_sequence(ref_o, comm=comm, partition=partition)
    assert np.abs(o - mine).max() < 1e-12, f"{name}: output differs on rank {comm.rank}"
    lse_mine = ringattn.split_sequence(np.swapaxes(ref_lse, 1, 2), comm=comm, partition=partition)
    assert np.allclose(np.swapaxes(lse, 1, 2), lse_mine, atol=1e-12), f"{name}: lse differs on rank {comm.rank}"
    full = ringattn.gather_sequence(o, comm=comm, partition=partition)
    assert np.abs(full - ref_o).max() < 1e-12, f"{name}: gathered output differs"
    grads = ring.backward(split[3])
    for got, want, what in zip(grads, reference_backward(q, k, v, dout, segs, rates, causal=causal, mode=mode),
                               ("dq", "dk", "dv")):
        want = ringattn.split_sequence(want, comm=comm, partition=partition)
        assert got.shape == want.shape and np.abs(got - want).max() < 1e-11, f"{name}: {what} on rank {comm.rank}"


CASES = [
    ("zigzag dense causal GQA", 1, 64, 4, 2, 8, [64], [1], True, "groups", "zigzag"),
    ("zigzag dilated longnet MQA", 2, 64, 4, 1, 8, [8, 32, 64], [1, 2, 4], True, "longnet", "zigzag"),
    ("zigzag non-causal groups", 1, 64, 6, 3, 8, [16, 64], [1, 2], False, "groups", "zigzag"),
    ("contiguous GQA", 1, 64, 4, 2, 8, [16, 64], [1, 2], True, "longnet", "contiguous"),
]

failed = False
for case in CASES:
    try:
        check(*case)
    except Exception:  # noqa: BLE001 - report every failing case, every rank
        failed = True
        print(f"rank {comm.rank}: {case[0]} FAILED\n{traceback.format_exc()}", flush=True)
comm.close()
if failed:
    sys.exit(1)
if ringattn.Communicator and os.environ.get("OMPI_COMM_WORLD_RANK", "0") == "0":
    print("MPI PARTITION CHECKS PASSED", flush=True)
