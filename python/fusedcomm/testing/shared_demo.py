"""Two ranks on one GPU: a fused all-reduce and a MoE all-to-all round, checked, not timed.

``python -m fusedcomm.testing.shared_demo [--world N]`` starts N ranks (default 2) through
:func:`fusedcomm.testing.dist.run_ranks`. Where fewer GPUs than ranks are visible the ranks
share a GPU: each maps the others' memory, their kernels time-slice, and every protocol step
runs as it does across GPUs. So the results are checked against ``fusedcomm.reference``, but
no time is printed: the ranks take turns on one GPU, and a timing would mean nothing.
"""

from __future__ import annotations

import argparse
import sys

import torch

HIDDEN = 4096
TOKENS = 16
EXPERTS, TOP_K = 32, 4


def _fused_allreduce(rank: int, world: int) -> str:
    from .. import AllReduceFusionPattern as P
    from .. import allreduce_fusion
    from ..bench.workspace import lamport_workspace
    from ..reference.fusion import allreduce_fusion_reference
    from .dist import gather_all

    dtype = torch.bfloat16
    shared = torch.Generator(device="cuda").manual_seed(7)  # the same on every rank
    mine = torch.Generator(device="cuda").manual_seed(100 + rank)
    x = torch.randn(TOKENS, HIDDEN, generator=mine, device="cuda").to(dtype)
    residual = torch.randn(TOKENS, HIDDEN, generator=shared, device="cuda").to(dtype)
    gamma = torch.rand(HIDDEN, generator=shared, device="cuda").to(dtype) + 0.5
    outs = {
        "residual_out": torch.full_like(x, float("nan")),
        "norm_out": torch.full_like(x, float("nan")),
    }
    ws = lamport_workspace(rank, world, 64, HIDDEN, dtype)
    try:
        allreduce_fusion(
            x,
            ws,
            P.kARResidualRMSNorm,
            residual_in=residual,
            rms_gamma=gamma,
            fp32_acc=True,
            **outs,
        )
        torch.cuda.synchronize()
        want = allreduce_fusion_reference(
            gather_all(x), P.kARResidualRMSNorm, residual_in=residual, rms_gamma=gamma
        )
        for name, got in outs.items():
            if not torch.equal(got, want[name]):
                bad = int((got != want[name]).sum())
                raise AssertionError(f"fused all-reduce: {name} differs in {bad} elements")
    finally:
        ws.destroy()
    return f"AR + residual + RMSNorm, {TOKENS} tokens x {HIDDEN} bf16: equal to the reference"


def _moe_round(rank: int, world: int) -> str:
    from .. import moe_a2a_get_workspace_size_per_rank
    from ..mapping import Mapping
    from ..ops.moe_alltoall import MoeAlltoAll
    from ..reference.moe_a2a import expert_owner

    gen = torch.Generator(device="cuda").manual_seed(300 + rank)
    keys = torch.rand(TOKENS, EXPERTS, generator=gen, device="cuda")
    experts = keys.argsort(dim=1)[:, :TOP_K].to(torch.int32).contiguous()
    # small integers: every sum below is exact in bf16, so the check is torch.equal
    hidden = torch.randint(-8, 9, (TOKENS, HIDDEN), generator=gen, device="cuda").bfloat16()
    size = moe_a2a_get_workspace_size_per_rank(world, TOKENS, TOP_K * 4 + HIDDEN * 2, HIDDEN * 2)
    a2a = MoeAlltoAll(
        Mapping(world, rank, tp_size=world, moe_ep_size=world),
        TOKENS,
        TOP_K,
        EXPERTS,
        workspace_size_per_rank=size,
    )
    received = a2a.dispatch(experts, [experts, hidden], TOKENS)
    y = (received[1].float() * 2).bfloat16()  # the "experts": double every received row
    out = a2a.combine(y, TOKENS)
    torch.cuda.synchronize()
    owners = expert_owner(experts, EXPERTS, world)
    ranks_hit = torch.stack([(owners == q).any(dim=1) for q in range(world)]).sum(0)
    want = (hidden.float() * 2 * ranks_hit[:, None].float()).bfloat16()
    if not torch.equal(out, want):
        raise AssertionError(
            f"MoE all-to-all: combine differs in {int((out != want).sum())} elements"
        )
    return (
        f"MoE all-to-all round, {TOKENS} tokens, top-{TOP_K} of {EXPERTS}: dispatch + combine "
        "equal to the expected sums"
    )


def _rank(rank: int, world: int) -> list[str]:
    return [_fused_allreduce(rank, world), _moe_round(rank, world)]


def main(argv: list[str] | None = None) -> int:
    from .dist import RankFailure, RankTimeout, ranks_share_gpu, run_ranks, visible_gpus

    parser = argparse.ArgumentParser(prog="python -m fusedcomm.testing.shared_demo")
    parser.add_argument("--world", type=int, default=2, help="ranks (default 2)")
    world = parser.parse_args(argv).world
    gpus = visible_gpus()
    if gpus < 1:
        print("shared_demo: no CUDA GPU visible; nothing to run", file=sys.stderr)
        return 1
    how = "share GPU 0" if ranks_share_gpu(world, gpus) else "have a GPU each"
    print(f"shared_demo: {world} ranks, {gpus} GPU(s) visible: the ranks {how}")
    try:
        lines = run_ranks(_rank, world, backend="nccl", timeout_s=600)[0]
    except (RankFailure, RankTimeout) as exc:
        print(f"shared_demo: FAILED\n{exc}", file=sys.stderr)
        return 1
    for line in lines:
        print(f"  ok: {line}")
    print("shared_demo: no timings: ranks that share a GPU take turns on it (correctness only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
