"""The legacy trtllm_custom_all_reduce: every argument check, then a pointer to the modern API
(its kernel is not provided). CPU only."""

import warnings

import pytest
import torch

import fusedcomm as comm

BF16 = torch.bfloat16


def _legacy(**kw):
    x = torch.zeros(4, 64, dtype=BF16)
    ptrs = torch.zeros(2, dtype=torch.int64)
    a = dict(
        inp=x,
        out=torch.empty_like(x),
        tp_size=2,
        tp_rank=0,
        token_num=4,
        fusion_op_code=0,
        strategy_code=comm.AllReduceStrategyType.ONESHOT,
        config_code=0,
        launch_with_pdl=False,
        flag_value=1,
        peer_comm_buffer_ptrs=ptrs,
        peer_barrier_ptrs_in=ptrs,
        peer_barrier_ptrs_out=ptrs,
        bias=None,
        residual=None,
        weight=None,
        weight_pre_residual_norm=None,
        eps=None,
        intermediate_buffer=None,
        lamport_peer_comm_buffer_ptrs_0=ptrs,
        lamport_peer_comm_buffer_ptrs_1=ptrs,
        lamport_peer_comm_buffer_ptrs_2=ptrs,
    )
    a.update(kw)
    return list(a.values())


@pytest.mark.parametrize(
    "kw,error,match",
    [
        ({}, NotImplementedError, "use allreduce_fusion"),
        ({"strategy_code": comm.AllReduceStrategyType.AUTO}, ValueError, "ONESHOT"),
        ({"tp_size": 3}, ValueError, "tp_size"),
        ({"config_code": 3}, ValueError, "not both"),
        ({"fusion_op_code": 4}, NotImplementedError, "fusion_op_code"),
        ({"fusion_op_code": 1}, ValueError, "residual"),
        ({"out": torch.empty(4, 64)}, ValueError, "must match inp"),
        ({"token_num": 3}, ValueError, "multiple of token_num"),
        (
            {"peer_barrier_ptrs_in": torch.zeros(3, dtype=torch.int64)},
            ValueError,
            "peer_barrier_ptrs_in",
        ),
    ],
)
def test_legacy_custom_all_reduce_checks(kw, error, match):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(error, match=match):
            comm.trtllm_custom_all_reduce(*_legacy(**kw))


def test_trtllm_allreduce_fusion_requires_every_positional_argument():
    with pytest.raises(TypeError):
        comm.trtllm_allreduce_fusion(torch.zeros(8), 2, 0, 1, 8, torch.zeros(7))
