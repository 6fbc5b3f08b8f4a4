#!/usr/bin/env python3
"""CPU throughput of ringattn vs NumPy (fp32), measured in the same run.

(a) dense non-causal attention (segment_lengths=[n], dilation_rates=[1]) vs a
    NumPy matmul + softmax + matmul per head.  FLOPs = 4*b*h*n*n*d.
(b) the seed configuration (h=12, d=64, segments [2048, 4096], rates [1, 2],
    causal, groups mode) vs a NumPy loop over branches and segments.  Useful
    FLOPs = 4*d*(attended (query, key) pairs), counted exactly; the NumPy loop
    computes full segment blocks but is credited with the same useful FLOPs.

Usage:  python benchmarks/bench_cpu.py [--quick] [--threads N] [--repeats R] [--json PATH]
"""

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for ringattn and for NumPy's BLAS (default: all cores)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (median reported)")
    ap.add_argument("--json", metavar="PATH", default=None, help="also write results as JSON")
    ap.add_argument("--only", choices=["dense", "seed", "backward"], default=None, help="run one part only")
    return ap.parse_args()


ARGS = parse_args()
if ARGS.threads is not None:
    # must happen before NumPy loads its BLAS
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "RINGATTN_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

import numpy as np  # noqa: E402

import ringattn  # noqa: E402


# ----------------------------------------------------------------- timing

def bench(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ------------------------------------------------------------ NumPy baselines

def numpy_dense(q, k, v, scale):
    """fp32 dense non-causal attention, one head at a time (bounds memory)."""
    b, n, h, d = q.shape
    out = np.empty_like(q)
    sc = np.float32(scale)
    for bb in range(b):
        for hh in range(h):
            qh = q[bb, :, hh, :]
            kh = k[bb, :, hh, :]
            vh = v[bb, :, hh, :]
            s = qh @ kh.T
            s *= sc
            s -= s.max(axis=1, keepdims=True)
            np.exp(s, out=s)
            s /= s.sum(axis=1, keepdims=True)
            out[bb, :, hh, :] = s @ vh
    return out


def head_groups(h, G):
    ranges, lo = [], 0
    for i in range(G):
        size = h // G + (1 if i < h % G else 0)
        ranges.append((lo, lo + size))
        lo += size
    return ranges


def numpy_dilated_groups(q, k, v, segs, rates, causal, scale):
    """fp32 dilated attention, groups mode: per group of heads, per segment:
    gather the active positions, matmul, causal mask, softmax, matmul, scatter."""
    b, n, h, d = q.shape
    out = np.zeros_like(q)
    sc = np.float32(scale)
    G = len(segs)
    for i, (lo, hi) in enumerate(head_groups(h, G)):
        S, r = min(segs[i], n), rates[i]
        off = i % r
        local = np.arange(off, S, r)
        m = local.size
        mask = np.triu(np.full((m, m), -np.inf, np.float32), 1) if causal else None
        for bb in range(b):
            for seg in range(n // S):
                pos = seg * S + local
                qs = q[bb, pos, lo:hi, :].transpose(1, 0, 2)  # (hg, m, d)
                ks = k[bb, pos, lo:hi, :].transpose(1, 0, 2)
                vs = v[bb, pos, lo:hi, :].transpose(1, 0, 2)
                s = np.matmul(qs, ks.transpose(0, 2, 1))
                s *= sc
                if mask is not None:
                    s += mask
                s -= s.max(axis=2, keepdims=True)
                np.exp(s, out=s)
                s /= s.sum(axis=2, keepdims=True)
                out[bb, pos, lo:hi, :] = np.matmul(s, vs).transpose(1, 0, 2)
    return out


def attended_pairs_groups(n, h, segs, rates, causal):
    total = 0
    for i, (lo, hi) in enumerate(head_groups(h, len(segs))):
        S, r = min(segs[i], n), rates[i]
        m = len(range(i % r, S, r))
        per_seg = m * (m + 1) // 2 if causal else m * m
        total += (hi - lo) * (n // S) * per_seg
    return total


# ---------------------------------------------------------------------- runs

def rand(rng, shape):
    return rng.standard_normal(shape, dtype=np.float32)


def run_dense(quick, repeats, threads):
    rows = []
    ns = [1024, 2048, 4096] if quick else [1024, 2048, 4096, 8192]
    ds = [64] if quick else [64, 128]
    rng = np.random.default_rng(0)
    for d in ds:
        for n in ns:
            b = 1
            h = 4 if n * n * d <= 4096 * 4096 * 128 else 2
            q, k, v = (rand(rng, (b, n, h, d)) for _ in range(3))
            scale = 1.0 / math.sqrt(d)
            flops = 4.0 * b * h * n * n * d
            t_ra = bench(lambda: ringattn.dilated_attention(q, k, v, [n], [1], num_threads=threads),
                         repeats)
            t_np = bench(lambda: numpy_dense(q, k, v, scale), repeats)
            o_ra = ringattn.dilated_attention(q, k, v, [n], [1], num_threads=threads)
            o_np = numpy_dense(q, k, v, scale)
            err = float(np.abs(o_ra - o_np).max())
            rows.append(dict(part="dense", b=b, n=n, h=h, d=d, causal=False, flops=flops,
                             t_ringattn=t_ra, t_numpy=t_np,
                             gflops_ringattn=flops / t_ra / 1e9, gflops_numpy=flops / t_np / 1e9,
                             speedup=t_np / t_ra, max_abs_diff=err))
            print_row(rows[-1], flush=True)
    return rows


def run_seed(quick, repeats, threads):
    rows = []
    h, d, segs, rates, causal = 12, 64, [2048, 4096], [1, 2], True
    ns = [4096, 8192] if quick else [4096, 8192, 16384]
    rng = np.random.default_rng(1)
    for n in ns:
        b = 1
        q, k, v = (rand(rng, (b, n, h, d)) for _ in range(3))
        scale = 1.0 / math.sqrt(d)
        flops = 4.0 * d * b * attended_pairs_groups(n, h, segs, rates, causal)
        kw = dict(causal=causal, mode="groups", num_threads=threads)
        t_ra = bench(lambda: ringattn.dilated_attention(q, k, v, segs, rates, **kw), repeats)
        t_np = bench(lambda: numpy_dilated_groups(q, k, v, segs, rates, causal, scale), repeats)
        o_ra = ringattn.dilated_attention(q, k, v, segs, rates, **kw)
        o_np = numpy_dilated_groups(q, k, v, segs, rates, causal, scale)
        err = float(np.abs(o_ra - o_np).max())
        rows.append(dict(part="seed", b=b, n=n, h=h, d=d, causal=causal, flops=flops,
                         t_ringattn=t_ra, t_numpy=t_np,
                         gflops_ringattn=flops / t_ra / 1e9, gflops_numpy=flops / t_np / 1e9,
                         speedup=t_np / t_ra, max_abs_diff=err))
        print_row(rows[-1], flush=True)
    return rows


def numpy_dense_backward(q, k, v, g, scale):
    """Dense attention's gradients with NumPy (fp32): recompute P, then
    dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO o)), dQ = s dS K, dK = s dS^T Q."""
    qt, kt, vt, gt = (np.ascontiguousarray(x.transpose(0, 2, 1, 3)) for x in (q, k, v, g))
    s = np.matmul(qt, kt.transpose(0, 1, 3, 2)) * np.float32(scale)
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    o = np.matmul(s, vt)
    dv = np.matmul(s.transpose(0, 1, 3, 2), gt)
    dp = np.matmul(gt, vt.transpose(0, 1, 3, 2))
    dp -= (gt * o).sum(axis=-1, keepdims=True)
    dp *= s
    dq = np.matmul(dp, kt) * np.float32(scale)
    dk = np.matmul(dp.transpose(0, 1, 3, 2), qt) * np.float32(scale)
    return dq, dk, dv


def run_backward(quick, repeats, threads):
    """Forward and backward of ringattn in the same run, dense non-causal
    and the seed configuration; backward FLOPs counted as 2.5x the forward's.
    NumPy's dense backward is the peer for the dense rows."""
    rows = []
    rng = np.random.default_rng(2)
    cases = [(1024, 64, [None], [1], False), (2048, 64, [None], [1], False), (2048, 128, [None], [1], False)]
    if not quick:
        cases += [(4096, 64, [None], [1], False), (8192, 64, [2048, 4096], [1, 2], True)]
    print("\n| part | n | h | d | fwd ms | fwd GFLOP/s | bwd ms | bwd GFLOP/s (2.5x fwd FLOPs) | "
          "NumPy bwd ms | bwd speedup vs NumPy |")
    print("|" + "---|" * 10)
    for n, d, segs, rates, causal in cases:
        b, h = 1, (12 if segs[0] else 4)
        segs = [n] if segs[0] is None else segs
        q, k, v, g = (rand(rng, (b, n, h, d)) for _ in range(4))
        kw = dict(causal=causal, num_threads=threads)
        pairs = attended_pairs_groups(n, h, segs, rates, causal) if len(segs) > 1 else h * n * n
        flops = 4.0 * d * b * pairs
        t_f = bench(lambda: ringattn.dilated_attention(q, k, v, segs, rates, return_lse=True, **kw), repeats)
        o, lse = ringattn.dilated_attention(q, k, v, segs, rates, return_lse=True, **kw)
        t_b = bench(lambda: ringattn.dilated_attention_backward(q, k, v, o, lse, g, segs, rates, **kw), repeats)
        t_np = float("nan")
        if len(segs) == 1 and not causal:
            t_np = bench(lambda: numpy_dense_backward(q, k, v, g, 1.0 / math.sqrt(d)), repeats)
        part = "dense" if len(segs) == 1 else "seed"
        rows.append(dict(part=f"backward-{part}", b=b, n=n, h=h, d=d, causal=causal, flops=flops,
                         t_forward=t_f, t_backward=t_b, t_numpy_backward=t_np,
                         gflops_forward=flops / t_f / 1e9, gflops_backward=2.5 * flops / t_b / 1e9))
        peer = f"{t_np * 1e3:.1f} | {t_np / t_b:.2f}x" if t_np == t_np else "— | —"  # no NumPy peer for seed rows
        print(f"| {part} | {n} | {h} | {d} | {t_f * 1e3:.1f} | {flops / t_f / 1e9:.1f} | {t_b * 1e3:.1f} | "
              f"{2.5 * flops / t_b / 1e9:.1f} | {peer} |", flush=True)
    return rows


HEADER = ("| part | b | n | h | d | causal | GFLOP | ringattn ms | NumPy ms | "
          "ringattn GFLOP/s | NumPy GFLOP/s | speedup (NumPy time / ringattn time) | max abs diff |")


def print_row(r, flush=False):
    print(f"| {r['part']} | {r['b']} | {r['n']} | {r['h']} | {r['d']} | {r['causal']} | "
          f"{r['flops'] / 1e9:.2f} | {r['t_ringattn'] * 1e3:.1f} | {r['t_numpy'] * 1e3:.1f} | "
          f"{r['gflops_ringattn']:.1f} | {r['gflops_numpy']:.1f} | {r['speedup']:.2f}x | "
          f"{r['max_abs_diff']:.1e} |", flush=flush)


def main():
    repeats = ARGS.repeats or (3 if ARGS.quick else 5)
    threads = ARGS.threads
    print(f"# ringattn CPU benchmark\n")
    print(f"python {platform.python_version()}, numpy {np.__version__}, "
          f"ringattn {getattr(ringattn, '__version__', '?')}, cpus {os.cpu_count()}, "
          f"threads {threads if threads is not None else 'default'} "
          f"(ringattn.get_num_threads() = {ringattn.get_num_threads()}), "
          f"median of {repeats} after 1 warm-up, fp32\n")
    print("Dense rows: segment_lengths=[n], dilation_rates=[1], non-causal, FLOPs = 4*b*h*n*n*d.")
    print("Seed rows: h=12, d=64, segments [2048, 4096], rates [1, 2], causal, groups mode; "
          "FLOPs = 4*d*(attended pairs) for both columns.\n")
    print(HEADER)
    print("|" + "---|" * 13)
    rows = []
    if ARGS.only in (None, "dense"):
        rows += run_dense(ARGS.quick, repeats, threads)
    if ARGS.only in (None, "seed"):
        rows += run_seed(ARGS.quick, repeats, threads)
    if ARGS.only in (None, "backward"):
        rows += run_backward(ARGS.quick, repeats, threads)
    if ARGS.json:
        meta = dict(python=platform.python_version(), numpy=np.__version__,
                    machine=platform.machine(), cpus=os.cpu_count(), threads=threads,
                    repeats=repeats, quick=ARGS.quick)
        with open(ARGS.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=2)
        print(f"\nwrote {ARGS.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
