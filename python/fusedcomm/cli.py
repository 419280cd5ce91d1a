"""The fusedcomm command: what this machine offers, and timings of our collectives.

fusedcomm doctor    GPUs, links, compiler, cache, and the state of every module for every
                    target architecture (visible GPUs and FUSEDCOMM_CUDA_ARCH_LIST)
fusedcomm bench     time our collectives beside NCCL on 2 or more visible GPUs
fusedcomm --version
"""

from __future__ import annotations

import argparse
import importlib
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


# Sections of ``fusedcomm bench``, in the order they run and print; each fails on its own.
SECTIONS = ("foundation", "allreduce", "fusion", "crossover", "quant", "moe", "moe_a2a", "dcp_a2a",
            "mixed_comm")  # fmt: skip
_RESULT_KEY = {"crossover": "fusion_crossover"}  # the JSON key of a section, where it differs


def _sections_arg(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown section(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(SECTIONS)}"
        )
    return names


def _run_section(name: str, world: int, quick: bool) -> dict:
    """One section on ``world`` ranks: its entries of the result (rank 0's values)."""
    from .testing.dist import run_ranks

    if name == "foundation":
        from .bench import foundation

        found = run_ranks(foundation.bench_rank, world, backend="nccl", timeout_s=300)
        return {"foundation": found[0]}
    if name == "allreduce":
        from .bench import allreduce

        tokens = (1, 8, 64, 256, 1024) if quick else allreduce.TOKENS
        rows = run_ranks(allreduce.bench_rank, world, backend="nccl", timeout_s=900, args=(tokens,))
        return {"allreduce": rows[0], "allreduce_per_rank": rows}
    if name == "fusion":
        from .bench import fusion

        tokens = tuple(t for t in fusion.TOKENS if t <= 1024) if quick else fusion.TOKENS
        rows = run_ranks(fusion.bench_rank, world, backend="nccl", timeout_s=900, args=(tokens,))
        return {"fusion": rows[0]}
    if name == "crossover":
        from .bench import fusion

        tokens = fusion.CROSSOVER_TOKENS
        if quick:
            tokens = tuple(t for t in tokens if t <= 1024)
        rows = run_ranks(
            fusion.crossover_rank, world, backend="nccl", timeout_s=600, args=(tokens,)
        )
        return {"fusion_crossover": rows[0]}
    if name == "moe_a2a":
        from .bench import moe_a2a

        return {"moe_a2a": moe_a2a.run(world, moe_a2a.QUICK_TOKENS if quick else moe_a2a.TOKENS)}
    if name == "dcp_a2a":
        from .bench import dcp_a2a

        return {"dcp_a2a": dcp_a2a.run(world, dcp_a2a.QUICK_BATCHES if quick else dcp_a2a.BATCHES)}
    if name == "mixed_comm":
        from .bench import mixed_comm as mc

        return {"mixed_comm": mc.run(world, mc.QUICK_BYTES if quick else mc.LOCAL_BYTES)}
    from .bench import moe, quant

    module = {"quant": quant, "moe": moe}[name]
    some = tuple(t for t in module.TOKENS if t <= 128) if quick else module.TOKENS
    rows = run_ranks(module.bench_rank, world, backend="nccl", timeout_s=900, args=(some,))
    return {name: rows[0]}


def _bench_gpu(world: int, quick: bool, sections: tuple[str, ...] = SECTIONS) -> dict:
    result: dict = {}
    for name in sections:
        try:  # a failing section is reported; the others' tables still print
            result.update(_run_section(name, world, quick))
        except Exception as exc:
            result[_RESULT_KEY.get(name, name)] = {"error": f"{type(exc).__name__}: {exc}"}
    return result


def _failed(value) -> bool:
    return isinstance(value, dict) and "error" in value


def _section_table(module, rows) -> str:
    if _failed(rows):
        return f"(failed: {rows['error'][-2000:]})"
    return module.markdown(rows)


def _report(name: str, result: dict, world: int) -> str | None:
    """Print one section's heading and table; return the table (None: no table)."""
    value = result[_RESULT_KEY.get(name, name)]
    if name == "foundation":
        if _failed(value):
            print(f"foundation (failed: {value['error'][-2000:]})")
            return None
        print(
            f"create_shared_buffer(64 MiB), {world} ranks: "
            f"{value['create_shared_buffer_64MiB_ms']:.2f} ms; Lamport init of 64 MiB: "
            f"{value['lamport_init_64MiB_us']:.1f} us ({value['lamport_init_GBps']:.0f} GB/s), "
            f"read back {'ok' if value['lamport_ok'] else 'WRONG'}"
        )
        return None
    if name == "allreduce":
        from .bench import allreduce

        print(
            f"\nall-reduce, bf16, hidden {allreduce.HIDDEN}, {world} ranks, microseconds per call "
            "(median of 5 timed loops, CUDA events):\n"
        )
        table = _section_table(allreduce, value)
        print(table)
        if not _failed(value):
            print("\ntargets:")
            for line in allreduce.check_targets(value):
                print("  " + line)
        return table
    if name in ("fusion", "crossover"):
        from .bench import fusion as module
    else:
        module = importlib.import_module(f".bench.{name}", __package__)
    if name == "fusion":
        print(
            f"\nfused all-reduce (Lamport family), bf16, hidden {module.HIDDEN}, {world} ranks, "
            "microseconds per call; fused = AR + residual + RMSNorm, fp8 = the same + FP8 output, "
            "unfused = NCCL + add + torch rms_norm:\n"
        )
    elif name == "crossover":
        print(
            f"\none-shot / two-shot crossover, hidden {module.CROSSOVER_HIDDEN}, {world} ranks, "
            "microseconds per call in CUDA graphs (kAllReduce p0, kARResidualRMSNorm p1):\n"
        )
        table = (
            f"(failed: {value['error'][-2000:]})"
            if _failed(value)
            else module.crossover_markdown(value)
        )
        print(table)
        return table
    elif name == "quant":
        print(
            f"\nblock-quantised fused patterns, bf16, {world} ranks, microseconds per call "
            "(NVFP4: pattern 5, SWIZZLED_128x4; group FP8: pattern 9, groups of "
            f"{module.GROUP}; unfused = NCCL + add + torch rms_norm + a torch quantiser):\n"
        )
    elif name == "moe":
        print(
            f"\nMoE fusions, bf16, hidden {module.HIDDEN}, {world} ranks, CUDA graphs, microseconds "
            f"per call (finalize: top-{module.TOP_K}; reduction: {module.EXPERTS} experts per device; "
            "unfused = torch gather/scale/sum + NCCL + add + torch rms_norm):\n"
        )
    elif name == "dcp_a2a":
        print(
            f"\nDCP all-to-all, cp = {world} ranks, bf16 partial_o [batch, cp, Dv] + fp32 stats "
            f"[batch, cp, {module.STATS}], microseconds per call (median of 5 timed loops, CUDA "
            "events; the slowest rank); NCCL = all_to_all_single of the same bytes, already laid "
            "out by destination; WRONG = the result did not match the reference:\n"
        )
    elif name == "mixed_comm":
        print(
            f"\nmixed communication, bf16 rows of {2 * module.HIDDEN} bytes, {world} ranks, "
            "microseconds per call of each mode (median of 5 timed loops, CUDA events; the "
            "slowest rank); WRONG = a fused mode did not match the reference:\n"
        )
    else:
        print(
            f"\nMoE all-to-all, hidden {module.HIDDEN} bf16, top-{module.TOP_K} of "
            f"{module.EXPERTS} experts, {world} ranks, R = tokens per rank, microseconds per "
            "call (median of 5 timed loops, CUDA events; the slowest rank); round = dispatch + "
            "combine; NCCL = torch all_to_all_single, packed rows + index_add_; WRONG = the "
            "result did not match the torch reference, no time reported:\n"
        )
    table = _section_table(module, value)
    print(table)
    return table


def bench(args) -> int:
    import torch

    from .testing.dist import SHARE_GPU_ENV

    n = _gpu_count()
    world = args.world or n
    if os.environ.get(SHARE_GPU_ENV, "") not in ("", "0"):
        print(
            f"fusedcomm bench: {SHARE_GPU_ENV} puts every rank on GPU 0; ranks that share a GPU "
            "time-slice, so their timings mean nothing. Nothing was timed (the shared-GPU "
            "mode is for correctness tests: scripts/gpu_test.sh).",
            file=sys.stderr,
        )
        return 1
    if n < 2:
        why = " (torch is a CPU-only build)" if torch.version.cuda is None else ""
        print(
            f"fusedcomm bench: {n} CUDA GPU(s) visible{why}; the benchmarks need 2 or more, one "
            "per rank (ranks sharing a GPU time-slice, so their timings would mean nothing). "
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
    sections = args.sections
    result = _bench_gpu(world, args.quick, sections)
    tables = []
    for name in sections:
        try:  # a table that cannot be drawn fails its section only
            tables.append(_report(name, result, world))
        except Exception as exc:
            key = _RESULT_KEY.get(name, name)
            print(f"\n{name}: cannot print the results ({type(exc).__name__}: {exc})")
            if not _failed(result[key]):
                result[key] = {"error": f"report: {type(exc).__name__}: {exc}", "raw": result[key]}
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write("\n\n".join(t for t in tables if t is not None) + "\n")
    if args.plot:
        from .bench import allreduce

        if "allreduce" in result and not _failed(result["allreduce"]):
            allreduce.plot(result["allreduce"], args.plot)
            print(f"plot written to {args.plot}")
        else:
            print(f"no plot: the allreduce section did not run or failed ({args.plot} not written)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    failed = [name for name in sections if _failed(result[_RESULT_KEY.get(name, name)])]
    if failed:
        print(f"\nfusedcomm bench: section(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
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
    b.add_argument(
        "--sections",
        type=_sections_arg,
        default=SECTIONS,
        metavar="NAME[,NAME...]",
        help=f"run only these sections (default: all of {','.join(SECTIONS)})",
    )
    args = parser.parse_args(argv)
    return doctor() if args.command == "doctor" else bench(args)


if __name__ == "__main__":
    sys.exit(main())
