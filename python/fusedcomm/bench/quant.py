"""Benchmark of the block-quantised fused patterns against the unquantised fused pattern and
against the unfused sequence (NCCL all-reduce + add + torch RMSNorm + a torch quantiser).

Per (hidden, tokens), bf16: microseconds per call, eager and in CUDA graphs, for
kARResidualRMSNorm (1), NVFP4 with norm_out (5, SWIZZLED_128x4) and per-token-group FP8 with
norm_out (9, groups of 128); the unfused rows run in CUDA graphs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..enums import AllReduceFusionPattern as P
from ..ops.allreduce_fusion import allreduce_fusion
from ..reference.quant import scale_factor_buffer_size
from .timing import capture, time_graph, time_loop
from .workspace import lamport_workspace

HIDDENS = (4096, 7168)
TOKENS = (1, 16, 128, 1024, 4096)
GROUP = 128
COLUMNS = (
    ("fused_graph", "AR+RMSNorm graph"),
    ("nvfp4_graph", "NVFP4 graph"),
    ("group_graph", "group FP8 graph"),
    ("fused_eager", "AR+RMSNorm eager"),
    ("nvfp4_eager", "NVFP4 eager"),
    ("group_eager", "group FP8 eager"),
    ("unfused_nvfp4_graph", "unfused NVFP4 graph"),
    ("unfused_group_graph", "unfused group FP8 graph"),
)
_E2M1_STEPS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def _torch_nvfp4(
    y: torch.Tensor, g: torch.Tensor, steps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A plain-torch NVFP4 quantiser (what an engine would run without the fusion); ``steps``:
    the E2M1 decision points on the device (graph capture copies nothing from the host)."""
    b = y.float().reshape(y.shape[0], -1, 16)
    sf = (g * (b.abs().amax(-1, keepdim=True) / 6)).to(torch.float8_e4m3fn)
    k = torch.where(sf.float() != 0, g / sf.float(), torch.zeros_like(sf.float()))
    v = b * k
    codes = torch.bucketize(v.abs(), steps).to(torch.uint8) | ((v < 0).to(torch.uint8) << 3)
    codes = codes.reshape(y.shape[0], -1)
    return codes[:, 0::2] | (codes[:, 1::2] << 4), sf.view(torch.uint8)


def _torch_group_fp8(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A plain-torch per-token-group FP8 quantiser with power-of-two scales."""
    b = y.float().reshape(y.shape[0], -1, GROUP)
    s = (b.abs().amax(-1, keepdim=True) / 448).clamp_min(1e-10)
    s = torch.exp2(torch.ceil(torch.log2(s)))
    return (b / s).to(torch.float8_e4m3fn), s


def _iters(nbytes: int) -> int:
    return 200 if nbytes <= 1 << 20 else (50 if nbytes <= 8 << 20 else 10)


def bench_rank(rank: int, world: int, tokens=TOKENS, hiddens=HIDDENS) -> list[dict]:
    dtype = torch.bfloat16
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(11 + rank)
    for hidden in hiddens:
        ws = lamport_workspace(rank, world, max(tokens), hidden, dtype)
        try:
            gamma = torch.rand(hidden, device="cuda", dtype=dtype, generator=gen) + 0.5
            g = torch.tensor([448 * 6 / 8.0], device="cuda")
            for t in tokens:
                rows.append(_bench_one(ws, t, hidden, gamma, g, gen))
                dist.barrier()
        finally:
            torch.cuda.synchronize()
            ws.destroy()
    return rows


def _bench_one(ws, t, hidden, gamma, g, gen) -> dict:
    dtype = torch.bfloat16
    x = torch.randn(t, hidden, device="cuda", dtype=dtype, generator=gen)
    res = torch.randn(t, hidden, device="cuda", dtype=dtype, generator=gen)
    res_out, norm = torch.empty_like(x), torch.empty_like(x)
    q4 = torch.empty(t, hidden // 2, device="cuda", dtype=torch.uint8)
    sf4 = torch.empty(
        scale_factor_buffer_size(t, hidden // 16, 0), device="cuda", dtype=torch.uint8
    )
    q8 = torch.empty(t, hidden, device="cuda", dtype=torch.float8_e4m3fn)
    k, m = (hidden // GROUP + 3) // 4, (t + 3) // 4 * 4
    sf8 = torch.empty(t + (k - 1) * m, device="cuda", dtype=torch.int32).as_strided((t, k), (1, m))
    common = dict(
        input=x, workspace=ws, residual_in=res, residual_out=res_out, norm_out=norm,
        rms_gamma=gamma, rms_eps=1e-6, launch_with_pdl=True,
    )  # fmt: skip

    def fused():
        allreduce_fusion(pattern=P.kARResidualRMSNorm, **common)

    def nvfp4():
        allreduce_fusion(
            pattern=P.kARResidualRMSNormOutFP4Quant, quant_out=q4, scale_out=sf4,
            scale_factor=g, layout_code=0, **common,
        )  # fmt: skip

    def group():
        allreduce_fusion(
            pattern=P.kARResidualRMSNormOutPerTokenGroupFP8PackedQuant, quant_out=q8,
            scale_out=sf8, block_quant_group_size=GROUP, **common,
        )  # fmt: skip

    def unfused(quantise):
        def run():
            y = x.clone()
            dist.all_reduce(y)
            p = y + res
            quantise(torch.nn.functional.rms_norm(p, (hidden,), gamma, 1e-6))

        return run

    iters = _iters(x.numel() * 2)
    row = {"tokens": t, "hidden": hidden}
    for name, fn in (("fused", fused), ("nvfp4", nvfp4), ("group", group)):
        row[f"{name}_eager"] = time_loop(fn, iters)
        row[f"{name}_graph"] = time_graph(capture(fn, iters), iters)
    steps = torch.tensor(_E2M1_STEPS, device="cuda")
    unfused_nvfp4 = unfused(lambda y: _torch_nvfp4(y, g, steps))
    row["unfused_nvfp4_graph"] = time_graph(capture(unfused_nvfp4, iters), iters)
    row["unfused_group_graph"] = time_graph(capture(unfused(_torch_group_fp8), iters), iters)
    return row


def markdown(rows: list[dict]) -> str:
    head = ["hidden", "tokens", *(title for _, title in COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["hidden"]), str(r["tokens"]), *(f"{r[c]:.1f}" for c, _ in COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
