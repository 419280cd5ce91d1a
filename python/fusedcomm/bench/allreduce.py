"""All-reduce benchmark: our vLLM-style kernel beside NCCL and torch symmetric memory.

bf16, hidden 4096, tokens 1..16384 (8 KiB .. 128 MiB), eager and CUDA graph, all measured in one
run on the same GPUs. Every rank runs the same sequence of collectives.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..ops import vllm_ar
from ..testing.vllm_comm import VllmComm
from .timing import capture, time_graph, time_loop

HIDDEN = 4096
TOKENS = (1, 8, 64, 256, 1024, 4096, 16384)

# (column, what a target says) checked by check_targets
TARGETS = (
    ("ours_graph", 8 * 1024, 3.0),
    ("ours_graph", 8 * 1024 * 1024, 25.0),
    ("ours_graph", 32 * 1024 * 1024, 95.0),
    ("ours_eager", 8 * 1024, 10.0),
)


def _iters(nbytes: int) -> int:
    return 200 if nbytes <= 1 << 20 else (50 if nbytes <= 8 << 20 else 10)


def _symm_mem_columns(x: torch.Tensor, iters: int) -> dict[str, float | None]:
    """torch symmetric-memory one-shot / two-shot (multicast stays off), or None if missing."""
    cols: dict[str, float | None] = {}
    try:
        import torch.distributed._symmetric_memory as symm_mem

        group_name = dist.group.WORLD.group_name
        buf = symm_mem.empty(x.numel(), dtype=x.dtype, device=x.device)
        symm_mem.rendezvous(buf, group_name)
        buf.copy_(x)
        ops = torch.ops.symm_mem
        one = lambda: ops.one_shot_all_reduce(buf, "sum", group_name)  # noqa: E731
        two = lambda: ops.two_shot_all_reduce_(buf, "sum", group_name)  # noqa: E731
        for name, fn in (("symm_oneshot", one), ("symm_twoshot", two)):
            cols[f"{name}_eager"] = time_loop(fn, iters)
            cols[f"{name}_graph"] = time_graph(capture(fn, iters), iters)
    except Exception as e:  # the same on every rank: same torch, same GPUs
        cols["symm_error"] = f"{type(e).__name__}: {e}"[:120]
    return cols


def bench_rank(rank: int, world: int, tokens=TOKENS, hidden: int = HIDDEN) -> list[dict]:
    max_bytes = max(tokens) * hidden * 2
    rows = []
    with VllmComm(max_bytes, rank_data_records=8192) as c:
        reg = c.buffer[rank]
        for t in tokens:
            n = t * hidden
            nbytes = n * 2
            iters = _iters(nbytes)
            x = torch.randint(-16, 16, (n,), device="cuda").to(torch.bfloat16)
            out = torch.empty_like(x)
            row: dict = {"tokens": t, "bytes": nbytes, "world": world}
            ours = lambda: vllm_ar.vllm_all_reduce(c.fa, x, out, reg, max_bytes, 36)  # noqa: E731
            ref = x.clone()
            dist.all_reduce(ref)
            ours()
            row["exact_vs_nccl"] = bool(torch.equal(out, ref))
            row["ours_eager"] = time_loop(ours, iters)
            op = torch.ops.fusedcomm.vllm_all_reduce
            row["ours_eager_dispatcher"] = time_loop(
                lambda: op(c.fa, x, out, reg, max_bytes, 36, 0), iters
            )
            graph = capture(
                lambda: vllm_ar.vllm_all_reduce(c.fa, x, out, 0, 0, 36), iters, warmup=False
            )
            c.register_graph_inputs()
            row["ours_graph"] = time_graph(graph, iters)
            out.fill_(float("nan"))
            graph.replay()
            row["exact_vs_nccl"] &= bool(torch.equal(out, ref))
            del graph
            y = x.clone()
            nccl = lambda: dist.all_reduce(y)  # noqa: E731
            row["nccl_eager"] = time_loop(nccl, iters)
            row["nccl_graph"] = time_graph(capture(nccl, iters), iters)
            row.update(_symm_mem_columns(x, iters))
            rows.append(row)
            torch.cuda.synchronize()
            dist.barrier()
    return rows


COLUMNS = (
    ("ours_eager", "ours eager"),
    ("ours_eager_dispatcher", "ours eager (torch.ops)"),
    ("ours_graph", "ours graph"),
    ("nccl_eager", "NCCL eager"),
    ("nccl_graph", "NCCL graph"),
    ("symm_oneshot_eager", "symm one-shot eager"),
    ("symm_twoshot_eager", "symm two-shot eager"),
    ("symm_oneshot_graph", "symm one-shot graph"),
    ("symm_twoshot_graph", "symm two-shot graph"),
)


def _size(nbytes: int) -> str:
    return f"{nbytes >> 20} MiB" if nbytes >= 1 << 20 else f"{nbytes >> 10} KiB"


def markdown(rows: list[dict]) -> str:
    head = "| tokens | bytes | " + " | ".join(t for _, t in COLUMNS) + " | exact |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 3)]
    for r in rows:
        cells = [f"{r[k]:.1f}" if isinstance(r.get(k), float) else "-" for k, _ in COLUMNS]
        lines.append(
            f"| {r['tokens']} | {_size(r['bytes'])} | "
            + " | ".join(cells)
            + f" | {'yes' if r.get('exact_vs_nccl') else 'NO'} |"
        )
    return "\n".join(lines)


def check_targets(rows: list[dict]) -> list[str]:
    """One line per target: met or missed, with the measured value and gap."""
    by_bytes = {r["bytes"]: r for r in rows}
    lines = []
    for col, nbytes, limit in TARGETS:
        r = by_bytes.get(nbytes)
        if r is None or not isinstance(r.get(col), float):
            continue
        v = r[col]
        verdict = "met" if v <= limit else f"MISSED by {v - limit:.1f} us"
        lines.append(f"{col} at {_size(nbytes)}: {v:.1f} us (target <= {limit}) {verdict}")
    slower = [r for r in rows if r["bytes"] <= 32 << 20 and r["ours_graph"] > r["nccl_graph"]]
    lines.append(
        "ours graph never slower than NCCL graph up to 32 MiB: "
        + (
            "met"
            if not slower
            else "MISSED at "
            + ", ".join(
                f"{_size(r['bytes'])} ({r['ours_graph']:.1f} vs {r['nccl_graph']:.1f})"
                for r in slower
            )
        )
    )
    return lines


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    xs = [r["bytes"] for r in rows]
    for key, title in COLUMNS:
        ys = [r.get(key) for r in rows]
        if all(isinstance(y, float) for y in ys):
            ax.plot(xs, ys, marker="o", label=title, linestyle="-" if "graph" in key else "--")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("message size (bytes, bf16)")
    ax.set_ylabel("latency per call (us)")
    ax.set_title(f"all-reduce, {rows[0]['world']} ranks")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
