"""Edge cases: unusual layouts and sizes, branch limits, concurrency."""

import re
import threading

import numpy as np
import pytest

import ringattn
from conftest import (CALL_TIMEOUT, RING_TIMEOUT, as_f32, assert_f16_is_rounded_f32, assert_lse_close,
                      assert_out_close, make_qkv, run_with_timeout)
from reference import dense_attention, reference_attention

# every call here may cross ranks: a deadlocked ring fails within RING_TIMEOUT
pytestmark = pytest.mark.timeout(RING_TIMEOUT)


def test_unaligned_input():
    """A C-contiguous but misaligned float32 array (e.g. from a byte buffer)."""
    q, k, v = make_qkv(50, 1, 64, 2, 16)
    buf = np.zeros(q.nbytes + 8, np.uint8)
    qa = buf[1:1 + q.nbytes].view(np.float32).reshape(q.shape)  # misaligned by 1 byte
    qa[...] = q
    assert qa.ctypes.data % 4 != 0 and qa.flags.c_contiguous and np.array_equal(qa, q)
    o = ringattn.dilated_attention(qa, k, v, [64], [1], causal=True)
    ro, _ = dense_attention(q, k, v, causal=True)
    assert_out_close(o, ro, np.float32)


def test_readonly_and_broadcast_inputs():
    q, k, v = make_qkv(51, 2, 64, 3, 16)
    q.setflags(write=False)
    kb = np.broadcast_to(k[:, :1], k.shape)  # zero stride along n, read-only
    vb = np.broadcast_to(v[:1], v.shape)     # zero stride along b
    o = ringattn.dilated_attention(q, kb, vb, [32, 64], [1, 2], causal=True, mode="longnet")
    ro, _ = reference_attention(q, kb, vb, [32, 64], [1, 2], causal=True, mode="longnet")
    assert_out_close(o, ro, np.float32)


def test_non_native_byte_order():
    q, k, v = make_qkv(52, 1, 32, 2, 8)
    qs = q.astype(q.dtype.newbyteorder(">" if np.little_endian else "<"))
    try:
        o = ringattn.dilated_attention(qs, k, v, [32], [1])
    except TypeError as e:  # a refusal must name the argument, as a word
        assert re.search(r"(?<![A-Za-z0-9_])q(?![A-Za-z0-9_])", str(e)), str(e)
        return
    ro, _ = dense_attention(q, k, v)
    assert_out_close(o, ro, np.float32)


@pytest.mark.parametrize("d", [1, 2, 3, 7, 8, 200, 256])
def test_unusual_head_dims(d):
    q, k, v = make_qkv(53, 1, 64, 3, d)
    for causal in (False, True):
        o, lse = ringattn.dilated_attention(q, k, v, [32, 64], [1, 2], causal=causal,
                                            mode="longnet", return_lse=True)
        ro, rl = reference_attention(q, k, v, [32, 64], [1, 2], causal=causal, mode="longnet")
        assert_out_close(o, ro, np.float32)
        assert_lse_close(lse, rl, np.float32)


def test_long_sequence_tiny_heads():
    q, k, v = make_qkv(54, 1, 4096, 2, 16)
    for mode in ("groups", "longnet"):
        o, lse = ringattn.dilated_attention(q, k, v, [1024, 4096], [1, 4], causal=True, mode=mode,
                                            return_lse=True)
        ro, rl = reference_attention(q, k, v, [1024, 4096], [1, 4], causal=True, mode=mode)
        assert_out_close(o, ro, np.float32)
        assert_lse_close(lse, rl, np.float32)


def test_sequence_not_multiple_of_tiles():
    # n = 3 * 5 * 7 * 2 = 210, segments of odd-ish lengths
    q, k, v = make_qkv(55, 2, 210, 3, 24)
    for segs, rates in (([210], [1]), ([70, 210], [7, 5]), ([30, 42, 105], [3, 2, 5])):
        for causal in (False, True):
            o = ringattn.dilated_attention(q, k, v, segs, rates, causal=causal)
            ro, _ = reference_attention(q, k, v, segs, rates, causal=causal)
            assert_out_close(o, ro, np.float32)


def test_sixteen_branches_and_too_many():
    q, k, v = make_qkv(56, 1, 64, 2, 8)
    segs, rates = [64, 32, 16, 8] * 4, [1, 2, 4, 8] * 4
    o = ringattn.dilated_attention(q, k, v, segs, rates, mode="longnet", causal=True)
    ro, _ = reference_attention(q, k, v, segs, rates, mode="longnet", causal=True)
    assert_out_close(o, ro, np.float32)
    with pytest.raises(ValueError, match="segment_lengths"):
        ringattn.dilated_attention(q, k, v, [64] * 17, [1] * 17, mode="longnet")


def test_branch_arguments_as_tuple_and_numpy():
    q, k, v = make_qkv(57, 1, 64, 2, 8)
    a = ringattn.dilated_attention(q, k, v, [32, 64], [1, 2])
    b = ringattn.dilated_attention(q, k, v, (32, 64), (1, 2))
    c = ringattn.dilated_attention(q, k, v, np.array([32, 64]), np.array([1, 2], np.int32))
    assert np.array_equal(a, b) and np.array_equal(a, c)
    s = ringattn.dilated_attention(q, k, v, [32, 64], [1, 2], scale=np.float32(0.25))
    t = ringattn.dilated_attention(q, k, v, [32, 64], [1, 2], scale=0.25)
    u = ringattn.dilated_attention(q, k, v, [32, 64], [1, 2], scale=1)
    assert np.array_equal(s, t)
    ru, _ = reference_attention(q, k, v, [32, 64], [1, 2], scale=1.0)
    assert_out_close(u, ru, np.float32)


def test_fp16_large_values():
    """Logits far outside fp16 range: must be computed in (at least) fp32."""
    q, k, v = make_qkv(58, 1, 128, 2, 64, np.float16, scale=8.0)
    o, lse = ringattn.dilated_attention(q, k, v, [128], [1], causal=True, return_lse=True)
    ro, rl = reference_attention(q, k, v, [128], [1], causal=True)
    assert np.abs(rl).max() > 100  # really large logits
    assert_out_close(o, ro, np.float16)
    assert_lse_close(lse, rl, np.float16)  # float32 arithmetic: float32 tolerance
    o32, lse32 = ringattn.dilated_attention(*as_f32(q, k, v), [128], [1], causal=True, return_lse=True)
    assert_f16_is_rounded_f32(o, o32, lse, lse32)


def test_fp32_extreme_logits():
    q, k, v = make_qkv(59, 1, 128, 2, 32, scale=10.0)
    o, lse = ringattn.dilated_attention(q, k, v, [64, 128], [1, 2], causal=True, mode="longnet",
                                        return_lse=True)
    ro, rl = reference_attention(q, k, v, [64, 128], [1, 2], causal=True, mode="longnet")
    assert np.abs(rl).max() > 200
    assert_out_close(o, ro, np.float32)
    fin = np.isfinite(rl)
    np.testing.assert_allclose(lse[fin], rl[fin], rtol=2e-6, atol=1e-4)


@pytest.mark.parametrize("n,ws,segs,rates,h", [
    (8, 8, [8, 1], [1, 1], 2),          # one position per rank
    (64, 8, [64], [16], 4),             # half the ranks hold no active position
    (64, 8, [64, 16], [64, 8], 4),      # r == S: a single active position per segment
    (64, 4, [64], [64], 3),
    (48, 3, [48, 16], [3, 4], 3),       # odd world size, both kinds of branch
])
@pytest.mark.parametrize("mode", ["groups", "longnet"])
@pytest.mark.parametrize("causal", [False, True])
def test_ring_extremes(n, ws, segs, rates, h, mode, causal):
    q, k, v = make_qkv(60, 2, n, h, 8)
    attn = ringattn.RingDilatedAttention(segs, rates, causal=causal, mode=mode, world_size=ws)
    o, lse = run_with_timeout(lambda: attn(q, k, v, return_lse=True))
    ro, rl = reference_attention(q, k, v, segs, rates, causal=causal, mode=mode)
    assert_out_close(o, ro, np.float32)
    assert_lse_close(lse, rl, np.float32)
    assert sum(attn.last_stats["bytes_sent"]) == sum(attn.last_stats["bytes_received"])


def test_concurrent_calls_from_python_threads():
    """Independent calls from several Python threads (mixing single-rank and
    ring calls) give the same results as serial calls."""
    rng_inputs = [make_qkv(70 + i, 1, 512, 3, 32) for i in range(6)]
    segs, rates = [128, 512], [1, 2]

    def compute(i):
        q, k, v = rng_inputs[i]
        if i % 2:
            attn = ringattn.RingDilatedAttention(segs, rates, causal=True, world_size=4,
                                                 num_threads=1)
            return attn(q, k, v)
        return ringattn.dilated_attention(q, k, v, segs, rates, causal=True, num_threads=1)

    serial = [compute(i) for i in range(6)]
    results = [None] * 6
    errors = []

    def worker(i):
        try:
            for _ in range(3):
                results[i] = compute(i)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(CALL_TIMEOUT)
        assert not t.is_alive(), "deadlock"
    assert not errors, errors
    for i in range(6):
        assert np.array_equal(results[i], serial[i]), i  # deterministic: bit for bit


def test_concurrent_errors_keep_their_own_messages():
    """ra_last_error is per thread: concurrent failing calls report their own argument."""
    q, k, v = make_qkv(80, 1, 64, 2, 16)
    bad = {"q": q.copy(), "k": k.copy(), "v": v.copy()}
    for x in bad.values():
        x[0, 5, 1, 2] = np.nan
    msgs = {}

    def worker(name):
        args = {"q": q, "k": k, "v": v, name: bad[name]}
        for _ in range(20):
            try:
                attn = ringattn.RingDilatedAttention([64], [1], world_size=2)
                attn(args["q"], args["k"], args["v"])
            except ValueError as e:
                msgs.setdefault(name, set()).add(str(e))

    threads = [threading.Thread(target=worker, args=(nm,), daemon=True) for nm in "qkv"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(CALL_TIMEOUT)
        assert not t.is_alive(), "deadlock"
    for name in "qkv":
        assert name in msgs, msgs
        for m in msgs[name]:
            assert any(tok == name for tok in
                       m.replace(":", " ").replace(",", " ").replace("'", " ").split()), (name, m)
