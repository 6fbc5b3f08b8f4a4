"""Run by tests/test_torch_mha.py under `mpirun -n K python tests/mpi_torch_checks.py`.

MultiheadDilatedAttention(comm=) on this rank's shard equals this rank's
slice of the same module run with world_size=1 on the whole sequence,
forward and gradients (inputs and parameters, summed over ranks).  Rank 0
prints "MPI TORCH CHECKS PASSED".
"""

import numpy as np
import torch

import ringattn
import ringattn.torch as rt

comm = ringattn.Communicator.mpi()
K, RANK = comm.world_size, comm.rank

for causal, mode in ((True, "groups"), (False, "longnet")):
    torch.manual_seed(0)  # the same weights and inputs on every rank
    full = rt.MultiheadDilatedAttention(16, 2, [8, 32], [1, 2], causal=causal, mode=mode, dtype=torch.float64)
    mine = rt.MultiheadDilatedAttention(16, 2, [8, 32], [1, 2], causal=causal, mode=mode, dtype=torch.float64,
                                        comm=comm)
    mine.load_state_dict(full.state_dict())
    x = torch.randn(2, 32, 16, dtype=torch.float64)
    g = torch.randn(2, 32, 16, dtype=torch.float64)
    L = 32 // K
    part = slice(RANK * L, (RANK + 1) * L)
    xf = x.clone().requires_grad_(True)
    yf, _ = full(xf, xf, xf)
    yf.backward(g)
    xl = x[:, part].clone().requires_grad_(True)
    yl, _ = mine(xl, xl, xl)
    yl.backward(g[:, part])
    assert torch.allclose(yl, yf[:, part], atol=1e-12), f"rank {RANK}: output differs"
    assert torch.allclose(xl.grad, xf.grad[:, part], atol=1e-12), f"rank {RANK}: input gradient differs"
    for name, p in mine.named_parameters():  # each rank holds its shard's share of the gradient
        total = ringattn.gather_sequence(p.grad.detach().numpy()[None, None], comm=comm).sum(axis=1)[0]
        want = dict(full.named_parameters())[name].grad.numpy()
        assert np.allclose(total, want, atol=1e-11), f"rank {RANK}: {name} gradient differs"
    assert len(mine.last_stats["peak_bytes"]) == 1

if RANK == 0:
    print("MPI TORCH CHECKS PASSED")
