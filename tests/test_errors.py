"""Every bad input raises a clear exception that names the offending argument."""

import numpy as np
import pytest

import ringattn
from conftest import RING_TIMEOUT, make_qkv, run_with_timeout

# every call here may cross ranks: a deadlocked ring fails within RING_TIMEOUT
pytestmark = pytest.mark.timeout(RING_TIMEOUT)


def _qkv(b=1, n=64, h=4, d=16, dtype=np.float32):
    return make_qkv(0, b, n, h, d, dtype)


def _w(name):
    """Regex matching the argument name as a word."""
    return rf"(?<![A-Za-z0-9_]){name}(?![A-Za-z0-9_])"


def _call(q=None, k=None, v=None, segs=(64,), rates=(1,), **kw):
    dq, dk, dv = _qkv()
    q = dq if q is None else q
    k = dk if k is None else k
    v = dv if v is None else v
    return ringattn.dilated_attention(q, k, v, list(segs), list(rates), **kw)


def _ring(q=None, k=None, v=None, segs=(64,), rates=(1,), world_size=2, **kw):
    dq, dk, dv = _qkv()
    q = dq if q is None else q
    k = dk if k is None else k
    v = dv if v is None else v
    attn = ringattn.RingDilatedAttention(list(segs), list(rates), world_size=world_size, **kw)
    return run_with_timeout(lambda: attn(q, k, v))


# --------------------------------------------------------------------- dtypes

@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_, np.complex128])  # float64 is valid: test_float64
def test_bad_dtype_raises_type_error(which, dtype):
    args = dict(zip("qkv", _qkv()))
    args[which] = args[which].astype(dtype)
    with pytest.raises(TypeError, match=_w(which)):
        ringattn.dilated_attention(args["q"], args["k"], args["v"], [64], [1])


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_bad_dtype_ring(which):
    args = dict(zip("qkv", _qkv()))
    args[which] = args[which].astype(np.int32)
    with pytest.raises(TypeError, match=_w(which)):
        _ring(**args)


@pytest.mark.parametrize("which", ["k", "v"])
def test_mixed_dtypes(which):
    args = dict(zip("qkv", _qkv()))
    args[which] = args[which].astype(np.float16)
    with pytest.raises((TypeError, ValueError), match=_w(which)):
        ringattn.dilated_attention(args["q"], args["k"], args["v"], [64], [1])


# --------------------------------------------------------------------- shapes

@pytest.mark.parametrize("shape", [(64, 4, 16), (1, 1, 64, 4, 16), (64,)])
def test_q_ndim(shape):
    q = np.ones(shape, np.float32)
    with pytest.raises(ValueError, match=_w("q")):
        _call(q=q, k=q, v=q)


@pytest.mark.parametrize("which", ["k", "v"])
@pytest.mark.parametrize("shape", [(1, 64, 4, 8), (1, 32, 4, 16), (1, 64, 2, 16), (2, 64, 4, 16),
                                   (64, 4, 16)])
def test_kv_shape_mismatch(which, shape):
    args = dict(zip("qkv", _qkv()))
    args[which] = np.ones(shape, np.float32)
    with pytest.raises(ValueError, match=_w(which)):
        _call(**args)


@pytest.mark.parametrize("shape", [(0, 64, 4, 16), (1, 64, 4, 0), (1, 0, 4, 16)])
def test_empty_dims_do_not_crash(shape):
    """Unspecified by the spec: either a ValueError or an empty result of the right shape."""
    q = np.ones(shape, np.float32)
    try:
        o = _call(q=q, k=q, v=q, segs=(max(shape[1], 1),))
    except ValueError:
        return
    assert o.shape == q.shape


# --------------------------------------------------------------- configuration

@pytest.mark.parametrize("segs,rates,name", [
    ((48,), (1,), "segment_lengths"),          # 64 % 48 != 0
    ((32, 24), (1, 1), "segment_lengths"),     # 64 % 24 != 0
    ((0,), (1,), "segment_lengths"),
    ((-64,), (1,), "segment_lengths"),
    ((), (), "segment_lengths"),
    ((64,), (0,), "dilation_rates"),
    ((64,), (-1,), "dilation_rates"),
    ((32, 64), (1, 0), "dilation_rates"),
])
def test_bad_branch_values(segs, rates, name):
    with pytest.raises(ValueError, match=_w(name)):
        _call(segs=segs, rates=rates)


@pytest.mark.parametrize("segs,rates", [((64,), (3,)), ((32, 64), (1, 5)), ((16,), (32,))])
def test_segment_not_divisible_by_rate(segs, rates):
    with pytest.raises(ValueError, match=f"{_w('dilation_rates')}|{_w('segment_lengths')}"):
        _call(segs=segs, rates=rates)


def test_segment_clipped_then_rate_must_divide_it():
    # s = 128 > n = 64 is clipped to 64; 64 % 128 != 0 -> invalid rate
    with pytest.raises(ValueError, match=f"{_w('dilation_rates')}|{_w('segment_lengths')}"):
        _call(segs=(128,), rates=(128,))


@pytest.mark.parametrize("segs,rates", [((64,), (1, 2)), ((32, 64), (1,))])
def test_length_mismatch(segs, rates):
    with pytest.raises(ValueError, match=f"{_w('dilation_rates')}|{_w('segment_lengths')}"):
        _call(segs=segs, rates=rates)


def test_too_many_branches_for_heads_in_groups_mode():
    q, k, v = _qkv(h=2)
    with pytest.raises(ValueError, match=f"{_w('q')}|{_w('segment_lengths')}|{_w('mode')}|head"):
        ringattn.dilated_attention(q, k, v, [16, 32, 64], [1, 2, 4], mode="groups")
    # longnet mode has no such restriction
    ringattn.dilated_attention(q, k, v, [16, 32, 64], [1, 2, 4], mode="longnet")


@pytest.mark.parametrize("mode", ["group", "LONGNET", "", "dense"])
def test_bad_mode(mode):
    with pytest.raises(ValueError, match=_w("mode")):
        _call(mode=mode)


def test_bad_mode_ring():
    with pytest.raises(ValueError, match=_w("mode")):
        _ring(mode="bogus")


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_scale(scale):
    with pytest.raises(ValueError, match=_w("scale")):
        _call(scale=scale)


def test_nonfinite_scale_ring():
    with pytest.raises(ValueError, match=_w("scale")):
        _ring(scale=float("nan"))


@pytest.mark.parametrize("policy", ["ignore", "", "RAISE", "warn"])
def test_bad_nan_policy(policy):
    with pytest.raises(ValueError, match=_w("nan_policy")):
        _call(nan_policy=policy)


def test_bad_nan_policy_ring():
    with pytest.raises(ValueError, match=_w("nan_policy")):
        _ring(nan_policy="bogus")


@pytest.mark.parametrize("num_threads", [-1, -8])
def test_bad_num_threads(num_threads):
    with pytest.raises(ValueError, match=_w("num_threads")):
        _call(num_threads=num_threads)


def test_bad_set_num_threads():
    old = ringattn.get_num_threads()
    try:
        with pytest.raises(ValueError, match=r"num_threads|\bn\b|thread"):
            ringattn.set_num_threads(-1)
    finally:
        ringattn.set_num_threads(old)
    assert ringattn.get_num_threads() == old


# ------------------------------------------------------------------ world size

@pytest.mark.parametrize("world_size", [0, -1])
def test_bad_world_size(world_size):
    with pytest.raises(ValueError, match=_w("world_size")):
        _ring(world_size=world_size)


@pytest.mark.parametrize("world_size", [3, 5, 7, 128])
def test_n_not_divisible_by_world_size(world_size):
    with pytest.raises(ValueError, match=_w("world_size")):
        _ring(world_size=world_size)


def test_segment_neither_multiple_nor_divisor_of_local_length():
    # n = 96, world_size 2 -> L = 48; S = 32: 48 % 32 != 0 and 32 % 48 != 0
    q, k, v = make_qkv(1, 1, 96, 2, 16)
    attn_err = f"{_w('world_size')}|{_w('segment_lengths')}"
    with pytest.raises(ValueError, match=attn_err):
        attn = ringattn.RingDilatedAttention([32], [1], world_size=2)
        run_with_timeout(lambda: attn(q, k, v))
    # n = 192, world_size 3 -> L = 64; S = 96: neither
    q, k, v = make_qkv(1, 1, 192, 2, 16)
    with pytest.raises(ValueError, match=attn_err):
        attn = ringattn.RingDilatedAttention([96], [1], world_size=3)
        run_with_timeout(lambda: attn(q, k, v))
    # the same configurations are fine on one rank
    ringattn.RingDilatedAttention([96], [1], world_size=1)(q, k, v)


def test_ring_config_errors():
    with pytest.raises(ValueError, match=f"{_w('dilation_rates')}|{_w('segment_lengths')}"):
        _ring(segs=(64,), rates=(1, 2))
    with pytest.raises(ValueError, match=_w("segment_lengths")):
        _ring(segs=(0,), rates=(1,))
    with pytest.raises(ValueError, match=_w("dilation_rates")):
        _ring(segs=(64,), rates=(0,))
    with pytest.raises(ValueError, match=_w("k")):
        q, k, v = _qkv()
        _ring(k=k[:, :32])


def test_error_leaves_module_usable():
    """After a failed call, the next valid call works."""
    q, k, v = _qkv()
    with pytest.raises(ValueError):
        ringattn.dilated_attention(q, k, v, [48], [1])
    attn = ringattn.RingDilatedAttention([64], [1], world_size=2)
    bad = k.copy()
    bad[0, 40, 1, 3] = np.nan
    with pytest.raises(ValueError):
        run_with_timeout(lambda: attn(q, bad, v))
    o = run_with_timeout(lambda: attn(q, k, v))
    assert np.all(np.isfinite(o))


def test_nccl_timeout_is_checked_before_anything_is_created():
    """Communicator.nccl / nccl_from_mpi take timeout= (opt-in for NCCL); a
    bad value is refused before NCCL or a GPU is touched."""
    uid = bytes(128)
    for bad, err in ((-1.0, ValueError), (0, ValueError), (float("nan"), ValueError), ("1", TypeError)):
        with pytest.raises(err, match="timeout"):
            ringattn.Communicator.nccl(uid, 1, 0, 0, timeout=bad)
        with pytest.raises(err, match="timeout"):
            ringattn.Communicator.nccl_from_mpi(0, timeout=bad)
