"""_ext.intake of __cuda_array_interface__ objects (no GPU needed).

Without a CUDA device the intake cannot ask the driver where a pointer
lives, so the fake (host-side, never dereferenced) addresses are accepted
with device -1; on a machine with a GPU they are refused as host memory.
"""

import numpy as np
import pytest

import ringattn
from fakes import BASE, FakeCAI, w
from ringattn import _ext

HAVE_GPU = ringattn.cuda_device_count() > 0
fake_pointers = pytest.mark.skipif(HAVE_GPU, reason="fake CAI pointers are refused on a machine with a GPU")


def intake(obj, name="q", stream=None):
    t = _ext.intake(obj, name, stream)
    t.release()
    return t


@fake_pointers
@pytest.mark.parametrize("version", [0, 2, 3])
def test_contiguous(version):
    t = intake(FakeCAI(shape=(2, 8, 3, 16), version=version, readonly=True))
    assert t.kind == "cuda" and t.device == -1 and t.source == "cai" and t.name == "q"
    assert t.ptr == BASE and t.shape == (2, 8, 3, 16) and t.dtype == "float32" and t.itemsize == 4
    assert t.strides == (8 * 3 * 16, 3 * 16, 16, 1)
    assert t.readonly and t.stream is None


@fake_pointers
def test_strides_in_bytes_and_size_one_axes():
    # (b=1, n=8, h=3, d=16) float16 view with a padded head axis
    t = intake(FakeCAI(shape=(1, 8, 3, 16), typestr="<f2", strides=(999 * 2, 64 * 2, 20 * 2, 2)), "k")
    assert t.dtype == "float16" and t.itemsize == 2
    assert t.strides == (384, 64, 20, 1)  # size-1 batch axis: its C-contiguous stride


@fake_pointers
def test_strides_not_multiple_of_itemsize():
    with pytest.raises(ValueError, match=w("v")):
        intake(FakeCAI(shape=(1, 8, 3, 16), strides=(4096, 192, 66, 4)), "v")


@fake_pointers
def test_stream_v3_and_v2():
    assert intake(FakeCAI(stream=12345)).stream == 12345
    assert intake(FakeCAI(stream=1)).stream == 1
    assert intake(FakeCAI(stream=2)).stream == 2
    cai = FakeCAI(version=2)
    cai.__cuda_array_interface__["stream"] = 999  # not part of v2: ignored
    assert intake(cai).stream is None


@fake_pointers
def test_stream_zero_refused():
    with pytest.raises(ValueError, match=w("k") + ".*ambiguous"):
        intake(FakeCAI(stream=0), "k")
    with pytest.raises(ValueError, match=w("k")):
        intake(FakeCAI(stream=-3), "k")


@fake_pointers
@pytest.mark.parametrize("typestr,expect", [("<f4", "float32"), ("<f2", "float16"), ("=f4", "float32"),
                                            ("|f4", "float32"), ("<f8", "float64")])
def test_typestr(typestr, expect):
    assert intake(FakeCAI(typestr=typestr)).dtype == expect


@fake_pointers
@pytest.mark.parametrize("typestr", ["<i4", "|b1", "<u2", "<c8"])
def test_bad_typestr(typestr):
    with pytest.raises(TypeError, match=w("q")):
        intake(FakeCAI(typestr=typestr))


@fake_pointers
def test_big_endian_refused():
    with pytest.raises(TypeError, match=w("q")):
        intake(FakeCAI(typestr=">f4"))


@fake_pointers
def test_bfloat16():
    assert intake(FakeCAI(typestr="<V2", descr=[("bfloat16", "<V2")])).dtype == "bfloat16"
    assert intake(FakeCAI(typestr="|V2", descr=[("bfloat16", "|V2")])).dtype == "bfloat16"

    class Named(FakeCAI):
        dtype = "ml_dtypes.bfloat16"

    assert intake(Named(typestr="<V2")).dtype == "bfloat16"
    with pytest.raises(TypeError, match=w("q")):
        intake(FakeCAI(typestr="<V2"))


@fake_pointers
def test_mask_and_missing_keys():
    with pytest.raises(ValueError, match=w("q") + ".*mask"):
        intake(FakeCAI(mask=object()))
    for key in ("shape", "typestr", "data"):
        with pytest.raises(ValueError, match=w("k") + f".*{key}"):
            intake(FakeCAI(omit=(key,)), "k")


@fake_pointers
def test_bad_data():
    f = FakeCAI()
    f.__cuda_array_interface__["data"] = (-5, False)
    with pytest.raises((TypeError, ValueError), match=w("q")):
        intake(f)
    f.__cuda_array_interface__["data"] = BASE
    with pytest.raises((TypeError, ValueError), match=w("q")):
        intake(f)


def test_raising_property_counts_as_absent():
    class Raises:
        @property
        def __cuda_array_interface__(self):
            raise RuntimeError("not on a GPU")

    with pytest.raises(TypeError, match=w("q") + ".*Raises"):
        intake(Raises())


def test_not_an_array():
    with pytest.raises(TypeError, match=w("v") + ".*NumPy array or a CUDA array"):
        intake([1.0, 2.0], "v")


@fake_pointers
def test_release_is_idempotent_and_obj_kept():
    f = FakeCAI()
    t = _ext.intake(f, "q")
    assert t.obj is f
    t.release()
    t.release()
    assert "q" in repr(t)


def test_numpy_intake():
    a = np.zeros((2, 4, 3, 8), np.float16)[:, ::2]
    t = intake(a, "k")
    assert (t.kind, t.source, t.device, t.dtype) == ("cpu", "numpy", -1, "float16")
    assert t.ptr == a.ctypes.data and t.strides == tuple(s // 2 for s in a.strides)
    assert not t.readonly
    a.setflags(write=False)
    assert intake(a).readonly
    with pytest.raises(TypeError, match=w("v") + ".*int32"):
        intake(np.zeros(3, np.int32), "v")
    with pytest.raises(TypeError, match=w("v")):
        intake(np.zeros(3, ">f4"), "v")
