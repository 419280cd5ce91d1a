"""The ``fusedcomm`` command: ``doctor`` (what this machine offers) and ``bench`` (timings).

    fusedcomm doctor
    fusedcomm bench [--world N] [--json FILE] [--markdown FILE] [--plot FILE.png] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _modules_status() -> list[str]:
    from .jit import ALL_SPECS, current_arch
    from .jit.loader import find_prebuilt, jit_cache_path

    try:
        arch = current_arch()
    except RuntimeError as e:
        return [f"  (no target architecture: {e})"]
    lines = []
    for name, spec in ALL_SPECS.items():
        try:
            prebuilt = find_prebuilt(spec, arch)
        except (OSError, RuntimeError) as e:
            lines.append(f"  {name:10s} {arch}: cannot check prebuilt modules: {e}")
            continue
        if prebuilt is not None:
            lines.append(f"  {name:10s} {arch}: prebuilt ({prebuilt})")
            continue
        try:
            cached = jit_cache_path(spec, arch)
            state = f"cached ({cached})" if cached.exists() else "missing (built on first use)"
        except RuntimeError as e:
            state = f"missing, and cannot be built here: {str(e).splitlines()[0]}"
        lines.append(f"  {name:10s} {arch}: {state}")
    return lines


def doctor() -> int:
    import torch

    from . import envs
    from ._version import __version__
    from .runtime import capability
    from .jit.build import BuildError, find_nvcc, nvcc_version

    print(f"fusedcomm {__version__}, torch {torch.__version__}, python {sys.version.split()[0]}")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    print(f"CUDA GPUs visible: {n}")
    for i in range(n):
        try:
            caps = capability.probe_local(i)
            print(f"  [{i}] {caps.name}, compute capability {caps.compute_capability[0]}."
                  f"{caps.compute_capability[1]}, {caps.sm_count} SMs, bus {caps.pci_bus_id}; "
                  f"fabric handles {caps.fabric_handle_supported}, POSIX-fd handles "
                  f"{caps.posix_fd_supported}, multicast reported {caps.multicast_supported} "
                  f"(attribute query only; fusedcomm never enables multicast from it)")
        except RuntimeError as e:
            print(f"  [{i}] probe failed: {e}")
    if n > 1:
        p2p = capability.p2p_matrix()
        print("peer access (row can read column):")
        for i, row in enumerate(p2p):
            print(f"  [{i}] " + " ".join("Y" if v else ("-" if i == j else "n") for j, v in enumerate(row)))
        links = capability.nvlink_matrix()
        if links is None:
            print("NVLink links: unknown (pynvml not installed)")
        else:
            print("NVLink links between GPUs:")
            for i, row in enumerate(links):
                print(f"  [{i}] " + " ".join(f"{v:2d}" for v in row))
    try:
        nvcc = find_nvcc()
        print(f"nvcc: {nvcc} ({nvcc_version(nvcc)})")
    except BuildError:
        print("nvcc: not found (only prebuilt modules can load)")
    print(f"cache dir: {envs.cache_dir()}")
    aot = envs.aot_dir()
    print(f"FUSEDCOMM_AOT_DIR: {aot if aot else 'unset'}")
    print("modules:")
    for line in _modules_status():
        print(line)
    return 0


def _bench_gpu(world: int, quick: bool) -> dict:
    from .bench import allreduce, foundation
    from .testing.dist import run_ranks

    tokens = (1, 8, 64, 256, 1024) if quick else allreduce.TOKENS
    found = run_ranks(foundation.bench_rank, world, backend="nccl", timeout_s=300)
    rows = run_ranks(allreduce.bench_rank, world, backend="nccl", timeout_s=900, args=(tokens,))
    return {"foundation": found[0], "allreduce": rows[0], "allreduce_per_rank": rows}


def bench(args) -> int:
    import torch

    from .testing.dist import run_ranks

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    world = args.world or n
    if args.world and (args.world < 2 or args.world > max(n, 2)):
        print(f"fusedcomm bench: --world {args.world} needs 2..{max(n, 2)} ranks "
              f"({n} CUDA GPU(s) visible)", file=sys.stderr)
        return 2
    if n < 2 or world < 2:
        from .bench.foundation import cpu_rendezvous_rank

        print(f"fusedcomm bench: {n} CUDA GPU(s) visible; the GPU benchmarks need 2 or more. "
              "Running the CPU part (gloo rendezvous of 2 ranks) instead.")
        res = run_ranks(cpu_rendezvous_rank, 2, backend="gloo", timeout_s=120)
        print(f"gloo all-gather of a 64-byte IPC handle + barrier, 2 ranks: "
              f"{res[0]['allgather_64B_plus_barrier_us']:.0f} us (median of 20)")
        result = {"cpu_rendezvous": res}
    else:
        from .bench import allreduce

        result = _bench_gpu(world, args.quick)
        f = result["foundation"]
        print(f"create_shared_buffer(64 MiB), {world} ranks: {f['create_shared_buffer_64MiB_ms']:.2f} ms; "
              f"Lamport init of 64 MiB: {f['lamport_init_64MiB_us']:.1f} us "
              f"({f['lamport_init_GBps']:.0f} GB/s), read back {'ok' if f['lamport_ok'] else 'WRONG'}")
        table = allreduce.markdown(result["allreduce"])
        print(f"\nall-reduce, bf16, hidden {allreduce.HIDDEN}, {world} ranks, microseconds per call "
              "(median of 5 timed loops, CUDA events):\n")
        print(table)
        print("\ntargets:")
        for line in allreduce.check_targets(result["allreduce"]):
            print("  " + line)
        if args.markdown:
            with open(args.markdown, "w") as fh:
                fh.write(table + "\n")
        if args.plot:
            allreduce.plot(result["allreduce"], args.plot)
            print(f"plot written to {args.plot}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    parser = argparse.ArgumentParser(prog="fusedcomm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("doctor", help="GPUs, links, compiler, cache and module status")
    b = sub.add_parser("bench", help="time our collectives beside NCCL")
    b.add_argument("--world", type=int, default=0, help="ranks (default: all visible GPUs)")
    b.add_argument("--json", help="write all results as JSON here")
    b.add_argument("--markdown", help="write the all-reduce table here")
    b.add_argument("--plot", help="draw latency vs size for all columns into this PNG")
    b.add_argument("--quick", action="store_true", help="sizes up to 8 MiB only")
    args = parser.parse_args(argv)
    return doctor() if args.command == "doctor" else bench(args)


if __name__ == "__main__":
    sys.exit(main())
