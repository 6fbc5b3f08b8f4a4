"""Checks run by tests/test_mpi.py under `mpirun -n K python tests/mpi_checks.py`.

Every rank computes its shard of the ring over a real MPI communicator and
compares it with its slice of the float64 reference (and of the
single-process ringattn result); error cases must raise on *every* rank
instead of hanging.  Rank 0 prints "MPI CHECKS PASSED" when all ranks pass.
"""

import os
import sys
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ringattn  # noqa: E402
from reference import reference_attention, reference_backward  # noqa: E402

comm = ringattn.Communicator.mpi()
K, RANK = comm.world_size, comm.rank


def check_case(name, b, n, h, d, segs, rates, causal=False, mode="groups", dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)  # the same full inputs on every rank
    q, k, v = (rng.standard_normal((b, n, h, d)).astype(dtype) for _ in range(3))
    ref, _ = reference_attention(q, k, v, segs, rates, causal=causal, mode=mode)
    single = ringattn.dilated_attention(q, k, v, segs, rates, causal=causal, mode=mode)
    attn = ringattn.RingDilatedAttention(segs, rates, causal=causal, mode=mode, comm=comm)
    local = [ringattn.split_sequence(x, comm=comm) for x in (q, k, v)]
    out = np.full_like(local[0], np.nan)  # poison: unwritten rows fail
    o, lse = attn(*local, out=out, return_lse=True)
    mine = ringattn.split_sequence(ref, comm=comm)
    tol, same_tol = {np.float16: (1e-2, 1e-2), np.float64: (1e-12, 1e-13)}.get(dtype, (2e-5, 1e-5))
    err = float(np.abs(o.astype(np.float64) - mine).max()) / max(float(np.abs(mine).max()), 1e-3)
    assert np.all(np.isfinite(o)), f"{name}: non-finite output on rank {RANK}"
    assert err <= tol, f"{name}: rank {RANK} relative error {err:.2e} > {tol}"
    assert lse.dtype == (np.float64 if dtype == np.float64 else np.float32), f"{name}: lse dtype {lse.dtype}"
    same = float(np.abs(o.astype(np.float64) - ringattn.split_sequence(single, comm=comm).astype(np.float64)).max())
    assert same <= same_tol, f"{name}: differs from single process by {same}"
    full = ringattn.gather_sequence(o, comm=comm)
    assert full.shape == q.shape and np.array_equal(ringattn.split_sequence(full, comm=comm), o)
    return attn.last_stats


def check_gradients(name, b, n, h, d, segs, rates, causal=False, mode="groups", seed=1, dtype=np.float32):
    rng = np.random.default_rng(seed)
    q, k, v, g = (rng.standard_normal((b, n, h, d)).astype(dtype) for _ in range(4))
    want = reference_backward(q, k, v, g, segs, rates, causal, mode)
    attn = ringattn.RingDilatedAttention(segs, rates, causal=causal, mode=mode, comm=comm)
    attn(*(ringattn.split_sequence(x, comm=comm) for x in (q, k, v)), requires_grad=True)
    got = attn.backward(ringattn.split_sequence(g, comm=comm))
    for gname, x, ref in zip(("dq", "dk", "dv"), got, want):
        mine = ringattn.split_sequence(ref, comm=comm)
        err = float(np.abs(x - mine).max()) / max(float(np.abs(ref).max()), 1e-6)
        tol = 1e-11 if dtype == np.float64 else 1e-4
        assert x.dtype == dtype and err < tol, f"{name}: {gname} on rank {RANK} error {err:.2e}"


def expect_error_everywhere(name, exc_type, fn, match):
    try:
        fn()
    except exc_type as e:
        assert match in str(e), f"{name}: rank {RANK} message {e!r} lacks {match!r}"
        return
    raise AssertionError(f"{name}: rank {RANK} raised nothing")


def main():
    L = 64 * K
    # dense ring: one segment spanning all ranks
    st = check_case("dense", 1, L * 2, 2, 32, [L * 2], [1])
    if K > 1:
        assert st["bytes_sent"][0] > 0
    check_case("dense causal", 1, L * 2, 3, 16, [L * 2], [1], causal=True)
    # dilated, groups: a local branch and a branch spanning all ranks (sub-ring = ring)
    n = 128 * K
    check_case("dilated", 2, n, 4, 16, [32, n], [1, 2], causal=False)
    check_case("dilated causal longnet", 1, n, 5, 16, [32, n], [2, 4], causal=True, mode="longnet")
    # sub-rings: segments spanning 2 ranks each (K >= 4 gives two sub-rings)
    if K >= 2:
        check_case("sub-ring", 1, 64 * K, 2, 16, [128], [2], causal=True)
    # all branches local: no traffic
    st = check_case("local", 1, 64 * K, 2, 16, [32, 64], [1, 2])
    assert st["bytes_sent"] == [0], st
    check_case("fp16", 1, 64 * K, 2, 64, [64 * K], [1], causal=True, dtype=np.float16)
    # float64: double accumulators, double dK/dV on the wire
    check_case("fp64", 1, 32 * K, 3, 8, [16, 32 * K], [1, 2], causal=True, mode="longnet", dtype=np.float64)
    # gradients through the ring: a spanning branch (sub-ring) and a local one
    check_gradients("grad dense causal", 1, 32 * K, 2, 16, [32 * K], [1], causal=True)
    check_gradients("grad dilated longnet", 1, 32 * K, 3, 8, [16, 32 * K], [1, 2], causal=True, mode="longnet")
    if K >= 4:
        check_gradients("grad sub-rings", 1, 32 * K, 2, 8, [64], [2])
    check_gradients("grad fp64", 1, 16 * K, 3, 8, [8, 16 * K], [1, 2], causal=True, mode="longnet",
                    dtype=np.float64)

    # mismatched configuration: rank 1 asks for other segments
    if K > 1:
        shard = np.ones((1, 64, 2, 16), np.float32)
        segs = [64] if RANK != 1 else [32]
        attn = ringattn.RingDilatedAttention(segs, [1], comm=comm)
        expect_error_everywhere("mismatch", ValueError, lambda: attn(shard, shard, shard),
                                "configuration differs between ranks")
        # one rank holds a NaN (nan_policy="raise"): everybody raises
        bad = shard.copy()
        if RANK == K - 1:
            bad[0, 3, 1, 2] = np.nan
        attn = ringattn.RingDilatedAttention([64 * K], [1], comm=comm)
        expect_error_everywhere("nan", ValueError, lambda: attn(shard, bad, shard), "NaN")
        # one rank's input fails Python-side validation (int32)
        q = shard.astype(np.int32) if RANK == 0 else shard
        expect_error_everywhere("dtype", (TypeError, ValueError), lambda: attn(q, shard, shard), "float")
        # a backward whose dout is refused on one rank raises everywhere
        attn = ringattn.RingDilatedAttention([64 * K], [1], comm=comm)
        attn(shard, shard, shard, requires_grad=True)
        dout = shard[:, :32] if RANK == 0 else shard
        expect_error_everywhere("backward dout", ValueError, lambda: attn.backward(dout), "dout")
        # one rank's out= has the wrong shape: everybody raises
        attn = ringattn.RingDilatedAttention([64 * K], [1], comm=comm)
        out = np.empty((1, 64, 2, 8), np.float32) if RANK == 0 else np.empty_like(shard)
        expect_error_everywhere("out", ValueError, lambda: attn(shard, shard, shard, out=out), "out")
        # a plan rule broken on one rank only (a segment that divides no sequence length)
        attn = ringattn.RingDilatedAttention([48] if RANK == K - 1 else [64 * K], [1], comm=comm)
        expect_error_everywhere("plan", ValueError, lambda: attn(shard, shard, shard), "segment_lengths")
        # backward() with nothing saved on rank 0 only (a RuntimeError there):
        # rank 0 raises it, the others a RingAttnError (a RuntimeError) naming it
        attn = ringattn.RingDilatedAttention([64 * K], [1], comm=comm)
        attn(shard, shard, shard, requires_grad=RANK != 0)
        expect_error_everywhere("backward unsaved", RuntimeError, lambda: attn.backward(shard), "backward() needs")
        # every call is counted once, refusals and gathers included; none of
        # the errors above broke the communicator
        calls = comm.calls
        ringattn.gather_sequence(shard, comm=comm)
        expect_error_everywhere("dtype again", (TypeError, ValueError),
                                lambda: attn(shard.astype(np.int32) if RANK == 0 else shard, shard, shard), "float")
        assert comm.calls == calls + 2 and comm.broken is None, (comm.calls, calls, comm.broken)
        # the communicator still works afterwards
        check_case("after errors", 1, 64 * K, 2, 16, [64 * K], [1])
    if ringattn.cuda_device_count() == 0:
        # every rank fails its own checks before NCCL's initialisation; they
        # agree over MPI first, so all raise and none blocks in ncclCommInitRank
        expect_error_everywhere("nccl_from_mpi without a GPU", (TypeError, ValueError, ringattn.RingAttnError),
                                lambda: ringattn.Communicator.nccl_from_mpi(0, timeout=30), "")
    assert comm.timeout == 600.0, comm.timeout
    comm.timeout = 30
    assert comm.timeout == 30.0
    comm.timeout = None
    assert comm.timeout is None
    comm.timeout = 600


try:
    main()
    ok = 1
except Exception:
    traceback.print_exc()
    ok = 0
flags = np.zeros(K, np.uint8)
flags_local = np.array([ok], np.uint8)
ringattn._ext.comm_allgather(comm.handle(), flags_local, flags)
comm.close()
if RANK == 0:
    print("MPI CHECKS PASSED" if flags.all() else f"MPI CHECKS FAILED on ranks {np.nonzero(flags == 0)[0].tolist()}")
sys.exit(0 if flags.all() else 1)
