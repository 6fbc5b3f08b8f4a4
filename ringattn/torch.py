"""PyTorch for ringattn: autograd, torch.compile, and a multihead module; importing it needs torch.

    import ringattn.torch as rt
    o = rt.dilated_attention(q, k, v, [2048, 4096], [1, 2], causal=True)   # q, k, v: torch tensors
    o.sum().backward()                                                      # q.grad, k.grad, v.grad

    layer = rt.RingDilatedAttention([2048, 4096], [1, 2], causal=True, world_size=4)  # or comm=, process_group=
    o = layer(q, k, v)

    mha = rt.MultiheadDilatedAttention(768, 12, [2048, 4096], [1, 2], causal=True, world_size=4)
    y, _ = mha(x, x, x)                                                     # x: (batch, seq, embed)
    torch.compile(model, fullgraph=True)                                    # custom ops, no graph break

The forward and backward are torch.library custom ops
(torch.ops.ringattn.dilated_attention / dilated_attention_backward) with fake
(meta) implementations and registered autograd, so torch.compile traces
through them.  Tensors cross into the C core without copies, through DLPack: CPU
results are written into torch tensors allocated here, CUDA results
(ringattn.DeviceArray) come back as torch tensors over DLPack (a tensor
whose head dimension is not contiguous is copied once).  The
gradients are ringattn's exact flash-style backward through the ring; each
has its input's dtype: float32, float16 or bfloat16 (computed in float32),
and float64 on the CPU only -- computed in double throughout, so that
torch.autograd.gradcheck works with its default tolerances.  With comm= an
NCCL communicator takes CUDA tensors and an MPI one CPU tensors.

Under torchrun, process_group= (torch.distributed.group.WORLD, or any group)
makes each process one rank of the ring without MPI: a gloo group moves the
ring's blocks through torch.distributed, an NCCL group gets a ringattn NCCL
communicator (Communicator.from_torch).
"""

import threading
from typing import List, Optional, Tuple

import numpy as np
import torch

from . import _api
from ._comm import Communicator

__all__ = ["MultiheadDilatedAttention", "RingDilatedAttention", "dilated_attention"]


def _arg(t, name):
    """What ringattn takes for a tensor: the detached tensor itself, read
    over DLPack without a copy (CPU tensors of every dtype, bfloat16 too)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    t = t.detach()
    if t.dim() == 4 and t.stride(-1) != 1:
        t = t.contiguous()  # e.g. the expanded ones of loss.sum()
    if t.device.type not in ("cpu", "cuda"):
        raise TypeError(f"{name} is on {t.device}: ringattn runs on CPU and CUDA tensors")
    return t


# CPU tensors NumPy can view without a copy go to the core as NumPy arrays,
# whose intake is the cheapest (a tiny call: ~60 us against ~120 over DLPack
# with caller-allocated outputs); bfloat16 (no NumPy dtype without
# ml_dtypes) and CUDA tensors go over DLPack.
_NUMPY_VIEWABLE = (torch.float32, torch.float16, torch.float64)


def _numpy_views(*tensors):
    """NumPy views of detached CPU tensors, or None if one cannot be viewed."""
    if all(t.device.type == "cpu" and t.dtype in _NUMPY_VIEWABLE for t in tensors):
        return tuple(t.numpy() for t in tensors)
    return None


def _tensor(x):
    if isinstance(x, torch.Tensor):
        return x
    return torch.from_numpy(x) if isinstance(x, np.ndarray) else torch.from_dlpack(x)


def _outputs(*likes):
    """Output tensors shaped as `likes` for a CPU call (written by the core
    over DLPack), or None on CUDA (ringattn allocates device arrays there)."""
    if likes[0].device.type != "cpu":
        return None
    return tuple(torch.empty(like.shape, dtype=likes[0].dtype) for like in likes)


# ------------------------------------------------------------------ rings by key
#
# A custom op takes tensors and plain values only, so a call names its ring by
# its configuration (and a communicator by a number); the ring objects are
# kept here, one per configuration: they hold last_stats (per thread).

_lock = threading.Lock()
_comms = {}  # id -> Communicator (kept alive while registered)
_rings = {}  # configuration -> ringattn.RingDilatedAttention


def _comm_id(comm):
    if comm is None:
        return -1
    _comms[id(comm)] = comm  # one dict store: atomic
    return id(comm)


def _ring(segment_lengths, dilation_rates, causal, mode, scale, world_size, nan_policy, num_threads, comm_id,
          device, partition="contiguous"):
    key = (tuple(segment_lengths), tuple(dilation_rates), bool(causal), mode, scale, world_size, nan_policy,
           num_threads, comm_id, device, partition)
    ring = _rings.get(key)
    if ring is None:
        comm = None if comm_id < 0 else _comms[comm_id]
        ring = _api.RingDilatedAttention(
            list(segment_lengths), list(dilation_rates), causal=causal, mode=mode, scale=scale,
            world_size=None if comm is not None else world_size, nan_policy=nan_policy,
            num_threads=None if num_threads <= 0 else num_threads, comm=comm, device=device or None,
            partition=partition)
        with _lock:
            ring = _rings.setdefault(key, ring)
    return ring


_group_comms = {}  # id(process group) -> (group, its Communicator): one per group, shared


def _communicator(process_group, comm):
    """comm=, or the Communicator of a torch.distributed process group
    (Communicator.from_torch, made once per group: collective on first use)."""
    if process_group is None:
        return comm
    if comm is not None:
        raise ValueError("pass process_group= or comm=, not both")
    entry = _group_comms.get(id(process_group))
    if entry is None or entry[0] is not process_group or entry[1]._handle is None:
        entry = (process_group, Communicator.from_torch(process_group))
        _group_comms[id(process_group)] = entry
    return entry[1]


def _lse_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------ custom ops

@torch.library.custom_op("ringattn::dilated_attention", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_lengths: List[int],
                dilation_rates: List[int], causal: bool, mode: str, scale: Optional[float], world_size: int,
                nan_policy: str, num_threads: int, comm_id: int, device: str,
                partition: str = "contiguous") -> Tuple[torch.Tensor, torch.Tensor]:
    """(o, lse) of ringattn's ring dilated attention; lse is (b, h, n)."""
    ring = _ring(segment_lengths, dilation_rates, causal, mode, scale, world_size, nan_policy, num_threads,
                 comm_id, device, partition)
    qn, kn, vn = (_arg(t, n) for t, n in ((q, "q"), (k, "k"), (v, "v")))
    views = _numpy_views(qn, kn, vn)
    if views is not None:
        o, lse = ring(*views, return_lse=True)
    else:
        out = _outputs(qn)
        o, lse = ring(qn, kn, vn, return_lse=True, out=None if out is None else out[0])
    return _tensor(o).contiguous(), _tensor(lse).contiguous()


@_forward_op.register_fake
def _(q, k, v, segment_lengths, dilation_rates, causal, mode, scale, world_size, nan_policy, num_threads,
      comm_id, device, partition="contiguous"):
    b, n, h, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b, h, n), dtype=_lse_dtype(q))


@torch.library.custom_op("ringattn::dilated_attention_backward", mutates_args=())
def _backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                 grad_out: torch.Tensor, segment_lengths: List[int], dilation_rates: List[int], causal: bool,
                 mode: str, scale: Optional[float], world_size: int, nan_policy: str, num_threads: int,
                 comm_id: int, device: str,
                 partition: str = "contiguous") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of ringattn's ring dilated attention for the output gradient grad_out."""
    ring = _ring(segment_lengths, dilation_rates, causal, mode, scale, world_size, nan_policy, num_threads,
                 comm_id, device, partition)
    saved = tuple(_arg(t, n) for t, n in ((q, "q"), (k, "k"), (v, "v"), (o, "o"), (lse, "lse")))
    g = _arg(grad_out, "grad_output")
    views = _numpy_views(*saved, g)
    if views is not None:
        dq, dk, dv = ring._backward(views[:5], views[5])
    else:
        dq, dk, dv = ring._backward(saved, g, grads=_outputs(*saved[:3]))  # dk, dv: k's h_kv heads
    return _tensor(dq).contiguous(), _tensor(dk).contiguous(), _tensor(dv).contiguous()


@_backward_op.register_fake
def _(q, k, v, o, lse, grad_out, segment_lengths, dilation_rates, causal, mode, scale, world_size, nan_policy,
      num_threads, comm_id, device, partition="contiguous"):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


_CONFIG = ("segment_lengths", "dilation_rates", "causal", "mode", "scale", "world_size", "nan_policy",
           "num_threads", "comm_id", "device", "partition")


def _setup_context(ctx, inputs, output):
    q, k, v = inputs[:3]
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.config = inputs[3:]


def _backward(ctx, grad_o, grad_lse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _backward_op(q, k, v, o, lse, grad_o, *ctx.config)
    return (dq, dk, dv) + (None,) * len(_CONFIG)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _config(ring, causal=None):
    """The custom ops' configuration arguments for a ringattn.RingDilatedAttention."""
    return (list(ring.segment_lengths), list(ring.dilation_rates), bool(ring.causal if causal is None else causal),
            ring.mode, None if ring.scale is None else float(ring.scale), int(ring.world_size), ring.nan_policy,
            int(ring.num_threads or 0), _comm_id(ring.comm), "" if ring.device is None else str(ring.device),
            ring.partition)


def _apply(q, k, v, config):
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return _forward_op(q, k, v, *config)[0]


# ------------------------------------------------------------------ public API

class RingDilatedAttention(torch.nn.Module):
    """ringattn.RingDilatedAttention as a differentiable torch module.

    Arguments are those of ringattn.RingDilatedAttention (world_size for
    in-process ranks, or comm= for one process per rank, in which case q, k,
    v are this rank's shards), and process_group= (a torch.distributed
    process group: one process per rank through Communicator.from_torch,
    made once per group, collectively, here).  last_stats is the ring's, per rank, of the
    calling thread's last forward or backward with this configuration: like
    ringattn.RingDilatedAttention, one module may run in several threads at
    once (each call keeps its own saved tensors for the backward)."""

    def __init__(self, segment_lengths, dilation_rates, *, process_group=None, comm=None, **kwargs):
        super().__init__()
        comm = _communicator(process_group, comm)
        self.ring = _api.RingDilatedAttention(segment_lengths, dilation_rates, comm=comm, **kwargs)
        self._config = _config(self.ring)

    @property
    def last_stats(self):
        return _ring(*self._config).last_stats

    def forward(self, q, k, v):
        return _apply(q, k, v, self._config)


def dilated_attention(q, k, v, segment_lengths, dilation_rates, *, causal=False, mode="groups", scale=None,
                      world_size=None, nan_policy="raise", num_threads=None, comm=None, device=None,
                      process_group=None, partition="contiguous"):
    """ringattn.dilated_attention for torch tensors, differentiable; the
    keyword arguments are those of ringattn.RingDilatedAttention (world_size
    in-process ranks, or comm= / process_group= and this rank's shards)."""
    comm = _communicator(process_group, comm)
    if not torch.compiler.is_compiling():  # eager: every rule checked now, by the ring's constructor
        ring = _api.RingDilatedAttention(segment_lengths, dilation_rates, causal=causal, mode=mode, scale=scale,
                                         world_size=world_size, nan_policy=nan_policy, num_threads=num_threads,
                                         comm=comm, device=device, partition=partition)
        return _apply(q, k, v, _config(ring))
    # traced by torch.compile: the same configuration without building a ring
    # (the op's implementation builds it, and checks it, when it runs)
    world = comm.world_size if comm is not None else (1 if world_size is None else world_size)
    config = (list(segment_lengths), list(dilation_rates), bool(causal), mode,
              None if scale is None else float(scale), int(world), nan_policy, int(num_threads or 0),
              -1 if comm is None else _comm_id(comm), "" if device is None else str(device), partition)
    return _apply(q, k, v, config)


class MultiheadDilatedAttention(torch.nn.Module):
    """Multihead ring dilated attention with its projections, as in LongNet.

    y, _ = module(query, key, value): query/key/value (batch, seq, embed_dim)
    (seq, batch, embed_dim with batch_first=False) are projected by q_proj,
    k_proj, v_proj (embed_dim -> embed_dim), split into num_heads heads,
    attended by ring dilated attention (segment_lengths, dilation_rates, mode,
    causal; is_causal=None uses the module's causal), merged, normalised by
    a LayerNorm (LongNet/MAGNETO's sub-layer norm, when layer_norm=True) and
    projected by out_proj.  Returns (output, None), like
    torch.nn.MultiheadAttention with need_weights=False.

    num_kv_heads (default num_heads, dividing it) gives grouped-query
    attention: k_proj and v_proj project to num_kv_heads heads, each read by
    num_heads // num_kv_heads query heads.

    world_size=k runs k ranks in this process on full-length inputs;
    process_group= (a torch.distributed process group, e.g. torchrun's
    default group: torch.distributed.group.WORLD) or comm= (a
    ringattn.Communicator) makes this process one rank, and query/key/value
    are then this rank's shard of the sequence (split with the module's
    partition, "contiguous" or "zigzag").
    Initialisation (fkodom's dilated-attention-pytorch, MAGNETO with
    gamma 1): xavier_normal_ weights, zero biases.
    """

    def __init__(self, embed_dim, num_heads, segment_lengths, dilation_rates, *, num_kv_heads=None, bias=True,
                 layer_norm=True, causal=False, mode="groups", batch_first=True, device=None, dtype=None,
                 world_size=None, process_group=None, comm=None, layer_norm_eps=1e-5, scale=None,
                 nan_policy="raise", num_threads=None, partition="contiguous"):
        super().__init__()
        for value, name in ((embed_dim, "embed_dim"), (num_heads, "num_heads")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        if num_kv_heads is None:
            num_kv_heads = num_heads
        if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads < 1 \
                or num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads must be a positive int dividing num_heads={num_heads}, "
                             f"got {num_kv_heads!r}")
        comm = _communicator(process_group, comm)
        if comm is not None and not isinstance(comm, Communicator):
            raise TypeError(f"comm must be a ringattn.Communicator, got {type(comm).__name__}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.num_kv_heads = num_kv_heads
        self.batch_first, self.causal = bool(batch_first), bool(causal)
        self.layer_norm = bool(layer_norm)
        self.ring = _api.RingDilatedAttention(segment_lengths, dilation_rates, causal=causal, mode=mode,
                                              scale=scale, world_size=world_size, nan_policy=nan_policy,
                                              num_threads=num_threads, comm=comm, partition=partition)
        factory = {"device": device, "dtype": dtype}
        self.q_proj = torch.nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        kv_dim = num_kv_heads * self.head_dim
        self.k_proj = torch.nn.Linear(embed_dim, kv_dim, bias=bias, **factory)
        self.v_proj = torch.nn.Linear(embed_dim, kv_dim, bias=bias, **factory)
        self.norm = torch.nn.LayerNorm(embed_dim, eps=layer_norm_eps, **factory) if layer_norm else None
        self.out_proj = torch.nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self._configs = {c: _config(self.ring, causal=c) for c in (False, True)}
        self.reset_parameters()

    def reset_parameters(self):
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            torch.nn.init.xavier_normal_(proj.weight, gain=1.0)
            if proj.bias is not None:
                torch.nn.init.zeros_(proj.bias)
        if self.norm is not None:
            self.norm.reset_parameters()

    @property
    def last_stats(self):
        """The ring's statistics (per rank) of the calling thread's last causal
        or non-causal call, whichever ran last with the module's causal."""
        return _ring(*self._configs[self.causal]).last_stats

    def extra_repr(self):
        r = self.ring
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"segment_lengths={r.segment_lengths}, "
                f"dilation_rates={r.dilation_rates}, causal={self.causal}, mode={r.mode!r}, "
                f"world_size={r.world_size}, layer_norm={self.layer_norm}, batch_first={self.batch_first}")

    def forward(self, query, key, value, is_causal=None):
        causal = self.causal if is_causal is None else bool(is_causal)
        if not self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        b, n, e = query.shape
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(query).view(b, n, h, d)
        hkv = self.num_kv_heads
        k = self.k_proj(key).view(key.shape[0], key.shape[1], hkv, d)
        v = self.v_proj(value).view(value.shape[0], value.shape[1], hkv, d)
        x = _apply(q, k, v, self._configs[causal]).reshape(b, n, e)
        if self.norm is not None:
            x = self.norm(x)
        x = self.out_proj(x)
        if not self.batch_first:
            x = x.transpose(0, 1)
        return x, None
