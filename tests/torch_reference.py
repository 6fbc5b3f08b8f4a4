"""Dilated attention written in torch: the definition (softmax weighted by
the multiplicity matrix of the cells, reference.multiplicity), differentiated
by torch itself.  Shared by the torch tests; imports torch."""

import torch

from reference import multiplicity


def torch_reference(q, k, v, segs, rates, causal, mode):
    b, n, h, d = q.shape
    M = torch.as_tensor(multiplicity(n, h, segs, rates, causal, mode), dtype=q.dtype)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / d ** 0.5
    s = s.masked_fill(M == 0, float("-inf"))
    w = torch.exp(s - s.amax(dim=-1, keepdim=True).clamp_min(-1e30)) * M
    w = w / w.sum(dim=-1, keepdim=True).clamp_min(1e-300)
    return torch.einsum("bhqk,bkhd->bqhd", w, v)
