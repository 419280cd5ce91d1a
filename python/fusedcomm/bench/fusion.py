"""Fused all-reduce benchmark: the Lamport family beside NCCL (+ torch RMSNorm) in one run.

bf16, hidden 4096, tokens 1..8192 (8 KiB .. 64 MiB), the way engines call it: one workspace
for the group, ``allreduce_fusion`` with kAllReduce, kARResidualRMSNorm and
kARResidualRMSNormOutFP8Quant, eager and CUDA graph. The unfused row is NCCL's all-reduce, the
residual add and torch's rms_norm.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..enums import AllReduceFusionPattern as P
from ..ops.allreduce_fusion import allreduce_fusion
from ..runtime.comm_backend import TorchDistBackend
from ..runtime.fusion_workspace import create_allreduce_fusion_workspace
from .timing import capture, time_graph, time_loop

HIDDEN = 4096
TOKENS = (1, 8, 64, 256, 1024, 4096, 8192)
COLUMNS = (
    "ar_eager",
    "ar_graph",
    "nccl_eager",
    "nccl_graph",
    "fused_eager",
    "fused_graph",
    "fp8_graph",
    "unfused_eager",
    "unfused_graph",
)


def _iters(nbytes: int) -> int:
    return 200 if nbytes <= 1 << 20 else (50 if nbytes <= 8 << 20 else 10)


def _timed(fn, iters: int) -> tuple[float, float]:
    return time_loop(fn, iters), time_graph(capture(fn, iters), iters)


def bench_rank(rank: int, world: int, tokens=TOKENS, hidden: int = HIDDEN) -> list[dict]:
    dtype = torch.bfloat16
    ws = create_allreduce_fusion_workspace(
        backend="trtllm",
        world_size=world,
        rank=rank,
        max_token_num=max(tokens),
        hidden_dim=hidden,
        dtype=dtype,
        comm_backend=TorchDistBackend(),
    )
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

            def fused():
                allreduce_fusion(
                    input=x,
                    workspace=ws,
                    pattern=P.kARResidualRMSNorm,
                    residual_in=res,
                    residual_out=res_out,
                    norm_out=norm,
                    rms_gamma=gamma,
                    rms_eps=1e-6,
                    launch_with_pdl=True,
                )

            def fp8():
                allreduce_fusion(
                    input=x,
                    workspace=ws,
                    pattern=P.kARResidualRMSNormOutFP8Quant,
                    residual_in=res,
                    residual_out=res_out,
                    norm_out=norm,
                    quant_out=quant,
                    rms_gamma=gamma,
                    rms_eps=1e-6,
                    scale_factor=scale,
                    launch_with_pdl=True,
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
            row["fp8_graph"] = _timed(fp8, iters)[1]
            row["unfused_eager"], row["unfused_graph"] = _timed(unfused, iters)
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
