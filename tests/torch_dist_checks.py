"""Checks run by tests/test_torch_dist.py under
`torchrun --nproc_per_node K tests/torch_dist_checks.py`: ringattn over a
torch.distributed gloo process group (Communicator.from_torch,
process_group=), each rank holding its shard of the sequence, against the
same computation in one process on the full sequence.  Every rank prints
<<CHECK rank=R name=NAME>> after each check that passed; a failed check
raises (and the job fails).
"""

import sys
import time

import numpy as np
import torch
import torch.distributed as dist

import ringattn
import ringattn._torch_comm as tc
import ringattn.torch as rt

dist.init_process_group("gloo")
RANK, K = dist.get_rank(), dist.get_world_size()
WORLD = dist.group.WORLD


def passed(name):
    sys.stdout.write(f"<<CHECK rank={RANK} name={name}>>\n")
    sys.stdout.flush()


def shard(x):
    """This rank's part of the sequence axis (1) of a full tensor."""
    n = x.shape[1] // K
    return x[:, RANK * n:(RANK + 1) * n]


def check_communicator():
    comm = ringattn.Communicator.from_torch(timeout=30)
    assert (comm.rank, comm.world_size, comm.backend) == (RANK, K, "gloo"), comm
    assert comm.timeout == 30 and comm.broken is None
    x = np.arange(6, dtype=np.float32).reshape(1, 3, 2) + 10 * RANK
    whole = ringattn.gather_sequence(x, comm=comm)
    assert whole.shape == (1, 3 * K, 2) and np.array_equal(shard(whole), x)
    comm.close()
    passed("communicator")


def check_attention(dtype, tol):
    """ringattn.torch.dilated_attention with process_group= on shards equals
    one process on the full sequence: output and q/k/v gradients."""
    gen = torch.Generator().manual_seed(3)  # the same inputs on every rank
    b, n, h, d = 2, 64 * K, 4, 8
    q, k, v, g = (torch.randn(b, n, h, d, generator=gen, dtype=dtype) for _ in range(4))
    segs, rates = [32, 64 * K], [1, 2]
    full = [t.clone().requires_grad_(True) for t in (q, k, v)]
    o_full = rt.dilated_attention(*full, segs, rates, causal=True)
    (o_full * g).sum().backward()
    mine = [shard(t).clone().requires_grad_(True) for t in (q, k, v)]
    o = rt.dilated_attention(*mine, segs, rates, causal=True, process_group=WORLD)
    (o * shard(g)).sum().backward()
    assert torch.allclose(o, shard(o_full), rtol=0, atol=tol), (o - shard(o_full)).abs().max()
    for a, ref in zip(mine, full):
        assert torch.allclose(a.grad, shard(ref.grad), rtol=0, atol=tol), (a.grad - shard(ref.grad)).abs().max()
    passed(f"attention_{str(dtype).split('.')[-1]}")


def check_module():
    """MultiheadDilatedAttention(process_group=) with the same weights as a
    one-process module: outputs, and parameter gradients summed over the
    ranks (as DDP would), equal the full-sequence ones."""
    torch.manual_seed(0)
    e, heads = 32, 4
    args = (e, heads, [16, 32 * K], [1, 2])
    ref = rt.MultiheadDilatedAttention(*args, causal=True, dtype=torch.float64)
    dist_mha = rt.MultiheadDilatedAttention(*args, causal=True, dtype=torch.float64, process_group=WORLD)
    dist_mha.load_state_dict(ref.state_dict())
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 32 * K, e, generator=gen, dtype=torch.float64)
    y_ref, _ = ref(x, x, x)
    y_ref.square().sum().backward()
    y, none = dist_mha(*(shard(x),) * 3)
    assert none is None
    y.square().sum().backward()
    assert torch.allclose(y, shard(y_ref), rtol=0, atol=1e-12)
    for (name, p), p_ref in zip(dist_mha.named_parameters(), ref.parameters()):
        grad = p.grad.clone()
        dist.all_reduce(grad)
        assert torch.allclose(grad, p_ref.grad, rtol=0, atol=1e-10), name
    passed("module")


def check_nccl_bootstrap():
    """from_torch's NCCL path without a GPU: the creator and the device are
    fakes; every rank must get rank 0's unique id, its own rank and device;
    a rank that cannot join makes every rank raise, before any creation."""
    made = []
    saved = tc._have_nccl, tc._current_cuda_device, tc._nccl_unique_id, tc._create_nccl
    try:
        tc._have_nccl = lambda: True
        tc._current_cuda_device = lambda: 7 - RANK
        tc._nccl_unique_id = lambda: bytes(np.random.default_rng().integers(0, 256, 128, dtype=np.uint8))
        tc._create_nccl = lambda uid, size, rank, device, timeout: made.append((uid, size, rank, device, timeout))
        tc.nccl_communicator(WORLD, 5.0)
        ((uid, size, rank, device, timeout),) = made
        ids = [None] * K
        dist.all_gather_object(ids, uid)
        assert len(uid) == 128 and all(i == ids[0] for i in ids)
        assert (size, rank, device, timeout) == (K, RANK, 7 - RANK, 5.0)

        def no_device():
            raise RuntimeError("no CUDA device here")

        if RANK == K - 1:
            tc._current_cuda_device = no_device
        made.clear()
        try:
            tc.nccl_communicator(WORLD, 0.0)
        except RuntimeError as e:
            assert f"rank {K - 1} cannot join an NCCL communicator: RuntimeError: no CUDA device here" in str(e), e
        else:
            raise AssertionError("a rank without a device did not fail the creation")
        assert not made
    finally:
        tc._have_nccl, tc._current_cuda_device, tc._nccl_unique_id, tc._create_nccl = saved
    passed("nccl_bootstrap")


def check_closed_connection_is_explained():
    """The gloo transport alone: rank 1 gives up a call (records why, closes
    its private group's connections); rank 0's next transfer to it, started
    or waited for later, raises rank 1's recorded failure, not gloo's
    "connection closed"."""
    _, _, _, t = tc.gloo_communicator(WORLD)
    t.current = ("forward (call 1)", 1)
    if RANK == 1:
        t.give_up("forward (call 1)", 1, "scripted failure")
    dist.barrier()  # the default group: untouched by the private group's closing
    if RANK == 0:
        time.sleep(0.2)
        try:
            op = t.isend(memoryview(b"ring block"), 1, 0)
            t.wait(op, 0, ("forward (call 1)", 1, "to take this rank's ring block", 10.0))
        except RuntimeError as e:
            assert str(e) == "rank 1 failed in forward (call 1): scripted failure", e
        else:
            raise AssertionError("a transfer to a rank that gave up succeeded")
    t.close(1)
    passed("closed_connection")


if __name__ == "__main__":
    check_communicator()
    check_attention(torch.float64, 1e-12)
    check_attention(torch.float32, 2e-6)
    check_module()
    check_nccl_bootstrap()
    if K == 2:
        check_closed_connection_is_explained()
    dist.destroy_process_group()
