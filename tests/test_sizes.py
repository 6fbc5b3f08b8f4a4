"""Sizes never wrap (issue 10, item 3).

The two crashes of the issue: a head count of 2^61 + 1 through
RingDilatedAttention.plan (the plan's G * H * 8 bytes of offsets wrapped) and
a stride-0 (broadcast) view through dilated_attention.  Now: shapes whose
sizes this machine cannot address raise ValueError, in Python before any C
call (_validate.addressable) and in the core again (plan.c, entry.c, the
driver); broadcast inputs are a valid layout, read in place, and give the
result of their materialised copies; device arrays whose shape and strides
reach outside the address space are refused at intake.  The C side is also
tested by tests/c/test_sizes.c and fuzzed by tests/fuzz/."""

import numpy as np
import pytest
from conftest import RING_TIMEOUT, make_qkv, run_with_timeout
from fakes import BASE, FakeCAI, FakeDL, w

import ringattn
from ringattn import _ext
from ringattn import _validate as check

pytestmark = pytest.mark.timeout(RING_TIMEOUT)

HUGE_HEADS = 2**61 + 1


# ------------------------------------------------------------------ the plan

def test_plan_with_a_huge_head_count_raises():
    ring = ringattn.RingDilatedAttention([4], [1])
    with pytest.raises(ValueError, match="address"):
        ring.plan((1, 4, HUGE_HEADS, 4))
    with pytest.raises(ValueError, match="address"):
        ringattn.RingDilatedAttention([4, 4], [1, 2], mode="longnet").plan((1, 4, HUGE_HEADS, 1))
    # the core alone (Python's rule bypassed) refuses it as well
    for mode in (0, 1):
        with pytest.raises(ValueError, match="address"):
            _ext.plan(1, 4, HUGE_HEADS, 4, [4], [1], False, mode, 0.0, 1)


@pytest.mark.parametrize("shape", [(2**62, 2, 1, 1), (1, 2**60, 1, 16), (2**21, 2**21, 2**21, 1),
                                   (2**63 - 1, 2**63 - 1, 2**63 - 1, 2**63 - 1), (1, 1, 2**57, 1)])
def test_unaddressable_shapes_raise(shape):
    b, n, h, d = shape
    with pytest.raises(ValueError, match="address"):
        ringattn.RingDilatedAttention([n], [1]).plan(shape)
    with pytest.raises(ValueError, match="address"):
        _ext.plan(b, n, h, d, [n], [1], False, 1, 0.0, 1)


def test_plan_shape_must_be_positive_and_fit():
    ring = ringattn.RingDilatedAttention([4], [1])
    for shape in [(1, 4, -2, 4), (1, 4, 0, 4), (1, 4, 2), (-(2**70), 4, 1, 4)]:
        with pytest.raises(ValueError, match="q_shape"):
            ring.plan(shape)
    with pytest.raises(ValueError, match="address"):
        ring.plan((1, 4, 2**70, 4))  # beyond int64 altogether: still a ValueError


def test_python_and_core_bounds_agree():
    """_validate.addressable refuses exactly what the plan refuses for size."""
    n = 2**40
    d = check.MAX_ELEMENTS // n
    check.addressable((1, n, 1, d))
    _ext.plan(1, n, 1, d, [n], [1], False, 0, 0.0, 1)  # the largest shape of this form: planned
    with pytest.raises(ValueError, match="address"):
        check.addressable((1, n, 1, d + 1))
    with pytest.raises(ValueError, match="address"):
        _ext.plan(1, n, 1, d + 1, [n], [1], False, 0, 0.0, 1)


# ---------------------------------------------------------- broadcast inputs

def _broadcast_inputs(seed, b=2, n=64, h=4, d=16):
    """q dense; k broadcast over batch and heads, v over the sequence (stride 0)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, n, h, d)).astype(np.float32)
    k = np.broadcast_to(rng.standard_normal((1, n, 1, d)).astype(np.float32), (b, n, h, d))
    v = np.broadcast_to(rng.standard_normal((b, 1, h, d)).astype(np.float32), (b, n, h, d))
    assert 0 in k.strides and 0 in v.strides
    return q, k, v


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("causal", [False, True])
def test_broadcast_inputs_compute_in_place(world_size, causal):
    q, k, v = _broadcast_inputs(81)
    ring = ringattn.RingDilatedAttention([16, 64], [1, 4], causal=causal, world_size=world_size)
    got = run_with_timeout(lambda: ring(q, k, v))
    want = run_with_timeout(lambda: ring(q, np.ascontiguousarray(k), np.ascontiguousarray(v)))
    np.testing.assert_array_equal(got, want)
    # q broadcast too (every query of a head alike), through dilated_attention
    qb = np.broadcast_to(q[:1, :1], q.shape)
    got = ringattn.dilated_attention(qb, k, v, [16, 64], [1, 4], causal=causal)
    want = ringattn.dilated_attention(np.ascontiguousarray(qb), np.ascontiguousarray(k), np.ascontiguousarray(v),
                                      [16, 64], [1, 4], causal=causal)
    np.testing.assert_array_equal(got, want)


def test_broadcast_inputs_backward():
    q, k, v = _broadcast_inputs(82)
    kc, vc = np.ascontiguousarray(k), np.ascontiguousarray(v)
    o, lse = ringattn.dilated_attention(q, kc, vc, [16, 64], [1, 4], return_lse=True)
    dout = np.broadcast_to(np.ones((1, 1, 1, 16), np.float32), q.shape)
    got = ringattn.dilated_attention_backward(q, k, v, o, lse, dout, [16, 64], [1, 4])
    want = ringattn.dilated_attention_backward(q, kc, vc, o, lse, np.ascontiguousarray(dout), [16, 64], [1, 4])
    for g, r in zip(got, want):
        assert g.shape == q.shape and all(s > 0 for s in g.strides)  # gradients are per position
        np.testing.assert_array_equal(g, r)


def test_broadcast_to_an_unaddressable_shape_raises():
    cell = np.ones((1, 1, 1, 8), np.float32)
    huge = np.broadcast_to(cell, (2**18, 2**18, 2**18, 8))  # 2^57 elements, no memory behind them
    with pytest.raises(ValueError, match=w("q") + ".*address"):
        ringattn.dilated_attention(huge, huge, huge, [2**18], [1])
    q = np.broadcast_to(cell, (2**18, 2**18, 2**18, 8))
    k = np.zeros((1, 4, 1, 8), np.float32)
    with pytest.raises(ValueError, match="address"):  # refused before its shape is compared with k's
        ringattn.dilated_attention(q, k, k, [4], [1])


# ------------------------------------------------ intake of device arrays

def test_intake_refuses_strides_beyond_the_address_space():
    shape = (2, 64, 4, 16)
    for strides in [(2**63 - 4, 64 * 16 * 4, 16 * 4, 4),      # (b - 1) * stride_b and the rest > 2^63 bytes
                    (0, 2**60, 0, 4),                          # 63 * 2^60 bytes
                    (4, 4, 4, 2**61)]:                         # an axis of 16 reaching 15 * 2^61 bytes
        with pytest.raises(ValueError, match=w("q") + ".*outside the address space"):
            _ext.intake(FakeCAI(shape=shape, strides=strides), "q")
    with pytest.raises(ValueError, match="outside the address space"):  # below address 0
        _ext.intake(FakeCAI(shape=shape, ptr=64, strides=(-4096, 64 * 16 * 4, 16 * 4, 4)), "q")
    with pytest.raises(ValueError, match="outside the address space"):  # past the top
        _ext.intake(FakeCAI(shape=shape, ptr=2**64 - 4096), "q")
    # an empty array reaches nothing; a broadcast one reaches little
    assert _ext.intake(FakeCAI(shape=(0, 64, 4, 16), strides=(2**62, 0, 0, 4)), "q").shape == (0, 64, 4, 16)
    t = _ext.intake(FakeCAI(shape=(2**20, 2**20, 4, 16), strides=(0, 0, 64, 4)), "q")
    assert t.strides == (0, 0, 16, 1)


def test_intake_refuses_bad_dlpack_shapes_and_gives_the_capsule_back():
    bad = FakeDL(shape=(1, -64, 4, 16))
    with pytest.raises(ValueError, match=w("q") + ".*negative"):
        _ext.intake(bad, "q")
    assert bad.deleted == 1
    far = FakeDL(shape=(2, 64, 4, 16), strides=(2**62, 64, 16, 1))
    with pytest.raises(ValueError, match="outside the address space"):
        _ext.intake(far, "q")
    assert far.deleted == 1


def test_unaddressable_device_shape_through_the_api():
    q = FakeCAI(shape=(2**20, 2**20, 2**20, 16), strides=(0, 0, 0, 4))
    k = v = FakeCAI(shape=(2**20, 2**20, 2**20, 16), strides=(0, 0, 0, 4), ptr=BASE + 4096)
    with pytest.raises(ValueError, match="address"):
        ringattn.dilated_attention(q, k, v, [2**20], [1])


def test_core_refuses_what_python_would_catch():
    """_ext.run without the Python layer: a broadcast lse (wrong layout) and
    outputs of unaddressable reach never reach the kernels."""
    q, k, v = make_qkv(83, 1, 64, 2, 16)
    o = np.zeros_like(q)
    lse = np.broadcast_to(np.zeros((1, 1, 1), np.float32), (1, 2, 64))
    tensors = {n: _ext.intake(a, n) for n, a in (("q", q), ("k", k), ("v", v), ("o", o), ("lse", lse))}
    try:
        with pytest.raises(ValueError, match=w("lse")):
            _ext.run(backward=False, **tensors, device_type=_ext.DEVICE_CPU, segment_lengths=[64],
                     dilation_rates=[1], causal=False, mode=0, scale=0.0, world_size=1)
    finally:
        for t in tensors.values():
            t.release()
