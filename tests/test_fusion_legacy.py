"""The deprecated trtllm_allreduce_fusion entry point's argument rules (trtllm_custom_all_reduce:
tests/test_trtllm_custom_ar.py). CPU only."""

import pytest
import torch

import fusedcomm as comm

BF16 = torch.bfloat16


def test_trtllm_allreduce_fusion_requires_every_positional_argument():
    with pytest.raises(TypeError):
        comm.trtllm_allreduce_fusion(torch.zeros(8), 2, 0, 1, 8, torch.zeros(7))
