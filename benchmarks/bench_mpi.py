"""One side of the MPI scaling benchmark; run it under mpirun (see mpi_scaling.sh).

Every rank builds only its shard of q, k, v, runs the ring over MPI (median
of --repeat timed runs after a warm-up, ranks lined up by an allgather
before each run) and rank 0 prints one JSON line per configuration with the
slowest rank's time, the largest per-rank peak and bytes sent, and the
bytes a plain ring -- one that sends every key and value to every rank --
would send per rank.  --partition picks the ring partition (contiguous or
zigzag) and --kv-heads the key/value heads (grouped-query attention; default:
the configuration's).
"""

import argparse
import json
import time

import numpy as np

import ringattn

CONFIGS = {
    # the seed analysis's configuration
    "seed": dict(heads=12, head_dim=64, segs=[2048, 4096], rates=[1, 2], causal=True),
    # plain causal ring attention: one segment over the whole sequence
    "dense-causal": dict(heads=12, head_dim=64, segs=None, rates=[1], causal=True),
    # grouped-query attention as current models use it: 32 query heads, 8 key/value heads
    "gqa": dict(heads=32, head_dim=64, segs=None, rates=[1], causal=True, kv_heads=8),
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", choices=sorted(CONFIGS), default="seed")
    p.add_argument("--seq-lens", default="8192,16384,32768")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--partition", choices=["contiguous", "zigzag"], default="contiguous")
    p.add_argument("--kv-heads", type=int, default=None)
    args = p.parse_args()
    comm = ringattn.Communicator.mpi()
    k, rank = comm.world_size, comm.rank
    cfg = CONFIGS[args.config]
    for n in (int(x) for x in args.seq_lens.split(",")):
        L = n // k
        rng = np.random.default_rng([n, rank])
        shape = (1, L, cfg["heads"], cfg["head_dim"])
        kv_heads = args.kv_heads or cfg.get("kv_heads", cfg["heads"])
        q = rng.standard_normal(shape, dtype=np.float32)
        kk, v = (rng.standard_normal(shape[:2] + (kv_heads, shape[3]), dtype=np.float32) for _ in range(2))
        segs = cfg["segs"] or [n]
        attn = ringattn.RingDilatedAttention(segs, cfg["rates"], causal=cfg["causal"], comm=comm,
                                             partition=args.partition)
        attn(q, kk, v)  # warm-up
        times = []
        for _ in range(args.repeat):
            ringattn.gather_sequence(np.zeros((1, 1), np.uint8), comm=comm)
            t0 = time.perf_counter()
            attn(q, kk, v)
            times.append(time.perf_counter() - t0)
        mine = np.array([[[np.median(times), attn.last_stats["peak_bytes"][0], attn.last_stats["bytes_sent"][0]]]])
        every = ringattn.gather_sequence(mine, comm=comm)[0]
        plain = (k - 1) * 2 * kk.nbytes  # every key and value shard to every other rank
        if rank == 0:
            print(json.dumps(dict(config=args.config, partition=args.partition, heads=cfg["heads"],
                                  kv_heads=kv_heads, n=n, ranks=k, ms=every[:, 0].max() * 1e3,
                                  peak_mb=every[:, 1].max() / 2**20, sent_mb=every[:, 2].max() / 2**20,
                                  plain_ring_sent_mb=plain / 2**20)), flush=True)
    comm.close()


if __name__ == "__main__":
    main()
