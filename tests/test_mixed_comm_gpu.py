"""Mixed communication on GPU ranks (two ranks may share one GPU): every valid (op, mode) of
every TP x DP split of the node, against fusedcomm.reference.mixed_comm and against the NCCL
modes at the reference library's tolerance (rtol 2e-2, atol 2e-1 on inputs uniform in
[-0.5, 0.5) / sqrt(tp)), with poisoned outputs, bitwise equality across the TP ranks of a group,
the fused modes equal to the rank-order reference bit for bit (up to the sign of zero), AUTOTUNE
agreeing across ranks, and a missing peer raising instead of hanging.

Every rank builds every rank's input from the seed (no collective needed for the reference).
"""

import math
import time

import pytest
import torch

import fusedcomm as comm
from fusedcomm import mixed_comm
from fusedcomm.mixed_comm import MixedCommHandler, MixedCommMode, MixedCommOp, run_mixed_comm
from fusedcomm.reference import mixed_comm_reference
from fusedcomm.testing.checks import Failures, assert_no_failures
from fusedcomm.testing.dist import barrier, gather_all, rank_device, ranks_share_gpu, run_ranks

Op, Mode = MixedCommOp, MixedCommMode
SCATTER = (Op.REDUCESCATTER, Op.REDUCESCATTER_ALLREDUCE)
FUSED = (Mode.FUSED_OPT_WAITS_UC, Mode.FUSED_OPT_BYTES1_UC)
HIDDEN = 1024
BATCHES = [1, 2, 3, 7, 16, 61, 128, 333, 1000, 1717, 2048, 4096]  # sampled from [1, 4096]
RTOL, ATOL = 2e-2, 2e-1


def _splits(world):
    return [(tp, world // tp) for tp in range(1, world + 1) if world % tp == 0]


def _handler(rank, world, tp, dp, dtype, **kw):
    return MixedCommHandler(rank, world, rank, world, 0, 1, tp, dp, None, None, dtype,
                            rank_device(), **kw)  # fmt: skip


def _inputs(seed, world, rows, dtype, tp):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    scale = 1.0 / math.sqrt(tp)
    return [
        ((torch.rand((rows, HIDDEN), generator=gen, device="cuda") - 0.5) * scale).to(dtype)
        for _ in range(world)
    ]


def _bits(t):
    return (t + 0.0).view(torch.int16)  # + 0.0: -0.0 becomes +0.0


def _rank_matrix(rank, world, dtype, seed):
    f = Failures()
    for tp, dp in _splits(world):
        h = _handler(rank, world, tp, dp, dtype, use_autotune=False, timeout_s=60.0)
        topo = h.para_info
        modes = [m for m in h.valid_mode_list if m != Mode.AUTOTUNE]
        f.check(all(m in modes for m in FUSED if m != Mode.FUSED_OPT_BYTES1_UC or tp > 1),
                f"tp{tp} dp{dp}: fused modes missing from {modes}")  # fmt: skip
        ref_mode = Mode.NCCL_TP_DP if Mode.NCCL_TP_DP in modes else Mode.NCCL_ONE
        for op in h.valid_op_list:
            for i, batch in enumerate(BATCHES):
                rows = batch * (dp if op in SCATTER else 1)
                xs = _inputs(seed + 1000 * i + 10 * int(op) + tp, world, rows, dtype, tp)
                want = mixed_comm_reference(op, xs, topo.of)[rank]
                nccl = run_mixed_comm(op, h, xs[rank], mode=ref_mode)
                for mode in modes:
                    what = f"tp{tp} dp{dp} {op.name} {mode.name} batch {batch}"
                    out = torch.full_like(want, float("nan"))  # poisoned
                    got = run_mixed_comm(op, h, xs[rank], out, mode)
                    f.check(got is out, f"{what}: x_out not returned")
                    f.check(got.shape == want.shape, f"{what}: shape {tuple(got.shape)}")
                    close = torch.allclose(got, want, rtol=RTOL, atol=ATOL)
                    f.check(close, f"{what}: differs from the reference")
                    f.check(torch.allclose(got, nccl, rtol=RTOL, atol=ATOL), f"{what}: vs NCCL")
                    if mode in FUSED:
                        f.check(torch.equal(_bits(got), _bits(want)), f"{what}: not exact")
                    # Bitwise across the TP ranks of each group (same dp index).
                    every = gather_all(got.view(torch.int16)) if tp > 1 else []
                    for w in range(len(every)):
                        if w != rank and topo.of(w)[1] == topo.dp_rank:
                            f.check(torch.equal(every[w], every[rank]),
                                    f"{what}: ranks {rank} and {w} differ")  # fmt: skip
            # A fresh output (x_out None) on a non-power-of-two size, the fused modes. Inputs
            # differ per mode: a fresh output could otherwise reuse the freed block of the
            # previous mode's reference, which holds the very values expected.
            for mode in [m for m in modes if m in FUSED]:
                xs = _inputs(seed + 77 + int(mode), world, 5 * dp, dtype, tp)
                want = mixed_comm_reference(op, xs, topo.of)[rank]
                got = run_mixed_comm(op, h, xs[rank], mode=mode)
                f.check(torch.equal(_bits(got), _bits(want)), f"{op.name} {mode.name}: fresh")
        torch.cuda.synchronize()
        comm.check_errors()
        h.shutdown()
    barrier()
    return f.messages


@pytest.mark.gpu(2)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_every_op_and_mode_matches_the_reference(world_size, dtype):
    assert_no_failures(
        run_ranks(_rank_matrix, world_size, backend="nccl", args=(dtype, 11), timeout_s=600)
    )


def _rank_autotune(rank, world):
    f = Failures()
    if ranks_share_gpu(world):
        # Ranks that take turns on one GPU pay a time slice per round of a fused call: the
        # ladder's first rungs only (the ladder itself is tested on CPU).
        full = mixed_comm.autotune_ladder
        mixed_comm.autotune_ladder = lambda dp: full(dp)[:5]
    tp, dp = _splits(world)[-1]  # TP only: AR, with both fused modes
    h = _handler(rank, world, tp, dp, torch.bfloat16, timeout_s=60.0)
    f.check(Mode.AUTOTUNE in h.valid_mode_list, f"modes {h.valid_mode_list}")
    choice = {op.name: [m.name for m in h.autotune_map[op]] for op in h.valid_op_list}
    every = [None] * world
    torch.distributed.all_gather_object(every, choice)
    f.check(all(e == choice for e in every), f"ranks chose differently: {every}")
    f.check(all(len(v) == len(h.autotune_ladder) for v in choice.values()), f"{choice}")
    for batch in (1, 300, 4096):
        xs = _inputs(500 + batch, world, batch, torch.bfloat16, tp)
        want = mixed_comm_reference(Op.ALLREDUCE, xs, h.para_info.of)[rank]
        got = run_mixed_comm(Op.ALLREDUCE, h, xs[rank])  # mode None: AUTOTUNE
        f.check(torch.allclose(got, want, rtol=RTOL, atol=ATOL), f"AUTOTUNE batch {batch}")
    torch.cuda.synchronize()
    h.shutdown()
    return f.messages, choice


@pytest.mark.gpu(2)
def test_autotune_picks_the_same_modes_on_every_rank(world_size):
    results = run_ranks(_rank_autotune, world_size, backend="nccl", timeout_s=600)
    assert_no_failures([messages for messages, _ in results])
    print({"autotune": results[0][1]})


def _rank_missing_peer(rank, world):
    """The last rank skips a fused call: the others raise within the timeout (never hang)."""
    f = Failures()
    h = _handler(rank, world, world, 1, torch.bfloat16, use_autotune=False, timeout_s=2.0)
    xs = _inputs(3, world, 64, torch.bfloat16, world)
    name = None
    if rank != world - 1:
        start = time.monotonic()
        try:
            run_mixed_comm(Op.ALLREDUCE, h, xs[rank], mode=Mode.FUSED_OPT_WAITS_UC)
            torch.cuda.synchronize()
            comm.check_errors()
        except comm.CommFailureError as e:
            name = type(e).__name__
            f.check(e.op == "run_mixed_comm", f"op {e.op!r}")
            f.check(f"rank {world - 1}" in str(e), str(e))
        waited = time.monotonic() - start
        f.check(name is not None, "no CommFailureError after a lost peer")
        f.check(waited < 30.0, f"the call took {waited:.1f} s with timeout_s=2")
        try:
            run_mixed_comm(Op.ALLREDUCE, h, xs[rank], mode=Mode.FUSED_OPT_WAITS_UC)
            f.check(False, "a failed handler ran a fused call")
        except comm.CommFailureError:
            pass
    barrier()
    h.shutdown()
    return f.messages, name


@pytest.mark.gpu(2)
def test_missing_peer_raises_instead_of_hanging(world_size):
    results = run_ranks(_rank_missing_peer, world_size, backend="nccl", timeout_s=300)
    assert_no_failures([messages for messages, _ in results])
    names = [name for _, name in results]
    assert "PeerTimeoutError" in names[:-1], names


def _rank_graph(rank, world):
    """Each fused mode's call captured in a CUDA graph, replayed with new inputs (copied in
    place) and poisoned outputs: the kernels keep their round state on the device."""
    f = Failures()
    h = _handler(rank, world, world, 1, torch.bfloat16, use_autotune=False, timeout_s=60.0)
    modes = [m for m in h.valid_mode_list if m in FUSED]
    xs = _inputs(21, world, 333, torch.bfloat16, world)
    x = xs[rank].clone()
    outs = {m: run_mixed_comm(Op.ALLREDUCE, h, x, mode=m) for m in modes}  # eager warm-up
    torch.cuda.synchronize()
    barrier()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for m in modes:
            run_mixed_comm(Op.ALLREDUCE, h, x, outs[m], mode=m)
    for replay in range(3):
        xs = _inputs(30 + replay, world, 333, torch.bfloat16, world)
        x.copy_(xs[rank])
        for out in outs.values():
            out.fill_(float("nan"))
        torch.cuda.synchronize()
        barrier()
        graph.replay()
        torch.cuda.synchronize()
        comm.check_errors()
        want = mixed_comm_reference(Op.ALLREDUCE, xs, h.para_info.of)[rank]
        for m, out in outs.items():
            f.check(torch.equal(_bits(out), _bits(want)), f"replay {replay} {m.name}")
    barrier()
    h.shutdown()
    return f.messages


@pytest.mark.gpu(2)
def test_fused_modes_replay_in_cuda_graphs(world_size):
    assert_no_failures(run_ranks(_rank_graph, world_size, backend="nccl", timeout_s=300))
