#!/usr/bin/env python3
"""CPU throughput of ringattn against the peer a user would pick, in one run.

The peer is PyTorch (torch.nn.functional.scaled_dot_product_attention on CPU,
and torch autograd for the backward) when torch is installed, NumPy otherwise.
Every part prints a markdown table with GFLOP/s, the ratio (peer time /
ringattn time: above 1 means ringattn is faster) and the fraction of the
machine's measured fp32 FMA peak (benchmarks/fma_peak.c, built here with
`cc -O2 -march=native -fopenmp`; without a C compiler the column is empty).

Parts:
  dense    segment_lengths=[n], dilation_rates=[1], d = 64 and 128, causal and
           not, n = 2048..8192.  FLOPs = 4*d*(attended query-key pairs), which
           is 4*b*h*n*n*d non-causal and about half of it causal.
  seed     h=12, d=64, segments [2048, 4096], rates [1, 2], causal, groups mode,
           against the same function in PyTorch: per branch, strided views of
           the segments, one batched SDPA call, a scatter (NumPy: a loop).
  fwdbwd   forward + backward (ringattn.torch autograd against torch autograd of
           SDPA / of the batched implementation); FLOPs = 3.5x the forward's.
  tiny     per-call latency of a tiny call (1, 64, 4, 32), median of many.

Usage:  python benchmarks/bench_cpu.py [--quick] [--threads N] [--repeats R]
                                       [--only PART] [--json PATH] [--plot PNG]
"""

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

PARTS = ("dense", "seed", "fwdbwd", "tiny")


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    ap.add_argument("--threads", type=int, default=None, help="threads for both sides (default: all cores)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (the minimum is reported)")
    ap.add_argument("--only", choices=PARTS, action="append", help="run only these parts (repeatable)")
    ap.add_argument("--no-torch", action="store_true", help="use NumPy as the peer even if torch is installed")
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    ap.add_argument("--plot", metavar="PNG", help="plot dense GFLOP/s against n (needs matplotlib)")
    return ap.parse_args()


ARGS = parse_args()
THREADS = ARGS.threads or os.cpu_count() or 1
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "RINGATTN_NUM_THREADS"):
    os.environ[var] = str(THREADS)  # before NumPy / torch load their thread pools

import numpy as np  # noqa: E402

import ringattn  # noqa: E402

torch = None
if not ARGS.no_torch:
    try:
        import torch  # noqa: E402
        import torch.nn.functional as F  # noqa: E402

        import ringattn.torch as rtorch  # noqa: E402
        torch.set_num_threads(THREADS)
    except ImportError:
        torch = None
PEER = "torch" if torch is not None else "NumPy"


# ----------------------------------------------------------------- timing

def bench(fn, repeats, warmup=1):
    """Minimum wall time of `repeats` calls after `warmup` (the machine may be
    shared: the minimum is the least disturbed run)."""
    for _ in range(warmup):
        fn()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def fma_peak(threads):
    """(1-thread, all-thread) fp32 FMA GFLOP/s from fma_peak.c, or (None, None)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fma_peak.c")
    if cc is None or not os.path.exists(src):
        return None, None
    with tempfile.TemporaryDirectory() as tmp:
        exe = os.path.join(tmp, "fma_peak")
        try:
            subprocess.run([cc, "-O2", "-march=native", "-fopenmp", src, "-o", exe], check=True,
                           capture_output=True, timeout=120)
            out = subprocess.run([exe, str(threads)], check=True, capture_output=True, text=True,
                                 timeout=120).stdout.split()
        except (subprocess.SubprocessError, OSError):
            return None, None
    return float(out[1]), float(out[3])


# ------------------------------------------------------------- configurations

def head_groups(h, G):
    """Groups mode's head ranges: group i has h div G heads, plus one when i < h mod G."""
    ranges, lo = [], 0
    for i in range(G):
        size = h // G + (1 if i < h % G else 0)
        ranges.append((lo, lo + size))
        lo += size
    return ranges


def attended_pairs(n, h, segs, rates, causal):
    """Query-key pairs a groups-mode call attends (summed over heads, batch 1)."""
    total = 0
    for i, (lo, hi) in enumerate(head_groups(h, len(segs))):
        S, r = min(segs[i], n), rates[i]
        m = len(range(i % r, S, r))
        total += (hi - lo) * (n // S) * (m * (m + 1) // 2 if causal else m * m)
    return total


# ------------------------------------------------------------------- peers

def torch_dilated_groups(q, k, v, segs, rates, causal):
    """The groups-mode function in plain PyTorch, (b, n, h, d) tensors: for each
    branch, the dilated tokens of every segment gathered by strided views into
    one batch, one SDPA call, the result scattered into a zero output.
    Differentiable, so torch autograd gives its backward."""
    b, n, h, d = q.shape
    out = q.new_zeros(q.shape)
    for i, (lo, hi) in enumerate(head_groups(h, len(segs))):
        S, r = min(segs[i], n), rates[i]
        nseg, off, hg = n // S, i % r, hi - lo

        def take(x):  # (b, nseg, m, hg, d) -> (b*nseg, hg, m, d)
            x = x[:, :nseg * S, lo:hi].reshape(b, nseg, S, hg, d)[:, :, off::r]
            return x.permute(0, 1, 3, 2, 4).reshape(b * nseg, hg, -1, d)

        o = F.scaled_dot_product_attention(take(q), take(k), take(v), is_causal=causal)
        o = o.reshape(b, nseg, hg, -1, d).permute(0, 1, 3, 2, 4)  # (b, nseg, m, hg, d)
        out[:, :nseg * S].view(b, nseg, S, h, d)[:, :, off::r, lo:hi] = o
    return out


def numpy_dilated_groups(q, k, v, segs, rates, causal):
    """The same function with NumPy (the peer when torch is absent)."""
    b, n, h, d = q.shape
    out = np.zeros_like(q)
    sc = np.float32(1.0 / math.sqrt(d))
    for i, (lo, hi) in enumerate(head_groups(h, len(segs))):
        S, r = min(segs[i], n), rates[i]
        local = np.arange(i % r, S, r)
        m = local.size
        mask = np.triu(np.full((m, m), -np.inf, np.float32), 1) if causal else None
        for bb in range(b):
            for seg in range(n // S):
                pos = seg * S + local
                qs, ks, vs = (x[bb, pos, lo:hi, :].transpose(1, 0, 2) for x in (q, k, v))
                s = np.matmul(qs, ks.transpose(0, 2, 1)) * sc
                if mask is not None:
                    s += mask
                s -= s.max(axis=2, keepdims=True)
                np.exp(s, out=s)
                s /= s.sum(axis=2, keepdims=True)
                out[bb, pos, lo:hi, :] = np.matmul(s, vs).transpose(1, 0, 2)
    return out


def peer_forward(q, k, v, segs, rates, causal):
    """The peer's forward on (b, n, h, d) NumPy arrays; returns (callable, output)."""
    if torch is None:
        fn = lambda: numpy_dilated_groups(q, k, v, segs, rates, causal)  # noqa: E731
        return fn, fn()
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
    if len(segs) == 1 and segs[0] >= q.shape[1]:  # dense: SDPA on its own (b, h, n, d) layout
        hq, hk, hv = (x.transpose(1, 2).contiguous() for x in (tq, tk, tv))
        fn = lambda: F.scaled_dot_product_attention(hq, hk, hv, is_causal=causal)  # noqa: E731
        return fn, fn().transpose(1, 2).numpy()
    fn = lambda: torch_dilated_groups(tq, tk, tv, segs, rates, causal)  # noqa: E731
    return fn, fn().numpy()


# -------------------------------------------------------------------- rows

ROWS = []
PEAK = {}


def pct(gflops):
    return f"{100 * gflops / PEAK['all']:.0f}%" if PEAK.get("all") else "—"


def table(title, header):
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header), flush=True)


def row(cells):
    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


def rand(rng, shape):
    return rng.standard_normal(shape, dtype=np.float32)


def forward_row(part, n, h, d, segs, rates, causal, repeats, rng):
    q, k, v = (rand(rng, (1, n, h, d)) for _ in range(3))
    flops = 4.0 * d * attended_pairs(n, h, segs, rates, causal)
    kw = dict(causal=causal, mode="groups", num_threads=THREADS)
    ours = lambda: ringattn.dilated_attention(q, k, v, segs, rates, **kw)  # noqa: E731
    peer, o_peer = peer_forward(q, k, v, segs, rates, causal)
    err = float(np.abs(ours() - o_peer).max())
    if err > 1e-4:
        raise SystemExit(f"{part} n={n} d={d}: ringattn and {PEER} disagree (max |diff| {err:.2e})")
    t_ours, t_peer = bench(ours, repeats), bench(peer, repeats)
    g_ours, g_peer = flops / t_ours / 1e9, flops / t_peer / 1e9
    ROWS.append(dict(part=part, n=n, h=h, d=d, causal=causal, flops=flops, t_ringattn=t_ours, t_peer=t_peer,
                     gflops_ringattn=g_ours, gflops_peer=g_peer, ratio=t_peer / t_ours, max_abs_diff=err))
    row([n, h, d, causal, f"{t_ours * 1e3:.1f}", f"{t_peer * 1e3:.1f}", f"{g_ours:.0f}", f"{g_peer:.0f}",
         f"**{t_peer / t_ours:.2f}x**", pct(g_ours), pct(g_peer), f"{err:.1e}"])


FWD_HEADER = ["n", "h", "d", "causal", "ringattn ms", f"{PEER} ms", "ringattn GFLOP/s", f"{PEER} GFLOP/s",
              f"ratio ({PEER} time / ringattn time)", "ringattn % peak", f"{PEER} % peak", "max abs diff"]


def run_dense(repeats):
    table(f"Dense forward against {'torch SDPA' if torch else 'NumPy'}", FWD_HEADER)
    rng = np.random.default_rng(0)
    ns = [2048, 4096] if ARGS.quick else [2048, 4096, 8192]
    for d in (64, 128):
        for causal in (False, True):
            for n in ns:
                h = 8 if n <= 4096 else 4
                forward_row("dense", n, h, d, [n], [1], causal, repeats, rng)


SEED = dict(h=12, d=64, segs=[2048, 4096], rates=[1, 2])


def run_seed(repeats):
    peer = "the batched PyTorch implementation" if torch else "a NumPy loop"
    table(f"Seed configuration (h=12, d=64, [2048, 4096] / [1, 2], causal) against {peer}", FWD_HEADER)
    rng = np.random.default_rng(1)
    for n in ([8192] if ARGS.quick else [8192, 16384]):
        forward_row("seed", n, SEED["h"], SEED["d"], SEED["segs"], SEED["rates"], True, repeats, rng)


def run_fwdbwd(repeats):
    if torch is None:
        print("\n(forward+backward: needs torch, skipped)")
        return
    table("Forward + backward against torch autograd",
          ["config", "n", "h", "d", "causal", "ringattn ms", "torch ms", "ringattn GFLOP/s", "torch GFLOP/s",
           "ratio (torch time / ringattn time)", "ringattn % peak", "max abs diff (dq)"])
    gen = torch.Generator().manual_seed(3)
    cases = [("dense", n, 8, d, None, None, c) for d in (64, 128) for c in (False, True)
             for n in ([2048] if ARGS.quick else [2048, 4096])]
    cases.append(("seed", 8192, SEED["h"], SEED["d"], SEED["segs"], SEED["rates"], True))
    for name, n, h, d, segs, rates, causal in cases:
        segs, rates = segs or [n], rates or [1]
        x = [torch.randn(1, n, h, d, generator=gen) for _ in range(4)]
        g = x.pop()
        flops = 3.5 * 4.0 * d * attended_pairs(n, h, segs, rates, causal)

        def step(fn, leaves):
            for t in leaves:
                t.grad = None
            fn(*leaves).backward(g)
            return leaves[0].grad

        ours_in = [t.clone().requires_grad_() for t in x]
        ours = lambda a, b, c: rtorch.dilated_attention(a, b, c, segs, rates, causal=causal,  # noqa: E731
                                                        num_threads=THREADS)
        if name == "dense":  # SDPA on its native (b, h, n, d) layout
            peer_in = [t.transpose(1, 2).contiguous().requires_grad_() for t in x]
            gp = g.transpose(1, 2).contiguous()
            peer = lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=causal)  # noqa: E731
            run_peer = lambda: step_peer(peer, peer_in, gp)  # noqa: E731
        else:
            peer_in = [t.clone().requires_grad_() for t in x]
            gp = g
            peer = lambda a, b, c: torch_dilated_groups(a, b, c, segs, rates, causal)  # noqa: E731
            run_peer = lambda: step_peer(peer, peer_in, gp)  # noqa: E731
        dq_ours = step(ours, ours_in)
        dq_peer = run_peer()
        if name == "dense":
            dq_peer = dq_peer.transpose(1, 2)
        err = float((dq_ours - dq_peer).abs().max())
        if err > 1e-3:
            raise SystemExit(f"fwdbwd {name} n={n} d={d}: dq of ringattn and torch disagree ({err:.2e})")
        t_ours = bench(lambda: step(ours, ours_in), repeats)
        t_peer = bench(run_peer, repeats)
        g_ours, g_peer = flops / t_ours / 1e9, flops / t_peer / 1e9
        ROWS.append(dict(part=f"fwdbwd-{name}", n=n, h=h, d=d, causal=causal, flops=flops, t_ringattn=t_ours,
                         t_peer=t_peer, gflops_ringattn=g_ours, gflops_peer=g_peer, ratio=t_peer / t_ours,
                         max_abs_diff=err))
        row([name, n, h, d, causal, f"{t_ours * 1e3:.1f}", f"{t_peer * 1e3:.1f}", f"{g_ours:.0f}",
             f"{g_peer:.0f}", f"**{t_peer / t_ours:.2f}x**", pct(g_ours), f"{err:.1e}"])


def step_peer(fn, leaves, g):
    for t in leaves:
        t.grad = None
    fn(*leaves).backward(g)
    return leaves[0].grad


def run_tiny(repeats):
    shape = (1, 64, 4, 32)
    calls = 200 if ARGS.quick else 1000
    table(f"Per-call latency, shape {shape} fp32 (median of {calls} calls, best of {repeats} rounds)",
          ["call", "µs", f"ratio ({PEER} / this)"])
    rng = np.random.default_rng(4)
    q, k, v = (rand(rng, shape) for _ in range(3))

    def per_call(fn):
        best = math.inf
        for _ in range(repeats):
            fn()
            ts = []
            for _ in range(calls):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            best = min(best, statistics.median(ts))
        return best

    n = shape[1]
    if torch is not None:
        hq, hk, hv = (torch.from_numpy(x).transpose(1, 2).contiguous() for x in (q, k, v))
        tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
        t_peer = per_call(lambda: F.scaled_dot_product_attention(hq, hk, hv))
        peer_name = "torch SDPA (torch tensors)"
    else:
        t_peer = per_call(lambda: numpy_dilated_groups(q, k, v, [n], [1], False))
        peer_name = "NumPy"
    entries = [("ringattn.dilated_attention (NumPy arrays)",
                lambda: ringattn.dilated_attention(q, k, v, [n], [1], num_threads=THREADS))]
    if torch is not None:
        entries.append(("ringattn.torch.dilated_attention (torch tensors)",
                        lambda: rtorch.dilated_attention(tq, tk, tv, [n], [1], num_threads=THREADS)))
    row([peer_name, f"{t_peer * 1e6:.1f}", "1.00x"])
    for name, fn in entries:
        t = per_call(fn)
        ROWS.append(dict(part="tiny", call=name, t_ringattn=t, t_peer=t_peer, ratio=t_peer / t))
        row([name, f"{t * 1e6:.1f}", f"**{t_peer / t:.2f}x**"])


def plot(path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, causal in zip(axes, (False, True)):
        for d, style in ((64, "--"), (128, "-")):
            rows = [r for r in ROWS if r["part"] == "dense" and r["d"] == d and r["causal"] == causal]
            if not rows:
                continue
            ns = [r["n"] for r in rows]
            ax.plot(ns, [r["gflops_ringattn"] for r in rows], "o" + style, color="C0", label=f"ringattn d={d}")
            ax.plot(ns, [r["gflops_peer"] for r in rows], "s" + style, color="C1", label=f"{PEER} d={d}")
        if PEAK.get("all"):
            ax.axhline(PEAK["all"], color="k", lw=1, label=f"FMA peak ({PEAK['all']:.0f})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length n")
        ax.set_title(f"dense forward, {'causal' if causal else 'non-causal'}, fp32, {THREADS} threads")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("GFLOP/s")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"\nwrote {path}", file=sys.stderr)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main():
    repeats = ARGS.repeats or (3 if ARGS.quick else 5)
    parts = ARGS.only or list(PARTS)
    PEAK["one"], PEAK["all"] = fma_peak(THREADS)
    isa = ringattn.cpu_isa() if hasattr(ringattn, "cpu_isa") else "?"
    print("# ringattn CPU benchmark\n")
    print(f"{cpu_name()}, {os.cpu_count()} cpus, {THREADS} threads on both sides; "
          f"python {platform.python_version()}, numpy {np.__version__}, "
          f"torch {torch.__version__ if torch else 'absent'}, ringattn {ringattn.__version__} (CPU kernels: {isa}); "
          f"fp32; best of {repeats} after a warm-up.")
    if PEAK["all"]:
        print(f"Measured fp32 FMA peak (benchmarks/fma_peak.c): {PEAK['one']:.0f} GFLOP/s on 1 thread, "
              f"{PEAK['all']:.0f} on {THREADS}.")
    for part in PARTS:
        if part in parts:
            globals()[f"run_{part}"](repeats)
    if ARGS.json:
        meta = dict(python=platform.python_version(), numpy=np.__version__, torch=torch.__version__ if torch else None,
                    machine=platform.machine(), cpus=os.cpu_count(), threads=THREADS, repeats=repeats,
                    quick=ARGS.quick, peer=PEER, fma_peak_1=PEAK["one"], fma_peak_all=PEAK["all"], isa=isa)
        with open(ARGS.json, "w") as f:
            json.dump(dict(meta=meta, rows=ROWS), f, indent=2)
        print(f"\nwrote {ARGS.json}", file=sys.stderr)
    if ARGS.plot:
        plot(ARGS.plot)


if __name__ == "__main__":
    main()
