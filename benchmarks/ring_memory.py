"""Per-rank memory and time of the in-process ring (ring/stream.c).

--memory: dense causal attention (one segment over the whole sequence) at
k = 1, 2, 4, 8 in-process ranks; per k the largest per-rank peak
(last_stats["peak_bytes"]), in MB, in units of n/k (u = b * n/k * h * d *
itemsize, one rank's shard of q) and as a ratio to k = 1 next to the 1.2/k
target, and the ring buffers in flight (last_stats["ring_buffer_bytes"]).

--timing: the minimum of --repeat runs (wall time, and the process's CPU
time, which a loaded machine disturbs less) of dense causal and the seed
configuration (h=12, d=64, segments [2048, 4096], rates [1, 2]) at the ring
sizes where a branch spans ranks.  The sub-block count comes from
RINGATTN_RING_SUB_BLOCKS (read once per process), so ring_stream.sh runs
this script alternately with 1 (whole blocks, the previous path) and the
default 8 and reports the ratios.

One JSON line per measurement; --memory also prints a markdown table.
"""

import argparse
import json
import os
import time

import numpy as np

import ringattn

SEED = dict(heads=12, head_dim=64, segs=[2048, 4096], rates=[1, 2])


def _qkv(n, h, d, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, n, h, d), dtype=np.float32) for _ in range(3)]


def memory(n, h, d, threads):
    q, k, v = _qkv(n, h, d)
    rows = []
    for ws in (1, 2, 4, 8):
        attn = ringattn.RingDilatedAttention([n], [1], causal=True, world_size=ws, num_threads=threads)
        attn(q, k, v)
        peak = max(attn.last_stats["peak_bytes"])
        unit = q.nbytes // ws
        rows.append(dict(bench="ring_memory", n=n, heads=h, head_dim=d, ranks=ws, peak_mb=peak / 2**20,
                         units=peak / unit, in_flight_mb=max(attn.last_stats["ring_buffer_bytes"]) / 2**20,
                         in_flight_units=max(attn.last_stats["ring_buffer_bytes"]) / unit))
        print(json.dumps(rows[-1]), flush=True)
    one = rows[0]["peak_mb"]
    print(f"\nDense causal attention, in-process ring, n={n}, h={h}, d={d}, float32, {threads} threads "
          f"(u = one unit of n/k = b*(n/k)*h*d*4 bytes)\n")
    print("| ranks k | peak MB/rank | units of n/k | peak vs k=1 | target 1.2/k | in flight MB | in flight units |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["peak_mb"] / one
        print(f"| {r['ranks']} | {r['peak_mb']:.1f} | {r['units']:.2f} | {ratio:.3f} | "
              f"{1.2 / r['ranks']:.3f} | {r['in_flight_mb']:.2f} | {r['in_flight_units']:.2f} |")


def timing(repeat, threads):
    sub = os.environ.get("RINGATTN_RING_SUB_BLOCKS", "") or "default"
    cases = [("dense-causal", 4096, [4096], [1], 12, 64, (1, 2, 4)),
             ("seed", 8192, SEED["segs"], SEED["rates"], SEED["heads"], SEED["head_dim"], (1, 4))]
    for name, n, segs, rates, h, d, worlds in cases:
        q, k, v = _qkv(n, h, d)
        for ws in worlds:
            attn = ringattn.RingDilatedAttention(segs, rates, causal=True, world_size=ws, num_threads=threads)
            attn(q, k, v)  # warm-up
            best = cpu = float("inf")
            for _ in range(repeat):
                t0, c0 = time.perf_counter(), time.process_time()
                attn(q, k, v)
                best = min(best, time.perf_counter() - t0)
                cpu = min(cpu, time.process_time() - c0)
            print(json.dumps(dict(bench="ring_timing", config=name, n=n, ranks=ws, sub_blocks=sub, ms=best * 1e3,
                                  cpu_ms=cpu * 1e3, peak_mb=max(attn.last_stats["peak_bytes"]) / 2**20)),
                  flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--memory", action="store_true")
    p.add_argument("--timing", action="store_true")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.memory or not args.timing:
        memory(args.seq_len, args.heads, args.head_dim, args.threads)
    if args.timing:
        timing(args.repeat, args.threads)


if __name__ == "__main__":
    main()
