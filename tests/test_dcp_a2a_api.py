"""DCP all-to-all on CPU: sizes, the layout and plan held together with the C++ header (compiled
here as a host program), argument errors (raised before any module loads or any GPU work, and
all RuntimeErrors), the exported names and the reference. Kernels: tests/test_dcp_a2a_gpu.py."""

import secrets

import pytest
import torch

import fusedcomm
from fusedcomm import dcp_alltoall
from fusedcomm.jit import ALL_SPECS, DEFAULT_SPECS
from fusedcomm.reference import dcp_alltoall_reference
from fusedcomm.runtime.dcp_a2a_workspace import (
    DCP_A2A_CHANNELS,
    DCP_A2A_CHUNK_BYTES,
    DcpA2AError,
    DcpA2ALayout,
    DcpA2APlan,
)
from host_program import run_host_program

NAMES = (
    "decode_cp_a2a_workspace_size",
    "decode_cp_a2a_allocate_mnnvl_workspace",
    "decode_cp_a2a_init_workspace",
    "decode_cp_a2a_alltoall",
)


@pytest.fixture
def gen():
    seed = secrets.randbits(31)
    print(f"generator seed {seed}")  # shown by pytest when the test fails
    return torch.Generator().manual_seed(seed)


# --- names and sizes --------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_names_at_both_paths_are_one_object(name):
    assert getattr(dcp_alltoall, name) is getattr(fusedcomm, name)
    assert name in fusedcomm.__all__ and name in dcp_alltoall.__all__


def test_module_is_built_by_every_aot_set():
    assert "dcp_a2a" in ALL_SPECS and "dcp_a2a" in DEFAULT_SPECS
    assert [u.source for u in ALL_SPECS["dcp_a2a"].units] == ["dcp_a2a.cu"]


def test_workspace_size_by_hand():
    # cp 2: abort marks at 256, ready A(256 + 8) = 384, ack A(384 + 512) = 896, buffers
    # A(896 + 512) = 1408, then 2 * 32 * 2 chunks of 16 KiB.
    assert fusedcomm.decode_cp_a2a_workspace_size(2) == 1408 + 128 * 16384
    layout = DcpA2ALayout(8)
    assert (layout.ready_flags, layout.ack_flags, layout.buffers) == (384, 2432, 4480)
    sizes = [fusedcomm.decode_cp_a2a_workspace_size(w) for w in (1, 2, 4, 8, 64)]
    assert all(isinstance(s, int) and s % 128 == 0 for s in sizes)
    assert sizes == sorted(set(sizes))  # grows with cp_size


@pytest.mark.parametrize("bad", [0, 65, -1])
def test_workspace_size_rejects_bad_cp_sizes(bad):
    with pytest.raises(ValueError, match=r"cp_size \(") as info:
        fusedcomm.decode_cp_a2a_workspace_size(bad)
    assert isinstance(info.value, RuntimeError)


@pytest.mark.parametrize("bad", [2.0, True, "2", None])
def test_workspace_size_rejects_non_ints(bad):
    with pytest.raises(TypeError, match="cp_size must be an int") as info:
        fusedcomm.decode_cp_a2a_workspace_size(bad)
    assert isinstance(info.value, RuntimeError)


# --- the plan ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "o_bytes", "s_bytes", "cp", "per_unit", "units", "channels"),
    [
        (1, 256, 8, 2, 1, 1, 1),
        (16, 256, 8, 2, 1, 16, 16),
        (128, 256, 8, 2, 4, 32, 32),
        (128, 1024, 8, 4, 4, 32, 32),
        (128, 1024, 8, 8, 8, 16, 16),  # 128 // 8 = 16 channels at most
        (4096, 1024, 8, 2, 15, 274, 32),  # 16384 // 1032 = 15 entries a chunk
        (4096, 1024, 8, 64, 15, 274, 4),  # at least 4 channels
        (33, 256, 8, 1, 2, 17, 17),
        (0, 256, 8, 2, 0, 0, 0),
        (5, 16384, 8, 2, 0, 0, 0),  # one entry does not fit a chunk
    ],
)
def test_plan_by_hand(n, o_bytes, s_bytes, cp, per_unit, units, channels):
    plan = DcpA2APlan.make(n, o_bytes, s_bytes, cp)
    assert (plan.per_unit, plan.units, plan.channels) == (per_unit, units, channels)
    if units:
        rounds = [plan.rounds(c) for c in range(plan.channels)]
        assert sum(rounds) == units and max(rounds) - min(rounds) <= 1
        covered = sorted(
            e for u in range(units) for e in range(u * per_unit, min(n, (u + 1) * per_unit))
        )
        assert covered == list(range(n))  # every entry exactly once
        assert per_unit * (o_bytes + s_bytes) <= DCP_A2A_CHUNK_BYTES


_HOST_SOURCE = r"""
#include <cstdio>
#include "fusedcomm/layout/dcp_a2a.cuh"
using namespace fusedcomm;
int main() {
  printf("%d %lld %d\n", DcpA2ALayout::kChannels, (long long)DcpA2ALayout::kChunkBytes,
         DcpA2ALayout::kMaxCpSize);
  const int worlds[] = {1, 2, 3, 8, 64};
  for (int w : worlds) {
    DcpA2ALayout l{w};
    printf("L %d %lld %lld %lld %lld %lld %lld %lld\n", w, (long long)l.abort_marks(),
           (long long)l.ready_flags(), (long long)l.ack_flags(), (long long)l.buffers(),
           (long long)l.size_per_rank(), (long long)l.slot(3, 1, w - 1),
           (long long)l.buffer(31, 1, w - 1));
  }
  const long long cases[][4] = {{0, 256, 8, 2},     {1, 256, 8, 2},      {7, 1024, 8, 3},
                                {128, 256, 8, 8},   {129, 1024, 16, 5},  {5000, 1024, 8, 2},
                                {5, 16384, 8, 2},   {1000, 16000, 8, 1}, {900, 256, 8, 33},
                                {300, 256, 8, 64}};
  for (const auto& c : cases) {
    DcpA2APlan p = DcpA2APlan::make(c[0], c[1], c[2], static_cast<int>(c[3]));
    printf("P %lld %lld %lld %lld %lld %lld %d", c[0], c[1], c[2], c[3], (long long)p.per_unit,
           (long long)p.units, p.channels);
    for (int ch = 0; ch < 3; ++ch) printf(" %lld", (long long)p.rounds(ch));
    printf("\n");
  }
}
"""


def test_layout_and_plan_match_the_header(tmp_path):
    out = run_host_program(tmp_path, "dcp_layout", _HOST_SOURCE).split("\n")
    assert out[0].split() == [str(DCP_A2A_CHANNELS), str(DCP_A2A_CHUNK_BYTES), "64"]
    lines = [line.split() for line in out[1:] if line]
    for kind, *values in lines:
        v = [int(x) for x in values]
        if kind == "L":
            w, *offsets = v
            layout = DcpA2ALayout(w)
            expect = [
                layout.abort_marks,
                layout.ready_flags,
                layout.ack_flags,
                layout.buffers,
                layout.size_per_rank,
                layout.slot(3, 1, w - 1),
                layout.buffer(31, 1, w - 1),
            ]
            assert offsets == expect, w
            assert layout.size_per_rank == fusedcomm.decode_cp_a2a_workspace_size(w)
        else:
            n, o, s, cp, *got = v
            plan = DcpA2APlan.make(n, o, s, cp)
            assert got == [plan.per_unit, plan.units, plan.channels] + [
                plan.rounds(c) for c in range(3)
            ], (n, o, s, cp)


# --- argument errors --------------------------------------------------------------------------

CP = 2


def _ws(rows=CP, dtype=torch.int64, device="cpu", size=None):
    n = (size or fusedcomm.decode_cp_a2a_workspace_size(CP)) // 8
    return torch.zeros(rows, n, dtype=dtype, device=device)


def _inputs(n=4, dv=128, s=2, dtype=torch.bfloat16, cp=CP):
    return torch.zeros(n, cp, dv, dtype=dtype), torch.zeros(n, cp, s, dtype=torch.float32)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"workspace": _ws()}, ValueError, "CUDA memory"),
        ({"workspace": _ws(dtype=torch.uint8)}, TypeError, "int64"),
        ({"workspace": torch.zeros(64, dtype=torch.int64)}, ValueError, "2-D"),
        ({"workspace": _ws(rows=3)}, ValueError, r"size\(0\) \(3\) must equal cp_size \(2\)"),
        ({"workspace": _ws(size=4096)}, ValueError, "must hold"),
        ({"workspace": "ws"}, TypeError, "torch.Tensor"),
        ({"cp_rank": 2}, ValueError, r"cp_rank \(2\) must be in \[0, 1\]"),
        ({"cp_rank": -1}, ValueError, r"cp_rank \(-1\)"),
        ({"cp_rank": 0.0}, TypeError, "cp_rank must be an int"),
        ({"cp_size": 0}, ValueError, r"cp_size \(0\)"),
    ],
)
def test_init_rejects_bad_arguments(kwargs, error, match):
    args = {"workspace": _ws(), "cp_rank": 0, "cp_size": CP}
    args.update(kwargs)
    with pytest.raises(error, match=match) as info:
        fusedcomm.decode_cp_a2a_init_workspace(**args)
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, DcpA2AError)


def _bad_calls():
    o, s = _inputs()
    yield "float64 partial_o", (o.double(), s), TypeError, "float16 or bfloat16"
    yield "float32 partial_o", (o.float(), s), TypeError, "float16 or bfloat16"
    yield "half stats", (o, s.half()), TypeError, "float32"
    yield "odd S", _inputs(s=1), ValueError, r"S \(1\) must be even"
    yield "S 3", _inputs(s=3), ValueError, r"S \(3\) must be even"
    yield "batch mismatch", (o, torch.zeros(8, CP, 2)), ValueError, "same leading sizes"
    yield "ndim mismatch", (o, s[0]), ValueError, "same number of dimensions"
    yield "1-D", (o[0, 0], s[0, 0]), ValueError, "same number of dimensions"
    yield "cp axis", _inputs(cp=3), ValueError, r"second-to-last size \(3\)"
    yield "Dv 4", _inputs(dv=4), ValueError, "multiple of 16 bytes"
    yield "Dv 12", _inputs(dv=12), ValueError, "multiple of 16 bytes"
    yield "too wide", _inputs(dv=8192), ValueError, "must fit a chunk"
    wide = torch.zeros(4, CP, 256, dtype=torch.bfloat16)
    yield "strided", (wide[..., :128], s), ValueError, "contiguous"
    yield "cpu", (o, s), ValueError, "must be on one GPU"
    yield "not tensors", ([0], s), TypeError, "torch.Tensor"


@pytest.mark.parametrize(
    ("args", "error", "match"), [c[1:] for c in _bad_calls()], ids=[c[0] for c in _bad_calls()]
)
def test_alltoall_rejects_bad_inputs(args, error, match):
    with pytest.raises(error, match=match) as info:
        fusedcomm.decode_cp_a2a_alltoall(*args, _ws(), 0, CP)
    assert isinstance(info.value, RuntimeError)


def _bad_outs():
    """(name, inputs, out, error, match) of calls whose ``out`` is wrong."""
    o, s = _inputs()
    yield "tensor", (o, s), o.clone(), TypeError, "pair"
    yield "one", (o, s), (o.clone(),), TypeError, "pair"
    yield "shape", (o, s), (o[:2].clone(), s.clone()), ValueError, r"out\[0\]"
    yield "dtype", (o, s), (o.half(), s.clone()), ValueError, r"out\[0\]"
    yield "stats shape", (o, s), (o.clone(), s[:, :, :1].clone()), ValueError, r"out\[1\]"
    yield "aliases input", (o, s), (o, s.clone()), ValueError, "must not overlap the inputs"
    both = torch.zeros(o.numel() * 2, dtype=torch.uint8)
    shared = (both.view(torch.bfloat16).view(o.shape), both[: s.numel() * 4].view(torch.float32))
    yield "outputs overlap", (o, s), (shared[0], shared[1].view(s.shape)), ValueError, "two outputs"


@pytest.mark.parametrize(
    ("inputs", "out", "error", "match"),
    [c[1:] for c in _bad_outs()],
    ids=[c[0] for c in _bad_outs()],
)
def test_alltoall_rejects_bad_outputs(inputs, out, error, match):
    with pytest.raises(error, match=match) as info:
        fusedcomm.decode_cp_a2a_alltoall(*inputs, _ws(), 0, CP, out=out)
    assert isinstance(info.value, RuntimeError)


@pytest.mark.parametrize(
    ("rank", "size", "error", "match"),
    [
        (2, 2, ValueError, r"cp_rank \(2\)"),
        (0, 0, ValueError, r"cp_size \(0\)"),
        (0, 65, ValueError, r"cp_size \(65\)"),
        ("0", 2, TypeError, "cp_rank must be an int"),
    ],
)
def test_alltoall_rejects_bad_ranks(rank, size, error, match):
    o, s = _inputs()
    with pytest.raises(error, match=match) as info:
        fusedcomm.decode_cp_a2a_alltoall(o, s, _ws(), rank, size)
    assert isinstance(info.value, RuntimeError)


def test_allocate_rejects_a_non_mapping():
    with pytest.raises(TypeError, match="must be a Mapping") as info:
        fusedcomm.decode_cp_a2a_allocate_mnnvl_workspace(object())
    assert isinstance(info.value, RuntimeError)


def test_op_is_registered_with_its_aliasing():
    schema = str(torch.ops.fusedcomm.decode_cp_a2a_alltoall.default._schema)
    assert schema.startswith("fusedcomm::decode_cp_a2a_alltoall(Tensor partial_o,")
    for fragment in (
        "Tensor(a!) workspace",
        "Tensor(b!) partial_o_out",
        "Tensor(c!) softmax_stats_out",
    ):
        assert fragment in schema, schema


# --- the reference ----------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("lead", [(5,), (2, 3), ()])
def test_reference_is_the_transpose_across_ranks(gen, world, lead):
    po = [torch.randn(*lead, world, 16, generator=gen).to(torch.bfloat16) for _ in range(world)]
    ss = [torch.randn(*lead, world, 2, generator=gen) for _ in range(world)]
    out_o, out_s = dcp_alltoall_reference(po, ss)
    for r in range(world):
        assert out_o[r].shape == po[r].shape and out_o[r].dtype == torch.bfloat16
        for p in range(world):
            assert torch.equal(out_o[r][..., p, :], po[p][..., r, :])
            assert torch.equal(out_s[r][..., p, :], ss[p][..., r, :])
    if world > 1:  # a reference that ignored the ranks would be caught
        assert not torch.equal(out_o[0], po[0])


def test_reference_rejects_mismatched_ranks():
    with pytest.raises(ValueError, match=r"\[\.\.\., 2, \*\]"):
        dcp_alltoall_reference([torch.zeros(3, 3, 8)] * 2, [torch.zeros(3, 2, 2)] * 2)
