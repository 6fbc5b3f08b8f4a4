"""The bfloat16 helpers: float32 <-> bfloat16 bit patterns, and the host
conversions of device="cuda" (no GPU needed)."""

import numpy as np

from ringattn import _arrays


def test_bf16_conversion():
    x = np.array([0.0, -0.0, 1.0, -2.5, 3.140625, 1e-40, np.inf, -np.inf, np.nan, 65504.0], np.float32)
    bits = _arrays.f32_to_bf16_bits(x)
    back = _arrays.bf16_bits_to_f32(bits)
    fin = np.isfinite(x)
    assert np.allclose(back[fin], x[fin], rtol=2 ** -8, atol=1e-38)
    assert np.isnan(back[8]) and back[6] == np.inf and back[7] == -np.inf
    # round to nearest even: 1 + 2^-8 is halfway between 1 and 1 + 2^-7 -> 1
    halfway = np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8], np.float32)
    assert list(_arrays.bf16_bits_to_f32(_arrays.f32_to_bf16_bits(halfway))) == [1.0, 1 + 2 ** -6]
    rng = np.random.default_rng(1)
    y = rng.standard_normal(1000).astype(np.float32)
    assert np.max(np.abs(_arrays.bf16_bits_to_f32(_arrays.f32_to_bf16_bits(y)) - y) / np.abs(y)) <= 2 ** -8


def test_device_bits_and_caller_array():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)[:, ::-1]  # a strided view
    bits = _arrays.device_bits(x, "bfloat16")
    assert bits.dtype == np.uint16 and bits.flags.c_contiguous
    assert np.array_equal(_arrays.caller_array(bits, "bfloat16", np.float32), x)
    assert np.array_equal(_arrays.device_bits(bits, "bfloat16"), bits)  # uint16: already bit patterns
    h = _arrays.device_bits(x, "float16")
    assert h.dtype == np.float16 and h.flags.c_contiguous and np.array_equal(h, x)


def test_dtype_names():
    assert _arrays.dtype_name(np.float32) == "float32"
    assert _arrays.dtype_name("float16") == "float16"
    assert _arrays.dtype_name("bf16") == "bfloat16"
    assert _arrays.dtype_name(np.float64) is None  # not a GPU dtype
    assert _arrays.dtype_name(np.float64, _arrays.CPU_DTYPES) == "float64"
    assert _arrays.dtype_name(np.int32) is None
    assert _arrays.dtype_name("no such dtype") is None
