"""The CPU backward's two schedules (csrc/cpu/backend.c, csrc/cpu/backward.c).

A batch of attention tasks takes the fused one-pass kernel (dQ, dK, dV of a
task in one call) when there are enough tasks for the threads, and the
two-pass pair (dK/dV over key blocks, then dQ over query blocks) when there
are too few, e.g. one head on two threads.  Both are checked against the
float64 reference on runs longer than the kernel's packed chunk (256 queries)
and key block (64 keys), with a head dim that is not a multiple of the vector
width, causal and not, dilated; and against each other.
"""

import numpy as np
import pytest

import ringattn
from conftest import make_qkv
from reference import reference_backward

CASES = [
    # (n, d, segs, rates, causal)
    (600, 40, [600], [1], False),
    (600, 40, [600], [1], True),
    (520, 64, [520], [2], True),  # dilated: the head's run of every other position
]


def rel_err(x, ref):
    return float(np.abs(np.asarray(x, np.float64) - ref).max()) / max(float(np.abs(ref).max()), 1e-6)


@pytest.mark.parametrize("case", CASES)
def test_one_pass_and_two_pass_match_reference(case):
    n, d, segs, rates, causal = case
    q, k, v = make_qkv(21, 1, n, 1, d)
    g = np.random.default_rng(22).standard_normal(q.shape).astype(np.float32)
    o, lse = ringattn.dilated_attention(q, k, v, segs, rates, causal=causal, return_lse=True)
    want = reference_backward(q, k, v, g, segs, rates, causal, "groups")
    # one head, one segment: one task, fused on one thread, two passes on two
    got = {t: ringattn.dilated_attention_backward(q, k, v, o, lse, g, segs, rates, causal=causal, num_threads=t)
           for t in (1, 2)}
    for t, grads in got.items():
        for name, x, ref in zip(("dq", "dk", "dv"), grads, want):
            assert rel_err(x, ref) < 1e-4, (t, name, rel_err(x, ref))
    for name, x1, x2 in zip(("dq", "dk", "dv"), got[1], got[2]):
        assert rel_err(x2, np.asarray(x1, np.float64)) < 1e-5, name
