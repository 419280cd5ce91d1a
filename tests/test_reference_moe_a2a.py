"""The MoE all-to-all references against hand-computed cases and scalar oracles (CPU only)."""

import secrets

import numpy as np
import pytest
import torch

from fusedcomm.reference import (
    combine_reference,
    combine_sum,
    combine_sum_steps,
    dispatch_reference,
    expert_owner,
    received_rows,
    sanitize_reference,
)

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
I32 = torch.int32


@pytest.fixture
def gen():
    seed = secrets.randbits(31)
    print(f"generator seed {seed}")  # shown by pytest when the test fails
    return torch.Generator().manual_seed(seed)


def _ids(rows, top_k=3):
    """int32 [len(rows), top_k]; ``top_k`` only matters for an empty list."""
    return torch.tensor(rows, dtype=I32).reshape(len(rows), len(rows[0]) if rows else top_k)


def _values(gen, shape, dtype, spread=8):
    """Random non-zero values over a wide range of magnitudes (so summation order shows)."""
    x = torch.randn(shape, generator=gen) * torch.exp2(
        torch.randint(-spread, spread, shape, generator=gen).float()
    )
    return torch.where(x == 0, torch.full_like(x, 0.75), x).to(dtype)


# --- expert owners ----------------------------------------------------------------------------


def test_expert_owner_uneven_split_by_hand():
    # E=10, W=4: base 2, rem 2; ranks 0 and 1 own three experts, ranks 2 and 3 two.
    owners = expert_owner(torch.arange(10, dtype=I32), 10, 4)
    assert owners.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    assert owners.dtype == I32
    # E=7, W=3: base 2, rem 1; rank 0 owns 0..2, rank 1 3..4, rank 2 5..6.
    assert expert_owner(torch.arange(7), 7, 3).tolist() == [0, 0, 0, 1, 1, 2, 2]
    # E=8, W=2 (divisible): e // 4; E=W: one expert each.
    assert expert_owner(torch.arange(8), 8, 2).tolist() == [0] * 4 + [1] * 4
    assert expert_owner(torch.arange(5), 5, 5).tolist() == [0, 1, 2, 3, 4]


def test_expert_owner_out_of_range_ids_and_shape():
    ids = torch.tensor([[-1, 10, 9], [2**31 - 1, -(2**31), 0]], dtype=I32)
    assert expert_owner(ids, 10, 4).tolist() == [[-1, -1, 3], [-1, -1, 0]]
    with pytest.raises(ValueError, match="num_experts"):
        expert_owner(ids, 3, 4)
    with pytest.raises(TypeError, match="integer"):
        expert_owner(ids.float(), 10, 4)


@pytest.mark.parametrize(("num_experts", "ep_size"), [(10, 4), (64, 7), (13, 13), (257, 64)])
def test_expert_owner_is_a_contiguous_ceil_floor_split(num_experts, ep_size):
    owners = expert_owner(torch.arange(num_experts), num_experts, ep_size)
    counts = torch.bincount(owners.long(), minlength=ep_size).tolist()
    base, rem = divmod(num_experts, ep_size)
    assert counts == [base + 1] * rem + [base] * (ep_size - rem)
    assert torch.all(owners[1:] >= owners[:-1])  # contiguous ranges in rank order


# --- dispatch ---------------------------------------------------------------------------------

# W=4, E=10 (owners 0,0,0,1,1,1,2,2,3,3), top_k=3, R=4. Rank 1 has no tokens.
HAND_IDS = [
    [[0, 2, 9], [4, 12, 3], [8, 7, 5]],  # owners [0,0,3] [1,-,1] [3,2,1]
    [],
    [[6, 6, -1], [1, 5, 9]],  # owners [2,2,-] [0,1,3]
    [[3, 3, 3]],  # owners [1,1,1]
]
HAND_TARGETS = [
    [[0, -1, 3], [1, -1, -1], [3, 2, 1]],
    [],
    [[2, -1, -1], [0, 1, 3]],
    [[1, -1, -1]],
]
HAND_SLOTS = [
    [[0, -1, 0], [0, -1, -1], [1, 0, 1]],
    [],
    [[0, -1, -1], [0, 0, 0]],
    [[0, -1, -1]],
]
# HAND_RECV[dst][src]: tokens of src in dst's slots 0, 1, ...
HAND_RECV = [
    [[0], [], [1], []],
    [[1, 2], [], [1], [0]],
    [[2], [], [0], []],
    [[0, 2], [], [1], []],
]


def test_dispatch_by_hand(gen):
    experts = [_ids(rows) for rows in HAND_IDS]
    hidden = [_values(gen, (len(rows), 4), BF16) for rows in HAND_IDS]
    payloads = [[h, e] for h, e in zip(hidden, experts)]
    out = dispatch_reference(experts, payloads, num_experts=10, runtime_max_tokens_per_rank=4)
    for r in range(4):
        assert torch.equal(out.target_ranks[r], _ids(HAND_TARGETS[r])), r
        assert torch.equal(out.send_indices[r], _ids(HAND_SLOTS[r])), r
    assert out.dropped == [1, 0, 1, 0]
    for dst in range(4):
        counts = [len(tokens) for tokens in HAND_RECV[dst]]
        assert out.recv_counts[dst].tolist() == counts and out.recv_counts[dst].dtype == I32
        recv_hidden, recv_ids = out.recv[dst]
        assert recv_hidden.shape == (4, 4, 4) and recv_hidden.dtype == BF16
        assert recv_ids.shape == (4, 4, 3) and recv_ids.dtype == I32
        for src, tokens in enumerate(HAND_RECV[dst]):
            n = len(tokens)
            assert torch.equal(recv_hidden[src, :n], hidden[src][tokens])
            assert torch.equal(recv_ids[src, :n], experts[src][tokens])
            assert not recv_hidden[src, n:].any()  # the reference's padding is zeros


def _oracle_dispatch(experts, payloads, num_experts, r_max):
    """The docstring's loops, scalar by scalar."""
    w = len(experts)
    base, rem = divmod(num_experts, w)

    def owner(e):
        if e < rem * (base + 1):
            return e // (base + 1)
        return rem + (e - rem * (base + 1)) // base

    counts = [[0] * w for _ in range(w)]
    recv = [[p.new_zeros((w, r_max, *p.shape[1:])) for p in payloads[0]] for _ in range(w)]
    ranks, slots, dropped = [], [], []
    for r in range(w):
        n, top_k = experts[r].shape
        rk, sl, drop = [[-1] * top_k for _ in range(n)], [[-1] * top_k for _ in range(n)], 0
        for t in range(n):
            seen = set()
            for k in range(top_k):
                e = int(experts[r][t, k])
                if not 0 <= e < num_experts:
                    drop += 1
                elif owner(e) not in seen:
                    d = owner(e)
                    seen.add(d)
                    j = counts[d][r]
                    counts[d][r] += 1
                    rk[t][k], sl[t][k] = d, j
                    for i, p in enumerate(payloads[r]):
                        recv[d][i][r, j] = p[t]
        ranks.append(torch.tensor(rk, dtype=I32).reshape(n, top_k))
        slots.append(torch.tensor(sl, dtype=I32).reshape(n, top_k))
        dropped.append(drop)
    return recv, counts, ranks, slots, dropped


def _random_round(gen, w, num_experts, top_k, r_max, hidden=5):
    """Random tokens (some ranks empty), ids with duplicates and out-of-range values; payload 0
    encodes (source rank, token) so misrouted rows show."""
    experts, payloads = [], []
    for r in range(w):
        n = int(torch.randint(0, r_max + 1, (), generator=gen)) if r % 3 else r_max
        ids = torch.randint(-2, num_experts + 2, (n, top_k), generator=gen, dtype=I32)
        if n and top_k > 1:
            ids[0, 1] = ids[0, 0]  # one duplicate at least
        tag = torch.stack([torch.full((n,), r), torch.arange(n)], dim=1).to(I32)
        payloads.append([tag, _values(gen, (n, hidden), BF16), ids.clone()])
        experts.append(ids)
    return experts, payloads


@pytest.mark.parametrize(
    ("w", "num_experts", "top_k"), [(1, 3, 2), (3, 10, 4), (8, 19, 7), (4, 4, 1)]
)
def test_dispatch_against_the_scalar_oracle(gen, w, num_experts, top_k):
    experts, payloads = _random_round(gen, w, num_experts, top_k, r_max=6)
    out = dispatch_reference(experts, payloads, num_experts, 6)
    recv, counts, ranks, slots, dropped = _oracle_dispatch(experts, payloads, num_experts, 6)
    assert out.dropped == dropped
    for q in range(w):
        assert out.recv_counts[q].tolist() == counts[q]
        assert torch.equal(out.target_ranks[q], ranks[q])
        assert torch.equal(out.send_indices[q], slots[q])
        for got, want in zip(out.recv[q], recv[q]):
            assert torch.equal(got, want)


def test_received_rows_compare_slot_orders_as_multisets(gen):
    experts, payloads = _random_round(gen, 3, 7, 3, r_max=5)
    experts[0][:3, 2] = 3  # E=7, W=3: expert 3 is rank 1's, so rank 1 gets >= 3 rows from 0
    payloads[0][2][:3, 2] = 3
    out = dispatch_reference(experts, payloads, 7, 5)
    q = 1
    counts = out.recv_counts[q]
    assert counts[0] >= 3
    # The same tokens in another slot order (reversed per source), as an atomic kernel may
    # leave them.
    shuffled = [p.clone() for p in out.recv[q]]
    for src in range(3):
        n = int(counts[src])
        for p, orig in zip(shuffled, out.recv[q]):
            p[src, :n] = orig[src, :n].flip(0)
    assert not torch.equal(shuffled[0], out.recv[q][0])
    assert all(
        torch.equal(a, b)
        for x, y in zip(received_rows(shuffled, counts), received_rows(out.recv[q], counts))
        for a, b in zip(x, y)
    )
    one = received_rows(out.recv[q][1], counts)
    assert len(one) == 3 and all(isinstance(t, torch.Tensor) for t in one)
    assert [t.shape[0] for t in one] == counts.tolist()
    assert torch.equal(one[0], received_rows(shuffled[1], counts)[0])
    # Moving one payload's rows but not the others' breaks the tokens apart: not equal.
    broken = [p.clone() for p in out.recv[q]]
    broken[0][0, :2] = out.recv[q][0][0, [1, 0]]
    left, right = received_rows(broken, counts), received_rows(out.recv[q], counts)
    assert not all(torch.equal(a, b) for a, b in zip(left[0], right[0]))


def test_dispatch_argument_errors():
    e = _ids([[0, 1]])
    p = [[torch.ones(1, 2)]]
    with pytest.raises(ValueError, match="runtime_max_tokens_per_rank"):
        dispatch_reference([_ids([[0, 1], [1, 0]])], [[torch.ones(2, 2)]], 2, 1)
    with pytest.raises(ValueError, match="top_k"):
        dispatch_reference([torch.zeros(1, 23, dtype=I32)], [[torch.ones(1, 2)]], 2, 1)
    with pytest.raises(ValueError, match="top_k"):
        dispatch_reference([e, _ids([[0, 1, 1]])], [p[0], [torch.ones(1, 2)]], 2, 1)
    with pytest.raises(ValueError, match="payloads"):
        dispatch_reference([e], [[torch.ones(2, 2)]], 2, 2)


# --- combine ----------------------------------------------------------------------------------


def test_combine_sum_steps_by_hand():
    assert combine_sum_steps(1) == []
    assert combine_sum_steps(2) == [(0, 1)]
    assert combine_sum_steps(3) == [(0, 1), (0, 2)]
    assert combine_sum_steps(4) == [(0, 1), (2, 3), (0, 2)]
    assert combine_sum_steps(5) == [(0, 1), (0, 2), (0, 3), (0, 4)]
    assert combine_sum_steps(6) == [(0, 1), (2, 3), (4, 5), (0, 2), (0, 4)]
    assert combine_sum_steps(8) == [(0, 1), (2, 3), (4, 5), (6, 7), (0, 2), (4, 6), (0, 4)]
    assert combine_sum_steps(10) == [
        *[(k, k + 1) for k in range(0, 10, 2)],
        (0, 2),
        (4, 6),
        (0, 4),
        (0, 8),  # 8 was left over at the second level
    ]
    assert combine_sum_steps(22) == [
        *[(k, k + 1) for k in range(0, 22, 2)],
        *[(k, k + 2) for k in range(0, 20, 4)],  # 20 left over
        (0, 4),
        (8, 12),  # 16 left over
        (0, 8),
        (0, 16),
        (0, 20),
    ]
    assert combine_sum_steps(12) == [(0, k) for k in range(1, 12)]
    with pytest.raises(ValueError, match="top_k"):
        combine_sum_steps(23)


def test_combine_sum_tree_for_top_k_4_and_sequential_for_3(gen):
    t = [_values(gen, (4096,), F32, spread=24) for _ in range(4)]
    tree = (t[0] + t[1]) + (t[2] + t[3])
    seq = ((t[0] + t[1]) + t[2]) + t[3]
    assert torch.equal(combine_sum(t), tree)
    assert not torch.equal(tree, seq)  # the inputs tell the two orders apart
    assert torch.equal(combine_sum(t[:3]), (t[0] + t[1]) + t[2])
    assert not torch.equal((t[0] + t[1]) + t[2], t[0] + (t[1] + t[2]))


def test_combine_sum_tree_for_top_k_22_folds_left_overs_last(gen):
    t = [_values(gen, (4096,), F32, spread=24) for _ in range(22)]
    p = [t[k] + t[k + 1] for k in range(0, 22, 2)]  # p[i] = pair 2i, 2i+1
    q = [p[i] + p[i + 1] for i in range(0, 10, 2)]  # slots 0, 4, 8, 12, 16; p[10] left over
    top = (q[0] + q[1]) + (q[2] + q[3])  # slot 0; q[4] (slot 16) left over
    assert torch.equal(combine_sum(t), (top + q[4]) + p[10])
    assert not torch.equal((top + q[4]) + p[10], top + (q[4] + p[10]))


def test_combine_rounds_once_in_the_payload_dtype():
    # bf16: 1 + 2^-8 is a tie that rounds back to 1, but the fp32 sum 1 + 2^-8 + 2^-8 is
    # exactly 1 + 2^-7, a bf16 value: one final rounding keeps it.
    top_k = 3
    payload = torch.tensor([[[1.0], [2.0**-8], [2.0**-8]]], dtype=BF16)  # [W, R=3, H=1]
    ranks = torch.zeros(1, top_k, dtype=I32)
    slots = torch.tensor([[0, 1, 2]], dtype=I32)
    (out,) = combine_reference([payload], [ranks], [slots])
    assert out.dtype == BF16 and out.item() == 1.0 + 2.0**-7


def test_combine_missing_terms_count_as_positive_zero():
    payload = torch.tensor([[[-0.0, 3.0]]], dtype=F32)  # [W=1, R=1, H=2]
    ranks, slots = torch.tensor([[0, -1]], dtype=I32), torch.tensor([[0, -1]], dtype=I32)
    (out,) = combine_reference([payload], [ranks], [slots])
    assert out[0, 0].item() == 0.0 and not torch.signbit(out[0, 0])  # -0 + +0 = +0
    (one,) = combine_reference([payload], [ranks[:, :1]], [slots[:, :1]])  # top_k 1: no add
    assert torch.signbit(one[0, 0]) and one[0, 1].item() == 3.0


def _oracle_combine(payloads, ranks, slots, r):
    """Scalar fp32 (numpy) arithmetic along combine_sum_steps, one rounding at the end."""
    n, top_k = ranks[r].shape
    hidden = payloads[0].shape[2]
    out = torch.empty(n, hidden, dtype=payloads[0].dtype)
    for t in range(n):
        for h in range(hidden):
            acc = []
            for k in range(top_k):
                q, j = int(ranks[r][t, k]), int(slots[r][t, k])
                acc.append(
                    np.float32(payloads[q][r, j, h].float().item()) if j >= 0 else np.float32(0)
                )
            for a, b in combine_sum_steps(top_k):
                acc[a] = np.float32(acc[a] + acc[b])
            out[t, h] = torch.tensor(float(acc[0]), dtype=F32).to(out.dtype)
    return out


@pytest.mark.parametrize(
    ("w", "top_k", "dtype"), [(3, 4, BF16), (4, 3, F16), (2, 6, F32), (5, 22, BF16)]
)
def test_combine_after_dispatch_against_the_scalar_oracle(gen, w, top_k, dtype):
    num_experts, r_max, hidden = 3 * w + 1, 4, 6
    experts, payloads = _random_round(gen, w, num_experts, top_k, r_max)
    out = dispatch_reference(experts, payloads, num_experts, r_max)
    combine_in = []
    for q in range(w):
        x = _values(gen, (w, r_max, hidden), dtype)
        for src in range(w):
            x[src, int(out.recv_counts[q][src]) :] = float("nan")  # padding is never read
        combine_in.append(x)
    got = combine_reference(combine_in, out.target_ranks, out.send_indices)
    for r in range(w):
        assert got[r].shape == (experts[r].shape[0], hidden) and got[r].dtype == dtype
        assert not got[r].isnan().any()
        assert torch.equal(
            got[r], _oracle_combine(combine_in, out.target_ranks, out.send_indices, r)
        )


def test_combine_argument_errors():
    payload = torch.ones(2, 2, 3)
    ok = [torch.tensor([[0, 1]], dtype=I32)] * 2
    with pytest.raises(TypeError, match="dtype"):
        combine_reference([payload.int()] * 2, ok, ok)
    with pytest.raises(ValueError, match="both -1"):
        combine_reference([payload] * 2, ok, [torch.tensor([[0, -1]], dtype=I32)] * 2)
    with pytest.raises(ValueError, match="both -1"):
        combine_reference([payload] * 2, [torch.tensor([[2, 0]], dtype=I32)] * 2, ok)
    with pytest.raises(ValueError, match=r"\[W=2, R, H\]"):
        combine_reference([torch.ones(3, 2, 3)] * 2, ok, ok)


# --- sanitize ---------------------------------------------------------------------------------


def test_sanitize_overwrites_padding_only(gen):
    ids = torch.randint(0, 16, (3, 4, 2), generator=gen, dtype=I32)
    counts = torch.tensor([4, 0, 2], dtype=I32)
    original = ids.clone()
    out = sanitize_reference(ids, counts, invalid_expert_id=-7)
    assert torch.equal(ids, original)  # a new tensor
    assert torch.equal(out[0], ids[0])  # full: untouched, other ranks' experts included
    assert (out[1] == -7).all()  # empty source: every slot is padding
    assert torch.equal(out[2, :2], ids[2, :2]) and (out[2, 2:] == -7).all()
    with pytest.raises(ValueError, match="R, top_k"):
        sanitize_reference(ids[0], counts, -1)


# --- MX quantisation and the low-precision wire ----------------------------------------------


def test_quantize_mx_by_hand():
    from fusedcomm.reference.moe_a2a import dequantize_mx, quantize_mx

    y = torch.zeros(1, 64, dtype=BF16)
    y[0, 0], y[0, 1], y[0, 2] = 300.0, -1.0, 0.001  # block 0: max 300
    y[0, 33] = 0.75  # block 1: max 0.75; block 2 would be all zeros (none here)
    codes, sf = quantize_mx(y, "mxfp8")
    # 300 / 448 = 0.67 -> rounded up to 2^0: byte 127; 0.75 / 448 -> 2^-9: byte 118.
    assert sf.tolist() == [[127, 118]]
    values = codes.float()[0]
    assert values[0] == 288.0 and values[1] == -1.0  # E4M3 of 300 is 288 (step 32 at 256..448)
    assert values[2] == 2.0**-9  # 0.001: the smallest subnormal (error <= 2^-10 s, s = 1)
    assert values[33] * 2.0**-9 == pytest.approx(0.75)
    back = dequantize_mx(codes, sf, "mxfp8")
    assert back[0, 33] == 0.75 and back[0, 0] == 288.0
    codes4, sf4 = quantize_mx(y, "mxfp4")
    # 300 / 6 = 50 -> 2^6: byte 133; 0.75 / 6 = 0.125 -> 2^-3 (exact): byte 124.
    assert sf4.tolist() == [[133, 124]] and codes4.shape == (1, 32)
    back4 = dequantize_mx(codes4, sf4, "mxfp4")
    assert back4[0, 0] == 256.0 and back4[0, 33] == 0.75  # 300/64 = 4.69 -> 4; 0.75*8 = 6


def test_quantize_mx_all_zero_blocks_and_errors(gen):
    from fusedcomm.reference.moe_a2a import dequantize_mx, quantize_mx

    y = torch.zeros(2, 32, dtype=F16)
    for kind in ("mxfp8", "mxfp4"):
        codes, sf = quantize_mx(y, kind)
        assert sf.tolist() == [[0], [0]]
        assert not dequantize_mx(codes, sf, kind).any()
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_mx(torch.zeros(1, 48, dtype=BF16), "mxfp8")
    with pytest.raises(ValueError, match="kind"):
        quantize_mx(torch.zeros(1, 32, dtype=BF16), "nvfp4")


def test_mxfp8_error_bound(gen):
    """|x' - x| <= max(2^-4 |x|, 2^-10 s) for every value, s its block's scale (docs)."""
    from fusedcomm.reference.moe_a2a import dequantize_mx, quantize_mx
    from fusedcomm.reference.quant import ue8m0_decode

    scale = torch.exp2(torch.randint(-20, 20, (64, 1), generator=gen).float())
    y = (torch.randn(64, 256, generator=gen) * scale).to(BF16)
    codes, sf = quantize_mx(y, "mxfp8")
    err = (dequantize_mx(codes, sf, "mxfp8") - y.float()).abs()
    s = ue8m0_decode(sf).repeat_interleave(32, dim=1)
    assert bool((err <= torch.maximum(y.float().abs() * 2.0**-4, s * 2.0**-10)).all())
    m = y.float().abs().reshape(64, 8, 32).amax(-1).repeat_interleave(32, dim=1)
    assert bool((s < m / 224).all() & (s >= m / 448).all())


def test_combine_low_precision_reference(gen):
    from fusedcomm.reference.moe_a2a import (
        combine_low_precision_reference,
        dequantize_mx,
        quantize_mx,
    )

    w, r, h = 2, 3, 64
    payloads = [torch.randn(w, r, h, generator=gen).to(BF16) for _ in range(w)]
    targets = [torch.tensor([[0, 1], [1, -1]], dtype=I32), torch.tensor([[1, 0]], dtype=I32)]
    slots = [torch.tensor([[0, 2], [1, -1]], dtype=I32), torch.tensor([[0, 1]], dtype=I32)]
    got = combine_low_precision_reference(payloads, targets, slots)

    def wire(q, src, j):
        codes, sf = quantize_mx(payloads[q][src, j][None], "mxfp8")
        return dequantize_mx(codes, sf, "mxfp8")[0]

    want0 = torch.stack([wire(0, 0, 0) + wire(1, 0, 2), wire(1, 0, 1)]).to(BF16)
    want1 = (wire(1, 1, 0) + wire(0, 1, 1))[None].to(BF16)
    assert got[0].dtype == BF16 and torch.equal(got[0], want0) and torch.equal(got[1], want1)
