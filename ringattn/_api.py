"""The public functions and classes of ringattn (re-exported by __init__).

Each one checks its configuration (_validate) and hands the arrays to the
one call sequence in _call.py, which runs them where they are: NumPy on the
CPU, CUDA arrays (__cuda_array_interface__ / DLPack: torch, CuPy, ...) on
their GPU, NumPy with device="cuda" on the GPU and back.
"""

import threading

import numpy as np

from . import _arrays, _call, _ext
from . import _validate as check
from ._comm import Communicator

_threads = {"n": 0}  # 0: the core's default (RINGATTN_NUM_THREADS or all cores)


def set_num_threads(n):
    """Set how many threads the CPU kernels use (None restores the default);
    at most 4 x the cores (os.cpu_count()), ValueError beyond."""
    _threads["n"] = check.num_threads(n)


def get_num_threads():
    """Threads the CPU kernels use when a call does not say."""
    return _threads["n"] or _ext.default_num_threads()


def _with_threads(cfg):
    """cfg with the thread count a call uses (its own, else the global one)."""
    if cfg.num_threads or not _threads["n"]:
        return cfg
    return cfg._replace(num_threads=_threads["n"])


def dilated_attention(q, k, v, segment_lengths, dilation_rates, *, causal=False, mode="groups",
                      scale=None, nan_policy="raise", return_lse=False, num_threads=None, out=None,
                      device=None):
    """Dilated attention of q, k, v laid out (batch, seq, heads, head_dim).

    segment_lengths / dilation_rates give the branches (s_i, r_i); mode is
    "groups" (heads split among branches) or "longnet" (every head in every
    branch, combined by softmax denominators).  segment_lengths=[n],
    dilation_rates=[1] is plain attention.  Inputs are float32, float16 or
    bfloat16 (ml_dtypes' on NumPy; torch's over DLPack), computed in
    float32, or float64 (CPU only), computed in double throughout; the
    output has the input's dtype.  With
    return_lse=True the log-sum-exp of every row, (batch, heads, seq), is
    returned as well (-inf where a query attends to nothing): float32, or
    float64 for float64 inputs.
    nan_policy="raise" refuses NaN/Inf inputs; "propagate" skips the check
    (the GPU never scans its inputs).
    device=None runs where the inputs are: NumPy on the CPU, CUDA arrays
    (__cuda_array_interface__ / DLPack: torch, CuPy, ...) on their GPU,
    returning a ringattn.DeviceArray (or out=); device="cuda" runs NumPy
    inputs on the GPU and returns NumPy.  See ringattn/_arrays.py.
    """
    cfg = check.config(segment_lengths, dilation_rates, causal, mode, scale, 1, nan_policy, num_threads)
    result, _ = _call.forward(_with_threads(cfg), q, k, v, out=out, return_lse=return_lse, device=device)
    return result


def dilated_attention_backward(q, k, v, o, lse, dout, segment_lengths, dilation_rates, *, causal=False,
                               mode="groups", scale=None, nan_policy="raise", num_threads=None, device=None):
    """Gradients (dq, dk, dv) of dilated_attention at q, k, v for the output
    gradient dout, given the forward's output o and its lse (return_lse=True).
    Flash-style: probabilities are recomputed tile by tile from lse; every
    gradient has the input dtype.  CUDA arrays (or device="cuda") run on the
    GPU and give DeviceArrays (NumPy for NumPy inputs), as in the forward.
    The other arguments are dilated_attention's."""
    cfg = check.config(segment_lengths, dilation_rates, causal, mode, scale, 1, nan_policy, num_threads)
    grads, _ = _call.backward(_with_threads(cfg), q, k, v, o, lse, dout, device=device)
    return grads


class RingDilatedAttention:
    """Ring dilated attention over `world_size` ranks.

    Calling it with full-length q, k, v runs world_size ranks in this process
    (one thread each): rank j holds only its positions of q, k, v and o, and
    key/value blocks travel the ring through the core's in-process
    transport.  The full output is returned; it equals dilated_attention's.
    With comm= (a Communicator) each process is one rank and passes its own
    shards (split_sequence with the same partition).  After a call,
    last_stats maps "peak_bytes", "bytes_sent", "bytes_received", "steps",
    "steps_skipped" and "pairs" (the (query, key) pairs attended) to one int
    per rank (this rank's only, with comm=).

    partition="contiguous" (default): rank j holds positions [j*L, (j+1)*L),
    L = n / world_size.  partition="zigzag": the sequence is cut into
    2 * world_size chunks of C = n / (2 * world_size) positions and rank j
    holds chunks j and 2*world_size-1-j, in that order, which balances causal
    work between the ranks.  Each branch's segment length must divide the
    chunk (L or C) or be a multiple of it.

    k and v may have fewer heads than q (grouped-query / multi-query
    attention): h_kv dividing h, query head i reading key/value head
    i // (h // h_kv); only the h_kv heads travel the ring, and dk, dv have
    k's shape.

    Threads: one instance may be called from several threads at once.  What
    a call keeps is per thread: backward() differentiates the calling
    thread's last call with requires_grad=True, and last_stats describes the
    calling thread's last call (None in a thread that has made none).  Calls
    with comm= are collective, made by every rank in the same order, so a
    communicator is used by one thread at a time.
    """

    def __init__(self, segment_lengths, dilation_rates, *, causal=False, mode="groups", scale=None,
                 world_size=None, nan_policy="raise", num_threads=None, comm=None, device=None,
                 partition="contiguous"):
        if comm is not None and not isinstance(comm, Communicator):
            raise TypeError(f"comm must be a ringattn.Communicator, got {type(comm).__name__}")
        if comm is None:
            world = 1 if world_size is None else world_size
        else:
            if world_size is not None and world_size != comm.world_size:
                raise ValueError(f"world_size={world_size} but comm has {comm.world_size} ranks")
            world = comm.world_size
        self._cfg = check.config(segment_lengths, dilation_rates, causal, mode, scale, world, nan_policy,
                                 num_threads, partition)
        self.partition = partition
        self.segment_lengths, self.dilation_rates = self._cfg.segment_lengths, self._cfg.dilation_rates
        self.causal = self._cfg.causal
        self.mode, self.scale, self.nan_policy = mode, scale, nan_policy
        self.world_size = self._cfg.world_size
        self.num_threads = None if num_threads is None else self._cfg.num_threads
        self.comm = comm
        _arrays.parse_device(device)  # checked now, used by every call
        self.device = device
        self._state = _CallState()  # per thread: last_stats and what backward() needs

    def __repr__(self):
        return (f"RingDilatedAttention(segment_lengths={self.segment_lengths}, "
                f"dilation_rates={self.dilation_rates}, causal={self.causal}, mode={self.mode!r}, "
                f"scale={self.scale}, world_size={self.world_size}, partition={self.partition!r})")

    # ------------------------------------------------ per-thread call state
    @property
    def last_stats(self):
        """Statistics of the calling thread's last call (None before one)."""
        return self._state.last_stats

    @last_stats.setter
    def last_stats(self, value):
        self._state.last_stats = value

    def __getstate__(self):  # copy/deepcopy/pickle: the configuration, not the calls
        state = self.__dict__.copy()
        del state["_state"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._state = _CallState()

    def plan(self, q_shape, num_kv_heads=None):
        """The schedule for inputs of shape (b, n, h, d) (and num_kv_heads
        key/value heads, default h): local length, chunk length (the local
        length, or n / (2 * world_size) for zigzag), and per branch its
        segment, rate, span (chunks per segment) and heads."""
        shape = tuple(int(x) for x in q_shape)
        if len(shape) != 4 or any(x < 1 for x in shape):
            raise ValueError(f"q_shape must be 4 positive sizes (batch, seq, heads, head_dim), got {shape}")
        check.addressable(shape, "q")
        b, n, h, d = shape
        c = self._cfg
        hkv = 0 if num_kv_heads is None else check.positive_int(num_kv_heads, "num_kv_heads")
        return _ext.plan(b, n, h, d, c.segment_lengths, c.dilation_rates, c.causal, c.mode, c.scale, c.world_size,
                         hkv, c.partition)

    def __call__(self, q, k, v, *, return_lse=False, out=None, requires_grad=False):
        """Full-length q, k, v (in-process ranks), or with comm= this rank's
        shards (b, n/k, h, d); returns the output of the same length.  With
        requires_grad=True the call keeps what backward() needs: references
        to q, k, v and the output, and the lse (for this thread's backward())."""
        state = self._state
        state.saved = None
        keep = return_lse or requires_grad
        result, stats = _call.forward(_with_threads(self._cfg), q, k, v, out=out, return_lse=keep,
                                      device=self.device, comm=self.comm, in_place=not requires_grad)
        state.last_stats = _call.stats_by_key(stats)
        if requires_grad:
            state.saved = (q, k, v) + tuple(result)
        return result if return_lse or not keep else result[0]

    def backward(self, dout):
        """Gradients (dq, dk, dv) for the output gradient dout, after a call
        with requires_grad=True; the same lengths as that call's inputs (this
        rank's shards with comm=).  last_stats then describes the backward.
        It uses the calling thread's last call with requires_grad=True."""
        state = self._state
        if state.saved is None:
            error = RuntimeError("backward() needs a preceding call with requires_grad=True in this thread")
            if self.comm is not None:  # the other ranks raise too instead of waiting
                _call.refuse(self.comm, error, "backward")
            raise error
        return self._backward(state.saved, dout)

    def _backward(self, saved, dout, grads=None):
        """backward() of a given forward, saved = (q, k, v, o, lse), from any
        thread (ringattn.torch: autograd may run the backward on a thread of
        its own); grads: (dq, dk, dv) arrays to write, or None."""
        q, k, v, o, lse = saved
        grads, stats = _call.backward(_with_threads(self._cfg), q, k, v, o, lse, dout, grads=grads,
                                      device=self.device, comm=self.comm)
        self._state.last_stats = _call.stats_by_key(stats)
        return grads


class _CallState(threading.local):
    """What a RingDilatedAttention keeps between calls, one per thread."""

    def __init__(self):
        self.last_stats = None
        self.saved = None  # (q, k, v, o, lse) of the last call with requires_grad=True


class _RawPointer:
    """A raw device address seen as a CUDA array: what cuda_forward_ptr
    hands the call sequence."""

    def __init__(self, ptr, shape, strides, dtype, stream):
        cai = {"shape": tuple(shape), "typestr": {"float32": "<f4", "float16": "<f2", "bfloat16": "<V2"}[dtype],
               "data": (ptr, False), "strides": tuple(s * _arrays.ITEMSIZE[dtype] for s in strides),
               "version": 3, "stream": stream}
        if dtype == "bfloat16":
            cai["descr"] = [("bfloat16", "<V2")]
        self.__cuda_array_interface__ = cai


def _address(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a non-zero device address (int), got {value!r}")
    return int(value)


def _strides(strides, shape):
    """Four stride tuples (q, k, v, o) in elements from cuda_forward_ptr's argument."""
    if strides is None:
        return [_arrays.contiguous_strides(shape)] * 4
    strides = list(strides)
    if strides and isinstance(strides[0], (tuple, list)):
        if len(strides) != 4:
            raise ValueError("strides must be one stride tuple or four (q, k, v, o)")
        st = [_arrays.int_tuple(s, "strides") for s in strides]
    else:
        st = [_arrays.int_tuple(strides, "strides")] * 4
    st = [s + (1,) if len(s) == 3 else s for s in st]  # (stride_b, stride_n, stride_h[, 1])
    if any(len(s) != 4 for s in st):
        raise ValueError(f"strides must have 3 or 4 entries (elements), got {strides!r}")
    return st


def cuda_forward_ptr(q_ptr, k_ptr, v_ptr, o_ptr, shape, dtype, segment_lengths, dilation_rates, *,
                     causal=False, mode="groups", scale=None, world_size=1, lse_ptr=None, strides=None,
                     stream=0, device=None):
    """The GPU forward on raw device addresses (ints).

    shape: (b, n, h, d); dtype: 'float32', 'float16' or 'bfloat16' (or a NumPy
    dtype).  strides: None for C-contiguous tensors, one (stride_b, stride_n,
    stride_h[, 1]) tuple in elements for all four, or four such tuples (q, k,
    v, o).  lse_ptr: address of a float32 (b, h, n) buffer or None.  stream: a
    cudaStream_t as an int (0 or None: the default stream) the inputs are
    ready on; the call returns once the outputs are written.  device: the
    CUDA ordinal of the addresses (None: the current one).
    Returns one dict of statistics per rank (device bytes held, sent, ...).
    """
    name = _arrays.dtype_name(dtype)
    if name is None:
        raise TypeError(f"dtype must be 'float32', 'float16' or 'bfloat16', got {dtype!r}")
    shape = _arrays.int_tuple(shape, "shape")
    if len(shape) != 4 or any(x < 1 for x in shape):
        raise ValueError(f"shape must be 4 positive sizes (batch, seq, heads, head_dim), got {shape}")
    cfg = check.config(segment_lengths, dilation_rates, causal, mode, scale, world_size)
    st = _strides(strides, shape)
    ptrs = [_address(p, nm) for p, nm in ((q_ptr, "q_ptr"), (k_ptr, "k_ptr"), (v_ptr, "v_ptr"), (o_ptr, "o_ptr"))]
    if lse_ptr is not None:
        lse_ptr = _address(lse_ptr, "lse_ptr")
    if stream is None:
        stream = 0
    if isinstance(stream, bool) or not isinstance(stream, (int, np.integer)) or stream < 0:
        raise TypeError(f"stream must be a cudaStream_t as a non-negative int, got {stream!r}")
    dev = _arrays.parse_device(device)
    if dev is not None and dev[0] != "cuda":
        raise ValueError(f"device must be a CUDA device, got {device!r}")
    cai_stream = int(stream) or _arrays.LEGACY_STREAM  # CAI: 0 is spelled 1
    q, k, v, o = (_RawPointer(p, shape, s, name, cai_stream) for p, s in zip(ptrs, st))
    b, n, h, _ = shape
    lse = None if lse_ptr is None else _RawPointer(lse_ptr, (b, h, n), (h * n, n, 1), "float32", cai_stream)
    _, stats = _call.forward(cfg, q, k, v, out=o, lse_out=lse, device=device if dev is not None else "cuda")
    return list(stats)


def _shard_positions(n, world_size, rank, partition):
    """The positions rank `rank` holds of a sequence of length n: one slice
    (contiguous) or two (zigzag: chunks rank and 2*world_size-1-rank)."""
    code = check.partition(partition)
    parts = world_size * (2 if code else 1)
    if n % parts:
        what = "2 * world_size" if code else "world_size"
        raise ValueError(f"world_size={world_size}: {what} = {parts} does not divide the sequence length {n}"
                         + (' (partition="zigzag")' if code else ""))
    c = n // parts
    if not code:
        return [slice(rank * c, (rank + 1) * c)]
    mirror = 2 * world_size - 1 - rank
    return [slice(rank * c, (rank + 1) * c), slice(mirror * c, (mirror + 1) * c)]


def split_sequence(x, world_size=None, rank=None, *, comm=None, partition="contiguous"):
    """Rank `rank`'s shard of x along the sequence axis (axis 1): a view for
    partition="contiguous", for "zigzag" a new array holding chunks rank and
    2*world_size-1-rank of the 2*world_size chunks, in that order.  With
    comm=, world_size and rank default to the communicator's."""
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
    parts = _shard_positions(x.shape[1], world_size, int(rank), partition)
    if len(parts) == 1:
        return x[:, parts[0]]
    return np.concatenate([x[:, p] for p in parts], axis=1)


def _unzigzag(shards):
    """The full sequence from every rank's zigzag shard, in rank order."""
    k = len(shards)
    halves = [np.split(np.asarray(s), 2, axis=1) for s in shards]
    return np.concatenate([halves[c][0] for c in range(k)] + [halves[k - 1 - c][1] for c in range(k)], axis=1)


def gather_sequence(shards, *, comm=None, partition="contiguous"):
    """Concatenate per-rank shards along the sequence axis (axis 1), undoing
    split_sequence with the same partition.

    With comm=, `shards` is this rank's shard and every rank receives the
    whole sequence (an allgather over the communicator).  That is a
    collective call: the ranks first agree on it (operation "gather" and the
    byte count), and an exception on any rank before then raises on all."""
    if comm is not None:
        try:
            zigzag = check.partition(partition)
            local = np.ascontiguousarray(shards)
            if local.ndim < 2:
                raise ValueError(f"shards must have a sequence axis (axis 1), got shape {local.shape}")
            if zigzag and local.shape[1] % 2:
                raise ValueError(f'shards: a zigzag shard holds two chunks of equal length, got length {local.shape[1]}')
            recv = np.empty((comm.world_size,) + local.shape, dtype=local.dtype)
            send_bytes, recv_bytes = local.view(np.uint8).reshape(-1), recv.view(np.uint8).reshape(-1)
            handle = comm.handle()
        except BaseException as e:  # any type: the other ranks must not wait for this one
            _call.refuse(comm, e, "gather")
            raise
        _ext.comm_allgather(handle, send_bytes, recv_bytes)
        return _unzigzag(list(recv)) if zigzag else np.concatenate(list(recv), axis=1)
    zigzag = check.partition(partition)
    shards = list(shards)
    if not shards:
        raise ValueError("shards must not be empty")
    if zigzag:
        lengths = {np.asarray(s).shape[1] if np.asarray(s).ndim >= 2 else -1 for s in shards}
        if len(lengths) != 1 or min(lengths) < 0 or min(lengths) % 2:
            raise ValueError("shards: zigzag shards must all have one even length along axis 1 (two chunks each)")
        return _unzigzag(shards)
    return np.concatenate([np.asarray(s) for s in shards], axis=1)
