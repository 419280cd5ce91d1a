"""The MNNVL all-reduce on GPUs: every op against fusedcomm.reference in fp32, outputs poisoned
first, every rank holding the same bits; one workspace reused across the sequence-length lists
of the reference suite ([1], [4], [15], [27, 11, 24, 256], [127], [998, 2048]) and its hidden
sizes (each list paired with one of 2880, 5120, 7168, 8192, 16384 to stay short); CUDA graph
capture and replay; inputs salted with Lamport-sentinel look-alikes (-0.0, 16-bit patterns that
read as fp32 negative subnormals) that must neither hang nor corrupt; a missing peer that must
raise within the timeout; the quantisers, the unified API and the deprecated pointer entry
points. Runs with two ranks sharing one GPU (no timing asserts)."""

import time

import pytest
import torch
import torch.distributed as dist

import fusedcomm as comm
from fusedcomm import trtllm_mnnvl_ar as ar
from fusedcomm.enums import AllReduceFusionPattern as P
from fusedcomm.enums import QuantizationSFLayout as L
from fusedcomm.reference import quant as rq
from fusedcomm.reference.fusion import (
    fusion_all_reduce,
    quantize_fp8_dynamic,
    quantize_fp8_static,
    residual_rms_norm,
)
from fusedcomm.testing.checks import Failures, assert_no_failures
from fusedcomm.testing.dist import barrier, gather_all, run_ranks, same_on_every_rank

S, Q = ar.MNNVLAllreduceFusionStrategy, ar.MNNVLQuantType
BF16, F16 = torch.bfloat16, torch.float16
SF_POISON = 0xAB
TOL = {F16: 2.0**-9, BF16: 2.0**-7}


def _workspace(rank, world, max_tokens, hidden, dtype, **kw):
    backend = comm.TorchDistBackend(dist.new_group(list(range(world)), backend="gloo"))
    mapping = comm.Mapping(world, rank, world, tp_size=world)
    ws = ar.MNNVLAllReduceFusionWorkspace(
        mapping, max_tokens, hidden, dtype, comm_backend=backend, **kw
    )
    assert ws.backend == "mnnvl" and ws.mc_ptr != 0 and (ws.rank, ws.tp_size) == (rank, world)
    return ws


def _close(ws):
    torch.cuda.synchronize()
    barrier()
    ws.destroy()
    ws.destroy()


def _poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device="cuda")


def _gathered(t):
    return [p.cpu() for p in gather_all(t)]


def _check_sum(f, what, out, xs):
    f.check(torch.equal(out.cpu(), fusion_all_reduce(xs, fp32_acc=True)), f"{what}: sum")
    f.check(same_on_every_rank(out), f"{what}: ranks disagree on the sum")


def _check_norm(f, what, norm, res, xs, residual, gamma, eps, bias=0.0):
    """residual_out exactly, norm_out within an ULP of T; returns the reference norm."""
    s = fusion_all_reduce(xs, fp32_acc=True)
    want_res, want_norm = residual_rms_norm(s, residual.cpu(), gamma.cpu(), eps, bias)
    f.check(torch.equal(res.cpu(), want_res), f"{what}: residual_out")
    if norm is not None:
        ok = torch.allclose(norm.cpu().float(), want_norm.float(), rtol=TOL[norm.dtype], atol=1e-5)
        f.check(ok, f"{what}: norm_out")
        f.check(same_on_every_rank(norm), f"{what}: ranks disagree on norm_out")
    f.check(same_on_every_rank(res), f"{what}: ranks disagree on residual_out")
    return want_norm


def _check_codes(f, what, got, want):
    """FP8 codes from the kernel's own norm_out: at most 0.1 % differ (rounding ties of the
    scaled value), each by at most one E4M3 step."""
    g, w = got.float().cpu(), want.float().cpu()
    frac = (g != w).float().mean().item()
    f.check(frac <= 0.001, f"{what}: {frac:.4f} of the codes differ")
    f.check(torch.allclose(g, w, rtol=0.126, atol=2.0**-8), f"{what}: codes beyond one step")
    f.check(same_on_every_rank(got.view(torch.uint8)), f"{what}: ranks disagree on the codes")


def _strategies(ws, n, d, dtype):
    return [S.AUTO] + [
        s
        for s in (S.ONESHOT, S.TWOSHOT)
        if ws.is_buffer_size_sufficient(ws.tp_size, n, d, dtype, s)
    ]


# ------------------------------------------------------------------------------------------
# One workspace, a list of sequence lengths, every strategy that fits


def _rank_sequences(rank, world, seq_lens, hidden, dtype):
    f = Failures()
    ws = _workspace(rank, world, max(seq_lens), hidden, dtype)
    gen = torch.Generator(device="cuda").manual_seed(10 + rank)
    shared = torch.Generator(device="cuda").manual_seed(99)
    gamma = (1 + 0.1 * torch.randn(hidden, generator=shared, device="cuda")).to(dtype)
    eps = torch.finfo(dtype).eps
    for n in seq_lens:
        f.check(ws.is_buffer_size_sufficient(world, n, hidden, dtype), f"n={n} does not fit")
        for s in _strategies(ws, n, hidden, dtype):
            what = f"n={n} d={hidden} {dtype} {s.name}"
            x = torch.randn(n, hidden, generator=gen, device="cuda").to(dtype)
            out = _poisoned((n, hidden), dtype)
            f.check(ar.trtllm_mnnvl_allreduce(x, ws, True, out, s) is out, f"{what}: return")
            xs = _gathered(x)
            _check_sum(f, what, out, xs)
            residual = torch.randn(n, hidden, generator=shared, device="cuda").to(dtype)
            norm, res = _poisoned((n, hidden), dtype), _poisoned((n, hidden), dtype)
            got = ar.trtllm_mnnvl_fused_allreduce_add_rmsnorm(
                x, residual, gamma, ws, None, norm, res, False, s
            )
            f.check(got[0] is norm and got[1] is res, f"{what}: returns")
            _check_norm(f, f"{what} rmsnorm", norm, res, xs, residual, gamma, eps)
    _close(ws)
    return f.messages


CASES = [
    ([1], 2880, BF16),
    ([4], 5120, F16),
    ([15], 7168, BF16),
    ([27, 11, 24, 256], 8192, F16),
    ([127], 16384, BF16),
    ([998, 2048], 2880, BF16),
]


@pytest.mark.gpu(2)
@pytest.mark.parametrize("seq_lens,hidden,dtype", CASES, ids=lambda v: str(v).replace(" ", ""))
def test_sequence_lists_reuse_one_workspace(world_size, seq_lens, hidden, dtype):
    results = run_ranks(
        _rank_sequences, world_size, backend="nccl", timeout_s=300, args=(seq_lens, hidden, dtype)
    )
    assert_no_failures(results)


# ------------------------------------------------------------------------------------------
# Quantisers, the unified API


def _rank_quant(rank, world):
    f = Failures()
    dtype, d = BF16, 2880
    ws = comm.create_allreduce_fusion_workspace(
        "mnnvl", world_size=world, rank=rank, max_token_num=300, hidden_dim=d, dtype=dtype,
        comm_backend=comm.TorchDistBackend(dist.new_group(list(range(world)), backend="gloo")),
    )  # fmt: skip
    f.check(isinstance(ws, comm.MNNVLAllReduceFusionWorkspace), "the workspace type")
    gen = torch.Generator(device="cuda").manual_seed(20 + rank)
    shared = torch.Generator(device="cuda").manual_seed(77)
    gamma = (1 + 0.1 * torch.randn(d, generator=shared, device="cuda")).to(dtype)
    for case, n in enumerate((1, 37, 300)):
        s = (S.AUTO, S.ONESHOT, S.TWOSHOT)[case]
        if not ws.is_buffer_size_sufficient(world, n, d, dtype, s):
            s = S.TWOSHOT
        x = torch.randn(n, d, generator=gen, device="cuda").to(dtype)
        residual = torch.randn(n, d, generator=shared, device="cuda").to(dtype)
        xs, eps = _gathered(x), 1e-5
        what = f"n={n} {s.name}"
        # static FP8, with the norm (pattern 4) and without (2): the same codes
        norm, res = _poisoned((n, d), dtype), _poisoned((n, d), dtype)
        q4, sf, _, out = ar.trtllm_mnnvl_fused_allreduce_add_rmsnorm_quant(
            x, residual, gamma, ws, eps, norm, res, output_scale=0.5, quant_type=Q.FP8,
            strategy=s,
        )  # fmt: skip
        f.check(sf is None and out is norm, f"{what} fp8: returns")
        _check_norm(f, f"{what} fp8", norm, res, xs, residual, gamma, eps)
        want = quantize_fp8_static(norm, 0.5)
        _check_codes(f, f"{what} fp8", q4, want)
        q2, _, _, _ = ar.trtllm_mnnvl_fused_allreduce_add_rmsnorm_quant(
            x, residual, gamma, ws, eps, output_scale=0.5, quant_type=Q.FP8, strategy=s
        )
        f.check(torch.equal(q2.view(torch.uint8), q4.view(torch.uint8)), f"{what}: fp8 twin")
        # dynamic FP8 with the norm: the scales from the kernel's own norm, exactly
        norm = _poisoned((n, d), dtype)
        q, sc, _, _ = ar.trtllm_mnnvl_fused_allreduce_add_rmsnorm_quant(
            x, residual, gamma, ws, eps, norm, quant_type=Q.DYNAMIC_FP8, strategy=s
        )
        wq, wsc = quantize_fp8_dynamic(norm.cpu())  # on the CPU: exact quotients
        f.check(torch.equal(sc.cpu(), wsc), f"{what} dynamic: scales")
        _check_codes(f, f"{what} dynamic", q, wq)
        f.check(same_on_every_rank(q) and same_on_every_rank(sc), f"{what} dynamic: ranks")
        # NVFP4 in both layouts: codes and the whole (poisoned) scale buffer
        scale = torch.full((1,), 448.0 * 6 / 5, device="cuda")
        for layout in (L.SWIZZLED_128x4, L.LINEAR):
            size = rq.scale_factor_buffer_size(n, d // 16, layout)
            sf = torch.full((size,), SF_POISON, dtype=torch.uint8, device="cuda")
            norm = _poisoned((n, d), dtype)
            q, _, _, _ = ar.trtllm_mnnvl_fused_allreduce_add_rmsnorm_quant(
                x, residual, gamma, ws, eps, norm, None, None, sf.view(torch.float8_e4m3fn),
                scale, layout, Q.NVFP4, strategy=s,
            )  # fmt: skip
            packed, blocks = rq.quantize_nvfp4(norm.cpu(), scale.cpu())
            f.check(torch.equal(q.cpu(), packed), f"{what} nvfp4 {layout}: codes")
            buffer = rq.write_scale_factors(blocks, layout, poison=SF_POISON)
            f.check(torch.equal(sf.cpu(), buffer), f"{what} nvfp4 {layout}: scale buffer")
            f.check(same_on_every_rank(q) and same_on_every_rank(sf), f"{what} nvfp4: ranks")
        # the unified API on the same workspace: pattern 0 and 1 against the direct ops
        use = {S.AUTO: None, S.ONESHOT: True, S.TWOSHOT: False}[s]
        out = comm.allreduce_fusion(x, ws, P.kAllReduce, use_oneshot=use)
        _check_sum(f, f"{what} unified 0", out, xs)
        norm, res = _poisoned((n, d), dtype), _poisoned((n, d), dtype)
        ret = comm.allreduce_fusion(
            x, ws, P.kARResidualRMSNorm, residual_out=res, norm_out=norm, residual_in=residual,
            rms_gamma=gamma, rms_eps=eps, use_oneshot=use, launch_with_pdl=True,
        )  # fmt: skip
        f.check(ret is norm, f"{what} unified 1: returns norm_out")
        _check_norm(f, f"{what} unified 1", norm, res, xs, residual, gamma, eps)
        q = torch.empty(n, d, dtype=torch.float8_e4m3fn, device="cuda")
        sc, res = _poisoned((n, 1), torch.float32), _poisoned((n, d), dtype)
        ret = comm.allreduce_fusion(
            x, ws, P.kARResidualRMSNormDynamicFP8Quant, residual_in=residual, rms_gamma=gamma,
            rms_eps=eps, residual_out=res, quant_out=q, scale_out=sc, use_oneshot=use,
        )  # fmt: skip
        f.check(ret is q, f"{what} unified 10: returns quant_out")
        _check_norm(f, f"{what} unified 10", None, res, xs, residual, gamma, eps)
    # errors before any launch on a live workspace
    x = torch.randn(8, d, device="cuda").to(dtype)
    with pytest.raises(ValueError, match="scale_out is too small for NVFP4"):
        ar.trtllm_mnnvl_fused_allreduce_add_rmsnorm_quant(
            x, x, gamma, ws, scale_out=torch.empty(8, dtype=torch.float8_e4m3fn, device="cuda"),
            quant_type=Q.NVFP4,
        )  # fmt: skip
    with pytest.raises(ValueError, match="does not support pattern 8"):
        comm.allreduce_fusion(x, ws, 8, residual_in=x, rms_gamma=gamma)
    _close(ws)
    ws32 = _workspace(rank, world, 4, 2048, torch.float32)
    x = torch.randn(4, 2048, device="cuda")
    with pytest.raises(ValueError, match="NVFP4"):
        comm.allreduce_fusion(
            x, ws32, P.kARResidualRMSNormFP4Quant, residual_in=x, rms_gamma=x[0].clone(),
            scale_factor=torch.ones(1, device="cuda"),
        )  # fmt: skip
    _close(ws32)
    return f.messages


@pytest.mark.gpu(2)
def test_quantisers_and_the_unified_api(world_size):
    assert_no_failures(run_ranks(_rank_quant, world_size, backend="nccl", timeout_s=300))


# ------------------------------------------------------------------------------------------
# CUDA graphs


def _rank_graph(rank, world):
    f = Failures()
    dtype, n, d = BF16, 96, 4096
    ws = _workspace(rank, world, 256, d, dtype)
    gen = torch.Generator(device="cuda").manual_seed(30 + rank)
    shared = torch.Generator(device="cuda").manual_seed(31)
    gamma = (1 + 0.1 * torch.randn(d, generator=shared, device="cuda")).to(dtype)
    x = torch.zeros(n, d, dtype=dtype, device="cuda")
    residual = torch.zeros_like(x)
    outs = {k: torch.empty_like(x) for k in ("one", "two", "norm", "res")}

    def step():
        ar.trtllm_mnnvl_allreduce(x, ws, True, outs["one"], S.ONESHOT)
        ar.trtllm_mnnvl_allreduce(x, ws, True, outs["two"], S.TWOSHOT)
        ar.trtllm_mnnvl_fused_allreduce_add_rmsnorm(
            x, residual, gamma, ws, 1e-6, outs["norm"], outs["res"], True, S.AUTO
        )

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # builds the kernels, outside the capture
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    barrier()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for replay in range(4):
        x.copy_(torch.randn(n, d, generator=gen, device="cuda").to(dtype))
        residual.copy_(torch.randn(n, d, generator=shared, device="cuda").to(dtype))
        for t in outs.values():
            t.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        xs = _gathered(x)
        _check_sum(f, f"replay {replay} one-shot", outs["one"], xs)
        _check_sum(f, f"replay {replay} two-shot", outs["two"], xs)
        _check_norm(f, f"replay {replay}", outs["norm"], outs["res"], xs, residual, gamma, 1e-6)
    del graph
    _close(ws)
    return f.messages


@pytest.mark.gpu(2)
def test_cuda_graph_capture_and_replay(world_size):
    assert_no_failures(run_ranks(_rank_graph, world_size, backend="nccl", timeout_s=300))


# ------------------------------------------------------------------------------------------
# Sentinel look-alikes


def _i16(u):
    return u - 0x10000 if u >= 0x8000 else u


# (0x0000, 0x8001 + i) pairs: a 32-bit load reads 0x8001xxxx, an fp32 negative subnormal;
# then -0.0 (0x8000); then positive subnormals (0x0001 + i)
SALT = torch.tensor(
    [v for i in range(128) for v in (0, _i16(0x8001 + i % 0x7F))]
    + [_i16(0x8000)] * 256
    + [0x0001 + i % 0x7F for i in range(256)],
    dtype=torch.int16,
)


def _salt(x):
    """``x`` (16-bit) with the start of every row overwritten by SALT, row 0 -0.0 throughout
    and row 1 the negative subnormal 0x8001 throughout."""
    bits = x.view(torch.int16)
    cols = min(SALT.numel(), bits.shape[1])
    bits[:, :cols] = SALT[:cols].to(bits.device)
    bits[0] = _i16(0x8000)
    if bits.shape[0] > 1:
        bits[1] = _i16(0x8001)
    return x


def _rank_sentinel(rank, world, seq_lens, hidden, dtype):
    f = Failures()
    ws = _workspace(rank, world, max(seq_lens), hidden, dtype, timeout_s=30.0)
    gen = torch.Generator(device="cuda").manual_seed(40 + rank)
    shared = torch.Generator(device="cuda").manual_seed(41)
    gamma = (1 + 0.1 * torch.randn(hidden, generator=shared, device="cuda")).to(dtype)
    for n in seq_lens:
        for s in _strategies(ws, n, hidden, dtype):
            what = f"salted n={n} d={hidden} {dtype} {s.name}"
            x = _salt(torch.randn(n, hidden, generator=gen, device="cuda").to(dtype))
            out = _poisoned((n, hidden), dtype)
            start = time.monotonic()
            ar.trtllm_mnnvl_allreduce(x, ws, False, out, s)
            torch.cuda.synchronize()
            comm.check_errors()
            f.check(time.monotonic() - start < 30, f"{what}: took the whole timeout")
            xs = _gathered(x)
            _check_sum(f, what, out, xs)
            f.check(not torch.signbit(out[0].float()).any().item(), f"{what}: -0.0 in the sum")
            residual = _salt(torch.randn(n, hidden, generator=shared, device="cuda").to(dtype))
            norm, res = _poisoned((n, hidden), dtype), _poisoned((n, hidden), dtype)
            ar.trtllm_mnnvl_fused_allreduce_add_rmsnorm(
                x, residual, gamma, ws, None, norm, res, False, s
            )
            torch.cuda.synchronize()
            comm.check_errors()
            _check_norm(f, f"{what} rmsnorm", None, res, xs, residual, gamma, 0.0)
    _close(ws)
    return f.messages


@pytest.mark.gpu(2)
@pytest.mark.parametrize(
    "seq_lens,hidden,dtype", [([4], 2880, BF16), ([16, 64], 8192, F16), ([16, 64], 2880, BF16)]
)
def test_sentinel_look_alikes_neither_hang_nor_corrupt(world_size, seq_lens, hidden, dtype):
    results = run_ranks(
        _rank_sentinel, world_size, backend="nccl", timeout_s=300, args=(seq_lens, hidden, dtype)
    )
    assert_no_failures(results)


# ------------------------------------------------------------------------------------------
# A missing peer; the deprecated pointer entry points


def _rank_missing_peer(rank, world):
    ws = _workspace(rank, world, 64, 4096, BF16, timeout_s=2.0)
    x = torch.randn(8, 4096, device="cuda").to(BF16)
    if rank == 0:
        start = time.monotonic()
        with pytest.raises(comm.PeerTimeoutError) as info:
            ar.trtllm_mnnvl_allreduce(x, ws, False, strategy=S.ONESHOT)  # nobody joins
            torch.cuda.synchronize()
            comm.check_errors()
            ar.trtllm_mnnvl_allreduce(x, ws, False, strategy=S.ONESHOT)
            torch.cuda.synchronize()
            comm.check_errors()
        elapsed = time.monotonic() - start
        assert elapsed < 2.0 + 15, f"the timeout took {elapsed:.1f} s"
        assert info.value.rank == 0 and info.value.peer != 0
        with pytest.raises(comm.CommFailureError):  # refused from now on
            ar.trtllm_mnnvl_allreduce(x, ws, False, strategy=S.TWOSHOT)
        assert torch.ones(4, device="cuda").sum().item() == 4.0  # the context still works
    barrier()
    ws.destroy()


@pytest.mark.gpu(2)
def test_missing_peer_raises_within_the_timeout(world_size):
    run_ranks(_rank_missing_peer, world_size, backend="nccl", timeout_s=180)


def _rank_legacy(rank, world):
    f = Failures()
    dtype, d, seq_lens = BF16, 4096, (27, 11, 24)
    backend = comm.TorchDistBackend(dist.new_group(list(range(world)), backend="gloo"))
    mapping = comm.Mapping(world, rank, world, tp_size=world)
    with pytest.warns(DeprecationWarning):
        ws, flags, max_elems = ar.get_allreduce_mnnvl_workspace(
            mapping, dtype, backend, 3 * 2 * dtype.itemsize * d * max(seq_lens)
        )
    buffer_m = max_elems // d
    gen = torch.Generator(device="cuda").manual_seed(50 + rank)
    shared = torch.Generator(device="cuda").manual_seed(51)
    gamma = torch.randn(d, generator=shared, device="cuda").to(dtype)
    for n in seq_lens:
        x = torch.randn(n, d, generator=gen, device="cuda").to(dtype)
        out = _poisoned((n, d), dtype)
        ar.trtllm_mnnvl_all_reduce(
            x, ws.mc_ptr, ws.uc_ptrs_dev, buffer_m, flags, world, rank, True, False, out
        )
        xs = _gathered(x)
        _check_sum(f, f"legacy n={n}", out, xs)
        residual = torch.randn(n, d, generator=shared, device="cuda").to(dtype)
        pre, normed = _poisoned((n, d), dtype), _poisoned((n, d), dtype)
        ar.trtllm_mnnvl_fused_allreduce_rmsnorm(
            pre, normed, x, ws.mc_ptr, ws.uc_ptrs_dev, ws.uc_ptr_local, buffer_m, flags, world,
            rank, gamma, 1e-5, residual, True,
        )  # fmt: skip
        _check_norm(f, f"legacy rmsnorm n={n}", normed, pre, xs, residual, gamma, 1e-5)
    _close(ws)
    return f.messages


@pytest.mark.gpu(2)
def test_deprecated_pointer_entry_points(world_size):
    assert_no_failures(run_ranks(_rank_legacy, world_size, backend="nccl", timeout_s=300))
