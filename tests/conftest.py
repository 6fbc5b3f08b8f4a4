"""Shared helpers for the ringattn test suite.

The helpers are plain functions; test modules import them with
``from conftest import ...`` (the tests directory is put on sys.path here so
that this and ``import reference`` work under any pytest import mode).
"""

import faulthandler
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


# ------------------------------------------------------------------ timeouts
#
# No test may hang.  pyproject.toml gives every test pytest-timeout's global
# `timeout` (300 s, method "thread": it works while the main thread is
# blocked in a C call, dumps every thread's stack and ends the run).  Modules
# whose calls cross ranks (in-process rings) set `pytestmark =
# pytest.mark.timeout(RING_TIMEOUT)`: their slowest test takes a few seconds,
# so a deadlocked ring (a wrong neighbour, a lost message) fails within
# RING_TIMEOUT instead of at 300 s.  run_with_timeout (below) bounds a single
# call more tightly still.  A C call blocked in a deadlock cannot be
# interrupted, so every one of these limits ends the run, after printing
# every thread's stack: the suite fails, it does not hang.
RING_TIMEOUT = 30
DEFAULT_TIMEOUT = 300  # pyproject.toml's `timeout`, for the fallback below
CALL_TIMEOUT = 20      # run_with_timeout's default: below RING_TIMEOUT

_stderr = {}


def _stderr_fd():
    """The terminal's stderr (pytest captures fd 2 during a test, and what it
    captured is lost when the process exits)."""
    return _stderr.get("fd", sys.stderr.fileno())


def pytest_configure(config):
    _stderr["fd"] = os.dup(sys.stderr.fileno())  # as pytest's own faulthandler plugin does
    if not config.pluginmanager.hasplugin("timeout"):
        config.addinivalue_line(
            "markers", "timeout(seconds): per-test limit (pytest-timeout; without it conftest's "
            "faulthandler fallback)")


def pytest_unconfigure(config):
    if "fd" in _stderr:
        os.close(_stderr.pop("fd"))


@pytest.fixture(autouse=True)
def _timeout_without_plugin(request):
    """Without pytest-timeout (pip install pytest-timeout) the same limits hold,
    more bluntly: faulthandler dumps every thread's stack and exits."""
    if request.config.pluginmanager.hasplugin("timeout"):
        yield
        return
    marker = request.node.get_closest_marker("timeout")
    seconds = float(marker.args[0]) if marker and marker.args else DEFAULT_TIMEOUT
    faulthandler.dump_traceback_later(seconds, exit=True, file=_stderr_fd())
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


# float32: max abs error <= F32_TOL * max|ref|  (and the same for lse, see below)
F32_TOL = 2e-5
# float16 computes in float32 and rounds once, to nearest even, on store: half
# an ulp is at most 2^-11 = 4.9e-4 of the value, plus the float32 error.  (The
# exact test of that rounding is assert_f16_is_rounded_f32 below.)
F16_TOL = 6e-4


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
    """Finite entries close (abs + rel), -inf entries exactly -inf, no NaN/+inf.
    The lse is float32 for float16 inputs too, computed in float32 from the
    exactly widened inputs: the same tolerance as float32."""
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
        atol, rtol = 2e-5, 1e-5
        err = np.abs(l64[fin] - ref_lse[fin])
        bound = atol + rtol * np.abs(ref_lse[fin])
        worst = int(np.argmax(err - bound))
        assert np.all(err <= bound), (
            f"lse: err {err[worst]:.3e} > bound {bound[worst]:.3e} (ref {ref_lse[fin][worst]:.4f})")


def as_f32(*arrays):
    """float16 arrays widened to float32 (exactly: every float16 is a float32)."""
    return tuple(np.asarray(a).astype(np.float32) for a in arrays)


def assert_f16_is_rounded_f32(o16, o32, lse16=None, lse32=None, what="output"):
    """The float16 path against the float32 path run on the same values.

    On the CPU the two do identical float32 arithmetic: float16 inputs are
    widened exactly on load (F16C or the scalar conversion, then the same
    multiply as the float32 load), every accumulator, the merge and the lse
    are float32 in both, and the only float16 step is the store, which rounds
    to nearest even -- as NumPy's astype(float16) does.  So the float16 output
    is the float32 output rounded, bit for bit, and its float32 lse equals the
    float32 path's.  (A store that truncates, or any float16-only arithmetic,
    breaks the equality.)"""
    o16, o32 = np.asarray(o16), np.asarray(o32)
    assert o16.dtype == np.float16 and o32.dtype == np.float32, (o16.dtype, o32.dtype)
    want = o32.astype(np.float16)
    same = (o16.view(np.uint16) == want.view(np.uint16)) | (np.isnan(o16) & np.isnan(want))
    if not same.all():
        i = tuple(int(x[0]) for x in np.nonzero(~same))
        raise AssertionError(
            f"{what}: float16 result is not the float32 result rounded to nearest even at "
            f"{int((~same).sum())} of {same.size} elements; e.g. at {i}: {o16[i]!r} "
            f"(0x{int(o16.view(np.uint16)[i]):04x}) vs float16({o32[i]!r}) = {want[i]!r} "
            f"(0x{int(want.view(np.uint16)[i]):04x})")
    if lse16 is not None:
        lse16, lse32 = np.asarray(lse16), np.asarray(lse32)
        assert lse16.dtype == lse32.dtype == np.float32, (lse16.dtype, lse32.dtype)
        assert np.array_equal(lse16, lse32, equal_nan=True), (
            f"{what}: float16 path's lse differs from the float32 path's by up to "
            f"{float(np.nanmax(np.abs(lse16.astype(np.float64) - lse32))):.3e}")


def poison_heap(nbytes, dtype=np.float32):
    """Allocate and free NaN-filled blocks so that a following np.empty of a
    similar (small) size is likely to get NaN garbage instead of zeros."""
    count = max(1, nbytes // np.dtype(dtype).itemsize)
    junk = [np.full(count, np.nan, dtype=dtype) for _ in range(4)]
    del junk


def run_with_timeout(fn, timeout=CALL_TIMEOUT):
    """Return fn(), or end the run if it has not returned within `timeout` s.

    fn runs in the calling thread (a RingDilatedAttention keeps last_stats and
    what backward() needs per thread), watched by a daemon thread.  A call
    that does not return is a deadlocked ring whose C threads cannot be
    stopped, so the watchdog names the test, dumps every thread's stack and
    exits the process with status 1: the run fails within `timeout` seconds
    instead of hanging."""
    done = threading.Event()
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]

    def watchdog():
        if done.wait(timeout):
            return
        fd = _stderr_fd()
        os.write(fd, f"\n+++ run_with_timeout: a call of {test} did not return within {timeout} s "
                     f"(deadlocked ring?); every thread's stack:\n".encode())
        faulthandler.dump_traceback(file=fd, all_threads=True)
        os._exit(1)

    threading.Thread(target=watchdog, daemon=True, name="run_with_timeout watchdog").start()
    try:
        return fn()
    finally:
        done.set()


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
