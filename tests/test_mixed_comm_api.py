"""Mixed communication on CPU: the enums, the topology and its rules (valid ops and modes, the
AUTOTUNE ladder), the row layout and plan held together with the C++ header (compiled here as a
host program), and, on CPU ranks over gloo, the NCCL modes against the reference, the argument
errors, the default mode and the agreement of AUTOTUNE. Kernels: tests/test_mixed_comm_gpu.py."""

import secrets

import pytest
import torch

import fusedcomm.mixed_comm as mc
from fusedcomm.jit import ALL_SPECS, DEFAULT_SPECS
from fusedcomm.reference import mixed_comm_reference
from fusedcomm.runtime.mixed_comm_workspace import (
    MIXED_MAX_BLOCKS,
    MIXED_SLOT_BYTES,
    MixedCommLayout,
    MixedTopology,
    autotune_index,
    autotune_ladder,
    valid_modes,
    valid_ops,
)
from fusedcomm.testing.checks import Failures, assert_no_failures
from fusedcomm.testing.dist import run_ranks
from host_program import run_host_program

Op, Mode = mc.MixedCommOp, mc.MixedCommMode
RANKS_TIMEOUT_S = 300  # only stops a hang: ranks start slowly on a loaded 2-core machine


def test_enum_values_and_names():
    assert [(o.name, int(o)) for o in Op] == [
        ("ALLREDUCE", 0),
        ("ALLGATHER", 1),
        ("REDUCESCATTER", 2),
        ("ALLREDUCE_ALLGATHER", 3),
        ("REDUCESCATTER_ALLREDUCE", 4),
    ]
    names = ["FUSED_OPT_WAITS_MC", "FUSED_OPT_WAITS_UC", "FUSED_OPT_BYTES1_MC",
             "FUSED_OPT_BYTES1_UC", "FUSED_OPT_BYTES2_MC", "FUSED_OPT_BYTES2_UC", "NCCL_ONE",
             "NCCL_TP_DP", "AUTOTUNE"]  # fmt: skip
    assert [m.name for m in Mode] == names and [int(m) for m in Mode] == list(range(9))
    assert set(mc.__all__) == {"MixedCommOp", "MixedCommMode", "MixedCommHandler", "run_mixed_comm"}


def test_compute_capability_query():
    check = mc.run_mixed_comm.is_compute_capability_supported
    assert check(90) and check(100) and not check(80)


def test_module_is_built_by_every_aot_set():
    assert "mixed_comm" in ALL_SPECS and "mixed_comm" in DEFAULT_SPECS
    assert [u.source for u in ALL_SPECS["mixed_comm"].units] == ["mixed_comm.cu"]


# --- topology and rules -----------------------------------------------------------------------


def test_topology_defaults_and_ranks():
    t = MixedTopology.make(5, 8, 1, 4, 1, 2)  # defaults: local tp 4, inter tp 2
    assert (t.local_tp_size, t.local_dp_size, t.inter_tp_size, t.inter_dp_size) == (4, 1, 2, 1)
    assert (t.tp_rank, t.dp_rank, t.tp_size, t.dp_size) == (5, 0, 8, 1)
    t = MixedTopology.make(6, 8, 2, 4, 1, 2, 2, None, None, 2)  # local tp2 dp2, inter tp1 dp2
    assert (t.local_dp_size, t.inter_tp_size) == (2, 1)
    assert (t.local_tp_rank, t.local_dp_rank, t.tp_rank, t.dp_rank) == (0, 1, 0, 3)
    # Every world rank's (tp, dp) is distinct, and the groups partition the world in order.
    assert sorted(t.of(w) for w in range(8)) == [(a, b) for a in range(2) for b in range(4)]
    assert t.tp_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert t.dp_groups() == [[0, 2, 4, 6], [1, 3, 5, 7]]
    t = MixedTopology.make(3, 8, 3, 4, 0, 2, 2, 2, 2, 1)  # inter tp 2: tp = lt + it * 2
    assert t.tp_groups() == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert [t.of(w)[0] for w in (0, 1, 4, 5)] == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0, 2, 0, 1, 0, 2), r"local_size \(1\) must be > 1"),
        ((0, 4, 0, 2, 0, 1), r"world_size \(4\) must equal inter_size \* local_size"),
        ((1, 4, 0, 2, 0, 2), r"world_rank \(1\) must equal"),
        ((0, 4, 0, 4, 0, 1, 3), r"local_tp_size \(3\) must divide local_size \(4\)"),
        ((0, 4, 0, 4, 0, 1, None, 3), r"local_dp_size \(3\) must divide"),
        ((0, 4, 0, 4, 0, 1, 2, 1), r"local_tp_size \* local_dp_size \(2 \* 1\) must equal"),
        ((0, 4, 0, 2, 0, 2, None, None, 3), r"inter_tp_size \(3\) must divide inter_size"),
        ((0, 2, 2, 2, 0, 1), r"local_rank \(2\) must be < local_size"),
    ],
)
def test_topology_rejects_bad_sizes(args, match):
    with pytest.raises(ValueError, match=match):
        MixedTopology.make(*args)


@pytest.mark.parametrize("bad", [True, 2.0, "2"])
def test_topology_rejects_non_ints(bad):
    with pytest.raises(TypeError, match="must be an int"):
        MixedTopology.make(0, 2, 0, bad, 0, 1)


@pytest.mark.parametrize(
    ("split", "ops", "modes"),
    [
        ((2, 1), ["ALLREDUCE"], ["FUSED_OPT_WAITS_UC", "FUSED_OPT_BYTES1_UC", "NCCL_ONE"]),
        ((1, 2), ["ALLGATHER", "REDUCESCATTER"], ["FUSED_OPT_WAITS_UC", "NCCL_ONE"]),
        (
            (2, 2),
            ["ALLREDUCE_ALLGATHER", "REDUCESCATTER_ALLREDUCE"],
            ["FUSED_OPT_WAITS_UC", "FUSED_OPT_BYTES1_UC", "NCCL_ONE", "NCCL_TP_DP"],
        ),
        ((1, 4), ["ALLGATHER", "REDUCESCATTER"], ["FUSED_OPT_WAITS_UC", "NCCL_ONE"]),
        ((8, 1), ["ALLREDUCE"], ["FUSED_OPT_WAITS_UC", "FUSED_OPT_BYTES1_UC", "NCCL_ONE"]),
    ],
)
def test_valid_ops_and_modes_of_one_node(split, ops, modes):
    tp, dp = split
    t = MixedTopology.make(0, tp * dp, 0, tp * dp, 0, 1, tp, dp)
    assert [o.name for o in valid_ops(t)] == ops
    assert [m.name for m in valid_modes(t, False, True)] == modes
    assert [m.name for m in valid_modes(t, True, True)] == modes + ["AUTOTUNE"]
    nccl = [m for m in modes if m.startswith("NCCL")]
    assert [m.name for m in valid_modes(t, False, False)] == nccl


def test_no_multicast_mode_is_ever_valid_and_nodes_get_nccl_only():
    for tp, dp in ((2, 1), (1, 2), (2, 2), (4, 2), (2, 4), (8, 1)):
        t = MixedTopology.make(0, tp * dp, 0, tp * dp, 0, 1, tp, dp)
        for autotune in (False, True):
            assert not [m for m in valid_modes(t, autotune, True) if m.name.endswith("_MC")]
    # Two nodes with inter TP 2: no OPT_BYTES2 (nor any fused mode: the handler passes
    # fused=False for inter_size > 1).
    t = MixedTopology.make(0, 4, 0, 2, 0, 2, 2, 1, 2, 1)
    assert [m.name for m in valid_modes(t, True, False)] == ["NCCL_ONE", "AUTOTUNE"]


def test_autotune_ladder_and_lookup():
    assert autotune_ladder(1) == [8192 << i for i in range(15)]
    assert len(autotune_ladder(2)) == 14 and len(autotune_ladder(3)) == 14
    assert len(autotune_ladder(8)) == 12 and autotune_ladder(1 << 16) == [8192]
    n = 15
    assert [autotune_index(b, n) for b in (1, 8192, 8193, 12000, 12288, 16384)] == [
        0,
        0,
        0,
        1,
        1,
        1,
    ]
    assert autotune_index(3 * 8192, n) == 2  # log2(3) = 1.58 rounds to 2
    assert autotune_index(1 << 40, n) == n - 1 and autotune_index(1 << 40, 1) == 0


# --- layout and plan against the header -------------------------------------------------------

_HOST_SOURCE = r"""
#include <cstdio>
#include <initializer_list>
#include "fusedcomm/layout/mixed_comm.cuh"
using namespace fusedcomm;
int main() {
  std::printf("%d %lld %d\n", MixedCommLayout::kMaxBlocks, (long long)MixedCommLayout::kSlotBytes,
              MixedCommLayout::kMaxLocal);
  for (int w = 2; w <= 8; ++w) {
    MixedCommLayout l{w};
    std::printf("L %d %lld %lld %lld\n", w, (long long)l.slots(), (long long)l.size_per_rank(),
                (long long)l.slot(2, 127, 1, w - 1));
  }
  // Plan invariants: items cover [0, P) in order, each fits a slot and holds >= min_item packs
  // whenever P >= min_item; blocks <= grid and <= kMaxBlocks.
  const long long ps[] = {1, 2, 3, 4, 7, 8, 9, 31, 64, 100, 511, 512, 513, 4096, 65537,
                          1 << 20, 8388608};
  for (long long p : ps) {
    for (int min_item : {4, 8}) {
      for (int grid : {1, 7, 32, 132}) {
        MixedCommPlan plan = MixedCommPlan::make(p, min_item, grid);
        bool ok = plan.items >= 1 && plan.blocks >= 1 && plan.blocks <= grid &&
                  plan.blocks <= MixedCommLayout::kMaxBlocks && plan.begin(0) == 0 &&
                  plan.begin(plan.items) == p;
        for (long long i = 0; ok && i < plan.items; ++i) {
          long long n = plan.begin(i + 1) - plan.begin(i);
          ok = n >= 1 && n <= MixedCommLayout::kSlotPacks && (p < min_item || n >= min_item);
        }
        if (!ok) std::printf("BAD %lld %d %d\n", p, min_item, grid);
      }
    }
  }
  return 0;
}
"""


def test_layout_and_plan_match_the_header(tmp_path):
    out = run_host_program(tmp_path, "mixed_layout", _HOST_SOURCE).split("\n")
    assert out[0].split() == [str(MIXED_MAX_BLOCKS), str(MIXED_SLOT_BYTES), "8"]
    lines = [line.split() for line in out[1:] if line]
    assert not [line for line in lines if line[0] == "BAD"], lines
    for _, w, slots, size, last in lines:
        layout = MixedCommLayout(int(w))
        assert (int(slots), int(size)) == (layout.slots, layout.size_per_rank)
        assert int(last) + MIXED_SLOT_BYTES == layout.size_per_rank


def test_layout_by_hand():
    layout = MixedCommLayout(2)
    assert layout.slots == 128 + 128 * 32  # abort marks, block states
    assert layout.size_per_rank == 4224 + 3 * 128 * 2 * 2 * 8192
    with pytest.raises(ValueError, match="local_size"):
        MixedCommLayout(9)


# --- CPU ranks over gloo ----------------------------------------------------------------------


def _handler(rank, world, tp, dp, **kw):
    return mc.MixedCommHandler(rank, world, rank, world, 0, 1, tp, dp, None, None,
                               torch.bfloat16, torch.device("cpu"), use_autotune=False,
                               **kw)  # fmt: skip


def _inputs(seed, world, shape, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.rand(shape, generator=gen) - 0.5).to(dtype) for _ in range(world)]


def _layouts(world):
    """(local_size, local tp, local dp, inter tp, inter dp): every split of one node, and at
    world 4 two nodes of 2 (TP within the node and DP across, or the other way round)."""
    one = [(world, tp, world // tp, 1, 1) for tp in range(1, world + 1) if world % tp == 0]
    return one + ([(2, 2, 1, 1, 2), (2, 1, 2, 2, 1)] if world == 4 else [])


def _rank_nccl_modes(rank, world, seed):
    f = Failures()
    for local, ltp, ldp, itp, idp in _layouts(world):
        h = mc.MixedCommHandler(rank, world, rank % local, local, rank // local, world // local,
                                ltp, ldp, itp, idp, torch.bfloat16, torch.device("cpu"),
                                use_autotune=False)  # fmt: skip
        topo = h.para_info
        tp, dp = topo.tp_size, topo.dp_size
        if topo.inter_size > 1:
            try:
                mc.run_mixed_comm(h.valid_op_list[0], h, torch.zeros(dp, 8, dtype=torch.bfloat16),
                                  mode=Mode.FUSED_OPT_WAITS_UC)  # fmt: skip
                f.check(False, "a fused mode ran across nodes")
            except ValueError as e:
                f.check("within one node" in str(e), str(e))
        f.check(h.get_valid_op_list() == h.valid_op_list, "get_valid_op_list")
        f.check(Mode.FUSED_OPT_WAITS_UC not in h.valid_mode_list, "fused mode on CPU")
        f.check(h.max_block_size_dict == {}, "launch shapes without fused modes")
        for op in h.valid_op_list:
            for i, rows in enumerate((1, 5) if world > 2 else (1, 3, 16)):
                rows *= dp if op in (Op.REDUCESCATTER, Op.REDUCESCATTER_ALLREDUCE) else 1
                xs = _inputs(seed + 100 * i + int(op), world, (rows, 2, 8))
                want = mixed_comm_reference(op, xs, topo.of)[rank]
                for mode in [m for m in h.valid_mode_list if m != Mode.AUTOTUNE] + [None]:
                    out = torch.full_like(want, 7.0)  # poisoned
                    got = mc.run_mixed_comm(op, h, xs[rank], out, mode)
                    what = f"local {local} tp{tp} dp{dp} {op.name} {mode} rows {rows}"
                    f.check(got is out, f"{what}: x_out not returned")
                    # NCCL_TP_DP rounds RS+AR twice (after the DP sum, after the TP sum).
                    twice = op == Op.REDUCESCATTER_ALLREDUCE and topo.mixed and mode in (
                        None, Mode.NCCL_TP_DP)  # fmt: skip
                    same = torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2) if (
                        twice) else torch.equal(got, want)  # fmt: skip
                    f.check(same, f"{what}: differs from the reference")
                fresh = mc.run_mixed_comm(op, h, xs[rank], mode=Mode.NCCL_ONE)
                f.check(torch.equal(fresh, want), f"tp{tp} dp{dp} {op.name}: fresh output")
        h.shutdown()
    return f.messages


@pytest.mark.parametrize("world", [2, 4])
def test_nccl_modes_match_the_reference_on_cpu_ranks(world):
    seed = secrets.randbits(20)
    print(f"seed {seed}")
    assert_no_failures(run_ranks(_rank_nccl_modes, world, args=(seed,), timeout_s=RANKS_TIMEOUT_S))


def _rank_errors(rank, world):
    f = Failures()
    h = _handler(rank, world, 1, world)  # dp only: AG and RS
    x = torch.zeros(4, 8, dtype=torch.bfloat16)
    bad = [
        ((Op.ALLREDUCE, x), "invalid op ALLREDUCE"),
        ((7, x), "invalid op 7"),
        ((Op.ALLGATHER, x, None, Mode.FUSED_OPT_WAITS_MC), "multicast is never enabled"),
        ((Op.ALLGATHER, x, None, Mode.FUSED_OPT_BYTES2_UC), "no fused inter-node mode"),
        ((Op.ALLGATHER, x, None, Mode.FUSED_OPT_WAITS_UC), "the fused modes need a GPU"),
        ((Op.ALLGATHER, x, None, Mode.NCCL_TP_DP), "invalid mode NCCL_TP_DP"),
        ((Op.ALLGATHER, x, None, Mode.AUTOTUNE), "use_autotune=False"),
        ((Op.ALLGATHER, x, None, 42), "invalid mode 42"),
        ((Op.ALLGATHER, torch.zeros(8, dtype=torch.bfloat16)), r"x_in.ndim \(1\)"),
        ((Op.ALLGATHER, x.half()), "x_in.dtype"),
        ((Op.ALLGATHER, torch.zeros(8, 4, dtype=torch.bfloat16).t()), "contiguous"),
        ((Op.REDUCESCATTER, torch.zeros(3, 8, dtype=torch.bfloat16)), "divisible by dp_size"),
        ((Op.ALLGATHER, torch.zeros(1, 12, dtype=torch.bfloat16)), "multiple of 8"),
        ((Op.REDUCESCATTER, torch.zeros(2, 4, dtype=torch.bfloat16)), r"numel\(\) / dp_size"),
        ((Op.ALLGATHER, x, torch.zeros(4, 8, dtype=torch.bfloat16)), r"x_out.shape\[0\] \(4\)"),
        ((Op.REDUCESCATTER, x, torch.zeros(4, 8, dtype=torch.bfloat16)), "x_in.shape\\[0\\] / dp"),
        ((Op.ALLGATHER, x, torch.zeros(8, 4, dtype=torch.bfloat16)), r"x_out.shape\[1:\]"),
        ((Op.ALLGATHER, x, torch.zeros(8, 8, dtype=torch.float16)), "must match x_in's"),
        ((Op.ALLGATHER, x, torch.zeros(8, 8, 1, dtype=torch.bfloat16)), "must match x_in's"),
    ]
    for args, match in bad:
        try:
            mc.run_mixed_comm(args[0], h, *args[1:])
            f.check(False, f"no ValueError for {match}")
        except ValueError as e:
            f.check(match.replace("\\", "") in str(e) or _search(match, str(e)), f"{match}: {e}")
    big = torch.zeros(8, 8, dtype=torch.bfloat16)
    try:
        mc.run_mixed_comm(Op.ALLGATHER, h, big[:4], big)
        f.check(False, "no ValueError for an overlapping x_out")
    except ValueError as e:
        f.check("overlap" in str(e), str(e))
    for obj, exc in (("x", TypeError),):
        try:
            mc.run_mixed_comm(Op.ALLGATHER, h, obj)
            f.check(False, "no TypeError for a non-tensor")
        except exc:
            pass
    h.shutdown()
    try:
        h.shutdown()
        f.check(False, "a second shutdown passed")
    except RuntimeError:
        pass
    try:
        mc.run_mixed_comm(Op.ALLGATHER, h, x)
        f.check(False, "a shut-down handler ran")
    except ValueError:
        pass
    return f.messages


def _search(pattern, text):
    import re

    return re.search(pattern, text) is not None


def _rank_all_errors(rank, world):
    return _rank_constructor_errors(rank, world) + _rank_errors(rank, world)


def test_argument_and_constructor_errors_before_any_communication():
    assert_no_failures(run_ranks(_rank_all_errors, 2, timeout_s=RANKS_TIMEOUT_S))


def _rank_constructor_errors(rank, world):
    f = Failures()
    cases = [
        (dict(dtype=torch.float32), TypeError, "dtype"),
        (dict(world_rank=1 - rank, local_rank=1 - rank), ValueError, "torch.distributed has rank"),
        (dict(min_block_size=100), ValueError, "multiple of 32"),
        (dict(max_block_size=128), ValueError, "max_block_size"),
        (dict(grid_size=0), ValueError, "grid_size"),
    ]
    for kw, exc, match in cases:
        args = dict(world_rank=rank, world_size=world, local_rank=rank, local_size=world,
                    inter_rank=0, inter_size=1, local_tp_size=None, local_dp_size=None,
                    inter_tp_size=None, inter_dp_size=None, dtype=torch.float16,
                    device=torch.device("cpu"), use_autotune=False)  # fmt: skip
        args.update(kw)
        try:
            mc.MixedCommHandler(**args)
            f.check(False, f"no {exc.__name__} for {kw}")
        except exc as e:
            f.check(match in str(e), f"{kw}: {e}")
    return f.messages


def _rank_autotune(rank, world):
    f = Failures()
    mc.autotune_ladder = lambda dp: [8192, 16384, 32768]  # a short ladder on CPU
    h = mc.MixedCommHandler(rank, world, rank, world, 0, 1, 2, 2, None, None, torch.float16,
                            torch.device("cpu"), use_autotune=True)  # fmt: skip
    f.check(Mode.AUTOTUNE in h.valid_mode_list, "AUTOTUNE not listed")
    f.check(set(h.autotune_map) == set(h.valid_op_list), f"map {h.autotune_map}")
    every = [None] * world
    torch.distributed.all_gather_object(every, {k.name: v for k, v in h.autotune_map.items()})
    f.check(all(e == every[0] for e in every), f"ranks chose differently: {every}")
    for rung in h.autotune_map.values():
        f.check(len(rung) == 3 and all(m in (Mode.NCCL_ONE, Mode.NCCL_TP_DP) for m in rung), rung)
    x = torch.rand(8, 4096).half()  # 64 KiB: the last rung
    f.check(h.select_autotune_mode(Op.ALLREDUCE_ALLGATHER, x)
            == h.autotune_map[Op.ALLREDUCE_ALLGATHER][2], "rung of 64 KiB")  # fmt: skip
    f.check(h.select_autotune_mode(Op.REDUCESCATTER_ALLREDUCE, x[:2])
            == h.autotune_map[Op.REDUCESCATTER_ALLREDUCE][0], "rung of 8 KiB / dp")  # fmt: skip
    xs = _inputs(5, world, (4, 16), torch.float16)
    got = mc.run_mixed_comm(Op.ALLREDUCE_ALLGATHER, h, xs[rank])  # mode None: AUTOTUNE
    want = mixed_comm_reference(Op.ALLREDUCE_ALLGATHER, xs, h.para_info.of)[rank]
    f.check(torch.equal(got, want), "AUTOTUNE result")
    h.shutdown()
    return f.messages


def test_autotune_picks_one_mode_on_every_rank():
    assert_no_failures(run_ranks(_rank_autotune, 4, timeout_s=RANKS_TIMEOUT_S))


# --- the reference ----------------------------------------------------------------------------


def test_reference_by_hand():
    # tp 2 x dp 2: ranks 0 (t0 d0), 1 (t1 d0), 2 (t0 d1), 3 (t1 d1).
    xs = [torch.full((2, 8), float(w + 1)) for w in range(4)]
    of = MixedTopology.make(0, 4, 0, 4, 0, 1, 2, 2).of
    ag = mixed_comm_reference(Op.ALLREDUCE_ALLGATHER, xs, of)[0]
    assert ag.shape == (4, 8) and ag[:2].eq(3).all() and ag[2:].eq(7).all()
    rs = mixed_comm_reference(Op.REDUCESCATTER_ALLREDUCE, xs, of)
    assert all(r.shape == (1, 8) and r.eq(10).all() for r in rs)
    rows = [torch.arange(4.0).repeat_interleave(8).view(4, 8) * (w + 1) for w in range(2)]
    of2 = MixedTopology.make(0, 2, 0, 2, 0, 1, 1, 2).of
    rs2 = mixed_comm_reference(Op.REDUCESCATTER, rows, of2)
    assert torch.equal(rs2[1], rows[0][2:] + rows[1][2:])
    ar = mixed_comm_reference(Op.ALLREDUCE, rows, MixedTopology.make(0, 2, 0, 2, 0, 1).of)
    assert torch.equal(ar[0], rows[0] * 3)
