"""Benchmark of the DCP all-to-all beside an NCCL ``all_to_all_single`` of the same bytes, in one
run on the same GPUs (cp_size = the world).

Shapes: bf16 ``partial_o [B, cp, Dv]`` with Dv 128 and 512, fp32 stats ``[B, cp, 2]``, batch
``B`` from 1 to 128. Per size, microseconds per call (median of 5 timed loops, CUDA events; the
slowest rank), eager and in CUDA graphs. NCCL moves the same bytes as one ``uint8 [cp, B * (2 Dv
+ 8)]`` buffer, already laid out by destination: no transposes, so its time is a lower bound of
an NCCL implementation of the op. Correctness guard: after the timed loops ours runs once more
on fresh random bits and is compared exactly with the reference; a mismatch reports ``WRONG``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .timing import capture, time_graph, time_loop

BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
QUICK_BATCHES = (1, 16, 128)
DVS = (128, 512)
STATS = 2
ITERS = 50


def _inputs(seed: int, world: int, batch: int, dv: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    po = [
        torch.randint(
            -32768, 32767, (batch, world, dv), generator=gen, device="cuda", dtype=torch.int16
        ).view(torch.bfloat16)
        for _ in range(world)
    ]
    ss = [
        torch.randint(
            -(2**31),
            2**31 - 1,
            (batch, world, STATS),
            generator=gen,
            device="cuda",
            dtype=torch.int32,
        ).view(torch.float32)
        for _ in range(world)
    ]
    return po, ss


def _slowest(us: float) -> float:
    t = torch.tensor([us], dtype=torch.float64, device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _correct(ws, rank: int, world: int, batch: int, dv: int) -> bool:
    from .. import decode_cp_a2a_alltoall
    from ..reference import dcp_alltoall_reference

    po, ss = _inputs(1000 + batch + dv, world, batch, dv)
    o, s = decode_cp_a2a_alltoall(po[rank], ss[rank], ws, rank, world)
    want_o, want_s = dcp_alltoall_reference(po, ss)
    ok = torch.equal(o.view(torch.int16), want_o[rank].view(torch.int16)) and torch.equal(
        s.view(torch.int32), want_s[rank].view(torch.int32)
    )
    flag = torch.tensor([0 if ok else 1], device="cuda")
    dist.all_reduce(flag)
    return int(flag.item()) == 0


def bench_rank(rank: int, world: int, batches=BATCHES) -> list[dict]:
    from .. import (
        Mapping,
        decode_cp_a2a_allocate_mnnvl_workspace,
        decode_cp_a2a_alltoall,
        decode_cp_a2a_init_workspace,
    )

    mapping = Mapping(world, rank, cp_size=world)
    ws = decode_cp_a2a_allocate_mnnvl_workspace(mapping)
    decode_cp_a2a_init_workspace(ws, rank, world)
    torch.cuda.synchronize()
    dist.barrier()
    rows = []
    for dv in DVS:
        for batch in batches:
            po, ss = _inputs(batch + dv, world, batch, dv)
            out = (torch.empty_like(po[rank]), torch.empty_like(ss[rank]))

            def ours(po=po, ss=ss, out=out):
                decode_cp_a2a_alltoall(po[rank], ss[rank], ws, rank, world, out=out)

            entry = 2 * dv + 4 * STATS
            send = torch.randint(0, 255, (world, batch * entry), dtype=torch.uint8, device="cuda")
            recv = torch.empty_like(send)

            def nccl(send=send, recv=recv):
                dist.all_to_all_single(recv, send)

            row = {"dv": dv, "batch": batch, "bytes_per_peer": batch * entry}
            row["ours_us"] = _slowest(time_loop(ours, ITERS))
            row["nccl_us"] = _slowest(time_loop(nccl, ITERS))
            dist.barrier()
            row["ours_graph_us"] = _slowest(time_graph(capture(ours, ITERS), ITERS))
            dist.barrier()
            row["nccl_graph_us"] = _slowest(time_graph(capture(nccl, ITERS), ITERS))
            torch.cuda.synchronize()
            dist.barrier()
            row["correct"] = _correct(ws, rank, world, batch, dv)
            rows.append(row)
    return rows


def run(world: int, batches=BATCHES) -> list[dict]:
    from ..testing.dist import run_ranks

    return run_ranks(bench_rank, world, backend="nccl", timeout_s=900, args=(batches,))[0]


def markdown(rows: list[dict]) -> str:
    lines = [
        "| Dv | batch | bytes per peer | ours | NCCL | ours (graph) | NCCL (graph) | NCCL / ours (graph) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if not r["correct"]:
            lines.append(f"| {r['dv']} | {r['batch']} | {r['bytes_per_peer']} | WRONG | | | | |")
            continue
        ratio = r["nccl_graph_us"] / r["ours_graph_us"]
        lines.append(
            f"| {r['dv']} | {r['batch']} | {r['bytes_per_peer']} | {r['ours_us']:.1f} | "
            f"{r['nccl_us']:.1f} | {r['ours_graph_us']:.1f} | {r['nccl_graph_us']:.1f} | "
            f"{ratio:.2f} |"
        )
    return "\n".join(lines)
