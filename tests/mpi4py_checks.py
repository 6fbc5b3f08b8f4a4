"""Run by tests/test_mpi.py under `mpirun -n 4`: ringattn on mpi4py sub-communicators.

MPI_COMM_WORLD is split into two communicators of two ranks; each runs its
own ring, which must equal the single-process result.  Exit status 0 on
every rank when all passed.
"""

import sys

import numpy as np
from mpi4py import MPI

import ringattn

world = MPI.COMM_WORLD
sub = world.Split(color=world.rank % 2, key=world.rank)
comm = ringattn.Communicator.mpi(sub)
ok = comm.world_size == sub.Get_size() and comm.rank == sub.Get_rank()
rng = np.random.default_rng(world.rank % 2)  # the two rings get different inputs
q, k, v = (rng.standard_normal((1, 128, 2, 16)).astype(np.float32) for _ in range(3))
ref = ringattn.dilated_attention(q, k, v, [128], [1], causal=True)
attn = ringattn.RingDilatedAttention([128], [1], causal=True, comm=comm)
out = attn(*(ringattn.split_sequence(x, comm=comm) for x in (q, k, v)))
err = float(np.abs(ringattn.gather_sequence(out, comm=comm) - ref).max())
ok = ok and err < 1e-5 and attn.last_stats["bytes_sent"][0] + attn.last_stats["bytes_received"][0] > 0
comm.close()
all_ok = world.allreduce(int(ok), op=MPI.MIN)
if world.rank == 0:
    print("MPI4PY CHECKS PASSED" if all_ok else "MPI4PY CHECKS FAILED")
sys.exit(0 if all_ok else 1)
