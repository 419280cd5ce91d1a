"""Mixed communication: all-reduce + all-gather and reduce-scatter + all-reduce (§12).

Ranks form a TP x DP grid (``MixedCommHandler``'s sizes; the layout and its rules:
``fusedcomm.runtime.mixed_comm_workspace``). With ``x^{(t,d)}`` the input of the rank with TP
index ``t`` and DP index ``d``, the result on rank ``(t, d)`` is::

    ALLREDUCE (dp 1)           x_in [N, ...]     out = sum_t x^(t)
    ALLGATHER (tp 1)           x_in [N, ...]     out = cat_d' x^(d')                  [dp N, ...]
    REDUCESCATTER (tp 1)       x_in [dp M, ...]  out = sum_d' x^(d')[d M:(d+1) M]     [M, ...]
    ALLREDUCE_ALLGATHER        x_in [N, ...]     out[d' N:(d'+1) N] = sum_t' x^(t',d')  [dp N, ...]
    REDUCESCATTER_ALLREDUCE    x_in [dp M, ...]  out = sum_(t',d') x^(t',d')[d M:(d+1) M]  [M, ...]

Modes: ``NCCL_ONE`` (one world collective, then a local fp32 sum in rank order where one is
needed), ``NCCL_TP_DP`` (AR on the TP group then AG on the DP group, or RS on DP then AR on TP),
both through torch.distributed (under a gloo group the collectives go through host memory and
reduce in fp32 in rank order); ``FUSED_OPT_WAITS_UC`` (one Lamport round: every rank pushes its
data to every rank that needs it and each receiver reduces in fp32 in rank order) and
``FUSED_OPT_BYTES1_UC`` (two rounds: reduce among the owners of a slice, then share the reduced
slice: fewer bytes), on unicast peer memory within one node; ``AUTOTUNE`` (the fastest mode
measured at construction, the same on every rank). Results are bitwise equal across the TP
ranks of a group in every mode; the fused modes write -0.0 as +0.0.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist

from .runtime.mixed_comm_workspace import (
    FUSED_MODES,
    SCATTER_OPS,
    MixedCommMode,
    MixedCommOp,
    MixedTopology,
    autotune_index,
    autotune_ladder,
    valid_modes,
    valid_ops,
)

__all__ = ["MixedCommHandler", "MixedCommMode", "MixedCommOp", "run_mixed_comm"]

_DTYPES = (torch.float16, torch.bfloat16)
_AUTOTUNE_ITERS = 3


def _nccl_group(group: Any) -> bool:
    return "nccl" in str(dist.get_backend(group)).lower()


class _Collectives:
    """torch.distributed collectives over one group. Under NCCL they run as they are; under
    gloo (ranks sharing a GPU, or CPU tensors) every one is an all-gather of raw bytes through
    host memory, and reductions are fp32 sums in group-rank order."""

    def __init__(self, group: Any, ranks: list[int]):
        self.group, self.ranks = group, ranks
        self.size = len(ranks)
        self.native = _nccl_group(group)

    def _gather_host(self, x: torch.Tensor) -> list[torch.Tensor]:
        raw = x.contiguous().view(torch.uint8).reshape(-1).cpu()
        parts = [torch.empty_like(raw) for _ in range(self.size)]
        dist.all_gather(parts, raw, group=self.group)
        return [p.to(x.device).view(x.dtype).view(x.shape) for p in parts]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[size, *x.shape]: every rank's x in group order."""
        if not (self.native and x.is_cuda):
            return torch.stack(self._gather_host(x))
        out = x.new_empty((self.size, *x.shape))
        dist.all_gather_into_tensor(out, x.contiguous(), group=self.group)
        return out

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.native and x.is_cuda):
            return _rank_sum(self._gather_host(x)).to(x.dtype)
        out = x.clone()
        dist.all_reduce(out, group=self.group)
        return out

    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        """Block g (of ``size`` along dim 0) summed over the group, on group rank g."""
        me = self.ranks.index(dist.get_rank())
        if not (self.native and x.is_cuda):
            return _rank_sum([p.chunk(self.size)[me] for p in self._gather_host(x)]).to(x.dtype)
        out = x.new_empty((x.shape[0] // self.size, *x.shape[1:]))
        dist.reduce_scatter_tensor(out, x.contiguous(), group=self.group)
        return out

    def all_to_all(self, send: torch.Tensor) -> torch.Tensor:
        """send [size, ...]: entry g goes to group rank g; returns what every rank sent here."""
        me = self.ranks.index(dist.get_rank())
        if not (self.native and send.is_cuda):
            return torch.stack([p[me] for p in self._gather_host(send)])
        out = torch.empty_like(send)
        dist.all_to_all_single(out, send.contiguous(), group=self.group)
        return out


def _rank_sum(parts: list[torch.Tensor]) -> torch.Tensor:
    """fp32 sum in list order (the first upcast, then +=)."""
    acc = parts[0].to(torch.float32, copy=True)
    for p in parts[1:]:
        acc += p.float()
    return acc


class MixedCommHandler:
    """Communicators and buffers of one TP x DP layout; collective over every rank.

    Sizes follow §12: ``world_rank = inter_rank * local_size + local_rank``, ``local_rank =
    local_tp_rank + local_dp_rank * local_tp_size`` (likewise across nodes); a TP / DP size of
    None takes the default (local TP = local_size, local DP = 1, inter TP = inter_size, inter
    DP = 1). torch.distributed must be initialised with this world. dtype float16 or bfloat16;
    ``device`` this rank's GPU (a CPU device runs the NCCL modes only, over gloo).

    The fused unicast modes need one node (``inter_size == 1``) and ``local_size <= 8``; they
    share one row of peer-mapped memory per rank. ``grid_size`` (default: the SM count; at
    most the SM count) bounds their thread blocks (at most 128 run). ``max_block_size``,
    ``min_block_size``, ``min_num_steps`` are checked for compatibility (multiples of 32) and
    otherwise unused; ``ib_enable_ibgda`` and ``should_init_nvshmem`` are accepted and unused
    (no NVSHMEM). With ``use_autotune`` every valid mode is timed at construction over the
    AUTOTUNE byte ladder and every rank adopts the same choice (the slowest rank's timings
    decide). ``timeout_s`` bounds every wait of the fused kernels for a peer.
    """

    def __init__(
        self,
        world_rank: int,
        world_size: int,
        local_rank: int,
        local_size: int,
        inter_rank: int,
        inter_size: int,
        local_tp_size: int | None,
        local_dp_size: int | None,
        inter_tp_size: int | None,
        inter_dp_size: int | None,
        dtype: torch.dtype,
        device: torch.device,
        grid_size: int | None = None,
        max_block_size: int | None = None,
        min_block_size: int = 256,
        min_num_steps: int = 4,
        ib_enable_ibgda: bool = True,
        should_init_nvshmem: bool = True,
        use_autotune: bool = True,
        *,
        timeout_s: float | None = None,
    ):
        op = "MixedCommHandler"
        self._running = False
        self._groups: list[Any] = []
        self._fused = None
        topo = MixedTopology.make(world_rank, world_size, local_rank, local_size, inter_rank,
                                  inter_size, local_tp_size, local_dp_size, inter_tp_size,
                                  inter_dp_size, op)  # fmt: skip
        if dtype not in _DTYPES:
            raise TypeError(f"{op}: dtype must be torch.float16 or torch.bfloat16, got {dtype}")
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"{op}: torch.distributed must be initialised first")
        if dist.get_world_size() != topo.world_size or dist.get_rank() != topo.world_rank:
            raise ValueError(
                f"{op}: torch.distributed has rank {dist.get_rank()} of "
                f"{dist.get_world_size()}, the handler world_rank {world_rank} of {world_size}"
            )
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        sms = torch.cuda.get_device_properties(device).multi_processor_count if (
            device.type == "cuda") else 1  # fmt: skip
        grid = sms if grid_size is None else _positive(op, "grid_size", grid_size)
        if grid > sms:
            raise ValueError(f"{op}: grid_size ({grid}) must be <= the SM count ({sms})")
        for name, value in (("max_block_size", max_block_size), ("min_block_size", min_block_size)):
            if value is not None and _positive(op, name, value) % 32:
                raise ValueError(f"{op}: {name} ({value}) must be a multiple of 32")
        if max_block_size is not None and max_block_size < min_block_size:
            raise ValueError(
                f"{op}: max_block_size ({max_block_size}) must be >= min_block_size "
                f"({min_block_size})"
            )
        _positive(op, "min_num_steps", min_num_steps)
        self.para_info = topo
        self.dtype, self.device, self.grid_size = dtype, device, grid
        self.min_block_size, self.max_block_size = min_block_size, max_block_size
        self.min_num_steps, self.use_autotune = min_num_steps, bool(use_autotune)
        self.ib_enable_ibgda, self.should_init_nvshmem = ib_enable_ibgda, should_init_nvshmem
        self._running = True
        try:
            self._setup(timeout_s)
        except BaseException:
            self._release()
            raise

    # -- construction ----------------------------------------------------------------------

    def _new_group(self, all_ranks: list[list[int]], mine: int) -> tuple[Any, list[int]]:
        groups = [dist.new_group(r) for r in all_ranks]  # every rank makes every group, in order
        self._groups.extend(groups)
        return groups[mine], all_ranks[mine]

    def _setup(self, timeout_s: float | None) -> None:
        topo = self.para_info
        world = list(range(topo.world_size))
        self._world = _Collectives(dist.group.WORLD, world)
        self.tp_comm_group = self.dp_comm_group = None
        self._tp = self._dp = None
        if topo.mixed:
            self.tp_comm_group, tp_ranks = self._new_group(topo.tp_groups(), topo.dp_rank)
            self.dp_comm_group, dp_ranks = self._new_group(topo.dp_groups(), topo.tp_rank)
            self._tp = _Collectives(self.tp_comm_group, tp_ranks)
            self._dp = _Collectives(self.dp_comm_group, dp_ranks)
        self._agree_on_configuration()
        from .ops.mixed_comm import FusedMixedComm, fused_supported

        here = self.device.type == "cuda" and fused_supported(topo, self.device)
        every: list[Any] = [None] * topo.world_size
        dist.all_gather_object(every, here)
        fused = all(every)  # every rank lists the same modes
        if fused:
            self._fused = FusedMixedComm(topo, self.dtype, self.device, self.grid_size,
                                         timeout_s)  # fmt: skip
        self.valid_op_list = valid_ops(topo)
        self.valid_mode_list = valid_modes(topo, self.use_autotune, fused)
        # Launch shape of each fused (op, mode), as other implementations report it.
        self.max_block_size_dict = {
            (op, mode): dict(self._fused.launch_shape)
            for op in self.valid_op_list
            for mode in self.valid_mode_list
            if mode in FUSED_MODES
        }
        self.autotune_ladder = autotune_ladder(topo.dp_size)
        self.autotune_map: dict[MixedCommOp, list[MixedCommMode]] = {}
        if self.use_autotune:
            self._autotune()

    def _agree_on_configuration(self) -> None:
        """Every rank must have the same layout, dtype and grid (they decide the plans)."""
        topo = self.para_info
        mine = (topo.local_size, topo.inter_size, topo.local_tp_size, topo.inter_tp_size,
                str(self.dtype), self.grid_size, self.use_autotune)  # fmt: skip
        every: list[Any] = [None] * topo.world_size
        dist.all_gather_object(every, mine)
        for rank, other in enumerate(every):
            if tuple(other) != mine:
                raise ValueError(
                    f"MixedCommHandler: rank {rank} has (local_size, inter_size, local_tp_size, "
                    f"inter_tp_size, dtype, grid_size, use_autotune) = {tuple(other)}, rank "
                    f"{topo.world_rank} {mine}"
                )

    def _autotune(self) -> None:
        """Time every non-AUTOTUNE mode at every rung, per op; the slowest rank's time of each
        (op, rung, mode) counts, so every rank sees the same table and picks the same mode."""
        topo = self.para_info
        modes = [m for m in self.valid_mode_list if m != MixedCommMode.AUTOTUNE]
        elem = torch.empty((), dtype=self.dtype).element_size()
        hidden = 8192 // elem
        top = self.autotune_ladder[-1] // 8192
        data = torch.empty((top * topo.dp_size, hidden), dtype=self.dtype, device=self.device)
        data.uniform_(-0.5, 0.5)
        times = torch.zeros(
            (len(self.valid_op_list), len(self.autotune_ladder), len(modes)), dtype=torch.float64
        )
        for i, op in enumerate(self.valid_op_list):
            for j in range(len(self.autotune_ladder)):
                rows = (1 << j) * (topo.dp_size if op in SCATTER_OPS else 1)
                x_in = data[:rows]
                for k, mode in enumerate(modes):
                    times[i, j, k] = self._time(op, x_in, mode)
        if self._world.native and self.device.type == "cuda":
            on_device = times.to(self.device)
            dist.all_reduce(on_device, op=dist.ReduceOp.MAX)
            times = on_device.cpu()
        else:
            dist.all_reduce(times, op=dist.ReduceOp.MAX)
        for i, op in enumerate(self.valid_op_list):
            self.autotune_map[op] = [modes[int(k)] for k in times[i].argmin(dim=1).tolist()]

    def _time(self, op: MixedCommOp, x_in: torch.Tensor, mode: MixedCommMode) -> float:
        cuda = self.device.type == "cuda"
        out = _dispatch(op, self, x_in, None, mode)  # warm-up (and the output's allocation)
        if cuda:
            torch.cuda.synchronize(self.device)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(_AUTOTUNE_ITERS):
            _dispatch(op, self, x_in, out, mode)
        if cuda:
            torch.cuda.synchronize(self.device)
        return (time.perf_counter() - start) / _AUTOTUNE_ITERS

    # -- queries ---------------------------------------------------------------------------

    def get_valid_op_list(self) -> list[MixedCommOp]:
        """The ops this layout runs (a copy of ``valid_op_list``)."""
        return list(self.valid_op_list)

    def get_valid_mode_list(self) -> list[MixedCommMode]:
        """The modes this layout runs (a copy of ``valid_mode_list``)."""
        return list(self.valid_mode_list)

    def select_autotune_mode(self, op: MixedCommOp, x_in: torch.Tensor) -> MixedCommMode:
        """The mode AUTOTUNE runs ``op`` on ``x_in`` with (by its local bytes)."""
        nbytes = x_in.numel() * x_in.element_size()
        if op in SCATTER_OPS:
            nbytes //= self.para_info.dp_size
        return self.autotune_map[op][autotune_index(nbytes, len(self.autotune_ladder))]

    # -- teardown --------------------------------------------------------------------------

    def _release(self) -> None:
        self._running = False
        if self._fused is not None:
            self._fused.close()
            self._fused = None
        for g in self._groups:
            try:
                dist.destroy_process_group(g)
            except Exception:  # noqa: BLE001 - best effort; the world group may be gone
                pass
        self._groups = []

    def shutdown(self) -> None:
        """Release the buffers and the sub-groups (once; waits for this rank's device and
        meets every rank first, so no peer still writes into the rows)."""
        if not self._running:
            raise RuntimeError("MixedCommHandler.shutdown: the handler is already shut down")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dist.barrier()
        self._release()

    def __del__(self) -> None:
        if getattr(self, "_running", False):
            try:
                self._release()
            except Exception:  # noqa: BLE001 - at collection or interpreter exit
                pass


def _positive(op: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{op}: {name} ({value}) must be >= 1")
    return value


# -- NCCL modes ------------------------------------------------------------------------------


def _nccl_one(op: MixedCommOp, h: MixedCommHandler, x: torch.Tensor) -> torch.Tensor:
    topo, world = h.para_info, h._world
    if op == MixedCommOp.ALLREDUCE:
        return world.all_reduce(x)
    if op == MixedCommOp.ALLGATHER:
        return world.gather(x).flatten(0, 1)
    if op == MixedCommOp.REDUCESCATTER:
        return world.reduce_scatter(x)
    if op == MixedCommOp.ALLREDUCE_ALLGATHER:
        parts = world.gather(x)  # [world, N, ...]
        blocks = [_rank_sum([parts[w] for w in ranks]).to(x.dtype) for ranks in topo.tp_groups()]
        return torch.cat(blocks)
    # REDUCESCATTER_ALLREDUCE: rank w gets block dp_rank(w) of every rank, then sums them all.
    blocks = x.chunk(topo.dp_size)
    send = torch.stack([blocks[topo.of(w)[1]] for w in range(topo.world_size)])
    got = world.all_to_all(send)
    return _rank_sum(list(got)).to(x.dtype)


def _nccl_tp_dp(op: MixedCommOp, h: MixedCommHandler, x: torch.Tensor) -> torch.Tensor:
    if op == MixedCommOp.ALLREDUCE_ALLGATHER:
        return h._dp.gather(h._tp.all_reduce(x)).flatten(0, 1)
    return h._tp.all_reduce(h._dp.reduce_scatter(x))


def _out_rows(op: MixedCommOp, h: MixedCommHandler, rows: int) -> int:
    dp = h.para_info.dp_size
    return rows // dp if op in SCATTER_OPS else rows * dp


def _dispatch(
    op: MixedCommOp,
    h: MixedCommHandler,
    x_in: torch.Tensor,
    x_out: torch.Tensor | None,
    mode: MixedCommMode,
) -> torch.Tensor:
    if x_out is None:
        shape = (_out_rows(op, h, x_in.shape[0]), *x_in.shape[1:])
        x_out = torch.empty(shape, dtype=x_in.dtype, device=x_in.device)
    if x_in.numel() == 0:
        return x_out
    if mode in FUSED_MODES:
        h._fused.run(op, mode, x_in, x_out)
        return x_out
    result = _nccl_one(op, h, x_in) if mode == MixedCommMode.NCCL_ONE else _nccl_tp_dp(op, h, x_in)
    x_out.copy_(result.view(x_out.shape))
    return x_out


def _check_call(
    op: Any, h: Any, x_in: Any, x_out: Any, mode: Any
) -> tuple[MixedCommOp, MixedCommMode | None]:
    fn = "run_mixed_comm"
    if not isinstance(h, MixedCommHandler):
        raise TypeError(f"{fn}: handler must be a MixedCommHandler, got {type(h).__name__}")
    if not h._running:
        raise ValueError(f"{fn}: the handler is shut down")
    try:
        op = MixedCommOp(op)
    except ValueError:
        raise ValueError(f"{fn}: invalid op {op!r}") from None
    if op not in h.valid_op_list:
        names = [o.name for o in h.valid_op_list]
        raise ValueError(f"{fn}: invalid op {op.name} for this layout (valid: {names})")
    if mode is not None:
        try:
            mode = MixedCommMode(mode)
        except ValueError:
            raise ValueError(f"{fn}: invalid mode {mode!r}") from None
        if mode not in h.valid_mode_list:
            names = [m.name for m in h.valid_mode_list]
            raise ValueError(
                f"{fn}: invalid mode {mode.name} for this handler{_why_invalid(mode, h)} "
                f"(valid: {names})"
            )
    if not isinstance(x_in, torch.Tensor):
        raise TypeError(f"{fn}: x_in must be a torch.Tensor, got {type(x_in).__name__}")
    dp = h.para_info.dp_size
    if x_in.ndim < 2:
        raise ValueError(f"{fn}: x_in.ndim ({x_in.ndim}) must be at least 2")
    if x_in.dtype != h.dtype:
        raise ValueError(f"{fn}: x_in.dtype ({x_in.dtype}) must be the handler's ({h.dtype})")
    if x_in.device != h.device:
        raise ValueError(f"{fn}: x_in.device ({x_in.device}) must be the handler's ({h.device})")
    if not x_in.is_contiguous():
        raise ValueError(f"{fn}: x_in must be contiguous")
    scatter = op in SCATTER_OPS
    if scatter and x_in.shape[0] % dp:
        raise ValueError(
            f"{fn}: x_in.shape[0] ({x_in.shape[0]}) must be divisible by dp_size ({dp})"
        )
    per_block = x_in.numel() // dp if scatter else x_in.numel()
    if per_block % 8:
        what = "x_in.numel() / dp_size" if scatter else "x_in.numel()"
        raise ValueError(f"{fn}: {what} ({per_block}) must be a multiple of 8 (16 bytes)")
    if x_out is not None:
        if not isinstance(x_out, torch.Tensor):
            raise TypeError(f"{fn}: x_out must be a torch.Tensor, got {type(x_out).__name__}")
        if x_out.ndim != x_in.ndim or x_out.dtype != x_in.dtype or x_out.device != x_in.device:
            raise ValueError(
                f"{fn}: x_out ({x_out.ndim}-D, {x_out.dtype}, {x_out.device}) must match x_in's "
                f"ndim, dtype and device ({x_in.ndim}-D, {x_in.dtype}, {x_in.device})"
            )
        if x_out.shape[1:] != x_in.shape[1:]:
            raise ValueError(
                f"{fn}: x_out.shape[1:] ({tuple(x_out.shape[1:])}) must equal x_in.shape[1:] "
                f"({tuple(x_in.shape[1:])})"
            )
        rows = _out_rows(op, h, x_in.shape[0])
        if x_out.shape[0] != rows:
            rule = "x_in.shape[0] / dp_size" if scatter else "x_in.shape[0] * dp_size"
            raise ValueError(f"{fn}: x_out.shape[0] ({x_out.shape[0]}) must equal {rule} ({rows})")
        if not x_out.is_contiguous():
            raise ValueError(f"{fn}: x_out must be contiguous")
        a0, n_in = x_in.data_ptr(), x_in.numel() * x_in.element_size()
        b0, n_out = x_out.data_ptr(), x_out.numel() * x_out.element_size()
        if n_in and n_out and a0 < b0 + n_out and b0 < a0 + n_in:
            raise ValueError(f"{fn}: x_out must not overlap x_in")
    return op, mode


def _why_invalid(mode: MixedCommMode, h: MixedCommHandler) -> str:
    topo = h.para_info
    if mode.name.endswith("_MC"):
        return ": NVLink multicast is never enabled"
    if mode.name.startswith("FUSED_OPT_BYTES2"):
        return ": no fused inter-node mode (no NVSHMEM); use NCCL_ONE or NCCL_TP_DP"
    if mode in FUSED_MODES:
        if topo.inter_size > 1:
            return (
                f": the fused modes run within one node (inter_size is {topo.inter_size}); use "
                "NCCL_ONE or NCCL_TP_DP"
            )
        if h.device.type != "cuda":
            return f": the fused modes need a GPU (device is {h.device})"
        if mode == MixedCommMode.FUSED_OPT_BYTES1_UC and topo.local_tp_size == 1:
            return ": it needs local_tp_size > 1"
        return ": the fused modes need local_size <= 8 and an SM 9.0 or newer GPU"
    if mode == MixedCommMode.NCCL_TP_DP:
        return ": it needs both tp_size and dp_size > 1"
    if mode == MixedCommMode.AUTOTUNE:
        return ": the handler was made with use_autotune=False"
    return ""


def run_mixed_comm(
    op: MixedCommOp,
    handler: MixedCommHandler,
    x_in: torch.Tensor,
    x_out: torch.Tensor | None = None,
    mode: MixedCommMode | None = None,
) -> torch.Tensor:
    """Run one mixed collective (the table in the module docstring) and return ``x_out``.

    Unfused reference (``fusedcomm.reference.mixed_comm_reference``): gather every rank's
    ``x_in``, sum in fp32 over the TP ranks (ALLREDUCE, ALLREDUCE_ALLGATHER: per DP block) or
    over the ranks of each DP block's slice (REDUCESCATTER: the DP ranks;
    REDUCESCATTER_ALLREDUCE: all ranks), in rank order, and round once.

    ``x_in``: the handler's dtype and device, at least 2-D, contiguous; for the reduce-scatter
    ops ``shape[0]`` divisible by ``dp_size``; the element count (per DP block for the
    reduce-scatter ops) a multiple of 8. ``x_out``: optional, contiguous, ``[dp_size *
    shape[0], ...]`` (``[shape[0] / dp_size, ...]`` for the reduce-scatter ops), not overlapping
    ``x_in``; by default a new tensor. ``mode``: one of ``handler.valid_mode_list``; None takes
    AUTOTUNE when the handler tuned, else NCCL_TP_DP where valid, else NCCL_ONE. Every rank
    calls with the same op, mode and shapes. Bad arguments raise ValueError (TypeError for a
    non-tensor) before any communication. Results are bitwise equal across the ranks of a TP
    group.
    """
    op, mode = _check_call(op, handler, x_in, x_out, mode)
    if mode is None:
        if handler.use_autotune:
            mode = MixedCommMode.AUTOTUNE
        elif MixedCommMode.NCCL_TP_DP in handler.valid_mode_list:
            mode = MixedCommMode.NCCL_TP_DP
        else:
            mode = MixedCommMode.NCCL_ONE
    if mode == MixedCommMode.AUTOTUNE:
        mode = handler.select_autotune_mode(op, x_in)
    return _dispatch(op, handler, x_in, x_out, mode)


def _is_compute_capability_supported(cc: int) -> bool:
    """Whether the fused modes run on a GPU of compute capability ``cc`` (e.g. 90): SM 9.0 and
    newer. The NCCL modes run anywhere torch.distributed does."""
    return int(cc) >= 90


run_mixed_comm.is_compute_capability_supported = _is_compute_capability_supported
