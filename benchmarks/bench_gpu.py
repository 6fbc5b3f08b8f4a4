"""GPU timings of ringattn against PyTorch on the same device, in one run.

    python benchmarks/bench_gpu.py [--budget 150] [--json bench.json] [--table table.txt]

(a) dense attention (segment = n, rate 1), bf16, d = 64 and 128, n = 4096,
    8192, 16384, b*h*n = 2^19 tokens*heads (h = 16), causal and not, against
    torch.nn.functional.scaled_dot_product_attention restricted to the flash
    backend: TFLOP/s counted as 4*b*h*n*n*d (halved when causal) and the
    ratio ringattn / SDPA.
(b) the seed configuration (h = 12, d = 64, segment_lengths [2048, 4096],
    dilation_rates [1, 2], causal, groups mode), bf16, against a PyTorch
    implementation of the same semantics (per branch and head group, gather
    the dilated tokens of every segment and call SDPA on them); the outputs
    are compared as well.
(c) the one-GPU ring at k = 1, 2, 4, 8 ranks: time and device bytes per rank
    (ring statistics from the core).
(d) the dense backward, bf16, d = 64 and 128, n = 8192 and 16384, causal and
    not, against SDPA's flash backward (torch.autograd.grad of a forward
    kept for it): TFLOP/s counted as 2.5x the forward's FLOPs, ratio SDPA /
    ringattn, and the gradients' largest error relative to SDPA's.  ringattn
    runs through the public dilated_attention_backward on the torch tensors
    (DLPack parsing and three gradient allocations included).

Times are medians over repeats measured with CUDA events around each call
(the ringattn call is synchronous, so its time includes returning to the
host).  ringattn is called through ringattn.cuda_forward_ptr on the torch
tensors' pointers (the public API adds the DLPack parsing, reported once as
"api overhead").  Cases that would overrun --budget seconds are skipped and
reported as such.
"""

import argparse
import json
import statistics
import sys
import time

import numpy as np

import ringattn

SEED_CFG = dict(h=12, d=64, segs=[2048, 4096], rates=[1, 2], causal=True, mode="groups")


class Budget:
    def __init__(self, seconds):
        self.t0 = time.perf_counter()
        self.seconds = seconds

    def left(self):
        return self.seconds - (time.perf_counter() - self.t0)


def time_ms(torch, fn, budget, target_s=0.4, min_reps=5, max_reps=30):
    """Median milliseconds of fn() by CUDA events; (median, repeats)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    t0 = time.perf_counter()
    while len(times) < max_reps:
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        spent = time.perf_counter() - t0
        if len(times) >= min_reps and (spent > target_s or budget.left() < 0):
            break
    return statistics.median(times), len(times)


def rel_err(a, b):
    a = a.float()
    b = b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


def ra_call(t_q, t_k, t_v, t_o, segs, rates, causal, mode="groups", world_size=1):
    b, n, h, d = t_q.shape
    return ringattn.cuda_forward_ptr(t_q.data_ptr(), t_k.data_ptr(), t_v.data_ptr(), t_o.data_ptr(), (b, n, h, d),
                                     "bfloat16", segs, rates, causal=causal, mode=mode, world_size=world_size)


def group_ranges(h, G):
    out, begin = [], 0
    for i in range(G):
        size = h // G + (1 if i < h % G else 0)
        out.append((begin, begin + size))
        begin += size
    return out


def torch_dilated_groups(torch, q, k, v, segs, rates, causal, out):
    """The groups-mode semantics in PyTorch: branch i takes head group i with
    offset i mod r_i; within each segment of length S the tokens
    o, o + r, o + 2r, ... attend to each other (causally if asked), the rest
    of the group's outputs are 0."""
    F = torch.nn.functional
    b, n, h, d = q.shape
    out.zero_()
    for i, ((h0, h1), s, r) in enumerate(zip(group_ranges(h, len(segs)), segs, rates)):
        S = min(s, n)
        off = i % r
        hg = h1 - h0

        def gather(x):  # (b, n, h, d) -> (b * n/S, hg, S/r, d), a strided view where possible
            y = x.view(b, n // S, S, h, d)[:, :, off::r, h0:h1]
            return y.reshape(b * (n // S), S // r, hg, d).transpose(1, 2)

        o = F.scaled_dot_product_attention(gather(q), gather(k), gather(v), is_causal=causal)
        out.view(b, n // S, S, h, d)[:, :, off::r, h0:h1] = o.transpose(1, 2).reshape(b, n // S, S // r, hg, d)
    return out


def bench_dense(torch, budget, results, log):
    F = torch.nn.functional
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        flash_ctx = lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)  # noqa: E731
    except ImportError:  # older torch
        flash_ctx = lambda: torch.backends.cuda.sdp_kernel(enable_flash=True, enable_math=False,  # noqa: E731
                                                            enable_mem_efficient=False)
    for d in (64, 128):
        for n in (4096, 8192, 16384):
            for causal in (False, True):
                h = 16
                b = max(1, 2 ** 19 // (h * n))
                row = dict(d=d, n=n, b=b, h=h, causal=causal)
                results.append(row)
                if budget.left() < 5:
                    row["skipped"] = "budget"
                    continue
                g = torch.Generator(device="cuda").manual_seed(n + d)
                q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
                           for _ in range(3))
                o = torch.empty_like(q)
                flops = 4 * b * h * n * n * d * (0.5 if causal else 1.0)
                try:
                    ms, reps = time_ms(torch, lambda: ra_call(q, k, v, o, [n], [1], causal), budget)
                    row.update(ra_ms=ms, ra_tflops=flops / ms / 1e9, ra_reps=reps)
                except Exception as e:  # noqa: BLE001
                    row["ra_error"] = f"{type(e).__name__}: {e}"
                qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # (b, h, n, d) views, same memory
                try:
                    with flash_ctx():
                        ref = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
                        ms, reps = time_ms(torch, lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal),
                                           budget)
                    row.update(sdpa_ms=ms, sdpa_tflops=flops / ms / 1e9, sdpa_reps=reps)
                    if "ra_ms" in row:
                        row["ratio"] = row["sdpa_ms"] / row["ra_ms"]
                        row["max_rel_err_vs_sdpa"] = rel_err(o, ref.transpose(1, 2))
                except Exception as e:  # noqa: BLE001
                    row["sdpa_error"] = f"{type(e).__name__}: {e}"
                log(f"dense {row}")
                q = k = v = o = ref = qt = kt = vt = None
                torch.cuda.empty_cache()


def bench_seed(torch, budget, results, log):
    c = SEED_CFG
    for n in (16384, 32768):
        b = 1
        row = dict(n=n, b=b, **{k: c[k] for k in ("h", "d", "segs", "rates", "causal", "mode")})
        results.append(row)
        if budget.left() < 5:
            row["skipped"] = "budget"
            continue
        g = torch.Generator(device="cuda").manual_seed(n)
        q, k, v = (torch.randn(b, n, c["h"], c["d"], device="cuda", dtype=torch.bfloat16, generator=g)
                   for _ in range(3))
        o_ra, o_pt = torch.empty_like(q), torch.empty_like(q)
        try:
            ms, reps = time_ms(torch, lambda: ra_call(q, k, v, o_ra, c["segs"], c["rates"], c["causal"]), budget)
            row.update(ra_ms=ms, ra_reps=reps)
        except Exception as e:  # noqa: BLE001
            row["ra_error"] = f"{type(e).__name__}: {e}"
        try:
            ms, reps = time_ms(torch, lambda: torch_dilated_groups(torch, q, k, v, c["segs"], c["rates"], c["causal"],
                                                                   o_pt), budget)
            row.update(torch_ms=ms, torch_reps=reps)
        except Exception as e:  # noqa: BLE001
            row["torch_error"] = f"{type(e).__name__}: {e}"
        if "ra_ms" in row and "torch_ms" in row:
            row["speedup"] = row["torch_ms"] / row["ra_ms"]
            row["max_rel_err_vs_torch"] = rel_err(o_ra, o_pt)
        if n == 16384 and "ra_ms" in row:  # the public API on torch tensors (DLPack) once
            t0 = time.perf_counter()
            reps = 5
            for _ in range(reps):
                ringattn.dilated_attention(q, k, v, c["segs"], c["rates"], causal=c["causal"], out=o_ra)
            torch.cuda.synchronize()
            row["api_ms"] = (time.perf_counter() - t0) / reps * 1e3
        log(f"seed {row}")
        q = k = v = o_ra = o_pt = None
        torch.cuda.empty_cache()


def bench_ring(torch, budget, results, log):
    configs = [
        ("seed", 1, 32768, SEED_CFG["h"], SEED_CFG["d"], SEED_CFG["segs"], SEED_CFG["rates"], True),
        ("dense", 1, 16384, 16, 128, [16384], [1], True),
    ]
    for name, b, n, h, d, segs, rates, causal in configs:
        g = torch.Generator(device="cuda").manual_seed(7)
        q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
        o = torch.empty_like(q)
        base = None
        for world in (1, 2, 4, 8):
            row = dict(config=name, b=b, n=n, h=h, d=d, segs=segs, rates=rates, causal=causal, world_size=world)
            results.append(row)
            if budget.left() < 3:
                row["skipped"] = "budget"
                continue
            try:
                holder = {}

                def call():
                    holder["stats"] = ra_call(q, k, v, o, segs, rates, causal, world_size=world)

                ms, reps = time_ms(torch, call, budget, target_s=0.25, min_reps=3)
                stats = holder["stats"]
                row.update(ms=ms, reps=reps,
                           peak_mb_per_rank=[s["peak_bytes"] / 2 ** 20 for s in stats],
                           sent_mb_per_rank=[s["bytes_sent"] / 2 ** 20 for s in stats],
                           steps=[s["steps"] for s in stats], steps_skipped=[s["steps_skipped"] for s in stats])
                if world == 1:
                    base = o.clone()
                elif base is not None:
                    row["max_rel_err_vs_k1"] = rel_err(o, base)
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {e}"
            log(f"ring {row}")
        q = k = v = o = base = None
        torch.cuda.empty_cache()


def bench_backward(torch, budget, results, log):
    F = torch.nn.functional
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for d in (64, 128):
        for n in (8192, 16384):
            for causal in (False, True):
                h = 16
                b = max(1, 2 ** 18 // (h * n))
                row = dict(d=d, n=n, b=b, h=h, causal=causal)
                results.append(row)
                if budget.left() < 5:
                    row["skipped"] = "budget"
                    continue
                g = torch.Generator(device="cuda").manual_seed(3 * n + d)
                q, k, v, dout = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
                                 for _ in range(4))
                flops = 2.5 * 4 * b * h * n * n * d * (0.5 if causal else 1.0)
                grads = None
                try:
                    o, lse = ringattn.dilated_attention(q, k, v, [n], [1], causal=causal, return_lse=True)
                    o = torch.from_dlpack(o)
                    holder = {}

                    def call():
                        holder["g"] = ringattn.dilated_attention_backward(q, k, v, o, lse, dout, [n], [1],
                                                                          causal=causal)
                    ms, reps = time_ms(torch, call, budget)
                    grads = [torch.from_dlpack(x) for x in holder["g"]]
                    row.update(ra_ms=ms, ra_tflops=flops / ms / 1e9, ra_reps=reps)
                except Exception as e:  # noqa: BLE001
                    row["ra_error"] = f"{type(e).__name__}: {e}"
                try:
                    qt, kt, vt = (x.transpose(1, 2).detach().requires_grad_() for x in (q, k, v))
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        ot = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
                    gt = dout.transpose(1, 2)
                    ms, reps = time_ms(torch, lambda: torch.autograd.grad(ot, (qt, kt, vt), gt, retain_graph=True),
                                       budget)
                    row.update(sdpa_ms=ms, sdpa_tflops=flops / ms / 1e9, sdpa_reps=reps)
                    if grads is not None:
                        ref = torch.autograd.grad(ot, (qt, kt, vt), gt)
                        row["ratio"] = row["sdpa_ms"] / row["ra_ms"]
                        row["max_rel_err_vs_sdpa"] = max(rel_err(a, r.transpose(1, 2)) for a, r in zip(grads, ref))
                except Exception as e:  # noqa: BLE001
                    row["sdpa_error"] = f"{type(e).__name__}: {e}"
                log(f"backward {row}")
                q = k = v = o = dout = grads = qt = kt = vt = ot = None
                torch.cuda.empty_cache()


def fmt(x, spec):
    if isinstance(x, (int, float)):
        return format(x, spec)
    width = int(spec.split(".")[0] or 0)
    return format("-", f">{width}")


def sdpa_rows(title, rows):
    """The lines of a ringattn-vs-SDPA table (parts a and d)."""
    lines = [title, f"  {'d':>4} {'n':>6} {'b*h':>5} {'causal':>6} {'ra ms':>9} {'ra TF/s':>8} {'sdpa ms':>9} "
                    f"{'sdpa TF/s':>9} {'ratio':>6} {'err':>8}"]
    for r in rows:
        note = r.get("skipped") or r.get("ra_error") or r.get("sdpa_error") or ""
        lines.append(f"  {r['d']:>4} {r['n']:>6} {r['b'] * r['h']:>5} {str(r['causal']):>6} {fmt(r.get('ra_ms'), '9.3f')} "
                     f"{fmt(r.get('ra_tflops'), '8.1f')} {fmt(r.get('sdpa_ms'), '9.3f')} "
                     f"{fmt(r.get('sdpa_tflops'), '9.1f')} {fmt(r.get('ratio'), '6.2f')} "
                     f"{fmt(r.get('max_rel_err_vs_sdpa'), '8.1e')} {note[:60]}")
    return lines


def table(info, dense, seed, ring, backward=()):
    lines = [f"== ringattn GPU check: {info.get('gpu', '?')}, torch {info.get('torch', '?')} =="]
    lines += sdpa_rows("(a) dense bf16 vs SDPA flash   [TFLOP/s = 4bhn^2d (/2 causal) / time; "
                       "ratio = SDPA ms / ringattn ms]", dense)
    c = SEED_CFG
    lines.append(f"(b) seed config h={c['h']} d={c['d']} segs={c['segs']} rates={c['rates']} causal groups, bf16, "
                 "vs PyTorch (SDPA per branch/segment)")
    lines.append(f"  {'n':>6} {'ra ms':>9} {'torch ms':>9} {'speedup':>8} {'err':>8} {'api ms':>8}")
    for r in seed:
        note = r.get("skipped") or r.get("ra_error") or r.get("torch_error") or ""
        lines.append(f"  {r['n']:>6} {fmt(r.get('ra_ms'), '9.3f')} {fmt(r.get('torch_ms'), '9.3f')} "
                     f"{fmt(r.get('speedup'), '8.2f')} {fmt(r.get('max_rel_err_vs_torch'), '8.1e')} "
                     f"{fmt(r.get('api_ms'), '8.3f')} {note[:60]}")
    lines.append("(c) one-GPU ring: time, peak device MB per rank (max over ranks), MB sent per rank (max)")
    lines.append(f"  {'config':>6} {'n':>6} {'k':>2} {'ms':>9} {'peak MB':>9} {'sent MB':>9} {'err vs k=1':>10}")
    for r in ring:
        note = r.get("skipped") or r.get("error") or ""
        peak = max(r["peak_mb_per_rank"]) if r.get("peak_mb_per_rank") else None
        sent = max(r["sent_mb_per_rank"]) if r.get("sent_mb_per_rank") else None
        lines.append(f"  {r['config']:>6} {r['n']:>6} {r['world_size']:>2} {fmt(r.get('ms'), '9.3f')} "
                     f"{fmt(peak, '9.1f')} {fmt(sent, '9.1f')} {fmt(r.get('max_rel_err_vs_k1'), '10.1e')} {note[:60]}")
    if backward:
        lines += sdpa_rows("(d) dense backward bf16 vs SDPA flash backward   [TFLOP/s = 2.5 x forward FLOPs / time]",
                           backward)
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=150.0, help="seconds for all timings (cases beyond it are skipped)")
    p.add_argument("--json", default="bench.json")
    p.add_argument("--table", default=None, help="also write the table to this file")
    p.add_argument("--only", default="abcd", help="which parts to run: any of a, b, c, d")
    args = p.parse_args(argv)

    def log(msg):
        print(msg, flush=True)

    if ringattn.cuda_device_count() == 0:
        print("no CUDA device visible (ringattn.cuda_device_count() == 0): nothing to time")
        return 2
    try:
        import torch
    except ImportError:
        print("torch is not installed: the comparisons need it")
        return 2
    if not torch.cuda.is_available():
        print("torch sees no CUDA device")
        return 2
    budget = Budget(args.budget)
    info = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, numpy=np.__version__,
                python=sys.version.split()[0], budget_s=args.budget)
    dense, seed, ring, backward = [], [], [], []
    if "a" in args.only:
        bench_dense(torch, budget, dense, log)
    if "b" in args.only:
        bench_seed(torch, budget, seed, log)
    if "c" in args.only:
        bench_ring(torch, budget, ring, log)
    if "d" in args.only:
        bench_backward(torch, budget, backward, log)
    info["elapsed_s"] = round(time.perf_counter() - budget.t0, 1)
    with open(args.json, "w") as f:
        json.dump(dict(info=info, dense=dense, seed=seed, ring=ring, backward=backward), f, indent=1, default=float)
    text = table(info, dense, seed, ring, backward)
    if args.table:
        with open(args.table, "w") as f:
            f.write(text + "\n")
    print(text)
    errors = [r for r in dense + seed + ring + backward if any(k.endswith("error") for k in r)]
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
