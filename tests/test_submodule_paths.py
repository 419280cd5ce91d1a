"""The documented sub-module paths hold the very objects the top level exports (CPU only)."""

import importlib

import pytest

import fusedcomm

PATHS = ("trtllm_ar", "trtllm_moe_alltoall", "mnnvl", "dcp_alltoall", "trtllm_mnnvl_ar")
# Names documented only under their sub-module path (not at the top level).
SUBMODULE_ONLY = {
    "mnnvl": {
        "McastGPUBuffer",
        "MnnvlMemory",
        "all_ranks_agree",
        "all_ranks_support_mnnvl",
        "is_mnnvl_fabric_supported",
        "is_multicast_supported",
    },
    "trtllm_mnnvl_ar": {"MNNVL_ONE_SHOT_THRESHOLD"},
    "trtllm_ar": {"LamportTokenNumThreshold", "MAX_ALL_REDUCE_BLOCKS"},
}


@pytest.mark.parametrize("path", PATHS)
def test_sub_module_names_are_the_top_level_objects(path):
    module = importlib.import_module(f"fusedcomm.{path}")
    assert module.__all__, path
    for name in set(module.__all__) - SUBMODULE_ONLY.get(path, set()):
        assert getattr(module, name) is getattr(fusedcomm, name), f"fusedcomm.{path}.{name}"


def test_engine_style_imports():
    from fusedcomm.mnnvl import MnnvlConfig, TorchDistBackend
    from fusedcomm.trtllm_ar import AllReduceFusionPattern, trtllm_allreduce_fusion
    from fusedcomm.trtllm_moe_alltoall import MoeAlltoAll, moe_a2a_dispatch

    assert MnnvlConfig().comm_backend is None
    assert callable(trtllm_allreduce_fusion) and callable(moe_a2a_dispatch)
    assert AllReduceFusionPattern.kARResidualRMSNorm == 1
    # the legacy sizing constant, where the reference's own custom all-reduce test reads it
    assert fusedcomm.trtllm_ar.LamportTokenNumThreshold == 16
    assert MoeAlltoAll.get_moe_workspace_size_per_rank(2, 8, 16, 64) > 0
    assert TorchDistBackend is fusedcomm.TorchDistBackend
