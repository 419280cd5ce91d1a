"""Logging and the standard environment variables: levels, handler, waits, tidy outputs."""

import logging
import threading
from pathlib import Path

import pytest
from filelock import FileLock

from fusedcomm import _logging, envs
from fusedcomm.jit import JitSpec, Unit, build


@pytest.fixture
def clean_env(monkeypatch):
    for name in (
        "FUSEDCOMM_CUDA_ARCH_LIST",
        "TORCH_CUDA_ARCH_LIST",
        "FUSEDCOMM_BUILD_JOBS",
        "MAX_JOBS",
        "FUSEDCOMM_CACHE_DIR",
        "XDG_CACHE_HOME",
        "FUSEDCOMM_LOGLEVEL",
        "FUSEDCOMM_QUIET_BUILD",
    ):
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch
    monkeypatch.undo()
    _logging.configure()


def test_torch_arch_list_is_used_after_ours(clean_env):
    assert envs.cuda_arch_list() is None
    clean_env.setenv("TORCH_CUDA_ARCH_LIST", "9.0;10.0+PTX 8.6 9.0")
    assert envs.cuda_arch_list() == ["9.0a", "10.0a", "8.6"]
    assert envs.cuda_arch_list_source() == "TORCH_CUDA_ARCH_LIST"
    clean_env.setenv("FUSEDCOMM_CUDA_ARCH_LIST", "10.0a")
    assert envs.cuda_arch_list() == ["10.0a"]
    clean_env.delenv("FUSEDCOMM_CUDA_ARCH_LIST")
    clean_env.setenv("TORCH_CUDA_ARCH_LIST", "Hopper")
    with pytest.raises(ValueError, match="TORCH_CUDA_ARCH_LIST entry 'Hopper'"):
        envs.cuda_arch_list()


def test_max_jobs_is_used_after_ours(clean_env):
    clean_env.setenv("MAX_JOBS", "3")
    assert envs.build_jobs() == 3
    clean_env.setenv("FUSEDCOMM_BUILD_JOBS", "5")
    assert envs.build_jobs() == 5
    clean_env.delenv("FUSEDCOMM_BUILD_JOBS")
    clean_env.setenv("MAX_JOBS", "0")
    with pytest.raises(ValueError, match=r"MAX_JOBS \(0\) must be >= 1"):
        envs.build_jobs()


def test_xdg_cache_home_is_used_after_ours(clean_env, tmp_path):
    assert envs.cache_dir() == Path.home() / ".cache" / "fusedcomm"
    clean_env.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert envs.cache_dir() == Path.home() / ".cache" / "fusedcomm"
    clean_env.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert envs.cache_dir() == tmp_path / "fusedcomm"
    clean_env.setenv("FUSEDCOMM_CACHE_DIR", str(tmp_path / "mine"))
    assert envs.cache_dir() == tmp_path / "mine"


def test_default_levels_and_loglevel(clean_env):
    _logging.configure()
    assert _logging.logger.getEffectiveLevel() == logging.WARNING
    assert _logging.build_logger.getEffectiveLevel() == logging.INFO
    assert _logging.progress_logger.getEffectiveLevel() == logging.WARNING  # stderr is no TTY
    clean_env.setenv("FUSEDCOMM_LOGLEVEL", "debug")
    _logging.configure()
    for lg in (_logging.logger, _logging.build_logger, _logging.progress_logger):
        assert lg.getEffectiveLevel() == logging.DEBUG
    clean_env.setenv("FUSEDCOMM_LOGLEVEL", "chatty")
    with pytest.warns(UserWarning, match="FUSEDCOMM_LOGLEVEL"):
        _logging.configure()
    assert _logging.logger.getEffectiveLevel() == logging.WARNING


def test_records_go_to_stderr_unless_the_app_prints_them(clean_env, capsys):
    _logging.logger.warning("first %d", 1)
    assert capsys.readouterr().err == "fusedcomm: WARNING: first 1\n"
    _logging.build_logger.info("building x")
    assert capsys.readouterr().err == "fusedcomm: building x\n"
    _logging.logger.info("hidden by default")
    assert capsys.readouterr().err == ""
    import sys

    app = logging.StreamHandler(sys.stderr)
    logging.getLogger().addHandler(app)
    try:
        _logging.logger.warning("once")
        assert capsys.readouterr().err.count("once") == 1  # the app's handler, not ours too
    finally:
        logging.getLogger().removeHandler(app)


def _spec(tmp_path):
    (tmp_path / "a.cu").write_text("")
    (tmp_path / "b.cu").write_text("")
    return JitSpec("demo", (Unit("a.cu"), Unit("b.cu")), csrc_dir=tmp_path, include_dir=tmp_path)


def test_waiting_for_another_build_is_reported(clean_env, tmp_path, caplog):
    spec = _spec(tmp_path)
    dest = tmp_path / "out" / "9.0a" / "demo.so"
    dest.parent.mkdir(parents=True)
    other = FileLock(str(dest) + ".lock", thread_local=False)
    other.acquire()
    (dest.parent / "demo.so.building").write_text("4242 on gpu-node-7\n")
    waiting = threading.Event()
    say = build._say

    def noting_the_wait(msg, *args, **kwargs):
        say(msg, *args, **kwargs)
        if msg.startswith("waiting for"):
            waiting.set()

    clean_env.setattr(build, "_say", noting_the_wait)

    def finish():
        # The other build finishes only once build_into has found the lock taken (after a fixed
        # sleep it could finish first on a busy machine, and build_into would never wait).
        waiting.wait(timeout=60)
        dest.write_bytes(b"module")
        other.release()

    thread = threading.Thread(target=finish)
    thread.start()
    with caplog.at_level(logging.INFO, logger="fusedcomm"):
        assert build.build_into(spec, "9.0a", dest, tmp_path / "out" / ".build" / "9.0a") is None
    thread.join()
    text = caplog.text
    assert "waiting for demo for sm_90a: process 4242 on gpu-node-7 is compiling it" in text
    assert "demo for sm_90a is ready (built by another process; waited" in text


def test_build_leaves_only_the_module_and_counts_reach_the_total(
    clean_env, tmp_path, caplog, monkeypatch
):
    spec = _spec(tmp_path)
    out = tmp_path / "out"
    fake_ninja = tmp_path / "ninja"
    fake_ninja.write_text(
        "#!/bin/sh\nprintf '[1/3] a\\n[2/3] b\\n[3/3] link\\n'\ntouch \"$2/demo.so\"\n"
    )
    fake_ninja.chmod(0o755)
    monkeypatch.setattr(build, "_ninja_path", lambda: str(fake_ninja))
    monkeypatch.setattr(build, "ninja_file", lambda *a: "")
    monkeypatch.setattr(_logging.progress_logger, "level", logging.INFO)
    with caplog.at_level(logging.INFO, logger="fusedcomm"):
        build.build_into(spec, "9.0a", out / "9.0a" / "demo.so", out / ".build" / "9.0a")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["9.0a", "9.0a/demo.so"]
    assert "[1/2] a" in caplog.text and "[2/2] b" in caplog.text and "[3/" not in caplog.text


def test_quiet_build_silences_build_messages(clean_env, capsys):
    clean_env.setenv("FUSEDCOMM_QUIET_BUILD", "1")
    build._say("building %s", "x")
    assert capsys.readouterr().err == ""
