"""The MoE all-to-all combine's output formats on GPUs: other float dtypes, and the quantised
outputs (NVFP4 with E4M3 scales and a global scale, MXFP8 and MXFP4 with UE8M0 scales) in every
scale layout, compared bytewise with fusedcomm.reference (quant.quantize_nvfp4,
moe_a2a.quantize_mx, quant.write_scale_factors) applied to the reference combine; and the
low-precision wire (use_low_precision=True): bitwise against the reference of its algorithm,
within the documented bound of an fp32 reference, and a round where ranks disagree on it fails
on every rank.

Every rank builds every rank's inputs from seeds, so each computes the reference of its own
tokens (the dispatch reference's target ranks, the experts below, combine_sum, one rounding to
the payload dtype: what the quantisers read). Outputs and scale buffers are poisoned before
each combine; the padding of the swizzled layouts must keep the poison. ep_size 1 and 2 ranks
(sharing one GPU where there is one).
"""

import pytest
import torch

import fusedcomm as comm
from fusedcomm import Mapping, MoeAlltoAll
from fusedcomm.reference.moe_a2a import (
    combine_sum,
    dequantize_mx,
    dispatch_reference,
    quantize_mx,
)
from fusedcomm.reference.quant import (
    quantize_nvfp4,
    scale_factor_buffer_size,
    ue8m0_decode,
    write_scale_factors,
)
from fusedcomm.testing.checks import Failures, assert_no_failures
from fusedcomm.testing.dist import barrier, run_ranks

MAX_TOKENS, EXPERTS, TOP_K = 160, 16, 4
POISON = 0xA5
# (tokens per rank, hidden, payload dtype): row counts across a 128-row tile of SWIZZLED_128x4
# and an 8-row tile of SWIZZLED_8x4, a scale column count that is not a multiple of 4
# (hidden 160: 10 NVFP4 / 5 MX columns), a rank without tokens, the widest row (7168).
CASES = [
    ((37, 130), 160, torch.bfloat16),
    ((0, 9), 2048, torch.float16),
    ((150, 1), 7168, torch.bfloat16),
]
KINDS = {  # kind: (output dtype, scale dtype, values per scale)
    "nvfp4": (torch.uint8, torch.float8_e4m3fn, 16),
    "mxfp8": (torch.float8_e4m3fn, torch.uint8, 32),
    "mxfp4": (torch.uint8, torch.uint8, 32),
}


def _inputs(seed, rank, n, hidden, top_k=TOP_K):
    g = torch.Generator(device="cuda").manual_seed(seed * 100 + rank)
    keys = torch.rand(n, EXPERTS, generator=g, device="cuda")
    experts = keys.argsort(dim=1)[:, :top_k].to(torch.int32).contiguous()
    # Magnitudes over several binades, so blocks get different scales.
    scale = torch.exp2(torch.randint(-6, 7, (n, 1), generator=g, device="cuda").float())
    x = (torch.randn(n, hidden, generator=g, device="cuda") * scale).bfloat16()
    return experts, x


def _expert(x, q, dtype):
    """Rank q's 'experts': a function of the row and the rank only."""
    return (x.float() * (q + 1) + 0.0625 * (q + 1)).to(dtype)


def _terms(seed, rank, world, tokens, hidden, dtype, top_k=TOP_K):
    """Per k the fp32 rows this rank's tokens get back (the payload dtype's values; 0 where a
    pair sends nothing), from the dispatch reference's target ranks."""
    inputs = [_inputs(seed, q, tokens[q], hidden, top_k) for q in range(world)]
    r = max(max(tokens), 1)
    ref = dispatch_reference([e for e, _ in inputs], [[x] for _, x in inputs], EXPERTS, r)
    targets = ref.target_ranks[rank]
    x = inputs[rank][1]
    terms = []
    for k in range(top_k):
        q = targets[:, k]
        rows = torch.zeros(x.shape, dtype=torch.float32, device="cuda")
        for owner in range(world):
            pick = q == owner
            rows[pick] = _expert(x[pick], owner, dtype).float()
        terms.append(rows)
    return terms


def _reference(seed, rank, world, tokens, hidden, dtype):
    """The combine output of this rank's tokens, rounded to the payload dtype."""
    return combine_sum(_terms(seed, rank, world, tokens, hidden, dtype)).to(dtype)


def _round(a2a, seed, rank, tokens, hidden, dtype, in_workspace=False, **combine):
    experts, x = _inputs(seed, rank, tokens[rank], hidden, a2a.top_k)
    r = max(max(tokens), 1)
    received = a2a.dispatch(experts, [x], r)
    y = _expert(received[0], rank, dtype)
    if in_workspace:
        view = a2a.get_combine_payload_tensor_in_workspace(r, hidden, dtype)
        y = view.copy_(y)
    return a2a.combine(y, r, payload_in_workspace=in_workspace, **combine)


def _want(kind, plain, g, layout):
    if kind == "nvfp4":
        codes, sf = quantize_nvfp4(plain, g)
    else:
        codes, sf = quantize_mx(plain, kind)
    return codes, write_scale_factors(sf, layout, poison=POISON)


def _rank_formats(rank, world):
    f = Failures()
    mapping = Mapping(world, rank, tp_size=world, moe_ep_size=world)
    size = comm.moe_a2a_get_workspace_size_per_rank(world, MAX_TOKENS, 2 * 7168 + 64, 2 * 7168)
    a2a = MoeAlltoAll(mapping, MAX_TOKENS, TOP_K, EXPERTS, size, timeout_s=30.0)
    for i, (per_rank, hidden, dtype) in enumerate(CASES):
        tokens = [per_rank[q % 2] for q in range(world)] if world > 1 else [max(per_rank)]
        n = tokens[rank]
        want = _reference(i + 1, rank, world, tokens, hidden, dtype)
        what = f"tokens={tokens} H={hidden} {dtype}"
        plain = _round(a2a, i + 1, rank, tokens, hidden, dtype)
        f.check(torch.equal(plain, want), f"{what}: the plain combine differs from the reference")
        # Other float outputs: the rounded sum, converted.
        for out_dtype in (torch.float32, torch.float16 if dtype == torch.bfloat16 else dtype):
            out = torch.full((n, hidden), float("nan"), dtype=out_dtype, device="cuda")
            got = _round(a2a, i + 1, rank, tokens, hidden, dtype, output_dtype=out_dtype,
                         output=out)  # fmt: skip
            f.check(got is out and torch.equal(got, want.to(out_dtype)), f"{what}: {out_dtype}")
        # Quantised outputs, every layout, the payload pushed or already in the workspace.
        amax = float(want.float().abs().max()) if n else 1.0
        for kind, (out_dtype, sf_dtype, block) in KINDS.items():
            g = 448.0 * 6.0 / amax if kind == "nvfp4" else 1.0
            for layout in (0, 1, 2):
                nbytes = scale_factor_buffer_size(n, hidden // block, layout)
                sf = torch.full((nbytes,), POISON, dtype=torch.uint8, device="cuda")
                width = hidden if kind == "mxfp8" else hidden // 2
                out = torch.full((n, width), 0x5A, dtype=torch.uint8, device="cuda")
                got = _round(
                    a2a, i + 1, rank, tokens, hidden, dtype, in_workspace=layout == 1,
                    output_dtype=out_dtype, output_scales=sf.view(sf_dtype),
                    output_scalar_scale=g, sf_layout=layout, output=out.view(out_dtype),
                )  # fmt: skip
                torch.cuda.synchronize()
                codes, scales = _want(kind, want, g, layout)
                tag = f"{what}: {kind} layout {layout}"
                f.check(got.dtype == out_dtype and got.shape == (n, width), f"{tag}: {got.shape}")
                f.check(got.data_ptr() == out.data_ptr(), f"{tag}: not written into `output`")
                same = torch.equal(got.view(torch.uint8), codes.view(torch.uint8))
                f.check(same, f"{tag}: codes differ from the reference")
                f.check(torch.equal(sf, scales), f"{tag}: scale bytes differ from the reference")
    torch.cuda.synchronize()
    comm.check_errors()
    barrier()
    return f.messages


@pytest.mark.gpu(1)
def test_output_formats_single_rank():
    assert_no_failures(run_ranks(_rank_formats, 1, backend="nccl", timeout_s=180))


@pytest.mark.gpu(2)
def test_output_formats_match_the_reference(world_size):
    assert_no_failures(run_ranks(_rank_formats, world_size, backend="nccl", timeout_s=240))


# --- the low-precision wire -------------------------------------------------------------------


def _wire_reference(terms):
    """combine_low_precision_reference for table-free terms: each term row as its MXFP8,
    decoded; the same sum; bfloat16. Also the documented bound against the fp32 sum."""
    decoded, bound, magnitude = [], 0.0, 0.0
    for t in terms:
        n, h = t.shape
        codes, sf = quantize_mx(t, "mxfp8")
        decoded.append(dequantize_mx(codes, sf, "mxfp8"))
        scale = ue8m0_decode(sf).repeat_interleave(32, dim=1).reshape(n, h)
        bound = bound + t.abs() * 2.0**-4 + scale * 2.0**-10
        magnitude = magnitude + t.abs()
    exact = combine_sum(terms)
    # + the final bfloat16 rounding and the fp32 additions
    bound = bound + (exact.abs() + bound) * 2.0**-8 + magnitude * 2.0**-20
    return combine_sum(decoded).to(torch.bfloat16), exact, bound


def _rank_wire(rank, world):
    f = Failures()
    mapping = Mapping(world, rank, tp_size=world, moe_ep_size=world)
    size = comm.moe_a2a_get_workspace_size_per_rank(world, MAX_TOKENS, 2 * 7168 + 64, 2 * 7168)
    for top_k in (TOP_K, 3):  # a pairwise tree and the sequential sum
        a2a = MoeAlltoAll(mapping, MAX_TOKENS, top_k, EXPERTS, size, timeout_s=30.0)
        for i, (per_rank, hidden, _) in enumerate(CASES):
            tokens = [per_rank[q % 2] for q in range(world)] if world > 1 else [max(per_rank)]
            n = tokens[rank]
            for dtype in (torch.bfloat16, torch.float16):
                seed = 50 + i
                terms = _terms(seed, rank, world, tokens, hidden, dtype, top_k)
                want, exact, bound = _wire_reference(terms)
                what = f"top_k={top_k} tokens={tokens} H={hidden} {dtype}"
                for in_workspace in (False, True):
                    out = torch.full((n, hidden), float("nan"), dtype=torch.bfloat16,
                                     device="cuda")  # fmt: skip
                    got = _round(a2a, seed, rank, tokens, hidden, dtype, in_workspace,
                                 output=out, use_low_precision=True)  # fmt: skip
                    tag = f"{what} in_workspace={in_workspace}"
                    f.check(got is out and got.dtype == torch.bfloat16, f"{tag}: output")
                    if not torch.equal(got, want):
                        bad = int((got != want).sum())
                        f.check(False, f"{tag}: {bad} elements differ from the wire reference")
                    err = (got.float() - exact).abs()
                    f.check(bool((err <= bound).all()), f"{tag}: error above the bound")
                got = _round(a2a, seed, rank, tokens, hidden, dtype, output_dtype=torch.float32,
                             use_low_precision=True)  # fmt: skip
                f.check(torch.equal(got, want.float()), f"{what}: float32 output")
    torch.cuda.synchronize()
    comm.check_errors()
    barrier()
    return f.messages


@pytest.mark.gpu(1)
def test_low_precision_wire_single_rank():
    assert_no_failures(run_ranks(_rank_wire, 1, backend="nccl", timeout_s=180))


@pytest.mark.gpu(2)
def test_low_precision_wire_matches_the_reference(world_size):
    assert_no_failures(run_ranks(_rank_wire, world_size, backend="nccl", timeout_s=240))


def _rank_wire_mismatch(rank, world):
    """Rank 0 sends on the low-precision wire, the others do not: every rank raises, none
    returns a mixed sum; after reset() a round on the wire works on every rank."""
    f = Failures()
    mapping = Mapping(world, rank, tp_size=world, moe_ep_size=world)
    a2a = MoeAlltoAll(mapping, 48, TOP_K, EXPERTS, hidden_size=1024, timeout_s=5.0)
    tokens, hidden = [40] * world, 1024
    error = None
    try:
        _round(a2a, 7, rank, tokens, hidden, torch.bfloat16, use_low_precision=rank == 0)
        torch.cuda.synchronize()
        comm.check_errors()
    except comm.CommFailureError as e:
        error = e
    f.check(error is not None, "a round with mixed wire formats did not raise")
    torch.cuda.synchronize()
    barrier()
    a2a.reset()
    want, _, _ = _wire_reference(_terms(7, rank, world, tokens, hidden, torch.bfloat16))
    got = _round(a2a, 7, rank, tokens, hidden, torch.bfloat16, use_low_precision=True)
    torch.cuda.synchronize()
    comm.check_errors()
    f.check(torch.equal(got, want), "the wire round after reset() differs from the reference")
    barrier()
    return f.messages, type(error).__name__


@pytest.mark.gpu(2)
def test_ranks_that_disagree_on_the_wire_fail_the_round(world_size):
    results = run_ranks(_rank_wire_mismatch, world_size, backend="nccl", timeout_s=180)
    assert_no_failures([messages for messages, _ in results])
    names = [name for _, name in results]
    assert "ProtocolMismatchError" in names, names


# --- CUDA graphs --------------------------------------------------------------------------------


def _rank_graph(rank, world):
    """One graph of two rounds (an NVFP4 output in the 128x4 layout, then the low-precision
    wire), replayed with new routing and new rows; outputs and scales poisoned before each."""
    f = Failures()
    mapping = Mapping(world, rank, tp_size=world, moe_ep_size=world)
    size = comm.moe_a2a_get_workspace_size_per_rank(world, MAX_TOKENS, 2 * 7168 + 64, 2 * 7168)
    a2a = MoeAlltoAll(mapping, MAX_TOKENS, TOP_K, EXPERTS, size, timeout_s=30.0)
    tokens, hidden, g = [37 - 11 * (q % 2) for q in range(world)], 256, 448.0 * 6.0 / 64.0
    n, r = tokens[rank], max(tokens)
    experts_in, x_in = (t.clone() for t in _inputs(90, rank, n, hidden))
    sf = torch.full((scale_factor_buffer_size(n, hidden // 16, 0),), POISON, dtype=torch.uint8,
                    device="cuda")  # fmt: skip
    q_out = torch.empty(n, hidden // 2, dtype=torch.uint8, device="cuda")
    low_out = torch.empty(n, hidden, dtype=torch.bfloat16, device="cuda")

    def rounds():
        received = a2a.dispatch(experts_in, [x_in], r)
        y = _expert(received[0], rank, torch.bfloat16)
        a2a.combine(y, r, False, torch.uint8, sf.view(torch.float8_e4m3fn), g, 0, q_out)
        received = a2a.dispatch(experts_in, [x_in], r)
        y = _expert(received[0], rank, torch.bfloat16)
        a2a.combine(y, r, output=low_out, use_low_precision=True)

    rounds()  # eager warm-up
    torch.cuda.synchronize()
    barrier()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rounds()
    torch.cuda.synchronize()
    barrier()
    for replay, seed in enumerate((91, 92, 93)):
        experts, x = _inputs(seed, rank, n, hidden)
        experts_in.copy_(experts)
        x_in.copy_(x)
        sf.fill_(POISON)
        q_out.fill_(0x5A)
        low_out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        terms = _terms(seed, rank, world, tokens, hidden, torch.bfloat16)
        codes, scales = _want("nvfp4", combine_sum(terms).to(torch.bfloat16), g, 0)
        f.check(torch.equal(q_out, codes), f"replay {replay}: NVFP4 codes differ")
        f.check(torch.equal(sf, scales), f"replay {replay}: NVFP4 scale bytes differ")
        want, _, _ = _wire_reference(terms)
        f.check(torch.equal(low_out, want), f"replay {replay}: the low-precision round differs")
    comm.check_errors()
    barrier()
    del graph
    return f.messages


@pytest.mark.gpu(2)
def test_cuda_graph_replays_output_formats(world_size):
    assert_no_failures(run_ranks(_rank_graph, world_size, backend="nccl", timeout_s=240))
