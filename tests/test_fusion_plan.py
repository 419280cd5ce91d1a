"""The Lamport all-reduce family's host side on CPU: workspace sizes from the kernels' layout,
the one-shot / two-shot planner, the launch entry's argument checks and how a call finds its
workspace's control block (no GPU needed: the control module is host-only)."""

import pytest
import torch

from fusedcomm.enums import MAX_COMM_SIZE
from fusedcomm.jit.allreduce_fusion import KERNEL_PARTS
from fusedcomm.ops import _fusion_launch as fl
from fusedcomm.ops import allreduce_fusion as af
from fusedcomm.runtime import fusion_control as fc

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32


def _round16(n):
    return (n + 15) // 16 * 16


@pytest.mark.parametrize("world", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype,elem", [(BF16, 2), (F16, 2), (F32, 4)])
@pytest.mark.parametrize("tokens,hidden", [(1, 8), (3, 4096), (16384, 4096), (7, 1000)])
def test_workspace_bytes_follow_the_layout(world, dtype, elem, tokens, hidden):
    plan = fl.workspace_bytes(world, tokens, hidden, dtype)
    segment = min(_round16(world * tokens * hidden * elem), MAX_COMM_SIZE)
    assert plan["segment"] == segment
    assert plan["lamport"] == 3 * segment
    assert plan["comm"] == _round16(2 * tokens * hidden * elem)
    assert plan["flags"] == fl.workspace_bytes(2, 1, 8, BF16)["flags"]  # fixed size
    assert plan["flags"] % 128 == 0 and plan["flags"] >= 3456


def test_segment_is_capped():
    plan = fl.workspace_bytes(8, 1 << 20, 8192, BF16)
    assert plan["segment"] == MAX_COMM_SIZE == fl._describe()["max_segment_bytes"]


@pytest.mark.parametrize(
    "args,match",
    [
        ((0, 16, 4096, BF16), "world_size"),
        ((9, 16, 4096, BF16), "world_size"),
        ((2, 0, 4096, BF16), "max_token_num"),
    ],
)
def test_workspace_bytes_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        fl.workspace_bytes(*args)
    with pytest.raises(TypeError, match="dtype"):
        fl.workspace_bytes(2, 16, 4096, torch.int8)


SEG = fl.workspace_bytes(2, 16384, 4096, BF16)["segment"]


def test_two_ranks_run_one_shot_whenever_it_fits():
    for n in (1, 3, 127, 1000, 16384):
        assert fl.plan(n, 4096, BF16, 2, SEG)["algorithm"] == "oneshot"
    assert fl.plan(1, 4096, BF16, 2, SEG, use_oneshot=False)["algorithm"] == "twoshot"


def test_one_shot_that_does_not_fit_runs_two_shot():
    small = fl.workspace_bytes(2, 16, 4096, BF16)["segment"]
    assert fl.plan(16, 4096, BF16, 2, small, use_oneshot=True)["algorithm"] == "oneshot"
    assert fl.plan(17, 4096, BF16, 2, small, use_oneshot=True)["algorithm"] == "twoshot"
    assert fl.plan(17, 4096, BF16, 2, small)["algorithm"] == "twoshot"


@pytest.mark.parametrize("world,mib", [(4, 64), (8, 42)])
def test_auto_crossover_for_more_ranks(world, mib):
    hidden = 4096
    seg = 1 << 30
    limit = (mib << 20) // (hidden * 2 * 2 * world)  # tokens at the crossover
    assert fl.plan(limit, hidden, BF16, world, seg)["algorithm"] == "oneshot"
    assert fl.plan(limit + 1, hidden, BF16, world, seg)["algorithm"] == "twoshot"
    assert fl.plan(limit + 1, hidden, BF16, world, seg, True)["algorithm"] == "oneshot"


@pytest.mark.parametrize(
    "hidden,dtype",
    [
        (8, BF16),
        (1024, BF16),
        (2880, BF16),
        (4096, F16),
        (7168, BF16),
        (8192, BF16),
        (16384, BF16),
        (65536, BF16),
        (4, F32),
        (2880, F32),
        (32768, F32),
    ],
)
@pytest.mark.parametrize("oneshot", [True, False])
def test_launch_shape_covers_the_row(hidden, dtype, oneshot):
    elem = torch.tensor([], dtype=dtype).element_size()
    row_packs = hidden * elem // 16
    p = fl.plan(100, hidden, dtype, 2, 1 << 30, oneshot)
    assert p["packs"] in (1, 2, 4, 8)
    assert p["threads"] % 32 == 0 and 32 <= p["threads"] <= 1024
    assert p["threads"] * p["packs"] >= row_packs > (p["threads"] - 32) * p["packs"]
    assert p["blocks"] == (100 if oneshot else 36)
    assert fl.plan(5, hidden, dtype, 2, 1 << 30, False)["blocks"] == 5


def test_planner_is_pure():
    calls = [
        (n, d, t, w, s, o)
        for n in (1, 128, 5000)
        for d in (2880, 8192)
        for t in (BF16, F32)
        for w in (2, 3, 8)
        for s in (SEG, 1 << 20)
        for o in (None, True, False)
    ]
    assert [fl.plan(*c) for c in calls] == [fl.plan(*c) for c in calls]


@pytest.mark.parametrize(
    "args,match",
    [
        ((0, 4096, BF16, 2), "token_num"),
        ((1, 4100, BF16, 2), "hidden_dim"),
        ((1, 65544, BF16, 2), "hidden_dim"),
        ((1, 32776, F32, 2), "hidden_dim"),
        ((1, 4096, BF16, 1), "world_size"),
        ((1, 4096, BF16, 9), "world_size"),
    ],
)
def test_planner_rejects_bad_shapes(args, match):
    with pytest.raises(ValueError, match=match):
        fl.plan(*args, SEG)


def test_describe_names_patterns_and_phases():
    d = fl._describe()
    assert tuple(d["patterns"]) == (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11)
    assert d["kernel_parts"] == KERNEL_PARTS  # one compile unit of the spec per part
    assert d["max_quant_groups"] == af._MAX_QUANT_GROUPS
    assert tuple(d["algorithms"]) == ("auto", "oneshot", "twoshot")
    assert len(d["phases"]) == 3 and d["max_ranks"] == 8 and d["max_row_bytes"] == 131072


def _launch(x, table, **kw):
    args = dict(
        pattern=0,
        token_num=2,
        hidden=16,
        world=2,
        rank=0,
        control=1,
        segment=1 << 20,
        comm=1 << 20,
        claim=1,
        record=1,
        timeout=1.0,
        pdl=False,
        trigger=True,
        fp32_acc=False,
        algorithm=0,
        allreduce_out=x,
        residual_in=None,
        residual_out=None,
        norm_out=None,
        quant_out=None,
        scale_out=None,
        gamma=None,
        eps=1e-6,
        scale_factor=None,
        sf_layout=0,
        group_size=0,
        weight_bias=0.0,
        launcher=1,
    )
    args.update(kw)
    fl._control().allreduce_fusion_launch(x, table, *list(args.values()))


def test_launch_entry_checks_before_anything():
    x = torch.zeros(2, 16, dtype=BF16)
    table = torch.zeros(7, dtype=torch.int64)
    with pytest.raises(ValueError, match="allreduce_in must be a CUDA tensor"):
        _launch(x, table)
    with pytest.raises(TypeError, match="dtype"):
        _launch(x.to(torch.int32), table)
    with pytest.raises(ValueError, match="pattern"):
        _launch(x, table, pattern=6)


def _fake_block(ptr):
    block = fc.ControlBlock.__new__(fc.ControlBlock)
    block.ptr, block.device, block.segment_bytes, block.timeout_s = ptr, 0, 1 << 20, 1.0
    block.comm_bytes = 1 << 20
    fc._BY_PTR[ptr] = block
    return block


def test_a_call_finds_its_control_block_by_the_table():
    block = _fake_block(0xC0DE00)
    try:
        table = torch.tensor([1, 2, 3, 4, 5, 6, 0xC0DE00], dtype=torch.int64)
        assert fc._block_for(table) is block  # first use: reads the last entry once
        assert fc._BY_TABLE[table.data_ptr()][1] is block
        assert fc._block_for(table) is block  # then by identity, without a read
        copy = table.clone()
        assert fc._block_for(copy) is block
        stale = torch.tensor([1, 2, 3, 4, 5, 6, 0xBAD00], dtype=torch.int64)
        with pytest.raises(ValueError, match="not a live workspace"):
            fc._block_for(stale)
    finally:
        fc._BY_PTR.pop(0xC0DE00, None)
        for k in [k for k, (_, b) in fc._BY_TABLE.items() if b is block]:
            del fc._BY_TABLE[k]
