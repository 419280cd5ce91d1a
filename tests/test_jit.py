"""The JitSpec layer on a machine without GPUs: keys, rebuilds, locking, safety, AOT lookup.

These tests compile a tiny TVM-FFI module with nvcc (a few seconds per build) into a temporary
cache and load it, so they need nvcc but no GPU.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fusedcomm.jit import JitSpec, MissingModuleError, Unit, UnsafeModuleError, aot, load, locate
from fusedcomm.jit.build import find_nvcc

ARCH = "9.0a"

SOURCE = textwrap.dedent("""
    #include <tvm/ffi/function.h>
    #include "tiny/answer.h"
    int64_t answer() { return kAnswer; }
    TVM_FFI_DLL_EXPORT_TYPED_FUNC(answer, answer);
""")


def _nvcc_missing() -> bool:
    try:
        find_nvcc()
        return False
    except RuntimeError:
        return True


needs_nvcc = pytest.mark.skipif(_nvcc_missing(), reason="needs nvcc")


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A one-unit module whose answer lives in a header, built into a private cache."""
    csrc, include = tmp_path / "csrc", tmp_path / "include" / "tiny"
    csrc.mkdir()
    include.mkdir(parents=True)
    (csrc / "tiny.cu").write_text(SOURCE)
    (include / "answer.h").write_text("#pragma once\nconstexpr long kAnswer = 41;\n")
    monkeypatch.setenv("FUSEDCOMM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FUSEDCOMM_AOT_DIR", raising=False)
    monkeypatch.delenv("FUSEDCOMM_NO_JIT", raising=False)
    spec = JitSpec("tiny", (Unit("tiny.cu"),), csrc_dir=csrc, include_dir=tmp_path / "include")
    return spec, include / "answer.h"


def test_key_changes_with_header_flags_and_arch(tiny):
    spec, header = tiny
    base = spec.cache_key(ARCH, "nvcc 13.0")
    assert base == spec.cache_key(ARCH, "nvcc 13.0")
    assert base != spec.cache_key("10.0a", "nvcc 13.0")
    assert base != spec.cache_key(ARCH, "nvcc 13.1")
    flagged = JitSpec(
        "tiny", spec.units, ("-DX=1",), csrc_dir=spec.csrc_dir, include_dir=spec.include_dir
    )
    assert base != flagged.cache_key(ARCH, "nvcc 13.0")
    header.write_text(header.read_text() + "// edited\n")
    assert base != spec.cache_key(ARCH, "nvcc 13.0")
    assert header.resolve() in spec.dependencies()


def test_lineinfo_is_opt_in_and_keyed(tiny, monkeypatch):
    from fusedcomm.jit.build import ninja_file
    from fusedcomm.jit.spec import cuda_flags

    spec, _ = tiny
    monkeypatch.delenv("FUSEDCOMM_LINEINFO", raising=False)
    assert "-lineinfo" not in cuda_flags()
    plain = spec.cache_key(ARCH, "nvcc 13.0")
    assert "-lineinfo" not in ninja_file(spec, ARCH, Path("out.so"))
    monkeypatch.setenv("FUSEDCOMM_LINEINFO", "1")
    assert "-lineinfo" in cuda_flags()
    assert "-lineinfo" in ninja_file(spec, ARCH, Path("out.so"))
    assert spec.cache_key(ARCH, "nvcc 13.0") != plain


def _aot_build(spec, out, monkeypatch):
    """Build ``spec`` ahead of time into ``out`` (as the AOT command would); no JIT afterwards."""
    monkeypatch.setattr(aot, "get_spec", lambda name: spec)
    times = aot.build_all([ARCH], out, ["tiny"])
    monkeypatch.setenv("FUSEDCOMM_NO_JIT", "1")
    return times


def test_spec_validation():
    with pytest.raises(ValueError, match="lower_snake_case"):
        JitSpec("Bad-Name", (Unit("x.cu"),))
    with pytest.raises(ValueError, match="at least one"):
        JitSpec("empty", ())
    with pytest.raises(ValueError, match="one object"):
        JitSpec("dup", (Unit("a.cu"), Unit("a.cu")))


@needs_nvcc
def test_build_load_and_rebuild_on_header_change(tiny, capfd):
    spec, header = tiny
    first = locate(spec, ARCH)
    err = capfd.readouterr().err
    assert "building tiny for sm_90a: 1 compile unit" in err and "built tiny" in err
    assert oct(first.stat().st_mode & 0o777) == "0o700"
    assert oct(first.parent.stat().st_mode & 0o777) == "0o700"
    assert locate(spec, ARCH) == first  # cached: no second build
    assert "building" not in capfd.readouterr().err
    header.write_text("#pragma once\nconstexpr long kAnswer = 42;\n")
    second = locate(spec, ARCH)
    assert second != first and second.exists()
    assert load(spec, ARCH).answer() == 42


@needs_nvcc
def test_quiet_build_prints_nothing(tiny, capfd, monkeypatch):
    spec, _ = tiny
    monkeypatch.setenv("FUSEDCOMM_QUIET_BUILD", "1")
    locate(spec, ARCH)
    assert capfd.readouterr().err == ""


CONCURRENT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {python!r})
    from pathlib import Path
    from fusedcomm.jit import JitSpec, Unit, load
    spec = JitSpec("tiny", (Unit("tiny.cu"),), csrc_dir=Path({csrc!r}), include_dir=Path({inc!r}))
    print("answer", load(spec, "9.0a").answer())
""")


@needs_nvcc
def test_concurrent_processes_build_once(tiny, tmp_path):
    spec, _ = tiny
    script = tmp_path / "race.py"
    python_dir = str(Path(__file__).resolve().parents[1] / "python")
    script.write_text(
        CONCURRENT.format(python=python_dir, csrc=str(spec.csrc_dir), inc=str(spec.include_dir))
    )
    procs = [
        subprocess.Popen(
            [sys.executable, str(script)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ),
        )
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert all("answer 41" in o for o, _ in outs)
    builds = sum(e.count("building tiny") for _, e in outs)
    assert builds == 1, f"{builds} builds for 4 processes"


@needs_nvcc
def test_refuses_world_writable_or_foreign_module(tiny):
    spec, _ = tiny
    path = locate(spec, ARCH)
    os.chmod(path, 0o702)
    with pytest.raises(UnsafeModuleError, match="writable by group or others"):
        locate(spec, ARCH)
    os.chmod(path, 0o700)
    if os.getuid() == 0:
        os.chown(path, 12345, -1)
        with pytest.raises(UnsafeModuleError, match="owned by uid 12345"):
            locate(spec, ARCH)


def test_no_jit_names_the_missing_spec(tiny, monkeypatch):
    spec, _ = tiny
    monkeypatch.setenv("FUSEDCOMM_NO_JIT", "1")
    with pytest.raises(MissingModuleError, match="--modules tiny"):
        locate(spec, ARCH)


@needs_nvcc
def test_aot_dir_is_used_and_stale_modules_skipped(tiny, tmp_path, monkeypatch):
    spec, header = tiny
    out = tmp_path / "aot"
    times = _aot_build(spec, out, monkeypatch)
    assert times[ARCH]["tiny"] > 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["modules"][ARCH]["tiny"] == spec.source_hash(ARCH)
    monkeypatch.setenv("FUSEDCOMM_AOT_DIR", str(out))
    assert locate(spec, ARCH) == out / ARCH / "tiny.so"
    header.write_text("#pragma once\nconstexpr long kAnswer = 7;\n")  # sources moved on
    with pytest.warns(UserWarning, match="built from other sources"):
        with pytest.raises(MissingModuleError):
            locate(spec, ARCH)


def test_aot_cli_rejects_bad_arch(capsys):
    assert aot.main(["--arch", "sm90", "--out", "/tmp/never", "--modules", "runtime"]) == 1
    assert "must look like" in capsys.readouterr().err


def test_every_shipped_spec_resolves_its_headers():
    from fusedcomm.jit import ALL_SPECS

    # Every spec is checked; all offenders are named at once.
    missing = sorted(
        spec.name
        for spec in ALL_SPECS.values()
        if not any(p.suffix == ".cuh" for p in spec.dependencies())
    )
    assert not missing, f"specs that include no device header: {missing}"


def _fake_cache_package(monkeypatch, version, module_dir):
    import types

    pkg = types.ModuleType("fusedcomm_jit_cache")
    pkg.__version__ = version
    pkg.MODULE_DIR = str(module_dir)
    monkeypatch.setitem(sys.modules, "fusedcomm_jit_cache", pkg)


@needs_nvcc
def test_prebuilt_package_is_preferred_when_versions_match(tiny, tmp_path, monkeypatch):
    import fusedcomm

    spec, _ = tiny
    out = tmp_path / "pkg_modules"
    _aot_build(spec, out, monkeypatch)
    _fake_cache_package(monkeypatch, fusedcomm.__version__, out)
    assert locate(spec, ARCH) == out / ARCH / "tiny.so"
    _fake_cache_package(monkeypatch, "0.0.0-other", out)
    with pytest.warns(UserWarning, match="does not match fusedcomm"):
        with pytest.raises(MissingModuleError):
            locate(spec, ARCH)


def test_key_follows_bracketed_and_csrc_includes(tiny):
    spec, header = tiny
    (spec.csrc_dir / "local.h").write_text("#pragma once\n")
    header.write_text(
        '#pragma once\n#include "local.h"\n#include <tiny/more.h>\nconstexpr long kAnswer = 41;\n'
    )
    (header.parent / "more.h").write_text("#pragma once\n")
    deps = {p.name for p in spec.dependencies()}
    assert {"local.h", "more.h", "answer.h", "tiny.cu"} <= deps


@needs_nvcc
def test_cache_found_without_nvcc_and_dirs_private(tiny, monkeypatch):
    import fusedcomm
    from fusedcomm.jit import build, loader

    spec, _ = tiny
    built = locate(spec, ARCH)
    version_dir = built.parents[1]
    assert version_dir.name == fusedcomm.__version__
    assert oct(version_dir.stat().st_mode & 0o777) == "0o700"  # every level, not just the leaf

    def no_nvcc():
        raise build.BuildError("no nvcc here")

    monkeypatch.setattr(loader, "find_nvcc", no_nvcc)
    assert locate(spec, ARCH) == built


@needs_nvcc
def test_group_writable_prebuilt_is_skipped_with_a_warning(tiny, tmp_path, monkeypatch):
    spec, _ = tiny
    out = tmp_path / "aot"
    _aot_build(spec, out, monkeypatch)
    os.chmod(out / ARCH / "tiny.so", 0o775)
    monkeypatch.setenv("FUSEDCOMM_AOT_DIR", str(out))
    with pytest.warns(UserWarning, match="chmod go-w"):
        with pytest.raises(MissingModuleError):
            locate(spec, ARCH)
