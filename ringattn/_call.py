"""The one call sequence behind every entry point.

forward() and backward() -- for NumPy on the CPU, device arrays on the GPU,
host arrays with device="cuda" (copied in, run, copied back), raw device
addresses (cuda_forward_ptr) and communicators (MPI, NCCL) -- all go
through _Call.run:

1. intake every argument (``_arrays.describe_all``: ``_ext.Tensor``s);
2. decide where the call runs and apply every rule once: on the CPU
   ``_ext.run`` applies the tensor rules and the plan's (here: only outputs
   that overlap inputs, and NumPy layouts the core cannot read, copied
   once); on the GPU ``_validate`` applies them before anything is copied
   or allocated there, then the device's;
3. copy host arrays to the GPU (device="cuda"), allocate the outputs
   (NumPy arrays or DeviceArrays), order the streams;
4. ``_ext.run(...)``, which returns when the outputs are written;
5. release every intake (also on failure) and convert the results.

With a communicator, any exception raised on this rank before step 4 (of
any type, MemoryError included) is reported to the other ranks through the
agreement of the call (``comm.refuse`` with the operation) and re-raised, so
they raise too instead of waiting for this one.  The GPU path
does not scan inputs for NaN/Inf (nan_policy is treated as "propagate").
"""

import numpy as np

from . import _arrays, _ext
from . import _validate as check
from ._device_array import DeviceArray

FORWARD_INPUTS = ("q", "k", "v")
BACKWARD_INPUTS = ("q", "k", "v", "o", "lse", "dout")


def forward(cfg, q, k, v, *, out=None, lse_out=None, return_lse=False, device=None, comm=None, in_place=True):
    """(o, stats), or ((o, lse), stats) with return_lse; o is `out` when
    given.  lse_out: a caller's buffer for the lse (raw pointers).
    in_place=False refuses out=q too (the inputs are kept for a backward)."""
    outputs = {name: x for name, x in (("out", out), ("lse", lse_out)) if x is not None}
    call = _Call(cfg, False, {"q": q, "k": k, "v": v}, outputs, device, comm)
    call.in_place = in_place
    result, stats = call.run(return_lse=return_lse or lse_out is not None)
    return (result if return_lse else result[0]), stats


def backward(cfg, q, k, v, o, lse, dout, *, grads=None, device=None, comm=None):
    """((dq, dk, dv), stats); grads: the caller's (dq, dk, dv) to write, or None."""
    inputs = dict(zip(BACKWARD_INPUTS, (q, k, v, o, lse, dout)))
    outputs = {} if grads is None else dict(zip(("dq", "dk", "dv"), grads))
    return _Call(cfg, True, inputs, outputs, device, comm).run()


def stats_by_key(stats):
    """Per-rank stats dicts -> {key: [value per rank]} (last_stats)."""
    return {key: [s[key] for s in stats] for key in stats[0]}


class _Call:
    in_place = True  # out=q allowed (forward(in_place=False): not)

    def __init__(self, cfg, is_backward, inputs, outputs, device, comm):
        self.cfg, self.backward, self.comm = cfg, is_backward, comm
        self.inputs, self.outputs, self.device = inputs, outputs, device
        self.tensors = {}   # every Tensor of the call, released when it ends
        self.made = {}      # outputs allocated here: name -> NumPy array / DeviceArray
        self.host_dtype = None  # device="cuda" with host arrays: q's NumPy dtype (results come back in it)
        self.copy_back = {}     # ... and the caller's host outputs: name -> NumPy array

    def run(self, return_lse=False):
        try:
            try:
                kwargs = self._prepare(return_lse)
            except BaseException as e:  # any type: MemoryError, KeyboardInterrupt, ... as well
                if self.comm is not None:
                    refuse(self.comm, e, "backward" if self.backward else "forward")
                raise
            stats = _ext.run(**kwargs)
        finally:
            _arrays.release_all(self.tensors)
        return self._results(return_lse), stats

    # ---------------------------------------------------------- the stages
    def _prepare(self, return_lse):
        cfg, comm = self.cfg, self.comm
        dev = _arrays.parse_device(self.device)
        backend = None if comm is None else comm.backend
        handle = None if comm is None else comm.handle()
        inputs, outputs = list(self.inputs), list(self.outputs)
        objs = {name: _arrays.host_input(x) for name, x in self.inputs.items()}
        objs.update(self.outputs)
        self.tensors.update(_arrays.describe_all(objs))
        where = check.placement(self.tensors, inputs, dev, backend)
        on = "cpu" if where == "cpu" else "cuda"
        if on == "cpu":  # _ext.run applies the tensor rules and the plan's, once
            check.query_shape(self.tensors["q"])  # what _allocate needs
            copies = check.host_copies(self.tensors, inputs)
        else:  # before anything is copied to or allocated on a GPU
            copies = check.arguments(self.tensors, inputs, outputs, on, host_copied=(where == "host"))
        if outputs:
            check.no_overlap(self.tensors, inputs, outputs, self.in_place)  # the caller's arrays, before any copy
        requested = [("the requested device", dev[1] if dev is not None else None)]
        if backend == "nccl":
            requested.append(("the communicator's device", comm.device if comm.device >= 0 else None))
        if on == "cuda":
            check.one_device(self.tensors, requested)
        for name in copies:  # NumPy layouts the core cannot read: copied once
            self._replace(name, check.copy_for_core(self.tensors[name]))
        q = self.tensors["q"]
        device = -1
        if on == "cuda":  # on the CPU _ext.run applies the plan's rules
            check.plan_rules(cfg, q.shape, 1 if comm is None else comm.world_size, self.tensors["k"].shape[2])
            _arrays.require_gpu()
            check.device_memory(self.tensors)
            device = check.one_device(self.tensors, requested)
            if device is None:
                device = _ext.current_device()
        if where == "host":
            self._copy_in(device)
        self._allocate(on, device, return_lse)
        stream = None
        if on == "cuda":
            stream, others = _arrays.choose_stream(self.tensors.values())
            for s in others:  # arguments ready on other streams: wait for them first
                _ext.synchronize(s, device)
        t = self.tensors
        return dict(backward=self.backward, q=t["q"], k=t["k"], v=t["v"], o=t["o" if self.backward else "out"],
                    lse=t.get("lse"), dout=t.get("dout"), dq=t.get("dq"), dk=t.get("dk"), dv=t.get("dv"),
                    device_type=_ext.DEVICE_CPU if on == "cpu" else _ext.DEVICE_CUDA,
                    segment_lengths=cfg.segment_lengths, dilation_rates=cfg.dilation_rates, causal=cfg.causal,
                    mode=cfg.mode, scale=cfg.scale, world_size=cfg.world_size if comm is None else comm.world_size,
                    partition=cfg.partition,
                    num_threads=cfg.num_threads if on == "cpu" else 0,
                    check_finite=cfg.check_finite and on == "cpu", device=device,
                    stream=0 if stream in (None, _arrays.LEGACY_STREAM) else stream, comm=handle)

    def _replace(self, name, obj):
        """The argument `name` is now `obj` (a copy): describe that instead."""
        self.tensors.pop(name).release()
        self.tensors[name] = _arrays.describe(obj, name)

    def _copy_in(self, device):
        """device="cuda" with host arrays: every host array goes to the GPU
        (host outputs get a device twin, copied back after the run)."""
        self.host_dtype = _arrays.host_array(self.tensors["q"]).dtype
        for name in list(self.inputs) + list(self.outputs):
            t = self.tensors[name]
            if t.kind != "cpu":
                continue
            dtype = t.dtype
            if name in self.inputs:
                twin = DeviceArray.from_numpy(_arrays.host_array(t), dtype, device)
            else:
                twin = DeviceArray(t.shape, dtype, device)
                self.copy_back[name] = self.outputs[name]
            self.made[name] = twin
            self._replace(name, twin)

    def _allocate(self, on, device, return_lse):
        q = self.tensors["q"]
        b, n, h, _ = q.shape
        if self.backward:
            k = self.tensors["k"]  # dk, dv: k's shape (h_kv heads)
            wanted = [("dq", q.shape, q.dtype), ("dk", k.shape, q.dtype), ("dv", k.shape, q.dtype)]
        else:
            wanted = [("out", q.shape, q.dtype)]
            if return_lse:
                wanted.append(("lse", (b, h, n), check.lse_dtype(q.dtype)))
        for name, shape, dtype in wanted:
            if name in self.tensors:
                continue
            if on == "cpu":
                obj = np.empty(shape, _arrays.host_dtype(dtype, q if dtype == q.dtype else None))
            else:
                obj = DeviceArray(shape, dtype, device)
            self.made[name] = obj
            self.tensors[name] = _arrays.describe(obj, name)

    def _results(self, return_lse):
        if self.backward:
            return tuple(self._result(name) for name in ("dq", "dk", "dv"))
        o = self._result("out")
        return (o, self._result("lse")) if return_lse else (o,)

    def _result(self, name):
        if self.host_dtype is not None and name in self.made:  # device="cuda" with host arrays
            made = self.made[name]
            value = _arrays.caller_array(made._raw_numpy(), made._dtype, self.host_dtype)
            if name not in self.copy_back:
                return value
            self.copy_back[name][...] = value
            return self.copy_back[name]
        if name in self.outputs:
            return self.outputs[name]
        return self.made[name]


def refuse(comm, error, op):
    """Take part in the agreement of the call `op` ("forward", "backward",
    "gather") with this rank's failure, so that the other ranks raise too;
    the original error is what this rank raises."""
    try:
        comm.refuse(error, op)
    except Exception:  # noqa: BLE001 - e.g. a closed communicator: nothing more to tell
        pass
