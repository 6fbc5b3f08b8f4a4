"""out= and the inputs (issue 10, item 4): an output that shares memory with
an input, another output or itself is refused with a ValueError naming both
arrays, before anything runs; out=q exactly (same address, shape, strides and
dtype) is an in-place call and gives the right answer on rings.  The rule is
one (_validate.no_overlap) for host and device arrays: device pointer ranges
come from the Tensors' ptr, shape and strides."""

import numpy as np
import pytest
from conftest import RING_TIMEOUT, make_qkv, run_with_timeout
from fakes import BASE, FakeDL, w

import ringattn

pytestmark = pytest.mark.timeout(RING_TIMEOUT)

SEGS, RATES = [16, 32], [1, 2]


def _ring(world_size, causal=False):
    return ringattn.RingDilatedAttention(SEGS, RATES, causal=causal, mode="longnet", world_size=world_size)


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("causal", [False, True])
def test_out_is_q_in_place_on_rings(world_size, causal):
    q, k, v = make_qkv(71, 2, 64, 2, 16)
    ring = _ring(world_size, causal)
    want = run_with_timeout(lambda: ring(q, k, v))
    x = q.copy()
    got = run_with_timeout(lambda: ring(x, k, v, out=x))
    assert got is x
    np.testing.assert_array_equal(x, want)  # the same computation: bit for bit
    # a (b, h, n, d) buffer seen as (b, n, h, d): strided, still exactly q
    buf = np.ascontiguousarray(q.transpose(0, 2, 1, 3))
    view = buf.transpose(0, 2, 1, 3)
    got = run_with_timeout(lambda: ring(view, k, v, out=view))
    np.testing.assert_array_equal(got, want)


def test_out_is_q_in_place_with_lse():
    q, k, v = make_qkv(72, 1, 64, 2, 16)
    ring = _ring(2)
    want, want_lse = ring(q, k, v, return_lse=True)
    x = q.copy()
    o, lse = run_with_timeout(lambda: ring(x, k, v, out=x, return_lse=True))
    assert o is x
    np.testing.assert_array_equal(o, want)
    np.testing.assert_array_equal(lse, want_lse)


def _overlapping(q):
    """Views of one buffer holding q, shifted by one position: they overlap q
    partly."""
    b, n, h, d = q.shape
    buf = np.zeros((b, n + 1, h, d), q.dtype)
    buf[:, :n] = q
    return buf[:, :n], buf[:, 1:]


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_partial_overlap_with_q_is_refused(world_size):
    q, k, v = make_qkv(73, 1, 64, 2, 16)
    qv, shifted = _overlapping(q)
    before = qv.copy()
    with pytest.raises(ValueError, match=w("out") + " overlaps " + w("q")):
        _ring(world_size)(qv, k, v, out=shifted)
    np.testing.assert_array_equal(qv, before)  # nothing ran


@pytest.mark.parametrize("name", ["k", "v"])
def test_out_overlapping_k_or_v_is_refused(name):
    q, k, v = make_qkv(74, 1, 64, 2, 16)
    args = {"q": q, "k": k, "v": v}
    with pytest.raises(ValueError, match=w("out") + " overlaps " + w(name)):
        ringattn.dilated_attention(q, k, v, SEGS, RATES, out=args[name])  # exactly k or v: refused too
    view, shifted = _overlapping(args[name])
    args[name] = view
    with pytest.raises(ValueError, match=w("out") + " overlaps " + w(name)):
        _ring(2)(args["q"], args["k"], args["v"], out=shifted)


def test_out_is_q_but_q_is_also_k_is_refused():
    """Self-attention on one array: out=x is exactly q, but it also is k and v."""
    x, _, _ = make_qkv(75, 1, 64, 2, 16)
    with pytest.raises(ValueError, match=w("out") + " overlaps " + w("k")):
        ringattn.dilated_attention(x, x, x, SEGS, RATES, out=x)


def test_out_is_q_with_another_dtype_or_layout_is_not_exact():
    q, k, v = make_qkv(76, 1, 64, 2, 16)
    buf = np.zeros((1, 64, 2, 32), np.float32)
    buf[..., :16] = q
    qv = buf[..., :16]
    out = buf[..., 16:]  # disjoint columns of the same buffer: fine
    got = ringattn.dilated_attention(qv, k, v, SEGS, RATES, out=out)
    np.testing.assert_array_equal(got, ringattn.dilated_attention(q, k, v, SEGS, RATES))
    # the same first element as q but a different layout: overlaps, not exactly q
    flat = np.zeros(2 * 64 * 2 * 16, np.float32)
    q_c = flat[: q.size].reshape(q.shape)
    q_c[...] = q
    out_t = np.lib.stride_tricks.as_strided(flat, q.shape, (64 * 2 * 16 * 4, 16 * 4, 64 * 16 * 4, 4), writeable=True)
    with pytest.raises(ValueError, match=w("out") + " overlaps " + w("q")):
        ringattn.dilated_attention(q_c, k, v, SEGS, RATES, out=out_t)


def test_disjoint_views_of_one_buffer_work():
    """A fused qkv buffer, (b, n, 3, h, d), and out as a fourth slot: all views
    of one array, none overlapping."""
    q, k, v = make_qkv(77, 2, 64, 2, 16)
    fused = np.zeros((2, 64, 4, 2, 16), np.float32)
    fused[:, :, 0], fused[:, :, 1], fused[:, :, 2] = q, k, v
    got = run_with_timeout(lambda: _ring(4)(fused[:, :, 0], fused[:, :, 1], fused[:, :, 2], out=fused[:, :, 3]))
    assert np.shares_memory(got, fused)
    np.testing.assert_array_equal(got, _ring(4)(q, k, v))


def test_self_overlapping_out_is_refused():
    q, k, v = make_qkv(78, 2, 64, 2, 16)
    cell = np.zeros((1, 1, 1, 16), np.float32)
    broadcast = np.lib.stride_tricks.as_strided(cell, q.shape, (0, 0, 0, 4), writeable=True)
    with pytest.raises(ValueError, match=w("out") + ": its elements overlap one another"):
        ringattn.dilated_attention(q, k, v, SEGS, RATES, out=broadcast)
    rows = np.zeros((2, 65, 16), np.float32)  # heads one row apart: (n, h) steps overlap
    shared = np.lib.stride_tricks.as_strided(rows, q.shape, (65 * 16 * 4, 16 * 4, 16 * 4, 4), writeable=True)
    with pytest.raises(ValueError, match="overlap one another"):
        ringattn.dilated_attention(q, k, v, SEGS, RATES, out=shared)
    assert not rows.any() and not cell.any()


def test_in_place_forward_cannot_be_differentiated():
    """backward() needs q, which out=q overwrites: refused with requires_grad."""
    q, k, v = make_qkv(79, 1, 64, 2, 16)
    x = q.copy()
    ring = _ring(2)
    with pytest.raises(ValueError, match=w("out") + " is " + w("q") + ".*backward"):
        ring(x, k, v, out=x, requires_grad=True)
    np.testing.assert_array_equal(x, q)
    with pytest.raises(RuntimeError, match="requires_grad"):
        ring.backward(np.ones_like(q))
    # out-of-place, the gradients are fresh arrays
    o = ring(x, k, v, requires_grad=True)
    grads = ring.backward(np.ones_like(o))
    for g in grads:
        assert not any(np.shares_memory(g, a) for a in (x, k, v, o))


# ------------------------------------------------------------ device arrays

def _dl(ptr, shape=(1, 64, 4, 16), strides=None):
    return FakeDL(shape=shape, ptr=ptr, strides=strides)


SIZE = 1 * 64 * 4 * 16 * 4  # bytes of one fake (1, 64, 4, 16) float32 array


def test_device_partial_overlap_is_refused_before_the_gpu():
    q, k, v = _dl(BASE), _dl(BASE + 2 * SIZE), _dl(BASE + 4 * SIZE)
    for ptr, name in ((BASE + 16 * 4, "q"), (BASE + 3 * SIZE - 4, "k"), (BASE + 4 * SIZE + SIZE // 2, "v")):
        with pytest.raises(ValueError, match=w("out") + " overlaps " + w(name)):
            ringattn.dilated_attention(q, k, v, [64], [1], out=_dl(ptr))
    # every consumed capsule went back to its producer
    assert q.deleted == k.deleted == v.deleted == 3


def test_device_disjoint_and_exact_out_reach_the_gpu_check():
    q, k, v = _dl(BASE), _dl(BASE + 2 * SIZE), _dl(BASE + 4 * SIZE)
    for out in (_dl(BASE + 6 * SIZE), _dl(BASE)):  # disjoint; exactly q
        with pytest.raises((RuntimeError, ValueError)) as e:  # no GPU / fake addresses: refused later
            ringattn.dilated_attention(q, k, v, [64], [1], out=out)
        assert "overlap" not in str(e.value)
    # interleaved heads: q takes heads 0-1, out heads 2-3 of one (1, 64, 4, 16) block
    st = (64 * 4 * 16, 4 * 16, 16, 1)
    q2 = _dl(BASE, (1, 64, 2, 16), st)
    out2 = _dl(BASE + 2 * 16 * 4, (1, 64, 2, 16), st)
    k2, v2 = _dl(BASE + 2 * SIZE, (1, 64, 2, 16)), _dl(BASE + 4 * SIZE, (1, 64, 2, 16))
    with pytest.raises((RuntimeError, ValueError)) as e:
        ringattn.dilated_attention(q2, k2, v2, [64], [1], out=out2)
    assert "overlap" not in str(e.value)


def test_device_arrays_on_other_devices_do_not_overlap():
    q, k, v = _dl(BASE), _dl(BASE + 2 * SIZE), _dl(BASE + 4 * SIZE)
    out = FakeDL(shape=(1, 64, 4, 16), ptr=BASE + 8, device=(2, 1))  # same numbers, another GPU
    with pytest.raises((RuntimeError, ValueError)) as e:
        ringattn.dilated_attention(q, k, v, [64], [1], out=out)
    assert "overlap" not in str(e.value)  # refused for being on another device instead


def test_raw_pointer_outputs():
    """cuda_forward_ptr: o_ptr and lse_ptr inside q are refused; o_ptr == q_ptr is in place."""
    mib = 1 << 20
    shape = (1, 64, 4, 16)
    with pytest.raises(ValueError, match=w("out") + " overlaps " + w("q")):
        ringattn.cuda_forward_ptr(BASE, BASE + mib, BASE + 2 * mib, BASE + 64, shape, "float32", [64], [1])
    with pytest.raises(ValueError, match=w("lse") + " overlaps " + w("q")):
        ringattn.cuda_forward_ptr(BASE, BASE + mib, BASE + 2 * mib, BASE + 3 * mib, shape, "float32", [64], [1],
                                  lse_ptr=BASE + 256)
    with pytest.raises((RuntimeError, ValueError)) as e:
        ringattn.cuda_forward_ptr(BASE, BASE + mib, BASE + 2 * mib, BASE, shape, "float32", [64], [1])
    assert "overlap" not in str(e.value)
