"""Benchmark of the mixed-communication modes beside each other, in one run on the same GPUs.

Layouts: TP = the world (ALLREDUCE), and TP 2 x DP world/2 when the world is 4 or more (AR+AG,
RS+AR). bf16 rows of 8 KiB, local bytes per rank (of x_in, per DP block for the reduce-scatter
ops) from 8 KiB to 8 MiB. Per size and mode, microseconds per call (median of 5 timed loops,
CUDA events; the slowest rank), eager and in CUDA graphs. Correctness guard: after the timed
loops every fused mode runs once more on fresh inputs and is compared with the rank-order
reference (bit for bit, up to the sign of zero); a mismatch reports ``WRONG``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .timing import capture, time_graph, time_loop

LOCAL_BYTES = tuple(8192 << i for i in range(0, 11, 2))  # 8 KiB .. 8 MiB
QUICK_BYTES = (8192, 131072, 1048576)
HIDDEN = 4096  # bf16: 8 KiB rows
ITERS = 20


def _slowest(us: float) -> float:
    t = torch.tensor([us], dtype=torch.float64, device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _inputs(seed: int, world: int, rows: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [
        (torch.rand((rows, HIDDEN), generator=gen, device="cuda") - 0.5).to(torch.bfloat16)
        for _ in range(world)
    ]


def _correct(h, op, mode, rank: int, world: int, rows: int) -> bool:
    from ..mixed_comm import run_mixed_comm
    from ..reference import mixed_comm_reference

    xs = _inputs(1000 + rows, world, rows)
    got = run_mixed_comm(op, h, xs[rank], mode=mode)
    want = mixed_comm_reference(op, xs, h.para_info.of)[rank]
    ok = torch.equal((got + 0.0).view(torch.int16), (want + 0.0).view(torch.int16))
    flag = torch.tensor([0 if ok else 1], device="cuda")
    dist.all_reduce(flag)
    return int(flag.item()) == 0


def bench_rank(rank: int, world: int, sizes=LOCAL_BYTES) -> list[dict]:
    from ..mixed_comm import MixedCommHandler, MixedCommMode, MixedCommOp, run_mixed_comm

    splits = [(world, 1)] + ([(2, world // 2)] if world >= 4 and world % 2 == 0 else [])
    device = torch.device("cuda", torch.cuda.current_device())
    rows_out = []
    for tp, dp in splits:
        h = MixedCommHandler(rank, world, rank, world, 0, 1, tp, dp, None, None, torch.bfloat16,
                             device, use_autotune=False)  # fmt: skip
        modes = [m for m in h.valid_mode_list if m != MixedCommMode.AUTOTUNE]
        for op in h.valid_op_list:
            scatter = op in (MixedCommOp.REDUCESCATTER, MixedCommOp.REDUCESCATTER_ALLREDUCE)
            for size in sizes:
                rows = size // (2 * HIDDEN) * (dp if scatter else 1)
                x = _inputs(size, world, rows)[rank]
                for mode in modes:
                    out = run_mixed_comm(op, h, x, mode=mode)

                    def call(op=op, x=x, out=out, mode=mode):
                        run_mixed_comm(op, h, x, out, mode)

                    row = {"tp": tp, "dp": dp, "op": op.name, "mode": mode.name, "bytes": size}
                    row["eager_us"] = _slowest(time_loop(call, ITERS))
                    dist.barrier()
                    row["graph_us"] = _slowest(time_graph(capture(call, ITERS), ITERS))
                    torch.cuda.synchronize()
                    dist.barrier()
                    fused = mode.name.startswith("FUSED")
                    row["correct"] = not fused or _correct(h, op, mode, rank, world, rows)
                    rows_out.append(row)
        torch.cuda.synchronize()
        h.shutdown()
    return rows_out


def run(world: int, sizes=LOCAL_BYTES) -> list[dict]:
    from ..testing.dist import run_ranks

    return run_ranks(bench_rank, world, backend="nccl", timeout_s=900, args=(sizes,))[0]


def markdown(rows: list[dict]) -> str:
    lines = [
        "| tp x dp | op | local bytes | mode | eager | graph |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['tp']} x {r['dp']} | {r['op']} | {r['bytes']} | {r['mode']} |"
        if not r["correct"]:
            lines.append(f"{head} WRONG | |")
            continue
        lines.append(f"{head} {r['eager_us']:.1f} | {r['graph_us']:.1f} |")
    return "\n".join(lines)
