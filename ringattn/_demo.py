"""The main job: ring dilated attention on the seed's benchmark configuration.

For each sequence length and world size it runs the in-process ring and
prints time, peak memory per rank, bytes sent per rank and the largest
difference from the single-rank output -- the table the misnamed
"RingDistributedDilatedAttention" could not produce, because its per-rank
memory never fell with the number of ranks.
"""

import argparse
import time

import numpy as np

from ._api import RingDilatedAttention

# The seed analysis's configuration (docs/benchmarks.md has its numbers).
DEFAULTS = dict(batch=1, heads=12, head_dim=64, segment_lengths=[2048, 4096], dilation_rates=[1, 2],
                seq_lens=[4096, 8192, 16384, 32768], world_sizes=[1, 2, 4], dtype="float32")


def _ints(text):
    return [int(x) for x in text.split(",") if x]


def parser():
    p = argparse.ArgumentParser(
        prog="python -m ringattn",
        description="Ring dilated attention demo: per-rank memory falls as 1/k and the output "
                    "equals the single-rank result.  Defaults are the seed configuration "
                    "(12 heads, head dim 64, segments 2048,4096, rates 1,2, causal, fp32, batch 1).")
    p.add_argument("--seq-lens", type=_ints, default=DEFAULTS["seq_lens"], metavar="N,N,...",
                   help="sequence lengths (default 4096,8192,16384,32768)")
    p.add_argument("--world-sizes", type=_ints, default=DEFAULTS["world_sizes"], metavar="K,K,...",
                   help="numbers of ranks (default 1,2,4); 1 is always run as the reference")
    p.add_argument("--segment-lengths", type=_ints, default=DEFAULTS["segment_lengths"], metavar="S,S,...")
    p.add_argument("--dilation-rates", type=_ints, default=DEFAULTS["dilation_rates"], metavar="R,R,...")
    p.add_argument("--heads", type=int, default=DEFAULTS["heads"])
    p.add_argument("--head-dim", type=int, default=DEFAULTS["head_dim"])
    p.add_argument("--batch", type=int, default=DEFAULTS["batch"])
    p.add_argument("--mode", choices=["groups", "longnet"], default="groups")
    p.add_argument("--no-causal", dest="causal", action="store_false", help="non-causal attention")
    p.add_argument("--dtype", choices=["float32", "float16"], default=DEFAULTS["dtype"])
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--repeat", type=int, default=1, help="runs per point; the fastest is shown")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mpi", action="store_true",
                   help="one rank per MPI process (run under mpirun -n K); each rank holds only its "
                        "shard, rank 0 prints the table and checks against a single-process run")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="with --mpi: skip the single-process comparison on rank 0")
    return p


def run(args):
    rng = np.random.default_rng(args.seed)
    world_sizes = sorted(set([1] + list(args.world_sizes)))
    print(f"ringattn demo: b={args.batch} h={args.heads} d={args.head_dim} "
          f"segments={args.segment_lengths} rates={args.dilation_rates} mode={args.mode} "
          f"causal={args.causal} dtype={args.dtype}")
    header = f"{'n':>7} {'ranks':>5} {'ms':>9} {'peak MB/rank':>13} {'MB sent/rank':>13} {'max |diff| vs 1 rank':>21}"
    print(header)
    print("-" * len(header))
    rows = []
    for n in args.seq_lens:
        shape = (args.batch, n, args.heads, args.head_dim)
        q, k, v = (rng.standard_normal(shape, dtype=np.float32).astype(args.dtype) for _ in range(3))
        reference = None
        for ws in world_sizes:
            attn = RingDilatedAttention(args.segment_lengths, args.dilation_rates, causal=args.causal,
                                        mode=args.mode, world_size=ws, num_threads=args.threads)
            best = float("inf")
            for _ in range(max(1, args.repeat)):
                t0 = time.perf_counter()
                out = attn(q, k, v)
                best = min(best, time.perf_counter() - t0)
            if reference is None:
                reference = out.astype(np.float32)
            diff = float(np.max(np.abs(out.astype(np.float32) - reference)))
            peak = max(attn.last_stats["peak_bytes"]) / 2**20
            sent = max(attn.last_stats["bytes_sent"]) / 2**20
            rows.append(dict(n=n, ranks=ws, ms=best * 1e3, peak_mb=peak, sent_mb=sent, max_diff=diff))
            print(f"{n:>7} {ws:>5} {best * 1e3:>9.1f} {peak:>13.1f} {sent:>13.1f} {diff:>21.2e}", flush=True)
    return rows


def run_mpi(args):
    from ._api import gather_sequence
    from ._comm import Communicator

    comm = Communicator.mpi()
    k, rank = comm.world_size, comm.rank
    if rank == 0:
        print(f"ringattn demo over MPI: {k} processes, b={args.batch} h={args.heads} d={args.head_dim} "
              f"segments={args.segment_lengths} rates={args.dilation_rates} mode={args.mode} "
              f"causal={args.causal} dtype={args.dtype}")
        header = f"{'n':>7} {'ranks':>5} {'ms':>9} {'peak MB/rank':>13} {'MB sent/rank':>13} {'max |diff| vs 1 rank':>21}"
        print(header)
        print("-" * len(header), flush=True)
    rows = []
    for n in args.seq_lens:
        L = n // k
        rng = np.random.default_rng([args.seed, n, rank])  # this rank's shard only
        shape = (args.batch, L, args.heads, args.head_dim)
        q, kk, v = (rng.standard_normal(shape, dtype=np.float32).astype(args.dtype) for _ in range(3))
        attn = RingDilatedAttention(args.segment_lengths, args.dilation_rates, causal=args.causal,
                                    mode=args.mode, num_threads=args.threads, comm=comm)
        best = float("inf")
        for _ in range(max(1, args.repeat)):
            gather_sequence(np.zeros((1, 1), np.uint8), comm=comm)  # line the ranks up
            t0 = time.perf_counter()
            out = attn(q, kk, v)
            best = min(best, time.perf_counter() - t0)
        stats = np.array([best, attn.last_stats["peak_bytes"][0], attn.last_stats["bytes_sent"][0]])
        every = gather_sequence(stats[None, None], comm=comm)[0]  # (k, 3)
        diff = float("nan")
        if args.check:
            full = [gather_sequence(x, comm=comm) for x in (q, kk, v, out)]
            if rank == 0:
                single = RingDilatedAttention(args.segment_lengths, args.dilation_rates, causal=args.causal,
                                              mode=args.mode, num_threads=args.threads)(*full[:3])
                diff = float(np.max(np.abs(full[3].astype(np.float32) - single.astype(np.float32))))
        ms, peak, sent = every[:, 0].max() * 1e3, every[:, 1].max() / 2**20, every[:, 2].max() / 2**20
        rows.append(dict(n=n, ranks=k, ms=ms, peak_mb=peak, sent_mb=sent, max_diff=diff))
        if rank == 0:
            print(f"{n:>7} {k:>5} {ms:>9.1f} {peak:>13.1f} {sent:>13.1f} {diff:>21.2e}", flush=True)
    comm.close()
    return rows


def main(argv=None):
    args = parser().parse_args(argv)
    run_mpi(args) if args.mpi else run(args)
    return 0
