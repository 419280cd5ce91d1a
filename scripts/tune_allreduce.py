"""Time build-time variants of the all-reduce kernels side by side (a development tool).

Each variant is the bf16 kernel module of the run's world size built with another one-shot
unroll depth (a key field of jit/allreduce_peer.py); all run in one process group, so the
numbers compare.
    python scripts/tune_allreduce.py        (on a host with 2+ GPUs)
"""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))

from fusedcomm.bench.timing import capture, time_graph, time_loop  # noqa: E402
from fusedcomm.jit import allreduce_peer, load  # noqa: E402
from fusedcomm.jit.configs import world_key  # noqa: E402
from fusedcomm.ops import vllm_ar  # noqa: E402
from fusedcomm.testing.dist import run_ranks  # noqa: E402
from fusedcomm.testing.vllm_comm import VllmComm  # noqa: E402

VARIANTS = {f"unroll{u}": u for u in (1, 2, 4, 8)}
SIZES = [8 << 10, 512 << 10, 2 << 20, 8 << 20, 32 << 20]


def _use_variant(fa, world, unroll):
    """Point the handle's bf16 launcher at the kernels built with ``unroll``."""
    spec = allreduce_peer.kernel_spec("bf16", world_key(world), unroll)
    vllm_ar._handles[fa].launchers[torch.bfloat16] = int(load(spec).allreduce_peer_launcher())


def rank_main(rank, world):
    rows = []
    for name, unroll in VARIANTS.items():
        with VllmComm(max(SIZES)) as c:
            _use_variant(c.fa, world, unroll)
            for nbytes in SIZES:
                x = torch.randint(-9, 9, (nbytes // 2,), device="cuda").to(torch.bfloat16)
                out = torch.empty_like(x)
                ref = x.clone()
                dist.all_reduce(ref)
                iters = 100 if nbytes <= 1 << 20 else 20
                for algo in ("oneshot", "twoshot"):
                    eager = time_loop(
                        lambda: vllm_ar.vllm_all_reduce(
                            c.fa, x, out, c.buffer[rank], c.max_bytes, 36, algorithm=algo
                        ),
                        iters,
                    )
                    ok = torch.equal(out, ref)
                    g = capture(
                        lambda: vllm_ar.vllm_all_reduce(c.fa, x, out, 0, 0, 36, algorithm=algo),
                        iters,
                        warmup=False,
                    )
                    c.register_graph_inputs()
                    graph = time_graph(g, iters)
                    out.zero_()
                    g.replay()
                    ok &= torch.equal(out, ref)
                    rows.append((name, nbytes, algo, eager, graph, ok))
                    del g
                    dist.barrier()
    return rows


def main():
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    rows = run_ranks(rank_main, 2, backend="nccl", timeout_s=500)[0]
    print(
        "| variant | bytes | algorithm | eager us | graph us | exact |\n|---|---|---|---|---|---|"
    )
    for name, nbytes, algo, eager, graph, ok in rows:
        print(f"| {name} | {nbytes >> 10} KiB | {algo} | {eager:.1f} | {graph:.1f} | {ok} |")


if __name__ == "__main__":
    main()
