"""Float64 NumPy reference for ringattn, written from docs/semantics.md.

This module must not import ringattn.  Everything is computed in float64.

    reference_attention(q, k, v, segment_lengths, dilation_rates,
                        causal=False, mode="groups", scale=None) -> (o, lse)

q, k, v: (b, n, h, d) arrays of any float dtype (k and v may have h_kv heads
dividing h: grouped-query attention, query head i reading key/value head
i // (h // h_kv)).  Returns o float64 (b, n, h, d) and lse float64 (b, h, n),
with lse == -inf (and o == 0) where a query attends to nothing.
reference_backward gives dk, dv with k's heads: the sums over the query heads
that read each key/value head.

Also provided:
    dense_attention(q, k, v, causal=False, scale=None) -> (o, lse)
        plain softmax attention (independent code path).
    bruteforce_attention(...) -> (o, lse)
        the same function as reference_attention, evaluated query by query with
        Python loops directly from the wording of the spec (tiny sizes only).
"""

import math

import numpy as np

__all__ = [
    "effective_segments",
    "group_head_ranges",
    "longnet_offset",
    "head_cells",
    "reference_attention",
    "dense_attention",
    "bruteforce_attention",
    "attended_pairs",
    "reference_backward",
    "expand_kv",
]


def _as64(x):
    return np.asarray(x).astype(np.float64, copy=False)


def expand_kv(x, h):
    """Grouped-query attention: k or v with h_kv heads as h heads, key/value
    head j repeated for the h // h_kv query heads i with i // (h // h_kv) == j."""
    x = _as64(x)
    if x.ndim != 4 or h % x.shape[2]:
        raise ValueError(f"k/v with {x.shape[2] if x.ndim == 4 else '?'} heads cannot serve {h} query heads")
    return np.repeat(x, h // x.shape[2], axis=2)


def _fold_kv(g, h_kv):
    """dk or dv of the h query heads summed over each key/value head's readers."""
    b, n, h, d = g.shape
    return g.reshape(b, n, h_kv, h // h_kv, d).sum(axis=3)


def effective_segments(segment_lengths, dilation_rates, n):
    """[(S_i, r_i)] with S_i = min(s_i, n); checks the spec's rules."""
    seg = [int(s) for s in segment_lengths]
    rates = [int(r) for r in dilation_rates]
    if len(seg) != len(rates) or len(seg) < 1:
        raise ValueError("segment_lengths and dilation_rates must have the same length >= 1")
    out = []
    for s, r in zip(seg, rates):
        if s < 1 or r < 1:
            raise ValueError("segment lengths and dilation rates must be >= 1")
        S = min(s, n)
        if n % S != 0:
            raise ValueError(f"n={n} not divisible by segment {S}")
        if S % r != 0:
            raise ValueError(f"segment {S} not divisible by rate {r}")
        out.append((S, r))
    return out


def group_head_ranges(h, G):
    """Groups mode: [(begin, end)] of the G contiguous head groups."""
    if h < G:
        raise ValueError("groups mode needs h >= G")
    ranges = []
    begin = 0
    for i in range(G):
        size = h // G + (1 if i < h % G else 0)
        ranges.append((begin, begin + size))
        begin += size
    assert begin == h
    return ranges


def longnet_offset(head, h_total, r):
    """LongNet mode: offset of head `head` in a branch of rate r."""
    return head // (-(-h_total // r))  # h div ceil(H / r)


def head_cells(h, branches, mode):
    """For each head, the list of (branch index, offset) cells it uses."""
    G = len(branches)
    cells = [[] for _ in range(h)]
    if mode == "groups":
        for i, (lo, hi) in enumerate(group_head_ranges(h, G)):
            r = branches[i][1]
            for hh in range(lo, hi):
                cells[hh].append((i, i % r))
    elif mode == "longnet":
        for i, (_S, r) in enumerate(branches):
            for hh in range(h):
                cells[hh].append((i, longnet_offset(hh, h, r)))
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return cells


def _cell(q, k, v, h, S, r, off, causal, scale):
    """One branch cell (branch (S, r), head h, offset off) for all queries.

    Returns o (b, n, d) and lse (b, n); inactive queries give 0 / -inf.
    """
    b, n, _, d = q.shape
    o = np.zeros((b, n, d))
    lse = np.full((b, n), -np.inf)
    nseg = n // S
    local = np.arange(off, S, r)  # active positions inside a segment, increasing
    if local.size == 0:
        return o, lse
    pos = (np.arange(nseg)[:, None] * S + local[None, :])  # (nseg, m)
    qs = q[:, pos, h, :]  # (b, nseg, m, d)
    ks = k[:, pos, h, :]
    vs = v[:, pos, h, :]
    logits = scale * np.matmul(qs, np.swapaxes(ks, -1, -2))  # (b, nseg, m, m)
    if causal:
        m = local.size
        # positions are increasing along the segment, so p' <= p  <=>  j' <= j
        mask = np.tril(np.ones((m, m), dtype=bool))
        logits = np.where(mask, logits, -np.inf)
    mx = logits.max(axis=-1, keepdims=True)  # finite: the diagonal is always visible
    e = np.exp(logits - mx)
    den = e.sum(axis=-1, keepdims=True)
    o[:, pos, :] = np.matmul(e, vs) / den
    lse[:, pos] = (mx + np.log(den))[..., 0]
    return o, lse


def reference_attention(q, k, v, segment_lengths, dilation_rates, causal=False,
                        mode="groups", scale=None):
    q, k, v = _as64(q), _as64(k), _as64(v)
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
        raise ValueError("q, k, v must be (b, n, h, d) arrays, k and v of one shape")
    k, v = expand_kv(k, q.shape[2]), expand_kv(v, q.shape[2])
    if k.shape != q.shape:
        raise ValueError("k and v must have q's batch, length and head dim")
    b, n, h, d = q.shape
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    branches = effective_segments(segment_lengths, dilation_rates, n)
    cells = head_cells(h, branches, mode)

    o = np.zeros((b, n, h, d))
    lse = np.full((b, h, n), -np.inf)
    for hh in range(h):
        outs = [_cell(q, k, v, hh, branches[i][0], branches[i][1], off, causal, scale)
                for i, off in cells[hh]]
        if mode == "groups":
            (oi, li), = outs
            o[:, :, hh, :] = oi
            lse[:, hh, :] = li
            continue
        # longnet: combine by softmax denominators
        L = np.full((b, n), -np.inf)
        for _, li in outs:
            L = np.logaddexp(L, li)
        acc = np.zeros((b, n, d))
        fin = np.isfinite(L)
        for oi, li in outs:
            w = np.zeros((b, n))
            w[fin] = np.exp(li[fin] - L[fin])  # exp(-inf) = 0 for inactive branches
            acc += w[..., None] * oi
        o[:, :, hh, :] = acc
        lse[:, hh, :] = L
    return o, lse


def dense_attention(q, k, v, causal=False, scale=None):
    """Plain softmax attention over the whole sequence, float64."""
    q, k, v = _as64(q), _as64(k), _as64(v)
    b, n, h, d = q.shape
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal:
        s = np.where(np.tril(np.ones((n, n), dtype=bool)), s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    p = np.exp(s - m)
    z = p.sum(axis=-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", p / z, v)
    lse = (m + np.log(z))[..., 0]
    return o, lse


def bruteforce_attention(q, k, v, segment_lengths, dilation_rates, causal=False,
                         mode="groups", scale=None):
    """Query-by-query evaluation of the spec with Python loops (tiny sizes only)."""
    q, k, v = _as64(q), _as64(k), _as64(v)
    b, n, h, d = q.shape
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    branches = effective_segments(segment_lengths, dilation_rates, n)
    cells = head_cells(h, branches, mode)
    o = np.zeros((b, n, h, d))
    lse = np.full((b, h, n), -np.inf)
    for bb in range(b):
        for hh in range(h):
            for p in range(n):
                logits, vals = [], []  # multiset union over the head's cells
                for i, off in cells[hh]:
                    S, r = branches[i]
                    if (p % S) % r != off:
                        continue
                    for pk in range(n):
                        if (pk % S) % r != off or pk // S != p // S:
                            continue
                        if causal and pk > p:
                            continue
                        logits.append(scale * float(np.dot(q[bb, p, hh], k[bb, pk, hh])))
                        vals.append(v[bb, pk, hh])
                if not logits:
                    continue
                logits = np.array(logits)
                mx = logits.max()
                w = np.exp(logits - mx)
                o[bb, p, hh] = (w[:, None] * np.array(vals)).sum(0) / w.sum()
                lse[bb, hh, p] = mx + math.log(w.sum())
    return o, lse


def attended_pairs(n, h, segment_lengths, dilation_rates, causal=False, mode="groups"):
    """Number of attended (query, key) pairs summed over heads and cells (per batch)."""
    branches = effective_segments(segment_lengths, dilation_rates, n)
    cells = head_cells(h, branches, mode)
    total = 0
    for hh in range(h):
        for i, off in cells[hh]:
            S, r = branches[i]
            m = len(range(off, S, r))
            per_seg = m * (m + 1) // 2 if causal else m * m
            total += per_seg * (n // S)
    return total


def multiplicity(n, h, segment_lengths, dilation_rates, causal=False, mode="groups"):
    """M[head, p, p']: in how many of the head's cells query p attends key p'.

    The whole function is softmax attention weighted by M (a key in two
    longnet branches counts twice), which makes the gradient easy to write.
    """
    branches = effective_segments(segment_lengths, dilation_rates, n)
    M = np.zeros((h, n, n))
    p = np.arange(n)
    for hh, cells in enumerate(head_cells(h, branches, mode)):
        for i, off in cells:
            S, r = branches[i]
            act = (p % S) % r == off
            same = (p[:, None] // S) == (p[None, :] // S)
            vis = act[:, None] & act[None, :] & same
            if causal:
                vis &= p[None, :] <= p[:, None]
            M[hh] += vis
    return M


def reference_backward(q, k, v, dout, segment_lengths, dilation_rates, causal=False, mode="groups",
                       scale=None):
    """Analytic float64 gradients (dq, dk, dv) of reference_attention for dout.

    P = M * exp(s - lse), o = P v; dv = P^T dO, dP = dO v^T,
    dS = P (dP - rowsum(dO o)), dq = scale dS k, dk = scale dS^T q.
    """
    q, k, v, dout = (_as64(x) for x in (q, k, v, dout))
    b, n, h, d = q.shape
    h_kv = k.shape[2]
    k, v = expand_kv(k, h), expand_kv(v, h)
    scale = 1.0 / np.sqrt(d) if scale is None else float(scale)
    M = multiplicity(n, h, segment_lengths, dilation_rates, causal, mode)
    qt, kt, vt, gt = (np.swapaxes(x, 1, 2) for x in (q, k, v, dout))  # (b, h, n, d)
    s = scale * np.matmul(qt, np.swapaxes(kt, -1, -2))
    s = np.where(M[None] > 0, s, -np.inf)
    mx = s.max(axis=-1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    e = M[None] * np.exp(s - mx)
    den = e.sum(axis=-1, keepdims=True)
    P = np.divide(e, den, out=np.zeros_like(e), where=den > 0)
    o = np.matmul(P, vt)
    dv = np.matmul(np.swapaxes(P, -1, -2), gt)
    dP = np.matmul(gt, np.swapaxes(vt, -1, -2))
    dS = P * (dP - (gt * o).sum(axis=-1, keepdims=True))
    dq = scale * np.matmul(dS, kt)
    dk = scale * np.matmul(np.swapaxes(dS, -1, -2), qt)
    dq, dk, dv = (np.swapaxes(x, 1, 2) for x in (dq, dk, dv))
    return dq, _fold_kv(dk, h_kv), _fold_kv(dv, h_kv)
