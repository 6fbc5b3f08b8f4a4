"""nan_policy: "raise" (default) refuses NaN/Inf inputs; "propagate" lets them flow."""

import numpy as np
import pytest

import ringattn
from conftest import RING_TIMEOUT, make_qkv, run_with_timeout

# every call here may cross ranks: a deadlocked ring fails within RING_TIMEOUT
pytestmark = pytest.mark.timeout(RING_TIMEOUT)


def _w(name):
    return rf"(?<![A-Za-z0-9_]){name}(?![A-Za-z0-9_])"


@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_raise_names_argument(which, bad, dtype):
    args = dict(zip("qkv", make_qkv(1, 2, 64, 3, 16, dtype)))
    args[which][1, 37, 2, 5] = bad
    with pytest.raises(ValueError, match=_w(which)):
        ringattn.dilated_attention(args["q"], args["k"], args["v"], [32, 64], [1, 2], causal=True)
    # explicit policy behaves the same
    with pytest.raises(ValueError, match=_w(which)):
        ringattn.dilated_attention(args["q"], args["k"], args["v"], [32, 64], [1, 2], causal=True,
                                   nan_policy="raise")


def test_raise_even_where_position_is_unused():
    # groups mode, one branch r = 2 (offset 0): position 33 is active in no cell,
    # but the rule is "a NaN or Inf anywhere in q, k or v"
    q, k, v = make_qkv(2, 1, 64, 2, 16)
    k[0, 33, 0, 0] = np.nan
    with pytest.raises(ValueError, match=_w("k")):
        ringattn.dilated_attention(q, k, v, [64], [2])


def test_raise_in_noncontiguous_view():
    q, k, v = make_qkv(3, 1, 64, 2, 16)
    vt = np.ascontiguousarray(v.transpose(0, 2, 1, 3))
    vt[0, 1, 63, 15] = np.nan
    with pytest.raises(ValueError, match=_w("v")):
        ringattn.dilated_attention(q, k, vt.transpose(0, 2, 1, 3), [64], [1])


@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("world_size", [2, 4])
def test_raise_ring_any_rank(which, world_size):
    """NaN in the shard of the last rank: raised, named, and no deadlock."""
    args = dict(zip("qkv", make_qkv(4, 1, 128, 2, 16)))
    args[which][0, 127, 1, 0] = np.nan
    attn = ringattn.RingDilatedAttention([32, 128], [1, 2], causal=True, world_size=world_size)
    with pytest.raises(ValueError, match=_w(which)):
        run_with_timeout(lambda: attn(args["q"], args["k"], args["v"]))


def test_raise_ring_default_policy_first_rank():
    q, k, v = make_qkv(5, 1, 128, 2, 16)
    k[0, 0, 0, 0] = np.inf
    attn = ringattn.RingDilatedAttention([128], [1], world_size=4)
    with pytest.raises(ValueError, match=_w("k")):
        run_with_timeout(lambda: attn(q, k, v))


def test_propagate_nan_in_v_dense_noncausal():
    b, n, h, d, p, hh, j = 2, 64, 3, 16, 20, 1, 7
    q, k, v = make_qkv(6, b, n, h, d)
    v[0, p, hh, j] = np.nan
    o = ringattn.dilated_attention(q, k, v, [n], [1], nan_policy="propagate")
    # every query attends p in head hh of batch 0: that output column is NaN
    assert np.all(np.isnan(o[0, :, hh, j]))
    # other batch entries and other heads never see the NaN
    assert np.all(np.isfinite(o[1]))
    assert np.all(np.isfinite(np.delete(o[0], hh, axis=1)))


def test_propagate_nan_in_v_causal():
    b, n, h, d, p, hh = 1, 64, 2, 16, 40, 0
    q, k, v = make_qkv(7, b, n, h, d)
    v[0, p, hh, :] = np.nan
    o = ringattn.dilated_attention(q, k, v, [n], [1], causal=True, nan_policy="propagate")
    # queries at or after p attend p
    assert np.all(np.isnan(o[0, p:, hh, :]))
    assert np.all(np.isfinite(o[0, :, 1 - hh]))


def test_propagate_nan_in_v_dilated():
    # groups, one branch S = 32, r = 2: NaN at position 34 (segment 1, active)
    q, k, v = make_qkv(8, 1, 64, 2, 16)
    v[0, 34, :, :] = np.nan
    o = ringattn.dilated_attention(q, k, v, [32], [2], nan_policy="propagate")
    seg1_active = np.arange(32, 64, 2)
    assert np.all(np.isnan(o[0, seg1_active]))
    # queries of segment 0 never attend position 34
    assert np.all(np.isfinite(o[0, :32]))


def test_propagate_nan_in_q_row():
    q, k, v = make_qkv(9, 1, 64, 2, 16)
    q[0, 10, 1, 3] = np.nan
    o = ringattn.dilated_attention(q, k, v, [64], [1], nan_policy="propagate")
    assert np.all(np.isnan(o[0, 10, 1]))
    assert np.all(np.isfinite(o[0, :, 0]))


def test_propagate_ring():
    q, k, v = make_qkv(10, 1, 128, 2, 16)
    v[0, 100, 0, :] = np.nan
    attn = ringattn.RingDilatedAttention([128], [1], world_size=4, nan_policy="propagate")
    o = run_with_timeout(lambda: attn(q, k, v))
    assert np.all(np.isnan(o[0, :, 0]))
    assert np.all(np.isfinite(o[0, :, 1]))


def test_propagate_finite_inputs_unchanged():
    q, k, v = make_qkv(11, 1, 64, 2, 16)
    a = ringattn.dilated_attention(q, k, v, [32, 64], [1, 2], nan_policy="propagate")
    b = ringattn.dilated_attention(q, k, v, [32, 64], [1, 2], nan_policy="raise")
    assert np.array_equal(a, b)  # the policy changes the scan, never the arithmetic
