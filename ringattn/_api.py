"""The public functions and classes of ringattn (re-exported by __init__)."""

import numpy as np

from . import _core
from . import _device
from . import _validate as check
from ._comm import Communicator

_threads = {"n": 0}  # 0: the core's default (RINGATTN_NUM_THREADS or all cores)


def set_num_threads(n):
    """Set how many threads the CPU kernels use (None restores the default)."""
    _threads["n"] = check.num_threads(n)


def get_num_threads():
    """Threads the CPU kernels use when a call does not say."""
    return _threads["n"] or _core.default_num_threads()


def _run(q, k, v, segs, rates, causal, mode, scale, world_size, nan_policy, num_threads,
         return_lse, out, device=None):
    if _device.wants_gpu(device, q, k, v, out):  # CUDA arrays or device="cuda": see _device.py
        return _device.run(q, k, v, segs, rates, causal, mode, scale, world_size, return_lse, out, device)
    q, k, v = check.qkv(q, k, v)
    out = check.out_array(out, q)
    b, n, h, _ = q.shape
    lse = np.empty((b, h, n), dtype=check.lse_dtype(q.dtype)) if return_lse else None
    threads = check.num_threads(num_threads) or _threads["n"]
    stats = _core.run(comm=None, backward=False, q=q, k=k, v=v, out=out, lse=lse, dout=None, dq=None,
                      dk=None, dv=None, segment_lengths=segs, dilation_rates=rates, causal=bool(causal),
                      mode=mode, scale=scale, world_size=world_size, num_threads=threads,
                      check_finite=nan_policy)
    return (out, lse) if return_lse else out, stats


def _host_only(comm, **arrays):
    """An MPI communicator runs on the CPU: refuse CUDA arrays by name."""
    for name, x in arrays.items():
        if x is not None and _device.classify(x) == "cuda":
            raise TypeError(f"{name} is a CUDA array but the {comm.backend.upper()} communicator runs on the CPU; "
                            "pass NumPy arrays, or use Communicator.nccl() for GPU arrays")


def _backward(q, k, v, o, lse, dout, segs, rates, causal, mode, scale, world_size, nan_policy,
              num_threads, comm=None, device=None):
    """(dq, dk, dv) and per-rank stats; with comm, everything is this rank's shard."""
    if comm is None and _device.wants_gpu(device, q, k, v, o=o, lse=lse, dout=dout):
        return _device.run_backward(q, k, v, o, lse, dout, segs, rates, causal, mode, scale, world_size, device)
    if comm is not None and comm.backend == "nccl":
        return _device.run_comm(comm, (q, k, v, o, dout), lse, segs, rates, causal, mode, scale)
    try:  # with comm, a rank that refuses its input still joins the agreement
        if comm is not None:
            _host_only(comm, q=q, k=k, v=v, o=o, lse=lse, dout=dout)
        q, k, v = check.qkv(q, k, v)
        o = check.like(o, q, "o")
        dout = check.like(dout, q, "dout")
        b, n, h, _ = q.shape
        lse = check.lse(lse, (b, h, n), q.dtype)
        threads = check.num_threads(num_threads) or _threads["n"]
    except (TypeError, ValueError) as e:
        if comm is not None:
            comm.refuse(e)
        raise
    grads = [np.empty_like(q, order="C") for _ in range(3)]
    stats = _core.run(comm=None if comm is None else comm.handle(), backward=True, q=q, k=k, v=v, out=o,
                      lse=lse, dout=dout, dq=grads[0], dk=grads[1], dv=grads[2], segment_lengths=segs,
                      dilation_rates=rates, causal=bool(causal), mode=mode, scale=scale,
                      world_size=world_size if comm is None else comm.world_size, num_threads=threads,
                      check_finite=nan_policy)
    return tuple(grads), stats


def dilated_attention_backward(q, k, v, o, lse, dout, segment_lengths, dilation_rates, *, causal=False,
                               mode="groups", scale=None, nan_policy="raise", num_threads=None, device=None):
    """Gradients (dq, dk, dv) of dilated_attention at q, k, v for the output
    gradient dout, given the forward's output o and its lse (return_lse=True).
    Flash-style: probabilities are recomputed tile by tile from lse; every
    gradient has the input dtype.  CUDA arrays (or device="cuda") run on the
    GPU and give DeviceArrays (NumPy for NumPy inputs), as in the forward.
    The other arguments are dilated_attention's."""
    segs, rates = check.branches(segment_lengths, dilation_rates)
    grads, _ = _backward(q, k, v, o, lse, dout, segs, rates, causal, check.mode(mode), check.scale(scale), 1,
                         check.nan_policy(nan_policy), num_threads, device=device)
    return grads


def dilated_attention(q, k, v, segment_lengths, dilation_rates, *, causal=False, mode="groups",
                      scale=None, nan_policy="raise", return_lse=False, num_threads=None, out=None,
                      device=None):
    """Dilated attention of q, k, v laid out (batch, seq, heads, head_dim).

    segment_lengths / dilation_rates give the branches (s_i, r_i); mode is
    "groups" (heads split among branches) or "longnet" (every head in every
    branch, combined by softmax denominators).  segment_lengths=[n],
    dilation_rates=[1] is plain attention.  Inputs are float32 or float16,
    computed in float32, or float64 (CPU only), computed in double
    throughout; the output has the input's dtype.  With return_lse=True the
    log-sum-exp of every row, (batch, heads, seq), is returned as well
    (-inf where a query attends to nothing): float32, or float64 for
    float64 inputs.
    nan_policy="raise" refuses NaN/Inf inputs; "propagate" skips the check.
    device=None runs where the inputs are: NumPy on the CPU, CUDA arrays
    (__cuda_array_interface__ / DLPack: torch, CuPy, ...) on their GPU,
    returning a ringattn.DeviceArray (or out=); device="cuda" runs NumPy
    inputs on the GPU and returns NumPy.  See ringattn/_device.py.
    """
    segs, rates = check.branches(segment_lengths, dilation_rates)
    result, _ = _run(q, k, v, segs, rates, causal, check.mode(mode), check.scale(scale), 1,
                     check.nan_policy(nan_policy), num_threads, return_lse, out, device)
    return result


class RingDilatedAttention:
    """Ring dilated attention over `world_size` ranks.

    Calling it with full-length q, k, v runs world_size ranks in this process
    (one thread each): rank j holds only positions [j*L, (j+1)*L) of q, k, v
    and o, and key/value blocks travel the ring through the core's in-process
    transport.  The full output is returned; it equals dilated_attention's.
    After a call, last_stats maps "peak_bytes", "bytes_sent",
    "bytes_received", "steps" and "steps_skipped" to one int per rank.
    """

    def __init__(self, segment_lengths, dilation_rates, *, causal=False, mode="groups", scale=None,
                 world_size=None, nan_policy="raise", num_threads=None, comm=None, device=None):
        self.segment_lengths, self.dilation_rates = check.branches(segment_lengths, dilation_rates)
        self.causal = bool(causal)
        self.mode = mode
        self._mode = check.mode(mode)
        self.scale = scale
        self._scale = check.scale(scale)
        if comm is not None and not isinstance(comm, Communicator):
            raise TypeError(f"comm must be a ringattn.Communicator, got {type(comm).__name__}")
        self.comm = comm
        if comm is None:
            self.world_size = 1 if world_size is None else check.positive_int(world_size, "world_size")
        else:
            if world_size is not None and world_size != comm.world_size:
                raise ValueError(f"world_size={world_size} but comm has {comm.world_size} ranks")
            self.world_size = comm.world_size
        self.nan_policy = nan_policy
        self._check = check.nan_policy(nan_policy)
        self.num_threads = None if num_threads is None else check.num_threads(num_threads)
        _device.parse_device(device)  # checked now, used by __call__ (as in dilated_attention)
        self.device = device
        self.last_stats = None

    def __repr__(self):
        return (f"RingDilatedAttention(segment_lengths={self.segment_lengths}, "
                f"dilation_rates={self.dilation_rates}, causal={self.causal}, mode={self.mode!r}, "
                f"scale={self.scale}, world_size={self.world_size})")

    def plan(self, q_shape):
        """The schedule for inputs of shape (b, n, h, d): local length, and per
        branch its segment, rate, span (ranks per segment) and heads."""
        b, n, h, d = (int(x) for x in q_shape)
        return _core.plan(b, n, h, d, self.segment_lengths, self.dilation_rates, self.causal,
                          self._mode, self._scale, self.world_size)

    def __call__(self, q, k, v, *, return_lse=False, out=None, requires_grad=False):
        """Full-length q, k, v (in-process ranks), or with comm= this rank's
        shards (b, n/k, h, d); returns the output of the same length.  With
        requires_grad=True the call keeps what backward() needs: references
        to q, k, v and the output, and the lse."""
        self._saved = None
        keep = return_lse or requires_grad
        if self.comm is not None:
            result, _ = self._call_comm(q, k, v, keep, out)
        else:
            result, stats = _run(q, k, v, self.segment_lengths, self.dilation_rates, self.causal,
                                 self._mode, self._scale, self.world_size, self._check, self.num_threads,
                                 keep, out, self.device)
            self.last_stats = {key: [s[key] for s in stats] for key in stats[0]}
        if requires_grad:
            self._saved = (q, k, v) + tuple(result)
        return result if return_lse or not keep else result[0]

    def backward(self, dout):
        """Gradients (dq, dk, dv) for the output gradient dout, after a call
        with requires_grad=True; the same lengths as that call's inputs (this
        rank's shards with comm=).  last_stats then describes the backward."""
        if getattr(self, "_saved", None) is None:
            raise RuntimeError("backward() needs a preceding call with requires_grad=True")
        q, k, v, o, lse = self._saved
        grads, stats = _backward(q, k, v, o, lse, dout, self.segment_lengths, self.dilation_rates,
                                 self.causal, self._mode, self._scale, self.world_size, self._check,
                                 self.num_threads, self.comm, self.device)
        self.last_stats = {key: [s[key] for s in stats] for key in stats[0]}
        return grads

    def _call_comm(self, q, k, v, return_lse, out):
        comm = self.comm
        if comm.backend == "nccl":
            result, stats = _device.run_comm(comm, (q, k, v), None, self.segment_lengths, self.dilation_rates,
                                             self.causal, self._mode, self._scale, return_lse, out)
            self.last_stats = {key: [stats[0][key]] for key in stats[0]}
            return result, stats
        try:  # a rank that refuses its input still joins the agreement
            _host_only(comm, q=q, k=k, v=v, out=out)
            q, k, v = check.qkv(q, k, v)
            out = check.out_array(out, q)
            threads = check.num_threads(self.num_threads) or _threads["n"]
        except (TypeError, ValueError) as e:
            comm.refuse(e)
            raise
        b, n_local, h, _ = q.shape
        lse = np.empty((b, h, n_local), dtype=check.lse_dtype(q.dtype)) if return_lse else None
        stats = _core.run(comm=comm.handle(), backward=False, q=q, k=k, v=v, out=out, lse=lse, dout=None,
                          dq=None, dk=None, dv=None, segment_lengths=self.segment_lengths,
                          dilation_rates=self.dilation_rates, causal=self.causal, mode=self._mode,
                          scale=self._scale, world_size=comm.world_size, num_threads=threads,
                          check_finite=self._check)
        self.last_stats = {key: [stats[0][key]] for key in stats[0]}
        return (out, lse) if return_lse else out, stats


def split_sequence(x, world_size=None, rank=None, *, comm=None):
    """Rank `rank`'s shard of x along the sequence axis (axis 1): a view.
    With comm=, world_size and rank default to the communicator's."""
    if comm is not None:
        world_size = comm.world_size if world_size is None else world_size
        rank = comm.rank if rank is None else rank
    if world_size is None or rank is None:
        raise TypeError("split_sequence needs world_size and rank (or comm=)")
    world_size = check.positive_int(world_size, "world_size")
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
        raise TypeError(f"rank must be an integer, got {rank!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    x = np.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"x must have a sequence axis (axis 1), got shape {x.shape}")
    n = x.shape[1]
    if n % world_size:
        raise ValueError(f"world_size={world_size} does not divide the sequence length {n}")
    L = n // world_size
    return x[:, rank * L:(rank + 1) * L]


def gather_sequence(shards, *, comm=None):
    """Concatenate per-rank shards along the sequence axis (axis 1).

    With comm=, `shards` is this rank's shard and every rank receives the
    whole sequence (an allgather over the communicator)."""
    if comm is not None:
        local = np.ascontiguousarray(shards)
        if local.ndim < 2:
            raise ValueError(f"shards must have a sequence axis (axis 1), got shape {local.shape}")
        recv = np.empty((comm.world_size,) + local.shape, dtype=local.dtype)
        _core.comm_allgather(comm.handle(), local.view(np.uint8).reshape(-1),
                             recv.view(np.uint8).reshape(-1))
        return np.concatenate(list(recv), axis=1)
    shards = list(shards)
    if not shards:
        raise ValueError("shards must not be empty")
    return np.concatenate([np.asarray(s) for s in shards], axis=1)
