"""The fused all-reduce API on CPU (device layer faked): enums, workspaces, every argument
check before the launch, the FusionCall the kernels get, return values, torch.compile."""

import gc
import random

import pytest
import torch

import fusedcomm as comm
import fusion_fakes
from fusedcomm.runtime import fusion_control
from fusedcomm.runtime import fusion_workspace as fw
from fusion_fakes import BF16, D, FakeBackend, M, W, fake_plan, make_ws

dev = fusion_fakes.dev  # the fixture

# ------------------------------------------------------------------------------------------
# Enums and constants


def _numbered(*names):
    return {name: value for value, name in enumerate(names)}


@pytest.mark.parametrize(
    "cls,values",
    [
        (
            comm.AllReduceStrategyType,
            _numbered("NCCL", "MIN_LATENCY", "UB", "AUTO", "ONESHOT", "TWOSHOT", "LOWPRECISION"),
        ),
        (comm.AllReduceStrategyConfig, {"USE_MEMCPY": 1, "PUSH_MODE": 2}),
        (
            comm.AllReduceFusionOp,
            _numbered(
                "NONE",
                "RESIDUAL_RMS_NORM",
                "LAST_PROCESS_FOR_UB",
                "RESIDUAL_RMS_PREPOST_NORM",
                "RESIDUAL_RMS_NORM_QUANT_FP8",
                "RESIDUAL_RMS_NORM_QUANT_NVFP4",
                "RESIDUAL_RMS_NORM_OUT_QUANT_FP8",
                "RESIDUAL_RMS_NORM_OUT_QUANT_NVFP4",
                "MOE_ALLREDUCE_RESIDUAL_RMS_NORM",
                "MOE_FINALIZE_ALLREDUCE_RESIDUAL_RMS_NORM",
            ),
        ),
        (
            comm.AllReduceFusionPattern,
            _numbered(
                "kAllReduce",
                "kARResidualRMSNorm",
                "kARResidualRMSNormFP8Quant",
                "kARResidualRMSNormFP4Quant",
                "kARResidualRMSNormOutFP8Quant",
                "kARResidualRMSNormOutFP4Quant",
                "kMoEReductionARResidualRMSNorm",
                "kMoEFinalizeARResidualRMSNorm",
                "kARResidualRMSNormPerTokenGroupFP8PackedQuant",
                "kARResidualRMSNormOutPerTokenGroupFP8PackedQuant",
                "kARResidualRMSNormDynamicFP8Quant",
                "kARResidualRMSNormOutDynamicFP8Quant",
                "kMoEFinalizeARResidualRMSNormFP8Quant",
            ),
        ),
        (comm.QuantizationSFLayout, _numbered("SWIZZLED_128x4", "SWIZZLED_8x4", "LINEAR")),
    ],
)
def test_enum_values_are_plain_ints(cls, values):
    for name, value in values.items():
        got = getattr(cls, name)
        assert type(got) is int and got == value, name


def test_constants():
    assert (comm.BarrierFlagCount, comm.MAX_COMM_SIZE, comm.OneShotMaxToken) == (
        256,
        2145386496,
        128,
    )
    assert comm.enums.DYNAMIC_FP8_MIN_SCALE == 2.0**-9 / 448


# ------------------------------------------------------------------------------------------
# Workspaces


def test_workspace_bytes_planned_before_allocation(dev):
    plan = fake_plan(W, M, D, BF16)
    assert (
        comm.fusion_workspace_bytes(W, M, D, BF16) == plan["comm"] + plan["flags"] + plan["lamport"]
    )
    assert dev.calls == []
    ws = make_ws()
    assert ws.workspace_bytes == sum(
        size for kind, size, *_ in (c for c in dev.calls if c[0] == "alloc")
    )
    assert ws.workspace_bytes == comm.fusion_workspace_bytes(W, M, D, BF16)
    ws.destroy()


@pytest.mark.parametrize(
    "args,error,match",
    [
        ((W, M, D, torch.int8), TypeError, r"dtype \(torch.int8\)"),
        ((W, M, D, "bf16"), TypeError, "torch.dtype"),
        ((W, 0, D, BF16), ValueError, r"max_token_num \(0\)"),
        ((0, M, D, BF16), ValueError, r"world_size \(0\)"),
        ((W, M, 2.5, BF16), TypeError, "hidden_dim must be an int"),
    ],
)
def test_workspace_bytes_rejects_bad_arguments(dev, args, error, match):
    with pytest.raises(error, match=match):
        comm.fusion_workspace_bytes(*args)


def test_workspace_creation_layout_and_metadata(dev):
    state = random.getstate()
    backend = FakeBackend()
    ws = make_ws(comm_backend=backend, timeout_s=3.0)
    assert random.getstate() == state  # creation neither reads nor changes `random`
    assert ws.backend == "trtllm" and (ws.world_size, ws.rank) == (W, 0)
    assert isinstance(ws, comm.AllReduceFusionWorkspace)
    comm_ptrs, flags, lamport = ws.ipc_handles
    table = ws.workspace_tensor
    assert table.dtype == torch.int64 and table.numel() == 3 * W + 1
    assert table.tolist() == comm_ptrs + flags + lamport + [0xC0DE00]
    assert dev.controls[-1][0].table is table  # calls find the control block without a read
    plan = fake_plan(W, M, D, BF16)
    assert ws.metadata == {
        "tp_rank": 0,
        "tp_size": W,
        "max_token_num": M,
        "hidden_dim": D,
        "use_fp32_lamport": False,
        "buffer_size": plan["comm"],
        "flag_size": plan["flags"],
        "lamport_comm_size": plan["segment"],
        "lamport_buffer_size": plan["lamport"],
        "control_flag_ptr": 0xC0DE00,
    }
    assert ws.mem_handles == []
    assert ("zero", flags[0], plan["flags"]) in dev.calls
    # filled with fp32 sentinel words whatever the dtype (any reader takes them for empty)
    assert ("lamport", lamport[0], plan["lamport"] // 4, torch.float32) in dev.calls
    assert dev.controls[0][1:] == (plan["segment"], 3.0)
    assert backend.barriers == 1
    ws.destroy()
    ws.destroy()  # idempotent
    assert dev.live == [] and len(dev.freed) == 3 and dev.controls[0][0].closed


def test_legacy_fusion_workspace_return_forms(dev):
    make = comm.trtllm_create_ipc_workspace_for_all_reduce_fusion
    with pytest.warns(DeprecationWarning):
        handles, table = make(0, W, M, D, comm_backend=FakeBackend())
    assert len(handles) == 3 and all(len(h) == W for h in handles)
    assert table.numel() == 3 * W + 1
    with pytest.warns(DeprecationWarning):
        h3 = make(1, W, M, D, True, None, True, FakeBackend(rank=1))
    assert len(h3) == 3 and h3[2]["use_fp32_lamport"] and "control_flag_ptr" not in h3[2]
    assert h3[2]["tp_rank"] == 1
    with pytest.warns(DeprecationWarning):
        h4 = make(
            0, W, M, D, create_metadata=True, comm_backend=FakeBackend(), use_symm_dev_mem=True
        )
    assert len(h4) == 4 and h4[2] == [] and h4[3]["control_flag_ptr"] == 0xC0DE00
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="create_metadata"):
        make(0, W, M, D, comm_backend=FakeBackend(), use_symm_dev_mem=True)
    with pytest.raises(ValueError, match="not the ipc_handles list"):
        comm.trtllm_destroy_ipc_workspace_for_all_reduce_fusion(list(handles))  # a copy
    for h in (handles, h3[0], h4[0]):
        comm.trtllm_destroy_ipc_workspace_for_all_reduce_fusion(h)
    with pytest.raises(ValueError, match="already destroyed"):
        comm.trtllm_destroy_ipc_workspace_for_all_reduce_fusion(handles)
    assert dev.live == []


def test_legacy_custom_workspace_sizes(dev):
    with pytest.warns(DeprecationWarning):
        handles = comm.trtllm_create_ipc_workspace_for_all_reduce(
            0, 4, 16, 1000, comm_backend=FakeBackend(size=4)
        )
    sizes = [size for kind, size in (c for c in dev.calls if c[0] == "alloc")]
    lamport = 4 * 16 * 4 * 1000 * 2
    flags = (24 + 1) * 4 * 4 * 2  # barrier-in also holds the kernels' flags (fake: 4096 B)
    assert sizes == [4 * 16 * 1000 * 4] * 2 + [max(flags, 4 * 256 * 4), flags, 3 * lamport]
    assert ("lamport_all", lamport) in dev.calls and len(handles) == 7
    comm.trtllm_destroy_ipc_workspace_for_all_reduce(handles)
    assert dev.live == []


@pytest.mark.parametrize(
    "kw,error,match",
    [
        (
            {"backend": "mnnvl", "comm_backend": FakeBackend(hosts=["a", "b"])},
            NotImplementedError,
            "spans several nodes",
        ),
        ({"backend": "nccl"}, RuntimeError, "unknown backend 'nccl'"),
        ({"backend": 3}, TypeError, "backend must be a str"),
        ({"max_token_num": None}, ValueError, "max_token_num is required"),
        ({"dtype": None}, ValueError, "dtype is required"),
        ({"hidden_dim": -1}, ValueError, r"hidden_dim \(-1\)"),
        ({"dtype": torch.int32}, TypeError, "dtype"),
        ({"rank": 1}, ValueError, "rank 0 of 2, but the call says rank 1 of 2"),
        ({"world_size": 4}, ValueError, "says rank 0 of 4"),
        ({"timeout_s": 0}, ValueError, "timeout_s"),
        (
            {
                "backend": "auto",
                "gpus_per_node": None,
                "comm_backend": FakeBackend(hosts=["a", "b"]),
            },
            NotImplementedError,
            "spans several",
        ),
        ({"backend": "auto", "gpus_per_node": 1}, NotImplementedError, "spans several"),
    ],
)
def test_create_workspace_errors_before_allocation(dev, kw, error, match):
    kw = {
        "backend": "trtllm",
        "world_size": W,
        "rank": 0,
        "max_token_num": M,
        "hidden_dim": D,
        "dtype": BF16,
        "comm_backend": FakeBackend(),
        "gpus_per_node": 8,
        **kw,
    }
    with pytest.raises(error, match=match):
        comm.create_allreduce_fusion_workspace(**kw)
    assert dev.calls == []


@pytest.mark.parametrize("kw", [{"gpus_per_node": 8}, {"gpus_per_node": None}])
def test_auto_picks_the_lamport_backend_on_one_node(dev, kw):
    ws = comm.create_allreduce_fusion_workspace(
        "auto",
        world_size=W,
        rank=0,
        max_token_num=M,
        hidden_dim=D,
        dtype=BF16,
        comm_backend=FakeBackend(hosts=["node0", "node0"]),
        **kw,
    )
    assert isinstance(ws, comm.TRTLLMAllReduceFusionWorkspace) and ws.backend == "trtllm"
    ws.destroy()


@pytest.mark.parametrize(
    "fail_at,what",
    [("alloc2", "allocating shared buffer 1"), ("control", "initialising the buffers")],
)
def test_failed_creation_frees_everything(dev, fail_at, what):
    dev.fail_at = fail_at
    with pytest.raises(RuntimeError, match=what) as info:
        make_ws()
    assert "rank 0" in str(info.value) or fail_at == "alloc2"
    assert dev.live == [], "a failed creation left shared buffers allocated"
    assert not fw._LIVE or all(v[1].shared for v in fw._LIVE.values())


def test_dropped_workspace_warns_and_releases(dev):
    ws = make_ws()
    with pytest.warns(ResourceWarning, match="was not destroyed"):
        del ws
        gc.collect()
    assert dev.live == []


@pytest.mark.parametrize(
    "tp,n,d,dtype,oneshot,fits",
    [
        (W, M, D, BF16, None, True),
        (W, M * D // 128, 128, BF16, None, True),  # reshaped: capacity is by product
        (W, M * D // 128 + 1, 128, BF16, None, False),
        (W, M + 1, D, BF16, None, False),
        (W, M, D, torch.float16, True, True),
        (4, 1, D, BF16, None, False),  # another world size
        (W, 1, D, torch.float32, None, False),  # fp32-ness differs
    ],
)
def test_is_buffer_size_sufficient_is_exact(dev, tp, n, d, dtype, oneshot, fits):
    ws = make_ws()
    assert ws.is_buffer_size_sufficient(tp, n, d, dtype, use_oneshot=oneshot) is fits
    ws.destroy()


def test_oneshot_capacity_follows_the_lamport_segment(dev, monkeypatch):
    def capped(w, m, d, dtype):
        return dict(fake_plan(w, m, d, dtype), segment=1024, lamport=3072)

    monkeypatch.setattr(fusion_control, "workspace_bytes", capped)
    with pytest.warns(UserWarning, match="capped at 1024"):
        ws = make_ws()
    # one-shot puts W * N * D elements in one segment: 2 * 256 * 2 bytes fit, 2 * 257 * 2 not
    assert ws.is_buffer_size_sufficient(W, 257, 1, BF16, use_oneshot=True) is False
    assert ws.is_buffer_size_sufficient(W, 256, 1, BF16, use_oneshot=True)
    assert ws.is_buffer_size_sufficient(W, M, D, BF16, use_oneshot=False)
    ws.destroy()


@pytest.mark.parametrize(
    "cls", [comm.TRTLLMAllReduceFusionWorkspace, comm.MNNVLAllReduceFusionWorkspace]
)
def test_fusion_workspaces_refuse_checkpointing_clearly(cls):
    # Engines call these around a process suspend and skip on NotImplementedError only.
    ws = object.__new__(cls)  # no group needed: the refusal comes before any state is read
    with pytest.raises(NotImplementedError, match=f"{cls.__name__}.checkpoint_prepare"):
        ws.checkpoint_prepare()
    with pytest.raises(NotImplementedError, match=f"{cls.__name__}.checkpoint_restore"):
        ws.checkpoint_restore(None)
