"""The block quantisers of the fused all-reduce on GPUs: NVFP4 (patterns 3, 5) in every
scale-factor layout and per-token-group FP8 with packed UE8M0 scales (patterns 8, 9).

Quantised bytes and scale bytes are compared bit for bit with fusedcomm.reference.quant
computed from the kernel's own norm_out (patterns 5 and 9); the patterns without norm_out
(3 and 8) must write the same bytes as their twins on the same inputs, and agree with the
reference computed from the reference norm up to a few codes at rounding ties. Scale buffers
are poisoned first and compared whole, so padding the kernel must leave alone (swizzled tiles)
or must zero (packed UE8M0 rows) is checked too. Every rank must hold the same bits.
"""

import itertools

import pytest
import torch

import fusedcomm as comm
from fusedcomm.bench.workspace import lamport_workspace
from fusedcomm.enums import AllReduceFusionPattern as P
from fusedcomm.enums import QuantizationSFLayout as L
from fusedcomm.reference import quant as rq
from fusedcomm.reference.fusion import fusion_all_reduce, residual_rms_norm
from fusedcomm.testing.checks import assert_no_failures
from fusedcomm.testing.dist import gather_all, run_ranks, same_on_every_rank

MAX_TOKENS, MAX_HIDDEN = 1000, 7168
TOKENS = (1, 5, 128, 129, 1000)
HIDDENS = (2048, 2880, 4096, 7168)
LAYOUTS = (L.SWIZZLED_128x4, L.SWIZZLED_8x4, L.LINEAR)
GROUPS = {
    2048: (16, 32, 128),
    2880: (16, 32, 24, 20),
    4096: (16, 32, 128),
    7168: (16, 32, 128, 112),
}
ALGORITHMS = (True, False, None)
SF_POISON = 0xAB
WORD_POISON = 0x5A5A5A5A
TWIN = {P.kARResidualRMSNormFP4Quant: P.kARResidualRMSNormOutFP4Quant,
        P.kARResidualRMSNormPerTokenGroupFP8PackedQuant:
        P.kARResidualRMSNormOutPerTokenGroupFP8PackedQuant}  # fmt: skip


def _inputs(case, rank, n, d, dtype):
    """Fresh inputs for one case: x differs per rank, residual and gamma are shared. The first
    block of every row is zero on every rank (a zero NVFP4 block / group), one value is -0.0
    and a few values are large enough to saturate E2M1 codes within their block."""
    gen = torch.Generator(device="cuda").manual_seed(1000 * case + rank)
    shared = torch.Generator(device="cuda").manual_seed(1000 * case + 999)
    x = torch.randn(n, d, generator=gen, device="cuda")
    x[:, :16] = 0.0
    x[0, 17] = -0.0
    residual = torch.randn(n, d, generator=shared, device="cuda")
    residual[:, :16] = 0.0
    residual[0, 17] = -0.0
    residual[:, 40] *= 30.0
    gamma = 1 + 0.2 * torch.randn(d, generator=shared, device="cuda")
    scale = 448 * 6 / (4 + 4 * torch.rand(1, generator=shared, device="cuda"))
    return x.to(dtype), residual.to(dtype), gamma.to(dtype), scale


def _nvfp4_outputs(n, d, layout, dtype, with_norm):
    out = {
        "residual_out": torch.full((n, d), float("nan"), dtype=dtype, device="cuda"),
        "quant_out": torch.full((n, d // 2), 0xEE, dtype=torch.uint8, device="cuda"),
        "scale_out": torch.full(
            (rq.scale_factor_buffer_size(n, d // 16, layout),),
            SF_POISON,
            dtype=torch.uint8,
            device="cuda",
        ),
    }
    if with_norm:
        out["norm_out"] = torch.full((n, d), float("nan"), dtype=dtype, device="cuda")
    return out


def _group_outputs(n, d, g, dtype, with_norm):
    k, m = (d // g + 3) // 4, (n + 3) // 4 * 4
    storage = torch.full((n + (k - 1) * m,), WORD_POISON, dtype=torch.int32, device="cuda")
    out = {
        "residual_out": torch.full((n, d), float("nan"), dtype=dtype, device="cuda"),
        "quant_out": torch.full((n, d), float("nan"), device="cuda").to(torch.float8_e4m3fn),
        "scale_out": torch.as_strided(storage, (n, k), (1, m)),
    }
    if with_norm:
        out["norm_out"] = torch.full((n, d), float("nan"), dtype=dtype, device="cuda")
    return out, storage


def _expected(pattern, y, scale, layout, g):
    """Reference quant bytes and the whole scale buffer for the normalised rows ``y``."""
    if pattern in TWIN or pattern in TWIN.values():
        if pattern in (P.kARResidualRMSNormFP4Quant, P.kARResidualRMSNormOutFP4Quant):
            packed, sf = rq.quantize_nvfp4(y, scale)
            return packed, rq.write_scale_factors(sf, layout, poison=SF_POISON)
        q, packed = rq.quantize_fp8_per_token_group(y, g)
        return q.view(torch.uint8), packed.as_strided(
            (packed.untyped_storage().nbytes() // 4,), (1,)
        )
    raise AssertionError(pattern)


def _bytes(t):
    return t.contiguous().view(torch.uint8).reshape(-1)


def _call(ws, pattern, x, residual, gamma, scale, out, layout, g, alg):
    return comm.allreduce_fusion(
        input=x,
        workspace=ws,
        pattern=pattern,
        residual_in=residual,
        rms_gamma=gamma,
        rms_eps=1e-6,
        scale_factor=scale,
        layout_code=layout,
        block_quant_group_size=g,
        use_oneshot=alg,
        fp32_acc=True,
        **out,
    )


def _cases():
    for n, d in itertools.product(TOKENS, HIDDENS):
        for layout in LAYOUTS:
            yield P.kARResidualRMSNormFP4Quant, n, d, layout, None
        for g in GROUPS[d]:
            yield P.kARResidualRMSNormPerTokenGroupFP8PackedQuant, n, d, None, g


def _check_case(ws, case, rank, world, pattern, n, d, layout, g, dtype, failures):
    x, residual, gamma, scale = _inputs(case, rank, n, d, dtype)
    alg = ALGORITHMS[case % 3]
    what = f"pattern {int(pattern)} n={n} d={d} layout={layout} g={g} oneshot={alg}"
    outs, storages = {}, {}
    for p in (pattern, TWIN[pattern]):
        with_norm = p == TWIN[pattern]
        if g is None:
            outs[p], storages[p] = _nvfp4_outputs(n, d, layout, dtype, with_norm), None
        else:
            outs[p], storages[p] = _group_outputs(n, d, g, dtype, with_norm)
        _call(ws, p, x, residual, gamma, scale, outs[p], layout, g, alg)
    torch.cuda.synchronize()
    twin = outs[TWIN[pattern]]
    scales = {p: _bytes(o["scale_out"] if s is None else s) for (p, o), s in
              zip(outs.items(), storages.values())}  # fmt: skip
    # 1. bit-exact against the reference of the kernel's own norm_out (5, 9)
    want_q, want_sf = _expected(TWIN[pattern], twin["norm_out"], scale, layout, g)
    if not torch.equal(_bytes(twin["quant_out"]), _bytes(want_q)):
        failures.append(f"{what}: quant_out of the twin differs from the reference")
    if not torch.equal(scales[TWIN[pattern]], _bytes(want_sf)):
        failures.append(f"{what}: scale_out of the twin differs from the reference")
    # 2. the pattern without norm_out writes the same bytes
    if not torch.equal(_bytes(outs[pattern]["quant_out"]), _bytes(twin["quant_out"])):
        failures.append(f"{what}: quant_out differs from its twin's")
    if not torch.equal(scales[pattern], scales[TWIN[pattern]]):
        failures.append(f"{what}: scale_out differs from its twin's")
    # 3. the reference chain from the inputs: exact residual, quant codes up to rounding ties
    xs = gather_all(x)
    ref_res, ref_norm = residual_rms_norm(fusion_all_reduce(xs), residual, gamma, 1e-6)
    if not torch.equal(outs[pattern]["residual_out"], ref_res):
        failures.append(f"{what}: residual_out is not the exact reference")
    ref_q, _ = _expected(pattern, ref_norm, scale, layout, g)
    differ = (_bytes(outs[pattern]["quant_out"]) != _bytes(ref_q)).float().mean().item()
    if differ > 0.02:
        failures.append(f"{what}: {differ:.4f} of the quant bytes differ from the reference chain")
    # 4. every rank holds the same bits
    for name, t in [*outs[pattern].items(), ("scales", scales[pattern])]:
        if not same_on_every_rank(t):
            failures.append(f"{what}: ranks disagree on {name}")


def _rank_quant(rank, world, dtype):
    ws = lamport_workspace(rank, world, MAX_TOKENS, MAX_HIDDEN, dtype)
    failures: list[str] = []
    try:
        for case, (pattern, n, d, layout, g) in enumerate(_cases()):
            _check_case(ws, case, rank, world, pattern, n, d, layout, g, dtype, failures)
    finally:
        torch.cuda.synchronize()
        ws.destroy()
    return failures


@pytest.mark.gpu(2)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_block_quantisers_match_the_reference(world_size, dtype):
    results = run_ranks(_rank_quant, world_size, backend="nccl", timeout_s=900, args=(dtype,))
    assert_no_failures(results)


def _rank_graph(rank, world):
    dtype, n, d = torch.bfloat16, 129, 4096
    ws = lamport_workspace(rank, world, n, d, dtype)
    x, residual, gamma, scale = _inputs(7, rank, n, d, dtype)
    pattern, layout = P.kARResidualRMSNormOutFP4Quant, L.SWIZZLED_128x4
    out = _nvfp4_outputs(n, d, layout, dtype, with_norm=True)
    failures = []
    try:
        _call(ws, pattern, x, residual, gamma, scale, out, layout, None, True)  # warm-up
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            _call(ws, pattern, x, residual, gamma, scale, out, layout, None, True)
        for step in range(4):
            new_x, new_res, _, _ = _inputs(100 + step, rank, n, d, dtype)
            x.copy_(new_x)
            residual.copy_(new_res)
            scale.fill_(float(6 * 448 / (2 + 3 * step)))  # read on the device at each replay
            out["scale_out"].fill_(SF_POISON)
            graph.replay()
            torch.cuda.synchronize()
            want_q, want_sf = _expected(pattern, out["norm_out"], scale, layout, None)
            if not torch.equal(out["quant_out"], want_q):
                failures.append(f"replay {step}: quant_out")
            if not torch.equal(out["scale_out"], want_sf):
                failures.append(f"replay {step}: scale_out")
            ref_res, _ = residual_rms_norm(fusion_all_reduce(gather_all(x)), residual, gamma, 1e-6)
            if not torch.equal(out["residual_out"], ref_res):
                failures.append(f"replay {step}: residual_out")
    finally:
        torch.cuda.synchronize()
        ws.destroy()
    return failures


@pytest.mark.gpu(2)
def test_graph_replay_reads_a_new_global_scale(world_size):
    results = run_ranks(_rank_graph, world_size, backend="nccl", timeout_s=300)
    assert_no_failures(results)
