"""The fusedcomm command on any machine: --version, plain help, doctor's arch list, bench's refusal."""

import pytest
import torch

from fusedcomm import __version__, cli

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"fusedcomm {__version__}"


def test_help_is_plain_text(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "doctor" in out and "bench" in out
    assert "``" not in out and ":func:" not in out


@pytest.mark.skipif(GPUS > 0, reason="checks the arch list of a machine without GPUs")
def test_doctor_lists_every_configured_arch(capsys, monkeypatch):
    monkeypatch.setenv("FUSEDCOMM_CUDA_ARCH_LIST", "9.0a,10.0a")
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "  9.0a (from FUSEDCOMM_CUDA_ARCH_LIST):" in out
    assert "  10.0a (from FUSEDCOMM_CUDA_ARCH_LIST):" in out
    monkeypatch.delenv("FUSEDCOMM_CUDA_ARCH_LIST")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert cli.main(["doctor"]) == 0
    assert "  9.0a (from TORCH_CUDA_ARCH_LIST):" in capsys.readouterr().out


@pytest.mark.skipif(GPUS >= 2, reason="checks the refusal where fewer than 2 GPUs are visible")
def test_bench_without_gpus_fails_and_says_why(capsys):
    assert cli.main(["bench"]) == 1
    captured = capsys.readouterr()
    assert f"{GPUS} CUDA GPU(s) visible" in captured.err and "need 2 or more" in captured.err
    assert captured.out == ""


def test_bench_refuses_ranks_forced_onto_one_gpu(capsys, monkeypatch):
    monkeypatch.setenv("FUSEDCOMM_TEST_SHARE_GPU", "1")
    assert cli.main(["bench"]) == 1
    captured = capsys.readouterr()
    assert "puts every rank on GPU 0" in captured.err and "Nothing was timed" in captured.err
    assert captured.out == ""
