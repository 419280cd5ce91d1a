"""The MoE fusions on GPUs (pattern 6: expert reduction, pattern 7: MoE finalize), compared with
fusedcomm.reference.moe: the prologue, the all-reduce and the residual add are exact, the norm
within the family's tolerance, NVFP4 bytes and whole scale buffers exact against the
reference of the kernel's own norm_out; every rank holds the same bits. Also a CUDA graph
replayed with new inputs and torch.compile(fullgraph=True) through the unified API."""

import itertools

import pytest
import torch

import fusedcomm as comm
from fusedcomm.bench.workspace import lamport_workspace
from fusedcomm.enums import AllReduceFusionPattern as P
from fusedcomm.enums import QuantizationSFLayout as L
from fusedcomm.reference import quant as rq
from fusedcomm.reference.moe import moe_allreduce_fusion_reference
from fusedcomm.testing.checks import assert_no_failures
from fusedcomm.testing.dist import barrier, gather_all, run_ranks, same_on_every_rank

MAX_TOKENS, MAX_HIDDEN = 256, 7168
TOKENS = (1, 5, 128, MAX_TOKENS)
HIDDENS = (2048, 4096, 7168)
EXPERTS = (1, 8, 32)
TOP_K = (1, 2, 4, 8)
LAYOUTS = (L.SWIZZLED_128x4, L.LINEAR, L.SWIZZLED_8x4)
SF_POISON = 0xC3
TOL = {torch.float16: 2.0**-9, torch.bfloat16: 2.0**-7}


def _workspace(world, rank, dtype, max_tokens=MAX_TOKENS, hidden=MAX_HIDDEN):
    return lamport_workspace(rank, world, max_tokens, hidden, dtype)


def _shared(case, n, d, dtype):
    g = torch.Generator(device="cuda").manual_seed(5000 + case)
    residual = torch.randn(n, d, generator=g, device="cuda").to(dtype)
    gamma = (1 + 0.2 * torch.randn(d, generator=g, device="cuda")).to(dtype)
    return residual, gamma


def _reduction_inputs(case, rank, n, d, e, dtype):
    g = torch.Generator(device="cuda").manual_seed(7000 + 31 * case + rank)
    experts = torch.randn(e, n, d, generator=g, device="cuda").to(dtype)
    scales = torch.rand(e, n, generator=g, device="cuda") * 0.5  # router weights
    token = torch.randn(n, d, generator=g, device="cuda").to(dtype)
    return {"active": experts, "scale": scales, "token": token}


def _finalize_inputs(case, rank, n, d, k, dtype, weights, shared):
    g = torch.Generator(device="cuda").manual_seed(9000 + 31 * case + rank)
    rows = n * k + 3  # padded, as engines allocate
    permuted = torch.randn(rows, d, generator=g, device="cuda").to(dtype)
    idx = torch.randperm(rows, generator=g, device="cuda")[: n * k].reshape(n, k).to(torch.int32)
    drop = torch.rand(n, k, generator=g, device="cuda") < 0.15
    idx = torch.where(drop, torch.full_like(idx, -1), idx)  # skipped (token, k) pairs
    out = {"permuted": permuted, "idx": idx, "weights": None, "shared": None}
    if weights:
        out["weights"] = torch.rand(n, k, generator=g, device="cuda").to(dtype)
    if shared:
        out["shared"] = torch.randn(n, d, generator=g, device="cuda").to(dtype)
    return out


def _outputs(n, d, dtype, quant, layout):
    out = {
        "norm_out": torch.full((n, d), float("nan"), dtype=dtype, device="cuda"),
        "residual_out": torch.full((n, d), float("nan"), dtype=dtype, device="cuda"),
    }
    if quant:
        out["quant_out"] = torch.full((n, d // 2), 0xEE, dtype=torch.uint8, device="cuda")
        size = rq.scale_factor_buffer_size(n, d // 16, layout)
        out["scale_out"] = torch.full((size,), SF_POISON, dtype=torch.uint8, device="cuda")
    return out


def _compare(what, got, ref, dtype, quant, scale, layout, failures):
    for name in ("moe_allreduce_out", "residual_out"):
        if name in got and not torch.equal(got[name], ref[name]):
            failures.append(f"{what}: {name} is not the exact reference")
    diff = (got["norm_out"].float() - ref["norm_out"].float()).abs()
    bound = TOL[dtype] * ref["norm_out"].float().abs() + 1e-5
    if not bool((diff <= bound).all()):
        failures.append(f"{what}: norm_out off by {float(diff.max()):.3g}")
    if quant:
        packed, sf = rq.quantize_nvfp4(got["norm_out"], scale)
        if not torch.equal(got["quant_out"], packed):
            failures.append(f"{what}: quant_out differs from the reference of norm_out")
        if not torch.equal(got["scale_out"], rq.write_scale_factors(sf, layout, poison=SF_POISON)):
            failures.append(f"{what}: scale_out differs from the reference of norm_out")
    for name, t in got.items():
        if not same_on_every_rank(t):
            failures.append(f"{what}: ranks disagree on {name}")


def _reduction_case(ws, case, rank, world, n, d, e, dtype, failures):
    quant, layout, scale = case % 2 == 0, LAYOUTS[case % 3], 448 * 6 / 7.0
    residual, gamma = _shared(case, n, d, dtype)
    x = _reduction_inputs(case, rank, n, d, e, dtype)
    out = _outputs(n, d, dtype, quant, layout)
    out["moe_allreduce_out"] = torch.full((n, d), float("nan"), dtype=dtype, device="cuda")
    comm.trtllm_moe_allreduce_fusion(
        world, rank, n, d, ws.workspace_tensor, case % 3 == 0, residual, gamma, 1e-6, scale, e,
        x["scale"], x["active"], x["token"], layout, out["moe_allreduce_out"],
        out["residual_out"], out["norm_out"], out.get("quant_out"), out.get("scale_out"),
    )  # fmt: skip
    ref = moe_allreduce_fusion_reference(
        P.kMoEReductionARResidualRMSNorm, residual, gamma,
        active_experts_token_input=gather_all(x["active"]), scale_input=gather_all(x["scale"]),
        token_input=gather_all(x["token"]), quantize=quant, scale_factor=scale,
        layout_code=layout, sf_poison=SF_POISON,
    )  # fmt: skip
    what = f"pattern 6 n={n} d={d} experts={e} quant={quant}"
    _compare(what, out, ref, dtype, quant, scale, layout, failures)


def _finalize_case(ws, case, rank, world, n, d, k, dtype, failures):
    weights, shared, quant = case % 2 == 0, case % 3 != 0, case % 4 == 1
    rsf = None if case % 5 else 2.5
    layout, scale = LAYOUTS[case % 3], 448 * 6 / 5.0
    residual, gamma = _shared(case, n, d, dtype)
    x = _finalize_inputs(case, rank, n, d, k, dtype, weights, shared)
    out = _outputs(n, d, dtype, quant, layout)
    comm.trtllm_moe_finalize_allreduce_fusion(
        x["permuted"], residual, gamma, x["idx"], out["norm_out"], out["residual_out"],
        out.get("quant_out"), out.get("scale_out"), ws.workspace_tensor, case % 3 == 1, rank,
        world, 1e-6, x["shared"], x["weights"], rsf, scale_factor=scale, layout_code=layout,
    )  # fmt: skip
    gather = gather_all
    ref = moe_allreduce_fusion_reference(
        P.kMoEFinalizeARResidualRMSNorm, residual, gamma,
        allreduce_in=gather(x["permuted"]), expanded_idx_to_permuted_idx=gather(x["idx"]),
        expert_scale_factor=gather(x["weights"]) if weights else None,
        shared_expert_output=gather(x["shared"]) if shared else None,
        routed_scaling_factor=rsf, quantize=quant, scale_factor=scale, layout_code=layout,
        sf_poison=SF_POISON,
    )  # fmt: skip
    what = f"pattern 7 n={n} d={d} top_k={k} weights={weights} shared={shared} rsf={rsf}"
    _compare(what, out, ref, dtype, quant, scale, layout, failures)


def _rank_moe(rank, world, dtype):
    ws = _workspace(world, rank, dtype)
    failures: list[str] = []
    try:
        for case, (n, d, e) in enumerate(itertools.product(TOKENS, HIDDENS, EXPERTS)):
            _reduction_case(ws, case, rank, world, n, d, e, dtype, failures)
        for case, (n, d, k) in enumerate(itertools.product(TOKENS, HIDDENS, TOP_K)):
            _finalize_case(ws, case, rank, world, n, d, k, dtype, failures)
    finally:
        torch.cuda.synchronize()
        ws.destroy()
    return failures


@pytest.mark.gpu(2)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_moe_fusions_match_the_reference(world_size, dtype):
    results = run_ranks(_rank_moe, world_size, backend="nccl", timeout_s=900, args=(dtype,))
    assert_no_failures(results)


def _unified_finalize(ws, x, residual, gamma, norm_out, residual_out):
    return comm.allreduce_fusion(
        input=x["permuted"],
        workspace=ws,
        pattern=P.kMoEFinalizeARResidualRMSNorm,
        launch_with_pdl=True,
        residual_in=residual,
        rms_gamma=gamma,
        norm_out=norm_out,
        residual_out=residual_out,
        expanded_idx_to_permuted_idx=x["idx"],
        expert_scale_factor=x["weights"],
        shared_expert_output=x["shared"],
    )


def _rank_graph_and_compile(rank, world):
    dtype, n, d, k = torch.bfloat16, 16, 4096, 8
    ws = _workspace(world, rank, dtype, max_tokens=64, hidden=d)
    failures = []
    try:
        residual, gamma = _shared(1, n, d, dtype)
        x = _finalize_inputs(1, rank, n, d, k, dtype, weights=True, shared=True)
        out = _outputs(n, d, dtype, quant=False, layout=0)
        compiled = torch.compile(_unified_finalize, fullgraph=True)
        for mode, fn in (("graph", _unified_finalize), ("compile", compiled)):
            fn(ws, x, residual, gamma, out["norm_out"], out["residual_out"])  # warm-up
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn(ws, x, residual, gamma, out["norm_out"], out["residual_out"])
            for step in range(3):
                new = _finalize_inputs(50 + step, rank, n, d, k, dtype, True, True)
                for name in ("permuted", "idx", "weights", "shared"):
                    x[name].copy_(new[name])
                residual.copy_(_shared(60 + step, n, d, dtype)[0])
                for t in out.values():
                    t.fill_(float("nan"))
                graph.replay()
                torch.cuda.synchronize()
                ref = moe_allreduce_fusion_reference(
                    P.kMoEFinalizeARResidualRMSNorm, residual, gamma,
                    allreduce_in=gather_all(x["permuted"]),
                    expanded_idx_to_permuted_idx=gather_all(x["idx"]),
                    expert_scale_factor=gather_all(x["weights"]),
                    shared_expert_output=gather_all(x["shared"]),
                )  # fmt: skip
                _compare(f"{mode} replay {step}", out, ref, dtype, False, 0, 0, failures)
    finally:
        torch.cuda.synchronize()
        ws.destroy()
    return failures


@pytest.mark.gpu(2)
def test_moe_finalize_in_cuda_graphs_and_torch_compile(world_size):
    results = run_ranks(_rank_graph_and_compile, world_size, backend="nccl", timeout_s=600)
    assert_no_failures(results)


class _DeviceWords:
    """A device address seen as int32 words (``__cuda_array_interface__``), for poking the
    control block in a test."""

    def __init__(self, ptr, count):
        self.__cuda_array_interface__ = {
            "shape": (count,),
            "typestr": "<i4",
            "data": (ptr, False),
            "version": 3,
        }


def _rank_call_number_wrap(rank, world):
    """Split MoE calls (few tokens) across the call number's 24-bit wrap: the token's last
    block waits on our own slot, which has no announcement to confuse with a peer's."""
    from fusedcomm.ops import _fusion_launch

    dtype, n, d, e = torch.bfloat16, 1, 2048, 4
    ws = _workspace(world, rank, dtype, max_tokens=64, hidden=d)
    failures = []
    try:
        block = _fusion_launch._block_for(ws.workspace_tensor)
        control = torch.as_tensor(_DeviceWords(block.ptr, 8), device="cuda")
        control[1] = 2**24 - 3  # calls completed: the next calls cross 2^24
        torch.cuda.synchronize()
        barrier()
        residual, gamma = _shared(3, n, d, dtype)
        for step in range(5):
            x = _reduction_inputs(200 + step, rank, n, d, e, dtype)
            out = _outputs(n, d, dtype, quant=False, layout=0)
            comm.trtllm_moe_allreduce_fusion(
                world, rank, n, d, ws.workspace_tensor, False, residual, gamma, 1e-6, 1.0, e,
                x["scale"], x["active"], x["token"], 0, None, out["residual_out"],
                out["norm_out"], None, None,
            )  # fmt: skip
            torch.cuda.synchronize()
            ref = moe_allreduce_fusion_reference(
                P.kMoEReductionARResidualRMSNorm, residual, gamma,
                active_experts_token_input=gather_all(x["active"]),
                scale_input=gather_all(x["scale"]), token_input=gather_all(x["token"]),
            )  # fmt: skip
            _compare(f"call {2**24 - 2 + step}", out, ref, dtype, False, 0, 0, failures)
        comm.check_errors()
    finally:
        torch.cuda.synchronize()
        ws.destroy()
    return failures


@pytest.mark.gpu(2)
def test_split_moe_calls_across_the_call_number_wrap(world_size):
    results = run_ranks(_rank_call_number_wrap, world_size, backend="nccl", timeout_s=300)
    assert_no_failures(results)
