"""Fault scenarios run by tests/test_mpi_faults.py under
`mpirun -n K python tests/mpi_faults.py SCENARIO [TIMEOUT] [--mpi4py]`, and by
tests/test_torch_dist.py under `torchrun --nproc_per_node K ... --torch` (a
communicator over a gloo process group, Communicator.from_torch).

One rank misbehaves -- raises, exits, runs out of memory, calls another
operation, makes a call fewer, sleeps past the timeout, dies or fails inside
the ring -- and every other rank must raise (or be ended by mpirun) instead
of hanging.  Each rank reports on stdout, one line each:

    <<EVENT rank=R at=WALLCLOCK msg=WHAT>>      the misbehaviour, just before it
    <<OK rank=R label=L elapsed=S>>             a call that returned
    <<RAISED rank=R label=L type=T elapsed=S at=WALLCLOCK msg=MESSAGE>>
    <<DONE rank=R broken=...>>                  the end of the scenario

`elapsed` is the time from the start of the call to its return or
exception; `at` is time.time() when it raised, to compare with the EVENT.
"""

import os
import resource
import signal
import sys
import threading
import time

import numpy as np

import ringattn

SCENARIO = sys.argv[1]
TIMEOUT = float(sys.argv[2]) if len(sys.argv) > 2 else 600.0

if "--torch" in sys.argv:  # under torchrun: a communicator over a gloo process group (test_torch_dist.py)
    import torch.distributed as dist

    dist.init_process_group("gloo")
    comm = ringattn.Communicator.from_torch(timeout=TIMEOUT)
elif "--mpi4py" in sys.argv:  # mpi4py initialises (and finalizes) MPI, not ringattn
    from mpi4py import MPI
    comm = ringattn.Communicator.mpi(MPI.COMM_WORLD, timeout=TIMEOUT)
else:
    comm = ringattn.Communicator.mpi(timeout=TIMEOUT)
K, RANK = comm.world_size, comm.rank


def say(tag, **fields):
    """One record, <<...>>, written at once (mpirun may join lines of ranks)."""
    msg = fields.pop("msg", None)
    line = " ".join([tag, f"rank={RANK}"] + [f"{k}={v}" for k, v in fields.items()])
    if msg is not None:
        line += " msg=" + " ".join(str(msg).replace(">>", "> >").split())
    sys.stdout.write(f"<<{line}>>\n")
    sys.stdout.flush()


def event(what):
    say("EVENT", at=f"{time.time():.4f}", msg=what)


def attempt(label, fn):
    """Run one call and report how it ended."""
    t0 = time.monotonic()
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - every kind is reported
        say("RAISED", label=label, type=type(e).__name__, elapsed=f"{time.monotonic() - t0:.3f}",
            at=f"{time.time():.4f}", msg=e)
        return e
    say("OK", label=label, elapsed=f"{time.monotonic() - t0:.3f}")
    return None


def shards(n, h=2, d=16, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, n // K, h, d)).astype(dtype) for _ in range(3)]


def dense(n):
    """A ring over every rank: each rank waits for blocks from its neighbour."""
    return ringattn.RingDilatedAttention([n], [1], comm=comm)


def scenario_raise_before():
    """An ordinary exception in the user's code on the last rank, between
    two calls, left unhandled: the process exits with a traceback."""
    n = 64 * K
    attn, (q, k, v) = dense(n), shards(n)
    attempt("call1", lambda: attn(q, k, v))
    if RANK == K - 1:
        event("raise RuntimeError")
        raise RuntimeError("the user's code failed on this rank")
    attempt("call2", lambda: attn(q, k, v))
    attempt("after", lambda: attn(q, k, v))


def scenario_sys_exit():
    """sys.exit(3) on rank 1 between two calls."""
    n = 64 * K
    attn, (q, k, v) = dense(n), shards(n)
    attempt("call1", lambda: attn(q, k, v))
    if RANK == 1:
        event("sys.exit(3)")
        sys.exit(3)
    attempt("call2", lambda: attn(q, k, v))
    attempt("after", lambda: attn(q, k, v))


def scenario_memory_error():
    """A MemoryError while allocating the output on rank 1 (numpy.empty
    patched): a refusal; the communicator stays usable."""
    n = 64 * K
    attn, (q, k, v) = dense(n), shards(n)
    real = np.empty

    def no_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate the output (simulated)")

    if RANK == 1:
        event("numpy.empty raises MemoryError")
        np.empty = no_memory
    try:
        attempt("call1", lambda: attn(q, k, v))
    finally:
        np.empty = real
    attempt("after", lambda: attn(q, k, v))


def scenario_forward_backward():
    """Call 2 is a forward on rank 0 and a backward elsewhere; a gather of
    different sizes; then the communicator still works."""
    n = 64 * K
    attn, (q, k, v) = dense(n), shards(n)
    attempt("call1", lambda: attn(q, k, v, requires_grad=True))
    if RANK == 0:
        event("forward while the others run backward")
        attempt("call2", lambda: attn(q, k, v))
    else:
        attempt("call2", lambda: attn.backward(q))
    rows = 4 if RANK == 0 else 2
    attempt("gather_bytes", lambda: ringattn.gather_sequence(np.zeros((1, rows), np.float32), comm=comm))
    if RANK == 0:
        attempt("gather_vs_forward", lambda: ringattn.gather_sequence(q, comm=comm))
    else:
        attempt("gather_vs_forward", lambda: attn(q, k, v))
    attempt("after", lambda: ringattn.gather_sequence(attn(q, k, v), comm=comm))


def scenario_extra_call():
    """Rank 0 makes one call more than the others, which then leave: rank 1
    by exiting, the others by closing the communicator."""
    n = 64 * K
    attn, (q, k, v) = dense(n), shards(n)
    attempt("call1", lambda: attn(q, k, v))
    attempt("call2", lambda: attn(q, k, v))
    if RANK == 0:
        attempt("call3", lambda: attn(q, k, v))
    elif RANK == 1:
        event("exit after 2 calls")
    else:
        event("close after 2 calls")
        comm.close()


def scenario_timeout():
    """The last rank sleeps past the others' timeout before its first call."""
    n = 64 * K
    attn, (q, k, v) = dense(n), shards(n)
    if RANK == K - 1:
        event("sleep 4 x timeout")
        time.sleep(4 * TIMEOUT)
    attempt("call1", lambda: attn(q, k, v))
    attempt("after", lambda: attn(q, k, v))


def big_ring(h=1, d=64):
    """A ring call long enough (a few tenths of a second) to be interrupted."""
    n = 8192 * K
    attn = ringattn.RingDilatedAttention([n], [1], comm=comm)
    return attn, shards(n, h, d)


def scenario_kill_mid_ring():
    """Rank 1 is killed (SIGKILL) from a thread while the ring runs."""
    attn, (q, k, v) = big_ring()
    attempt("warmup", lambda: attn(q[:, :64], k[:, :64], v[:, :64]))
    if RANK == 1:
        def kill():
            time.sleep(0.15)
            event("SIGKILL")
            os.kill(os.getpid(), signal.SIGKILL)
        threading.Thread(target=kill, daemon=True).start()
    attempt("call2", lambda: attn(q, k, v))
    attempt("after", lambda: attn(q, k, v))


def scenario_oom_in_ring():
    """Rank 1 cannot allocate its accumulator after the agreement (an
    address-space limit): it fails inside the ring and tells its peers."""
    n = 1024 * 1024 * K  # fp16 shards of 4 MiB; the fp32 accumulator alone is 8 MiB
    attn = ringattn.RingDilatedAttention([n], [4096], comm=comm)
    q, k, v = shards(n, h=1, d=4, dtype=np.float16)
    out = np.empty_like(q)
    attempt("call1", lambda: attn(q, k, v, out=out))
    if RANK == 1:
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        event("address space limited")
        resource.setrlimit(resource.RLIMIT_AS, (vm + (4 << 20), resource.RLIM_INFINITY))
    attempt("call2", lambda: attn(q, k, v, out=out))
    if RANK == 1:
        resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    attempt("after", lambda: attn(q, k, v, out=out))


SCENARIOS = {name[len("scenario_"):]: fn for name, fn in globals().items() if name.startswith("scenario_")}

if __name__ == "__main__":
    SCENARIOS[SCENARIO]()
    say("DONE", broken=comm.broken is not None if comm._handle is not None else "closed")
