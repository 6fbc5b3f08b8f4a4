"""The exact per-rank peak that ringattn's memory accounting must report.

Derived from the code, term by term, so that a test can compare
``last_stats["peak_bytes"]`` with equality rather than a band: a buffer
left out of the accounting (or counted twice) changes the peak by its size.

Per rank, with L = n / k, u = b * L * h * d elements and T = max(1,
num_threads // k) threads (ranks share the call's threads, ring/ranks.c):

* kernel workspaces, allocated when the CPU backend opens (cpu/backend.c):
  T * ra_workspace_bytes(d) (kernel.c; float64: 8 d bytes, double.c), and in
  a float16/float32 backward also T * ra_bwd_workspace_bytes(d) (backward.c);
* ring/driver.c, rank_open: the caller's shards it holds (ra_hold) -- forward:
  q, k, v, o (4 u items) and the lse when requested; backward: q, k, v, o,
  dout, dq, dk, dv (8 u items) and the lse -- plus the task list
  (b h max(1, L / S over local branches) ra_attend_task of 96 bytes) and the
  copy list (b h ra_copy_task of 24 bytes);
* ring_forward: accumulator (u) and lse state (b h L), in accumulator
  elements (4 bytes, 8 for float64: ra_acc_size); ring_backward: dQ, dK, dV
  accumulators (3 u) and delta (b h L);
* for each spanning branch in turn (allocated and freed per branch, so the
  largest counts): the two ring slots of ring/stream.c.  A block (a rank's
  packed active keys and values of the branch: one run per head, E = h_b
  heads) travels in sub-blocks, with S sub-blocks wanted (exec.ring_sub_blocks:
  8 on the CPU) and at most R = ceil(L / r) active keys per head in a shard:
  if E >= S, a sub-block is floor(E / S) consecutive heads whole; else one
  head's keys t*rows .. (t+1)*rows - 1 with rows = ceil(R / ceil(S / E)).
  Each slot is as large as the largest sub-block of the sub-ring's blocks,
      slot = 2 b d * max over the sub-ring's ranks and sub-blocks of the
             active keys in the sub-block
  elements of the input dtype, plus as many accumulator elements in the
  backward (the dK/dV that travel with it); the rank holds 2 slots.
  For dense attention (r = 1, all h heads, S | h or h | S, S | L): 2 slots
  of 2 b h d L / S elements, i.e. 4 u / S input elements forward (0.5 u at
  S = 8) and 4 u (es + acc) / (S es) backward.

Everything else is held from the start to the end of the rank's call, so
the peak is the sum of the fixed terms and the largest ring-buffer pair.
The workspace sizes mirror kernel.c's and backward.c's constants and
struct layouts; a test that measures the per-thread difference checks them.
"""

import numpy as np

from reference import group_head_ranges, longnet_offset

ATTEND_TASK_BYTES = 96  # sizeof(ra_attend_task): 12 int64_t (ring/backend.h)
COPY_TASK_BYTES = 24    # sizeof(ra_copy_task): 3 int64_t


def _pad16(d):
    return (d + 15) // 16 * 16


def forward_workspace_bytes(d, dtype):
    """ra_workspace_bytes (kernel.c, of the ISA variant a default call runs:
    ringattn.cpu_isa()), or ra_f64_workspace_bytes (double.c)."""
    if np.dtype(dtype) == np.float64:
        return 8 * d
    import ringattn

    QB = 64 if ringattn.cpu_isa()["selected"] == "avx512" else 16  # queries per micro-tile (micro.h)
    BQ, BK = 256, 96
    ld = _pad16(d) if _pad16(d) // 16 % 2 else _pad16(d) + 16  # row_stride: an odd number of lines
    floats = 2 * BQ * d + BK * QB + 2 * BK * ld + d + 3 * BQ
    struct = 2 * 8 + 9 * 8  # int64_t d, ld; nine float pointers
    return struct + 64 + floats * 4 + 9 * 64


def backward_workspace_bytes(d, dtype):
    """ra_bwd_workspace_bytes (backward.c); the float64 backward has none."""
    if np.dtype(dtype) == np.float64:
        return 0
    dp, KB, QT = _pad16(d), 64, 64
    QC = min(512, max(QT, 32768 // dp // QT * QT))  # chunk_rows(dp)
    QLD = QC + 16
    floats = 3 * QC * dp + 2 * dp * QLD + 2 * QC + 4 * KB * dp + 2 * KB * QT + KB
    struct = 3 * 8 + 14 * 8  # int64_t dp, qc, qld; fourteen buffer pointers
    return (struct + 63) // 64 * 64 + floats * 4


def _branches(n, h, segs, rates, mode):
    """(S, r, {head: offset}) per branch, as plan.c derives them."""
    G = len(segs)
    ranges = group_head_ranges(h, G) if mode == "groups" else [(0, h)] * G
    out = []
    for i, (s, r) in enumerate(zip(segs, rates)):
        lo, hi = ranges[i]
        offsets = {hh: (i % r if mode == "groups" else longnet_offset(hh, h, r)) for hh in range(lo, hi)}
        out.append((min(s, n), r, offsets))
    return out


def peak_terms(shape, dtype, segs, rates, mode, world_size, num_threads, *, backward=False, lse=False,
               sub_blocks=8):
    """The terms of every rank's peak: (fixed terms as a dict, [ring-buffer pair bytes per rank])."""
    b, n, h, d = shape
    k = world_size
    L, T = n // k, max(1, num_threads // k)
    es = np.dtype(dtype).itemsize
    acc = 8 if np.dtype(dtype) == np.float64 else 4
    u = b * L * h * d
    branches = _branches(n, h, segs, rates, mode)
    max_windows = max([1] + [L // S for S, _, _ in branches if L % S == 0])
    fixed = {"workspaces": T * forward_workspace_bytes(d, dtype)
             + (T * backward_workspace_bytes(d, dtype) if backward else 0),
             "task list": b * h * max_windows * ATTEND_TASK_BYTES,
             "copy list": b * h * COPY_TASK_BYTES}
    if backward:
        fixed["shards (8) and lse"] = 8 * u * es + b * h * L * acc
        fixed["dq, dk, dv accumulators"] = 3 * u * acc
        fixed["delta"] = b * h * L * acc
    else:
        fixed["shards (4)" + (" and lse" if lse else "")] = 4 * u * es + (b * h * L * acc if lse else 0)
        fixed["accumulator"] = u * acc
        fixed["lse state"] = b * h * L * acc
    ring = []
    for rank in range(k):
        largest = 0
        for S, r, offsets in branches:
            if L % S == 0:
                continue  # local: no buffers
            m = S // L
            group0 = rank - rank % m
            most, E = -(-L // r), len(offsets)
            if E >= sub_blocks:  # groups of whole heads
                per = E // sub_blocks
                parts = [(list(range(e, min(E, e + per))), 0, most) for e in range(0, E, per)]
            else:  # runs of rows of one head
                rows = -(-most // -(-sub_blocks // E))
                parts = [([e], t, rows) for e in range(E) for t in range(0, most, rows)]
            cap = 0
            for p in range(group0, group0 + m):
                pos = np.arange(p * L, (p + 1) * L) % S % r
                counts = [int((pos == off).sum()) for off in offsets.values()]  # heads in order
                for heads, first, rows in parts:
                    keys = sum(max(0, min(rows, counts[e] - first)) for e in heads)
                    cap = max(cap, 2 * b * d * keys)
            largest = max(largest, 2 * cap * (es + (acc if backward else 0)))
        ring.append(largest)
    return fixed, ring


def expected_peaks(*args, **kwargs):
    """Every rank's exact peak_bytes (see peak_terms)."""
    fixed, ring = peak_terms(*args, **kwargs)
    total = sum(fixed.values())
    return [total + x for x in ring]
