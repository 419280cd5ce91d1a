"""The MNNVL all-reduce API on CPU: signatures and defaults, enums, sizing, the workspace's
attributes (mc_ptr non-zero, the pointer table filled from the rows), every ValueError before a
launch, and what each op hands the Lamport kernels (the device layer is faked)."""

import inspect
from pathlib import Path

import pytest
import torch

import fusedcomm as comm
from fusedcomm import mnnvl
from fusedcomm import trtllm_mnnvl_ar as ar
from fusedcomm.enums import AllReduceFusionPattern as P
from fusedcomm.ops import mnnvl_allreduce as mnnvl_ops
from fusedcomm.reference import compute_fp4_swizzled_layout_sf_size
from fusedcomm.runtime import lamport, peer_memory
from fusedcomm.runtime import mnnvl_workspace as mw
from fusion_fakes import BF16, FakeBackend, dev  # noqa: F401 - dev is a fixture

S, Q = ar.MNNVLAllreduceFusionStrategy, ar.MNNVLQuantType
F16, F32 = torch.float16, torch.float32
D = 256
ROW0 = 1 << 36


class FakeMemory:
    """PeerMemory's surface: rows at a fixed stride, nothing mapped."""

    made = []

    def __init__(self, size, backend, device=None):
        self.size_per_rank, self.device = size, device
        self.world, self.rank = backend.Get_size(), backend.Get_rank()
        self.row_stride = (size + 4095) // 4096 * 4096
        self.closed = False
        FakeMemory.made.append(self)

    def row_ptr(self, q):
        return ROW0 + q * self.row_stride

    def close(self):
        self.closed = True


@pytest.fixture
def mdev(dev, monkeypatch):  # noqa: F811
    FakeMemory.made = []
    monkeypatch.setattr(peer_memory, "PeerMemory", FakeMemory)
    monkeypatch.setattr(
        lamport,
        "trtllm_lamport_initialize",
        lambda ptr, n, dtype: dev.calls.append(("lamport", ptr, n, dtype)),
    )
    monkeypatch.setattr(mw, "_current_device", lambda: 0)
    monkeypatch.setattr(mw, "_tensor_device", lambda d: torch.device("cpu"))
    monkeypatch.setattr(mw, "_synchronize", lambda d: None)
    return dev


def mapping(world=2, rank=0):
    return comm.Mapping(world, rank, 8, tp_size=world)


def make(world=2, rank=0, tokens=64, hidden=D, dtype=BF16, **kw):
    backend = FakeBackend(rank=rank, size=world)
    return ar.MNNVLAllReduceFusionWorkspace(
        mapping(world, rank), tokens, hidden, dtype, comm_backend=backend, **kw
    )


# ------------------------------------------------------------------------------------------
# Signatures, enums, sizes


def _params(fn):
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]


E = inspect.Parameter.empty


def test_signatures_and_defaults():
    assert _params(ar.trtllm_mnnvl_allreduce) == [
        ("input", E), ("workspace", E), ("launch_with_pdl", E), ("output", None),
        ("strategy", S.AUTO),
    ]  # fmt: skip
    assert _params(ar.trtllm_mnnvl_fused_allreduce_add_rmsnorm) == [
        ("input", E), ("residual_in", E), ("gamma", E), ("workspace", E), ("epsilon", None),
        ("output", None), ("residual_out", None), ("launch_with_pdl", False),
        ("strategy", S.AUTO), ("weight_bias", 0.0),
    ]  # fmt: skip
    assert _params(ar.trtllm_mnnvl_fused_allreduce_add_rmsnorm_quant) == [
        ("input", E), ("residual_in", E), ("gamma", E), ("workspace", E), ("epsilon", None),
        ("output", None), ("residual_out", None), ("quant_out", None), ("scale_out", None),
        ("output_scale", None), ("layout_code", comm.QuantizationSFLayout.SWIZZLED_128x4),
        ("quant_type", Q.NONE), ("launch_with_pdl", False), ("strategy", S.AUTO),
        ("weight_bias", 0.0),
    ]  # fmt: skip
    assert [n for n, _ in _params(ar.trtllm_mnnvl_all_reduce)] == [
        "inp", "multicast_buffer_ptr", "buffer_ptrs_dev", "buffer_M", "buffer_flags_mnnvl",
        "nranks", "rank", "wait_for_results", "launch_with_pdl", "out",
    ]  # fmt: skip
    assert [n for n, _ in _params(ar.trtllm_mnnvl_fused_allreduce_rmsnorm)] == [
        "prenorm_output", "normed_output", "shard_input", "multicast_buffer_ptr",
        "buffer_ptrs_dev", "unicast_ptr", "buffer_M", "buffer_flags_mnnvl", "nranks", "rank",
        "gamma", "epsilon", "residual", "launch_with_pdl",
    ]  # fmt: skip
    assert _params(ar.get_allreduce_mnnvl_workspace)[2:] == [
        ("comm_backend_for_handle_transfer", None),
        ("buffer_size_in_bytes", None),
    ]
    assert [n for n, _ in _params(ar.MNNVLAllReduceFusionWorkspace.__init__)][:7] == [
        "self", "mapping", "max_num_tokens", "hidden_dim", "dtype", "buffer_size_in_bytes",
        "comm_backend",
    ]  # fmt: skip
    assert ar.mpi_barrier is comm.mpi_barrier


def test_enums_and_strategy_threshold():
    assert [(s.name, s.value) for s in S] == [("ONESHOT", 0), ("TWOSHOT", 1), ("AUTO", 99)]
    assert (Q.NONE, Q.FP8, Q.NVFP4, Q.DYNAMIC_FP8) == (0, 1, 2, 3)
    assert S.select_strategy(8, 64, 1024, BF16) == S.ONESHOT  # exactly 1 MiB
    assert S.select_strategy(8, 65, 1024, BF16) == S.TWOSHOT
    assert S.select_strategy(2, 64, 1024, F32) == S.ONESHOT


@pytest.mark.parametrize(
    "world,n,d,dtype", [(2, 15, 2880, BF16), (4, 27, 5120, F16), (8, 3, 8, F32)]
)
def test_required_buffer_sizes(world, n, d, dtype):
    elem = dtype.itemsize
    need = ar.MNNVLAllReduceFusionWorkspace.get_required_buffer_size_bytes
    assert need(world, n, d, dtype, S.ONESHOT) == n * d * world * elem
    assert need(world, n, d, dtype, S.TWOSHOT) == 2 * -(-n // world) * world * d * elem
    auto = S.select_strategy(world, n, d, dtype)
    assert need(world, n, d, dtype) == need(world, n, d, dtype, auto)


def test_default_sizing(mdev):
    ws = make(world=2, tokens=2048, hidden=16384)
    n1 = min(ar.MNNVL_ONE_SHOT_THRESHOLD // (2 * 2 * 16384), 2048)
    want = max(n1 * 16384 * 2 * 2, 2 * 1024 * 2 * 16384 * 2)
    assert ws.buffer_size_bytes == -(-want // 32) * 32
    assert ws.workspace_size_bytes == 3 * ws.buffer_size_bytes
    ws.destroy()
    small = make(world=2, tokens=1, hidden=8, dtype=F32)  # two-shot: 2 * 1 * 2 * 8 * 4
    assert small.buffer_size_bytes == 128
    small.destroy()


def test_sizing_errors(mdev):
    with pytest.raises(AssertionError, match="required"):
        ar.MNNVLAllReduceFusionWorkspace(mapping(), comm_backend=FakeBackend())
    with pytest.raises(ValueError, match="UINT32_MAX"):
        ar.MNNVLAllReduceFusionWorkspace(
            mapping(), buffer_size_in_bytes=2**32, comm_backend=FakeBackend()
        )
    with pytest.raises(ValueError, match=r"tp_size \(65\)"):
        ar.MNNVLAllReduceFusionWorkspace(
            comm.Mapping(65, 0, 65, tp_size=65), 1, D, BF16, comm_backend=FakeBackend(size=65)
        )
    with pytest.raises(ValueError, match=r"tp_size \(1\)"):
        ar.MNNVLAllReduceFusionWorkspace(comm.Mapping(1, 0, 1, tp_size=1), 1, D, BF16)
    with pytest.raises(NotImplementedError, match="exceeds the 8 ranks"):
        make(world=16)
    with pytest.raises(NotImplementedError, match="spans several nodes"):
        ar.MNNVLAllReduceFusionWorkspace(
            mapping(), 4, D, BF16, comm_backend=FakeBackend(hosts=["a", "b"])
        )
    with pytest.raises(ValueError, match="communicator has rank 0 of 2"):
        ar.MNNVLAllReduceFusionWorkspace(mapping(2, 1), 4, D, BF16, comm_backend=FakeBackend())
    assert FakeMemory.made == [] and mdev.calls == []


# ------------------------------------------------------------------------------------------
# The workspace


def test_workspace_attributes_and_table(mdev):
    ws = make(world=2, rank=0, tokens=64)
    b = ws.buffer_size_bytes
    (mem,) = FakeMemory.made
    assert mem.size_per_rank == 4 * b + 2 * 256 * 4  # Lamport x3, two-shot, flags
    assert ws.backend == "mnnvl" and (ws.tp_size, ws.rank, ws.world_size) == (2, 0, 2)
    rows = [ROW0, ROW0 + mem.row_stride]
    assert ws.ptrs == rows and ws.uc_ptr_local == rows[0] and ws.row_bytes == mem.row_stride
    assert ws.workspace_tensor.tolist() == (
        [r + 3 * b for r in rows] + [r + 4 * b for r in rows] + rows + [0xC0DE00]
    )
    assert ws._uc_ptrs.tolist() == rows and ws.uc_ptrs_dev == ws._uc_ptrs.data_ptr()
    assert ws.buffer_flags.dtype == torch.uint32
    assert ws.buffer_flags.tolist() == [0, 2, b, 0, 0, 0, 0, 0, 0]
    assert ("lamport", rows[0], 3 * b // 4, F32) in mdev.calls  # fp32 -0.0 everywhere
    (control, segment, _), = mdev.controls  # fmt: skip
    assert segment == b and control.table is ws.workspace_tensor
    ws.destroy()
    ws.destroy()  # idempotent
    assert mem.closed and control.closed and ws.destroyed


def test_mc_ptr_is_non_zero_and_vllm_keeps_the_workspace(mdev):
    ws = make()

    def vllm_usable(workspace):  # the check an engine makes before keeping a workspace
        return workspace is not None and workspace.mc_ptr != 0 and bool(workspace.mc_ptr)

    assert vllm_usable(ws) and ws.mc_ptr == ws.uc_ptr_local
    assert ws.is_buffer_size_sufficient(2, 64, D, BF16)
    ws.destroy()


def test_is_buffer_size_sufficient(mdev):
    ws = make(world=2, tokens=64, hidden=D)
    fits = ws.is_buffer_size_sufficient
    assert fits(2, 64, D, BF16, S.TWOSHOT) and fits(2, 64, D, BF16, S.ONESHOT)
    assert fits(2, 64, D, BF16, True) and fits(2, 64, D, BF16, None)
    assert not fits(2, 65, D, BF16, S.TWOSHOT) and not fits(4, 8, D, BF16)
    assert fits(2, 32, 2 * D, BF16)  # another shape, same bytes
    assert not fits(2, 64, D, F32)
    ws.destroy()


# ------------------------------------------------------------------------------------------
# The ops: what reaches the kernels, and every error before a launch


def _x(n=8, dtype=BF16, d=D):
    return torch.randn(n, d).to(dtype)


def test_allreduce_launch(mdev):
    ws = make()
    x = _x()
    out = ar.trtllm_mnnvl_allreduce(x, ws, True)
    (call,) = mdev.launches
    assert call.pattern == P.kAllReduce and call.allreduce_out is out and call.fp32_acc
    assert call.use_oneshot is True and call.launch_with_pdl  # 8 * 256 * 2 * 2 <= 1 MiB
    ar.trtllm_mnnvl_allreduce(x, ws, False, strategy=S.TWOSHOT)
    assert mdev.launches[-1].use_oneshot is False
    with pytest.raises(ValueError, match="must be 2D"):
        ar.trtllm_mnnvl_allreduce(x.reshape(-1), ws, False)
    with pytest.raises(ValueError, match="output tensor .*must be 2D"):
        ar.trtllm_mnnvl_allreduce(x, ws, False, output=torch.empty(8 * D, dtype=BF16))
    with pytest.raises(ValueError, match=r"insufficient.*Buffer: \d+ bytes, Required: \d+"):
        ar.trtllm_mnnvl_allreduce(_x(65), ws, False, strategy=S.TWOSHOT)
    with pytest.raises(TypeError, match="MNNVLAllReduceFusionWorkspace"):
        ar.trtllm_mnnvl_allreduce(x, object(), False)
    with pytest.raises(ValueError, match="multiple of 8"):
        ar.trtllm_mnnvl_allreduce(_x(2, d=100), ws, False)
    assert len(mdev.launches) == 2
    ws.destroy()
    with pytest.raises(ValueError, match="destroyed"):
        ar.trtllm_mnnvl_allreduce(x, ws, False)


def test_add_rmsnorm_launch_and_epsilon(mdev):
    ws = make()
    x, r, g = _x(), _x(), torch.randn(D).to(BF16)
    out, res = ar.trtllm_mnnvl_fused_allreduce_add_rmsnorm(x, r, g, ws, weight_bias=1.0)
    (call,) = mdev.launches
    assert call.pattern == P.kARResidualRMSNorm and call.norm_out is out
    assert call.residual_out is res and call.rms_eps == torch.finfo(BF16).eps == 2.0**-7
    assert call.weight_bias == 1.0 and call.fp32_acc
    ar.trtllm_mnnvl_fused_allreduce_add_rmsnorm(x, r, g, ws, 1e-5)
    assert mdev.launches[-1].rms_eps == 1e-5
    with pytest.raises(ValueError, match="gamma tensor must have the same number"):
        ar.trtllm_mnnvl_fused_allreduce_add_rmsnorm(x, r, g[:-8], ws)
    with pytest.raises(ValueError, match="residual input tensor .*must be 2D"):
        ar.trtllm_mnnvl_fused_allreduce_add_rmsnorm(x, r.reshape(-1), g, ws)
    ws.destroy()


def test_quant_launches(mdev):
    ws = make()
    x, r, g = _x(), _x(), torch.randn(D).to(BF16)
    q, s, res, out = ar.trtllm_mnnvl_fused_allreduce_add_rmsnorm_quant(
        x, r, g, ws, quant_type=Q.FP8, output_scale=0.5
    )
    call = mdev.launches[-1]
    assert call.pattern == P.kARResidualRMSNormFP8Quant and s is None and out is None
    assert q.dtype == torch.float8_e4m3fn and call.scale_factor.item() == 0.5
    norm = torch.empty_like(x)
    ar.trtllm_mnnvl_fused_allreduce_add_rmsnorm_quant(x, r, g, ws, output=norm, quant_type=Q.FP8)
    assert mdev.launches[-1].pattern == P.kARResidualRMSNormOutFP8Quant
    assert mdev.launches[-1].scale_factor.item() == 1.0  # None: 1.0
    q, s, _, _ = ar.trtllm_mnnvl_fused_allreduce_add_rmsnorm_quant(
        x, r, g, ws, quant_type=Q.DYNAMIC_FP8
    )
    assert mdev.launches[-1].pattern == P.kARResidualRMSNormDynamicFP8Quant
    assert s.shape == (8, 1) and s.dtype == F32
    q, s, _, _ = ar.trtllm_mnnvl_fused_allreduce_add_rmsnorm_quant(
        x, r, g, ws, quant_type=Q.NVFP4, output_scale=torch.tensor([448.0 * 6])
    )
    call = mdev.launches[-1]
    assert call.pattern == P.kARResidualRMSNormFP4Quant and q.shape == (8, D // 2)
    assert s.numel() == compute_fp4_swizzled_layout_sf_size(8, D // 16)
    assert call.layout_code == 0 and call.scale_factor.item() == 448.0 * 6
    _, s, _, _ = ar.trtllm_mnnvl_fused_allreduce_add_rmsnorm_quant(
        x, r, g, ws, quant_type=Q.NVFP4, layout_code=comm.QuantizationSFLayout.LINEAR
    )
    assert s.shape == (8, D // 16) and mdev.launches[-1].layout_code == 2
    ws.destroy()


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"quant_type": Q.NONE}, "Unsupported MNNVL quant_type"),
        ({"quant_type": Q.NVFP4, "layout_code": 1}, "not SWIZZLED_8x4"),
        ({"quant_type": Q.FP8, "residual_out": torch.empty(4, D)}, "residual_out shape"),
        ({"quant_type": Q.FP8, "quant_out": torch.empty(8, D)}, "float8_e4m3fn"),
        ({"quant_type": Q.DYNAMIC_FP8, "scale_out": torch.empty(8)}, r"scale_out shape"),
        (
            {"quant_type": Q.NVFP4, "scale_out": torch.empty(8 * D // 16, dtype=torch.uint8)},
            "scale_out is too small for NVFP4",
        ),
        (
            {
                "quant_type": Q.NVFP4,
                "layout_code": 2,
                "scale_out": torch.empty(8 * D // 16 - 1, dtype=torch.float8_e4m3fn),
            },
            "scale_out is too small for NVFP4",
        ),
        ({"quant_type": Q.NVFP4, "quant_out": torch.empty(8, D)}, r"quant_out shape"),
    ],
)
def test_quant_errors_before_launch(mdev, kw, match):
    ws = make()
    x, r, g = _x(), _x(), torch.randn(D).to(BF16)
    with pytest.raises(ValueError, match=match):
        ar.trtllm_mnnvl_fused_allreduce_add_rmsnorm_quant(x, r, g, ws, **kw)
    assert mdev.launches == []
    ws.destroy()


def test_nvfp4_rejects_fp32(mdev):
    ws = make(dtype=F32)
    x, r, g = _x(dtype=F32), _x(dtype=F32), torch.randn(D)
    with pytest.raises(ValueError, match="NVFP4 quantization requires fp16 or bf16"):
        ar.trtllm_mnnvl_fused_allreduce_add_rmsnorm_quant(x, r, g, ws, quant_type=Q.NVFP4)
    with pytest.raises(ValueError, match="NVFP4"):
        comm.allreduce_fusion(
            x, ws, P.kARResidualRMSNormFP4Quant, residual_in=r, rms_gamma=g, scale_factor=1.0
        )
    assert mdev.launches == []
    ws.destroy()


# ------------------------------------------------------------------------------------------
# The unified API and the deprecated pointer entry points


def test_unified_create_and_dispatch(mdev):
    ws = comm.create_allreduce_fusion_workspace(
        "mnnvl", world_size=2, rank=0, max_token_num=64, hidden_dim=D, dtype=BF16,
        comm_backend=FakeBackend(), gpus_per_node=2,
    )  # fmt: skip
    assert isinstance(ws, comm.MNNVLAllReduceFusionWorkspace) and ws.backend == "mnnvl"
    x, r, g = _x(), _x(), torch.randn(D).to(BF16)
    out = comm.allreduce_fusion(x, ws, P.kAllReduce, use_oneshot=False)
    assert mdev.launches[-1].allreduce_out is out and mdev.launches[-1].use_oneshot is False
    norm = comm.allreduce_fusion(x, ws, P.kARResidualRMSNorm, residual_in=r, rms_gamma=g)
    assert mdev.launches[-1].norm_out is norm and mdev.launches[-1].rms_eps == 1e-6
    q = torch.empty(8, D, dtype=torch.float8_e4m3fn)
    ret = comm.allreduce_fusion(
        x, ws, P.kARResidualRMSNormOutFP8Quant, residual_in=r, rms_gamma=g, quant_out=q,
        scale_factor=2.0,
    )  # fmt: skip
    assert ret is q and mdev.launches[-1].norm_out is not None
    for pattern in (6, 7, 8, 9, 12):
        with pytest.raises(ValueError, match=f"does not support pattern {pattern}"):
            comm.allreduce_fusion(x, ws, pattern, residual_in=r, rms_gamma=g)
    with pytest.raises(ValueError, match="requires residual_in"):
        comm.allreduce_fusion(x, ws, P.kARResidualRMSNorm, rms_gamma=g)
    with pytest.raises(ValueError, match="quant_out is required"):
        comm.allreduce_fusion(x, ws, 10, residual_in=r, rms_gamma=g, residual_out=r.clone())
    with pytest.raises(ValueError, match="not SWIZZLED_8x4"):
        comm.allreduce_fusion(x, ws, 3, residual_in=r, rms_gamma=g, layout_code=1)
    ws.destroy()
    forced = comm.create_allreduce_fusion_workspace(
        "mnnvl", world_size=2, rank=0, max_token_num=4096, hidden_dim=D, dtype=BF16,
        comm_backend=FakeBackend(), force_oneshot_support=True,
    )  # fmt: skip
    assert forced.is_buffer_size_sufficient(2, 4096, D, BF16, S.ONESHOT)
    forced.destroy()


def test_deprecated_pointer_entry_points(mdev):
    mnnvl_ops._warned.clear()  # each entry point warns once per process
    with pytest.warns(DeprecationWarning):
        ws, flags, max_elems = ar.get_allreduce_mnnvl_workspace(
            mapping(), BF16, FakeBackend(), 3 * 2 * 2 * D * 16
        )
    stride = 3 * 2 * 2
    assert ws.buffer_size_bytes % (286720 * stride) == 0 and flags is ws.buffer_flags
    assert max_elems == ws.buffer_size_bytes // stride
    buffer_m = max_elems // D
    x, out = _x(), torch.empty(8, D, dtype=BF16)
    with pytest.warns(DeprecationWarning):
        ar.trtllm_mnnvl_all_reduce(
            x, ws.mc_ptr, ws.uc_ptrs_dev, buffer_m, flags, 2, 0, True, False, out
        )
    call = mdev.launches[-1]
    assert call.allreduce_out is out and call.use_oneshot is False  # two-shot, always
    with pytest.raises(ValueError, match="greater than the buffer_M"):
        ar.trtllm_mnnvl_all_reduce(_x(9), ws.mc_ptr, ws.uc_ptrs_dev, 8, flags, 2, 0, True, 0, out)
    with pytest.raises(ValueError, match="wait_for_results"):
        ar.trtllm_mnnvl_all_reduce(x, ws.mc_ptr, ws.uc_ptrs_dev, buffer_m, flags, 2, 0, 0, 0)
    pre, normed, g = torch.empty_like(x), torch.empty_like(x), torch.randn(D).to(BF16)
    with pytest.warns(DeprecationWarning):
        ar.trtllm_mnnvl_fused_allreduce_rmsnorm(
            pre, normed, x, ws.mc_ptr, ws.uc_ptrs_dev, ws.uc_ptr_local, buffer_m, flags, 2, 0,
            g, 1e-5, _x(), True,
        )  # fmt: skip
    call = mdev.launches[-1]
    assert call.norm_out is normed and call.residual_out is pre and call.use_oneshot is False
    ws.destroy()
    with pytest.raises(ValueError, match="live"):
        ar.trtllm_mnnvl_all_reduce(x, 1, ws.uc_ptrs_dev, buffer_m, flags, 2, 0, True, 0, out)


def test_mnnvl_helpers():
    with pytest.raises(NotImplementedError, match="no NVLink multicast|uses no NVLink"):
        mnnvl.McastGPUBuffer(1 << 20, 2, 0, torch.device("cuda", 0), False, None)
    assert mnnvl.all_ranks_agree(FakeBackend(), True)
    assert not mnnvl.all_ranks_agree(FakeBackend(), False)
    assert mnnvl.all_ranks_support_mnnvl(True, 2, FakeBackend())
    assert not mnnvl.all_ranks_support_mnnvl(True, 4, FakeBackend())
    if not torch.cuda.is_available():
        assert mnnvl.is_multicast_supported(0) is False
        assert mnnvl.is_mnnvl_fabric_supported(0) is False
    for name in ("initialize", "set_comm_from_config", "get_comm", "supports_mnnvl"):
        assert callable(getattr(mnnvl.MnnvlMemory, name))
    assert callable(mnnvl.MnnvlMemory.as_torch_strided_tensor)


def test_no_native_code_uses_multicast():
    root = Path(__file__).resolve().parents[1]
    words = ("cuMulticast", "multimem.", "CUmulticastObjectProp", "MulticastCreate")
    hits = [
        f"{path.relative_to(root)}: {w}"
        for folder in ("csrc", "include")
        for path in (root / folder).rglob("*")
        if path.is_file() and path.suffix in (".cu", ".cuh", ".h", ".cpp")
        for w in words
        if w in path.read_text(errors="replace")
    ]
    assert hits == []
