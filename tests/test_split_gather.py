"""split_sequence / gather_sequence."""

import numpy as np
import pytest

import ringattn
from conftest import make_qkv


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 6, 8])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_split_gather_roundtrip(world_size, dtype):
    x, _, _ = make_qkv(1, 2, 48 * world_size, 3, 8, dtype)
    L = x.shape[1] // world_size
    shards = []
    for rank in range(world_size):
        s = ringattn.split_sequence(x, world_size, rank)
        assert s.shape == (2, L, 3, 8) and s.dtype == x.dtype
        assert np.array_equal(s, x[:, rank * L:(rank + 1) * L])
        shards.append(s)
    g = ringattn.gather_sequence(shards)
    assert g.shape == x.shape and g.dtype == x.dtype
    assert np.array_equal(g, x)


def test_gather_is_concatenation_along_axis_1():
    a = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    b = -np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    np.testing.assert_array_equal(ringattn.gather_sequence([a, b]), np.concatenate([a, b], axis=1))
    np.testing.assert_array_equal(ringattn.gather_sequence((a,)), a)


def test_split_noncontiguous():
    x, _, _ = make_qkv(2, 1, 64, 2, 8)
    xt = np.ascontiguousarray(x.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    for r in range(4):
        np.testing.assert_array_equal(ringattn.split_sequence(xt, 4, r), x[:, r * 16:(r + 1) * 16])


@pytest.mark.parametrize("world_size", [0, -2])
def test_split_bad_world_size(world_size):
    x = np.ones((1, 8, 1, 1), np.float32)
    with pytest.raises(ValueError, match="world_size"):
        ringattn.split_sequence(x, world_size, 0)


def test_split_indivisible():
    x = np.ones((1, 10, 1, 1), np.float32)
    with pytest.raises(ValueError, match="world_size"):
        ringattn.split_sequence(x, 4, 0)


@pytest.mark.parametrize("rank", [-1, 4, 100])
def test_split_bad_rank(rank):
    x = np.ones((1, 8, 1, 1), np.float32)
    with pytest.raises(ValueError, match="rank"):
        ringattn.split_sequence(x, 4, rank)


def test_gather_errors():
    with pytest.raises(ValueError):
        ringattn.gather_sequence([])
    a = np.ones((1, 4, 2, 2), np.float32)
    with pytest.raises(ValueError):
        ringattn.gather_sequence([a, np.ones((1, 4, 3, 2), np.float32)])
