"""The fusedcomm command: what this machine offers, and timings of our collectives.

fusedcomm doctor    GPUs, links, compiler, cache, and the state of every module for every
                    target architecture (visible GPUs and FUSEDCOMM_CUDA_ARCH_LIST)
fusedcomm bench     time our collectives beside NCCL on 2 or more visible GPUs
fusedcomm --version
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def target_archs() -> list[tuple[str, str]]:
    """Every architecture fusedcomm may load modules for here, with where it comes from."""
    import torch

    from . import envs
    from .jit import arch_for_capability

    found: dict[str, str] = {}
    for i in range(_gpu_count()):
        arch = arch_for_capability(*torch.cuda.get_device_capability(i))
        found.setdefault(arch, f"GPU {i}")
    source = envs.cuda_arch_list_source()
    for arch in envs.cuda_arch_list() or []:
        found.setdefault(arch, source)
    return list(found.items())


def _modules_status() -> list[str]:
    from .jit import ALL_SPECS
    from .jit.loader import find_prebuilt, jit_cache_path

    try:
        archs = target_archs()
    except ValueError as e:
        return [f"  (bad target list: {e})"]
    if not archs:
        return [
            "  (no target architecture: no CUDA GPU is visible and neither "
            "FUSEDCOMM_CUDA_ARCH_LIST nor TORCH_CUDA_ARCH_LIST is set)"
        ]
    width = max(len(name) for name in ALL_SPECS)
    lines = []
    for arch, source in archs:
        lines.append(f"  {arch} (from {source}):")
        for name, spec in ALL_SPECS.items():
            target = spec.target(arch) if hasattr(spec, "target") else arch  # host-only modules
            try:
                prebuilt = find_prebuilt(spec, target)
            except (OSError, RuntimeError) as e:
                lines.append(f"    {name:{width}s}  cannot check prebuilt modules: {e}")
                continue
            if prebuilt is not None:
                lines.append(f"    {name:{width}s}  prebuilt ({prebuilt})")
                continue
            try:
                cached = jit_cache_path(spec, target)
                state = f"cached ({cached})" if cached.exists() else "missing (built on first use)"
            except (OSError, RuntimeError) as e:
                state = f"missing, and cannot be built here: {str(e).splitlines()[0]}"
            lines.append(f"    {name:{width}s}  {state}")
    return lines


def doctor() -> int:
    import torch

    from . import envs
    from ._version import __version__
    from .jit.build import BuildError, find_nvcc, nvcc_version
    from .runtime import capability

    print(f"fusedcomm {__version__}, torch {torch.__version__}, python {sys.version.split()[0]}")
    n = _gpu_count()
    cuda = torch.version.cuda
    print(f"CUDA GPUs visible: {n}" + ("" if cuda else " (torch is a CPU-only build)"))
    for i in range(n):
        try:
            caps = capability.probe_local(i)
            print(
                f"  [{i}] {caps.name}, compute capability {caps.compute_capability[0]}."
                f"{caps.compute_capability[1]}, {caps.sm_count} SMs, bus {caps.pci_bus_id}; "
                f"fabric handles {caps.fabric_handle_supported}, POSIX-fd handles "
                f"{caps.posix_fd_supported}, multicast reported {caps.multicast_supported} "
                f"(attribute query only; fusedcomm never enables multicast from it)"
            )
        except RuntimeError as e:
            print(f"  [{i}] probe failed: {e}")
    if n > 1:
        p2p = capability.p2p_matrix()
        print("peer access (row can read column):")
        for i, row in enumerate(p2p):
            print(
                f"  [{i}] "
                + " ".join("Y" if v else ("-" if i == j else "n") for j, v in enumerate(row))
            )
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
    from .bench import fusion

    fused_tokens = tuple(t for t in fusion.TOKENS if t <= 1024) if quick else fusion.TOKENS
    fused = run_ranks(fusion.bench_rank, world, backend="nccl", timeout_s=900, args=(fused_tokens,))
    cross_tokens = fusion.CROSSOVER_TOKENS
    if quick:
        cross_tokens = tuple(t for t in cross_tokens if t <= 1024)
    cross = run_ranks(
        fusion.crossover_rank, world, backend="nccl", timeout_s=600, args=(cross_tokens,)
    )
    from .bench import moe, quant

    sections = {}
    for name, module in (("quant", quant), ("moe", moe)):
        some = tuple(t for t in module.TOKENS if t <= 128) if quick else module.TOKENS
        try:  # a failing section is reported; the others' tables still print
            sections[name] = run_ranks(
                module.bench_rank, world, backend="nccl", timeout_s=900, args=(some,)
            )[0]
        except Exception as exc:
            sections[name] = {"error": str(exc)}
    return {
        "foundation": found[0],
        "allreduce": rows[0],
        "allreduce_per_rank": rows,
        "fusion": fused[0],
        "fusion_crossover": cross[0],
        **sections,
    }


def _section_table(module, rows) -> str:
    if isinstance(rows, dict):  # the section failed
        return f"(failed: {rows['error'][-2000:]})"
    return module.markdown(rows)


def bench(args) -> int:
    import torch

    n = _gpu_count()
    world = args.world or n
    if n < 2:
        why = " (torch is a CPU-only build)" if torch.version.cuda is None else ""
        print(
            f"fusedcomm bench: {n} CUDA GPU(s) visible{why}; the benchmarks need 2 or more. "
            "Nothing was timed.",
            file=sys.stderr,
        )
        return 1
    if world < 2 or world > n:
        print(
            f"fusedcomm bench: --world {args.world} needs 2..{n} ranks ({n} CUDA GPU(s) visible)",
            file=sys.stderr,
        )
        return 2
    from .bench import allreduce

    result = _bench_gpu(world, args.quick)
    f = result["foundation"]
    print(
        f"create_shared_buffer(64 MiB), {world} ranks: {f['create_shared_buffer_64MiB_ms']:.2f} ms; "
        f"Lamport init of 64 MiB: {f['lamport_init_64MiB_us']:.1f} us "
        f"({f['lamport_init_GBps']:.0f} GB/s), read back {'ok' if f['lamport_ok'] else 'WRONG'}"
    )
    table = allreduce.markdown(result["allreduce"])
    print(
        f"\nall-reduce, bf16, hidden {allreduce.HIDDEN}, {world} ranks, microseconds per call "
        "(median of 5 timed loops, CUDA events):\n"
    )
    print(table)
    print("\ntargets:")
    for line in allreduce.check_targets(result["allreduce"]):
        print("  " + line)
    from .bench import fusion

    fused_table = fusion.markdown(result["fusion"])
    print(
        f"\nfused all-reduce (Lamport family), bf16, hidden {fusion.HIDDEN}, {world} ranks, "
        "microseconds per call; fused = AR + residual + RMSNorm, fp8 = the same + FP8 output, "
        "unfused = NCCL + add + torch rms_norm:\n"
    )
    print(fused_table)
    cross_table = fusion.crossover_markdown(result["fusion_crossover"])
    print(
        f"\none-shot / two-shot crossover, hidden {fusion.CROSSOVER_HIDDEN}, {world} ranks, "
        "microseconds per call in CUDA graphs (kAllReduce p0, kARResidualRMSNorm p1):\n"
    )
    print(cross_table)
    from .bench import moe, quant

    quant_table = _section_table(quant, result["quant"])
    print(
        f"\nblock-quantised fused patterns, bf16, {world} ranks, microseconds per call "
        "(NVFP4: pattern 5, SWIZZLED_128x4; group FP8: pattern 9, groups of "
        f"{quant.GROUP}; unfused = NCCL + add + torch rms_norm + a torch quantiser):\n"
    )
    print(quant_table)
    moe_table = _section_table(moe, result["moe"])
    print(
        f"\nMoE fusions, bf16, hidden {moe.HIDDEN}, {world} ranks, CUDA graphs, microseconds "
        f"per call (finalize: top-{moe.TOP_K}; reduction: {moe.EXPERTS} experts per device; "
        "unfused = torch gather/scale/sum + NCCL + add + torch rms_norm):\n"
    )
    print(moe_table)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write("\n\n".join((table, fused_table, cross_table, quant_table, moe_table)) + "\n")
    if args.plot:
        allreduce.plot(result["allreduce"], args.plot)
        print(f"plot written to {args.plot}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    from ._version import __version__

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    parser = argparse.ArgumentParser(
        prog="fusedcomm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"fusedcomm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("doctor", help="GPUs, links, compiler, cache and module status")
    b = sub.add_parser("bench", help="time our collectives beside NCCL (needs 2+ GPUs)")
    b.add_argument("--world", type=int, default=0, help="ranks (default: all visible GPUs)")
    b.add_argument("--json", help="write all results as JSON here")
    b.add_argument("--markdown", help="write the all-reduce table here")
    b.add_argument("--plot", help="draw latency vs size for all columns into this PNG")
    b.add_argument("--quick", action="store_true", help="sizes up to 8 MiB only")
    args = parser.parse_args(argv)
    return doctor() if args.command == "doctor" else bench(args)


if __name__ == "__main__":
    sys.exit(main())
