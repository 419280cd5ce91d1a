"""Argument checks of the vLLM all-reduce: every bad input is refused before any launch."""

import pytest
import torch

import fusedcomm as comm


def test_meta_size_is_published_value():
    assert comm.vllm_meta_size() == 3456


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

    gm = make_fx(lambda x, out: torch.ops.fusedcomm.vllm_all_reduce(7, x, out, 0, 0, 4, 0),
                 tracing_mode="fake")(torch.empty(16), torch.empty(16))
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
@pytest.mark.parametrize("world,rank,full,exc,match", [
    (3, 0, True, ValueError, "world size"), (10, 0, True, ValueError, "world size"),
    (1, 0, True, ValueError, "world size"), (2, 2, True, ValueError, "rank"),
    (2, -1, True, ValueError, "rank"),
])
def test_init_rejects(world, rank, full, exc, match):
    rank_data = torch.empty(256, dtype=torch.uint8, device="cuda")
    meta = torch.zeros(4096, dtype=torch.uint8, device="cuda")
    with pytest.raises(exc, match=match):
        comm.vllm_init_custom_ar([meta.data_ptr()] * world, rank_data, rank, full)


@pytest.mark.gpu(1)
def test_all_reduce_rejects_bad_inputs(handle):
    fa, buf, _ = handle
    reg = buf.data_ptr()
    x = torch.randn(64, device="cuda", dtype=torch.bfloat16)
    cases = [
        (ValueError, "multiple of 16", lambda: comm.vllm_all_reduce(fa, x[:7], torch.empty_like(x[:7]), reg, 4096, 1)),
        (ValueError, "larger than reg_buffer", lambda: comm.vllm_all_reduce(fa, x, torch.empty_like(x), reg, 64, 1)),
        (ValueError, "contiguous", lambda: comm.vllm_all_reduce(fa, x.view(8, 8).t(), torch.empty(8, 8, device="cuda", dtype=x.dtype), reg, 4096, 1)),
        (TypeError, "differs", lambda: comm.vllm_all_reduce(fa, x, torch.empty(64, device="cuda"), reg, 4096, 1)),
        (TypeError, "not supported", lambda: comm.vllm_all_reduce(fa, x.to(torch.int32), torch.empty(64, dtype=torch.int32, device="cuda"), reg, 4096, 1)),
        (ValueError, "elements", lambda: comm.vllm_all_reduce(fa, x, torch.empty(72, device="cuda", dtype=x.dtype), reg, 4096, 1)),
        (ValueError, "num_ctas", lambda: comm.vllm_all_reduce(fa, x, torch.empty_like(x), reg, 4096, 0)),
        (ValueError, "num_ctas", lambda: comm.vllm_all_reduce(fa, x, torch.empty_like(x), reg, 4096, 37)),
        (ValueError, "not registered", lambda: comm.vllm_all_reduce(fa, x, torch.empty_like(x), reg + 4096 * 1024, 4096, 1)),
        (ValueError, "not a registered buffer", lambda: comm.vllm_all_reduce(fa, x, torch.empty_like(x), 0, 0, 1)),
        (ValueError, "aligned", lambda: comm.vllm_all_reduce(fa, x[4:12], torch.empty(8, device="cuda", dtype=x.dtype), reg, 4096, 1)),
        (ValueError, "cuda:", lambda: comm.vllm_all_reduce(fa, x.cpu(), torch.empty_like(x), reg, 4096, 1)),
        (ValueError, "must not overlap inp", lambda: comm.vllm_all_reduce(fa, x, x, 0, 0, 1)),
        (ValueError, "must not overlap reg_buffer", lambda: comm.vllm_all_reduce(fa, x, buf.view(torch.bfloat16)[:64], reg, 4096, 1)),
    ]
    for exc, match, call in cases:
        with pytest.raises(exc, match=match):
            call()
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
