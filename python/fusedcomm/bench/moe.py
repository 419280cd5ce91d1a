"""Benchmark of the MoE fusions against the unfused sequence an engine would run instead
(torch gather / scale / sum, NCCL all-reduce, add, torch RMSNorm) and against our plain fused
AR + residual + RMSNorm at the same token count.

bf16, hidden 7168, CUDA graphs, microseconds per call: MoE finalize (pattern 7) with top-8
and MoE reduction (pattern 6) with 32 experts per device. ``read_us`` is the time to read the
expert rows once at the measured device bandwidth of a plain copy (the floor the prologue adds).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..enums import AllReduceFusionPattern as P
from ..ops.allreduce_fusion import allreduce_fusion
from ..ops.moe_fusion import trtllm_moe_allreduce_fusion, trtllm_moe_finalize_allreduce_fusion
from .timing import capture, time_graph
from .workspace import lamport_workspace

HIDDEN = 7168
TOKENS = (1, 16, 128, 1024, 4096)
TOP_K = 8
EXPERTS = 32
COLUMNS = (
    ("plain_fused", "AR+RMSNorm (p1)"),
    ("finalize", "finalize (p7)"),
    ("finalize_unfused", "finalize unfused"),
    ("finalize_read", "p7 rows read once"),
    ("reduction", "reduction (p6)"),
    ("reduction_unfused", "reduction unfused"),
    ("reduction_read", "p6 rows read once"),
)


def _iters(nbytes: int) -> int:
    return 100 if nbytes <= 1 << 20 else (20 if nbytes <= 64 << 20 else 5)


def _graph_us(fn, iters: int) -> float:
    return time_graph(capture(fn, iters), iters)


def _copy_gbps() -> float:
    """Device-memory read+write bandwidth of a plain copy (bytes moved per second / 1e9)."""
    src = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = _graph_us(lambda: dst.copy_(src), 5)
    return 2 * src.numel() / (us * 1e3)


def bench_rank(rank: int, world: int, tokens=TOKENS) -> list[dict]:
    dtype, d = torch.bfloat16, HIDDEN
    ws = lamport_workspace(rank, world, max(tokens), d, dtype)
    gen = torch.Generator(device="cuda").manual_seed(13 + rank)
    gbps = _copy_gbps()
    rows = []
    try:
        gamma = torch.rand(d, device="cuda", dtype=dtype, generator=gen) + 0.5
        for n in tokens:
            rows.append(_bench_tokens(ws, rank, world, n, gamma, gen, gbps))
            dist.barrier()
    finally:
        torch.cuda.synchronize()
        ws.destroy()
    return rows


def _bench_tokens(ws, rank, world, n, gamma, gen, gbps) -> dict:
    dtype, d = torch.bfloat16, HIDDEN
    table = ws.workspace_tensor
    x = torch.randn(n, d, device="cuda", dtype=dtype, generator=gen)
    res = torch.randn(n, d, device="cuda", dtype=dtype, generator=gen)
    res_out, norm = torch.empty_like(x), torch.empty_like(x)
    permuted = torch.randn(n * TOP_K, d, device="cuda", dtype=dtype, generator=gen)
    idx = torch.randperm(n * TOP_K, device="cuda", generator=gen).reshape(n, TOP_K).int()
    weights = torch.rand(n, TOP_K, device="cuda", dtype=dtype, generator=gen)
    experts = torch.randn(EXPERTS, n, d, device="cuda", dtype=dtype, generator=gen)
    scales = torch.rand(EXPERTS, n, device="cuda", generator=gen)
    token_in = torch.randn(n, d, device="cuda", dtype=dtype, generator=gen)
    iters = _iters(experts.numel() * 2)

    def plain():
        allreduce_fusion(
            input=x, workspace=ws, pattern=P.kARResidualRMSNorm, residual_in=res,
            residual_out=res_out, norm_out=norm, rms_gamma=gamma, launch_with_pdl=True,
        )  # fmt: skip

    def finalize():
        trtllm_moe_finalize_allreduce_fusion(
            permuted, res, gamma, idx, norm, res_out, None, None, table, True, rank, world,
            1e-6, None, weights, None,
        )  # fmt: skip

    def finalize_unfused():
        rows = permuted[idx.reshape(-1).long()].reshape(n, TOP_K, d)
        y = (rows * weights.unsqueeze(-1)).sum(dim=1)
        dist.all_reduce(y)
        torch.nn.functional.rms_norm(y + res, (d,), gamma, 1e-6)

    def reduction():
        trtllm_moe_allreduce_fusion(
            world, rank, n, d, table, True, res, gamma, 1e-6, 1.0, EXPERTS, scales, experts,
            token_in, 0, None, res_out, norm, None, None,
        )  # fmt: skip

    def reduction_unfused():
        y = (experts * scales.unsqueeze(-1).to(dtype)).sum(dim=0) + token_in
        dist.all_reduce(y)
        torch.nn.functional.rms_norm(y + res, (d,), gamma, 1e-6)

    row = {"tokens": n, "hidden": d, "copy_GBps": gbps}
    for name, fn in (
        ("plain_fused", plain),
        ("finalize", finalize),
        ("finalize_unfused", finalize_unfused),
        ("reduction", reduction),
        ("reduction_unfused", reduction_unfused),
    ):
        row[name] = _graph_us(fn, iters)
    row["finalize_read"] = n * TOP_K * d * 2 / (gbps * 1e3)  # bytes at the copy's GB/s
    row["reduction_read"] = EXPERTS * n * d * 2 / (gbps * 1e3)
    return row


def markdown(rows: list[dict]) -> str:
    head = ["tokens", *(title for _, title in COLUMNS), "p7 speed-up", "p6 speed-up"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["tokens"]), *(f"{r[c]:.1f}" for c, _ in COLUMNS)]
        cells.append(f"{r['finalize_unfused'] / r['finalize']:.2f}x")
        cells.append(f"{r['reduction_unfused'] / r['reduction']:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
