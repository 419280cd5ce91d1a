"""``MoeAlltoAll``: a MoE all-to-all over the expert-parallel group of a :class:`Mapping`.

It owns (through a per-process cache) a workspace of peer-mapped memory, initialises it on
every rank with a barrier after, and walks the round's steps in order:
``idle -> dispatch() -> dispatched -> combine() -> idle``. Misuse (combine before dispatch,
two dispatches in a row, another ``runtime_max_tokens_per_rank`` in the combine) raises
before anything is launched. The round in progress is tracked per workspace, not per
instance: instances sharing a workspace that interleave their rounds (dispatch A, dispatch B)
raise instead of corrupting both.
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
from . import _moe_a2a_state as _ws_state
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
    ``enable_rank_mask=True`` lets rounds exclude ranks (``active_rank_mask`` of dispatch and
    combine; docs/moe-a2a.md).
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
        eplb_stats_num_experts: int = 0,
        enable_rank_mask: bool = False,
        *,
        timeout_s: float | None = None,
        check_expert_ids: bool = False,
    ):
        self.enable_rank_mask = bool(enable_rank_mask)
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
        """Start over after a failure (collective: call on every rank of the group). Waits
        until this rank's device is idle and every rank has got there (a peer's kernel of the
        failed round may still be waiting out its timeout, and writes abort marks when it gives
        up), then initialises the workspace again in place and meets the group. The failure
        state and counters keep their addresses, so CUDA graphs captured before replay
        correctly afterwards. Every instance sharing the workspace goes back to idle."""
        entry = self._entry
        torch.cuda.synchronize(self.workspace.device)
        entry["backend"].barrier()  # no kernel of the failed round runs on any rank
        entry["metainfo"] = _a2a.moe_a2a_initialize(
            self.workspace,
            self.ep_rank,
            self.ep_size,
            self.max_num_tokens,
            entry["eplb"],
            timeout_s=entry["timeout_s"] if timeout_s is None else timeout_s,
        )
        self.metainfo = entry["metainfo"]
        entry["backend"].barrier()  # no rank dispatches into a row before its owner zeroed it

    def checkpoint_prepare(self) -> None:
        """Engines call this before suspending the process; saving the workspace is not
        implemented."""
        raise NotImplementedError(
            "MoeAlltoAll.checkpoint_prepare: checkpointing the MoE all-to-all workspace is not "
            "implemented"
        )

    def checkpoint_restore(self, comm_backend: Any) -> None:
        """Engines call this after resuming the process; restoring the workspace is not
        implemented."""
        raise NotImplementedError(
            "MoeAlltoAll.checkpoint_restore: checkpointing the MoE all-to-all workspace is not "
            "implemented"
        )

    @property
    def eplb_gathered_stats(self) -> torch.Tensor:
        """The ``eplb_local_stats`` every rank passed to its last dispatch: int32 ``[ep_size,
        eplb_stats_num_experts]`` (:func:`fusedcomm.ops.moe_a2a.moe_a2a_eplb_gathered_stats`);
        read it before the round's combine. Needs ``eplb_stats_num_experts > 0``."""
        return _a2a.moe_a2a_eplb_gathered_stats(self.workspace, self.ep_rank)

    @classmethod
    def free_workspaces(cls) -> None:
        """Drop this process's cached workspaces (unmapped once no instance uses them). Call
        on every rank, when no dispatch or combine is in flight."""
        cls._WORKSPACE_CACHE.clear()

    # ----------------------------------------------------------------------------- a round

    def _round(self):
        """The round in progress on this instance's workspace (any instance's), or None."""
        st = _ws_state._workspaces.get((self.workspace.data_ptr(), self.ep_rank))
        return None if st is None else st.round

    @property
    def phase(self) -> str:
        """``"idle"`` or ``"dispatched"`` (this instance has dispatched and not combined)."""
        r = self._round()
        return "dispatched" if r is not None and r.owner is self else "idle"

    def _expect(self, phase: str, what: str):
        r = self._round()
        if r is not None and r.owner is not self:
            whose = "another MoeAlltoAll" if r.owner is not None else "moe_a2a_dispatch"
            raise MoeA2AStateError(
                f"MoeAlltoAll.{what}: {whose} sharing this workspace has dispatched and not "
                "combined yet; interleaved rounds on one workspace corrupt both (finish that "
                "round first)"
            )
        if self.phase != phase:
            raise MoeA2AStateError(
                f"MoeAlltoAll.{what}: called in phase {self.phase!r}, needs {phase!r} (a round is "
                "dispatch() then combine())"
            )
        return r

    def _same_round(self, what: str, runtime_max_tokens_per_rank: int):
        r = self._round()
        if r is None or r.owner is not self:
            raise RuntimeError(
                f"MoeAlltoAll.{what}: needs a dispatch() of this instance first (phase is "
                f"{self.phase!r})"
            )
        if runtime_max_tokens_per_rank != r.max_tokens:
            raise MoeA2AArgumentError(
                f"MoeAlltoAll.{what}: runtime_max_tokens_per_rank ({runtime_max_tokens_per_rank}) "
                f"must be the dispatch's ({r.max_tokens})"
            )
        return r

    def _mask_allowed(self, method: str, mask: Any) -> None:
        if mask is None or self.enable_rank_mask:
            return
        full = (1 << self.ep_size) - 1
        if isinstance(mask, torch.Tensor) and mask.numel() == 1 and not mask.is_floating_point():
            bits = int(mask.reshape(-1)[0].item())
        elif isinstance(mask, int) and not isinstance(mask, bool):
            bits = mask
        else:
            return  # the free function says what is wrong with it
        if bits & full != full:
            raise MoeA2AArgumentError(
                f"MoeAlltoAll.{method}: active_rank_mask {bits & full:#x} excludes ranks; "
                "construct the MoeAlltoAll with enable_rank_mask=True"
            )

    def dispatch(
        self,
        token_selected_experts: torch.Tensor,
        input_payloads: list[torch.Tensor],
        runtime_max_tokens_per_rank: int,
        invalid_token_expert_id: int | None = None,
        expert_id_payload_index: int | None = None,
        eplb_local_stats: torch.Tensor | None = None,
        active_rank_mask: Any = None,
        *,
        enable_pdl: bool | None = None,
    ) -> list[torch.Tensor]:
        """Dispatch (see :func:`fusedcomm.moe_a2a_dispatch`); returns the received views,
        ``[ep_size, R, *]`` per payload. With ``invalid_token_expert_id``, the received copy of
        the expert ids (``input_payloads[expert_id_payload_index]``, required then) has its
        padding slots set to that id (:func:`fusedcomm.moe_a2a_sanitize_expert_ids`).
        ``eplb_local_stats`` (gathered into :attr:`eplb_gathered_stats`) and
        ``active_rank_mask`` (one that excludes ranks needs ``enable_rank_mask=True``): as in
        the free function."""
        self._expect("idle", "dispatch")
        self._mask_allowed("dispatch", active_rank_mask)
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
            eplb_local_stats=eplb_local_stats,
            active_rank_mask=active_rank_mask,
            _owner=self,
        )
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
        output_dtype: torch.dtype | None = None,
        output_scales: torch.Tensor | None = None,
        output_scalar_scale: float = 1.0,
        sf_layout: int = _a2a.SF_LAYOUT_LINEAR,
        output: torch.Tensor | None = None,
        *,
        use_low_precision: bool = False,
        active_rank_mask: Any = None,
        enable_pdl: bool | None = None,
    ) -> torch.Tensor:
        """Combine (see :func:`fusedcomm.moe_a2a_combine`, which documents every argument) the
        ``[ep_size, R, H]`` expert results of the last dispatch; returns ``[local_num_tokens,
        H]``. ``R`` must be the dispatch's. Ends the round."""
        self._expect("dispatched", "combine")
        self._mask_allowed("combine", active_rank_mask)
        r = self._same_round("combine", runtime_max_tokens_per_rank)
        return _a2a.moe_a2a_combine(
            payload,
            r.local_tokens,
            self.workspace,
            self.metainfo,
            runtime_max_tokens_per_rank,
            self.ep_rank,
            self.ep_size,
            self.top_k,
            r.combine_offset,
            payload_in_workspace,
            output_dtype,
            output_scales,
            output_scalar_scale,
            sf_layout,
            output,
            use_low_precision=use_low_precision,
            enable_pdl=enable_pdl,
            active_rank_mask=active_rank_mask,
            _owner=self,
        )

    def get_combine_payload_tensor_in_workspace(
        self, runtime_max_tokens_per_rank: int, hidden_size: int, dtype: torch.dtype
    ) -> torch.Tensor:
        """The own combine region as ``[ep_size, R, hidden_size]`` of ``dtype``: write the
        expert results there and call ``combine(..., payload_in_workspace=True)`` to skip the
        copy. Only between dispatch() and combine(); ``R`` must be the dispatch's."""
        r = self._same_round("get_combine_payload_tensor_in_workspace", runtime_max_tokens_per_rank)
        start = self.ep_rank * self.workspace.stride(0) + r.combine_offset
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
