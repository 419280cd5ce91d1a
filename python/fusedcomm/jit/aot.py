"""Build modules ahead of time, on a machine with nvcc and no GPU.

    python -m fusedcomm.jit.aot --arch 9.0a,10.0a [--out DIR] [--modules runtime vllm_ar]

Writes DIR/<arch>/<module>.so and DIR/manifest.json (the source hash of every module). Point
FUSEDCOMM_AOT_DIR at DIR, or package DIR with jit/ (fusedcomm-jit-cache), and fusedcomm loads
these modules without starting a compiler. A module whose sources changed since is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .._version import __version__
from .build import build_into
from .loader import MANIFEST
from .modules import ALL_SPECS, get_spec
from .spec import gencode_flag


def build_all(archs: list[str], out: Path, names: list[str]) -> dict[str, dict[str, float]]:
    """Build every (arch, module) pair into ``out``; returns build seconds per arch and module."""
    specs = [get_spec(n) for n in names]
    for arch in archs:
        gencode_flag(arch)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    if manifest.get("version") not in (None, __version__):
        manifest = {}
    manifest["version"] = __version__
    times: dict[str, dict[str, float]] = {}
    for arch in archs:
        arch_dir = out / arch
        for spec in specs:
            dest = arch_dir / f"{spec.name}.so"
            source_hash = spec.source_hash(arch)
            known = manifest.get("modules", {}).get(arch, {}).get(spec.name)
            if dest.exists() and known == source_hash:
                times.setdefault(arch, {})[spec.name] = 0.0
                continue
            dest.unlink(missing_ok=True)
            elapsed = build_into(spec, arch, dest, build_root=out / ".build" / arch)
            times.setdefault(arch, {})[spec.name] = elapsed or 0.0
            manifest.setdefault("modules", {}).setdefault(arch, {})[spec.name] = source_hash
            tmp = manifest_path.with_name(f".{MANIFEST}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
            os.replace(tmp, manifest_path)  # readers never see half a manifest
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedcomm.jit.aot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", required=True, help="comma-separated targets, e.g. 9.0a,10.0a")
    parser.add_argument("--out", default="aot-modules", help="output directory")
    parser.add_argument("--modules", nargs="*", default=None,
                        help=f"modules to build (default all: {' '.join(ALL_SPECS)})")
    args = parser.parse_args(argv)
    archs = [a for a in args.arch.replace(";", ",").split(",") if a.strip()]
    names = args.modules or list(ALL_SPECS)
    start = time.monotonic()
    try:
        times = build_all([a.strip() for a in archs], Path(args.out), names)
    except (ValueError, RuntimeError) as e:
        print(e, file=sys.stderr)
        return 1
    print(f"\n| arch | module | build s |\n|---|---|---|")
    for arch, per in times.items():
        for name, secs in per.items():
            print(f"| {arch} | {name} | {secs:.1f} |" if secs else f"| {arch} | {name} | cached |")
    print(f"AOT build of {len(names)} module(s) x {len(archs)} arch(s) done in "
          f"{time.monotonic() - start:.1f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
