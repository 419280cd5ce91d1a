"""Every fusedcomm op is a real torch custom op: schema, fake impl where it touches tensors,
and opcheck where running it twice is harmless."""

import pytest
import torch

import fusedcomm as comm  # noqa: F401  (registers the ops)

OPS = {
    "trtllm_lamport_initialize": "(int buffer_ptr, int size, int dtype_bytes) -> ()",
    "vllm_meta_size": "() -> int",
    "vllm_init_custom_ar": None,
    "vllm_register_buffer": None,
    "vllm_all_reduce": "Tensor(a!) out",
    "vllm_get_graph_buffer_ipc_meta": "(int fa) -> (int[], int[])",
    "vllm_register_graph_buffers": None,
    "vllm_dispose": "(int fa) -> ()",
}


@pytest.mark.parametrize("name", list(OPS))
def test_every_op_is_registered_with_a_schema(name):
    fragment = OPS[name]
    schema = str(getattr(torch.ops.fusedcomm, name).default._schema)
    assert schema.startswith(f"fusedcomm::{name}("), schema
    if fragment:
        assert fragment in schema, schema


def test_opcheck_meta_size():
    torch.library.opcheck(torch.ops.fusedcomm.vllm_meta_size.default, ())
    assert torch.ops.fusedcomm.vllm_meta_size() == comm.vllm_meta_size() >= 3456


@pytest.mark.gpu(1)
def test_opcheck_lamport_initialize():
    buf = torch.randint(1, 255, (4096,), dtype=torch.uint8, device="cuda")
    torch.library.opcheck(
        torch.ops.fusedcomm.trtllm_lamport_initialize.default, (buf.data_ptr(), 1024, 2)
    )
    torch.cuda.synchronize()
    assert torch.all(buf[:2048].view(torch.int16) == -32768)


@pytest.mark.gpu(1)
def test_control_ops_run_through_torch_ops():
    ops = torch.ops.fusedcomm
    meta = torch.zeros(ops.vllm_meta_size() + 4096, dtype=torch.uint8, device="cuda")
    buf = torch.zeros(4096, dtype=torch.uint8, device="cuda")
    rank_data = torch.empty(64 * 8, dtype=torch.uint8, device="cuda")
    ptr = meta.data_ptr()
    fa = ops.vllm_init_custom_ar([ptr, ptr], rank_data, 0, True, 5.0)
    ops.vllm_register_buffer(fa, [buf.data_ptr(), buf.data_ptr()])
    assert ops.vllm_get_graph_buffer_ipc_meta(fa) == ([], [])
    ops.vllm_register_graph_buffers(fa, [[], []], [[], []])
    ops.vllm_dispose(fa)
    with pytest.raises(ValueError, match="not a live handle"):
        ops.vllm_dispose(fa)
