"""MoE all-to-all rounds on CPU, with a fake kernel module: the round in progress is tracked per
workspace (instances sharing one cannot interleave their rounds), a combine must repeat its
dispatch, and the call forms engines and the reference's tests use bind and behave (implemented
arguments work, the others raise NotImplementedError naming the argument, nothing is ignored).
Refused calls launch nothing."""

import inspect

import pytest
import torch

import fusedcomm
from fusedcomm import Mapping, MoeAlltoAll
from fusedcomm.ops import _moe_a2a_state as state
from fusedcomm.ops import moe_a2a as a2a_ops
from fusedcomm.ops.moe_a2a import MoeA2ACheckError
from fusedcomm.ops.moe_alltoall import MoeA2AArgumentError, MoeA2AStateError
from fusedcomm.runtime.moe_a2a_workspace import (
    MoeA2ALayout,
    moe_a2a_get_workspace_size_per_rank,
    moe_a2a_metainfo,
)

W, M, HIDDEN, EXPERTS = 2, 8, 64, 8
ROW = moe_a2a_get_workspace_size_per_rank(W, M, 4 * 4 + 2 * HIDDEN, 4 * HIDDEN)


class _FakeFailure:
    def check(self, op=None):
        pass

    def close(self):
        pass


class _FakeModule:
    """Records the launches; writes a recognisable value into a combine's output."""

    def __init__(self):
        self.calls = []

    def moe_a2a_dispatch_launch(self, experts, *args):
        self.calls.append("dispatch")
        self.args = args

    def moe_a2a_combine_launch(self, out, *args):
        self.calls.append("combine")
        self.combine = (out, *args)
        out.copy_(torch.arange(out.numel(), dtype=torch.float32).view(out.shape) / 3)

    def moe_a2a_sanitize_launch(self, *args):
        self.calls.append("sanitize")

    def moe_a2a_quantize_launch(self, rows, out, scales, *args):
        self.calls.append("quantize")
        self.quantize = (rows, out, scales, *args)


class _FakeBackend:
    def barrier(self):
        pass


def _register(rank=0, eplb=0):
    """A workspace as moe_a2a_initialize leaves it, on CPU, with a fake failure state."""
    row = ROW + MoeA2ALayout(W, M, eplb).payload_data
    ws = torch.zeros(W, row, dtype=torch.uint8)
    st = state._Workspace(
        workspace=ws,
        rank=rank,
        world=W,
        layout=MoeA2ALayout(W, M, eplb),
        row_bytes=row,
        row_stride=ws.stride(0),
        device=0,
        metainfo=moe_a2a_metainfo(W, M, eplb),
        failure=_FakeFailure(),
        dropped=torch.zeros(1, dtype=torch.int64),
        record=None,
    )
    state._workspaces[(ws.data_ptr(), rank)] = st
    return ws, st.metainfo


@pytest.fixture
def fake(monkeypatch):
    module = _FakeModule()
    monkeypatch.setattr(a2a_ops, "_module", lambda: module)
    monkeypatch.setattr(a2a_ops, "_pdl_default", lambda device: False)
    monkeypatch.setattr(state, "_pdl_default", lambda device: False)

    def create(self, mapping, mnnvl_config, eplb, timeout_s):
        ws, metainfo = _register(self.ep_rank)
        return {"workspace": ws, "metainfo": metainfo, "backend": _FakeBackend(), "eplb": eplb,
                "timeout_s": timeout_s}  # fmt: skip

    monkeypatch.setattr(MoeAlltoAll, "_create", create)
    monkeypatch.setattr(MoeAlltoAll, "_WORKSPACE_CACHE", {})
    monkeypatch.setattr(state, "_workspaces", {})
    return module


def _inputs(tokens, top_k, seed=0):
    g = torch.Generator().manual_seed(seed)
    experts = torch.stack([torch.randperm(EXPERTS, generator=g)[:top_k] for _ in range(tokens)])
    return experts.int().contiguous(), torch.randn(tokens, HIDDEN, generator=g).bfloat16()


def _instance(top_k=2):
    return MoeAlltoAll(Mapping(W, 0, tp_size=W, moe_ep_size=W), M, top_k, EXPERTS, ROW)


def _payload(r=M, dtype=torch.bfloat16):
    return torch.randn(W, r, HIDDEN).to(dtype)


def _q(kind, rows=4, layout=2):
    """Keyword arguments of a quantised combine output of `rows` tokens (hidden HIDDEN)."""
    from fusedcomm.reference.quant import scale_factor_buffer_size

    block = 16 if kind == "nvfp4" else 32
    sf_dtype = torch.float8_e4m3fn if kind == "nvfp4" else torch.uint8
    n = scale_factor_buffer_size(rows, HIDDEN // block, layout)
    out_dtype = torch.float8_e4m3fn if kind == "mxfp8" else torch.uint8
    return {"output_dtype": out_dtype, "sf_layout": layout,
            "output_scales": torch.zeros(n, dtype=torch.uint8).view(sf_dtype)}  # fmt: skip


# --- the round is the workspace's --------------------------------------------------------------


def test_instances_sharing_a_workspace_cannot_interleave_rounds(fake):
    a, b = _instance(top_k=2), _instance(top_k=4)
    assert a.workspace is b.workspace
    ea, ha = _inputs(5, 2)
    eb, hb = _inputs(7, 4, seed=1)
    a.dispatch(ea, [ha], M)
    assert (a.phase, b.phase) == ("dispatched", "idle")
    with pytest.raises(MoeA2AStateError, match="another MoeAlltoAll"):
        b.dispatch(eb, [hb], M)
    with pytest.raises(MoeA2AStateError, match="another MoeAlltoAll"):
        b.combine(_payload(), M)
    assert fake.calls == ["dispatch"]
    out = a.combine(_payload(), M)
    assert out.shape == (5, HIDDEN)
    assert (a.phase, b.phase) == ("idle", "idle")
    b.dispatch(eb, [hb], M)
    with pytest.raises(MoeA2AStateError):
        a.combine(_payload(), M)
    with pytest.raises(RuntimeError):
        a.get_combine_payload_tensor_in_workspace(M, HIDDEN, torch.bfloat16)
    assert b.combine(_payload(), M).shape == (7, HIDDEN)  # b's own local token count
    assert fake.calls == ["dispatch", "combine", "dispatch", "combine"]


def test_a_free_round_and_an_instance_round_do_not_mix(fake):
    a = _instance()
    experts, hidden = _inputs(3, 2)
    a.dispatch(experts, [hidden], M)
    args = (a.workspace, a.metainfo, M, 0, W, 2)
    with pytest.raises(MoeA2ACheckError, match="MoeAlltoAll"):
        fusedcomm.moe_a2a_dispatch(experts, [hidden], *args, EXPERTS)
    with pytest.raises(MoeA2ACheckError, match="another MoeAlltoAll"):
        fusedcomm.moe_a2a_combine(_payload(), 3, *args, a.metainfo[8].item())
    assert fake.calls == ["dispatch"]
    a.combine(_payload(), M)


def test_combine_must_repeat_its_dispatch(fake):
    ws, metainfo = _register()
    experts, hidden = _inputs(5, 2)
    common = (ws, metainfo, M, 0, W)
    with pytest.raises(MoeA2ACheckError, match="no dispatch"):
        fusedcomm.moe_a2a_combine(_payload(), 5, *common, 2, 1 << 12)
    _, offset = fusedcomm.moe_a2a_dispatch(experts, [hidden], *common, 2, EXPERTS)
    y = _payload()
    for local, top_k, match in ((4, 2, "local_num_tokens 4"), (5, 3, "top_k 3"), (6, 2, "6")):
        with pytest.raises(MoeA2ACheckError, match=match) as e:
            fusedcomm.moe_a2a_combine(y, local, *common, top_k, offset)
        assert isinstance(e.value, ValueError) and isinstance(e.value, RuntimeError)
    with pytest.raises(MoeA2ACheckError, match="combine_payload_offset"):
        fusedcomm.moe_a2a_combine(y, 5, *common, 2, offset + 128)
    assert fake.calls == ["dispatch"]
    assert fusedcomm.moe_a2a_combine(y, 5, *common, 2, offset).shape == (5, HIDDEN)
    with pytest.raises(MoeA2ACheckError, match="no dispatch"):  # the round is over
        fusedcomm.moe_a2a_combine(y, 5, *common, 2, offset)
    assert fake.calls == ["dispatch", "combine"]


# --- the signatures engines call ----------------------------------------------------------------

COMBINE_FREE = [
    "payload", "local_num_tokens", "workspace", "metainfo", "runtime_max_tokens_per_rank",
    "ep_rank", "ep_size", "top_k", "combine_payload_offset", "payload_in_workspace",
    "output_dtype", "output_scales", "output_scalar_scale", "sf_layout", "output",
]  # fmt: skip
COMBINE_METHOD = [
    "payload", "runtime_max_tokens_per_rank", "payload_in_workspace", "output_dtype",
    "output_scales", "output_scalar_scale", "sf_layout", "output",
]  # fmt: skip
INIT = [
    "mapping", "max_num_tokens", "top_k", "num_experts", "workspace_size_per_rank",
    "hidden_size", "mnnvl_config", "eplb_stats_num_experts", "enable_rank_mask",
]  # fmt: skip
DISPATCH_METHOD = [
    "token_selected_experts", "input_payloads", "runtime_max_tokens_per_rank",
    "invalid_token_expert_id", "expert_id_payload_index", "eplb_local_stats",
    "active_rank_mask",
]  # fmt: skip


def _positional(fn):
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [p.name for p in inspect.signature(fn).parameters.values() if p.kind in kinds]
    return names[1:] if names and names[0] == "self" else names


def _keyword_only(fn):
    params = inspect.signature(fn).parameters.values()
    return {p.name for p in params if p.kind == inspect.Parameter.KEYWORD_ONLY}


@pytest.mark.parametrize(
    ("fn", "positional", "keyword"),
    [
        (fusedcomm.moe_a2a_combine, COMBINE_FREE,
         {"use_low_precision", "enable_pdl", "enable_rank_mask", "active_rank_mask"}),
        (MoeAlltoAll.combine, COMBINE_METHOD, {"use_low_precision", "active_rank_mask"}),
        (MoeAlltoAll.__init__, INIT, set()),
        (MoeAlltoAll.dispatch, DISPATCH_METHOD, set()),
        (fusedcomm.moe_a2a_dispatch, None,
         {"eplb_local_stats", "enable_rank_mask", "active_rank_mask"}),
    ],
)  # fmt: skip
def test_positional_order_of_the_reference(fn, positional, keyword):
    if positional is not None:
        assert _positional(fn) == positional
    assert keyword <= _keyword_only(fn)


def test_an_eleventh_positional_combine_argument_is_the_output_dtype():
    bound = inspect.signature(fusedcomm.moe_a2a_combine).bind(*range(11))
    assert list(bound.arguments)[-1] == "output_dtype"
    with pytest.raises(TypeError):
        inspect.signature(fusedcomm.moe_a2a_combine).bind(*range(16))


def test_engine_call_forms_run(fake):
    a = _instance()
    experts, hidden = _inputs(4, 2)
    a.dispatch(experts, [hidden], M, None, None, None, None)
    out = torch.full((4, HIDDEN), float("nan"), dtype=torch.bfloat16)
    got = a.combine(_payload(), M, output=out, use_low_precision=False)
    assert got is out and not got.isnan().any()
    # The reference's single-GPU tests: output_dtype / output_scales / output_scalar_scale /
    # sf_layout by keyword, the layout as an int.
    a.dispatch(experts, [hidden], M, active_rank_mask=torch.tensor([(1 << W) - 1]))
    got = a.combine(_payload(), M, False, output_dtype=torch.float32, output_scales=None,
                    output_scalar_scale=1.0, sf_layout=2)  # fmt: skip
    assert got.dtype == torch.float32 and got.shape == (4, HIDDEN)
    # Converted from the payload-dtype result the kernel wrote (the fake writes k / 3).
    want = (torch.arange(4 * HIDDEN, dtype=torch.float32) / 3).bfloat16().float().view(4, HIDDEN)
    assert torch.equal(got, want)
    assert fake.calls == ["dispatch", "combine"] * 2


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"use_low_precision": "yes"}, TypeError, "use_low_precision"),
        ({"use_low_precision": True, **_q("mxfp8")}, NotImplementedError, "quantised output"),
        ({"use_low_precision": True, "output_scalar_scale": 2.0}, ValueError, "1.0"),
        ({"output_dtype": torch.float8_e4m3fn}, ValueError, "needs output_scales"),
        ({"output_dtype": torch.uint8}, ValueError, "needs output_scales"),
        ({"output_dtype": torch.int8}, NotImplementedError, "output_dtype"),
        ({"output_scales": torch.zeros(4, 4)}, TypeError, "output_scales"),
        ({"output_dtype": torch.uint8, "output_scales": torch.zeros(4, 4)}, TypeError,
         "output_scales"),
        ({"output_scalar_scale": 0.5}, ValueError, "output_scalar_scale"),
        ({"output_scalar_scale": "x"}, TypeError, "output_scalar_scale"),
        ({"sf_layout": 7}, ValueError, "sf_layout"),
        ({"output_dtype": "bf16"}, TypeError, "output_dtype"),
        ({"active_rank_mask": 1}, ValueError, "enable_rank_mask=True"),
        ({"active_rank_mask": 1.5}, TypeError, "active_rank_mask"),
        # Quantised outputs: every check before the round's launch.
        ({**_q("mxfp8"), "output_scalar_scale": 2.0}, ValueError, "global scale of NVFP4"),
        ({**_q("nvfp4"), "output_scalar_scale": 0.0}, ValueError, "finite and positive"),
        ({**_q("nvfp4"), "output_scalar_scale": float("inf")}, ValueError, "finite"),
        ({**_q("nvfp4", rows=5)}, ValueError, "exactly 16 scale bytes"),
        ({**_q("mxfp8", rows=200, layout=0)}, ValueError, "exactly 512 scale bytes"),
        ({**_q("mxfp4"), "output": torch.empty(4, HIDDEN, dtype=torch.uint8)}, ValueError,
         r"\[4, 32\] torch.uint8"),
        ({**_q("mxfp8"), "output": torch.empty(4, HIDDEN, dtype=torch.uint8)}, ValueError,
         "float8_e4m3fn"),
        ({**_q("nvfp4"), "output_scales": torch.zeros(4, 8, dtype=torch.uint8)[:, ::2]},
         ValueError, "contiguous"),
    ],
)  # fmt: skip
def test_combine_arguments_not_implemented_are_refused(fake, kwargs, error, match):
    a = _instance()
    experts, hidden = _inputs(4, 2)
    a.dispatch(experts, [hidden], M)
    with pytest.raises(error, match=match):
        a.combine(_payload(), M, **kwargs)
    assert fake.calls == ["dispatch"]
    assert a.phase == "dispatched"  # refused before anything ran: the round goes on
    a.combine(_payload(), M)


@pytest.mark.parametrize(
    ("kind", "dtype", "error", "match"),
    [
        ("nvfp4", torch.float32, TypeError, "float16 or bfloat16 payload"),
        ("mxfp8", torch.float32, TypeError, "float16 or bfloat16 payload"),
    ],
)
def test_quantised_outputs_need_a_16_bit_payload(fake, kind, dtype, error, match):
    a = _instance()
    experts, hidden = _inputs(4, 2)
    a.dispatch(experts, [hidden], M)
    with pytest.raises(error, match=match):
        a.combine(_payload(dtype=dtype), M, **_q(kind))
    assert fake.calls == ["dispatch"]


@pytest.mark.parametrize(
    ("dtype", "output_dtype", "wire", "want"),
    [
        (torch.bfloat16, None, 2, torch.bfloat16),
        (torch.float16, None, 1, torch.bfloat16),
        (torch.bfloat16, torch.float32, 2, torch.float32),
        (torch.float16, torch.float16, 1, torch.float16),
    ],
)
def test_low_precision_reaches_the_launch(fake, dtype, output_dtype, wire, want):
    a = _instance()
    experts, hidden = _inputs(4, 2)
    a.dispatch(experts, [hidden], M)
    got = a.combine(_payload(dtype=dtype), M, output_dtype=output_dtype, use_low_precision=True)
    assert got.dtype == want and got.shape == (4, HIDDEN)
    out, *args = fake.combine
    assert out.dtype == torch.bfloat16  # the kernel's sum, converted where asked
    assert args[-2] == wire and args[1] != 0  # the payload pointer: staged from the tensor
    assert fake.calls == ["dispatch", "combine"] and a.phase == "idle"


def test_low_precision_needs_a_16_bit_payload_and_hidden_a_multiple_of_32(fake):
    a = _instance()
    experts, hidden = _inputs(4, 2)
    a.dispatch(experts, [hidden], M)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        a.combine(_payload(dtype=torch.float32), M, use_low_precision=True)
    ws, metainfo = _register(rank=1)
    _, offset = fusedcomm.moe_a2a_dispatch(experts, [hidden], ws, metainfo, M, 1, W, 2, EXPERTS)
    payload = torch.randn(W, M, 48).bfloat16()
    with pytest.raises(ValueError, match="multiple of 32"):
        fusedcomm.moe_a2a_combine(payload, 4, ws, metainfo, M, 1, W, 2, offset,
                                  use_low_precision=True)  # fmt: skip
    assert fake.calls == ["dispatch", "dispatch"]


def test_mx_outputs_need_hidden_a_multiple_of_32(fake):
    ws, metainfo = _register()
    experts, hidden = _inputs(4, 2)
    _, offset = fusedcomm.moe_a2a_dispatch(experts, [hidden], ws, metainfo, M, 0, W, 2, EXPERTS)
    payload = torch.randn(W, M, 48).bfloat16()
    sf = torch.zeros(4, 1, dtype=torch.uint8)
    with pytest.raises(ValueError, match="multiple of 32"):
        fusedcomm.moe_a2a_combine(payload, 4, ws, metainfo, M, 0, W, 2, offset, False,
                                  torch.float8_e4m3fn, sf)  # fmt: skip
    assert fake.calls == ["dispatch"]


@pytest.mark.parametrize("layout", [0, 1, 2])
@pytest.mark.parametrize("kind", ["nvfp4", "mxfp8", "mxfp4"])
@pytest.mark.parametrize("given", [False, True])
def test_quantised_outputs_reach_the_launch(fake, kind, layout, given):
    a = _instance()
    experts, hidden = _inputs(4, 2)
    a.dispatch(experts, [hidden], M)
    q = _q(kind, layout=layout)
    width = HIDDEN if kind == "mxfp8" else HIDDEN // 2
    out = torch.empty(4, width, dtype=q["output_dtype"]) if given else None
    g = 0.75 if kind == "nvfp4" else 1.0
    # The reference's positional form: output_dtype, output_scales, output_scalar_scale,
    # sf_layout, output.
    got = a.combine(_payload(), M, False, q["output_dtype"], q["output_scales"], g, layout, out)
    assert got.shape == (4, width) and got.dtype == q["output_dtype"]
    assert out is None or got is out
    assert fake.calls == ["dispatch", "combine", "quantize"]
    rows, target, scales, mode, sf_layout, scalar, _pdl = fake.quantize
    assert rows.shape == (4, HIDDEN) and rows.dtype == torch.bfloat16  # the combine's sum
    assert target.data_ptr() == got.data_ptr() and target.dtype == torch.uint8
    assert scales.data_ptr() == q["output_scales"].data_ptr() and scales.dtype == torch.uint8
    assert (mode, sf_layout, scalar) == ({"nvfp4": 0, "mxfp8": 1, "mxfp4": 2}[kind], layout, g)
    assert a.phase == "idle"


def test_a_mask_that_excludes_ranks_needs_enable_rank_mask(fake):
    a = _instance()
    experts, hidden = _inputs(4, 2)
    with pytest.raises(MoeA2AArgumentError, match="enable_rank_mask=True"):
        a.dispatch(experts, [hidden], M, active_rank_mask=torch.tensor([1]))
    assert fake.calls == [] and a.phase == "idle"
    masked = MoeAlltoAll(Mapping(W, 0, tp_size=W, moe_ep_size=W), M, 2, EXPERTS, ROW,
                         enable_rank_mask=True)  # fmt: skip
    masked.dispatch(
        experts, [hidden], M, active_rank_mask=fusedcomm.moe_a2a_active_rank_mask([0], W)
    )
    assert list(fake.args[0]) == [1]  # the record of the fake workspace, plus the mask
    with pytest.raises(MoeA2ACheckError, match="must be the dispatch's"):
        masked.combine(_payload(), M)
    masked.combine(_payload(), M, active_rank_mask=1)
    assert list(fake.combine[1]) == [1] and masked.phase == "idle"


def test_active_rank_masks_are_checked_and_reach_the_launch(fake):
    ws, metainfo = _register(rank=1)
    experts, hidden = _inputs(4, 2)
    args = (experts, [hidden], ws, metainfo, M, 1, W, 2, EXPERTS)
    with pytest.raises(ValueError, match="must hold this rank"):
        fusedcomm.moe_a2a_dispatch(*args, active_rank_mask=1)
    with pytest.raises(TypeError, match="active_rank_mask"):
        fusedcomm.moe_a2a_dispatch(*args, active_rank_mask=torch.tensor([1.0]))
    with pytest.raises(TypeError, match="active_rank_mask"):
        fusedcomm.moe_a2a_dispatch(*args, active_rank_mask=torch.tensor([1, 2]))
    assert fake.calls == []
    # Bits of ranks outside the group are ignored; every rank's bit: the plain record.
    _, offset = fusedcomm.moe_a2a_dispatch(*args, active_rank_mask=0xFF)
    assert fake.args[0] is None
    _, offset = fusedcomm.moe_a2a_dispatch(*args, active_rank_mask=torch.tensor([2 | 8]))
    assert list(fake.args[0]) == [2]
    combine = (_payload(), 4, ws, metainfo, M, 1, W, 2, offset)
    with pytest.raises(MoeA2ACheckError, match=r"\(every rank\) must be the dispatch's \(0x2\)"):
        fusedcomm.moe_a2a_combine(*combine, active_rank_mask=3)
    fusedcomm.moe_a2a_combine(*combine, active_rank_mask=2)
    assert list(fake.combine[1]) == [2]


def test_the_reference_call_form_with_enable_rank_mask_runs(fake):
    # The reference's MoeAlltoAll (and engines calling the free functions) pass
    # enable_rank_mask= by keyword to dispatch and combine.
    ws, metainfo = _register(rank=1)
    experts, hidden = _inputs(4, 2)
    args = (experts, [hidden], ws, metainfo, M, 1, W, 2, EXPERTS)
    mask = fusedcomm.moe_a2a_active_rank_mask([1], W)
    _, offset = fusedcomm.moe_a2a_dispatch(
        *args, eplb_local_stats=None, enable_rank_mask=True, active_rank_mask=mask
    )
    assert list(fake.args[0]) == [2]
    combine = (_payload(), 4, ws, metainfo, M, 1, W, 2, offset)
    fusedcomm.moe_a2a_combine(*combine, enable_rank_mask=True, active_rank_mask=mask)
    assert list(fake.combine[1]) == [2]
    _, offset = fusedcomm.moe_a2a_dispatch(*args, enable_rank_mask=False, active_rank_mask=None)
    assert fake.args[0] is None
    combine = (_payload(), 4, ws, metainfo, M, 1, W, 2, offset)
    fusedcomm.moe_a2a_combine(*combine, use_low_precision=False, enable_pdl=None,
                              enable_rank_mask=False, active_rank_mask=None)  # fmt: skip


def test_active_rank_mask_helper():
    mask = fusedcomm.moe_a2a_active_rank_mask([0, 1, 3], 4)
    assert mask.dtype == torch.uint64 and mask.device.type == "cpu" and mask.tolist() == [11]
    assert fusedcomm.moe_a2a_active_rank_mask(torch.tensor([2]), 4).tolist() == [4]
    with pytest.raises(ValueError, match="outside"):
        fusedcomm.moe_a2a_active_rank_mask([4], 4)


@pytest.mark.parametrize(
    ("stats", "error", "match"),
    [
        (torch.zeros(EXPERTS, dtype=torch.int64), TypeError, "int32"),
        (torch.zeros(2, 4, dtype=torch.int32), ValueError, "1-D"),
        (torch.zeros(EXPERTS + 1, dtype=torch.int32), ValueError, r"eplb_stats_num_experts \(8\)"),
        (torch.zeros(0, dtype=torch.int32), ValueError, "1 to"),
        (torch.zeros(16, dtype=torch.int32)[::2], ValueError, "contiguous"),
        ([1, 2], TypeError, "torch.Tensor"),
    ],
)  # fmt: skip
def test_eplb_local_stats_are_checked_before_the_launch(fake, stats, error, match):
    ws, metainfo = _register(eplb=EXPERTS)
    experts, hidden = _inputs(4, 2)
    with pytest.raises(error, match=match):
        fusedcomm.moe_a2a_dispatch(
            experts, [hidden], ws, metainfo, M, 0, W, 2, EXPERTS, eplb_local_stats=stats
        )
    assert fake.calls == []


def test_eplb_local_stats_reach_the_launch(fake):
    ws, metainfo = _register(eplb=EXPERTS)
    experts, hidden = _inputs(4, 2)
    stats = torch.arange(5, dtype=torch.int32)
    out = fusedcomm.moe_a2a_dispatch(
        experts, [hidden], ws, metainfo, M, 0, W, 2, EXPERTS, eplb_local_stats=stats
    )
    assert len(out) == 2  # the documented 2-tuple
    assert fake.args[-3:-1] == (stats.data_ptr(), 5)
    gathered = a2a_ops.moe_a2a_eplb_gathered_stats(ws, 0)
    assert gathered.shape == (W, EXPERTS) and gathered.dtype == torch.int32
    layout = MoeA2ALayout(W, M, EXPERTS)
    assert gathered.data_ptr() == ws.data_ptr() + layout.eplb_gathered_stats
    ws_plain, meta_plain = _register(rank=1)
    with pytest.raises(ValueError, match="eplb_stats_num_experts > 0"):
        fusedcomm.moe_a2a_dispatch(
            experts, [hidden], ws_plain, meta_plain, M, 1, W, 2, EXPERTS, eplb_local_stats=stats
        )


def test_checkpointing_raises_not_implemented(fake):
    a = _instance()
    with pytest.raises(NotImplementedError, match="checkpoint"):
        a.checkpoint_prepare()
    with pytest.raises(NotImplementedError, match="checkpoint"):
        a.checkpoint_restore(_FakeBackend())
    masked = MoeAlltoAll(Mapping(W, 0, tp_size=W, moe_ep_size=W), M, 2, EXPERTS, None, HIDDEN,
                         None, 0, True)  # fmt: skip
    assert masked.enable_rank_mask
    with pytest.raises(ValueError, match="without an EPLB region"):
        a.eplb_gathered_stats  # noqa: B018
