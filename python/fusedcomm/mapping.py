"""Placement of one rank inside a tensor/pipeline/context-parallel layout.

``Mapping`` answers "which ranks do I talk to" for a job of ``world_size``
ranks split into tensor-parallel (TP), context-parallel (CP) and
pipeline-parallel (PP) groups, with the TP group further split for
mixture-of-experts layers into MoE-TP, MoE-EP and MoE-cluster groups.

Rank layout (TP varies fastest, then CP, then PP)::

    rank = pp_rank * (tp_size * cp_size) + cp_rank * tp_size + tp_rank

Inside one TP group the TP index is split again for MoE layers (EP varies
fastest, then cluster, then MoE-TP)::

    tp_rank = moe_tp_rank * (moe_ep_size * moe_cluster_size)
              + moe_cluster_rank * moe_ep_size + moe_ep_rank

At most one of ``moe_ep_size`` and ``moe_cluster_size`` may exceed 1.

Example: 8 ranks, ``tp_size=4``, ``pp_size=2`` gives the TP groups
``[0, 1, 2, 3]`` and ``[4, 5, 6, 7]`` and the PP groups ``[0, 4]``,
``[1, 5]``, ``[2, 6]``, ``[3, 7]``.

Every group is returned as a plain ``list`` of global ranks in increasing
order; the module has no dependency beyond the standard library.
"""

from __future__ import annotations

import collections.abc
from typing import Any

from ._checks import int_arg

__all__ = ["Mapping"]

# Sizes given as -1 are derived from the others.
_UNSET = -1

# Keys of the configuration, in constructor order.  Equality and hashing use
# exactly these; ``to_dict`` adds ``cp_config`` and ``enable_attention_dp``.
_CONFIG_KEYS = (
    "world_size",
    "rank",
    "gpus_per_node",
    "cp_size",
    "tp_size",
    "pp_size",
    "moe_tp_size",
    "moe_cluster_size",
    "moe_ep_size",
    "attn_tp_size",
    "attn_cp_size",
    "auto_parallel",
)


def _check_int(name: str, value: Any, *, minimum: int, allow_unset: bool = False) -> int:
    """Return ``value`` if it is an int >= ``minimum`` (or -1 when allowed)."""
    if allow_unset and int_arg("Mapping", name, value) == _UNSET:
        return value
    hint = " (or -1 to derive it)" if allow_unset else ""
    return int_arg("Mapping", name, value, minimum, hint=hint)


def _derive(name: str, total: int, total_desc: str, divisor: int, divisor_desc: str) -> int:
    """Return ``total // divisor`` for a size left at -1, failing on a remainder."""
    if total % divisor != 0:
        raise ValueError(f"Mapping: {divisor_desc} must divide {total_desc} to derive {name}")
    return total // divisor


class Mapping:
    """Parallel layout of ``world_size`` ranks and the position of ``rank`` in it.

    Args:
        world_size: total number of ranks.
        rank: global rank this object describes, in ``[0, world_size)``.
        gpus_per_node: ranks per node; sets ``local_rank`` and ``node_rank``.
        cp_size: context-parallel size.
        cp_config: free-form context-parallel options (stored, not interpreted);
            ``None`` becomes ``{}``.
        tp_size: tensor-parallel size.
        pp_size: pipeline-parallel size.
        moe_cluster_size: MoE cluster size; -1 means 1.
        moe_tp_size: MoE tensor-parallel size; -1 derives it from the others.
        moe_ep_size: MoE expert-parallel size; -1 derives it from the others.
            With neither MoE size given, ``moe_tp_size = tp_size /
            moe_cluster_size`` and ``moe_ep_size = 1``; with one given, the
            other fills ``tp_size`` exactly.
        attn_tp_size: attention TP size; -1 derives it (default
            ``tp_size * cp_size``).
        attn_cp_size: attention CP size; only 1 is supported.
        auto_parallel: the layout is decided elsewhere: ``tp_size``,
            ``pp_size`` and ``cp_size`` must be 1, ``world_size`` is not tied
            to them and every per-axis rank reads 0.
        enable_attention_dp: stored flag for attention data parallelism.

    Raises:
        TypeError: a size or rank is not an int, or ``cp_config`` is not a mapping.
        ValueError: sizes are not positive or do not multiply out
            (``tp * pp * cp == world_size``, ``moe_tp * moe_ep * moe_cluster ==
            tp``, ``attn_tp * attn_cp == tp * cp``), ``attn_cp_size != 1``, or
            ``rank`` is outside ``[0, world_size)``.
        NotImplementedError: ``moe_ep_size > 1`` together with ``cp_size > 1``
            or with ``moe_cluster_size > 1``.
    """

    def __init__(
        self,
        world_size: int = 1,
        rank: int = 0,
        gpus_per_node: int = 8,
        *,
        cp_size: int = 1,
        cp_config: Any = None,
        tp_size: int = 1,
        pp_size: int = 1,
        moe_cluster_size: int = -1,
        moe_tp_size: int = -1,
        moe_ep_size: int = -1,
        attn_tp_size: int = -1,
        attn_cp_size: int = -1,
        auto_parallel: bool = False,
        enable_attention_dp: bool = False,
    ) -> None:
        world_size = _check_int("world_size", world_size, minimum=1)
        gpus_per_node = _check_int("gpus_per_node", gpus_per_node, minimum=1)
        tp_size = _check_int("tp_size", tp_size, minimum=1)
        pp_size = _check_int("pp_size", pp_size, minimum=1)
        cp_size = _check_int("cp_size", cp_size, minimum=1)
        moe_cluster_size = _check_int(
            "moe_cluster_size", moe_cluster_size, minimum=1, allow_unset=True
        )
        moe_tp_size = _check_int("moe_tp_size", moe_tp_size, minimum=1, allow_unset=True)
        moe_ep_size = _check_int("moe_ep_size", moe_ep_size, minimum=1, allow_unset=True)
        attn_tp_size = _check_int("attn_tp_size", attn_tp_size, minimum=1, allow_unset=True)
        attn_cp_size = _check_int("attn_cp_size", attn_cp_size, minimum=1, allow_unset=True)
        if cp_config is not None and not isinstance(cp_config, collections.abc.Mapping):
            raise TypeError(
                f"Mapping: cp_config must be a dict or None, got {type(cp_config).__name__}"
            )

        # The parallel sizes must cover the world (unless placement is automatic).
        if auto_parallel:
            if (tp_size, pp_size, cp_size) != (1, 1, 1):
                raise ValueError(
                    f"Mapping: with auto_parallel, tp_size ({tp_size}), pp_size ({pp_size}) "
                    f"and cp_size ({cp_size}) must all be 1"
                )
        elif tp_size * pp_size * cp_size != world_size:
            raise ValueError(
                f"Mapping: tp_size ({tp_size}) * pp_size ({pp_size}) * cp_size ({cp_size}) "
                f"= {tp_size * pp_size * cp_size} must equal world_size ({world_size})"
            )

        # MoE split of the TP group; fill in whatever was left at -1.
        if moe_cluster_size == _UNSET:
            moe_cluster_size = 1
        tp_desc = f"tp_size ({tp_size})"
        if moe_tp_size == _UNSET and moe_ep_size == _UNSET:
            moe_ep_size = 1
            moe_tp_size = _derive(
                "moe_tp_size",
                tp_size,
                tp_desc,
                moe_cluster_size,
                f"moe_cluster_size ({moe_cluster_size})",
            )
        elif moe_tp_size == _UNSET:
            moe_tp_size = _derive(
                "moe_tp_size",
                tp_size,
                tp_desc,
                moe_ep_size * moe_cluster_size,
                f"moe_ep_size ({moe_ep_size}) * moe_cluster_size ({moe_cluster_size})",
            )
        elif moe_ep_size == _UNSET:
            moe_ep_size = _derive(
                "moe_ep_size",
                tp_size,
                tp_desc,
                moe_tp_size * moe_cluster_size,
                f"moe_tp_size ({moe_tp_size}) * moe_cluster_size ({moe_cluster_size})",
            )
        moe_product = moe_tp_size * moe_ep_size * moe_cluster_size
        if moe_product != tp_size:
            raise ValueError(
                f"Mapping: moe_tp_size ({moe_tp_size}) * moe_ep_size ({moe_ep_size}) * "
                f"moe_cluster_size ({moe_cluster_size}) = {moe_product} must equal "
                f"tp_size ({tp_size})"
            )

        # Attention split of TP x CP; only pure attention TP is supported.
        attn_total = tp_size * cp_size
        attn_desc = f"tp_size ({tp_size}) * cp_size ({cp_size}) = {attn_total}"
        if attn_tp_size == _UNSET and attn_cp_size == _UNSET:
            attn_tp_size, attn_cp_size = attn_total, 1
        elif attn_tp_size == _UNSET:
            attn_tp_size = _derive(
                "attn_tp_size",
                attn_total,
                attn_desc,
                attn_cp_size,
                f"attn_cp_size ({attn_cp_size})",
            )
        elif attn_cp_size == _UNSET:
            attn_cp_size = _derive(
                "attn_cp_size",
                attn_total,
                attn_desc,
                attn_tp_size,
                f"attn_tp_size ({attn_tp_size})",
            )
        if attn_cp_size != 1:
            raise ValueError(
                f"Mapping: attn_cp_size ({attn_cp_size}) must be 1 "
                f"(attn_tp_size is {attn_tp_size}); attention CP is not supported"
            )
        if attn_tp_size * attn_cp_size != attn_total:
            raise ValueError(
                f"Mapping: attn_tp_size ({attn_tp_size}) * attn_cp_size ({attn_cp_size}) "
                f"= {attn_tp_size * attn_cp_size} must equal {attn_desc}"
            )

        # Combinations the layout does not describe.
        if moe_ep_size != 1 and cp_size > 1:
            raise NotImplementedError(
                f"Mapping: moe_ep_size ({moe_ep_size}) must be 1 when cp_size ({cp_size}) > 1; "
                "MoE expert parallelism is not supported together with context parallelism"
            )
        if moe_ep_size != 1 and moe_cluster_size > 1:
            raise NotImplementedError(
                f"Mapping: moe_ep_size ({moe_ep_size}) must be 1 when moe_cluster_size "
                f"({moe_cluster_size}) > 1"
            )

        self.world_size = world_size
        self.gpus_per_node = gpus_per_node
        self.tp_size = tp_size
        self.pp_size = pp_size
        self.cp_size = cp_size
        self.cp_config = cp_config if cp_config is not None else {}
        self.moe_tp_size = moe_tp_size
        self.moe_ep_size = moe_ep_size
        self.moe_cluster_size = moe_cluster_size
        self.attn_tp_size = attn_tp_size
        self.attn_cp_size = attn_cp_size
        self.auto_parallel = bool(auto_parallel)
        self.enable_attention_dp = bool(enable_attention_dp)
        self.rank = rank  # validated by the setter

    # ------------------------------------------------------------------ rank

    @property
    def rank(self) -> int:
        """Global rank described by this object; assigning re-validates it."""
        return self._rank

    @rank.setter
    def rank(self, rank: int) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise TypeError(f"Mapping: rank must be an int, got {type(rank).__name__} ({rank!r})")
        if not 0 <= rank < self.world_size:
            raise ValueError(
                f"Mapping: rank ({rank}) must be in [0, world_size) = [0, {self.world_size})"
            )
        self._rank = rank

    # Per-axis coordinates of an arbitrary rank.  The public properties below
    # apply them to ``self.rank``; the group builders apply them to any rank.

    def _tp_rank_of(self, r: int) -> int:
        return 0 if self.auto_parallel else r % self.tp_size

    def _cp_rank_of(self, r: int) -> int:
        return 0 if self.auto_parallel else (r % (self.tp_size * self.cp_size)) // self.tp_size

    def _pp_rank_of(self, r: int) -> int:
        return 0 if self.auto_parallel else r // (self.tp_size * self.cp_size)

    def _moe_ep_rank_of(self, r: int) -> int:
        return self._tp_rank_of(r) % self.moe_ep_size

    def _moe_cluster_rank_of(self, r: int) -> int:
        return (self._tp_rank_of(r) // self.moe_ep_size) % self.moe_cluster_size

    def _moe_tp_rank_of(self, r: int) -> int:
        return self._tp_rank_of(r) // (self.moe_ep_size * self.moe_cluster_size)

    @property
    def tp_rank(self) -> int:
        """Index within the TP group: ``rank % tp_size``."""
        return self._tp_rank_of(self.rank)

    @property
    def cp_rank(self) -> int:
        """Index within the CP group: ``rank % (tp_size * cp_size) // tp_size``."""
        return self._cp_rank_of(self.rank)

    @property
    def pp_rank(self) -> int:
        """Pipeline stage: ``rank // (tp_size * cp_size)``."""
        return self._pp_rank_of(self.rank)

    @property
    def moe_ep_rank(self) -> int:
        """Index within the MoE-EP group: ``tp_rank % moe_ep_size``."""
        return self._moe_ep_rank_of(self.rank)

    @property
    def moe_cluster_rank(self) -> int:
        """Index within the MoE-cluster group (``tp_rank % moe_cluster_size`` when EP is 1)."""
        return self._moe_cluster_rank_of(self.rank)

    @property
    def moe_tp_rank(self) -> int:
        """Index within the MoE-TP group: ``tp_rank // (moe_ep_size * moe_cluster_size)``."""
        return self._moe_tp_rank_of(self.rank)

    @property
    def local_rank(self) -> int:
        """Index of this rank on its node: ``rank % gpus_per_node``."""
        return self.rank % self.gpus_per_node

    @property
    def node_rank(self) -> int:
        """Node holding this rank: ``rank // gpus_per_node``."""
        return self.rank // self.gpus_per_node

    def get_local_rank(self, rank: int) -> int:
        """Index of ``rank`` on its node."""
        return rank % self.gpus_per_node

    def get_node_rank(self, rank: int) -> int:
        """Node holding ``rank``."""
        return rank // self.gpus_per_node

    def is_multi_node(self) -> bool:
        """True when the world spans more than one node."""
        return self.world_size > self.gpus_per_node

    # ---------------------------------------------------------------- groups

    # Each axis is (coordinate function, stride between neighbours, size).
    # A rank's group along an axis holds the ranks that differ from it only in
    # that coordinate; MoE strides are relative to the start of the TP group.
    def _axis(self, name: str):
        tp, cp = self.tp_size, self.cp_size
        ep, cluster = self.moe_ep_size, self.moe_cluster_size
        return {
            "tp": (self._tp_rank_of, 1, tp),
            "cp": (self._cp_rank_of, tp, cp),
            "pp": (self._pp_rank_of, tp * cp, self.pp_size),
            "moe_ep": (self._moe_ep_rank_of, 1, ep),
            "moe_cluster": (self._moe_cluster_rank_of, ep, cluster),
            "moe_tp": (self._moe_tp_rank_of, ep * cluster, self.moe_tp_size),
        }[name]

    def _group_of(self, r: int, name: str) -> list[int]:
        coord, stride, size = self._axis(name)
        if self.auto_parallel:
            return [r]
        start = r - coord(r) * stride
        return [start + i * stride for i in range(size)]

    def _all_groups(self, name: str) -> list[list[int]]:
        # Groups partition the world; list each once, ordered by smallest rank.
        groups = []
        for r in range(self.world_size):
            group = self._group_of(r, name)
            if group[0] == r:
                groups.append(group)
        return groups

    @property
    def tp_group(self) -> list[int]:
        """Ranks sharing this rank's PP and CP coordinates."""
        return self._group_of(self.rank, "tp")

    @property
    def cp_group(self) -> list[int]:
        """Ranks sharing this rank's PP and TP coordinates."""
        return self._group_of(self.rank, "cp")

    @property
    def pp_group(self) -> list[int]:
        """Ranks sharing this rank's TP and CP coordinates (one per stage)."""
        return self._group_of(self.rank, "pp")

    @property
    def moe_tp_group(self) -> list[int]:
        """Ranks of this TP group with the same MoE-EP and cluster coordinates."""
        return self._group_of(self.rank, "moe_tp")

    @property
    def moe_ep_group(self) -> list[int]:
        """Ranks of this TP group with the same MoE-TP and cluster coordinates."""
        return self._group_of(self.rank, "moe_ep")

    @property
    def moe_cluster_group(self) -> list[int]:
        """Ranks of this TP group with the same MoE-TP and MoE-EP coordinates."""
        return self._group_of(self.rank, "moe_cluster")

    @property
    def tp_groups(self) -> list[list[int]]:
        """Every TP group of the world."""
        return self._all_groups("tp")

    @property
    def cp_groups(self) -> list[list[int]]:
        """Every CP group of the world."""
        return self._all_groups("cp")

    @property
    def pp_groups(self) -> list[list[int]]:
        """Every PP group of the world."""
        return self._all_groups("pp")

    @property
    def moe_tp_groups(self) -> list[list[int]]:
        """Every MoE-TP group of the world."""
        return self._all_groups("moe_tp")

    @property
    def moe_ep_groups(self) -> list[list[int]]:
        """Every MoE-EP group of the world."""
        return self._all_groups("moe_ep")

    @property
    def moe_cluster_groups(self) -> list[list[int]]:
        """Every MoE-cluster group of the world."""
        return self._all_groups("moe_cluster")

    # ------------------------------------------------------------ predicates

    def has_tp(self) -> bool:
        """True when ``tp_size > 1``."""
        return self.tp_size > 1

    def has_pp(self) -> bool:
        """True when ``pp_size > 1``."""
        return self.pp_size > 1

    def has_cp(self) -> bool:
        """True when ``cp_size > 1``."""
        return self.cp_size > 1

    def has_moe_tp(self) -> bool:
        """True when ``moe_tp_size > 1``."""
        return self.moe_tp_size > 1

    def has_moe_ep(self) -> bool:
        """True when ``moe_ep_size > 1``."""
        return self.moe_ep_size > 1

    def has_moe_cluster(self) -> bool:
        """True when ``moe_cluster_size > 1``."""
        return self.moe_cluster_size > 1

    # -------------------------------------------------------------- pipeline

    def is_first_pp_rank(self) -> bool:
        """True on the first pipeline stage."""
        return self.pp_rank == 0

    def is_last_pp_rank(self) -> bool:
        """True on the last pipeline stage."""
        return self.pp_rank == self.pp_size - 1

    def is_second_last_pp_rank(self) -> bool:
        """True on the stage before the last one."""
        return self.pp_rank == self.pp_size - 2

    def prev_pp_rank(self) -> int:
        """Same TP/CP position on the previous stage (the first stage wraps to the last)."""
        return (self.rank - self.tp_size * self.cp_size) % self.world_size

    def next_pp_rank(self) -> int:
        """Same TP/CP position on the next stage (the last stage wraps to the first)."""
        return (self.rank + self.tp_size * self.cp_size) % self.world_size

    def pp_layers(self, num_layers: int) -> list[int]:
        """Indices of the layers this pipeline stage owns.

        ``num_layers`` is cut into ``pp_size`` contiguous runs; when it does
        not divide evenly the first ``num_layers % pp_size`` stages take one
        extra layer.  Stages beyond ``num_layers`` get an empty list.
        """
        num_layers = _check_int("pp_layers: num_layers", num_layers, minimum=0)
        base, extra = divmod(num_layers, self.pp_size)
        stage = self.pp_rank
        start = stage * base + min(stage, extra)
        count = base + (1 if stage < extra else 0)
        return list(range(start, start + count))

    def ep_experts(self, num_experts: int) -> list[int]:
        """Indices of the experts this rank holds under expert parallelism.

        Each MoE-EP rank gets ``num_experts // moe_ep_size`` consecutive
        experts starting at ``moe_ep_rank * (num_experts // moe_ep_size)``.
        A remainder of ``num_experts % moe_ep_size`` experts is assigned to
        no rank.
        """
        num_experts = _check_int("ep_experts: num_experts", num_experts, minimum=0)
        if self.cp_size != 1:
            raise NotImplementedError(f"Mapping.ep_experts: cp_size ({self.cp_size}) must be 1")
        per_rank = num_experts // self.moe_ep_size
        start = self.moe_ep_rank * per_rank
        return list(range(start, start + per_rank))

    # -------------------------------------------------------- serialisation

    def to_dict(self) -> dict[str, Any]:
        """Constructor keyword arguments that rebuild an equal ``Mapping``.

        MoE and attention sizes are stored resolved (never -1).
        """
        out = {key: getattr(self, key) for key in _CONFIG_KEYS}
        out["cp_config"] = dict(self.cp_config)
        out["enable_attention_dp"] = self.enable_attention_dp
        return out

    @classmethod
    def from_dict(cls, mapping: dict[str, Any]) -> Mapping:
        """Build a ``Mapping`` from keyword arguments such as ``to_dict()`` returns."""
        if not isinstance(mapping, collections.abc.Mapping):
            raise TypeError(f"Mapping.from_dict: expected a dict, got {type(mapping).__name__}")
        return cls(**mapping)

    def _key(self) -> tuple:
        return tuple(getattr(self, key) for key in _CONFIG_KEYS)

    def __eq__(self, other: object) -> bool:
        """Equal when world size, rank, node size and all parallel sizes match.

        ``cp_config`` and ``enable_attention_dp`` do not take part.
        """
        if not isinstance(other, Mapping):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        parts = [
            f"world_size={self.world_size}",
            f"rank={self.rank}",
            f"gpus_per_node={self.gpus_per_node}",
            f"tp_size={self.tp_size}",
            f"pp_size={self.pp_size}",
            f"cp_size={self.cp_size}",
            f"moe_tp_size={self.moe_tp_size}",
            f"moe_ep_size={self.moe_ep_size}",
            f"moe_cluster_size={self.moe_cluster_size}",
            f"attn_tp_size={self.attn_tp_size}",
            f"attn_cp_size={self.attn_cp_size}",
        ]
        if self.cp_config:
            parts.append(f"cp_config={self.cp_config!r}")
        if self.auto_parallel:
            parts.append("auto_parallel=True")
        if self.enable_attention_dp:
            parts.append("enable_attention_dp=True")
        return f"Mapping({', '.join(parts)})"
