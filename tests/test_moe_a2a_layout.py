"""The MoE all-to-all workspace layout, sizes, metainfo and payload views (CPU only).

Offsets are checked against hand-computed values and against the C++ layout header
(include/fusedcomm/layout/moe_a2a.cuh), compiled here as a host program.
"""

import secrets
from pathlib import Path

import pytest
import torch

import fusedcomm
from fusedcomm.runtime.moe_a2a_workspace import (
    MoeA2ALayout,
    moe_a2a_get_workspace_size_per_rank,
    moe_a2a_metainfo,
    moe_a2a_wrap_payload_tensor_in_workspace,
    moe_workspace_size_per_rank,
)
from host_program import run_host_program

ROOT = Path(__file__).resolve().parents[1]
wrap = moe_a2a_wrap_payload_tensor_in_workspace


@pytest.fixture
def gen():
    seed = secrets.randbits(31)
    print(f"generator seed {seed}")  # shown by pytest when the test fails
    return torch.Generator().manual_seed(seed)


def _bytes(gen, shape):
    return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)


# --- offsets and sizes, by hand ---------------------------------------------------------------

# W=2, M=3: send 8, recv 8+8=16, dispatch flags A(8+16)=128, combine flags A(128+8)=256,
# target ranks A(256+8)=384, send indices A(384+264)=768, EPLB A(768+264)=1152, payload 1152.
W2_M3 = [0, 4, 8, 16, 128, 256, 384, 768, 1152]
# W=8, M=5: recv 8+32=40, dispatch flags A(72)=128, combine flags A(160)=256, target ranks
# A(288)=384, send indices A(384+440)=896, EPLB A(896+440)=1408; with n=10 the EPLB region
# is 4*8*10=320 bytes, payload A(1408+320)=1792; without it the payload starts at 1408.
W8_M5 = [0, 4, 8, 40, 128, 256, 384, 896, 1408]
W8_M5_EPLB10 = [0, 4, 8, 40, 128, 256, 384, 896, 1408, 1792]


def test_offsets_by_hand():
    assert moe_a2a_metainfo(2, 3).tolist() == W2_M3
    assert moe_a2a_metainfo(8, 5).tolist() == W8_M5
    assert moe_a2a_metainfo(8, 5, eplb_stats_num_experts=10).tolist() == W8_M5_EPLB10
    layout = MoeA2ALayout(8, 5, 10)
    assert (layout.eplb_gathered_stats, layout.eplb_stats_bytes, layout.payload_data) == (
        1408,
        320,
        1792,
    )


def test_metainfo_is_a_cpu_int64_tensor_of_9_or_10_entries():
    plain, eplb = moe_a2a_metainfo(4, 7), moe_a2a_metainfo(4, 7, 3)
    assert plain.dtype == eplb.dtype == torch.int64
    assert plain.device.type == eplb.device.type == "cpu"
    assert (plain.numel(), eplb.numel()) == (9, 10)
    # The first nine fields coincide; the EPLB entry sits where the payload was.
    assert eplb[:8].tolist() == plain[:8].tolist() and eplb[8] == plain[8]
    assert eplb[9] > plain[8]


def test_workspace_sizes_by_hand():
    # A(1152) + A(2*3*100 = 600) + A(2*3*64 = 384) = 1152 + 640 + 384
    assert moe_a2a_get_workspace_size_per_rank(2, 3, 100, 64) == 2176
    # A(1792) + A(8*5*100 = 4000) + A(8*5*64 = 2560) = 1792 + 4096 + 2560
    assert moe_a2a_get_workspace_size_per_rank(8, 5, 100, 64, eplb_stats_num_experts=10) == 8448
    assert moe_a2a_get_workspace_size_per_rank(8, 5, 100, 64) == 1408 + 4096 + 2560


def test_moe_alltoall_static_sizing_by_hand():
    # W=8, top_k=2, M=4, hidden 7168: dispatch 2*7168 + 8 + 8 = 14352, combine 14336 bytes;
    # aux 1152, 32 slots: 32*14352 = 459264 and 32*14336 = 458752 (both 128-aligned).
    assert moe_workspace_size_per_rank(8, 2, 4, 7168) == 1152 + 459264 + 458752
    # W=2, top_k=3, M=3, hidden 10, extra 5: dispatch 20+12+12+5 = 49, combine 20;
    # 1152 + A(294) + A(120) = 1152 + 384 + 128.
    assert moe_workspace_size_per_rank(2, 3, 3, 10, extra_payload_bytes_per_token=5) == 1664
    assert moe_workspace_size_per_rank(
        2, 3, 3, 10, 5, eplb_stats_num_experts=4
    ) == moe_a2a_get_workspace_size_per_rank(2, 3, 49, 20, 4)


def test_round_payload_offsets_by_hand():
    layout = MoeA2ALayout(2, 3)
    # R=2, payloads of 12, 4 and 2 bytes per token: 4 slots each, back to back from 1152.
    assert layout.dispatch_payload_offsets(2, [12, 4, 2]) == [1152, 1200, 1216]
    assert layout.combine_payload_offset(2, [12, 4, 2]) == 1280  # A(1216 + 8)
    # A round of M tokens with everything in one payload fits the size it was sized for.
    size = layout.size_per_rank(18, 6)
    assert layout.combine_payload_offset(3, [18]) + 2 * 3 * 6 <= size


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda: moe_a2a_get_workspace_size_per_rank(0, 3, 1, 1), ValueError),
        (lambda: moe_a2a_get_workspace_size_per_rank(65, 3, 1, 1), ValueError),
        (lambda: moe_a2a_get_workspace_size_per_rank(2, 0, 1, 1), ValueError),
        (lambda: moe_a2a_get_workspace_size_per_rank(2, 3, -1, 1), ValueError),
        (lambda: moe_a2a_get_workspace_size_per_rank(2, 3, 1, 1, -2), ValueError),
        (lambda: moe_a2a_get_workspace_size_per_rank(2, 3.0, 1, 1), TypeError),
        (lambda: moe_a2a_get_workspace_size_per_rank(True, 3, 1, 1), TypeError),
        (lambda: moe_workspace_size_per_rank(2, 23, 3, 8), ValueError),
        (lambda: moe_workspace_size_per_rank(2, 0, 3, 8), ValueError),
        (lambda: moe_workspace_size_per_rank(2, 2, 3, 0), ValueError),
        (lambda: moe_a2a_metainfo(2, 0), ValueError),
    ],
)
def test_bad_sizing_arguments_raise(call, error):
    with pytest.raises(error, match=r"ep_size|max_num_tokens|size_per_token|eplb|top_k|hidden"):
        call()


def test_top_level_exports():
    assert fusedcomm.moe_a2a_get_workspace_size_per_rank is moe_a2a_get_workspace_size_per_rank
    assert fusedcomm.moe_a2a_wrap_payload_tensor_in_workspace is wrap
    assert "moe_a2a_get_workspace_size_per_rank" in fusedcomm.__all__
    assert "moe_a2a_wrap_payload_tensor_in_workspace" in fusedcomm.__all__


# --- the C++ header computes the same numbers ---------------------------------------------------

# (W, M, n, R, dispatch payload bytes per token, combine bytes per token)
CPP_CASES = [
    (1, 1, 0, 1, [2], 2),
    (2, 3, 0, 2, [12, 4, 2], 6),
    (3, 17, 0, 5, [8, 1], 10),
    (8, 5, 10, 5, [7168, 88, 88], 7168),
    (8, 4096, 0, 1000, [14336, 8, 88, 4], 14336),
    (64, 129, 257, 100, [1, 1, 1, 1, 1, 1], 3),
]


def _cpp_numbers(tmp_path) -> list[list[int]]:
    lines = []
    for w, m, n, r, payloads, combine in CPP_CASES:
        sizes = ", ".join(str(b) for b in payloads)
        lines.append(
            f"  {{ const MoeA2ALayout l{{{w}, {m}, {n}}}; "
            f"const MoeA2ARound rd{{l, {r}, {len(payloads)}, {{{sizes}}}}};\n"
            f'    std::printf("%d", l.metainfo_fields());\n'
            f"    for (int f = 0; f < l.metainfo_fields(); ++f) "
            f'std::printf(" %lld", (long long)l.metainfo(f));\n'
            f'    std::printf(" %lld", (long long)l.size_per_rank({sum(payloads)}, {combine}));\n'
            f"    for (int i = 0; i < {len(payloads)}; ++i) "
            f'std::printf(" %lld", (long long)rd.dispatch_payload(i));\n'
            f'    std::printf(" %lld %lld\\n", (long long)rd.combine_region(), '
            f"(long long)rd.combine_end({combine})); }}"
        )
    out = run_host_program(
        tmp_path,
        "moe_a2a_layout",
        '#include <cstdio>\n#include "fusedcomm/layout/moe_a2a.cuh"\n'
        "using fusedcomm::MoeA2ALayout;\nusing fusedcomm::MoeA2ARound;\n"
        "int main() {\n" + "\n".join(lines) + "\n  return 0;\n}\n",
    )
    return [[int(v) for v in line.split()] for line in out.splitlines()]


def test_python_layout_equals_the_cpp_header(tmp_path):
    rows = _cpp_numbers(tmp_path)
    assert len(rows) == len(CPP_CASES)
    for row, (w, m, n, r, payloads, combine) in zip(rows, CPP_CASES):
        layout = MoeA2ALayout(w, m, n)
        meta = moe_a2a_metainfo(w, m, n).tolist()
        expected = [len(meta), *meta]
        expected.append(moe_a2a_get_workspace_size_per_rank(w, m, sum(payloads), combine, n))
        expected += layout.dispatch_payload_offsets(r, payloads)
        start = layout.combine_payload_offset(r, payloads)
        expected += [start, start + w * r * combine]
        assert row == expected, f"case W={w} M={m} n={n} R={r} {payloads} {combine}"


# --- typed views ------------------------------------------------------------------------------


def test_wrap_views_share_storage_with_the_workspace(gen):
    ws = _bytes(gen, (3, 64))
    start, end = 64 + 16, 64 + 48  # row 1, bytes 16..47
    view = wrap(ws, [2], start, end, torch.float32)
    assert view.shape == (2, 4) and view.dtype == torch.float32
    assert view.data_ptr() == ws[1, 16:].data_ptr()
    assert torch.equal(view.reshape(-1).view(torch.uint8), ws[1, 16:48])
    before = ws.clone()
    view[1, 3] = 1.5  # the last four bytes of the slice
    assert torch.equal(ws[1, 44:48], torch.tensor([1.5]).view(torch.uint8))
    ws_diff = (ws != before).nonzero().tolist()
    assert all(r == 1 and 44 <= c < 48 for r, c in ws_diff)


def test_wrap_strided_rows_and_one_dimensional_workspaces(gen):
    big = _bytes(gen, (3, 96))
    ws = big[:, :48]  # rows of 48 bytes, row stride 96
    view = wrap(ws, (2, 3), 2 * 96 + 4, 2 * 96 + 40, torch.int16)
    assert view.shape == (2, 3, 3)
    assert torch.equal(view.reshape(-1).view(torch.uint8), big[2, 4:40])
    with pytest.raises(ValueError, match="within one row"):  # past the row's 48 bytes
        wrap(ws, [1], 40, 56, torch.uint8)
    flat = _bytes(gen, (40,))
    view = wrap(flat, [], 8, 40, torch.bfloat16)
    assert view.shape == (16,) and view.data_ptr() == flat[8:].data_ptr()


def test_wrap_receive_views_of_a_sized_workspace(gen):
    w, m, r, hidden = 4, 6, 5, 24
    size = moe_workspace_size_per_rank(w, 2, m, hidden)
    ws = _bytes(gen, (w, size))
    layout = MoeA2ALayout(w, m)
    payload_bytes = [2 * hidden, 4 * 2, 4 * 2]
    base = layout.dispatch_payload_offsets(r, payload_bytes)
    own = 3  # the rank whose views these are
    hid = wrap(ws, [w, r], own * size + base[0], own * size + base[1], torch.bfloat16)
    ids = wrap(ws, [w, r], own * size + base[1], own * size + base[2], torch.int32)
    assert hid.shape == (w, r, hidden) and ids.shape == (w, r, 2)
    # Slot (src, j) of payload i lies at base_i + (src * R + j) * bytes_i within the row.
    src, j = 2, 4
    at = base[1] + (src * r + j) * payload_bytes[1]
    assert torch.equal(ids[src, j].view(torch.uint8), ws[own, at : at + 8])
    start = layout.combine_payload_offset(r, payload_bytes)
    comb = wrap(ws, [w, r], own * size + start, own * size + start + w * r * 2 * hidden, torch.half)
    assert comb.shape == (w, r, hidden) and start % 128 == 0


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        (((4,), 0, 6, torch.float32), ValueError, "whole number"),  # 6 bytes, 4-byte floats
        (((2,), 0, 12, torch.float32), ValueError, "whole number"),  # 3 floats into 2 rows
        (((1,), 2, 10, torch.float32), ValueError, "aligned"),
        (((1,), 60, 72, torch.uint8), ValueError, "within one row"),  # crosses into row 1
        (((1,), 3 * 64, 3 * 64 + 4, torch.uint8), ValueError, "within one row"),  # no row 3
        (((1,), 8, 8, torch.uint8), ValueError, "empty"),
        (((1,), 8, 4, torch.uint8), ValueError, "empty"),
        (((1,), -4, 4, torch.uint8), ValueError, "slice_start"),
        (((0,), 0, 4, torch.uint8), ValueError, "leading_shape"),
        ((2, 0, 4, torch.uint8), TypeError, "leading_shape"),
        (((1,), 0, 4, "float32"), TypeError, "dtype"),
    ],
)
def test_wrap_errors(gen, args, error, match):
    ws = _bytes(gen, (3, 64))
    with pytest.raises(error, match=match):
        wrap(ws, *args)


def test_wrap_rejects_other_workspace_types(gen):
    with pytest.raises(TypeError, match="uint8"):
        wrap(torch.zeros(2, 16, dtype=torch.int32), [1], 0, 4, torch.uint8)
    with pytest.raises(ValueError, match=r"\[W, S\]"):
        wrap(_bytes(gen, (2, 2, 16)), [1], 0, 4, torch.uint8)
