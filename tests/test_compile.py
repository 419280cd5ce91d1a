"""What torch.compile(fullgraph=True) traces, as the README says it (CPU: fake CUDA tensors,
nothing runs; the graph is taken from the backend before anything executes).

Traced into one graph, each as its registered op: ``allreduce_fusion`` and
``trtllm_allreduce_fusion`` (``fusedcomm::allreduce_fusion``; run on CPU in
tests/test_fusion_calls.py), the MoE fusions (``fusedcomm::moe_allreduce_fusion``;
tests/test_moe_fusion_api.py), ``vllm_all_reduce`` and ``decode_cp_a2a_alltoall`` (here).
Not traced: the MoE all-to-all (``moe_a2a_*`` and ``MoeAlltoAll``) splits the graph around each
call, an error under fullgraph (here); ``trtllm_lamport_initialize`` refuses to run under
torch.compile (tests/test_lamport.py).
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fusedcomm as comm
from fusedcomm.ops import vllm_ar

# Every op in the fusedcomm namespace, and nothing else: each is called by a frontend while
# torch.compile traces, or is a control op engines call through torch.ops.
REGISTERED = {
    "allreduce_fusion",
    "moe_allreduce_fusion",
    "decode_cp_a2a_alltoall",
    "trtllm_custom_all_reduce",
    "trtllm_lamport_initialize",
    "vllm_all_reduce",
    "vllm_dispose",
    "vllm_get_graph_buffer_ipc_meta",
    "vllm_init_custom_ar",
    "vllm_meta_size",
    "vllm_register_buffer",
    "vllm_register_graph_buffers",
}


class _Captured(Exception):
    pass


def _traced_ops(fn, *args) -> list[str]:
    """The fusedcomm ops in the one graph torch.compile(fullgraph=True) makes of ``fn``."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        raise _Captured  # stop before anything runs

    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as info:
        torch.compile(fn, fullgraph=True, backend=backend)(*args)
    assert isinstance(info.value.inner_exception, _Captured)
    assert len(graphs) == 1
    return [
        str(node.target).removesuffix(".default")
        for node in graphs[0].graph.nodes
        if node.op == "call_function" and str(node.target).startswith("fusedcomm.")
    ]


@pytest.fixture
def fake():
    mode = FakeTensorMode()
    with mode:
        yield mode


def test_the_namespace_holds_exactly_the_ops_something_calls():
    names = {
        n.split("::", 1)[1]
        for n in torch._C._dispatch_get_all_op_names()
        if n.startswith("fusedcomm::")
    }
    assert names == REGISTERED


def test_decode_cp_a2a_alltoall_traces_under_fullgraph(fake):
    po = torch.empty(4, 2, 8, dtype=torch.float16, device="cuda")
    so = torch.empty(4, 2, 2, dtype=torch.float32, device="cuda")
    ws = torch.empty(2, 1 << 16, dtype=torch.uint8, device="cuda")

    def step(po, so, ws):
        o, s = comm.decode_cp_a2a_alltoall(po * 2, so, ws, 1, 2, enable_pdl=False)
        return o + 1, s

    assert _traced_ops(step, po, so, ws) == ["fusedcomm.decode_cp_a2a_alltoall"]


def test_vllm_all_reduce_traces_under_fullgraph(fake):
    vllm_ar._algorithm_code("auto")  # what creating the handle (always eager) does first
    x = torch.empty(64, dtype=torch.bfloat16, device="cuda")
    out = torch.empty_like(x)

    def step(x, out):
        comm.vllm_all_reduce(1, x + 1, out, 0, 0, 8, algorithm="oneshot")
        return out * 2

    assert _traced_ops(step, x, out) == ["fusedcomm.vllm_all_reduce"]


@pytest.mark.parametrize(
    "call",
    [
        lambda ws, t: comm.moe_a2a_dispatch(t, [t], ws, t, 1, 0, 2, 1, 2),
        lambda ws, t: comm.moe_a2a_combine(t, 1, ws, t, 1, 0, 2, 1, 0),
        lambda ws, t: comm.moe_a2a_sanitize_expert_ids(t, ws, t, 0, -1),
    ],
    ids=["dispatch", "combine", "sanitize"],
)
def test_moe_a2a_is_a_graph_break_and_fullgraph_refuses_it(call):
    ws = torch.zeros(2, 64, dtype=torch.uint8)
    t = torch.zeros(1, 1, dtype=torch.int32)
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported, match="torch.compiler.disable"):
        torch.compile(lambda ws, t: call(ws, t), fullgraph=True, backend="eager")(ws, t)
