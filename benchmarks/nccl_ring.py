"""The multi-process NCCL ring on one GPU (issue 17), driven by benchmarks/nccl_check.sh.

k processes (Python multiprocessing, spawn) share GPU 0; rank 0 makes the NCCL
unique id and hands it to the others through a queue; every rank builds
ringattn.Communicator.nccl(uid, k, rank, device=0, timeout=...) with
NCCL_MULTI_RANK_GPU_ENABLE=1 (NCCL >= 2.30 refuses several ranks per GPU
without it, older NCCL always does).  Each rank then runs, on torch CUDA
tensors of its shard (ringattn.split_sequence of the full host inputs):

  * forward and backward of RingDilatedAttention(comm=comm), compared with the
    single-rank result (world_size=1 on the full sequence, computed by the
    same rank after its ring call, so that the memory figures are the ring's);
  * last_stats (peak_bytes, bytes_sent), torch.cuda.max_memory_allocated;
  * the time per forward+backward;
  * mismatched calls (one rank forward, the others backward; one rank another
    configuration), which must raise on every rank, no rank hanging;
  * optionally a rank that never joins a call: the others must end at the
    communicator's timeout (NCCL sends no notices).

A separate baseline process times the same work without NCCL: world_size=1
on the full sequence, the in-process ring (k threads on the GPU, transfers as
device-to-device copies) and world_size=1 on one rank's shard (n/k).  The
library has no switch that skips the ring's transfers, so "time without
transfers" is these proxies, not the same ring with its sends removed.

Every child is joined with a timeout and killed when it overruns; results go
to --json, per-rank logs (NCCL's own output included) to --out, the table is
printed last.  Exit status: 0 all passed, 1 a check failed or a process hung,
2 no CUDA device, 3 NCCL older than 2.30 and no newer library found.

--dry-run does everything that needs no GPU (arguments, the NCCL probe and
choice, the plan of steps, the table and JSON writers) and exits 0.
"""

import argparse
import ctypes
import json
import os
import sys
import time
import traceback

MIN_NCCL = (2, 30, 0)
CARRIED = os.path.join("build-nccl", "lib", "libnccl.so.2")

# name -> (segment_lengths (None: [n]), dilation_rates, causal, heads, head_dim)
CONFIGS = {
    "seed": ([2048, 4096], [1, 2], True, 12, 64),
    "dense": (None, [1], True, 12, 64),
}
# max |ring - single rank| / max |single rank|, per dtype (outputs and gradients)
TOLERANCE = {"bf16": 2e-2, "fp16": 4e-3}
EXIT_OK, EXIT_FAIL, EXIT_NO_GPU, EXIT_OLD_NCCL = 0, 1, 2, 3


# ------------------------------------------------------------------ arguments
def _int_list(text):
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _choice_list(choices):
    def parse(text):
        values = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in values if x not in choices]
        if not values or bad:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {sorted(choices)}, got {text!r}")
        return values
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ks", type=_int_list, default=[2, 4], help="ranks per run (default 2,4)")
    p.add_argument("--n", type=int, default=8192, help="sequence length (default 8192)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--configs", type=_choice_list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--dtypes", type=_choice_list(TOLERANCE), default=list(TOLERANCE))
    p.add_argument("--iters", type=int, default=5, help="timed forward+backward calls (default 5)")
    p.add_argument("--comm-timeout", type=float, default=60.0, help="Communicator.nccl timeout, s (60)")
    p.add_argument("--absent-timeout", type=float, default=5.0,
                   help="communicator timeout of the absent-rank step, s (5)")
    p.add_argument("--no-absent", action="store_true", help="skip the absent-rank step")
    p.add_argument("--join-timeout", type=float, default=150.0,
                   help="seconds a whole k-rank run (or the baseline) may take before its processes are killed")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole driver: later runs get shorter join timeouts so that the "
                        "table is always written (nccl_check.sh passes what is left of its budget)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="directory for per-rank logs (default: none)")
    p.add_argument("--json", default=None, help="write the full results here")
    p.add_argument("--table", default=None, help="write the table here")
    p.add_argument("--dry-run", action="store_true", help="no GPU: probe, plan, write, exit 0")
    p.add_argument("--rehearse-mpi", action="store_true",
                   help="run one rank's steps over MPI on the CPU (under mpirun; no GPU, no NCCL)")
    args = p.parse_args(argv)
    if args.n < 1 or args.iters < 0 or args.batch < 1:
        p.error("--n and --batch must be positive, --iters non-negative")
    for k in args.ks:
        if args.n % k:
            p.error(f"--n {args.n} is not divisible by k = {k}")
    if args.comm_timeout <= 0 or args.absent_timeout <= 0 or args.join_timeout <= 0 or \
            (args.budget is not None and args.budget <= 0):
        p.error("timeouts must be positive")
    return args


def config_kwargs(name, n):
    segs, rates, causal, h, d = CONFIGS[name]
    return {"segment_lengths": list(segs) if segs else [n], "dilation_rates": list(rates), "causal": causal}, h, d


# ------------------------------------------------------------------ NCCL version
def decode_version(code):
    """ncclGetVersion's integer -> (major, minor, patch) (2.9+: x*10000+y*100+z)."""
    code = int(code)
    if code >= 10000:
        return code // 10000, code // 100 % 100, code % 100
    return code // 1000, code // 100 % 10, code % 100


def nccl_library_version(path):
    """(version tuple, the file actually loaded) of a libnccl, or (None, error)."""
    try:
        lib = ctypes.CDLL(path, mode=getattr(os, "RTLD_LOCAL", 0))
        v = ctypes.c_int(0)
        if lib.ncclGetVersion(ctypes.byref(v)) != 0:
            return None, f"ncclGetVersion failed in {path}"
    except (OSError, AttributeError) as e:
        return None, f"{path}: {e}"
    if os.path.basename(path) != path:  # a path: that file is what was loaded
        return decode_version(v.value), os.path.realpath(path)
    loaded = path
    try:  # a bare soname: which file the loader picked (it may resolve to torch's copy)
        with open("/proc/self/maps") as f:
            for line in f:
                if "libnccl" in line and "/" in line:
                    loaded = line.split(None, 5)[-1].strip()
                    break
    except OSError:
        pass
    return decode_version(v.value), loaded


def vstr(version):
    return ".".join(str(x) for x in version) if version else "unknown"


def choose_nccl(env_library, loaded_version, carried_path, carried_version):
    """What to do about NCCL.  env_library: RINGATTN_NCCL_LIBRARY ('' or None
    when unset); loaded_version: the version ringattn loads (that library, or
    the default soname); carried_path/carried_version: the carried build
    (None when absent).  Returns (exit_code or None, library to set in
    RINGATTN_NCCL_LIBRARY or None, message)."""
    if env_library:
        if loaded_version is None:
            return EXIT_OLD_NCCL, None, (f"RINGATTN_NCCL_LIBRARY={env_library} cannot be loaded or has no "
                                         f"ncclGetVersion; several ranks per GPU need NCCL >= {vstr(MIN_NCCL)}")
        if tuple(loaded_version) < MIN_NCCL:
            return EXIT_OLD_NCCL, None, (f"RINGATTN_NCCL_LIBRARY={env_library} is NCCL {vstr(loaded_version)}: "
                                         f"NCCL < {vstr(MIN_NCCL)} refuses several ranks on one GPU "
                                         f"(\"Duplicate GPU detected\"); point it at NCCL >= {vstr(MIN_NCCL)}")
        return None, env_library, f"using RINGATTN_NCCL_LIBRARY={env_library} (NCCL {vstr(loaded_version)})"
    if loaded_version is not None and tuple(loaded_version) >= MIN_NCCL:
        return None, None, f"using the default libnccl (NCCL {vstr(loaded_version)})"
    if carried_path and carried_version is not None and tuple(carried_version) >= MIN_NCCL:
        return None, carried_path, (f"the default libnccl is NCCL {vstr(loaded_version)} (< {vstr(MIN_NCCL)}); "
                                    f"using the carried build {carried_path} (NCCL {vstr(carried_version)})")
    if loaded_version is None:
        head = f"libnccl.so.2 cannot be loaded (several ranks per GPU need NCCL >= {vstr(MIN_NCCL)})"
    else:
        head = (f"NCCL {vstr(loaded_version)} is older than {vstr(MIN_NCCL)}: NCCL < {vstr(MIN_NCCL)} refuses "
                f"several ranks per GPU (\"Duplicate GPU detected\")")
    found = (f"; the carried {carried_path} is NCCL {vstr(carried_version)}" if carried_path else
             f"; no carried build at {CARRIED}")
    return EXIT_OLD_NCCL, None, (f"{head}{found}. Carry an NCCL >= {vstr(MIN_NCCL)} build (see docs/gpu.md) or set "
                                 f"RINGATTN_NCCL_LIBRARY; stopping.")


def probe_nccl(repo, environ=os.environ):
    """Probe the library ringattn will dlopen and the carried build; decide."""
    info = {}
    try:
        import torch  # loads torch's libnccl, which a bare dlopen("libnccl.so.2") then finds
        info["torch"] = torch.__version__
        try:
            info["torch_nccl"] = vstr(torch.cuda.nccl.version())
        except Exception as e:  # noqa: BLE001 - no CUDA build of torch
            info["torch_nccl"] = f"unavailable ({type(e).__name__})"
    except ImportError:
        info["torch"] = None
    env_library = environ.get("RINGATTN_NCCL_LIBRARY", "")
    loaded_version, loaded = nccl_library_version(env_library or "libnccl.so.2")
    info["ringattn_library"] = loaded
    info["ringattn_nccl"] = vstr(loaded_version)
    carried = os.path.join(repo, CARRIED)
    carried_version = None
    if os.path.exists(carried):
        carried_version, _ = nccl_library_version(carried)
        info["carried"] = carried
        info["carried_nccl"] = vstr(carried_version)
    code, library, message = choose_nccl(env_library, loaded_version, carried if os.path.exists(carried) else None,
                                         carried_version)
    info.update(exit=code, library=library, message=message)
    return info


# ------------------------------------------------------------------ plan
def plan_steps(args):
    steps = []
    for k in args.ks:
        for name in args.configs:
            for dt in args.dtypes:
                steps.append({"k": k, "step": "ring", "config": name, "dtype": dt})
        steps.append({"k": k, "step": "mismatch-op"})
        steps.append({"k": k, "step": "mismatch-config"})
        steps.append({"k": k, "step": "after-mismatch"})
        if not args.no_absent:
            steps.append({"k": k, "step": "absent-rank"})
    for name in args.configs:
        for dt in args.dtypes:
            steps.append({"k": 0, "step": "baseline", "config": name, "dtype": dt})
    return steps


# ------------------------------------------------------------------ children
def _redirect(path):
    """Send this process's fds 1 and 2 (NCCL's C output too) to a file."""
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _inputs(args, name, n=None):
    import numpy as np
    kw, h, d = config_kwargs(name, n or args.n)
    rng = np.random.default_rng(args.seed)
    shape = (args.batch, n or args.n, h, d)
    q, k, v, dout = (rng.standard_normal(shape, dtype=np.float32) for _ in range(4))
    return kw, (q, k, v, dout)


class CudaDev:
    """Arrays of a rank on GPU 0 as torch tensors."""

    def __init__(self):
        import torch
        self.torch = torch
        self.dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
        torch.cuda.set_device(0)

    def array(self, x, dname):
        return self.torch.from_numpy(x).to(device="cuda:0", dtype=self.dtypes[dname]).contiguous()

    def numpy(self, x):
        if not isinstance(x, self.torch.Tensor):  # ringattn returns DeviceArrays for torch inputs
            x = self.torch.from_dlpack(x)
        return x.float().cpu().numpy()

    def process_bytes(self):
        """This process's device memory as NVML sees it (context, pools and
        all), or None without pynvml."""
        try:
            import pynvml
            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if p.pid == os.getpid():
                    return p.usedGpuMemory
        except Exception:  # noqa: BLE001
            return None
        return None

    def sync(self):
        self.torch.cuda.synchronize()

    def allocated(self):
        return self.torch.cuda.memory_allocated()

    def reset_peak(self):
        self.torch.cuda.reset_peak_memory_stats()

    def peak(self):
        return self.torch.cuda.max_memory_allocated()


class CpuDev:
    """The rehearsal on the CPU (over MPI): NumPy arrays, bf16 computed as float32."""

    def array(self, x, dname):
        import numpy as np
        return np.ascontiguousarray(x, dtype=np.float16 if dname == "fp16" else np.float32)

    def numpy(self, x):
        import numpy as np
        return np.asarray(x, dtype=np.float32)

    def sync(self):
        pass

    def allocated(self):
        return 0

    reset_peak = sync
    peak = allocated

    def process_bytes(self):
        return None


def _rel(a, ref):
    """max |a - ref| / max |ref| of two float32 NumPy arrays."""
    import numpy as np
    scale = float(np.abs(ref).max()) or 1.0
    return float(np.abs(a - ref).max()) / scale


def _time_calls(dev, fn, iters):
    if iters <= 0:
        return None
    fn()
    dev.sync()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    dev.sync()
    return (time.perf_counter() - t) / iters * 1e3


def _expect_raise(put, base, fn, expect):
    t = time.perf_counter()
    try:
        fn()
    except BaseException as e:  # noqa: BLE001
        put(dict(base, raised=type(e).__name__, message=str(e)[:400], seconds=time.perf_counter() - t,
                 ok=expect in str(e)))
    else:
        put(dict(base, raised=None, message="returned normally", seconds=time.perf_counter() - t, ok=False))


def rank_main(args, k, rank, uid_queues, results, log):
    """One rank of a k-rank NCCL ring (a spawned process)."""
    _redirect(log)
    base = {"k": k, "rank": rank}

    def put(d):
        results.put(d)
        print(json.dumps(d), flush=True)

    try:
        import ringattn
        dev = CudaDev()
        if rank == 0:
            uid = ringattn.nccl_unique_id()
            for qu in uid_queues:
                qu.put(uid)
        else:
            uid = uid_queues[rank - 1].get(timeout=args.comm_timeout)
        t = time.perf_counter()
        comm = ringattn.Communicator.nccl(uid, k, rank, device=0, timeout=args.comm_timeout)
        put(dict(base, step="init", ok=True, seconds=time.perf_counter() - t, comm=repr(comm)))
        rank_body(args, comm, dev, put)
    except BaseException as e:  # noqa: BLE001
        put(dict(base, step="error", ok=False, raised=type(e).__name__, message=str(e)[:2000],
                 traceback=traceback.format_exc()[-4000:]))


def rehearse_main(args):
    """--rehearse-mpi: the ranks' steps over an MPI communicator on the CPU
    (started by mpirun), to check the driver's logic without a GPU.  Records
    go to OUT/rehearse_rank<r>.jsonl."""
    import ringattn
    comm = ringattn.Communicator.mpi(timeout=args.comm_timeout)
    k, rank = comm.world_size, comm.rank
    path = os.path.join(args.out or ".", f"rehearse_rank{rank}.jsonl")
    with open(path, "w") as f:
        def put(d):
            f.write(json.dumps(d, default=str) + "\n")
            f.flush()
        put({"k": k, "rank": rank, "step": "init", "ok": True, "seconds": 0.0, "comm": repr(comm)})
        try:
            rank_body(args, comm, CpuDev(), put)
        except BaseException as e:  # noqa: BLE001
            put({"k": k, "rank": rank, "step": "error", "ok": False, "raised": type(e).__name__,
                 "message": str(e)[:2000], "traceback": traceback.format_exc()[-4000:]})
    return 0


def rank_body(args, comm, dev, put):
    """Every step of one rank on its communicator (NCCL on the GPU, or MPI in
    the CPU rehearsal)."""
    import ringattn
    k, rank = comm.world_size, comm.rank
    base = {"k": k, "rank": rank}
    rings = {}
    for name in args.configs:
        for dname in args.dtypes:
            step = dict(base, step="ring", config=name, dtype=dname)
            kw, (q, kk, v, dout) = _inputs(args, name)
            shard = [dev.array(ringattn.split_sequence(x, k, rank), dname) for x in (q, kk, v, dout)]
            ring = rings.setdefault(name, ringattn.RingDilatedAttention(**kw, comm=comm))
            dev.sync()
            before = dev.allocated()
            dev.reset_peak()
            o = ring(*shard[:3], requires_grad=True)
            fwd_stats = ring.last_stats
            grads = ring.backward(shard[3])
            bwd_stats = ring.last_stats
            dev.sync()
            dev_peak = dev.peak() - before
            process_bytes = dev.process_bytes()

            def call(ring=ring, shard=shard):
                ring(*shard[:3], requires_grad=True)
                ring.backward(shard[3])
            ms = _time_calls(dev, call, args.iters)

            # the single-rank result on the full sequence, this rank's part of it
            full = [dev.array(x, dname) for x in (q, kk, v, dout)]
            one = ringattn.RingDilatedAttention(**kw, world_size=1)
            o1 = one(*full[:3], requires_grad=True)
            g1 = one.backward(full[3])
            sl = slice(rank * (args.n // k), (rank + 1) * (args.n // k))

            def part(x, sl=sl):  # DeviceArrays do not slice: through NumPy
                return dev.numpy(x)[:, sl]
            errs = {"o": _rel(dev.numpy(o), part(o1))}
            errs.update({g: _rel(dev.numpy(a), part(b)) for g, a, b in zip(("dq", "dk", "dv"), grads, g1)})
            tol = TOLERANCE[dname]
            put(dict(step, ok=all(e <= tol for e in errs.values()), errors=errs, tolerance=tol,
                     fwd_peak_bytes=fwd_stats["peak_bytes"][0], bwd_peak_bytes=bwd_stats["peak_bytes"][0],
                     fwd_bytes_sent=fwd_stats["bytes_sent"][0], bwd_bytes_sent=bwd_stats["bytes_sent"][0],
                     steps=fwd_stats["steps"][0], steps_skipped=fwd_stats["steps_skipped"][0],
                     torch_peak_bytes=dev_peak, process_gpu_bytes=process_bytes, ms=ms))
            del full, o1, g1, o, grads

    # mismatched calls: every rank must raise, none may hang
    name, dname = args.configs[0], args.dtypes[0]
    kw, (q, kk, v, dout) = _inputs(args, name)
    shard = [dev.array(ringattn.split_sequence(x, k, rank), dname) for x in (q, kk, v, dout)]
    ring = rings[name]
    ring(*shard[:3], requires_grad=True)  # so that backward() has a forward to use
    if rank == 0:
        _expect_raise(put, dict(base, step="mismatch-op"), lambda: ring(*shard[:3]), "differs")
    else:
        _expect_raise(put, dict(base, step="mismatch-op"), lambda: ring.backward(shard[3]), "differs")
    other = ringattn.RingDilatedAttention(**dict(kw, causal=not kw["causal"]), comm=comm)
    use = ring if rank == 0 else other
    _expect_raise(put, dict(base, step="mismatch-config"), lambda: use(*shard[:3]), "differs")
    t = time.perf_counter()
    try:
        ring(*shard[:3])
        put(dict(base, step="after-mismatch", ok=comm.broken is None, broken=comm.broken,
                 seconds=time.perf_counter() - t))
    except BaseException as e:  # noqa: BLE001
        put(dict(base, step="after-mismatch", ok=False, raised=type(e).__name__, message=str(e)[:400],
                 seconds=time.perf_counter() - t))

    if args.no_absent:
        comm.close()
        put(dict(base, step="closed", ok=True))
        return
    # a rank that never joins: the others end at the communicator's timeout
    comm.timeout = args.absent_timeout
    if rank == k - 1:
        time.sleep(args.absent_timeout + 5)
        put(dict(base, step="absent-rank", ok=True, absent=True))
    else:
        _expect_raise(put, dict(base, step="absent-rank"), lambda: ring(*shard[:3]), "timed out")
    # no close(): the communicator is broken on the waiting ranks (close is collective)


def baseline_main(args, results, log):
    """The same work without NCCL, alone on the GPU."""
    _redirect(log)
    try:
        import ringattn
        dev = CudaDev()
        for name in args.configs:
            for dname in args.dtypes:
                row = {"step": "baseline", "config": name, "dtype": dname, "ok": True}
                kw, (q, kk, v, dout) = _inputs(args, name)
                full = [dev.array(x, dname) for x in (q, kk, v, dout)]
                for world in [1] + list(args.ks):
                    ring = ringattn.RingDilatedAttention(**kw, world_size=world)

                    def call(ring=ring, full=full):
                        ring(*full[:3], requires_grad=True)
                        ring.backward(full[3])
                    row[f"inproc_k{world}_ms"] = _time_calls(dev, call, args.iters)
                for world in args.ks:  # one rank's shard alone: n/k tokens, k = 1
                    L = args.n // world
                    kw1, _ = config_kwargs(name, L)
                    if name == "seed" and any(s > L for s in kw["segment_lengths"]):
                        row[f"shard_k{world}_ms"] = None  # the seed's segments do not fit n/k
                        continue
                    part = [x[:, :L].contiguous() for x in full]
                    ring = ringattn.RingDilatedAttention(**(kw if name == "seed" else kw1), world_size=1)

                    def call(ring=ring, part=part):
                        ring(*part[:3], requires_grad=True)
                        ring.backward(part[3])
                    row[f"shard_k{world}_ms"] = _time_calls(dev, call, args.iters)
                results.put(row)
                print(json.dumps(row), flush=True)
    except BaseException as e:  # noqa: BLE001
        results.put({"step": "baseline-error", "ok": False, "raised": type(e).__name__, "message": str(e)[:2000],
                     "traceback": traceback.format_exc()[-4000:]})


# ------------------------------------------------------------------ parent
def run_processes(targets, join_timeout, results):
    """Start processes, collect their results, join each with the remaining
    time, kill overrunners.  Returns (records, [names that hung])."""
    records, hung = [], []
    for p in targets:
        p.start()
    deadline = time.monotonic() + join_timeout
    import queue as _queue
    while time.monotonic() < deadline and any(p.is_alive() for p in targets):
        try:
            records.append(results.get(timeout=0.2))
        except _queue.Empty:
            pass
    for p in targets:
        p.join(timeout=max(0.1, deadline - time.monotonic()))
        if p.is_alive():
            hung.append(p.name)
            p.terminate()
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
    while True:
        try:
            records.append(results.get(timeout=0.5))
        except _queue.Empty:
            break
    for p in targets:
        if p.exitcode not in (0, None) and p.name not in hung:
            records.append({"step": "exit", "process": p.name, "ok": False, "exitcode": p.exitcode})
    return records, hung


def _mb(x):
    return "-" if x is None else f"{x / 2**20:.1f}"


def _ms(x):
    return "-" if x is None else f"{x:.3f}"


def summarize(records, hung, args, dry=False):
    """Rows of the table and whether everything passed."""
    ok = not hung and all(r.get("ok", True) for r in records)
    ring_rows, check_rows = [], []
    base = {(r["config"], r["dtype"]): r for r in records if r.get("step") == "baseline"}
    for k in args.ks:
        for name in args.configs:
            for dname in args.dtypes:
                rs = [r for r in records if r.get("step") == "ring" and r.get("k") == k
                      and r.get("config") == name and r.get("dtype") == dname]
                b = base.get((name, dname), {})
                if len(rs) != k:
                    ok = False
                if not rs:
                    ring_rows.append([k, name, dname, "not run" if dry else "MISSING"] + ["-"] * 8)
                    continue
                fwd = max(r["errors"]["o"] for r in rs)
                bwd = max(max(r["errors"][g] for g in ("dq", "dk", "dv")) for r in rs)
                passed = all(r["ok"] for r in rs) and len(rs) == k
                ring_rows.append([
                    k, name, dname, "ok" if passed else "FAIL", f"{fwd:.1e}", f"{bwd:.1e}",
                    _mb(max(max(r["fwd_peak_bytes"], r["bwd_peak_bytes"]) for r in rs)),
                    _mb(max(r["torch_peak_bytes"] for r in rs)),
                    _mb(max(r["fwd_bytes_sent"] + r["bwd_bytes_sent"] for r in rs)),
                    _ms(max((r["ms"] for r in rs if r["ms"] is not None), default=None)),
                    _ms(b.get(f"inproc_k{k}_ms")), _ms(b.get(f"shard_k{k}_ms")),
                ])
    for k in args.ks:
        for step in ("init", "mismatch-op", "mismatch-config", "after-mismatch", "absent-rank"):
            if step == "absent-rank" and args.no_absent:
                continue
            rs = [r for r in records if r.get("step") == step and r.get("k") == k]
            expected = k
            if len(rs) != expected:
                ok = False
            raised = sorted({r.get("raised") or "-" for r in rs if not r.get("absent")})
            secs = max((r.get("seconds", 0.0) for r in rs), default=0.0)
            passed = len(rs) == expected and all(r.get("ok") for r in rs)
            check_rows.append([k, step, "not run" if dry else "ok" if passed else "FAIL", f"{len(rs)}/{expected}", ",".join(raised),
                               f"{secs:.2f}"])
    for r in records:
        if r.get("step") in ("error", "baseline-error", "exit"):
            check_rows.append([r.get("k", "-"), r["step"], "FAIL", f"rank {r.get('rank', '-')}",
                               r.get("raised", r.get("exitcode", "")), (r.get("message") or "")[:60]])
    for name in hung:
        check_rows.append(["-", "hung", "FAIL", name, "killed", "-"])
    return ring_rows, check_rows, ok


RING_HEAD = ["k", "config", "dtype", "result", "fwd err", "bwd err", "peak MB/rank", "torch MB/rank",
             "MB sent/rank", "ms nccl", "ms inproc k", "ms k=1 n/k"]
CHECK_HEAD = ["k", "check", "result", "ranks", "raised", "max s"]


def format_table(ring_rows, check_rows, header=""):
    def md(head, rows):
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
        return lines
    out = [header] if header else []
    out += md(RING_HEAD, ring_rows) + [""] + md(CHECK_HEAD, check_rows)
    return "\n".join(out) + "\n"


def write_results(path_json, path_table, payload, table):
    if path_json:
        with open(path_json, "w") as f:
            json.dump(payload, f, indent=1, default=str)
    if path_table:
        with open(path_table, "w") as f:
            f.write(table)


def main(argv=None, repo=None):
    args = parse_args(argv)
    if args.rehearse_mpi:
        return rehearse_main(args)
    repo = repo or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.environ.setdefault("NCCL_MULTI_RANK_GPU_ENABLE", "1")
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")  # one host, no network needed
    os.environ.setdefault("NCCL_DEBUG", "INFO")  # into the per-rank logs, not the table
    info = probe_nccl(repo)
    for key in ("torch", "torch_nccl", "ringattn_library", "ringattn_nccl", "carried", "carried_nccl"):
        if key in info:
            print(f"nccl probe: {key} = {info[key]}", flush=True)
    print(f"nccl probe: {info['message']}", flush=True)
    payload = {"args": vars(args), "nccl": info, "env": {k: v for k, v in os.environ.items()
                                                         if k.startswith(("NCCL_", "RINGATTN_"))}}
    if info["exit"] is not None:
        payload["result"] = "old-nccl"
        write_results(args.json, None, payload, "")
        print(f"STOP: {info['message']}", flush=True)
        return info["exit"]
    if not info["library"] and os.path.isabs(info.get("ringattn_library") or ""):
        # pin the file the probe checked: a rank that loaded NCCL before torch
        # could otherwise find another libnccl.so.2 on the loader's path (CUDA
        # 13's /usr/local/cuda/lib64 has NCCL 2.28)
        info["library"] = info["ringattn_library"]
    if info["library"]:
        os.environ["RINGATTN_NCCL_LIBRARY"] = info["library"]
        payload["env"]["RINGATTN_NCCL_LIBRARY"] = info["library"]
    steps = plan_steps(args)
    payload["plan"] = steps
    used = info.get("carried_nccl") if info["library"] and info["library"] == info.get("carried") \
        else info["ringattn_nccl"]
    info["used_nccl"] = used
    header = f"NCCL {used}, n = {args.n}, b = {args.batch}, {args.iters} timed calls"
    if args.dry_run:
        for s in steps:
            print("plan:", json.dumps(s), flush=True)
        ring_rows, check_rows, _ = summarize([], [], args, dry=True)
        table = format_table(ring_rows, check_rows, header + " (dry run: nothing ran)")
        payload["result"] = "dry-run"
        write_results(args.json, args.table, payload, table)
        print(table, end="")
        return EXIT_OK

    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    try:
        import ringattn
        ngpu = ringattn.cuda_device_count()
    except Exception as e:  # noqa: BLE001
        print(f"cannot import ringattn: {e}", flush=True)
        return EXIT_FAIL
    if not ngpu:
        print("NO CUDA DEVICE visible (ringattn.cuda_device_count() == 0)", flush=True)
        return EXIT_NO_GPU
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    log = (lambda name: os.path.join(args.out, name + ".log")) if args.out else (lambda name: None)
    records, hung = [], []
    t0 = time.monotonic()

    def join_timeout(runs_after):
        """--join-timeout, cut so that the runs after this one get 20 s each and the table 10 s."""
        if args.budget is None:
            return args.join_timeout
        return max(5.0, min(args.join_timeout, args.budget - (time.monotonic() - t0) - 10 - 20 * runs_after))

    for i, k in enumerate(args.ks):
        results = ctx.Queue()
        uid_queues = [ctx.Queue() for _ in range(k - 1)]
        procs = [ctx.Process(target=rank_main, name=f"k{k}-rank{r}",
                             args=(args, k, r, uid_queues, results, log(f"nccl_k{k}_rank{r}")))
                 for r in range(k)]
        t = time.monotonic()
        recs, h = run_processes(procs, join_timeout(len(args.ks) - i), results)
        print(f"k = {k}: {len(recs)} records in {time.monotonic() - t:.1f} s"
              + (f", HUNG: {', '.join(h)}" if h else ""), flush=True)
        records += recs
        hung += h
    results = ctx.Queue()
    t = time.monotonic()
    recs, h = run_processes([ctx.Process(target=baseline_main, name="baseline",
                                         args=(args, results, log("baseline")))], join_timeout(0), results)
    print(f"baseline: {len(recs)} records in {time.monotonic() - t:.1f} s" + (" HUNG" if h else ""), flush=True)
    records += recs
    hung += h
    ring_rows, check_rows, ok = summarize(records, hung, args)
    table = format_table(ring_rows, check_rows, header)
    payload.update(records=records, hung=hung, result="pass" if ok else "fail")
    write_results(args.json, args.table, payload, table)
    print(table, end="")
    return EXIT_OK if ok else EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
