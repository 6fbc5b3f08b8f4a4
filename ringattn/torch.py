"""PyTorch autograd for ringattn; importing it needs torch.

    import ringattn.torch as rt
    o = rt.dilated_attention(q, k, v, [2048, 4096], [1, 2], causal=True)   # q, k, v: torch tensors
    o.sum().backward()                                                      # q.grad, k.grad, v.grad

    layer = rt.RingDilatedAttention([2048, 4096], [1, 2], causal=True, world_size=4)  # or comm=
    o = layer(q, k, v)

Tensors cross into the C core without copies: CPU tensors through DLPack
to NumPy and back, CUDA tensors through DLPack to the GPU kernels, whose
results (ringattn.DeviceArray) come back as torch tensors over DLPack (a
tensor whose head dimension is not contiguous is copied once).  The
gradients are ringattn's exact flash-style backward through the ring; each
has its input's dtype: float32 or float16, also bfloat16 on the GPU, and
float64 on the CPU only -- computed in double throughout, so that
torch.autograd.gradcheck works with its default tolerances.  With comm= an
NCCL communicator takes CUDA tensors and an MPI one CPU tensors.
"""

import numpy as np
import torch

from . import _api


def _arg(t, name):
    """What ringattn takes for a tensor: a NumPy view of a CPU tensor, the
    (detached) tensor itself on CUDA."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    t = t.detach()
    if t.dim() == 4 and t.stride(-1) != 1:
        t = t.contiguous()  # e.g. the expanded ones of loss.sum()
    if t.device.type == "cuda":
        return t
    if t.device.type != "cpu":
        raise TypeError(f"{name} is on {t.device}: ringattn runs on CPU and CUDA tensors")
    return np.from_dlpack(t)  # zero-copy view of the tensor's memory


class _RingFunction(torch.autograd.Function):
    """o = attention(q, k, v) with ringattn's forward and backward."""

    @staticmethod
    def forward(ctx, q, k, v, ring):
        qn, kn, vn = (_arg(t, n) for t, n in ((q, "q"), (k, "k"), (v, "v")))
        o, lse = ring(qn, kn, vn, return_lse=True)
        # what the backward needs lives on ctx, not in the ring's per-thread
        # state: autograd runs CUDA backwards on threads of its own
        ctx.ring, ctx.saved = ring, (qn, kn, vn, o, lse)
        return torch.from_dlpack(o)

    @staticmethod
    def backward(ctx, grad_out):
        g = _arg(grad_out, "grad_output")
        dq, dk, dv = ctx.ring._backward(ctx.saved, g)  # may run again with retain_graph=True
        return torch.from_dlpack(dq), torch.from_dlpack(dk), torch.from_dlpack(dv), None


class RingDilatedAttention(torch.nn.Module):
    """ringattn.RingDilatedAttention as a differentiable torch module.

    Arguments are those of ringattn.RingDilatedAttention (world_size for
    in-process ranks, or comm= for one process per rank, in which case q, k,
    v are this rank's shards).  last_stats is the ring's, per rank, of the
    calling thread's last forward: like ringattn.RingDilatedAttention, one
    module may run in several threads at once (each call keeps its own
    saved tensors for the backward)."""

    def __init__(self, segment_lengths, dilation_rates, **kwargs):
        super().__init__()
        self.ring = _api.RingDilatedAttention(segment_lengths, dilation_rates, **kwargs)

    @property
    def last_stats(self):
        return self.ring.last_stats

    def forward(self, q, k, v):
        # each call gets its own ring object, so that two calls in one graph
        # keep their own saved tensors for the backward
        ring = _api.RingDilatedAttention(
            self.ring.segment_lengths, self.ring.dilation_rates, causal=self.ring.causal, mode=self.ring.mode,
            scale=self.ring.scale, world_size=None if self.ring.comm else self.ring.world_size,
            nan_policy=self.ring.nan_policy, num_threads=self.ring.num_threads, comm=self.ring.comm,
            device=self.ring.device)
        out = _RingFunction.apply(q, k, v, ring)
        self.ring.last_stats = ring.last_stats
        return out


def dilated_attention(q, k, v, segment_lengths, dilation_rates, **kwargs):
    """ringattn.dilated_attention for torch tensors, differentiable."""
    ring = _api.RingDilatedAttention(segment_lengths, dilation_rates, **kwargs)
    return _RingFunction.apply(q, k, v, ring)
