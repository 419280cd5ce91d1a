"""``MoeAlltoAll``: a MoE all-to-all over the expert-parallel group of a :class:`Mapping`.

It owns (through a per-process cache) a workspace of peer-mapped memory, initialises it on
every rank with a barrier after, and walks the round's steps in order:
``idle -> dispatch() -> dispatched -> combine() -> idle``. Misuse (combine before dispatch,
two dispatches in a row, another ``runtime_max_tokens_per_rank`` in the combine) raises
before anything is launched.
"""

from __future__ import annotations

import operator
from typing import Any, ClassVar

import torch

from ..mapping import Mapping
from ..runtime.comm_backend import MnnvlConfig, MPIBackend, SoloBackend, TorchDistBackend
from ..runtime.moe_a2a_workspace import (
    MOE_A2A_MAX_TOP_K,
    moe_a2a_wrap_payload_tensor_in_workspace,
    moe_workspace_size_per_rank,
)
from . import moe_a2a as _a2a

__all__ = ["MoeA2AArgumentError", "MoeA2AStateError", "MoeAlltoAll"]


class MoeA2AStateError(RuntimeError, AssertionError):
    """A MoeAlltoAll method was called in the wrong phase of a round (for example combine()
    before dispatch()). Also an AssertionError, as the phase checks of other implementations
    of this API are assertions."""


class MoeA2AArgumentError(ValueError, AssertionError):
    """A MoeAlltoAll argument outside what the instance was built for (a round larger than
    max_num_tokens). Also an AssertionError, for the same reason as MoeA2AStateError."""


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"MoeAlltoAll: {name} must be a positive int, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"MoeAlltoAll: {name} must be a positive int, got {value!r}") from None
    if value <= 0:
        raise ValueError(f"MoeAlltoAll: {name} must be a positive int, got {value}")
    return value


def _ep_backend(mapping: Mapping, mnnvl_config: MnnvlConfig | None):
    """A comm backend over this rank's MoE-EP group (ranks ordered by moe_ep_rank)."""
    if mapping.moe_ep_size == 1:
        return SoloBackend()
    if mnnvl_config is not None and mnnvl_config.comm_backend is not None:
        world = mnnvl_config.comm_backend
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        world = TorchDistBackend()
    else:
        world = MPIBackend()
    if world.Get_size() == mapping.moe_ep_size:
        if world.Get_rank() != mapping.moe_ep_rank:
            return world.Split(0, mapping.moe_ep_rank)
        return world
    group = mapping.moe_ep_group
    return world.Split(group[0], mapping.moe_ep_rank)


class MoeAlltoAll:
    """MoE all-to-all (dispatch / combine) over ``mapping``'s expert-parallel group.

    ``max_num_tokens``: the most tokens a rank dispatches in one round. ``top_k`` and
    ``num_experts``: positive ints (``top_k`` <= 22, ``num_experts`` >= the EP size).
    ``workspace_size_per_rank``: bytes per rank; None sizes it with
    :meth:`get_moe_workspace_size_per_rank` from ``hidden_size`` (then required). The group's
    ranks exchange handles through ``mnnvl_config.comm_backend`` when given, else
    torch.distributed (when initialised), else MPI. Construction is collective over the
    group; instances with the same (size, ep_rank, ep_size, max_num_tokens) share one
    workspace per process (and the ``timeout_s`` of the first of them, which creates it).
    ``timeout_s`` bounds every wait for a peer; ``check_expert_ids``
    makes each dispatch synchronise and raise on expert ids outside ``[0, num_experts)``.
    """

    _WORKSPACE_CACHE: ClassVar[dict[tuple[int, ...], dict]] = {}

    def __init__(
        self,
        mapping: Mapping,
        max_num_tokens: int,
        top_k: int,
        num_experts: int,
        workspace_size_per_rank: int | None = None,
        hidden_size: int | None = None,
        mnnvl_config: MnnvlConfig | None = None,
        *,
        eplb_stats_num_experts: int = 0,
        timeout_s: float | None = None,
        check_expert_ids: bool = False,
    ):
        self.top_k = _positive("top_k", top_k)
        self.num_experts = _positive("num_experts", num_experts)
        self.max_num_tokens = _positive("max_num_tokens", max_num_tokens)
        if self.top_k > MOE_A2A_MAX_TOP_K:
            raise ValueError(f"MoeAlltoAll: top_k ({top_k}) must be <= {MOE_A2A_MAX_TOP_K}")
        self.mapping = mapping
        self.ep_size = mapping.moe_ep_size
        self.ep_rank = mapping.moe_ep_rank
        if self.num_experts < self.ep_size:
            raise ValueError(
                f"MoeAlltoAll: num_experts ({num_experts}) must be >= the EP size ({self.ep_size})"
            )
        if workspace_size_per_rank is None:
            assert hidden_size is not None, (
                "MoeAlltoAll: hidden_size is required when workspace_size_per_rank is None"
            )
            workspace_size_per_rank = moe_workspace_size_per_rank(
                self.ep_size,
                self.top_k,
                self.max_num_tokens,
                hidden_size,
                eplb_stats_num_experts=eplb_stats_num_experts,
            )
        self.workspace_size_per_rank = _positive("workspace_size_per_rank", workspace_size_per_rank)
        key = (self.workspace_size_per_rank, self.ep_rank, self.ep_size, self.max_num_tokens)
        if eplb_stats_num_experts:
            key = (*key, eplb_stats_num_experts)
        entry = self._WORKSPACE_CACHE.get(key)
        if entry is None:
            entry = self._create(mapping, mnnvl_config, eplb_stats_num_experts, timeout_s)
            self._WORKSPACE_CACHE[key] = entry
        self._entry = entry
        self.workspace: torch.Tensor = entry["workspace"]
        self.metainfo: torch.Tensor = entry["metainfo"]
        self.check_expert_ids = bool(check_expert_ids)
        self._phase = "idle"
        self._local_num_tokens = 0
        self._max_tokens = 0
        self._combine_offset = 0

    def _create(self, mapping, mnnvl_config, eplb: int, timeout_s) -> dict:
        from ..runtime.peer_memory import PeerMemory

        backend = _ep_backend(mapping, mnnvl_config)
        if backend.Get_size() != self.ep_size or backend.Get_rank() != self.ep_rank:
            raise ValueError(
                f"MoeAlltoAll: the comm backend has rank {backend.Get_rank()} of "
                f"{backend.Get_size()}, the mapping's MoE-EP group rank {self.ep_rank} of "
                f"{self.ep_size}"
            )
        memory = PeerMemory(self.workspace_size_per_rank, backend)
        workspace = memory.as_tensor()
        metainfo = _a2a.moe_a2a_initialize(
            workspace, self.ep_rank, self.ep_size, self.max_num_tokens, eplb, timeout_s=timeout_s
        )
        backend.barrier()  # no rank dispatches into a row before its owner zeroed it
        return {
            "memory": memory,
            "workspace": workspace,
            "metainfo": metainfo,
            "backend": backend,
            "eplb": eplb,
            "timeout_s": timeout_s,
        }

    def reset(self, *, timeout_s: float | None = None) -> None:
        """Start over after a failure: initialise this workspace again and meet the group
        (collective: call on every rank of the group, with nothing in flight). Every instance
        sharing the workspace goes back to idle."""
        entry = self._entry
        entry["metainfo"] = _a2a.moe_a2a_initialize(
            self.workspace,
            self.ep_rank,
            self.ep_size,
            self.max_num_tokens,
            entry["eplb"],
            timeout_s=entry["timeout_s"] if timeout_s is None else timeout_s,
        )
        self.metainfo = entry["metainfo"]
        entry["backend"].barrier()
        self._phase = "idle"

    @classmethod
    def free_workspaces(cls) -> None:
        """Drop this process's cached workspaces (unmapped once no instance uses them). Call
        on every rank, when no dispatch or combine is in flight."""
        cls._WORKSPACE_CACHE.clear()

    # ----------------------------------------------------------------------------- a round

    @property
    def phase(self) -> str:
        """``"idle"`` or ``"dispatched"``."""
        return self._phase

    def _expect(self, phase: str, what: str) -> None:
        if self._phase != phase:
            raise MoeA2AStateError(
                f"MoeAlltoAll.{what}: called in phase {self._phase!r}, needs {phase!r} (a round is "
                "dispatch() then combine())"
            )

    def _same_round(self, what: str, runtime_max_tokens_per_rank: int) -> None:
        if runtime_max_tokens_per_rank != self._max_tokens:
            raise MoeA2AArgumentError(
                f"MoeAlltoAll.{what}: runtime_max_tokens_per_rank ({runtime_max_tokens_per_rank}) "
                f"must be the dispatch's ({self._max_tokens})"
            )

    def dispatch(
        self,
        token_selected_experts: torch.Tensor,
        input_payloads: list[torch.Tensor],
        runtime_max_tokens_per_rank: int,
        invalid_token_expert_id: int | None = None,
        expert_id_payload_index: int | None = None,
        *,
        enable_pdl: bool | None = None,
    ) -> list[torch.Tensor]:
        """Dispatch (see :func:`fusedcomm.moe_a2a_dispatch`); returns the received views,
        ``[ep_size, R, *]`` per payload. With ``invalid_token_expert_id``, the received copy of
        the expert ids (``input_payloads[expert_id_payload_index]``, required then) has its
        padding slots set to that id (:func:`fusedcomm.moe_a2a_sanitize_expert_ids`)."""
        self._expect("idle", "dispatch")
        if runtime_max_tokens_per_rank > self.max_num_tokens:
            raise MoeA2AArgumentError(
                f"MoeAlltoAll.dispatch: runtime_max_tokens_per_rank ({runtime_max_tokens_per_rank}) "
                f"must be <= max_num_tokens ({self.max_num_tokens})"
            )
        if invalid_token_expert_id is not None:
            assert expert_id_payload_index is not None, (
                "MoeAlltoAll.dispatch: expert_id_payload_index is required with "
                "invalid_token_expert_id"
            )
            if not 0 <= expert_id_payload_index < len(input_payloads):
                raise ValueError(
                    f"MoeAlltoAll.dispatch: expert_id_payload_index ({expert_id_payload_index}) "
                    f"is not an index of the {len(input_payloads)} payloads"
                )
        before = self.dropped_expert_ids() if self.check_expert_ids else 0
        received, offset = _a2a.moe_a2a_dispatch(
            token_selected_experts,
            input_payloads,
            self.workspace,
            self.metainfo,
            runtime_max_tokens_per_rank,
            self.ep_rank,
            self.ep_size,
            self.top_k,
            self.num_experts,
            enable_pdl,
        )
        self._phase = "dispatched"
        self._local_num_tokens = token_selected_experts.size(0)
        self._max_tokens = runtime_max_tokens_per_rank
        self._combine_offset = offset
        if invalid_token_expert_id is not None:
            _a2a.moe_a2a_sanitize_expert_ids(
                received[expert_id_payload_index],
                self.workspace,
                self.metainfo,
                self.ep_rank,
                invalid_token_expert_id,
                enable_pdl,
            )
        if self.check_expert_ids:
            dropped = self.dropped_expert_ids() - before
            if dropped:
                raise ValueError(
                    f"MoeAlltoAll.dispatch: {dropped} (token, k) pairs had expert ids outside "
                    f"[0, {self.num_experts}); they were not sent anywhere. The dispatch "
                    "completed on every rank: combine() still has to run."
                )
        return received

    def combine(
        self,
        payload: torch.Tensor,
        runtime_max_tokens_per_rank: int,
        payload_in_workspace: bool = False,
        *,
        output: torch.Tensor | None = None,
        enable_pdl: bool | None = None,
    ) -> torch.Tensor:
        """Combine (see :func:`fusedcomm.moe_a2a_combine`) the ``[ep_size, R, H]`` expert
        results of the last dispatch; returns ``[local_num_tokens, H]``. ``R`` must be the
        dispatch's. Ends the round."""
        self._expect("dispatched", "combine")
        self._same_round("combine", runtime_max_tokens_per_rank)
        out = _a2a.moe_a2a_combine(
            payload,
            self._local_num_tokens,
            self.workspace,
            self.metainfo,
            runtime_max_tokens_per_rank,
            self.ep_rank,
            self.ep_size,
            self.top_k,
            self._combine_offset,
            payload_in_workspace,
            enable_pdl,
            output=output,
        )
        self._phase = "idle"
        return out

    def get_combine_payload_tensor_in_workspace(
        self, runtime_max_tokens_per_rank: int, hidden_size: int, dtype: torch.dtype
    ) -> torch.Tensor:
        """The own combine region as ``[ep_size, R, hidden_size]`` of ``dtype``: write the
        expert results there and call ``combine(..., payload_in_workspace=True)`` to skip the
        copy. Only between dispatch() and combine(); ``R`` must be the dispatch's."""
        if self._phase != "dispatched":
            raise RuntimeError(
                "MoeAlltoAll.get_combine_payload_tensor_in_workspace: needs a dispatch() first "
                f"(phase is {self._phase!r})"
            )
        self._same_round("get_combine_payload_tensor_in_workspace", runtime_max_tokens_per_rank)
        start = self.ep_rank * self.workspace.stride(0) + self._combine_offset
        size = self.ep_size * runtime_max_tokens_per_rank * hidden_size * dtype.itemsize
        return moe_a2a_wrap_payload_tensor_in_workspace(
            self.workspace, [self.ep_size, runtime_max_tokens_per_rank], start, start + size, dtype
        )

    def dropped_expert_ids(self) -> int:
        """(token, k) pairs with an expert id outside ``[0, num_experts)`` dropped by this
        rank's dispatches since the workspace was initialised (synchronises)."""
        return _a2a.moe_a2a_dropped_expert_ids(self.workspace, self.ep_rank)

    @staticmethod
    def get_moe_workspace_size_per_rank(
        ep_size: int,
        top_k: int,
        max_num_tokens: int,
        hidden_size: int,
        extra_payload_bytes_per_token: int = 0,
        eplb_stats_num_experts: int = 0,
    ) -> int:
        """Bytes per rank for 16-bit hidden states, int32 ids and fp32 weights in the dispatch
        (plus ``extra_payload_bytes_per_token``) and a 16-bit combine; see
        :func:`fusedcomm.moe_a2a_get_workspace_size_per_rank` for other payloads."""
        return moe_workspace_size_per_rank(
            ep_size,
            top_k,
            max_num_tokens,
            hidden_size,
            extra_payload_bytes_per_token,
            eplb_stats_num_experts,
        )
