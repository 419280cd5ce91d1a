"""allreduce_fusion over a matrix of calls, each compared with fusedcomm.reference:

    pattern   {0, 1, 2, 4, 10, 11}
    algorithm use_oneshot in {True, False, None}
    tokens    {1, 3, 16, 127, 128, 1000, max}   (max: the workspace's capacity for the hidden)
    hidden    {1024, 2880, 4096, 7168, 8192}

for bf16, fp16 and fp32, with fp32_acc and weight_bias alternating over the cases. One launch of
ranks per dtype loops over the whole matrix with one workspace (capacity 2048 tokens of 8192),
poisons the outputs before every call, checks that every rank holds the same bits and collects
every failure; the test reports how many cases failed and lists the first 20.

The checks are those of test_fusion_gpu._check_fused (exact where the kernels fix the order of
every operation: the sum and the residual add, the quantiser applied to the stored norm; a
tolerance for the RMSNorm and what follows from it), computed on the GPU: the references of
the largest cases would take seconds each on the CPU.
"""

import pytest
import torch

import fusedcomm as comm
from fusedcomm.reference.fusion import (
    allreduce_fusion_reference,
    quantize_fp8_dynamic,
    quantize_fp8_static,
)
from fusedcomm.testing.dist import barrier, gather_all, run_ranks
from test_fusion_gpu import _poison, _same_on_every_rank

WS_HIDDEN, WS_TOKENS = 8192, 2048
CAPACITY = WS_HIDDEN * WS_TOKENS  # elements: max tokens = CAPACITY // hidden
HIDDENS = (1024, 2880, 4096, 7168, 8192)
TOKENS = (1, 3, 16, 127, 128, 1000)
PATTERNS = (0, 1, 2, 4, 10, 11)
ALGORITHMS = (True, False, None)
EPS = 1e-6
OUTS = {
    0: ("output",),
    1: ("residual_out", "norm_out"),
    2: ("residual_out", "quant_out"),
    4: ("residual_out", "norm_out", "quant_out"),
    10: ("residual_out", "quant_out", "scale_out"),
    11: ("residual_out", "norm_out", "quant_out", "scale_out"),
}
TOL = {torch.float16: 2.0**-9, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-20}


def _outputs(pattern, n, hidden, dtype):
    out = {}
    for name in OUTS[pattern]:
        if name == "quant_out":
            t = torch.empty(n, hidden, dtype=torch.float8_e4m3fn, device="cuda")
        elif name == "scale_out":
            t = torch.empty(n, 1, dtype=torch.float32, device="cuda")
        else:
            t = torch.empty(n, hidden, dtype=dtype, device="cuda")
        _poison(t)
        out[name] = t
    return out


def _short(exc):
    """An assertion message on one line."""
    text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text[:240]


def _close(got, want, rtol, atol):
    """None if close, else why not."""
    try:
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    except AssertionError as exc:
        return _short(exc)
    return None


def _close_fp8(got, want, max_fraction):
    """FP8 codes within one E4M3 step, and at most ``max_fraction`` of them differing."""
    g, w = got.float(), want.float()
    why = _close(g, w, 0.126, 2.0**-8)
    if why:
        return why
    frac = (g != w).float().mean().item()
    return f"{frac:.4f} of the FP8 codes differ" if frac > max_fraction else None


def _reference(xs, pattern, case, fp32_acc):
    return allreduce_fusion_reference(
        xs,
        pattern,
        residual_in=case["residual"],
        rms_gamma=case["gamma"],
        rms_eps=EPS,
        scale_factor=case["scale"],
        weight_bias=case["weight_bias"],
        fp32_acc=fp32_acc,
    )


def _problems(pattern, got, xs, case, dtype):
    """What is wrong with one call's outputs (``got``, CUDA) against the reference of the
    gathered inputs ``xs``; mirrors test_fusion_gpu._check_fused on the GPU."""
    acc = case["fp32_acc"]
    ref = _reference(xs, pattern, case, acc)
    name, key = ("output", "allreduce_out") if pattern == 0 else ("residual_out", "residual_out")
    if not acc and len(xs) > 2 and not torch.equal(got[name], ref[key]):
        alt = _reference(xs, pattern, case, True)  # the sum may be kept in fp32 anyway
        if torch.equal(got[name], alt[key]):
            ref = alt
    problems = []
    if not torch.equal(got[name], ref[key]):  # fixed order: exact
        wrong = int((got[name] != ref[key]).sum().item())
        problems.append(f"{name}: {wrong} of {got[name].numel()} elements differ (exact)")
    tol = TOL[dtype]
    checks = []
    if "norm_out" in got:
        checks.append(
            ("norm_out", _close(got["norm_out"].float(), ref["norm_out"].float(), tol, 1e-5))
        )
    if "quant_out" in got:
        checks.append(("quant_out", _close_fp8(got["quant_out"], ref["quant_out"], 0.05)))
    if "scale_out" in got:
        checks.append(("scale_out", _close(got["scale_out"], ref["scale_out"], tol, 0.0)))
    if "norm_out" in got and "quant_out" in got:  # the quantiser reads the stored norm
        y = got["norm_out"]
        if "scale_out" in got:
            q, s = quantize_fp8_dynamic(y)  # divides by tensors: the correctly rounded quotient
            if not torch.equal(got["scale_out"], s):
                checks.append(("scale_out from norm_out", "differs (exact)"))
        else:
            q = quantize_fp8_static(y, case["scale"])
        checks.append(("quant_out from norm_out", _close_fp8(got["quant_out"], q, 0.001)))
    problems += [f"{what}: {why}" for what, why in checks if why]
    return problems


def _gather(x):
    return gather_all(x)  # the workspace's ranks are the default group's


def _run_case(ws, pattern, n, hidden, oneshot, case, dtype, gen, shared):
    """One call; a list of failures. Every rank makes the same collective calls whatever
    happens (a call that raises still gathers and compares)."""
    x = torch.randn(n, hidden, generator=gen, device="cuda").to(dtype)
    case["residual"] = torch.randn(n, hidden, generator=shared, device="cuda").to(dtype)
    outs = _outputs(pattern, n, hidden, dtype)
    extra = {}
    if pattern != 0:
        extra = dict(
            residual_in=case["residual"],
            rms_gamma=case["gamma"],
            scale_factor=case["scale"],
            weight_bias=case["weight_bias"],
        )
    error = None
    try:
        comm.allreduce_fusion(
            x,
            ws,
            pattern,
            use_oneshot=oneshot,
            fp32_acc=case["fp32_acc"],
            rms_eps=EPS,
            **extra,
            **outs,
        )
    except Exception as exc:  # recorded; the other ranks raise alike (same arguments)
        error = f"{type(exc).__name__}: {exc}"
    xs = _gather(x)
    failures = [
        f"ranks disagree on {name}" for name, t in outs.items() if not _same_on_every_rank(t)
    ]
    if error is not None:
        return failures + [error]
    return failures + _problems(pattern, outs, xs, case, dtype)


def _rank_matrix(rank, world, dtype):
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
    gen = torch.Generator(device="cuda").manual_seed(500 + rank)
    shared = torch.Generator(device="cuda").manual_seed(23)  # the same on every rank
    failures, cases = [], 0
    for hi, hidden in enumerate(HIDDENS):
        gamma = (1 + 0.1 * torch.randn(hidden, generator=shared, device="cuda")).to(dtype)
        for ti, n in enumerate((*TOKENS, CAPACITY // hidden)):
            case = {
                "gamma": gamma,
                "scale": torch.full((1,), 0.5 + 0.125 * (ti % 4), device="cuda"),
                "fp32_acc": (hi + ti) % 2 == 0,
                "weight_bias": float(hi % 2),
            }
            for pattern in PATTERNS:
                for oneshot in ALGORITHMS:
                    what = (
                        f"pattern {pattern} use_oneshot={oneshot} n={n} hidden={hidden} "
                        f"fp32_acc={case['fp32_acc']} weight_bias={case['weight_bias']}"
                    )
                    problems = _run_case(ws, pattern, n, hidden, oneshot, case, dtype, gen, shared)
                    failures += [f"{what}: {p}" for p in problems]
                    cases += 1
    torch.cuda.synchronize()
    barrier()
    ws.destroy()
    return cases, failures


@pytest.mark.gpu(2)
@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"]
)
def test_fusion_matrix(world_size, dtype):
    results = run_ranks(_rank_matrix, world_size, backend="nccl", timeout_s=600, args=(dtype,))
    cases = results[0][0]
    failures = [f"rank {r}: {f}" for r, (_, fails) in enumerate(results) for f in fails]
    head = "\n".join(failures[:20])
    assert not failures, (
        f"{len(failures)} failure(s) in {cases} cases per rank; the first 20:\n{head}"
    )
