"""Grouped-query attention and the zigzag partition (docs/semantics.md,
"Grouped-query attention" and "Ring partition") against the float64
reference: random configurations over 1..8 in-process ranks, both modes,
causal or not, forward and gradients; the balance of causal work and the
traffic of GQA rings (last_stats); the validation of both; split/gather;
torch; and a real two-process MPI run (tests/mpi_partition_checks.py).
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import ringattn
from reference import attended_pairs, reference_attention, reference_backward

HERE = os.path.dirname(os.path.abspath(__file__))


def divisors(x, limit=None):
    return [d for d in range(1, x + 1) if x % d == 0 and (limit is None or d <= limit)]


def random_config(rng):
    """A valid random (shape, branches, ring) configuration: every segment
    length divides the chunk or is a multiple of it (chunk = n / k for
    contiguous, n / (2k) for zigzag)."""
    k = int(rng.integers(1, 9))
    partition = str(rng.choice(["contiguous", "zigzag"]))
    chunk = int(rng.choice([4, 8]))
    chunks = 2 * k if partition == "zigzag" else k
    n = chunk * chunks
    h_kv = int(rng.choice([1, 2, 3]))
    h = h_kv * int(rng.choice([1, 2, 3]))
    mode = str(rng.choice(["groups", "longnet"]))
    G = int(rng.integers(1, min(3, h) + 1)) if mode == "groups" else int(rng.integers(1, 4))
    segs, rates = [], []
    for _ in range(G):
        if rng.random() < 0.4:
            S = int(rng.choice(divisors(chunk)))               # local to a chunk
        else:
            S = chunk * int(rng.choice(divisors(chunks)))      # spans whole chunks
        segs.append(S)
        rates.append(int(rng.choice(divisors(S, 4))))
    return dict(b=int(rng.integers(1, 3)), n=n, h=h, h_kv=h_kv, d=int(rng.choice([4, 8])), segs=segs,
                rates=rates, k=k, partition=partition, causal=bool(rng.random() < 0.5), mode=mode)


def inputs(c, seed, dtype=np.float64):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((c["b"], c["n"], c["h"], c["d"])).astype(dtype)
    k, v = (rng.standard_normal((c["b"], c["n"], c["h_kv"], c["d"])).astype(dtype) for _ in range(2))
    dout = rng.standard_normal(q.shape).astype(dtype)
    return q, k, v, dout


def ring_of(c):
    return ringattn.RingDilatedAttention(c["segs"], c["rates"], causal=c["causal"], mode=c["mode"],
                                         world_size=c["k"], partition=c["partition"])


@pytest.mark.parametrize("seed", range(40))
def test_random_configurations_float64(seed):
    """Forward, lse and gradients of random GQA/partition configurations equal
    the float64 reference (outputs poisoned with NaN first)."""
    c = random_config(np.random.default_rng(1000 + seed))
    q, k, v, dout = inputs(c, seed)
    ring = ring_of(c)
    out = np.full(q.shape, np.nan)
    ring(q, k, v, out=out)
    o, lse = ring(q, k, v, out=np.full(q.shape, np.nan), return_lse=True, requires_grad=True)
    ref_o, ref_lse = reference_attention(q, k, v, c["segs"], c["rates"], causal=c["causal"], mode=c["mode"])
    np.testing.assert_allclose(o, ref_o, atol=1e-12, rtol=1e-12, err_msg=str(c))
    np.testing.assert_allclose(out, ref_o, atol=1e-12, rtol=1e-12, err_msg=str(c))
    finite = np.isfinite(ref_lse)
    assert np.array_equal(np.isfinite(lse), finite), c
    np.testing.assert_allclose(lse[finite], ref_lse[finite], atol=1e-12, err_msg=str(c))
    dq, dk, dv = ring.backward(dout)
    assert dk.shape == k.shape and dv.shape == v.shape, c
    for got, want in zip((dq, dk, dv), reference_backward(q, k, v, dout, c["segs"], c["rates"],
                                                          causal=c["causal"], mode=c["mode"])):
        np.testing.assert_allclose(got, want, atol=1e-11, rtol=1e-10, err_msg=str(c))


@pytest.mark.parametrize("seed", range(6))
def test_random_configurations_float32(seed):
    """The float32 kernels under the same configurations (forward and backward)."""
    c = random_config(np.random.default_rng(2000 + seed))
    q, k, v, dout = inputs(c, seed, np.float32)
    ring = ring_of(c)
    o = ring(q, k, v, requires_grad=True)
    ref_o, _ = reference_attention(q, k, v, c["segs"], c["rates"], causal=c["causal"], mode=c["mode"])
    np.testing.assert_allclose(o, ref_o, atol=2e-5, rtol=1e-4, err_msg=str(c))
    for got, want in zip(ring.backward(dout), reference_backward(q, k, v, dout, c["segs"], c["rates"],
                                                                  causal=c["causal"], mode=c["mode"])):
        np.testing.assert_allclose(got, want, atol=5e-4, rtol=1e-3, err_msg=str(c))


@pytest.mark.parametrize("world", range(1, 9))
@pytest.mark.parametrize("causal", [False, True])
def test_zigzag_dense_every_ring_size(world, causal):
    """Dense attention (the middle segment holds every chunk) on 1..8 ranks,
    multi-query (h_kv = 1)."""
    c = dict(b=1, n=16 * world, h=2, h_kv=1, d=8, segs=[16 * world], rates=[1], k=world, partition="zigzag",
             causal=causal, mode="groups")
    q, k, v, dout = inputs(c, world)
    ring = ring_of(c)
    o = ring(q, k, v, requires_grad=True)
    np.testing.assert_allclose(o, reference_attention(q, k, v, c["segs"], [1], causal=causal)[0], atol=1e-12)
    want = reference_backward(q, k, v, dout, c["segs"], [1], causal=causal)
    for got, w in zip(ring.backward(dout), want):
        np.testing.assert_allclose(got, w, atol=1e-11)


def test_causal_work_is_balanced_by_zigzag():
    """Dense causal at k = 4: zigzag's busiest rank attends within 10% of the
    mean (query, key) pairs (here exactly the mean); contiguous's is 7/4 of it.
    The pairs of all ranks add up to the function's."""
    b, n, h, d, k = 1, 256, 2, 8, 4
    rng = np.random.default_rng(5)
    q, kk, v = (rng.standard_normal((b, n, h, d)).astype(np.float32) for _ in range(3))
    total = b * attended_pairs(n, h, [n], [1], causal=True)
    pairs = {}
    for partition in ("contiguous", "zigzag"):
        ring = ringattn.RingDilatedAttention([n], [1], causal=True, world_size=k, partition=partition)
        ring(q, kk, v)
        pairs[partition] = ring.last_stats["pairs"]
        assert sum(pairs[partition]) == total, partition
    mean = total / k
    assert max(pairs["zigzag"]) <= 1.1 * mean and min(pairs["zigzag"]) >= 0.9 * mean, pairs
    assert max(pairs["contiguous"]) > 1.5 * mean, pairs


@pytest.mark.parametrize("mode,segs,rates", [("groups", [64], [1]), ("longnet", [16, 64], [1, 2]),
                                             ("groups", [32, 64], [1, 2])])
@pytest.mark.parametrize("partition", ["contiguous", "zigzag"])
def test_gqa_sends_h_kv_over_h_of_the_bytes(mode, segs, rates, partition):
    """Only the h_kv key/value heads travel: every rank sends and receives
    exactly h_kv / h of the multi-head bytes (forward and backward) when the
    query heads of each key/value head share their branch and offset (here
    for h_kv = 4, 2; longnet: h / h_kv divides ceil(h / r)).  A key/value
    head read by two branches or offsets travels once for each."""
    b, n, h, d, k = 1, 64, 8, 8, 4
    rng = np.random.default_rng(7)
    q = rng.standard_normal((b, n, h, d)).astype(np.float32)
    sent = {}
    for h_kv in (8, 4, 2, 1):
        kk, v = (rng.standard_normal((b, n, h_kv, d)).astype(np.float32) for _ in range(2))
        ring = ringattn.RingDilatedAttention(segs, rates, causal=True, mode=mode, world_size=k,
                                             partition=partition)
        o = ring(q, kk, v, requires_grad=True)
        fwd = ring.last_stats
        ring.backward(np.ones_like(o))
        sent[h_kv] = (fwd["bytes_sent"], fwd["bytes_received"], ring.last_stats["bytes_sent"])
    assert sum(sent[8][0]) > 0
    for h_kv in (4, 2):
        for got, mha in zip(sent[h_kv], sent[8]):
            assert [g * h for g in got] == [x * h_kv for x in mha], (h_kv, sent)
    for got, two in zip(sent[1], sent[2]):  # one head serves both branches / offsets: no further saving
        assert all(g <= t for g, t in zip(got, two)), sent


def test_split_and_gather_zigzag():
    x = np.arange(2 * 24 * 3).reshape(2, 24, 3)
    shards = [ringattn.split_sequence(x, 3, j, partition="zigzag") for j in range(3)]
    assert [s[0, :, 0].tolist() for s in shards][0] == [0, 3, 6, 9, 60, 63, 66, 69]  # chunks 0 and 5
    assert np.array_equal(shards[1][:, :4], x[:, 4:8]) and np.array_equal(shards[1][:, 4:], x[:, 16:20])
    assert np.array_equal(ringattn.gather_sequence(shards, partition="zigzag"), x)
    assert np.array_equal(ringattn.gather_sequence([x[:, :12], x[:, 12:]]), x)  # contiguous stays the default
    with pytest.raises(ValueError, match="2 \\* world_size"):
        ringattn.split_sequence(x, 5, 0, partition="zigzag")
    with pytest.raises(ValueError, match="partition must be one of"):
        ringattn.split_sequence(x, 2, 0, partition="striped")


def test_zigzag_over_shards_matches_in_process():
    """The in-process zigzag ring equals the single-device output, whatever the
    partition, and each rank's shard of it is split_sequence's."""
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, 64, 4, 8)).astype(np.float32) for _ in range(3))
    single = ringattn.dilated_attention(q, k, v, [16, 64], [1, 2], causal=True)
    ring = ringattn.RingDilatedAttention([16, 64], [1, 2], causal=True, world_size=4, partition="zigzag")
    np.testing.assert_allclose(ring(q, k, v), single, atol=1e-6)
    assert ring.plan(q.shape)["chunk_len"] == 8 and ring.plan(q.shape)["local_len"] == 16
    assert [b["span"] for b in ring.plan(q.shape)["branches"]] == [2, 8]


def test_validation_errors():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 32, 4, 8)).astype(np.float32)
    k3 = rng.standard_normal((1, 32, 3, 8)).astype(np.float32)
    k2 = rng.standard_normal((1, 32, 2, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="^k has shape .* h_kv dividing the 4 heads of q"):
        ringattn.dilated_attention(q, k3, k3, [32], [1])
    with pytest.raises(ValueError, match="^k has shape"):
        ringattn.dilated_attention(q, k2[:, :16], k2[:, :16], [32], [1])
    with pytest.raises(ValueError, match="^v has shape .* but k has"):
        ringattn.dilated_attention(q, k2, q, [32], [1])
    with pytest.raises(ValueError, match="partition must be one of"):
        ringattn.RingDilatedAttention([32], [1], world_size=2, partition="zig")
    with pytest.raises(ValueError, match='zigzag.*2 \\* world_size'):
        ringattn.RingDilatedAttention([24], [1], world_size=8, partition="zigzag")(*(q[:, :24],) * 3)
    with pytest.raises(ValueError, match="zigzag chunk length 4 and segment_lengths\\[0\\]=6"):
        ringattn.RingDilatedAttention([6], [1], world_size=3, partition="zigzag")(*(q[:, :24],) * 3)
    with pytest.raises(ValueError, match="^k: 3 key/value heads must divide the 4 heads of q"):
        ringattn.RingDilatedAttention([32], [1]).plan((1, 32, 4, 8), num_kv_heads=3)


def test_gqa_one_process_matches_repeated_heads():
    """GQA equals multi-head attention over repeated key/value heads, and its
    dk/dv are the group sums of that call's (float32 kernels)."""
    rng = np.random.default_rng(11)
    q = rng.standard_normal((2, 32, 6, 16)).astype(np.float32)
    k, v, = (rng.standard_normal((2, 32, 2, 16)).astype(np.float32) for _ in range(2))
    dout = rng.standard_normal(q.shape).astype(np.float32)
    o, lse = ringattn.dilated_attention(q, k, v, [8, 32], [1, 2], mode="longnet", causal=True, return_lse=True)
    kr, vr = np.repeat(k, 3, axis=2), np.repeat(v, 3, axis=2)
    o2, lse2 = ringattn.dilated_attention(q, kr, vr, [8, 32], [1, 2], mode="longnet", causal=True,
                                          return_lse=True)
    np.testing.assert_allclose(o, o2, atol=1e-6)
    g = ringattn.dilated_attention_backward(q, k, v, o, lse, dout, [8, 32], [1, 2], mode="longnet", causal=True)
    g2 = ringattn.dilated_attention_backward(q, kr, vr, o2, lse2, dout, [8, 32], [1, 2], mode="longnet",
                                             causal=True)
    np.testing.assert_allclose(g[0], g2[0], atol=1e-5)
    for got, rep in zip(g[1:], g2[1:]):
        np.testing.assert_allclose(got, rep.reshape(2, 32, 2, 3, 16).sum(3), atol=1e-5)


def test_torch_gqa_zigzag_gradients():
    torch = pytest.importorskip("torch")
    import ringattn.torch as rt
    torch.manual_seed(0)
    q = torch.randn(1, 16, 2, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 16, 1, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 16, 1, 4, dtype=torch.float64, requires_grad=True)
    layer = rt.RingDilatedAttention([4, 16], [1, 2], causal=True, mode="longnet", world_size=2,
                                    partition="zigzag")
    o = layer(q, k, v)
    dout = torch.randn_like(o)
    o.backward(dout)
    want_o, _ = reference_attention(*(x.detach().numpy() for x in (q, k, v)), [4, 16], [1, 2], causal=True,
                                    mode="longnet")
    np.testing.assert_allclose(o.detach().numpy(), want_o, atol=1e-12)
    want = reference_backward(*(x.detach().numpy() for x in (q, k, v, dout)), [4, 16], [1, 2], causal=True,
                              mode="longnet")
    for t, w in zip((q, k, v), want):
        np.testing.assert_allclose(t.grad.numpy(), w, atol=1e-11)
    mha = rt.MultiheadDilatedAttention(32, 4, [16], [1], num_kv_heads=1, causal=True, world_size=2,
                                       partition="zigzag", dtype=torch.float64)
    x = torch.randn(1, 32, 32, dtype=torch.float64)
    y, _ = mha(x, x, x)
    y.sum().backward()
    assert mha.k_proj.weight.grad.shape == (8, 32) and torch.isfinite(mha.k_proj.weight.grad).all()


MPIRUN = shutil.which("mpirun")


@pytest.mark.skipif(MPIRUN is None or not ringattn._ext.have()["mpi"], reason="needs mpirun and an MPI build")
def test_mpi_zigzag_and_gqa():
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", RINGATTN_NUM_THREADS="1")
    cmd = [MPIRUN, "--oversubscribe", "-n", "2", sys.executable, os.path.join(HERE, "mpi_partition_checks.py")]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"mpirun hung:\n{e.stdout}\n{e.stderr}")
    assert r.returncode == 0 and "MPI PARTITION CHECKS PASSED" in r.stdout, r.stdout + r.stderr
