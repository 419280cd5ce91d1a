"""Lamport initialisation: buffers read back as negative zero, exactly where asked."""

import pytest
import torch

import fusedcomm as comm


def test_rejects_bad_arguments():
    with pytest.raises(TypeError, match="not supported"):
        comm.trtllm_lamport_initialize(1 << 20, 16, torch.int8)
    with pytest.raises(TypeError, match="torch.dtype"):
        comm.trtllm_lamport_initialize(1 << 20, 16, "bf16")
    with pytest.raises(ValueError, match="size"):
        comm.trtllm_lamport_initialize(1 << 20, -1, torch.float16)
    with pytest.raises(TypeError, match="size must be an int"):
        comm.trtllm_lamport_initialize(1 << 20, 1.5, torch.float16)


@pytest.mark.gpu(1)
def test_rejects_misaligned_pointer():
    buf = torch.empty(64, dtype=torch.uint8, device="cuda")
    with pytest.raises(ValueError, match="16-byte aligned"):
        comm.trtllm_lamport_initialize(buf.data_ptr() + 2, 8, torch.float16)


@pytest.mark.gpu(1)
@pytest.mark.parametrize(
    "dtype,word", [(torch.bfloat16, 0x8000), (torch.float16, 0x8000), (torch.float32, 0x80000000)]
)
@pytest.mark.parametrize("size", [1, 8, 1000, 4096 + 3, 1 << 20])
def test_fills_exactly_the_elements_asked_for(dtype, word, size):
    elem = torch.tensor([], dtype=dtype).element_size()
    total = size * elem + 4096
    buf = torch.randint(1, 255, (total,), dtype=torch.uint8, device="cuda")  # poison
    before = buf.clone()
    comm.trtllm_lamport_initialize(buf.data_ptr(), size, dtype)
    torch.cuda.synchronize()
    filled = size * elem  # not a byte more: the next element is someone else's data
    as_int = torch.int16 if elem == 2 else torch.int32
    words = buf[:filled].view(as_int).to(torch.int64) & (0xFFFF if elem == 2 else 0xFFFFFFFF)
    assert torch.all(words == word)
    assert torch.equal(buf[filled:], before[filled:])
    vals = buf[:filled].view(dtype)
    assert torch.all(vals == 0) and torch.all(torch.signbit(vals))


@pytest.mark.gpu(1)
def test_initialize_all_counts_bytes():
    bufs = [torch.randint(1, 255, (8192,), dtype=torch.uint8, device="cuda") for _ in range(3)]
    before = [b.clone() for b in bufs]
    comm.trtllm_lamport_initialize_all(*(b.data_ptr() for b in bufs), 4096, torch.bfloat16)
    # 4096 bytes, not elements, in each of the three buffers
    assert [bool(torch.all(b[:4096].view(torch.int16) == -32768)) for b in bufs] == [True] * 3
    assert [torch.equal(b[4096:], old[4096:]) for b, old in zip(bufs, before)] == [True] * 3


def test_refuses_inside_torch_compile():
    import torch._dynamo

    def fill(x):
        comm.trtllm_lamport_initialize(1 << 20, 16, torch.float16)
        return x + 1

    with pytest.raises(Exception, match="outside torch.compile"):
        torch.compile(fill, backend="eager", fullgraph=True)(torch.ones(2))
    torch._dynamo.reset()
