"""The legacy trtllm_custom_all_reduce on GPUs (ranks may share one GPU): the reference
library's own test matrix (one-shot Lamport, two-shot, fused RMSNorm, fp16 and bf16; config and
PDL flags; the Lamport buffers re-filled between shapes) against fusedcomm.reference.legacy and
an independent fp32 computation, poisoned outputs, every rank holding the same bits, CUDA-graph
capture and replay, one workspace reused across the spec's sequence lengths and hidden sizes,
sentinel-salted inputs, the NCCL strategy, and the missing-peer timeout."""

import time

import pytest
import torch

import fusedcomm as comm
from fusedcomm.enums import AllReduceFusionOp as F
from fusedcomm.enums import AllReduceStrategyConfig as C
from fusedcomm.enums import AllReduceStrategyType as S
from fusedcomm.enums import LamportTokenNumThreshold
from fusedcomm.reference.legacy import custom_all_reduce_reference
from fusedcomm.testing.dist import barrier, gather_all, run_ranks, same_on_every_rank

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TOL = {torch.float16: 2.0**-9, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-20}


def _workspace(world, rank, max_tokens, hidden, **kw):
    return comm.trtllm_create_ipc_workspace_for_all_reduce(
        rank=rank, tp_size=world, max_token_num=max_tokens, hidden_dim=hidden, **kw
    )


def _call(ws, world, rank, x, out, n, op, strategy, flag, *, comm_index=0, **kw):
    """One call the way the reference's test makes it (pointer lists as CPU tensors)."""
    t = [torch.tensor(h, dtype=torch.int64) for h in ws]
    if strategy == S.TWOSHOT and x.numel() % (world * 16 // x.element_size()):
        strategy = S.AUTO  # the two-shot's numel % (W * VEC) rule fails at this world size
    args = dict(
        inp=x,
        out=out,
        tp_size=world,
        tp_rank=rank,
        token_num=n,
        fusion_op_code=op,
        strategy_code=strategy,
        config_code=kw.pop("config_code", 0),
        launch_with_pdl=kw.pop("launch_with_pdl", False),
        flag_value=flag,
        peer_comm_buffer_ptrs=t[comm_index],
        peer_barrier_ptrs_in=t[2],
        peer_barrier_ptrs_out=t[3],
        bias=None,
        residual=None,
        weight=None,
        weight_pre_residual_norm=None,
        eps=None,
        intermediate_buffer=None,
        lamport_peer_comm_buffer_ptrs_0=t[4],
        lamport_peer_comm_buffer_ptrs_1=t[5],
        lamport_peer_comm_buffer_ptrs_2=t[6],
    )
    args.update(kw)
    comm.trtllm_custom_all_reduce(**args)


def _epilogue_inputs(shared, n, d, dtype, bias=True, weight=True, pre=False):
    """bias, residual, weight (and the pre-norm weight): the same on every rank."""
    r = torch.randn(n * d, generator=shared, device="cuda").to(dtype)
    b = torch.randn(d, generator=shared, device="cuda").to(dtype) if bias else None
    w = (1 + 0.2 * torch.randn(d, generator=shared, device="cuda")).to(dtype) if weight else None
    wp = (1 + 0.2 * torch.randn(d, generator=shared, device="cuda")).to(dtype) if pre else None
    return dict(bias=b, residual=r, weight=w, weight_pre_residual_norm=wp)


def _check(what, x, out, inter, n, op, epi, eps, dtype):
    """The outputs against the reference (exact where the order is fixed), against an
    independent fp32 computation with the reference library's own tolerance, and across
    ranks (bit for bit)."""
    xs = gather_all(x)
    want, want_inter = custom_all_reduce_reference(xs, n, op, eps=eps, **epi)
    got = out.view(n, -1)
    if op == F.NONE:  # the sum is done in a fixed order: exact, bit for bit
        bits = torch.int32 if dtype == torch.float32 else torch.int16
        assert torch.equal(got.view(bits), want.view(bits)), f"{what}: out"
    else:
        # the sum and the residual add are done in a fixed order: exact
        assert torch.equal(inter.view(n, -1), want_inter), f"{what}: intermediate"
        torch.testing.assert_close(
            got.float(), want.float(), rtol=TOL[dtype], atol=1e-5, msg=f"{what}: out"
        )
    # the reference library's own check: fp32 throughout, its tolerances
    tol = {torch.float16: 1e-2, torch.bfloat16: 8e-2, torch.float32: 1e-4}[dtype]
    s = torch.stack([t.float() for t in xs]).sum(0).view(n, -1)
    if op == F.RESIDUAL_RMS_NORM:
        v = s + epi["residual"].float().view(n, -1)
        if epi["bias"] is not None:
            v = v + epi["bias"].float()
        torch.testing.assert_close(
            inter.view(n, -1).float(), v, atol=tol, rtol=3e-2, msg=f"{what}: fp32 intermediate"
        )
        s = v * torch.rsqrt((v * v).mean(-1, keepdim=True) + eps)
        if epi["weight"] is not None:
            s = s * epi["weight"].float()
    if op != F.RESIDUAL_RMS_PREPOST_NORM:
        torch.testing.assert_close(got.float(), s, atol=tol, rtol=3e-2, msg=f"{what}: fp32")
    assert same_on_every_rank(out), f"{what}: ranks disagree on out"
    if inter is not None:
        assert same_on_every_rank(inter), f"{what}: ranks disagree on intermediate"


# ------------------------------------------------------------------------------------------
# The reference library's test matrix


def _rank_matrix(rank, world, dtype):
    max_tokens, max_hidden = 128, 4096
    ws = _workspace(world, rank, max_tokens, max_hidden)
    lamport_bytes = world * LamportTokenNumThreshold * world * max_hidden * 2
    gen = torch.Generator(device="cuda").manual_seed(1000 + rank)
    shared = torch.Generator(device="cuda").manual_seed(7)
    flag, lamport_flag, i = 1, 1, 0
    ops = [F.NONE, F.RESIDUAL_RMS_NORM, F.RESIDUAL_RMS_PREPOST_NORM]
    tokens = (1, 8, 16, 27, 128) if dtype != torch.float32 else (1, 16, 128)
    for n in tokens:
        for d in (1024, 4096):
            barrier()  # re-fill the Lamport buffers per shape, as the reference's test does
            comm.trtllm_lamport_initialize_all(
                ws[4][rank], ws[5][rank], ws[6][rank], lamport_bytes // 2, torch.float16
            )
            barrier()
            for strategy in (S.ONESHOT, S.TWOSHOT, S.AUTO):
                for op in ops:
                    if op == F.RESIDUAL_RMS_PREPOST_NORM and strategy != S.ONESHOT:
                        continue
                    i += 1
                    x = torch.randn(n * d, generator=gen, device="cuda").to(dtype)
                    out = torch.full_like(x, float("nan"))
                    kw = dict(
                        config_code=(0, C.USE_MEMCPY, C.PUSH_MODE)[i % 3],
                        launch_with_pdl=bool(i % 2),
                        eps=1e-6,
                        comm_index=i % 2,
                    )
                    epi = {"bias": None, "residual": None, "weight": None}
                    inter = None
                    if op != F.NONE:
                        epi = _epilogue_inputs(
                            shared,
                            n,
                            d,
                            dtype,
                            i % 4 != 0,
                            i % 5 != 0,
                            op == F.RESIDUAL_RMS_PREPOST_NORM,
                        )
                        inter = torch.full_like(x, float("nan"))
                        kw.update(epi, intermediate_buffer=inter)
                    lamport = (
                        strategy == S.ONESHOT and op == F.RESIDUAL_RMS_NORM and n <= 16 and d >= 256
                    )
                    _call(
                        ws,
                        world,
                        rank,
                        x,
                        out,
                        n,
                        op,
                        strategy,
                        lamport_flag if lamport else flag,
                        **kw,
                    )
                    what = f"{dtype} n={n} d={d} strategy={strategy} op={op} call={i}"
                    epi.setdefault("weight_pre_residual_norm", None)
                    _check(what, x, out, inter, n, op, epi, 1e-6, dtype)
                    if lamport:
                        lamport_flag += 1
                    else:
                        flag += 1
    barrier()
    comm.trtllm_destroy_ipc_workspace_for_all_reduce(ws)


@pytest.mark.gpu(2)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_reference_matrix(world_size, dtype):
    run_ranks(_rank_matrix, world_size, backend="nccl", timeout_s=300, args=(dtype,))


# ------------------------------------------------------------------------------------------
# CUDA graphs


def _rank_graph(rank, world):
    dtype, d = torch.bfloat16, 2048
    ws = _workspace(world, rank, 64, d)
    gen = torch.Generator(device="cuda").manual_seed(50 + rank)
    shared = torch.Generator(device="cuda").manual_seed(11)
    small = torch.zeros(8 * d, dtype=dtype, device="cuda")  # one-shot Lamport + RMSNorm
    large = torch.zeros(64 * d, dtype=dtype, device="cuda")  # two-shot, plain
    epi = _epilogue_inputs(shared, 8, d, dtype)
    out_s, inter, out_l = torch.empty_like(small), torch.empty_like(small), torch.empty_like(large)

    def calls(flag):
        _call(
            ws,
            world,
            rank,
            small,
            out_s,
            8,
            F.RESIDUAL_RMS_NORM,
            S.ONESHOT,
            flag,
            intermediate_buffer=inter,
            launch_with_pdl=True,
            **epi,
        )
        _call(ws, world, rank, large, out_l, 64, F.NONE, S.TWOSHOT, flag, comm_index=1)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        calls(1)  # warm-up (loads the kernels) before capture
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        calls(2)  # the flag value is baked in: replays must not depend on it
    epi["weight_pre_residual_norm"] = None
    for step in range(4):
        small.copy_(torch.randn(small.shape, generator=gen, device="cuda").to(dtype))
        large.copy_(torch.randn(large.shape, generator=gen, device="cuda").to(dtype))
        epi["residual"].copy_(torch.randn(8 * d, generator=shared, device="cuda").to(dtype))
        for t in (out_s, inter, out_l):
            t.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        _check(f"replay {step}", small, out_s, inter, 8, F.RESIDUAL_RMS_NORM, epi, 1e-5, dtype)
        _check(f"replay {step}", large, out_l, None, 64, F.NONE, {}, 1e-5, dtype)
    for t in (out_s, inter):
        t.fill_(float("nan"))
    calls(3 + step)  # eager calls after the replays continue the same device state
    _check("eager after replays", small, out_s, inter, 8, F.RESIDUAL_RMS_NORM, epi, 1e-5, dtype)
    del graph
    barrier()
    comm.trtllm_destroy_ipc_workspace_for_all_reduce(ws)


@pytest.mark.gpu(2)
def test_cuda_graph_capture_and_replay(world_size):
    run_ranks(_rank_graph, world_size, backend="nccl", timeout_s=300)


# ------------------------------------------------------------------------------------------
# One workspace for every shape, sentinel-salted inputs, the NCCL strategy

SEQUENCES = ([1], [4], [15], [27, 11, 24, 256], [127], [998, 2048])
HIDDENS = (2880, 5120, 7168, 8192, 16384)


def _rank_reuse(rank, world):
    dtype, max_tokens, max_hidden = torch.bfloat16, 2048, 8192
    ws = _workspace(world, rank, max_tokens, max_hidden)
    gen = torch.Generator(device="cuda").manual_seed(300 + rank)
    shared = torch.Generator(device="cuda").manual_seed(5)
    i = 0
    for lengths in SEQUENCES:
        for d in HIDDENS:
            for n in lengths:
                if n * d > max_tokens * max_hidden:
                    continue
                i += 1
                op = (F.NONE, F.RESIDUAL_RMS_NORM)[i % 2]
                x = torch.randn(n * d, generator=gen, device="cuda").to(dtype)
                out = torch.full_like(x, float("nan"))
                epi, inter, kw = {"bias": None, "residual": None, "weight": None}, None, {}
                if op != F.NONE:
                    epi = _epilogue_inputs(shared, n, d, dtype, i % 3 != 0, i % 5 != 0)
                    inter = torch.full_like(x, float("nan"))
                    kw = dict(epi, intermediate_buffer=inter)
                strategy = (S.AUTO, S.ONESHOT, S.TWOSHOT)[i % 3]
                _call(ws, world, rank, x, out, n, op, strategy, i, **kw)
                epi.setdefault("weight_pre_residual_norm", None)
                _check(
                    f"n={n} d={d} op={op} strategy={strategy}",
                    x,
                    out,
                    inter,
                    n,
                    op,
                    epi,
                    1e-5,
                    dtype,
                )
    barrier()
    comm.trtllm_destroy_ipc_workspace_for_all_reduce(ws)


@pytest.mark.gpu(2)
def test_one_workspace_for_every_shape(world_size):
    run_ranks(_rank_reuse, world_size, backend="nccl", timeout_s=300)


def _salted(gen, n, d, dtype):
    """Random values with -0.0 cells, negative subnormals (bits 0x8001) and pairs whose 32-bit
    word reads as an fp32 negative subnormal (high element -0.0, low element tiny)."""
    x = torch.randn(n, d, generator=gen, device="cuda").to(dtype)
    bits = x.view(torch.int16)
    pick = torch.rand(n, d, generator=gen, device="cuda")
    bits[pick < 0.1] = -32768  # 0x8000: -0.0
    bits[(pick >= 0.1) & (pick < 0.15)] = -32767  # 0x8001
    pairs = bits.view(n, d // 2, 2)
    pairs[:, ::7, 1] = -32768
    pairs[:, ::7, 0] = 1
    x[0] = -0.0  # a whole row of the sentinel on every rank
    return x.reshape(-1)


def _rank_salted(rank, world):
    d = 4096
    ws = _workspace(world, rank, 64, d)
    gen = torch.Generator(device="cuda").manual_seed(900 + rank)
    shared = torch.Generator(device="cuda").manual_seed(9)
    flag = 1
    for dtype in (torch.float16, torch.bfloat16):
        for strategy, op, n in (
            (S.ONESHOT, F.NONE, 4),
            (S.ONESHOT, F.RESIDUAL_RMS_NORM, 16),
            (S.TWOSHOT, F.NONE, 64),
            (S.TWOSHOT, F.RESIDUAL_RMS_NORM, 33),
            (S.ONESHOT, F.NONE, 4),
        ):
            x = _salted(gen, n, d, dtype)
            out = torch.full_like(x, float("nan"))
            epi, inter, kw = {"bias": None, "residual": None, "weight": None}, None, {}
            if op != F.NONE:
                epi = _epilogue_inputs(shared, n, d, dtype)
                inter = torch.full_like(x, float("nan"))
                kw = dict(epi, intermediate_buffer=inter)
            _call(ws, world, rank, x, out, n, op, strategy, flag, **kw)
            flag += 1
            epi.setdefault("weight_pre_residual_norm", None)
            _check(f"salted {dtype} {strategy} {op}", x, out, inter, n, op, epi, 1e-5, dtype)
            if op == F.NONE:
                assert not (out.view(torch.int16) == -32768).any(), "a -0.0 in the sum"
    barrier()
    comm.trtllm_destroy_ipc_workspace_for_all_reduce(ws)


@pytest.mark.gpu(2)
def test_sentinel_salted_inputs_neither_hang_nor_corrupt(world_size):
    run_ranks(_rank_salted, world_size, backend="nccl", timeout_s=300)


def _rank_nccl(rank, world):
    dtype, d, n = torch.float16, 1024, 12  # gloo (shared GPU) reduces CUDA fp16 for sure
    ws = _workspace(world, rank, 16, d)
    gen = torch.Generator(device="cuda").manual_seed(40 + rank)
    shared = torch.Generator(device="cuda").manual_seed(4)
    x = torch.randint(-8, 9, (n * d,), generator=gen, device="cuda").to(dtype)
    out = torch.full_like(x, float("nan"))
    _call(ws, world, rank, x, out, n, F.NONE, S.NCCL, 1)
    want, _ = custom_all_reduce_reference(gather_all(x), n)  # small integers: any order exact
    assert torch.equal(out.view(n, d), want)
    x = torch.randn(n * d, generator=gen, device="cuda").to(dtype)
    epi = _epilogue_inputs(shared, n, d, dtype)
    out, inter = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    _call(
        ws, world, rank, x, out, n, F.RESIDUAL_RMS_NORM, S.NCCL, 2, intermediate_buffer=inter, **epi
    )
    want, want_inter = custom_all_reduce_reference(gather_all(x), n, F.RESIDUAL_RMS_NORM, **epi)
    # torch.distributed sums in its own order and precision: about one unit of the sum
    torch.testing.assert_close(inter.view(n, d).float(), want_inter.float(), rtol=2**-7, atol=0.05)
    torch.testing.assert_close(out.view(n, d).float(), want.float(), rtol=2**-6, atol=0.05)
    barrier()
    comm.trtllm_destroy_ipc_workspace_for_all_reduce(ws)


@pytest.mark.gpu(2)
def test_nccl_strategy_runs_torch_distributed(world_size):
    run_ranks(_rank_nccl, world_size, backend="nccl", timeout_s=180)


# ------------------------------------------------------------------------------------------
# A peer that never comes


def _rank_missing_peer(rank, world, strategy):
    d = 2048
    ws = _workspace(world, rank, 16, d, timeout_s=2.0)
    x = torch.randn(4 * d, device="cuda").to(torch.bfloat16)
    out, inter = torch.empty_like(x), torch.empty_like(x)
    epi = _epilogue_inputs(torch.Generator(device="cuda").manual_seed(1), 4, d, torch.bfloat16)
    if rank == 0:
        start = time.monotonic()
        with pytest.raises(comm.PeerTimeoutError) as info:
            _call(
                ws,
                world,
                rank,
                x,
                out,
                4,
                F.RESIDUAL_RMS_NORM,
                strategy,
                1,
                intermediate_buffer=inter,
                **epi,
            )  # the other ranks never join
            torch.cuda.synchronize()
            comm.check_errors()
        elapsed = time.monotonic() - start
        assert elapsed < 2.0 + 15, f"the timeout took {elapsed:.1f} s"
        assert info.value.rank == 0 and info.value.peer != 0
        with pytest.raises(comm.PeerTimeoutError, match="refused"):  # and stays refused
            _call(ws, world, rank, x, out, 4, F.NONE, S.TWOSHOT, 2)
        assert torch.ones(4, device="cuda").sum().item() == 4.0  # the context still works
    barrier()
    comm.trtllm_destroy_ipc_workspace_for_all_reduce(ws)


@pytest.mark.gpu(2)
@pytest.mark.parametrize("strategy", [S.ONESHOT, S.TWOSHOT])
def test_missing_peer_raises_within_the_timeout(world_size, strategy):
    run_ranks(_rank_missing_peer, world_size, backend="nccl", timeout_s=180, args=(strategy,))
