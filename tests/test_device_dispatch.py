"""Where a call runs: classification of the arguments, device=, the stream
choice among CAI arguments, and the stream handed to DLPack producers (no
GPU needed; the fake device arrays never reach a kernel)."""

import numpy as np
import pytest

import ringattn
from fakes import BASE, DLPackOnly, FakeCAI, FakeDL, FakeDLLegacy, fakes, w
from ringattn import _arrays, _validate

HAVE_GPU = ringattn.cuda_device_count() > 0


def _call(q, k, v, segs=(64,), rates=(1,), **kw):
    return ringattn.dilated_attention(q, k, v, list(segs), list(rates), **kw)


def test_classify():
    a = np.zeros((1, 64, 4, 16), np.float32)
    assert _arrays.classify(a) == "cpu"
    assert _arrays.classify(a[0, 0, 0, 0]) == "cpu"
    assert _arrays.classify([1.0, 2.0]) == "cpu"
    assert _arrays.classify(DLPackOnly(a)) == "cpu"
    assert _arrays.classify(FakeCAI()) == "cuda"
    assert _arrays.classify(FakeDL()) == "cuda"
    assert _arrays.classify(FakeDL(device=(13, 0))) == "cuda"  # managed memory
    assert _arrays.classify(FakeDL(device=(10, 0))) == "other"  # ROCm


def _placement(device, backend=None, **objs):
    tensors = _arrays.describe_all(objs)
    try:
        inputs = [name for name in objs if name != "out"]
        return _validate.placement(tensors, inputs, _arrays.parse_device(device), backend)
    finally:
        _arrays.release_all(tensors)


def test_placement():
    q, k, v = fakes("dl")
    a = np.zeros((1, 64, 4, 16), np.float32)
    assert _placement(None, q=a, k=a, v=a) == "cpu"
    assert _placement("cpu", q=a, k=a, v=a) == "cpu"
    assert _placement(None, q=q, k=k, v=v) == "cuda"
    assert _placement("cuda", q=q, k=k, v=v) == "cuda"
    assert _placement("cuda", q=a, k=a, v=a) == "host"
    assert _placement("cuda:1", q=a, k=a, v=a, out=a) == "host"
    assert _placement("cuda", q=a, k=a, v=a, out=q) == "host"
    with pytest.raises(ValueError, match=w("k") + ".*CUDA"):
        _placement("cpu", q=a, k=k, v=a)
    with pytest.raises(ValueError, match=w("out") + ".*device='cuda'"):
        _placement(None, q=a, k=a, v=a, out=q)
    with pytest.raises(ValueError, match=w("out") + ".*CUDA array"):
        _placement(None, q=q, k=k, v=v, out=a)
    with pytest.raises(ValueError, match=w("k") + ".*" + w("q")):
        _placement("cuda", q=q, k=a, v=v)
    assert [f.deleted for f in (q, k, v)] == [len(f.capsules) for f in (q, k, v)]


def test_placement_with_a_communicator():
    q, k, v = fakes("dl")
    a = np.zeros((1, 64, 4, 16), np.float32)
    assert _placement(None, "mpi", q=a, k=a, v=a) == "cpu"
    assert _placement("cpu", "mpi", q=a, k=a, v=a) == "cpu"
    with pytest.raises(TypeError, match=w("k") + ".*MPI communicator runs on the CPU"):
        _placement(None, "mpi", q=a, k=k, v=a)
    assert _placement(None, "nccl", q=q, k=k, v=v) == "cuda"
    with pytest.raises(TypeError, match=w("v") + ".*CUDA arrays"):
        _placement(None, "nccl", q=q, k=k, v=a)
    with pytest.raises(ValueError, match=w("device")):
        _placement("cuda", "mpi", q=a, k=a, v=a)
    with pytest.raises(ValueError, match=w("device")):
        _placement("cpu", "nccl", q=q, k=k, v=v)


def test_parse_device():
    assert _arrays.parse_device(None) is None
    assert _arrays.parse_device("cpu") == ("cpu", None)
    assert _arrays.parse_device("cuda") == ("cuda", None)
    assert _arrays.parse_device("CUDA:3") == ("cuda", 3)
    assert _arrays.parse_device(2) == ("cuda", 2)
    assert _arrays.parse_device(np.int64(1)) == ("cuda", 1)


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "cuda:-1", -1, 1.5, True])
def test_bad_device(device):
    a = np.zeros((1, 64, 4, 16), np.float32)
    with pytest.raises((TypeError, ValueError), match=w("device")):
        _call(a, a, a, device=device)
    with pytest.raises((TypeError, ValueError), match=w("device")):
        ringattn.RingDilatedAttention([64], [1], device=device)


def test_device_cpu_with_cuda_inputs():
    q, k, v = fakes("dl")
    with pytest.raises(ValueError, match=w("q") + ".*CUDA"):
        _call(q, k, v, device="cpu")


def test_numpy_path_unchanged():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 64, 4, 16)).astype(np.float32) for _ in range(3))
    o1 = _call(q, k, v)
    o2 = _call(q, k, v, device="cpu")
    assert isinstance(o1, np.ndarray) and np.array_equal(o1, o2)


def test_host_dlpack_inputs_run_on_the_cpu():
    """A CPU DLPack producer (no __array__) is read in place like NumPy."""
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, 64, 2, 8)).astype(np.float32) for _ in range(3))
    o = _call(DLPackOnly(q), DLPackOnly(k), DLPackOnly(v))
    assert isinstance(o, np.ndarray) and np.array_equal(o, _call(q, k, v))


@pytest.mark.skipif(HAVE_GPU, reason="fake CAI pointers are refused on a machine with a GPU")
def test_choose_stream():
    tensors = [_arrays.describe(FakeCAI(stream=s, ptr=BASE + i * 4096), "x") for i, s in enumerate((5, None, 9, 5))]
    try:
        assert _arrays.choose_stream(tensors) == (5, [9])
        assert _arrays.choose_stream(tensors[1:2]) == (None, [])
    finally:
        for t in tensors:
            t.release()


@pytest.mark.skipif(HAVE_GPU, reason="fake CAI pointers are refused on a machine with a GPU")
def test_cai_stream_is_passed_to_dlpack_producers():
    q = FakeCAI(ptr=BASE, stream=0xABC0)
    k = FakeDL(ptr=BASE + 2 ** 20)
    v = FakeDLLegacy(ptr=BASE + 2 ** 21)
    with pytest.raises((RuntimeError, ValueError)):
        _call(q, k, v)
    assert k.streams == [0xABC0] and v.streams == [0xABC0]
    q, k, v = fakes("dl")
    with pytest.raises((RuntimeError, ValueError)):
        _call(q, k, v)
    assert q.streams == [1]  # no CAI stream: the legacy default stream


@pytest.mark.skipif(HAVE_GPU, reason="fake CAI pointers are refused on a machine with a GPU")
def test_describe_all_gives_host_producers_no_stream():
    q = FakeCAI(ptr=BASE, stream=77)
    host = FakeDL(device=(1, 0))
    cuda = FakeDL(ptr=BASE + 2 ** 20)
    tensors = _arrays.describe_all({"q": cuda, "k": q, "v": host})
    assert list(tensors) == ["q", "k", "v"]
    _arrays.release_all(tensors)
    assert cuda.streams == [77] and host.streams == [None]
    assert cuda.deleted == 1 and host.deleted == 1


def test_describe_all_releases_on_failure():
    good = FakeDL()
    with pytest.raises(TypeError, match=w("v")):
        _arrays.describe_all({"q": good, "k": FakeDL(ptr=BASE + 2 ** 20), "v": FakeDL(code=0, ptr=BASE + 2 ** 21)})
    assert good.deleted == 1


def test_ring_class_dispatches():
    q, k, v = fakes("dl")
    k.device = (2, 3)
    ring = ringattn.RingDilatedAttention([64], [1], world_size=2)
    with pytest.raises(ValueError, match=w("k")):
        ring(q, k, v)
    assert ring.last_stats is None
