"""The GPU path against the float64 NumPy reference (needs a CUDA device).

Skipped as a whole when ringattn.cuda_device_count() == 0; the torch and CuPy
interop tests are skipped when those packages (or their CUDA support) are
missing.  Inputs are random but reproducible: every case derives its seed
from RINGATTN_TEST_SEED (default 0, printed in pytest's header) and its own
parameters, and names it in every failure message.  Outputs are NaN-poisoned,
so that a row the kernels forget to write shows up.  Inputs in
float16/bfloat16 are rounded on the host first and the reference is computed
from the rounded values, so the tolerances measure the kernels only:
max|o - ref| <= tol * max|ref| with tol 1e-2 for float16 and bfloat16 and
1e-4 for float32.
"""

import zlib

import numpy as np
import pytest

import ringattn
from ringattn import DeviceArray, _arrays, _ext

if ringattn.cuda_device_count() == 0:
    pytest.skip("no CUDA device (ringattn.cuda_device_count() == 0)", allow_module_level=True)

from conftest import TEST_SEED  # noqa: E402  (tests/ is on sys.path via conftest)
from reference import reference_attention, reference_backward  # noqa: E402

try:
    import torch
    if not torch.cuda.is_available():
        torch = None
except ImportError:  # pragma: no cover
    torch = None

try:
    import cupy
    cupy.cuda.runtime.getDeviceCount()
except Exception:  # noqa: BLE001 - ImportError or no CUDA for CuPy
    cupy = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch with CUDA not available")
needs_cupy = pytest.mark.skipif(cupy is None, reason="CuPy not available")

DTYPES = ["float32", "float16", "bfloat16"]
OUT_TOL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 1e-2}
LSE_TOL = {"float32": (1e-4, 1e-5), "float16": (2e-3, 1e-3), "bfloat16": (2e-3, 1e-3)}  # (atol, rtol)
GRAD_TOL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 3e-2}


# -------------------------------------------------------------------- inputs

def case_seed(*key):
    """A reproducible seed for one case: RINGATTN_TEST_SEED and the case's key."""
    seed = (TEST_SEED + zlib.crc32(repr(key).encode())) % 2 ** 32
    print(f"seed {seed} for {key} (RINGATTN_TEST_SEED={TEST_SEED})")
    return seed


def host_inputs(seed, shape, dtype, count=3):
    """`count` float32 host arrays holding values exactly representable in dtype."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        x = rng.standard_normal(shape).astype(np.float32)
        if dtype == "float16":
            x = x.astype(np.float16).astype(np.float32)
        elif dtype == "bfloat16":
            x = _arrays.bf16_bits_to_f32(_arrays.f32_to_bf16_bits(x))
        out.append(x)
    return out


def device_inputs(seed, shape, dtype, count=3):
    """(host arrays, DeviceArrays holding them in dtype)."""
    hosts = host_inputs(seed, shape, dtype, count)
    return hosts, [DeviceArray.from_numpy(x, dtype) for x in hosts]


def torch_inputs(seed, shape, dtype, count=3, requires_grad=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(*shape, device="cuda", dtype=getattr(torch, dtype), generator=g).requires_grad_(requires_grad)
            for _ in range(count)]


def to_numpy(x):
    """A result as float64 NumPy: DeviceArray, torch tensor, CuPy or NumPy array."""
    if isinstance(x, DeviceArray):
        x = x.numpy()
    elif torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    elif cupy is not None and isinstance(x, cupy.ndarray):
        x = cupy.asnumpy(x)
    return np.asarray(x, dtype=np.float64)


# ------------------------------------------------------------------ checks

def check_close(got, ref, tol, what):
    """max|got - ref| <= tol * max(max|ref|, 1e-3), every value finite."""
    got = to_numpy(got)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    assert np.all(np.isfinite(got)), f"{what}: non-finite values ({np.isnan(got).sum()} NaN): unwritten rows?"
    denom = max(float(np.abs(ref).max()), 1e-3)
    err = float(np.abs(got - ref).max())
    assert err <= tol * denom, f"{what}: max abs err {err:.3e} > {tol:.0e} * {denom:.3e}"


def check_out(o, ref, dtype, what):
    check_close(o, ref, OUT_TOL[dtype], what)


def check_lse(lse, ref, dtype, what):
    lse = to_numpy(lse)
    assert lse.shape == ref.shape, f"{what}: lse shape {lse.shape} != {ref.shape}"
    ninf = np.isneginf(ref)
    assert np.array_equal(np.isneginf(lse), ninf), f"{what}: lse -inf pattern differs"
    assert not np.isnan(lse).any(), f"{what}: lse holds NaN"
    fin = ~ninf
    atol, rtol = LSE_TOL[dtype]
    err = np.abs(lse[fin] - ref[fin])
    assert np.all(err <= atol + rtol * np.abs(ref[fin])), f"{what}: lse err {float(err.max()):.3e}"


def check_grads(got, ref, dtype, what):
    for name, g, r in zip(("dq", "dk", "dv"), got, ref):
        check_close(g, r, GRAD_TOL[dtype], f"{what}: {name}")


def check_stats(stats, world, what):
    assert stats is not None and all(len(v) == world for v in stats.values()), what
    assert all(p > 0 for p in stats["peak_bytes"]), what


# ------------------------------------------------------------------- cases

def run_case(b, n, h, d, segs, rates, dtype, causal=False, mode="groups", world=1):
    """One call through RingDilatedAttention on DeviceArrays; checks o and lse.
    Returns last_stats."""
    key = (b, n, h, d, tuple(segs), tuple(rates), dtype, causal, mode, world)
    seed = case_seed("forward", *key)
    what = f"forward {key} seed={seed}"
    (hq, hk, hv), args = device_inputs(seed, (b, n, h, d), dtype)
    out = DeviceArray.full((b, n, h, d), np.nan, dtype)
    ring = ringattn.RingDilatedAttention(segs, rates, causal=causal, mode=mode, world_size=world)
    o, lse = ring(*args, return_lse=True, out=out)
    assert o is out
    assert isinstance(lse, DeviceArray) and lse.shape == (b, h, n) and lse.dtype == np.float32
    ref_o, ref_lse = reference_attention(hq, hk, hv, segs, rates, causal=causal, mode=mode)
    check_out(o, ref_o, dtype, what)
    check_lse(lse, ref_lse, dtype, what)
    check_stats(ring.last_stats, world, what)
    return ring.last_stats


def run_backward_case(b, n, h, d, segs, rates, dtype, causal=False, mode="groups", world=1):
    """Forward and backward through RingDilatedAttention on DeviceArrays; the
    gradients against the float64 analytic backward of the reference."""
    key = (b, n, h, d, tuple(segs), tuple(rates), dtype, causal, mode, world)
    seed = case_seed("backward", *key)
    what = f"backward {key} seed={seed}"
    (hq, hk, hv, hg), (dq, dk, dv, dg) = device_inputs(seed, (b, n, h, d), dtype, count=4)
    ring = ringattn.RingDilatedAttention(segs, rates, causal=causal, mode=mode, world_size=world)
    ring(dq, dk, dv, requires_grad=True)
    grads = ring.backward(dg)
    assert all(isinstance(g, DeviceArray) and g.dtype == dq.dtype and g.shape == dq.shape for g in grads), what
    check_grads(grads, reference_backward(hq, hk, hv, hg, segs, rates, causal=causal, mode=mode), dtype, what)
    check_stats(ring.last_stats, world, what)
    return ring.last_stats


# ---------------------------------------------------------------- correctness

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["groups", "longnet"])
@pytest.mark.parametrize("causal", [False, True])
def test_dilated_matches_reference(dtype, mode, causal):
    run_case(3, 512, 5, 64, [128, 256], [1, 2], dtype, causal=causal, mode=mode)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_dense_head_dims(dtype, d, causal):
    run_case(1, 384, 3, d, [384], [1], dtype, causal=causal)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5, 6, 7, 8])
def test_ring_sizes_dense(world):
    # n = 840 is divisible by 1..8; local lengths 840 .. 105 are not tile multiples
    run_case(1, 840, 3, 64, [840], [1], "bfloat16", causal=True, world=world)


@pytest.mark.parametrize("world", [1, 2, 4, 8])
@pytest.mark.parametrize("mode", ["groups", "longnet"])
def test_ring_sizes_dilated(world, mode):
    # branch 0 local for every k; branch 1 spans 512 / (1024 / k) ranks
    run_case(1, 1024, 4, 64, [128, 512], [1, 4], "float16", causal=True, mode=mode, world=world)


def test_ring_span_three():
    run_case(2, 768, 3, 64, [256, 768], [1, 3], "bfloat16", causal=True, world=3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_odd_sizes(dtype):
    run_case(3, 96, 7, 64, [32, 96], [2, 3], dtype, causal=True, mode="longnet", world=1)
    run_case(5, 64, 3, 128, [64], [1], dtype, causal=False, world=2)


def test_peak_bytes_fall_with_world_size():
    peaks = {}
    for world in (1, 2, 4, 8):
        stats = run_case(1, 4096, 4, 64, [512, 4096], [1, 2], "bfloat16", causal=True, world=world)
        peaks[world] = max(stats["peak_bytes"])
    assert peaks[1] > peaks[2] > peaks[4] > peaks[8], peaks
    assert peaks[8] < peaks[1] / 2, peaks


def test_explicit_scale():
    seed = case_seed("scale")
    (hq, hk, hv), args = device_inputs(seed, (1, 256, 2, 64), "float32")
    o = ringattn.dilated_attention(*args, [256], [1], causal=True, scale=0.3)
    ref, _ = reference_attention(hq, hk, hv, [256], [1], causal=True, scale=0.3)
    check_out(o, ref, "float32", f"scale=0.3 seed={seed}")


# ------------------------------------------------------------ API behaviour

def test_output_is_device_array_without_out():
    seed = case_seed("no out")
    (hq, hk, hv), args = device_inputs(seed, (2, 128, 3, 64), "float16")
    o = ringattn.dilated_attention(*args, [64], [2])
    assert isinstance(o, DeviceArray) and o.dtype == np.float16 and o.shape == (2, 128, 3, 64)
    ref, _ = reference_attention(hq, hk, hv, [64], [2])
    check_out(o, ref, "float16", f"seed={seed}")


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_numpy_inputs_with_device_cuda(dtype):
    seed = case_seed("host inputs", dtype)
    hq, hk, hv = (x.astype(dtype) for x in host_inputs(seed, (2, 256, 3, 64), dtype))
    out = np.full(hq.shape, np.nan, dtype)
    o, lse = ringattn.dilated_attention(hq, hk, hv, [128, 256], [1, 2], causal=True, device="cuda",
                                       return_lse=True, out=out)
    assert o is out and isinstance(lse, np.ndarray) and lse.dtype == np.float32
    ref, ref_lse = reference_attention(hq, hk, hv, [128, 256], [1, 2], causal=True)
    check_out(o, ref, dtype, f"seed={seed}")
    check_lse(lse, ref_lse, dtype, f"seed={seed}")
    cpu = ringattn.dilated_attention(hq, hk, hv, [128, 256], [1, 2], causal=True)
    check_out(o, cpu.astype(np.float64), dtype, f"vs CPU seed={seed}")
    o2 = ringattn.RingDilatedAttention([128, 256], [1, 2], causal=True, world_size=2, device="cuda")(hq, hk, hv)
    assert isinstance(o2, np.ndarray) and o2.dtype == np.dtype(dtype)
    check_out(o2, ref, dtype, f"ring device=cuda seed={seed}")


class CAIView:
    """Only a __cuda_array_interface__: `shape` and byte `strides` at `ptr`,
    with the protocol version and stream given; `owner` is kept alive."""

    def __init__(self, owner, ptr, shape, strides, typestr, version=3, stream=None, descr=None):
        self.owner = owner
        cai = {"shape": tuple(shape), "typestr": typestr, "data": (ptr, False), "strides": tuple(strides),
               "version": version}
        if version >= 3:
            cai["stream"] = stream
        if descr is not None:
            cai["descr"] = descr
        self.__cuda_array_interface__ = cai

    @classmethod
    def of(cls, a, shape, strides, offset=0):
        """A view into a DeviceArray (strides in elements, offset in elements)."""
        cai = a.__cuda_array_interface__
        return cls(a, a.ptr + offset * a.itemsize, shape, [s * a.itemsize for s in strides], cai["typestr"],
                   descr=cai.get("descr"))

    @classmethod
    def of_torch(cls, t, version, stream):
        typestr = {torch.float16: "<f2", torch.float32: "<f4"}[t.dtype]
        return cls(t, t.data_ptr(), t.shape, [s * t.element_size() for s in t.stride()], typestr, version, stream)


def test_strided_inputs():
    """q with padded heads and k/v sequence-major: strided views, no copies."""
    seed = case_seed("strided")
    b, n, h, d = 2, 256, 3, 64
    hq, hk, hv = host_inputs(seed, (b, n, h, d), "bfloat16")
    padded = np.zeros((b, n, h + 2, d), np.float32)
    padded[:, :, 1:h + 1] = hq
    q = CAIView.of(DeviceArray.from_numpy(padded, "bfloat16"), (b, n, h, d), (n * (h + 2) * d, (h + 2) * d, d, 1),
                   offset=d)
    k, v = (CAIView.of(DeviceArray.from_numpy(np.ascontiguousarray(x.transpose(1, 0, 2, 3)), "bfloat16"),
                       (b, n, h, d), (h * d, b * h * d, d, 1)) for x in (hk, hv))
    out = DeviceArray.full((b, n, h, d), np.nan, "bfloat16")
    ringattn.dilated_attention(q, k, v, [128], [1], causal=True, out=out)
    ref, _ = reference_attention(hq, hk, hv, [128], [1], causal=True)
    check_out(out, ref, "bfloat16", f"strided seed={seed}")


def test_cai_of_host_memory_is_refused():
    a = np.zeros((1, 64, 2, 16), np.float32)
    view = CAIView(a, a.ctypes.data, a.shape, a.strides, "<f4")
    with pytest.raises(ValueError, match="q.*memory"):
        ringattn.dilated_attention(view, view, view, [64], [1])


def test_cuda_forward_ptr_with_poisoned_lse():
    seed = case_seed("raw pointers")
    b, n, h, d = 1, 512, 4, 64
    (hq, hk, hv), (dq, dk, dv) = device_inputs(seed, (b, n, h, d), "float16")
    o = DeviceArray.full((b, n, h, d), np.nan, "float16")
    lse = DeviceArray.full((b, h, n), np.nan, "float32")
    stats = ringattn.cuda_forward_ptr(dq.ptr, dk.ptr, dv.ptr, o.ptr, (b, n, h, d), "float16", [256, 512], [2, 4],
                                      causal=True, mode="longnet", world_size=2, lse_ptr=lse.ptr)
    assert len(stats) == 2 and all(s["peak_bytes"] > 0 for s in stats)
    ref, ref_lse = reference_attention(hq, hk, hv, [256, 512], [2, 4], causal=True, mode="longnet")
    check_out(o, ref, "float16", f"seed={seed}")
    check_lse(lse, ref_lse, "float16", f"seed={seed}")


def test_config_error_from_core():
    dq = DeviceArray.full((1, 96, 2, 64), 0.0)
    with pytest.raises(ValueError, match="segment"):
        ringattn.dilated_attention(dq, dq, dq, [64], [1])


def test_device_array_roundtrip_and_protocols():
    x = np.random.default_rng(case_seed("roundtrip")).standard_normal((2, 3, 4)).astype(np.float32)
    a = DeviceArray.from_numpy(x)
    assert np.array_equal(a.numpy(), x)
    cai = a.__cuda_array_interface__
    assert cai["version"] == 3 and cai["typestr"] == "<f4" and cai["data"] == (a.ptr, False)
    assert a.__dlpack_device__() == (2, a.device)
    t = _ext.intake(a, "a")
    assert (t.ptr, t.shape, t.dtype, t.kind, t.device, t.source) == (a.ptr, a.shape, "float32", "cuda", a.device,
                                                                    "dlpack")
    t.release()
    t = _ext.intake(CAIView.of(a, a.shape, (12, 4, 1)), "a")
    assert (t.ptr, t.device, t.source) == (a.ptr, a.device, "cai")
    t.release()
    assert _ext.pointer_info(a.ptr) == ("device", a.device)
    bf = DeviceArray.from_numpy(x, "bfloat16")
    assert bf.dtype == "bfloat16"
    assert np.array_equal(bf.numpy(), _arrays.bf16_bits_to_f32(_arrays.f32_to_bf16_bits(x)))


# -------------------------------------------------------------------- torch

def written_on_side_stream(src):
    """Copies of src written on a fresh side stream behind a long sleep (not
    synchronized): (copies, stream)."""
    dst = [torch.zeros_like(x) for x in src]
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(200_000_000)
        for a, b_ in zip(dst, src):
            a.copy_(b_)
    return dst, s


@needs_torch
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_torch_tensors_dlpack(dtype):
    seed = case_seed("torch", dtype)
    q, k, v = torch_inputs(seed, (2, 256, 5, 64), dtype)
    out = torch.full_like(q, float("nan"))
    res = ringattn.dilated_attention(q, k, v, [128, 256], [1, 2], causal=True, out=out)
    assert res is out
    ref, _ = reference_attention(*(to_numpy(t) for t in (q, k, v)), [128, 256], [1, 2], causal=True)
    check_out(out, ref, dtype, f"torch seed={seed}")
    o = ringattn.dilated_attention(q, k, v, [128, 256], [1, 2], causal=True)
    t = torch.from_dlpack(o)
    assert t.data_ptr() == o.ptr and t.dtype == getattr(torch, dtype) and t.device.type == "cuda"
    check_out(t, ref, dtype, f"torch from_dlpack seed={seed}")


@needs_torch
def test_torch_non_default_stream_dlpack():
    """Inputs written on a side stream behind a long sleep: the DLPack stream
    handshake must order our kernels after the writes."""
    seed = case_seed("side stream")
    hq, hk, hv = host_inputs(seed, (1, 512, 4, 64), "bfloat16")
    dst, s = written_on_side_stream([torch.from_numpy(x).to("cuda", torch.bfloat16) for x in (hq, hk, hv)])
    with torch.cuda.stream(s):
        o = ringattn.dilated_attention(*dst, [512], [1], causal=True)
    ref, _ = reference_attention(hq, hk, hv, [512], [1], causal=True)
    check_out(o, ref, "bfloat16", f"side stream seed={seed}")


@needs_torch
@pytest.mark.parametrize("version", [2, 3])
def test_torch_cai_non_default_stream(version):
    """CAI objects: v3 names the producer's stream (honoured: no race); v2 has
    none, so the producer synchronizes first."""
    seed = case_seed("cai stream", version)
    hq, hk, hv = host_inputs(seed, (2, 256, 3, 64), "float16")
    src = [torch.from_numpy(x).to("cuda", torch.float16) for x in (hq, hk, hv)]
    out = torch.full_like(src[0], float("nan"))
    dst, s = written_on_side_stream(src)
    if version == 2:
        s.synchronize()
    views = [CAIView.of_torch(t, version, s.cuda_stream) for t in dst + [out]]
    ringattn.dilated_attention(*views[:3], [128, 256], [1, 2], causal=True, out=views[3])
    ref, _ = reference_attention(hq, hk, hv, [128, 256], [1, 2], causal=True)
    check_out(out, ref, "float16", f"CAI v{version} seed={seed}")


class _LegacyDLPack:
    """A torch tensor seen through a producer that only knows legacy DLPack."""

    def __init__(self, t):
        self.t = t

    def __dlpack__(self, stream=None):
        return self.t.__dlpack__(stream=stream)

    def __dlpack_device__(self):
        return self.t.__dlpack_device__()


@needs_torch
def test_torch_legacy_and_versioned_capsules():
    seed = case_seed("capsules")
    q, k, v = torch_inputs(seed, (1, 256, 3, 64), "bfloat16")
    ref, _ = reference_attention(*(to_numpy(t) for t in (q, k, v)), [256], [1], causal=True)
    o = ringattn.dilated_attention(_LegacyDLPack(q), _LegacyDLPack(k), _LegacyDLPack(v), [256], [1], causal=True)
    check_out(o, ref, "bfloat16", f"legacy seed={seed}")
    try:
        cap = q.__dlpack__(stream=1, max_version=(1, 0))
    except TypeError:
        pytest.skip("this torch has no versioned DLPack")
    assert "dltensor_versioned" in repr(cap)

    class Made:  # hands over the capsule made above
        def __dlpack__(self, stream=None, max_version=None):
            return cap

        def __dlpack_device__(self):
            return q.__dlpack_device__()

    t = _ext.intake(Made(), "q")
    assert "used_dltensor_versioned" in repr(cap)
    assert t.source == "dlpack" and t.ptr == q.data_ptr() and t.shape == tuple(q.shape) and not t.readonly
    t.release()


@needs_torch
def test_torch_device_array_zero_copy():
    a = DeviceArray.from_numpy(np.arange(24, dtype=np.float32).reshape(2, 3, 4), "bfloat16")
    t = torch.from_dlpack(a)
    assert t.dtype == torch.bfloat16 and t.data_ptr() == a.ptr
    assert np.array_equal(to_numpy(t), a.numpy())
    t.add_(1)  # a view of the same memory
    assert np.array_equal(a.numpy(), np.arange(24, dtype=np.float32).reshape(2, 3, 4) + 1)


@needs_torch
def test_torch_ring_last_stats():
    q, k, v = torch_inputs(case_seed("torch stats"), (1, 4096, 4, 64), "bfloat16")
    peaks = []
    for world in (1, 2, 4, 8):
        ring = ringattn.RingDilatedAttention([4096], [1], causal=True, world_size=world)
        ring(q, k, v)
        assert len(ring.last_stats["peak_bytes"]) == world
        peaks.append(max(ring.last_stats["peak_bytes"]))
    assert all(x > y for x, y in zip(peaks, peaks[1:])) and peaks[-1] < peaks[0] / 2, peaks


@needs_torch
def test_torch_errors():
    q = torch.zeros(1, 64, 2, 64, device="cuda")
    strided = torch.zeros(1, 64, 64, 2, device="cuda").transpose(2, 3)  # head dim stride 2
    with pytest.raises(ValueError, match="q.*contiguous"):
        ringattn.dilated_attention(strided, q, q, [64], [1])
    with pytest.raises(TypeError, match="k"):
        ringattn.dilated_attention(q, q.half(), q, [64], [1])
    with pytest.raises(ValueError, match="v"):
        ringattn.dilated_attention(q, q, q.cpu(), [64], [1])


# --------------------------------------------------------------------- CuPy

@needs_cupy
def test_cupy_arrays_and_stream():
    seed = case_seed("cupy")
    hq, hk, hv = host_inputs(seed, (2, 256, 3, 64), "float16")
    with cupy.cuda.Stream(non_blocking=True) as s:
        q, k, v = (cupy.asarray(x.astype(np.float16)) for x in (hq, hk, hv))
        out = cupy.full(q.shape, np.nan, dtype=cupy.float16)
        ringattn.dilated_attention(q, k, v, [128, 256], [1, 2], causal=True, out=out)
        assert s.ptr != 0
    ref, _ = reference_attention(hq, hk, hv, [128, 256], [1, 2], causal=True)
    check_out(out, ref, "float16", f"cupy seed={seed}")


@needs_cupy
def test_cupy_takes_device_array():
    a = DeviceArray.from_numpy(np.arange(12, dtype=np.float32).reshape(3, 4))
    c = cupy.asarray(a)
    assert c.data.ptr == a.ptr and np.array_equal(cupy.asnumpy(c), a.numpy())
    d = cupy.from_dlpack(a)
    assert d.data.ptr == a.ptr


# ----------------------------------------------------------------- backward

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["groups", "longnet"])
@pytest.mark.parametrize("causal", [False, True])
def test_backward_matches_reference(dtype, mode, causal):
    run_backward_case(2, 512, 5, 64, [128, 512], [1, 2], dtype, causal=causal, mode=mode)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_backward_dense_head_dims(dtype, d, causal):
    run_backward_case(1, 384, 3, d, [384], [1], dtype, causal=causal)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5, 6, 7, 8])
def test_backward_ring_sizes_dense(world):
    run_backward_case(1, 840, 2, 64, [840], [1], "bfloat16", causal=True, world=world)


@pytest.mark.parametrize("world", [1, 2, 4, 8])
@pytest.mark.parametrize("mode", ["groups", "longnet"])
def test_backward_ring_sizes_dilated(world, mode):
    run_backward_case(1, 1024, 4, 64, [128, 512], [1, 4], "float16", causal=True, mode=mode, world=world)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_backward_ring_equals_single_rank(dtype):
    """Every ring size gives the single-rank gradients (to rounding)."""
    seed = case_seed("ring grads", dtype)
    _, args = device_inputs(seed, (1, 960, 3, 64), dtype, count=4)
    base = None
    for world in (1, 2, 4, 8):
        ring = ringattn.RingDilatedAttention([240, 960], [1, 3], causal=True, mode="longnet", world_size=world)
        ring(*args[:3], requires_grad=True)
        grads = [to_numpy(g) for g in ring.backward(args[3])]
        if base is None:
            base = grads
            continue
        for name, g, r in zip(("dq", "dk", "dv"), grads, base):
            err = np.abs(g - r).max() / max(np.abs(r).max(), 1e-3)
            assert err <= (1e-5 if dtype == "float32" else 4e-3), f"world={world} {name} {err:.2e} seed={seed}"


def test_backward_functional_and_host_inputs():
    seed = case_seed("functional backward")
    (hq, hk, hv, hg), (dq, dk, dv, dg) = device_inputs(seed, (2, 256, 3, 64), "float32", count=4)
    segs, rates = [128, 256], [1, 2]
    ref = reference_backward(hq, hk, hv, hg, segs, rates, causal=True)
    o, lse = ringattn.dilated_attention(dq, dk, dv, segs, rates, causal=True, return_lse=True)
    grads = ringattn.dilated_attention_backward(dq, dk, dv, o, lse, dg, segs, rates, causal=True)
    check_grads(grads, ref, "float32", f"functional seed={seed}")
    # host arrays with device="cuda": NumPy in, NumPy out
    o_h, lse_h = ringattn.dilated_attention(hq, hk, hv, segs, rates, causal=True, return_lse=True)
    grads = ringattn.dilated_attention_backward(hq, hk, hv, o_h, lse_h, hg, segs, rates, causal=True, device="cuda")
    assert all(isinstance(g, np.ndarray) and g.dtype == np.float32 for g in grads)
    check_grads(grads, ref, "float32", f"host device=cuda seed={seed}")


def test_backward_errors():
    a = DeviceArray.from_numpy(np.ones((1, 64, 1, 64), np.float32))
    o, lse = ringattn.dilated_attention(a, a, a, [64], [1], return_lse=True)
    with pytest.raises(ValueError, match="lse"):
        ringattn.dilated_attention_backward(a, a, a, o, DeviceArray.from_numpy(np.zeros((1, 1, 32), np.float32)),
                                            a, [64], [1])
    with pytest.raises(ValueError, match="dout"):
        ringattn.dilated_attention_backward(a, a, a, o, lse, np.ones((1, 64, 1, 64), np.float32), [64], [1])
    half = DeviceArray.from_numpy(np.ones((1, 64, 1, 64), np.float32), "float16")
    with pytest.raises(TypeError, match="dout"):
        ringattn.dilated_attention_backward(a, a, a, o, lse, half, [64], [1])


@needs_torch
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_torch_autograd_cuda(dtype):
    import ringattn.torch as rt
    seed = case_seed("autograd", dtype)
    q, k, v, w = torch_inputs(seed, (1, 512, 4, 64), dtype, count=4)
    for x in (q, k, v):
        x.requires_grad_()
    layer = rt.RingDilatedAttention([128, 512], [1, 2], causal=True, world_size=2)
    o = layer(q, k, v)
    assert o.device.type == "cuda" and o.dtype == getattr(torch, dtype)
    (o.float() * w.float()).sum().backward()
    assert all(x.grad is not None and x.grad.dtype == q.dtype and x.grad.device.type == "cuda" for x in (q, k, v))
    ref = reference_backward(*(to_numpy(t) for t in (q, k, v, w)), [128, 512], [1, 2], causal=True)
    check_grads([x.grad for x in (q, k, v)], ref, dtype, f"torch autograd seed={seed}")


@needs_torch
def test_torch_sum_backward_expanded_grad():
    """loss = o.sum() hands backward an expanded (stride 0) gradient."""
    import ringattn.torch as rt
    q, k, v = torch_inputs(case_seed("sum backward"), (1, 128, 2, 64), "float32", requires_grad=True)
    rt.dilated_attention(q, k, v, [128], [1], causal=True).sum().backward()
    hq, hk, hv = (to_numpy(t) for t in (q, k, v))
    ref = reference_backward(hq, hk, hv, np.ones_like(hq), [128], [1], causal=True)
    check_grads([x.grad for x in (q, k, v)], ref, "float32", "sum backward")


# -------------------------------------------------------------------- NCCL

def _nccl_comm():
    if not _ext.have()["nccl"]:
        pytest.skip("built without NCCL")
    try:
        return ringattn.Communicator.nccl(ringattn.nccl_unique_id(), 1, 0, 0)
    except (RuntimeError, NotImplementedError) as e:  # pragma: no cover - no libnccl here
        pytest.skip(f"NCCL unavailable: {e}")


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_nccl_single_rank_forward_backward(dtype):
    """One NCCL rank: the communicator's device path (agreement over NCCL,
    the CUDA ring rank) forward and backward against the reference."""
    comm = _nccl_comm()
    assert comm.device == 0
    seed = case_seed("nccl", dtype)
    (hq, hk, hv, hg), args = device_inputs(seed, (1, 512, 4, 64), dtype, count=4)
    ring = ringattn.RingDilatedAttention([128, 512], [1, 2], causal=True, comm=comm)
    o, lse = ring(*args[:3], return_lse=True, requires_grad=True)
    ref_o, ref_lse = reference_attention(hq, hk, hv, [128, 512], [1, 2], causal=True)
    check_out(o, ref_o, dtype, f"nccl forward seed={seed}")
    check_lse(lse, ref_lse, dtype, f"nccl forward seed={seed}")
    grads = ring.backward(args[3])
    check_grads(grads, reference_backward(hq, hk, hv, hg, [128, 512], [1, 2], causal=True), dtype,
                f"nccl backward seed={seed}")
    with pytest.raises(TypeError, match="CUDA arrays"):
        ring(hq, hk, hv)
    comm.close()
