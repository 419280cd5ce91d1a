"""Deterministic results of allreduce_fusion (docs/deterministic.md), bit for bit:

1. one-shot, two-shot and the planner's choice give the same outputs for the same inputs
   (patterns 0, 1, 4, 11; bf16, fp16, fp32; fp32_acc True and False);
2. batch invariance: a token's outputs do not depend on the batch around it (the same row at
   some position of batches of 1, 7, 128 and 1000 tokens, every algorithm);
3. every rank holds the same bits (checked for every output of 1 and 2).

One launch of ranks per dtype runs 1 and 2 (a module-scoped fixture); each test reads its part.
"""

import pytest
import torch

import fusedcomm as comm
from fusedcomm.enums import AllReduceFusionPattern as P
from fusedcomm.testing.dist import barrier, run_ranks
from test_fusion_gpu import _poison, _same_on_every_rank

WS_HIDDEN, WS_TOKENS = 8192, 1000  # capacity by product: 8192000 elements
CAPACITY = WS_HIDDEN * WS_TOKENS
# 2880: not a power of two; 16384: two (16-bit) or four (fp32) packs per thread
HIDDENS = (2880, 4096, 8192, 16384)
TOKENS = (1, 7, 128, 1000)
PATTERNS = (
    P.kAllReduce,
    P.kARResidualRMSNorm,
    P.kARResidualRMSNormOutFP8Quant,
    P.kARResidualRMSNormOutDynamicFP8Quant,
)
ALGORITHMS = (True, False, None)  # use_oneshot
OUTS = {
    P.kAllReduce: ("output",),
    P.kARResidualRMSNorm: ("residual_out", "norm_out"),
    P.kARResidualRMSNormOutFP8Quant: ("residual_out", "norm_out", "quant_out"),
    P.kARResidualRMSNormOutDynamicFP8Quant: ("residual_out", "norm_out", "quant_out", "scale_out"),
}
_WORD = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def _token_counts(hidden):
    """TOKENS, the largest capped at the workspace's capacity for this hidden size."""
    return sorted({min(n, CAPACITY // hidden) for n in TOKENS})


def _bits(t):
    return t.view(_WORD[t.element_size()])


def _same_bits(a, b):
    return torch.equal(_bits(a), _bits(b))


def _written(t):
    """No poison left (the inputs are finite, so every output is)."""
    if t.dtype == torch.float8_e4m3fn:
        return not bool(((t.view(torch.uint8) & 0x7F) == 0x7F).any())
    return not bool(torch.isnan(t).any())


class _Layer:
    """One rank's fused call with fresh poisoned outputs; gamma and scale shared by ranks."""

    def __init__(self, ws, dtype, hidden, shared):
        self.ws, self.dtype, self.hidden = ws, dtype, hidden
        self.gamma = (1 + 0.1 * torch.randn(hidden, generator=shared, device="cuda")).to(dtype)
        self.scale = torch.full((1,), 0.75, device="cuda")

    def outputs(self, pattern, n):
        out = {}
        for name in OUTS[pattern]:
            if name == "quant_out":
                t = torch.empty(n, self.hidden, dtype=torch.float8_e4m3fn, device="cuda")
            elif name == "scale_out":
                t = torch.empty(n, 1, dtype=torch.float32, device="cuda")
            else:
                t = torch.empty(n, self.hidden, dtype=self.dtype, device="cuda")
            _poison(t)
            out[name] = t
        return out

    def __call__(self, pattern, x, residual, oneshot, fp32_acc=True):
        outs = self.outputs(pattern, x.shape[0])
        extra = {}
        if pattern != P.kAllReduce:
            extra = dict(residual_in=residual, rms_gamma=self.gamma, scale_factor=self.scale)
        comm.allreduce_fusion(
            x,
            self.ws,
            pattern,
            use_oneshot=oneshot,
            fp32_acc=fp32_acc,
            rms_eps=1e-6,
            **extra,
            **outs,
        )
        return outs


def _check_ranks(outs, what, failures):
    """Every output the same on every rank (collective: every rank calls it alike)."""
    for name, t in outs.items():
        if not _same_on_every_rank(t):
            failures.append(f"{what}: ranks disagree on {name}")


def _algorithms_agree(layer, pattern, gen, shared, failures):
    hidden, dtype = layer.hidden, layer.dtype
    for n in _token_counts(hidden):
        for acc in (True, False):
            x = torch.randn(n, hidden, generator=gen, device="cuda").to(dtype)
            residual = torch.randn(n, hidden, generator=shared, device="cuda").to(dtype)
            got = {alg: layer(pattern, x, residual, alg, acc) for alg in ALGORITHMS}
            what = f"{dtype} pattern {int(pattern)} hidden {hidden} n={n} fp32_acc={acc}"
            for name, one in got[True].items():
                for alg in (False, None):
                    if not _written(got[alg][name]):
                        failures.append(f"{what} use_oneshot={alg}: {name} not written")
                    elif not _same_bits(got[alg][name], one):
                        failures.append(f"{what}: {name} of use_oneshot={alg} != one-shot")
                if not _written(one):
                    failures.append(f"{what} one-shot: {name} not written")
            for alg in ALGORITHMS:
                _check_ranks(got[alg], f"{what} use_oneshot={alg}", failures)


def _batch_invariant(layer, pattern, gen, shared, failures):
    """The same token (inputs and residual) at row 3B/4 of batches of B tokens."""
    hidden, dtype = layer.hidden, layer.dtype
    token = torch.randn(1, hidden, generator=gen, device="cuda").to(dtype)
    token_residual = torch.randn(1, hidden, generator=shared, device="cuda").to(dtype)
    first = None
    for n in _token_counts(hidden):
        pos = (3 * n) // 4
        x = torch.randn(n, hidden, generator=gen, device="cuda").to(dtype)
        residual = torch.randn(n, hidden, generator=shared, device="cuda").to(dtype)
        x[pos], residual[pos] = token[0], token_residual[0]
        for alg in ALGORITHMS:
            outs = layer(pattern, x, residual, alg)
            what = f"{dtype} pattern {int(pattern)} hidden {hidden} batch {n} use_oneshot={alg}"
            row = {name: t[pos].clone() for name, t in outs.items()}
            if first is None:
                first = row  # batch of 1, one-shot
            for name, t in row.items():
                if not _written(t):
                    failures.append(f"{what}: {name} not written")
                elif not _same_bits(t, first[name]):
                    failures.append(f"{what}: {name} of the token differs from the batch of 1")
            _check_ranks(outs, what, failures)


def _rank_deterministic(rank, world, dtype):
    ws = comm.create_allreduce_fusion_workspace(
        "trtllm",
        world_size=world,
        rank=rank,
        max_token_num=WS_TOKENS,
        hidden_dim=WS_HIDDEN,
        dtype=dtype,
        comm_backend=comm.TorchDistBackend(),
        timeout_s=30.0,
    )
    gen = torch.Generator(device="cuda").manual_seed(300 + rank)
    shared = torch.Generator(device="cuda").manual_seed(17)  # the same on every rank
    algorithms, batches = [], []
    for hidden in HIDDENS:
        layer = _Layer(ws, dtype, hidden, shared)
        for pattern in PATTERNS:
            _algorithms_agree(layer, pattern, gen, shared, algorithms)
            _batch_invariant(layer, pattern, gen, shared, batches)
    torch.cuda.synchronize()
    barrier()
    ws.destroy()
    return {"algorithms": algorithms, "batches": batches}


@pytest.fixture(
    scope="module",
    params=[torch.bfloat16, torch.float16, torch.float32],
    ids=["bf16", "fp16", "fp32"],
)
def deterministic_run(request, world_size):
    dtype = request.param
    results = run_ranks(
        _rank_deterministic, world_size, backend="nccl", timeout_s=600, args=(dtype,)
    )
    return dtype, results


def _report(results, part):
    failures = [f"rank {r}: {f}" for r, res in enumerate(results) for f in res[part]]
    head = "\n".join(failures[:20])
    return f"{len(failures)} failure(s), the first 20:\n{head}" if failures else ""


@pytest.mark.gpu(2)
def test_oneshot_and_twoshot_are_bitwise_identical(deterministic_run):
    _, results = deterministic_run
    message = _report(results, "algorithms")
    assert not message, message


@pytest.mark.gpu(2)
def test_batch_invariance(deterministic_run):
    _, results = deterministic_run
    message = _report(results, "batches")
    assert not message, message
