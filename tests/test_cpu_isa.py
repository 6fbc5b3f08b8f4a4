"""Runtime ISA dispatch of the CPU kernels (csrc/cpu/isa.c).

Every variant this build has and this CPU runs (baseline, avx2, avx512) is
checked against the float64 reference, each in a subprocess with
RINGATTN_CPU_ISA set (the setting is read once per process): float32 and
float16, causal and not, dilated, head dims 32/64/128 and an odd one (40),
lengths that leave partial kernel tiles.  An ISA this build or CPU lacks, and
an unknown name, are clear errors.
"""

import os
import subprocess
import sys

import pytest

import ringattn

HERE = os.path.dirname(os.path.abspath(__file__))
ISAS = ["baseline", "avx2", "avx512"]

# Runs in the subprocess: the checks of one variant.  (b, n, h, d, segments,
# rates, causal, mode); n = 315 and 600 leave partial key tiles and query
# blocks, 35 and 21 keys per dilated cell are odd.
CHECK = r"""
import sys
import numpy as np
import ringattn
from conftest import as_f32, assert_f16_is_rounded_f32, assert_lse_close, assert_out_close, make_qkv
from reference import reference_attention, reference_backward

isa = sys.argv[1]
assert ringattn.cpu_isa()["selected"] == isa, ringattn.cpu_isa()
CASES = [
    (1, 600, 2, 64, [600], [1], False, "groups"),
    (1, 600, 2, 64, [600], [1], True, "groups"),
    (2, 315, 3, 40, [105, 315], [3, 5], True, "groups"),
    (1, 315, 2, 128, [63, 315], [3, 15], False, "longnet"),
    (1, 256, 4, 32, [64, 256], [1, 4], True, "longnet"),
    (1, 197, 2, 128, [197], [1], True, "groups"),
]
for i, (b, n, h, d, segs, rates, causal, mode) in enumerate(CASES):
    for dtype in (np.float32, np.float16):
        q, k, v = make_qkv(100 + i, b, n, h, d, dtype)
        o, lse = ringattn.dilated_attention(q, k, v, segs, rates, causal=causal, mode=mode, return_lse=True)
        ro, rl = reference_attention(q, k, v, segs, rates, causal=causal, mode=mode)
        assert_out_close(o, ro, dtype, what=f"{isa} case {i} {np.dtype(dtype).name}")
        assert_lse_close(lse, rl, dtype)
        if dtype == np.float16:
            o32, lse32 = ringattn.dilated_attention(*as_f32(q, k, v), segs, rates, causal=causal, mode=mode,
                                                    return_lse=True)
            assert_f16_is_rounded_f32(o, o32, lse, lse32)

# NaN inputs stay visible
q, k, v = make_qkv(7, 1, 200, 1, 64)
q[0, 150, 0, 3] = np.nan
o = ringattn.dilated_attention(q, k, v, [200], [1], causal=True, nan_policy="propagate")
assert np.isnan(o[0, 150]).all() and np.isfinite(np.delete(o, 150, axis=1)).all()

# the backward (compiled per ISA as well)
for causal in (False, True):
    q, k, v = make_qkv(9, 1, 200, 2, 40)
    g = np.random.default_rng(10).standard_normal(q.shape).astype(np.float32)
    o, lse = ringattn.dilated_attention(q, k, v, [200], [1], causal=causal, return_lse=True)
    got = ringattn.dilated_attention_backward(q, k, v, o, lse, g, [200], [1], causal=causal)
    want = reference_backward(q, k, v, g, [200], [1], causal, "groups")
    for name, x, ref in zip(("dq", "dk", "dv"), got, want):
        err = float(np.abs(x - ref).max() / max(np.abs(ref).max(), 1e-6))
        assert err < 1e-4, (isa, name, err)
print("ok", isa)
"""


def run_with_isa(isa, code, *args):
    env = dict(os.environ, RINGATTN_CPU_ISA=isa, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=HERE, capture_output=True, text=True,
                          timeout=240)


def test_cpu_isa_reports_the_variants():
    info = ringattn.cpu_isa()
    assert set(info) == {"selected", "supported", "compiled"}
    assert "baseline" in info["compiled"] and "baseline" in info["supported"]
    assert set(info["supported"]) <= set(info["compiled"]) <= set(ISAS)
    if os.environ.get("RINGATTN_CPU_ISA", "auto") in ("", "auto"):
        assert info["selected"] == info["supported"][-1]  # the widest


@pytest.mark.timeout(300)
@pytest.mark.parametrize("isa", ISAS)
def test_variant_matches_reference(isa):
    if isa not in ringattn.cpu_isa()["supported"]:
        pytest.skip(f"this build or CPU has no {isa} kernels")
    r = run_with_isa(isa, CHECK, isa)
    assert r.returncode == 0 and f"ok {isa}" in r.stdout, r.stdout + r.stderr


CALL = r"""
import numpy as np, ringattn
q = np.ones((1, 8, 1, 16), np.float32)
try:
    ringattn.dilated_attention(q, q, q, [8], [1])
except Exception as e:
    print(type(e).__name__ + ": " + str(e))
else:
    print("no error")
"""


def test_unknown_isa_is_a_clear_error():
    r = run_with_isa("sse9", CALL)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ValueError: cpu_isa: unknown instruction set"), r.stdout
    assert "RINGATTN_CPU_ISA must be auto, baseline, avx2 or avx512" in r.stdout


def test_unavailable_isa_is_a_clear_error():
    missing = [i for i in ISAS if i not in ringattn.cpu_isa()["supported"]]
    if not missing:
        pytest.skip("this CPU runs every variant the build knows")
    r = run_with_isa(missing[0], CALL)
    assert r.returncode == 0, r.stderr
    assert f"cpu_isa: this " in r.stdout and f"{missing[0]} kernels" in r.stdout, r.stdout
