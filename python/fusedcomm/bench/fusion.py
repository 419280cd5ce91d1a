"""Fused all-reduce benchmark: the Lamport family beside NCCL (+ torch RMSNorm) in one run.

bf16, hidden 4096, tokens 1..8192 (8 KiB .. 64 MiB), the way engines call it: one workspace
for the group, ``allreduce_fusion`` with kAllReduce, kARResidualRMSNorm and
kARResidualRMSNormOutFP8Quant, eager and CUDA graph. The unfused row is NCCL's all-reduce, the
residual add and torch's rms_norm. The mnnvl columns run kAllReduce and kARResidualRMSNorm on an
MNNVL workspace (the same kernels over peer-mapped rows, strategy by its 1 MiB rule).

The crossover sweep (``crossover_rank``) times use_oneshot=True against False for kAllReduce
and kARResidualRMSNorm, bf16 and fp16, hidden 4096, 1..8192 tokens, in CUDA graphs, and
reports the first token count at which two-shot is faster.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..enums import AllReduceFusionPattern as P
from ..ops.allreduce_fusion import allreduce_fusion
from .timing import capture, time_graph, time_loop
from .workspace import lamport_workspace

HIDDEN = 4096
TOKENS = (1, 8, 64, 256, 1024, 4096, 8192)
COLUMNS = (
    "ar_eager",
    "ar_graph",
    "nccl_eager",
    "nccl_graph",
    "fused_eager",
    "fused_graph",
    "fused_fp32acc_graph",
    "fp8_graph",
    "unfused_eager",
    "unfused_graph",
    "mnnvl_ar_graph",
    "mnnvl_fused_graph",
)


def _iters(nbytes: int) -> int:
    return 200 if nbytes <= 1 << 20 else (50 if nbytes <= 8 << 20 else 10)


def _timed(fn, iters: int) -> tuple[float, float]:
    return time_loop(fn, iters), time_graph(capture(fn, iters), iters)


def bench_rank(rank: int, world: int, tokens=TOKENS, hidden: int = HIDDEN) -> list[dict]:
    dtype = torch.bfloat16
    ws = lamport_workspace(rank, world, max(tokens), hidden, dtype)
    mws = lamport_workspace(
        rank, world, max(tokens), hidden, dtype, "mnnvl"
    )  # AUTO: the 1 MiB rule
    gen = torch.Generator(device="cuda").manual_seed(7 + rank)
    rows = []
    try:
        gamma = torch.rand(hidden, device="cuda", dtype=dtype, generator=gen) + 0.5
        scale = torch.tensor([0.05], device="cuda")
        for t in tokens:
            x = torch.randint(-8, 8, (t, hidden), device="cuda", generator=gen).to(dtype)
            res = torch.randn(t, hidden, device="cuda", dtype=dtype, generator=gen)
            out, res_out, norm = (torch.empty_like(x) for _ in range(3))
            quant = torch.empty(t, hidden, device="cuda", dtype=torch.float8_e4m3fn)
            iters = _iters(x.numel() * 2)

            def ar():
                allreduce_fusion(input=x, workspace=ws, pattern=P.kAllReduce, output=out)

            norm_args = dict(
                input=x,
                workspace=ws,
                residual_in=res,
                residual_out=res_out,
                norm_out=norm,
                rms_gamma=gamma,
                rms_eps=1e-6,
                launch_with_pdl=True,
            )

            def fused(fp32_acc=False):  # fp32_acc=True: the deterministic setting
                allreduce_fusion(pattern=P.kARResidualRMSNorm, fp32_acc=fp32_acc, **norm_args)

            def fp8():
                allreduce_fusion(
                    pattern=P.kARResidualRMSNormOutFP8Quant,
                    quant_out=quant,
                    scale_factor=scale,
                    **norm_args,
                )

            nccl_buf = x.clone()

            def nccl():
                dist.all_reduce(nccl_buf)

            def unfused():
                y = x.clone()
                dist.all_reduce(y)
                p = y + res
                torch.nn.functional.rms_norm(p, (hidden,), gamma, 1e-6)

            row = {"tokens": t, "bytes": x.numel() * 2}
            row["ar_eager"], row["ar_graph"] = _timed(ar, iters)
            row["nccl_eager"], row["nccl_graph"] = _timed(nccl, iters)
            row["fused_eager"], row["fused_graph"] = _timed(fused, iters)
            row["fused_fp32acc_graph"] = _timed(lambda: fused(True), iters)[1]
            row["fp8_graph"] = _timed(fp8, iters)[1]
            row["unfused_eager"], row["unfused_graph"] = _timed(unfused, iters)
            mnnvl = {"workspace": mws}
            row["mnnvl_ar_graph"] = _timed(
                lambda: allreduce_fusion(input=x, **mnnvl, pattern=P.kAllReduce, output=out),
                iters,
            )[1]
            row["mnnvl_fused_graph"] = _timed(
                lambda: allreduce_fusion(pattern=P.kARResidualRMSNorm, **{**norm_args, **mnnvl}),
                iters,
            )[1]
            ref = x.clone()
            dist.all_reduce(ref)
            ar()
            torch.cuda.synchronize()
            row["exact_vs_nccl"] = bool(torch.equal(out, ref))
            rows.append(row)
            dist.barrier()
    finally:
        torch.cuda.synchronize()
        ws.destroy()
        mws.destroy()
    return rows


def markdown(rows: list[dict]) -> str:
    head = ["tokens", "bytes", *COLUMNS, "AR exact"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        size = r["bytes"]
        size_s = f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"
        cells = [
            str(r["tokens"]),
            size_s,
            *(f"{r[c]:.1f}" for c in COLUMNS),
            "yes" if r["exact_vs_nccl"] else "NO",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# One-shot against two-shot: where the crossover lies (CUDA-graph timing)

CROSSOVER_HIDDEN = 4096
CROSSOVER_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
CROSSOVER_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CROSSOVER_PATTERNS = (P.kAllReduce, P.kARResidualRMSNorm)


def _crossovers(rows: list[dict]) -> list[dict]:
    """Per (dtype, pattern): the first token count at which two-shot is faster (None: never
    within the sweep)."""
    found: dict[tuple[str, int], int | None] = {}
    for r in rows:
        key = (r["dtype"], r["pattern"])
        found.setdefault(key, None)
        if found[key] is None and r["twoshot_us"] < r["oneshot_us"]:
            found[key] = r["tokens"]
    return [{"dtype": d, "pattern": p, "tokens": t} for (d, p), t in found.items()]


def crossover_rank(
    rank: int, world: int, tokens=CROSSOVER_TOKENS, hidden: int = CROSSOVER_HIDDEN
) -> dict:
    """Graph-timed use_oneshot=True against False for kAllReduce and kARResidualRMSNorm at
    every token count where both fit; rows, and the crossover of each (dtype, pattern)."""
    rows = []
    for name, dtype in CROSSOVER_DTYPES.items():
        ws = lamport_workspace(rank, world, max(tokens), hidden, dtype)
        gen = torch.Generator(device="cuda").manual_seed(11 + rank)
        try:
            gamma = (torch.rand(hidden, device="cuda", generator=gen) + 0.5).to(dtype)
            for t in tokens:
                if not ws.is_buffer_size_sufficient(world, t, hidden, dtype, use_oneshot=True):
                    continue  # one-shot does not fit: nothing to compare
                x = torch.randn(t, hidden, device="cuda", generator=gen).to(dtype)
                res = torch.randn(t, hidden, device="cuda", generator=gen).to(dtype)
                out, res_out = torch.empty_like(x), torch.empty_like(x)
                iters = _iters(x.numel() * x.element_size())
                for pattern in CROSSOVER_PATTERNS:
                    tensors = (
                        {"output": out}
                        if pattern == P.kAllReduce
                        else {
                            "residual_in": res,
                            "residual_out": res_out,
                            "norm_out": out,
                            "rms_gamma": gamma,
                        }
                    )
                    row = {"dtype": name, "pattern": int(pattern), "tokens": t}
                    for oneshot in (True, False):

                        def call(oneshot=oneshot, pattern=pattern, tensors=tensors):
                            allreduce_fusion(
                                input=x,
                                workspace=ws,
                                pattern=pattern,
                                use_oneshot=oneshot,
                                launch_with_pdl=True,
                                **tensors,
                            )

                        graph = capture(call, iters)
                        key = "oneshot_us" if oneshot else "twoshot_us"
                        row[key] = time_graph(graph, iters)
                        del graph
                    rows.append(row)
                dist.barrier()
        finally:
            torch.cuda.synchronize()
            ws.destroy()
    return {"hidden": hidden, "world": world, "rows": rows, "crossover": _crossovers(rows)}


def crossover_markdown(result: dict) -> str:
    """The sweep as a table (one-shot / two-shot microseconds per call), then the crossovers."""
    keys = sorted({(r["dtype"], r["pattern"]) for r in result["rows"]})
    cells = {(r["dtype"], r["pattern"], r["tokens"]): r for r in result["rows"]}
    head = ["tokens", *(f"{d} p{p} 1-shot / 2-shot" for d, p in keys)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in sorted({r["tokens"] for r in result["rows"]}):
        row = [str(t)]
        for d, p in keys:
            r = cells.get((d, p, t))
            row.append("-" if r is None else f"{r['oneshot_us']:.1f} / {r['twoshot_us']:.1f}")
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for c in result["crossover"]:
        where = (
            "two-shot is never faster in the sweep"
            if c["tokens"] is None
            else f"two-shot is faster first at {c['tokens']} tokens"
        )
        lines.append(f"- {c['dtype']} pattern {c['pattern']}: {where}")
    return "\n".join(lines)
