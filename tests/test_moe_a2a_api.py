"""MoE all-to-all frontends on CPU: argument errors raised before any kernel module loads or any
GPU work, the sizing entry points, the exported names, and two facts held together with the C++
side (the module's unit count, the combine summation tree, compiled here as a host program).
The kernels themselves are tested in tests/test_moe_a2a_gpu.py."""

import re
import struct
from pathlib import Path

import pytest
import torch

import fusedcomm
from fusedcomm import Mapping, MoeAlltoAll
from fusedcomm.jit import moe_a2a as jit_moe_a2a
from fusedcomm.ops.moe_alltoall import MoeA2AArgumentError, MoeA2AStateError
from fusedcomm.reference.moe_a2a import combine_sum, combine_sum_steps
from fusedcomm.runtime.moe_a2a_workspace import moe_a2a_metainfo
from host_program import run_host_program

ROOT = Path(__file__).resolve().parents[1]
W = 2  # ep_size of the CPU cases


def _ws(rows=W, size=4096, dtype=torch.uint8, device="cpu"):
    return torch.zeros(rows, size, dtype=dtype, device=device)


# --- moe_a2a_initialize: checks that come before the module or the device --------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"workspace": _ws()}, ValueError, "CUDA memory"),
        ({"workspace": _ws(dtype=torch.int32)}, TypeError, "uint8"),
        ({"workspace": torch.zeros(W * 4096, dtype=torch.uint8)}, ValueError, "2-D"),
        ({"workspace": torch.zeros(W, 2, 64, dtype=torch.uint8)}, ValueError, "2-D"),
        ({"workspace": _ws(rows=3)}, ValueError, r"size\(0\) \(3\) must equal ep_size \(2\)"),
        ({"workspace": [[0] * 16] * W}, TypeError, "torch.Tensor"),
        ({"ep_rank": 2}, ValueError, r"ep_rank \(2\) must be in \[0, 1\]"),
        ({"ep_rank": -1}, ValueError, r"ep_rank \(-1\)"),
        ({"ep_rank": 1.0}, TypeError, "ep_rank must be an int"),
        ({"ep_rank": True}, TypeError, "ep_rank must be an int"),
        ({"ep_size": 0}, ValueError, r"ep_size \(0\)"),
        ({"max_num_tokens": 0}, ValueError, r"max_num_tokens \(0\)"),
        ({"eplb_stats_num_experts": -1}, ValueError, "eplb_stats_num_experts"),
    ],
)
def test_initialize_rejects_bad_arguments(kwargs, error, match):
    args = {"workspace": _ws(), "ep_rank": 0, "ep_size": W, "max_num_tokens": 8}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        fusedcomm.moe_a2a_initialize(**args)


# --- calls on a workspace this process never initialised ----------------------------------------


def test_calls_on_an_uninitialised_workspace_raise_value_error():
    ws = _ws()
    metainfo = moe_a2a_metainfo(W, 8)
    experts = torch.zeros(4, 2, dtype=torch.int32)
    hidden = torch.zeros(4, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="not initialised"):
        fusedcomm.moe_a2a_dispatch(experts, [hidden], ws, metainfo, 4, 0, W, 2, 8)
    with pytest.raises(ValueError, match="not initialised"):
        fusedcomm.moe_a2a_combine(torch.zeros(W, 4, 64), 4, ws, metainfo, 4, 0, W, 2, 4096)
    with pytest.raises(ValueError, match="not initialised"):
        fusedcomm.moe_a2a_sanitize_expert_ids(
            torch.zeros(W, 4, 2, dtype=torch.int32), ws, metainfo, 0, -1
        )
    with pytest.raises(ValueError, match="not initialised"):
        fusedcomm.moe_a2a_dropped_expert_ids(ws, 0)
    with pytest.raises(TypeError, match="workspace must be a torch.Tensor"):
        fusedcomm.moe_a2a_dispatch(experts, [hidden], None, metainfo, 4, 0, W, 2, 8)


# --- MoeAlltoAll construction: checks before any allocation ------------------------------------


def _mapping(rank=0, world=W):
    return Mapping(world, rank, tp_size=world, moe_ep_size=world)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"top_k": 0}, "top_k must be a positive int"),
        ({"top_k": -3}, "top_k must be a positive int"),
        ({"top_k": 2.0}, "top_k must be a positive int"),
        ({"top_k": True}, "top_k must be a positive int"),
        ({"top_k": 23}, r"top_k \(23\) must be <= 22"),
        ({"num_experts": -1}, "num_experts must be a positive int"),
        ({"num_experts": 0}, "num_experts must be a positive int"),
        ({"num_experts": "8"}, "num_experts must be a positive int"),
        ({"num_experts": 1}, r"num_experts \(1\) must be >= the EP size \(2\)"),
        ({"max_num_tokens": 0}, "max_num_tokens must be a positive int"),
        ({"workspace_size_per_rank": 0}, "workspace_size_per_rank must be a positive int"),
    ],
)
def test_moe_alltoall_rejects_bad_arguments(kwargs, match):
    args = {"max_num_tokens": 16, "top_k": 2, "num_experts": 8, "hidden_size": 256}
    args.update(kwargs)
    cached = dict(MoeAlltoAll._WORKSPACE_CACHE)
    with pytest.raises(ValueError, match=match):
        MoeAlltoAll(_mapping(), **args)
    assert MoeAlltoAll._WORKSPACE_CACHE == cached  # nothing was created


def test_moe_alltoall_needs_a_size_or_a_hidden_size():
    cached = dict(MoeAlltoAll._WORKSPACE_CACHE)
    with pytest.raises(AssertionError, match="hidden_size is required"):
        MoeAlltoAll(_mapping(), 16, 2, 8)
    with pytest.raises(AssertionError, match="hidden_size is required"):
        MoeAlltoAll(_mapping(1), 16, 2, 8, workspace_size_per_rank=None, hidden_size=None)
    assert MoeAlltoAll._WORKSPACE_CACHE == cached


def test_error_classes_keep_the_assertion_contract():
    assert issubclass(MoeA2AStateError, RuntimeError)
    assert issubclass(MoeA2AStateError, AssertionError)
    assert issubclass(MoeA2AArgumentError, ValueError)
    assert issubclass(MoeA2AArgumentError, AssertionError)
    assert issubclass(fusedcomm.PeerTimeoutError, fusedcomm.CommFailureError)
    assert issubclass(fusedcomm.PeerAbortedError, fusedcomm.CommFailureError)


# --- sizing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ep_size", "top_k", "max_tokens", "hidden", "extra", "eplb"),
    [
        (2, 1, 1, 16, 0, 0),
        (2, 8, 1024, 7168, 0, 0),
        (4, 22, 17, 2048, 16, 0),
        (8, 5, 300, 4096, 3, 64),
        (16, 2, 4096, 7168, 0, 0),
    ],
)
def test_static_workspace_size_uses_the_documented_per_token_sizes(
    ep_size, top_k, max_tokens, hidden, extra, eplb
):
    got = MoeAlltoAll.get_moe_workspace_size_per_rank(
        ep_size, top_k, max_tokens, hidden, extra, eplb
    )
    dispatch = 2 * hidden + 4 * top_k + 4 * top_k + extra
    want = fusedcomm.moe_a2a_get_workspace_size_per_rank(
        ep_size, max_tokens, dispatch, 2 * hidden, eplb
    )
    assert got == want
    assert got % 128 == 0


def test_trtllm_moe_alltoall_exposes_the_same_objects():
    from fusedcomm import trtllm_moe_alltoall as sub

    for name in sub.__all__:
        assert getattr(sub, name) is getattr(fusedcomm, name), name
    for name in (
        "MoeAlltoAll",
        "moe_a2a_initialize",
        "moe_a2a_dispatch",
        "moe_a2a_combine",
        "moe_a2a_sanitize_expert_ids",
        "moe_a2a_get_workspace_size_per_rank",
        "moe_a2a_wrap_payload_tensor_in_workspace",
    ):
        assert name in sub.__all__ and name in fusedcomm.__all__, name
    assert "moe_a2a_dropped_expert_ids" in fusedcomm.__all__


# --- held together with the C++ side ------------------------------------------------------------


def test_jit_parts_equal_the_header():
    text = (ROOT / "csrc" / "moe_a2a.h").read_text()
    found = re.findall(r"constexpr\s+int\s+kMoeA2AParts\s*=\s*(\d+)\s*;", text)
    assert len(found) == 1, "csrc/moe_a2a.h must define kMoeA2AParts once"
    assert jit_moe_a2a.PARTS == int(found[0])
    units = [u.source for u in jit_moe_a2a.spec().units]
    assert units.count("moe_a2a_kernels.cu") == jit_moe_a2a.PARTS
    assert sorted(set(units) - {"moe_a2a_kernels.cu"}) == [
        "moe_a2a.cu",
        "moe_a2a_quant.cu",
        "moe_a2a_sanitize.cu",
    ]


def _f32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def _sum_terms(k: int) -> list[float]:
    # fp32 values of mixed magnitudes and signs, so another order rounds differently.
    gen = torch.Generator().manual_seed(100 + k)
    mant = torch.rand(k, generator=gen) * 2 - 1
    scale = 2.0 ** torch.randint(-12, 13, (k,), generator=gen).float()
    return (mant * scale).tolist()


def _cpp_trees(tmp_path) -> dict[int, tuple[list[tuple[int, int]], int]]:
    body = []
    for k in range(1, 23):
        terms = ", ".join(f"{_f32_bits(x)}u" for x in _sum_terms(k))
        body.append(f"  show<{k}>({{{terms}}});")
    out = run_host_program(
        tmp_path,
        "combine_tree",
        "#include <cstdint>\n#include <cstdio>\n#include <cstring>\n"
        '#include "fusedcomm/proto/combine_sum.cuh"\n'
        "using fusedcomm::CombineTree;\n"
        "template <int K>\n"
        "void show(const uint32_t (&bits)[K]) {\n"
        "  constexpr CombineTree<K> tree{};\n"
        '  std::printf("%d %d", K, tree.steps);\n'
        '  for (int s = 0; s < tree.steps; ++s) std::printf(" %d %d", tree.a[s], tree.b[s]);\n'
        "  float acc[K];\n"
        "  std::memcpy(acc, bits, sizeof(acc));\n"
        "  const float sum = fusedcomm::combine_sum<K>(acc);\n"
        "  uint32_t out;\n"
        "  std::memcpy(&out, &sum, 4);\n"
        '  std::printf(" %u\\n", out);\n'
        "}\n"
        "int main() {\n" + "\n".join(body) + "\n  return 0;\n}\n",
    )
    trees = {}
    for line in out.splitlines():
        v = [int(x) for x in line.split()]
        k, steps, pairs, bits = v[0], v[1], v[2:-1], v[-1]
        assert len(pairs) == 2 * steps, line
        trees[k] = ([(pairs[i], pairs[i + 1]) for i in range(0, len(pairs), 2)], bits)
    return trees


def test_combine_tree_of_the_header_equals_the_reference(tmp_path):
    trees = _cpp_trees(tmp_path)
    assert sorted(trees) == list(range(1, 23))
    for k, (steps, bits) in trees.items():
        assert steps == combine_sum_steps(k), f"top_k {k}"
        assert len(steps) == k - 1, f"top_k {k}"
        terms = [torch.tensor([x], dtype=torch.float32) for x in _sum_terms(k)]
        ref = combine_sum(terms)
        assert bits == _f32_bits(float(ref[0])), f"top_k {k}: combine_sum differs in the last bits"
