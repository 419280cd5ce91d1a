"""Tests for fusedcomm.mapping.Mapping (pure Python, no GPU)."""

import pytest

from fusedcomm.mapping import Mapping

AXES = ("tp", "cp", "pp", "moe_tp", "moe_ep", "moe_cluster")

# Each case: constructor kwargs, then the full list of groups per axis and the
# per-rank coordinates (tp, cp, pp, moe_tp, moe_ep, moe_cluster) for every rank.
CASES = {
    "w8_tp4_pp2": dict(
        kwargs=dict(world_size=8, tp_size=4, pp_size=2),
        sizes=dict(moe_tp_size=4, moe_ep_size=1, moe_cluster_size=1, attn_tp_size=4),
        groups=dict(
            tp=[[0, 1, 2, 3], [4, 5, 6, 7]],
            pp=[[0, 4], [1, 5], [2, 6], [3, 7]],
            cp=[[r] for r in range(8)],
            moe_tp=[[0, 1, 2, 3], [4, 5, 6, 7]],
            moe_ep=[[r] for r in range(8)],
            moe_cluster=[[r] for r in range(8)],
        ),
        coords=[(r % 4, 0, r // 4, r % 4, 0, 0) for r in range(8)],
    ),
    "w8_tp4_cp2": dict(
        kwargs=dict(world_size=8, tp_size=4, cp_size=2),
        sizes=dict(moe_tp_size=4, moe_ep_size=1, moe_cluster_size=1, attn_tp_size=8),
        groups=dict(
            tp=[[0, 1, 2, 3], [4, 5, 6, 7]],
            cp=[[0, 4], [1, 5], [2, 6], [3, 7]],
            pp=[[r] for r in range(8)],
            moe_tp=[[0, 1, 2, 3], [4, 5, 6, 7]],
            moe_ep=[[r] for r in range(8)],
            moe_cluster=[[r] for r in range(8)],
        ),
        coords=[(r % 4, r // 4, 0, r % 4, 0, 0) for r in range(8)],
    ),
    "w8_tp8_moe_tp2_ep4": dict(
        kwargs=dict(world_size=8, tp_size=8, moe_tp_size=2, moe_ep_size=4),
        sizes=dict(moe_tp_size=2, moe_ep_size=4, moe_cluster_size=1, attn_tp_size=8),
        groups=dict(
            tp=[list(range(8))],
            cp=[[r] for r in range(8)],
            pp=[[r] for r in range(8)],
            moe_tp=[[0, 4], [1, 5], [2, 6], [3, 7]],
            moe_ep=[[0, 1, 2, 3], [4, 5, 6, 7]],
            moe_cluster=[[r] for r in range(8)],
        ),
        coords=[(r, 0, 0, r // 4, r % 4, 0) for r in range(8)],
    ),
    "w16_tp8_pp2_moe_ep4": dict(
        kwargs=dict(world_size=16, gpus_per_node=8, tp_size=8, pp_size=2, moe_ep_size=4),
        sizes=dict(moe_tp_size=2, moe_ep_size=4, moe_cluster_size=1, attn_tp_size=8),
        groups=dict(
            tp=[list(range(8)), list(range(8, 16))],
            cp=[[r] for r in range(16)],
            pp=[[r, r + 8] for r in range(8)],
            moe_tp=[[0, 4], [1, 5], [2, 6], [3, 7], [8, 12], [9, 13], [10, 14], [11, 15]],
            moe_ep=[[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]],
            moe_cluster=[[r] for r in range(16)],
        ),
        coords=[(r % 8, 0, r // 8, (r % 8) // 4, r % 4, 0) for r in range(16)],
    ),
    "w8_cp2_tp2_pp2": dict(
        kwargs=dict(world_size=8, tp_size=2, pp_size=2, cp_size=2),
        sizes=dict(moe_tp_size=2, moe_ep_size=1, moe_cluster_size=1, attn_tp_size=4),
        groups=dict(
            tp=[[0, 1], [2, 3], [4, 5], [6, 7]],
            pp=[[0, 4], [1, 5], [2, 6], [3, 7]],
            cp=[[0, 2], [1, 3], [4, 6], [5, 7]],
            moe_tp=[[0, 1], [2, 3], [4, 5], [6, 7]],
            moe_ep=[[r] for r in range(8)],
            moe_cluster=[[r] for r in range(8)],
        ),
        coords=[(r % 2, (r // 2) % 2, r // 4, r % 2, 0, 0) for r in range(8)],
    ),
    "w8_tp4_pp2_moe_cluster2": dict(
        kwargs=dict(world_size=8, tp_size=4, pp_size=2, moe_cluster_size=2),
        sizes=dict(moe_tp_size=2, moe_ep_size=1, moe_cluster_size=2, attn_tp_size=4),
        groups=dict(
            tp=[[0, 1, 2, 3], [4, 5, 6, 7]],
            pp=[[0, 4], [1, 5], [2, 6], [3, 7]],
            cp=[[r] for r in range(8)],
            moe_tp=[[0, 2], [1, 3], [4, 6], [5, 7]],
            moe_ep=[[r] for r in range(8)],
            moe_cluster=[[0, 1], [2, 3], [4, 5], [6, 7]],
        ),
        coords=[(r % 4, 0, r // 4, (r % 4) // 2, 0, r % 2) for r in range(8)],
    ),
}


def _mapping(case, rank):
    return Mapping(rank=rank, **CASES[case]["kwargs"])


# Every (case, rank) pair, so a wrong rank is reported on its own.
CASE_RANKS = [
    pytest.param(case, rank, id=f"{case}-rank{rank}")
    for case in sorted(CASES)
    for rank in range(CASES[case]["kwargs"]["world_size"])
]


@pytest.mark.parametrize("case, rank", CASE_RANKS)
def test_table(case, rank):
    spec = CASES[case]
    m = _mapping(case, rank)
    for name, value in spec["sizes"].items():
        assert getattr(m, name) == value, (case, rank, name)
    assert m.attn_cp_size == 1
    coords = tuple(getattr(m, f"{axis}_rank") for axis in AXES)
    assert coords == spec["coords"][rank], (case, rank)
    for axis in AXES:
        assert getattr(m, f"{axis}_groups") == spec["groups"][axis], (case, axis)
        own = getattr(m, f"{axis}_group")
        assert own in spec["groups"][axis], (case, rank, axis)
        assert rank in own, (case, rank, axis)


@pytest.mark.parametrize("case, rank", CASE_RANKS)
def test_rank_sits_at_its_index(case, rank):
    """A rank sits at index <axis>_rank of its sorted group; MoE groups stay inside TP."""
    m = _mapping(case, rank)
    sizes = dict(
        tp=m.tp_size,
        cp=m.cp_size,
        pp=m.pp_size,
        moe_tp=m.moe_tp_size,
        moe_ep=m.moe_ep_size,
        moe_cluster=m.moe_cluster_size,
    )
    for axis in AXES:
        group = getattr(m, f"{axis}_group")
        assert len(group) == sizes[axis], axis
        assert group[getattr(m, f"{axis}_rank")] == rank, axis
        assert group == sorted(group), axis
    for axis in ("moe_tp", "moe_ep", "moe_cluster"):
        assert set(getattr(m, f"{axis}_group")) <= set(m.tp_group), axis


@pytest.mark.parametrize("case", sorted(CASES))
def test_groups_partition(case):
    """Groups cover every rank once."""
    world = CASES[case]["kwargs"]["world_size"]
    m = _mapping(case, 0)
    for axis in AXES:
        flat = sorted(r for g in getattr(m, f"{axis}_groups") for r in g)
        assert flat == list(range(world)), (case, axis)


@pytest.mark.parametrize("rank", range(16))
def test_node_and_local_rank(rank):
    m = Mapping(16, rank, 8, tp_size=8, pp_size=2)
    assert m.local_rank == rank % 8
    assert m.node_rank == rank // 8
    assert m.get_local_rank(13) == 5
    assert m.get_node_rank(13) == 1
    assert m.is_multi_node()


def test_node_and_local_rank_other_layouts():
    m = Mapping(16, 5, 4, tp_size=16)
    assert (m.local_rank, m.node_rank) == (1, 1)
    assert not Mapping(8, 0, 8, tp_size=8).is_multi_node()


def test_predicates():
    m = Mapping(8, 0, tp_size=2, pp_size=2, cp_size=2)
    assert (m.has_tp(), m.has_pp(), m.has_cp()) == (True, True, True)
    assert (m.has_moe_tp(), m.has_moe_ep(), m.has_moe_cluster()) == (True, False, False)
    m = Mapping(8, 0, tp_size=8, moe_ep_size=8)
    assert (m.has_tp(), m.has_pp(), m.has_cp()) == (True, False, False)
    assert (m.has_moe_tp(), m.has_moe_ep(), m.has_moe_cluster()) == (False, True, False)
    m = Mapping(4, 0, tp_size=4, moe_cluster_size=4)
    assert (m.has_moe_tp(), m.has_moe_ep(), m.has_moe_cluster()) == (False, False, True)
    m = Mapping()
    assert not any(
        [m.has_tp(), m.has_pp(), m.has_cp(), m.has_moe_tp(), m.has_moe_ep(), m.has_moe_cluster()]
    )
    assert m.tp_group == m.pp_group == m.cp_group == [0]


@pytest.mark.parametrize("rank", range(12))
def test_pipeline_neighbours(rank):
    # 3 stages of tp 2 * cp 2: stage stride 4.
    expect_prev = [8, 9, 10, 11, 0, 1, 2, 3, 4, 5, 6, 7]
    expect_next = [4, 5, 6, 7, 8, 9, 10, 11, 0, 1, 2, 3]
    m = Mapping(12, rank, tp_size=2, cp_size=2, pp_size=3)
    assert m.prev_pp_rank() == expect_prev[rank]
    assert m.next_pp_rank() == expect_next[rank]
    assert m.is_first_pp_rank() == (rank < 4)
    assert m.is_last_pp_rank() == (rank >= 8)
    assert m.is_second_last_pp_rank() == (4 <= rank < 8)
    assert m.prev_pp_rank() in m.pp_group and m.next_pp_rank() in m.pp_group


def test_pipeline_of_one_stage():
    m = Mapping(4, 2, tp_size=4)
    assert m.prev_pp_rank() == m.next_pp_rank() == 2
    assert m.is_first_pp_rank() and m.is_last_pp_rank()


def test_pp_layers():
    layers = [Mapping(8, r, tp_size=2, pp_size=4).pp_layers(10) for r in (0, 2, 4, 6)]
    assert layers == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    layers = [Mapping(4, r, pp_size=4).pp_layers(8) for r in range(4)]
    assert layers == [[0, 1], [2, 3], [4, 5], [6, 7]]
    # More stages than layers: the last stages own nothing.
    layers = [Mapping(4, r, pp_size=4).pp_layers(2) for r in range(4)]
    assert layers == [[0], [1], [], []]
    assert Mapping().pp_layers(0) == []
    with pytest.raises(ValueError, match=r"num_layers \(-1\)"):
        Mapping().pp_layers(-1)


def test_ep_experts():
    got = [Mapping(8, r, tp_size=8, moe_ep_size=4).ep_experts(16) for r in range(8)]
    assert got[0] == [0, 1, 2, 3] and got[3] == [12, 13, 14, 15]
    assert got[4] == got[0] and got[7] == got[3]  # moe_tp partners share experts
    # Remainder experts are assigned to nobody.
    got = [Mapping(4, r, tp_size=4, moe_ep_size=4).ep_experts(10) for r in range(4)]
    assert got == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert Mapping(2, 1, tp_size=2).ep_experts(6) == list(range(6))
    with pytest.raises(NotImplementedError, match=r"cp_size \(2\)"):
        Mapping(2, 0, cp_size=2).ep_experts(4)


def test_moe_size_derivation():
    m = Mapping(8, 0, tp_size=8)
    assert (m.moe_tp_size, m.moe_ep_size, m.moe_cluster_size) == (8, 1, 1)
    m = Mapping(8, 0, tp_size=8, moe_ep_size=2)
    assert (m.moe_tp_size, m.moe_ep_size) == (4, 2)
    m = Mapping(8, 0, tp_size=8, moe_tp_size=2)
    assert (m.moe_tp_size, m.moe_ep_size) == (2, 4)
    m = Mapping(8, 0, tp_size=8, moe_cluster_size=4)
    assert (m.moe_tp_size, m.moe_ep_size, m.moe_cluster_size) == (2, 1, 4)
    m = Mapping(8, 0, tp_size=8, moe_tp_size=8, moe_ep_size=1)
    assert (m.moe_tp_size, m.moe_ep_size) == (8, 1)


def test_attn_size_derivation():
    m = Mapping(8, 0, tp_size=4, cp_size=2)
    assert (m.attn_tp_size, m.attn_cp_size) == (8, 1)
    m = Mapping(8, 0, tp_size=4, cp_size=2, attn_tp_size=8)
    assert (m.attn_tp_size, m.attn_cp_size) == (8, 1)
    m = Mapping(4, 0, tp_size=4, attn_cp_size=1)
    assert (m.attn_tp_size, m.attn_cp_size) == (4, 1)


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        (
            dict(world_size=8, tp_size=2, pp_size=2),
            ValueError,
            r"^Mapping: tp_size \(2\) \* pp_size \(2\) \* cp_size \(1\) = 4 "
            r"must equal world_size \(8\)$",
        ),
        (
            dict(world_size=4, rank=4, tp_size=4),
            ValueError,
            r"rank \(4\) must be in \[0, world_size\) = \[0, 4\)",
        ),
        (dict(world_size=4, rank=-1, tp_size=4), ValueError, r"rank \(-1\)"),
        (
            dict(world_size=8, tp_size=8, moe_tp_size=2, moe_ep_size=2),
            ValueError,
            r"moe_tp_size \(2\) \* moe_ep_size \(2\) \* moe_cluster_size \(1\) = 4 must equal "
            r"tp_size \(8\)",
        ),
        (
            dict(world_size=8, tp_size=8, moe_ep_size=3),
            ValueError,
            r"moe_ep_size \(3\) \* moe_cluster_size \(1\) must divide tp_size \(8\)",
        ),
        (
            dict(world_size=6, tp_size=6, moe_tp_size=4),
            ValueError,
            r"moe_tp_size \(4\) \* moe_cluster_size \(1\) must divide tp_size \(6\)",
        ),
        (
            dict(world_size=6, tp_size=6, moe_cluster_size=4),
            ValueError,
            r"moe_cluster_size \(4\) must divide tp_size \(6\)",
        ),
        (
            dict(world_size=4, tp_size=4, attn_cp_size=2),
            ValueError,
            r"attn_cp_size \(2\) must be 1",
        ),
        (
            dict(world_size=4, tp_size=4, attn_tp_size=2),
            ValueError,
            r"attn_cp_size \(2\) must be 1",
        ),
        (
            dict(world_size=4, tp_size=4, attn_tp_size=2, attn_cp_size=1),
            ValueError,
            r"attn_tp_size \(2\) \* attn_cp_size \(1\) = 2 must equal tp_size \(4\) \* "
            r"cp_size \(1\) = 4",
        ),
        (
            dict(world_size=4, tp_size=4, attn_tp_size=3),
            ValueError,
            r"attn_tp_size \(3\) must divide tp_size \(4\) \* cp_size \(1\) = 4",
        ),
        (
            dict(world_size=8, tp_size=4, cp_size=2, moe_ep_size=2),
            NotImplementedError,
            r"moe_ep_size \(2\) must be 1 when cp_size \(2\) > 1",
        ),
        (
            dict(world_size=8, tp_size=8, moe_ep_size=2, moe_cluster_size=2),
            NotImplementedError,
            r"moe_ep_size \(2\) must be 1 when moe_cluster_size \(2\) > 1",
        ),
        (
            dict(world_size=4, tp_size=2, auto_parallel=True),
            ValueError,
            r"auto_parallel, tp_size \(2\)",
        ),
        (dict(world_size=0), ValueError, r"world_size \(0\) must be >= 1"),
        (dict(world_size=2, tp_size=2, gpus_per_node=0), ValueError, r"gpus_per_node \(0\)"),
        (dict(world_size=2, tp_size=0, pp_size=2), ValueError, r"tp_size \(0\) must be >= 1"),
        (
            dict(world_size=2, tp_size=2, moe_ep_size=0),
            ValueError,
            r"moe_ep_size \(0\) must be >= 1 \(or -1",
        ),
        (dict(world_size=2, tp_size=2.0), TypeError, r"tp_size must be an int, got float"),
        (dict(world_size=2, rank="1", tp_size=2), TypeError, r"rank must be an int, got str"),
        (dict(world_size=2, tp_size=True), TypeError, r"tp_size must be an int, got bool"),
        (dict(cp_config=[1]), TypeError, r"cp_config must be a dict or None, got list"),
    ],
)
def test_errors(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        Mapping(**kwargs)


def test_rank_setter_validates():
    m = Mapping(4, 1, tp_size=4)
    m.rank = 3
    assert (m.rank, m.tp_rank, m.tp_group) == (3, 3, [0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"rank \(4\)"):
        m.rank = 4
    assert m.rank == 3


@pytest.mark.parametrize("rank", range(4))
def test_auto_parallel(rank):
    m = Mapping(4, rank, auto_parallel=True)
    assert (m.tp_rank, m.cp_rank, m.pp_rank, m.moe_ep_rank) == (0, 0, 0, 0)
    assert m.tp_group == m.pp_group == m.cp_group == m.moe_ep_group == [rank]
    assert m.local_rank == rank


def test_auto_parallel_groups():
    assert Mapping(4, 0, auto_parallel=True).tp_groups == [[0], [1], [2], [3]]


@pytest.mark.parametrize(
    "case, rank",
    [
        pytest.param(case, rank, id=f"{case}-rank{rank}")
        for case in sorted(CASES)
        for rank in (0, CASES[case]["kwargs"]["world_size"] - 1)
    ],
)
def test_dict_round_trip(case, rank):
    m = _mapping(case, rank)
    d = m.to_dict()
    assert -1 not in d.values()
    back = Mapping.from_dict(d)
    assert back == m and back.to_dict() == d
    assert back.moe_ep_group == m.moe_ep_group


def test_dict_round_trip_of_extras():
    m = Mapping(
        8, 3, 4, tp_size=4, cp_size=2, cp_config={"cp_type": "ulysses"}, enable_attention_dp=True
    )
    back = Mapping.from_dict(m.to_dict())
    assert back.cp_config == {"cp_type": "ulysses"} and back.enable_attention_dp
    assert back.gpus_per_node == 4 and back == m
    # A dict with only the twelve core keys (as other libraries write it) also loads.
    core = {k: v for k, v in m.to_dict().items() if k not in ("cp_config", "enable_attention_dp")}
    assert Mapping.from_dict(core) == m
    with pytest.raises(TypeError, match="from_dict"):
        Mapping.from_dict([("world_size", 1)])


def test_eq_and_hash():
    a = Mapping(8, 3, tp_size=4, pp_size=2)
    b = Mapping(8, 3, tp_size=4, pp_size=2, moe_tp_size=4)  # same after derivation
    assert a == b and hash(a) == hash(b)
    assert len({a, b}) == 1
    assert a != Mapping(8, 2, tp_size=4, pp_size=2)
    assert a != Mapping(8, 3, 4, tp_size=4, pp_size=2)
    assert a != Mapping(8, 3, tp_size=2, pp_size=4)
    assert a != Mapping(8, 3, tp_size=4, pp_size=2, moe_ep_size=2)
    # cp_config and enable_attention_dp are not part of identity.
    assert a == Mapping(8, 3, tp_size=4, pp_size=2, cp_config={"x": 1}, enable_attention_dp=True)
    assert a != "mapping" and a != a.to_dict()
    assert {a: 1}[Mapping.from_dict(a.to_dict())] == 1


def test_repr():
    text = repr(Mapping(16, 9, tp_size=8, pp_size=2, moe_ep_size=4))
    assert text.startswith("Mapping(world_size=16, rank=9, gpus_per_node=8, tp_size=8, pp_size=2")
    assert "moe_tp_size=2" in text and "moe_ep_size=4" in text
    assert "auto_parallel" not in text
    assert "auto_parallel=True" in repr(Mapping(2, 1, auto_parallel=True))
