"""Build modules ahead of time, on a machine with nvcc and no GPU.

    python -m fusedcomm.jit.aot --arch 9.0a,10.0a [--out DIR] [--configs default|all] [--modules NAME ...]

Writes DIR/<arch>/<module>.so and DIR/manifest.json (the source hash of every module). Point
FUSEDCOMM_AOT_DIR at DIR, or package DIR with jit/ (fusedcomm-jit-cache), and fusedcomm loads
these modules without starting a compiler. A module whose sources changed since is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .. import envs
from .._version import __version__
from .build import build_into
from .loader import MANIFEST
from .modules import ALL_SPECS, DEFAULT_SPECS, get_spec
from .spec import gencode_flag


def build_all(archs: list[str], out: Path, names: list[str]) -> dict[str, dict[str, float]]:
    """Build every (arch, module) pair into ``out``; returns build seconds per arch and module.

    Modules are built in parallel (FUSEDCOMM_BUILD_JOBS at a time); a host-only module is built
    once, under HOST_ARCH, whatever the architectures. Already built modules whose sources are
    unchanged are kept.
    """
    specs = [get_spec(n) for n in names]
    for arch in archs:
        gencode_flag(arch)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    if manifest.get("version") not in (None, __version__):
        manifest = {}
    manifest["version"] = __version__
    jobs = {(spec.target(arch), spec.name): spec for arch in archs for spec in specs}
    times: dict[str, dict[str, float]] = {}
    todo = []
    for (arch, name), spec in jobs.items():
        dest = out / arch / f"{name}.so"
        known = manifest.get("modules", {}).get(arch, {}).get(name)
        if dest.exists() and known == spec.source_hash(arch):
            times.setdefault(arch, {})[name] = 0.0
        else:
            dest.unlink(missing_ok=True)
            todo.append((arch, spec, dest))
    lock = threading.Lock()

    def build(arch: str, spec, dest: Path) -> None:
        elapsed = build_into(spec, arch, dest, build_root=out / ".build" / arch)
        with lock:
            times.setdefault(arch, {})[spec.name] = elapsed or 0.0
            manifest.setdefault("modules", {}).setdefault(arch, {})[spec.name] = spec.source_hash(
                arch
            )
            tmp = manifest_path.with_name(f".{MANIFEST}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
            os.replace(tmp, manifest_path)  # readers never see half a manifest

    with ThreadPoolExecutor(max_workers=max(1, min(envs.build_jobs(), len(todo) or 1))) as pool:
        for future in [pool.submit(build, *job) for job in todo]:
            future.result()
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fusedcomm.jit.aot",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--arch", required=True, help="comma-separated targets, e.g. 9.0a,10.0a")
    parser.add_argument("--out", default="aot-modules", help="output directory")
    parser.add_argument(
        "--modules", nargs="*", default=None, help="modules to build (default: the --configs set)"
    )
    parser.add_argument(
        "--configs",
        choices=("default", "all"),
        default="default",
        help="default: the configurations engines use; all: every module",
    )
    args = parser.parse_args(argv)
    archs = [a for a in args.arch.replace(";", ",").split(",") if a.strip()]
    names = args.modules or list(DEFAULT_SPECS if args.configs == "default" else ALL_SPECS)
    start = time.monotonic()
    try:
        times = build_all([a.strip() for a in archs], Path(args.out), names)
    except (ValueError, RuntimeError) as e:
        print(e, file=sys.stderr)
        return 1
    print("\n| arch | module | build s |\n|---|---|---|")
    for arch, per in times.items():
        for name, secs in per.items():
            print(f"| {arch} | {name} | {secs:.1f} |" if secs else f"| {arch} | {name} | cached |")
    print(
        f"AOT build of {len(names)} module(s) x {len(archs)} arch(s) done in "
        f"{time.monotonic() - start:.1f} s -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
