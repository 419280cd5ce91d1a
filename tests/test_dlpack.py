"""Tests for fusedcomm.dlpack_utils.pack_strided_memory and its DLPack builder."""

import ctypes

import pytest
import torch

from fusedcomm import dlpack_utils
from fusedcomm.dlpack_utils import KDL_CPU, KDL_CUDA, _view_from_pointer, pack_strided_memory

SUPPORTED = [
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.uint16,
    torch.uint32,
    torch.uint64,
]
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
FAKE_PTR = 0x7F0000001000  # never dereferenced: every call below fails validation


def _bits(t):
    """Same memory reinterpreted as integers, so NaN patterns compare exactly."""
    return t.view(_BITS[t.element_size()])


def _random_bytes(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)


# ----------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(ptr=0), ValueError, ["ptr", "0x0", "non-null"]),
        (dict(ptr=-8), ValueError, ["ptr"]),
        (dict(ptr=1 << 64), ValueError, ["ptr"]),
        (dict(ptr="0x1000"), TypeError, ["ptr", "str"]),
        (dict(ptr=True), TypeError, ["ptr", "bool"]),
        (dict(ptr=ctypes.c_void_p(FAKE_PTR)), TypeError, ["ptr", "c_void_p"]),
        (dict(segment_size=10), ValueError, ["segment_size (10)", "multiple", "4"]),
        (dict(segment_size=0), ValueError, ["segment_size (0)", ">= 1"]),
        (dict(segment_size=8.0), TypeError, ["segment_size", "float"]),
        (dict(segment_stride=70), ValueError, ["segment_stride (70)", "multiple", "4"]),
        (dict(segment_stride=32), ValueError, ["segment_stride (32)", "segment_size (64)"]),
        (dict(segment_stride=-4), ValueError, ["segment_stride (-4)"]),
        (dict(num_segments=0), ValueError, ["num_segments (0)", ">= 1"]),
        (dict(num_segments=None), TypeError, ["num_segments", "NoneType"]),
        (dict(dev_id=-1), ValueError, ["dev_id (-1)", ">= 0"]),
        (dict(dev_id="cuda:0"), TypeError, ["dev_id", "str"]),
        (dict(dtype="float32"), TypeError, ["dtype", "str"]),
        (dict(dtype=torch.complex64), NotImplementedError, ["torch.complex64"]),
        (dict(dtype=torch.bool), NotImplementedError, ["torch.bool"]),
    ],
)
def test_argument_errors(kwargs, exc, words):
    args = dict(
        ptr=FAKE_PTR,
        segment_size=64,
        segment_stride=128,
        num_segments=2,
        dtype=torch.float32,
        dev_id=0,
    )
    args.update(kwargs)
    with pytest.raises(exc) as info:
        pack_strided_memory(**args)
    text = str(info.value)
    assert text.startswith("pack_strided_memory") or exc is NotImplementedError
    missing = [word for word in words if word not in text]
    assert not missing, f"{missing} not in {text!r}"


def test_element_size_rule_uses_dtype():
    # 6 bytes is a whole number of fp16 elements but not of fp32 elements.
    with pytest.raises(ValueError, match=r"segment_size \(6\).*element size 4"):
        pack_strided_memory(FAKE_PTR, 6, 8, 1, torch.float32, 0)
    with pytest.raises(ValueError, match=r"segment_stride \(10\).*element size 4"):
        pack_strided_memory(FAKE_PTR, 8, 10, 1, torch.float32, 0)


@pytest.mark.parametrize("dtype", SUPPORTED, ids=str)
def test_shape_and_strides_handed_to_builder(monkeypatch, dtype):
    seen = []
    monkeypatch.setattr(dlpack_utils, "_view_from_pointer", lambda *a: seen.append(a) or "view")
    elem = dtype.itemsize
    out = pack_strided_memory(FAKE_PTR, 24 * elem, 40 * elem, 3, dtype, 1)
    assert out == "view"
    assert seen == [(FAKE_PTR, (3, 24), (40, 1), dtype, KDL_CUDA, 1)]


def test_equal_size_and_stride_is_contiguous(monkeypatch):
    seen = []
    monkeypatch.setattr(dlpack_utils, "_view_from_pointer", lambda *a: seen.append(a))
    pack_strided_memory(FAKE_PTR, 96, 96, 5, torch.bfloat16, 0)
    assert seen[0][1:3] == ((5, 48), (48, 1))


# ----------------------------------------------------------------------------- CPU views


@pytest.mark.parametrize("dtype", SUPPORTED, ids=str)
@pytest.mark.parametrize(
    "segments, seg_elems, stride_elems, offset_elems",
    [(1, 1, 1, 0), (3, 5, 7, 1), (4, 16, 16, 3), (7, 9, 33, 2)],
)
def test_cpu_view_matches_as_strided(dtype, segments, seg_elems, stride_elems, offset_elems):
    elem = dtype.itemsize
    total = (offset_elems + segments * stride_elems + 4) * elem
    base = _random_bytes(total, seed=segments * 131 + seg_elems * 7 + elem)
    typed = base.view(dtype)
    ptr = typed.data_ptr() + offset_elems * elem
    shape, strides = (segments, seg_elems), (stride_elems, 1)

    view = _view_from_pointer(ptr, shape, strides, dtype, KDL_CPU, 0)
    ref = typed.as_strided(shape, strides, offset_elems)
    assert view.dtype == dtype
    assert view.device.type == "cpu"
    assert view.shape == ref.shape and view.stride() == ref.stride()
    assert view.data_ptr() == ref.data_ptr()
    assert torch.equal(_bits(view), _bits(ref))

    # Writes through the view land in the underlying memory, and only in the view.
    before = base.clone()
    fresh = _random_bytes(segments * seg_elems * elem, seed=99 + elem)
    fresh = fresh.view(_BITS[elem]).view(segments, seg_elems)
    _bits(view).copy_(fresh)
    assert torch.equal(_bits(ref), fresh)
    touched = torch.zeros(total // elem, dtype=torch.bool)
    touched.as_strided(shape, strides, offset_elems).fill_(True)
    untouched = ~touched.repeat_interleave(elem)
    assert torch.equal(base[untouched], before[untouched])


def test_cpu_view_does_not_own_memory():
    base = torch.arange(64, dtype=torch.int32)
    view = _view_from_pointer(base.data_ptr(), (4, 8), (16, 1), torch.int32, KDL_CPU, 0)
    base.add_(1000)
    assert torch.equal(view, base.as_strided((4, 8), (16, 1)))
    view.zero_()
    assert int(base[0]) == 0 and int(base[8]) == 1008


def test_each_call_is_a_new_view():
    base = torch.arange(32, dtype=torch.float32)
    a = _view_from_pointer(base.data_ptr(), (2, 8), (16, 1), torch.float32, KDL_CPU, 0)
    b = _view_from_pointer(base.data_ptr(), (2, 8), (16, 1), torch.float32, KDL_CPU, 0)
    assert a is not b
    del a
    assert torch.equal(b, base.as_strided((2, 8), (16, 1)))


# ----------------------------------------------------------------------------- lifetime


def _malloc_in_use():
    libc = ctypes.CDLL(None)
    fn = getattr(libc, "mallinfo2", None)
    if fn is None:
        pytest.skip("needs glibc mallinfo2 to count C heap bytes")

    class _Info(ctypes.Structure):
        _fields_ = [
            (n, ctypes.c_size_t)
            for n in (
                "arena",
                "ordblks",
                "smblks",
                "hblks",
                "hblkhd",
                "usmblks",
                "fsmblks",
                "uordblks",
                "fordblks",
                "keepcost",
            )
        ]

    fn.restype = _Info
    return lambda: fn().uordblks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float8_e4m3fn, torch.uint32], ids=str)
def test_many_views_do_not_leak(dtype):
    in_use = _malloc_in_use()
    base = _random_bytes(4096, seed=5).view(dtype)
    ref = base.as_strided((4, 8), (16, 1))

    def churn(n):
        for _ in range(n):
            v = _view_from_pointer(base.data_ptr(), (4, 8), (16, 1), dtype, KDL_CPU, 0)
            row = v[1]  # a view of the view keeps the descriptor alive
            del v
            assert torch.equal(_bits(row), _bits(ref[1]))
            del row

    churn(500)  # warm torch's own caches
    start = in_use()
    iterations = 20000
    churn(iterations)
    grown = in_use() - start
    # One descriptor is ~100 bytes; a leak would add ~2 MB here.
    assert grown < iterations * 16, f"C heap grew by {grown} bytes over {iterations} views"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal path of a CPU torch")
def test_refused_capsule_is_freed():
    in_use = _malloc_in_use()

    def attempt(n):
        for _ in range(n):
            with pytest.raises((RuntimeError, AssertionError)):
                pack_strided_memory(FAKE_PTR, 64, 64, 2, torch.float32, 0)

    attempt(200)
    start = in_use()
    attempt(5000)
    grown = in_use() - start
    assert grown < 5000 * 16, f"C heap grew by {grown} bytes over 5000 refused capsules"


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu(1)
@pytest.mark.parametrize("dtype", SUPPORTED, ids=str)
def test_cuda_view_matches_strided_view(dtype):
    dev = torch.cuda.current_device()
    elem = dtype.itemsize
    segments, seg_elems, stride_elems, offset_elems = 5, 24, 40, 3
    total = (offset_elems + segments * stride_elems + 8) * elem
    gen = torch.Generator(device="cuda").manual_seed(1234 + elem)
    base = torch.randint(0, 256, (total,), dtype=torch.uint8, device="cuda", generator=gen)
    typed = base.view(dtype)
    ptr = typed.data_ptr() + offset_elems * elem

    view = pack_strided_memory(ptr, seg_elems * elem, stride_elems * elem, segments, dtype, dev)
    ref = typed.as_strided((segments, seg_elems), (stride_elems, 1), offset_elems)
    assert view.device == torch.device("cuda", dev)
    assert view.dtype == dtype
    assert view.shape == ref.shape and view.stride() == ref.stride()
    assert view.data_ptr() == ref.data_ptr()
    assert torch.equal(_bits(view), _bits(ref))

    before = base.clone()
    fresh = torch.randint(-100, 100, (segments, seg_elems), device="cuda", generator=gen).to(
        _BITS[elem]
    )
    _bits(view).copy_(fresh)
    torch.cuda.synchronize()
    assert torch.equal(_bits(ref), fresh)
    touched = torch.zeros(total // elem, dtype=torch.bool, device="cuda")
    touched.as_strided((segments, seg_elems), (stride_elems, 1), offset_elems).fill_(True)
    untouched = ~touched.repeat_interleave(elem)
    assert torch.equal(base[untouched], before[untouched])


@pytest.mark.gpu(1)
def test_cuda_views_over_time_release_descriptors():
    dev = torch.cuda.current_device()
    base = torch.randn(1024, device="cuda")
    for i in range(2000):
        v = pack_strided_memory(base.data_ptr(), 256, 512, 4, torch.float32, dev)
        if i % 500 == 0:
            assert torch.equal(v, base.as_strided((4, 64), (128, 1)))
        del v
    torch.cuda.synchronize()
