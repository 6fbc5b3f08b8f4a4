"""Shared helpers for the ringattn test suite.

The helpers are plain functions; test modules import them with
``from conftest import ...`` (the tests directory is put on sys.path here so
that this and ``import reference`` work under any pytest import mode).
"""

import os
import sys
import threading

import numpy as np
import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

# The base of the random seeds of tests that draw fresh inputs (test_gpu.py):
# fixed, so that a failure can be reproduced, and shown in pytest's header.
TEST_SEED = int(os.environ.get("RINGATTN_TEST_SEED", "0"))


def pytest_report_header(config):
    return f"ringattn test seed: RINGATTN_TEST_SEED={TEST_SEED}"


# float32: max abs error <= F32_TOL * max|ref|  (and the same for lse, see below)
F32_TOL = 2e-5
F16_TOL = 1e-2


def make_qkv(seed, b, n, h, d, dtype=np.float32, scale=1.0):
    """Fresh standard-normal q, k, v of shape (b, n, h, d); never zeros."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(3):
        x = rng.standard_normal((b, n, h, d)) * scale
        out.append(x.astype(dtype))
    return tuple(out)


def tol_for(dtype):
    return F16_TOL if np.dtype(dtype) == np.float16 else F32_TOL


def assert_out_close(o, ref, dtype, what="output"):
    """max|o - ref| <= tol * max(max|ref|, 1e-3)  (o in the input dtype)."""
    o64 = np.asarray(o).astype(np.float64)
    assert o64.shape == ref.shape, f"{what}: shape {o64.shape} != {ref.shape}"
    assert np.all(np.isfinite(o64)), f"{what}: non-finite values"
    denom = max(float(np.abs(ref).max()), 1e-3)
    err = float(np.abs(o64 - ref).max())
    tol = tol_for(dtype)
    assert err <= tol * denom, f"{what}: max abs err {err:.3e} > {tol:.1e} * {denom:.3e}"


def assert_lse_close(lse, ref_lse, dtype):
    """Finite entries close (abs + rel), -inf entries exactly -inf, no NaN/+inf."""
    lse = np.asarray(lse)
    assert lse.dtype == np.float32, f"lse dtype {lse.dtype}, want float32"
    assert lse.shape == ref_lse.shape, f"lse shape {lse.shape} != {ref_lse.shape}"
    l64 = lse.astype(np.float64)
    ninf = np.isneginf(ref_lse)
    assert np.array_equal(np.isneginf(l64), ninf), "lse: -inf pattern differs from reference"
    assert not np.any(np.isnan(l64)), "lse holds NaN"
    assert not np.any(np.isposinf(l64)), "lse holds +inf"
    fin = ~ninf
    if fin.any():
        if np.dtype(dtype) == np.float16:
            atol, rtol = 1e-2, 1e-3
        else:
            atol, rtol = 2e-5, 1e-5
        err = np.abs(l64[fin] - ref_lse[fin])
        bound = atol + rtol * np.abs(ref_lse[fin])
        worst = int(np.argmax(err - bound))
        assert np.all(err <= bound), (
            f"lse: err {err[worst]:.3e} > bound {bound[worst]:.3e} (ref {ref_lse[fin][worst]:.4f})")


def poison_heap(nbytes, dtype=np.float32):
    """Allocate and free NaN-filled blocks so that a following np.empty of a
    similar (small) size is likely to get NaN garbage instead of zeros."""
    count = max(1, nbytes // np.dtype(dtype).itemsize)
    junk = [np.full(count, np.nan, dtype=dtype) for _ in range(4)]
    del junk


def run_with_timeout(fn, timeout=60.0):
    """Run fn() in a daemon thread; fail the test (instead of hanging) on timeout.
    Re-raises whatever fn raised."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        pytest.fail(f"call did not return within {timeout} s (deadlock?)")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def ring_valid(n, world_size, segment_lengths, dilation_rates):
    """True when the config satisfies every rule of the spec for this world size."""
    if n % world_size:
        return False
    L = n // world_size
    for s, r in zip(segment_lengths, dilation_rates):
        S = min(s, n)
        if n % S or S % r:
            return False
        if L % S and S % L:
            return False
    return True


def spans(n, world_size, segment_lengths):
    """Ranks spanned by each branch (1 = local)."""
    L = n // world_size
    return [max(1, min(s, n) // L) for s in segment_lengths]
