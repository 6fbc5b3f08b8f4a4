"""The GPU path against the float64 NumPy reference (needs a CUDA device).

Skipped as a whole when ringattn.cuda_device_count() == 0; the torch and CuPy
interop tests are skipped when those packages (or their CUDA support) are
missing.  Every case uses fresh random inputs (the seed is in the failure
message) and NaN-poisoned outputs, so that a row the kernels forget to write
shows up.  Inputs in float16/bfloat16 are rounded on the host first and the
reference is computed from the rounded values, so the tolerances measure the
kernels only: max|o - ref| <= tol * max|ref| with tol 1e-2 for float16 and
bfloat16 and 1e-4 for float32.
"""

import numpy as np
import pytest

import ringattn
from ringattn import DeviceArray, _device

if ringattn.cuda_device_count() == 0:
    pytest.skip("no CUDA device (ringattn.cuda_device_count() == 0)", allow_module_level=True)

from reference import reference_attention, reference_backward  # noqa: E402  (tests/ is on sys.path via conftest)

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


def fresh_seed():
    return int(np.random.SeedSequence().entropy % (2 ** 32))


def host_inputs(seed, shape, dtype):
    """q, k, v as float32 host arrays holding values exactly representable in dtype."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(3):
        x = rng.standard_normal(shape).astype(np.float32)
        if dtype == "float16":
            x = x.astype(np.float16).astype(np.float32)
        elif dtype == "bfloat16":
            x = _device.bf16_bits_to_f32(_device.f32_to_bf16_bits(x))
        out.append(x)
    return out


def check_out(o, ref, dtype, what):
    o = np.asarray(o, dtype=np.float64)
    assert o.shape == ref.shape, f"{what}: shape {o.shape} != {ref.shape}"
    assert np.all(np.isfinite(o)), f"{what}: non-finite values ({np.isnan(o).sum()} NaN): unwritten rows?"
    denom = max(float(np.abs(ref).max()), 1e-3)
    err = float(np.abs(o - ref).max())
    assert err <= OUT_TOL[dtype] * denom, f"{what}: max abs err {err:.3e} > {OUT_TOL[dtype]:.0e} * {denom:.3e}"


def check_lse(lse, ref, dtype, what):
    lse = np.asarray(lse, dtype=np.float64)
    assert lse.shape == ref.shape, f"{what}: lse shape {lse.shape} != {ref.shape}"
    ninf = np.isneginf(ref)
    assert np.array_equal(np.isneginf(lse), ninf), f"{what}: lse -inf pattern differs"
    assert not np.isnan(lse).any(), f"{what}: lse holds NaN"
    fin = ~ninf
    atol, rtol = LSE_TOL[dtype]
    err = np.abs(lse[fin] - ref[fin])
    bound = atol + rtol * np.abs(ref[fin])
    assert np.all(err <= bound), f"{what}: lse err {float(err.max()):.3e}"


def run_case(b, n, h, d, segs, rates, dtype, causal=False, mode="groups", world=1, seed=None):
    """One call through RingDilatedAttention on DeviceArrays; checks o and lse.
    Returns last_stats."""
    seed = fresh_seed() if seed is None else seed
    what = (f"b={b} n={n} h={h} d={d} segs={segs} rates={rates} {dtype} causal={causal} mode={mode} "
            f"world={world} seed={seed}")
    hq, hk, hv = host_inputs(seed, (b, n, h, d), dtype)
    dq, dk, dv = (DeviceArray.from_numpy(x, dtype) for x in (hq, hk, hv))
    out = DeviceArray.full((b, n, h, d), np.nan, dtype)
    ring = ringattn.RingDilatedAttention(segs, rates, causal=causal, mode=mode, world_size=world)
    o, lse = ring(dq, dk, dv, return_lse=True, out=out)
    assert o is out
    assert isinstance(lse, DeviceArray) and lse.shape == (b, h, n) and lse.dtype == np.float32
    ref_o, ref_lse = reference_attention(hq, hk, hv, segs, rates, causal=causal, mode=mode)
    check_out(o.numpy(), ref_o, dtype, what)
    check_lse(lse.numpy(), ref_lse, dtype, what)
    stats = ring.last_stats
    assert stats is not None and all(len(v) == world for v in stats.values()), what
    assert all(p > 0 for p in stats["peak_bytes"]), what
    return stats


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
    seed = fresh_seed()
    hq, hk, hv = host_inputs(seed, (1, 256, 2, 64), "float32")
    dq, dk, dv = (DeviceArray.from_numpy(x) for x in (hq, hk, hv))
    o = ringattn.dilated_attention(dq, dk, dv, [256], [1], causal=True, scale=0.3)
    ref, _ = reference_attention(hq, hk, hv, [256], [1], causal=True, scale=0.3)
    check_out(o.numpy(), ref, "float32", f"scale=0.3 seed={seed}")


# ------------------------------------------------------------ API behaviour

def test_output_is_device_array_without_out():
    seed = fresh_seed()
    hq, hk, hv = host_inputs(seed, (2, 128, 3, 64), "float16")
    dq, dk, dv = (DeviceArray.from_numpy(x, "float16") for x in (hq, hk, hv))
    o = ringattn.dilated_attention(dq, dk, dv, [64], [2])
    assert isinstance(o, DeviceArray) and o.dtype == np.float16 and o.shape == (2, 128, 3, 64)
    ref, _ = reference_attention(hq, hk, hv, [64], [2])
    check_out(o.numpy(), ref, "float16", f"seed={seed}")


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_numpy_inputs_with_device_cuda(dtype):
    seed = fresh_seed()
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


def test_strided_inputs():
    """q with padded heads and k/v sequence-major: strided views, no copies."""
    seed = fresh_seed()
    b, n, h, d = 2, 256, 3, 64
    hq, hk, hv = host_inputs(seed, (b, n, h, d), "bfloat16")
    padded = np.zeros((b, n, h + 2, d), np.float32)
    padded[:, :, 1:h + 1] = hq
    big = DeviceArray.from_numpy(padded, "bfloat16")
    q = _CAIView(big, (b, n, h, d), tuple(2 * s for s in ((n * (h + 2) * d), (h + 2) * d, d, 1)), offset=d)
    seqmajor = [DeviceArray.from_numpy(np.ascontiguousarray(x.transpose(1, 0, 2, 3)), "bfloat16") for x in (hk, hv)]
    st = tuple(2 * s for s in (h * d, b * h * d, d, 1))
    k, v = (_CAIView(a, (b, n, h, d), st) for a in seqmajor)
    out = DeviceArray.full((b, n, h, d), np.nan, "bfloat16")
    ringattn.dilated_attention(q, k, v, [128], [1], causal=True, out=out)
    ref, _ = reference_attention(hq, hk, hv, [128], [1], causal=True)
    check_out(out.numpy(), ref, "bfloat16", f"strided seed={seed}")


class _CAIView:
    """A __cuda_array_interface__ view into a DeviceArray (strides in bytes)."""

    def __init__(self, base, shape, strides, offset=0, stream=None, version=3):
        self.base = base
        cai = dict(base.__cuda_array_interface__)
        cai.update(shape=shape, strides=strides, data=(base.ptr + offset * base.itemsize, False),
                   version=version)
        if version >= 3:
            cai["stream"] = stream
        else:
            cai.pop("stream", None)
        self.__cuda_array_interface__ = cai


def test_cuda_forward_ptr_with_poisoned_lse():
    seed = fresh_seed()
    b, n, h, d = 1, 512, 4, 64
    hq, hk, hv = host_inputs(seed, (b, n, h, d), "float16")
    dq, dk, dv = (DeviceArray.from_numpy(x, "float16") for x in (hq, hk, hv))
    o = DeviceArray.full((b, n, h, d), np.nan, "float16")
    lse = DeviceArray.full((b, h, n), np.nan, "float32")
    stats = ringattn.cuda_forward_ptr(dq.ptr, dk.ptr, dv.ptr, o.ptr, (b, n, h, d), "float16", [256, 512], [2, 4],
                                      causal=True, mode="longnet", world_size=2, lse_ptr=lse.ptr)
    assert len(stats) == 2 and all(s["peak_bytes"] > 0 for s in stats)
    ref, ref_lse = reference_attention(hq, hk, hv, [256, 512], [2, 4], causal=True, mode="longnet")
    check_out(o.numpy(), ref, "float16", f"seed={seed}")
    check_lse(lse.numpy(), ref_lse, "float16", f"seed={seed}")


def test_config_error_from_core():
    dq = DeviceArray.full((1, 96, 2, 64), 0.0)
    with pytest.raises(ValueError, match="segment"):
        ringattn.dilated_attention(dq, dq, dq, [64], [1])


def test_device_array_roundtrip_and_protocols():
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    a = DeviceArray.from_numpy(x)
    assert np.array_equal(a.numpy(), x)
    cai = a.__cuda_array_interface__
    assert cai["version"] == 3 and cai["typestr"] == "<f4" and cai["data"] == (a.ptr, False)
    assert a.__dlpack_device__() == (2, a.device)
    r = _device.parse_dlpack(a, "a")
    assert (r.ptr, r.shape, r.dtype) == (a.ptr, a.shape, "float32")
    r.release()
    bf = DeviceArray.from_numpy(x, "bfloat16")
    assert bf.dtype == "bfloat16"
    assert np.array_equal(bf.numpy(), _device.bf16_bits_to_f32(_device.f32_to_bf16_bits(x)))


# -------------------------------------------------------------------- torch

@needs_torch
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_torch_tensors_dlpack(dtype):
    seed = fresh_seed()
    tdt = getattr(torch, dtype)
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(2, 256, 5, 64, device="cuda", dtype=tdt, generator=g) for _ in range(3))
    out = torch.full_like(q, float("nan"))
    res = ringattn.dilated_attention(q, k, v, [128, 256], [1, 2], causal=True, out=out)
    assert res is out
    hq, hk, hv = (t.float().cpu().numpy() for t in (q, k, v))
    ref, _ = reference_attention(hq, hk, hv, [128, 256], [1, 2], causal=True)
    check_out(out.float().cpu().numpy(), ref, dtype, f"torch seed={seed}")
    o = ringattn.dilated_attention(q, k, v, [128, 256], [1, 2], causal=True)
    t = torch.from_dlpack(o)
    assert t.data_ptr() == o.ptr and t.dtype == tdt and t.device.type == "cuda"
    check_out(t.float().cpu().numpy(), ref, dtype, f"torch from_dlpack seed={seed}")


@needs_torch
def test_torch_non_default_stream_dlpack():
    """Inputs written on a side stream behind a long sleep: the DLPack stream
    handshake must order our kernels after the writes."""
    seed = fresh_seed()
    hq, hk, hv = host_inputs(seed, (1, 512, 4, 64), "bfloat16")
    src = [torch.from_numpy(x).to("cuda", torch.bfloat16) for x in (hq, hk, hv)]
    dst = [torch.zeros_like(s) for s in src]
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(200_000_000)
        for a, b_ in zip(dst, src):
            a.copy_(b_)
        o = ringattn.dilated_attention(*dst, [512], [1], causal=True)
    ref, _ = reference_attention(hq, hk, hv, [512], [1], causal=True)
    check_out(o.numpy(), ref, "bfloat16", f"side stream seed={seed}")


@needs_torch
@pytest.mark.parametrize("version", [2, 3])
def test_torch_cai_non_default_stream(version):
    """CAI objects: v3 names the producer's stream (honoured: no race); v2 has
    none, so the producer synchronizes first."""
    seed = fresh_seed()
    hq, hk, hv = host_inputs(seed, (2, 256, 3, 64), "float16")
    src = [torch.from_numpy(x).to("cuda", torch.float16) for x in (hq, hk, hv)]
    dst = [torch.zeros_like(x) for x in src]
    out = torch.full_like(src[0], float("nan"))
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(200_000_000)
        for a, b_ in zip(dst, src):
            a.copy_(b_)
    if version == 2:
        s.synchronize()
    views = [_TorchCAI(t, version, s.cuda_stream) for t in dst + [out]]
    ringattn.dilated_attention(*views[:3], [128, 256], [1, 2], causal=True, out=views[3])
    ref, _ = reference_attention(hq, hk, hv, [128, 256], [1, 2], causal=True)
    check_out(out.float().cpu().numpy(), ref, "float16", f"CAI v{version} seed={seed}")


class _TorchCAI:
    """Only the __cuda_array_interface__ of a torch tensor, at a chosen version."""

    def __init__(self, t, version, stream):
        self.t = t
        cai = {"shape": tuple(t.shape), "typestr": {torch.float16: "<f2", torch.float32: "<f4"}[t.dtype],
               "data": (t.data_ptr(), False), "strides": tuple(s * t.element_size() for s in t.stride()),
               "version": version}
        if version >= 3:
            cai["stream"] = stream
        self.__cuda_array_interface__ = cai


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
    seed = fresh_seed()
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(1, 256, 3, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    ref, _ = reference_attention(*(t.float().cpu().numpy() for t in (q, k, v)), [256], [1], causal=True)
    o = ringattn.dilated_attention(_LegacyDLPack(q), _LegacyDLPack(k), _LegacyDLPack(v), [256], [1], causal=True)
    check_out(o.numpy(), ref, "bfloat16", f"legacy seed={seed}")
    try:
        cap = q.__dlpack__(stream=1, max_version=(1, 0))
    except TypeError:
        pytest.skip("this torch has no versioned DLPack")
    imp = _device.DLPackImport(cap, "q")
    assert imp.versioned and imp.address == q.data_ptr() and imp.shape == tuple(q.shape)
    imp.release()


@needs_torch
def test_torch_device_array_zero_copy():
    a = DeviceArray.from_numpy(np.arange(24, dtype=np.float32).reshape(2, 3, 4), "bfloat16")
    t = torch.from_dlpack(a)
    assert t.dtype == torch.bfloat16 and t.data_ptr() == a.ptr
    assert np.array_equal(t.float().cpu().numpy(), a.numpy())
    t.add_(1)  # a view of the same memory
    assert np.array_equal(a.numpy(), np.arange(24, dtype=np.float32).reshape(2, 3, 4) + 1)


@needs_torch
def test_torch_ring_last_stats():
    g = torch.Generator(device="cuda").manual_seed(fresh_seed())
    q, k, v = (torch.randn(1, 4096, 4, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
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
    seed = fresh_seed()
    hq, hk, hv = host_inputs(seed, (2, 256, 3, 64), "float16")
    with cupy.cuda.Stream(non_blocking=True) as s:
        q, k, v = (cupy.asarray(x.astype(np.float16)) for x in (hq, hk, hv))
        out = cupy.full(q.shape, np.nan, dtype=cupy.float16)
        ringattn.dilated_attention(q, k, v, [128, 256], [1, 2], causal=True, out=out)
        assert s.ptr != 0
    ref, _ = reference_attention(hq, hk, hv, [128, 256], [1, 2], causal=True)
    check_out(cupy.asnumpy(out), ref, "float16", f"cupy seed={seed}")


@needs_cupy
def test_cupy_takes_device_array():
    a = DeviceArray.from_numpy(np.arange(12, dtype=np.float32).reshape(3, 4))
    c = cupy.asarray(a)
    assert c.data.ptr == a.ptr and np.array_equal(cupy.asnumpy(c), a.numpy())
    d = cupy.from_dlpack(a)
    assert d.data.ptr == a.ptr


# ----------------------------------------------------------------- backward

GRAD_TOL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 3e-2}


def check_grads(got, ref, dtype, what):
    for name, g, r in zip(("dq", "dk", "dv"), got, ref):
        g = np.asarray(g, dtype=np.float64)
        assert g.shape == r.shape, f"{what}: {name} shape {g.shape} != {r.shape}"
        assert np.all(np.isfinite(g)), f"{what}: {name} has non-finite values"
        denom = max(float(np.abs(r).max()), 1e-3)
        err = float(np.abs(g - r).max())
        assert err <= GRAD_TOL[dtype] * denom, f"{what}: {name} max abs err {err:.3e} > {GRAD_TOL[dtype]:.0e} * {denom:.3e}"


def run_backward_case(b, n, h, d, segs, rates, dtype, causal=False, mode="groups", world=1, seed=None):
    """Forward and backward through RingDilatedAttention on DeviceArrays; the
    gradients against the float64 analytic backward of the reference."""
    seed = fresh_seed() if seed is None else seed
    what = f"backward b={b} n={n} h={h} d={d} segs={segs} rates={rates} {dtype} causal={causal} mode={mode} " \
           f"world={world} seed={seed}"
    hq, hk, hv = host_inputs(seed, (b, n, h, d), dtype)
    (hg,) = host_inputs(seed + 1, (b, n, h, d), dtype)[:1]
    dq, dk, dv, dg = (DeviceArray.from_numpy(x, dtype) for x in (hq, hk, hv, hg))
    ring = ringattn.RingDilatedAttention(segs, rates, causal=causal, mode=mode, world_size=world)
    ring(dq, dk, dv, requires_grad=True)
    grads = ring.backward(dg)
    assert all(isinstance(g, DeviceArray) and g.dtype == dq.dtype and g.shape == dq.shape for g in grads), what
    ref = reference_backward(hq, hk, hv, hg, segs, rates, causal=causal, mode=mode)
    check_grads([g.numpy() for g in grads], ref, dtype, what)
    stats = ring.last_stats
    assert all(len(v) == world for v in stats.values()) and all(p > 0 for p in stats["peak_bytes"]), what
    return stats


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
    seed = fresh_seed()
    hq, hk, hv, hg = host_inputs(seed, (1, 960, 3, 64), dtype) + host_inputs(seed + 1, (1, 960, 3, 64), dtype)[:1]
    args = [DeviceArray.from_numpy(x, dtype) for x in (hq, hk, hv, hg)]
    base = None
    for world in (1, 2, 4, 8):
        ring = ringattn.RingDilatedAttention([240, 960], [1, 3], causal=True, mode="longnet", world_size=world)
        ring(*args[:3], requires_grad=True)
        grads = [g.numpy().astype(np.float64) for g in ring.backward(args[3])]
        if base is None:
            base = grads
            continue
        for name, g, r in zip(("dq", "dk", "dv"), grads, base):
            err = np.abs(g - r).max() / max(np.abs(r).max(), 1e-3)
            assert err <= (1e-5 if dtype == "float32" else 4e-3), f"world={world} {name} {err:.2e} seed={seed}"


def test_backward_functional_and_host_inputs():
    seed = fresh_seed()
    hq, hk, hv = host_inputs(seed, (2, 256, 3, 64), "float32")
    (hg,) = host_inputs(seed + 1, (2, 256, 3, 64), "float32")[:1]
    segs, rates = [128, 256], [1, 2]
    ref = reference_backward(hq, hk, hv, hg, segs, rates, causal=True)
    args = [DeviceArray.from_numpy(x) for x in (hq, hk, hv)]
    o, lse = ringattn.dilated_attention(*args, segs, rates, causal=True, return_lse=True)
    grads = ringattn.dilated_attention_backward(*args, o, lse, DeviceArray.from_numpy(hg), segs, rates, causal=True)
    check_grads([g.numpy() for g in grads], ref, "float32", f"functional seed={seed}")
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
    seed = fresh_seed()
    tdt = getattr(torch, dtype)
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(1, 512, 4, 64, device="cuda", dtype=tdt, generator=g).requires_grad_() for _ in range(3))
    w = torch.randn(1, 512, 4, 64, device="cuda", dtype=tdt, generator=g)
    layer = rt.RingDilatedAttention([128, 512], [1, 2], causal=True, world_size=2)
    o = layer(q, k, v)
    assert o.device.type == "cuda" and o.dtype == tdt
    (o.float() * w.float()).sum().backward()
    assert all(x.grad is not None and x.grad.dtype == tdt and x.grad.device.type == "cuda" for x in (q, k, v))
    hq, hk, hv, hw = (t.detach().float().cpu().numpy() for t in (q, k, v, w))
    ref = reference_backward(hq, hk, hv, hw, [128, 512], [1, 2], causal=True)
    check_grads([x.grad.float().cpu().numpy() for x in (q, k, v)], ref, dtype, f"torch autograd seed={seed}")


@needs_torch
def test_torch_sum_backward_expanded_grad():
    """loss = o.sum() hands backward an expanded (stride 0) gradient."""
    import ringattn.torch as rt
    q, k, v = (torch.randn(1, 128, 2, 64, device="cuda", requires_grad=True) for _ in range(3))
    rt.dilated_attention(q, k, v, [128], [1], causal=True).sum().backward()
    hq, hk, hv = (t.detach().cpu().numpy() for t in (q, k, v))
    ref = reference_backward(hq, hk, hv, np.ones_like(hq), [128], [1], causal=True)
    check_grads([x.grad.cpu().numpy() for x in (q, k, v)], ref, "float32", "sum backward")


# -------------------------------------------------------------------- NCCL

def _nccl_comm():
    if not ringattn._core.have()["nccl"]:
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
    seed = fresh_seed()
    hq, hk, hv = host_inputs(seed, (1, 512, 4, 64), dtype)
    (hg,) = host_inputs(seed + 1, (1, 512, 4, 64), dtype)[:1]
    args = [DeviceArray.from_numpy(x, dtype) for x in (hq, hk, hv, hg)]
    ring = ringattn.RingDilatedAttention([128, 512], [1, 2], causal=True, comm=comm)
    o, lse = ring(*args[:3], return_lse=True, requires_grad=True)
    ref_o, ref_lse = reference_attention(hq, hk, hv, [128, 512], [1, 2], causal=True)
    check_out(o.numpy(), ref_o, dtype, f"nccl forward seed={seed}")
    check_lse(lse.numpy(), ref_lse, dtype, f"nccl forward seed={seed}")
    grads = ring.backward(args[3])
    ref = reference_backward(hq, hk, hv, hg, [128, 512], [1, 2], causal=True)
    check_grads([g.numpy() for g in grads], ref, dtype, f"nccl backward seed={seed}")
    with pytest.raises(TypeError, match="CUDA arrays"):
        ring(hq, hk, hv)
    comm.close()
