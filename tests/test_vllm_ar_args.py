"""Argument checks of the vLLM all-reduce: every bad input is refused before any launch."""

import pytest
import torch

import fusedcomm as comm


def test_meta_size_is_published_value():
    assert comm.vllm_meta_size() % 128 == 0 and comm.vllm_meta_size() >= 3456


def test_unknown_handle_and_bad_algorithm():
    x = torch.empty(8)
    with pytest.raises(ValueError, match="not a live handle"):
        comm.vllm_all_reduce(12345, x, x, 0, 0, 1)
    with pytest.raises(ValueError, match="algorithm"):
        comm.vllm_all_reduce(12345, x, x, 0, 0, 1, algorithm="threeshot")
    with pytest.raises(ValueError, match="not a live handle"):
        comm.vllm_dispose(12345)


def test_init_rejects_cpu_rank_data_and_non_list():
    with pytest.raises(TypeError, match="rank_data must be a CUDA tensor"):
        comm.vllm_init_custom_ar([1, 2], torch.empty(64, dtype=torch.uint8), 0, True)
    with pytest.raises(TypeError, match="one pointer per rank"):
        comm.vllm_init_custom_ar(1234, torch.empty(64, dtype=torch.uint8), 0, True)


def test_init_without_full_nvlink_needs_two_ranks():
    with pytest.raises(NotImplementedError, match="full_nvlink=False supports only 2 ranks"):
        comm.vllm_init_custom_ar([1, 2, 3, 4], torch.empty(64, dtype=torch.uint8), 0, False)


def test_all_reduce_traces_with_fake_tensors():
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(
        lambda x, out: torch.ops.fusedcomm.vllm_all_reduce(7, x, out, 0, 0, 4, 0),
        tracing_mode="fake",
    )(torch.empty(16), torch.empty(16))
    assert any("vllm_all_reduce" in str(n.target) for n in gm.graph.nodes)


@pytest.fixture
def handle():
    meta = torch.zeros(comm.vllm_meta_size() + 4096, dtype=torch.uint8, device="cuda")
    buf = torch.zeros(4096, dtype=torch.uint8, device="cuda")
    rank_data = torch.empty(64 * 4, dtype=torch.uint8, device="cuda")
    ptr = meta.data_ptr()
    fa = comm.vllm_init_custom_ar([ptr, ptr], rank_data, 0, True)
    comm.vllm_register_buffer(fa, [buf.data_ptr(), buf.data_ptr()])
    yield fa, buf, rank_data
    comm.vllm_dispose(fa)


@pytest.mark.gpu(1)
@pytest.mark.parametrize(
    "world,rank,full,exc,match",
    [
        (3, 0, True, ValueError, "world size"),
        (10, 0, True, ValueError, "world size"),
        (1, 0, True, ValueError, "world size"),
        (2, 2, True, ValueError, "rank"),
        (2, -1, True, ValueError, "rank"),
    ],
)
def test_init_rejects(world, rank, full, exc, match):
    rank_data = torch.empty(256, dtype=torch.uint8, device="cuda")
    meta = torch.zeros(4096, dtype=torch.uint8, device="cuda")
    with pytest.raises(exc, match=match):
        comm.vllm_init_custom_ar([meta.data_ptr()] * world, rank_data, rank, full)


def _empty(n, dtype=torch.bfloat16):
    return torch.empty(n, device="cuda", dtype=dtype)


# Each case: the error, a fragment of its message, and the arguments after the handle
# (inp, out, reg_buffer, reg_buffer_bytes, num_ctas) built from a 64-element bf16 input `x`,
# the registered 4096-byte buffer `buf` and its address `reg`.
BAD_INPUTS = {
    "size_not_16_bytes": (
        ValueError,
        "multiple of 16",
        lambda x, buf, reg: (x[:7], torch.empty_like(x[:7]), reg, 4096, 1),
    ),
    "larger_than_reg_buffer": (
        ValueError,
        "larger than reg_buffer",
        lambda x, buf, reg: (x, torch.empty_like(x), reg, 64, 1),
    ),
    "non_contiguous": (
        ValueError,
        "contiguous",
        lambda x, buf, reg: (x.view(8, 8).t(), _empty((8, 8)), reg, 4096, 1),
    ),
    "dtype_differs": (
        TypeError,
        "differs",
        lambda x, buf, reg: (x, _empty(64, torch.float32), reg, 4096, 1),
    ),
    "int32": (
        TypeError,
        "not supported",
        lambda x, buf, reg: (x.to(torch.int32), _empty(64, torch.int32), reg, 4096, 1),
    ),
    "numel_differs": (ValueError, "elements", lambda x, buf, reg: (x, _empty(72), reg, 4096, 1)),
    "zero_ctas": (
        ValueError,
        "num_ctas",
        lambda x, buf, reg: (x, torch.empty_like(x), reg, 4096, 0),
    ),
    "too_many_ctas": (
        ValueError,
        "num_ctas",
        lambda x, buf, reg: (x, torch.empty_like(x), reg, 4096, 37),
    ),
    "unregistered_reg_buffer": (
        ValueError,
        "not registered",
        lambda x, buf, reg: (x, torch.empty_like(x), reg + 4096 * 1024, 4096, 1),
    ),
    "input_not_registered": (
        ValueError,
        "not a registered buffer",
        lambda x, buf, reg: (x, torch.empty_like(x), 0, 0, 1),
    ),
    "misaligned": (ValueError, "aligned", lambda x, buf, reg: (x[4:12], _empty(8), reg, 4096, 1)),
    "cpu_input": (
        ValueError,
        "cuda:",
        lambda x, buf, reg: (x.cpu(), torch.empty_like(x), reg, 4096, 1),
    ),
    "out_is_inp": (ValueError, "must not overlap inp", lambda x, buf, reg: (x, x, 0, 0, 1)),
    "partial_overlap": (
        ValueError,
        "overlap partially",
        lambda x, buf, reg: (x[:64], x[8:72], reg, 4096, 1),
    ),
    "out_in_reg_buffer": (
        ValueError,
        "must not overlap reg_buffer",
        lambda x, buf, reg: (x, buf.view(torch.bfloat16)[:64], reg, 4096, 1),
    ),
}


@pytest.mark.gpu(1)
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_all_reduce_rejects_bad_inputs(handle, case):
    fa, buf, _ = handle
    exc, match, make_args = BAD_INPUTS[case]
    x = torch.randn(128, device="cuda", dtype=torch.bfloat16)[:64]
    args = make_args(x._base if case == "partial_overlap" else x, buf, buf.data_ptr())
    with pytest.raises(exc, match=match):
        comm.vllm_all_reduce(fa, *args)
    torch.cuda.synchronize()


@pytest.mark.gpu(1)
def test_rank_data_overflow_is_reported(handle):
    fa, buf, rank_data = handle  # 4 records, 1 used by the registered buffer
    for i in range(3):
        comm.vllm_register_buffer(fa, [buf.data_ptr() + 16 * (i + 1)] * 2)
    with pytest.raises(RuntimeError, match="pointer records"):
        comm.vllm_register_buffer(fa, [buf.data_ptr() + 1024] * 2)
    with pytest.raises(ValueError, match="one per rank"):
        comm.vllm_register_buffer(fa, [buf.data_ptr()])


@pytest.mark.gpu(1)
def test_two_shot_refused_when_the_meta_buffer_cannot_hold_its_scratch():
    meta = torch.zeros(comm.vllm_meta_size() + 4096, dtype=torch.uint8, device="cuda")
    buf = torch.zeros(4096, dtype=torch.uint8, device="cuda")
    rank_data = torch.empty(64 * 4, dtype=torch.uint8, device="cuda")
    ptr = meta.data_ptr()
    fa = comm.vllm_init_custom_ar(
        [ptr, ptr], rank_data, 0, True, meta_bytes=comm.vllm_meta_size() + 256
    )
    try:
        comm.vllm_register_buffer(fa, [buf.data_ptr(), buf.data_ptr()])
        x = torch.randn(2048, device="cuda", dtype=torch.bfloat16)  # 4 KiB: 2 KiB per part
        with pytest.raises(ValueError, match="two-shot needs 2048 bytes of scratch"):
            comm.vllm_all_reduce(
                fa, x, torch.empty_like(x), buf.data_ptr(), 4096, 1, algorithm="twoshot"
            )
    finally:
        comm.vllm_dispose(fa)


def test_planner_is_a_pure_function_of_the_call():
    from fusedcomm.ops.vllm_ar import _control

    plan = _control().allreduce_peer_plan
    oneshot, twoshot = 1, 2
    # two ranks: one-shot at every size; more ranks: two-shot when large, if scratch fits
    assert plan(8 << 20, 2, 36, 0, False, 1 << 30)[0] == oneshot
    assert plan(8 << 20, 4, 36, 0, False, 1 << 30)[0] == twoshot
    assert plan(8 << 20, 4, 36, 0, False, 1 << 20)[0] == oneshot  # scratch too small
    assert plan(8 << 10, 8, 36, 0, False, 1 << 30)[0] == oneshot
    # explicit two-shot reports the scratch it needs (the last part takes the remainder)
    assert list(plan(4096, 2, 36, twoshot, False, 0)) == [twoshot, 0, 1, 2048]
    assert plan(4096 + 16, 4, 36, twoshot, False, 0)[3] == (4096 + 16) // 16 // 4 * 16 + 16
    # staging: in the kernel up to 4 MiB, a copy above; grid: one block per 512 packs, capped
    assert list(plan(4 << 20, 2, 36, 0, True, 0))[1:3] == [1, 36]
    assert plan((4 << 20) + 16, 2, 36, 0, True, 0)[1] == 2
    assert list(plan(8192, 2, 36, 0, False, 0))[1:3] == [0, 1]
    assert list(plan(8192, 2, 36, 0, False, 0)) == list(plan(8192, 2, 36, 0, False, 0))
