"""Threads (issue 10, item 4).

- One RingDilatedAttention (and one ringattn.torch module) shared by
  threads: what a call keeps -- the saved tensors of backward() and
  last_stats -- is per thread, so concurrent forward+backward pairs with
  different inputs give the single-threaded results.
- num_threads is bounded: at most 4 x the cores (ValueError beyond, for
  num_threads= and set_num_threads); the core clamps to the same bound, so
  a caller that bypasses Python cannot make libgomp fail to start its
  threads under a memory limit.
- Communicator.close() while another thread is inside a call on it raises
  RuntimeError and leaves the call unharmed (mpirun -n 1).
"""

import copy
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from conftest import RING_TIMEOUT, make_qkv

import ringattn
from ringattn import _validate as check

HERE = os.path.dirname(os.path.abspath(__file__))
MPIRUN = shutil.which("mpirun")
JOIN = 60  # seconds a worker thread may take: a ring that hangs fails the test

SEGS, RATES = [16, 64], [1, 4]


def _run_threads(target, n, barriers=()):
    """Run target(i) on n threads started together; re-raise the first error.
    A thread that fails breaks `barriers` (the target's own), so that the
    others stop waiting for it."""
    errors = [None] * n
    barrier = threading.Barrier(n, timeout=JOIN)

    def body(i):
        try:
            barrier.wait()
            target(i)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors[i] = e
            for b in (barrier,) + tuple(barriers):
                b.abort()

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN)
    assert not any(t.is_alive() for t in threads), f"a thread did not finish within {JOIN} s"
    for e in errors:
        if e is not None and not isinstance(e, threading.BrokenBarrierError):
            raise e
    for e in errors:
        if e is not None:
            raise e


def _inputs(i):
    """Different inputs per thread, of two lengths (so that stats differ too)."""
    n = 64 * (1 + i % 2)
    q, k, v = make_qkv(200 + i, 1, n, 2, 16)
    dout = np.random.default_rng(300 + i).standard_normal(q.shape).astype(np.float32)
    return q, k, v, dout


@pytest.mark.timeout(RING_TIMEOUT * 4)
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_shared_ring_forward_backward_in_threads(world_size):
    n_threads, rounds = 6, 3
    ring = ringattn.RingDilatedAttention(SEGS, RATES, causal=True, mode="longnet", world_size=world_size)
    ref = []
    for i in range(n_threads):  # one thread: the reference
        q, k, v, dout = _inputs(i)
        o = ring(q, k, v, requires_grad=True)
        fwd_stats = ring.last_stats
        grads = ring.backward(dout)
        ref.append((o, grads, fwd_stats, ring.last_stats))
    assert ref[0][2] != ref[1][2]  # the two lengths are told apart by their stats
    seen = [[] for _ in range(n_threads)]
    barrier = threading.Barrier(n_threads, timeout=JOIN)

    def work(i):
        q, k, v, dout = _inputs(i)
        for _ in range(rounds):
            o = ring(q, k, v, requires_grad=True)
            barrier.wait()  # every thread's forward is done before any backward
            fwd_stats = ring.last_stats
            grads = ring.backward(dout)
            seen[i].append((o, grads, fwd_stats, ring.last_stats))
            barrier.wait()

    _run_threads(work, n_threads, (barrier,))
    for i in range(n_threads):
        assert len(seen[i]) == rounds
        for o, grads, fwd_stats, bwd_stats in seen[i]:
            np.testing.assert_array_equal(o, ref[i][0])
            for g, r in zip(grads, ref[i][1]):
                np.testing.assert_array_equal(g, r)
            assert fwd_stats == ref[i][2] and bwd_stats == ref[i][3], i
    assert ring.last_stats == ref[-1][3]  # this thread's own last call


def test_backward_needs_a_forward_in_the_same_thread():
    ring = ringattn.RingDilatedAttention(SEGS, RATES)
    q, k, v, dout = _inputs(0)
    ring(q, k, v, requires_grad=True)
    errors = []

    def other():
        assert ring.last_stats is None  # no call made in this thread
        try:
            ring.backward(dout)
        except RuntimeError as e:
            errors.append(e)

    t = threading.Thread(target=other)
    t.start()
    t.join(JOIN)
    assert len(errors) == 1 and "this thread" in str(errors[0])
    ring.backward(dout)  # this thread's forward is still there


def test_copies_and_pickles_carry_the_configuration_not_the_calls():
    ring = ringattn.RingDilatedAttention(SEGS, RATES, causal=True, world_size=2)
    q, k, v, dout = _inputs(1)
    o = ring(q, k, v, requires_grad=True)
    for twin in (copy.deepcopy(ring), copy.copy(ring), pickle.loads(pickle.dumps(ring))):
        assert twin.last_stats is None
        with pytest.raises(RuntimeError, match="requires_grad"):
            twin.backward(dout)
        np.testing.assert_array_equal(twin(q, k, v, requires_grad=True), o)
        assert twin.last_stats == ring.last_stats
        twin.backward(dout)
    ring.backward(dout)


# --------------------------------------------------------------------- torch

@pytest.mark.timeout(RING_TIMEOUT * 4)
def test_torch_module_shared_by_threads():
    torch = pytest.importorskip("torch")
    import ringattn.torch as rt

    layer = rt.RingDilatedAttention(SEGS, RATES, causal=True, world_size=2)
    n_threads = 4

    def grads_of(i):
        q, k, v, dout = (torch.from_numpy(x.copy()) for x in _inputs(i))
        for t in (q, k, v):
            t.requires_grad_(True)
        o = layer(q, k, v)
        stats = layer.last_stats
        (o * dout).sum().backward()
        return o.detach(), q.grad, k.grad, v.grad, stats

    ref = [grads_of(i) for i in range(n_threads)]
    got = [None] * n_threads
    _run_threads(lambda i: got.__setitem__(i, grads_of(i)), n_threads)
    for r, g in zip(ref, got):
        for a, b in zip(r[:4], g[:4]):
            assert torch.equal(a, b)
        assert r[4] == g[4]


def test_torch_backward_on_another_thread():
    """Autograd runs the backward of CUDA tensors on threads of its own: the
    saved tensors must not be the forward thread's per-thread state."""
    torch = pytest.importorskip("torch")
    import ringattn.torch as rt

    q, k, v, dout = (torch.from_numpy(x.copy()) for x in _inputs(2))
    for t in (q, k, v):
        t.requires_grad_(True)
    want = rt.dilated_attention(q, k, v, SEGS, RATES)
    (want * dout).sum().backward()
    want_grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    out = {}
    fwd = threading.Thread(target=lambda: out.setdefault("o", rt.dilated_attention(q, k, v, SEGS, RATES)))
    fwd.start()
    fwd.join(JOIN)
    bwd = threading.Thread(target=lambda: (out["o"] * dout).sum().backward())
    bwd.start()
    bwd.join(JOIN)
    for t, w_ in zip((q, k, v), want_grads):
        assert torch.equal(t.grad, w_)


# ---------------------------------------------------------------- num_threads

def test_num_threads_is_bounded():
    top = check.max_threads()
    assert top == 4 * (os.cpu_count() or 1)
    q, k, v, _ = _inputs(0)
    with pytest.raises(ValueError, match="num_threads"):
        ringattn.dilated_attention(q, k, v, SEGS, RATES, num_threads=top + 1)
    with pytest.raises(ValueError, match="num_threads"):
        ringattn.dilated_attention_backward(q, k, v, q, np.zeros((1, 2, 64), np.float32), q, SEGS, RATES,
                                            num_threads=10**6)
    with pytest.raises(ValueError, match="num_threads"):
        ringattn.RingDilatedAttention(SEGS, RATES, num_threads=top + 1)
    with pytest.raises(ValueError, match="num_threads"):
        ringattn.set_num_threads(top + 1)
    with pytest.raises(ValueError, match="num_threads"):
        ringattn.set_num_threads(0)
    want = ringattn.dilated_attention(q, k, v, SEGS, RATES, num_threads=1)
    np.testing.assert_array_equal(ringattn.dilated_attention(q, k, v, SEGS, RATES, num_threads=top), want)
    try:
        ringattn.set_num_threads(top)
        assert ringattn.get_num_threads() == top
        np.testing.assert_array_equal(ringattn.dilated_attention(q, k, v, SEGS, RATES), want)
    finally:
        ringattn.set_num_threads(None)


def _python(code, env=None, timeout=120):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=False, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def test_environment_thread_count_is_clamped():
    r = _python("""
        import ringattn
        from ringattn import _validate as check
        assert 1 <= ringattn.get_num_threads() <= check.max_threads(), ringattn.get_num_threads()
        print("OK", ringattn.get_num_threads())
    """, env={"RINGATTN_NUM_THREADS": "100000"})
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux's")
def test_core_clamps_threads_under_a_memory_limit():
    """_ext.run (no Python rule) with num_threads=1000 (or 8 x the bound on a
    machine with more than 32 cores) under an address-space limit that fits
    4 x the cores but not 1000 OpenMP threads of 16 MiB stacks: the call
    completes (libgomp would otherwise fail to start its threads and end the
    process, as the issue saw)."""
    r = _python("""
        import resource
        import numpy as np
        import ringattn
        from ringattn import _ext
        from ringattn import _validate as check

        rng = np.random.default_rng(0)
        q, k, v = (rng.standard_normal((1, 256, 4, 32)).astype(np.float32) for _ in range(3))
        want = ringattn.dilated_attention(q, k, v, [256], [1], num_threads=1)
        o = np.zeros_like(q)
        vm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize"))
        limit = vm + check.max_threads() * 2 * (16 << 20) + (512 << 20)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        t = {n: _ext.intake(a, n) for n, a in (("q", q), ("k", k), ("v", v), ("o", o))}
        _ext.run(backward=False, **t, lse=None, device_type=_ext.DEVICE_CPU, segment_lengths=[256],
                 dilation_rates=[1], causal=False, mode=0, scale=0.0, world_size=1,
                 num_threads=max(1000, 8 * check.max_threads()))
        assert np.array_equal(o, want), float(np.abs(o - want).max())
        print("OK", limit >> 20, "MiB")
    """, env={"OMP_STACKSIZE": "16M", "MALLOC_ARENA_MAX": "2", "OMP_WAIT_POLICY": "passive"})
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr


# ------------------------------------------------------------ communicators

@pytest.mark.skipif(MPIRUN is None, reason="mpirun not found (apt-get install openmpi-bin)")
@pytest.mark.skipif(not ringattn._ext.have()["mpi"], reason="ringattn built without MPI")
@pytest.mark.timeout(300)
def test_comm_close_during_a_call_raises():
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1")
    cmd = [MPIRUN, "--oversubscribe", "-n", "1", sys.executable, os.path.join(HERE, "comm_close_checks.py")]
    try:
        r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=240, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"mpirun -n 1 hung for 240 s:\n{e.stdout}\n{e.stderr}")
    assert r.returncode == 0 and "COMM CLOSE CHECKS PASSED" in r.stdout, r.stdout + r.stderr
