"""The fused all-reduce on GPUs, the way an inference engine uses it: a workspace per group
(over a gloo or NCCL sub-group communicator), plain all-reduce up to the capacity, the fused
patterns in eager mode, in place, in CUDA graphs and under torch.compile, compared with
fusedcomm.reference.fusion; every rank must hold the same bits; a lost peer raises."""

import random
import time

import pytest
import torch
import torch.distributed as dist

import fusedcomm as comm
from fusedcomm.enums import AllReduceFusionPattern as P
from fusedcomm.reference.fusion import (
    allreduce_fusion_reference,
    quantize_fp8_dynamic,
    quantize_fp8_static,
)
from fusedcomm.testing.dist import all_reduce, barrier, gather_all, run_ranks

HIDDEN = 4096
BUDGET = {2: 64 << 20, 4: 2 << 20, 8: 512 << 10}  # input bytes an engine allows per world size
FUSED = [
    P.kARResidualRMSNorm,
    P.kARResidualRMSNormFP8Quant,
    P.kARResidualRMSNormOutFP8Quant,
    P.kARResidualRMSNormDynamicFP8Quant,
    P.kARResidualRMSNormOutDynamicFP8Quant,
]
OUTS = {
    1: ("residual_out", "norm_out"),
    2: ("residual_out", "quant_out"),
    4: ("residual_out", "norm_out", "quant_out"),
    10: ("residual_out", "quant_out", "scale_out"),
    11: ("residual_out", "norm_out", "quant_out", "scale_out"),
}


def _max_tokens(world, dtype):
    return BUDGET.get(world, 512 << 10) // (HIDDEN * dtype.itemsize)


def _communicator(kind, rank, world):
    """A sub-group communicator whose ranks run in reverse order (rank != global rank)."""
    group = dist.new_group(list(range(world)), backend=kind)
    return comm.TorchDistBackend(group).Split(0, key=world - 1 - rank)


def _make_workspace(backend, dtype, max_tokens, **kw):
    return comm.create_allreduce_fusion_workspace(
        "auto",
        world_size=backend.Get_size(),
        rank=backend.Get_rank(),
        max_token_num=max_tokens,
        hidden_dim=HIDDEN,
        dtype=dtype,
        comm_backend=backend,
        **kw,
    )


def _gather(t, order):
    """Every rank's ``t`` (CPU), indexed by workspace rank."""
    parts = gather_all(t)
    return [parts[g].cpu() for g in order]


def _bits(t):
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _same_on_every_rank(t):
    parts = gather_all(_bits(t))
    return all(torch.equal(parts[0], p) for p in parts[1:])


def _poison(t):
    if t.dtype == torch.float8_e4m3fn:
        t.view(torch.uint8).fill_(0x7F)  # NaN in E4M3
    else:
        t.fill_(float("nan"))


def _outputs(pattern, n, dtype):
    out = {
        "residual_out": torch.empty(n, HIDDEN, dtype=dtype, device="cuda"),
        "norm_out": torch.empty(n, HIDDEN, dtype=dtype, device="cuda"),
        "quant_out": torch.empty(n, HIDDEN, dtype=torch.float8_e4m3fn, device="cuda"),
        "scale_out": torch.empty(n, 1, dtype=torch.float32, device="cuda"),
    }
    out = {k: v for k, v in out.items() if k in OUTS[pattern]}
    for t in out.values():
        _poison(t)
    return out


def _close_fp8(got, want, max_fraction, what):
    """FP8 codes within one E4M3 step, and at most ``max_fraction`` of them differing."""
    g, w = got.float().cpu(), want.float().cpu()
    torch.testing.assert_close(g, w, rtol=0.126, atol=2.0**-8, msg=what)
    frac = (g != w).float().mean().item()
    assert frac <= max_fraction, f"{what}: {frac:.4f} of the FP8 codes differ"


def _check_fused(pattern, got, xs, residual, gamma, scale, dtype, fp32_acc, weight_bias, what):
    """Compare one fused call's outputs (CUDA) with the reference of the gathered inputs."""
    ref = allreduce_fusion_reference(
        xs,
        pattern,
        residual_in=residual.cpu(),
        rms_gamma=gamma.cpu(),
        rms_eps=1e-6,
        scale_factor=scale,
        weight_bias=weight_bias,
        fp32_acc=fp32_acc,
    )
    # sum (in fp32 only with fp32_acc, else rounded to T after each rank) and residual add are
    # done in a fixed order: exact against the reference of the same fp32_acc
    assert torch.equal(got["residual_out"].cpu(), ref["residual_out"]), f"{what}: residual_out"
    tol = {torch.float16: 2.0**-9, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-20}[dtype]
    if "norm_out" in got:  # fp32 statistics in an unspecified order, approximate rsqrt
        torch.testing.assert_close(
            got["norm_out"].cpu().float(),
            ref["norm_out"].float(),
            rtol=tol,
            atol=1e-5,
            msg=f"{what}: norm_out",
        )
    if "quant_out" in got:
        _close_fp8(got["quant_out"], ref["quant_out"], 0.05, f"{what}: quant_out")
    if "scale_out" in got:
        torch.testing.assert_close(
            got["scale_out"].cpu(), ref["scale_out"], rtol=tol, atol=0, msg=f"{what}: scale_out"
        )
    if "norm_out" in got and "quant_out" in got:  # the quantiser reads the rounded norm: exact
        y = got["norm_out"]
        if "scale_out" in got:  # on the CPU: CUDA torch divides by a Python scalar as a * (1/b)
            q, s = quantize_fp8_dynamic(y.cpu())
            assert torch.equal(got["scale_out"].cpu(), s), f"{what}: scale_out from norm_out"
        else:
            q = quantize_fp8_static(y, scale)
        _close_fp8(got["quant_out"], q, 0.001, f"{what}: quant_out from norm_out")
    for name, t in got.items():
        assert _same_on_every_rank(t), f"{what}: ranks disagree on {name}"


def _fused_inputs(gen, n, dtype):
    x = torch.randn(n, HIDDEN, generator=gen, device="cuda").to(dtype)
    residual = torch.randn(n, HIDDEN, generator=gen, device="cuda").to(dtype)
    return x, residual


def _shared_params(dtype, seed):
    """rms_gamma and the scale: the same on every rank."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    gamma = (1 + 0.1 * torch.randn(HIDDEN, generator=gen, device="cuda")).to(dtype)
    residual_gen = torch.Generator(device="cuda").manual_seed(seed + 1)
    return gamma, residual_gen


# ------------------------------------------------------------------------------------------
# The engine's usage, end to end


def _rank_engine(rank, world, kind, dtype):
    state = random.getstate()
    backend = _communicator(kind, rank, world)
    me = backend.Get_rank()
    order = [world - 1 - q for q in range(world)]  # workspace rank q -> global rank
    max_tokens = _max_tokens(world, dtype)
    ws = _make_workspace(backend, dtype, max_tokens)
    assert random.getstate() == state, "workspace creation touched the global random state"
    assert ws.backend == "trtllm" and (ws.rank, ws.world_size) == (me, world)
    assert ws.is_buffer_size_sufficient(world, max_tokens, HIDDEN, dtype)
    assert not ws.is_buffer_size_sufficient(world, max_tokens + 1, HIDDEN, dtype)
    gen = torch.Generator(device="cuda").manual_seed(100 + rank)

    # standalone all-reduce at every size up to the capacity; integer inputs sum exactly
    for n in sorted({1, 3, 16, 127, 128, 1000, max_tokens} & set(range(1, max_tokens + 1))):
        for oneshot in (None, True, False):
            if oneshot is False and n <= world:
                continue
            x = torch.randint(-8, 9, (n, HIDDEN), generator=gen, device="cuda").to(dtype)
            out = comm.allreduce_fusion(
                input=x, workspace=ws, pattern=P.kAllReduce, use_oneshot=oneshot
            )
            want = torch.stack([t.float() for t in _gather(x, order)]).sum(0).to(dtype)
            assert torch.equal(out.cpu(), want), f"AR n={n} oneshot={oneshot}"
            x = torch.randn(n, HIDDEN, generator=gen, device="cuda").to(dtype)
            out = torch.full_like(x, float("nan"))
            assert (
                comm.allreduce_fusion(
                    x, ws, P.kAllReduce, output=out, fp32_acc=True, use_oneshot=oneshot
                )
                is out
            )
            ref = allreduce_fusion_reference(_gather(x, order), 0)["allreduce_out"]
            assert torch.equal(out.cpu(), ref), f"AR random n={n} oneshot={oneshot}"
            assert _same_on_every_rank(out)

    # the fused patterns, per layer: fresh inputs, poisoned outputs, engine flags
    gamma, residual_gen = _shared_params(dtype, 7)
    for pattern in FUSED:
        for n in (1, 3, 127, 1000):
            for trigger, oneshot, wb in ((True, True, 0.0), (False, None, 1.0)):
                x, _ = _fused_inputs(gen, n, dtype)
                residual = torch.randn(n, HIDDEN, generator=residual_gen, device="cuda").to(dtype)
                scale = torch.rand(1, generator=residual_gen, device="cuda") + 0.05
                got = _outputs(pattern, n, dtype)
                ret = comm.allreduce_fusion(
                    input=x,
                    workspace=ws,
                    pattern=pattern,
                    residual_in=residual,
                    rms_gamma=gamma,
                    rms_eps=1e-6,
                    scale_factor=scale,
                    layout_code=comm.QuantizationSFLayout.SWIZZLED_128x4,
                    fp32_acc=True,
                    launch_with_pdl=True,
                    use_oneshot=oneshot,
                    trigger_completion_at_end=trigger,
                    weight_bias=wb,
                    **got,
                )
                expect = got.get("norm_out", got.get("quant_out"))
                assert ret is expect
                consumer = ret.float() * 1  # the next kernel, issued right away
                what = f"{comm.enums.pattern_name(pattern)} n={n} oneshot={oneshot} wb={wb}"
                _check_fused(
                    pattern,
                    got,
                    _gather(x, order),
                    residual,
                    gamma,
                    scale.cpu(),
                    dtype,
                    True,
                    wb,
                    what,
                )
                assert torch.equal(consumer.cpu(), ret.float().cpu()), f"{what}: consumer"

    # in place: norm over the input, residual_out over residual_in; same bits as out of place
    for pattern in (P.kARResidualRMSNorm, P.kARResidualRMSNormOutDynamicFP8Quant):
        x, _ = _fused_inputs(gen, 100, dtype)
        residual = torch.randn(100, HIDDEN, generator=residual_gen, device="cuda").to(dtype)
        sep = _outputs(pattern, 100, dtype)
        comm.allreduce_fusion(
            x, ws, pattern, residual_in=residual, rms_gamma=gamma, fp32_acc=True, **sep
        )
        inplace = _outputs(pattern, 100, dtype)
        xi, ri = x.clone(), residual.clone()
        inplace.update(norm_out=xi, residual_out=ri)
        ret = comm.allreduce_fusion(
            xi, ws, pattern, residual_in=ri, rms_gamma=gamma, fp32_acc=True, **inplace
        )
        assert ret is xi
        for name in sep:
            assert torch.equal(_bits(inplace[name]), _bits(sep[name])), f"in place: {name}"

    torch.cuda.synchronize()
    barrier()
    ws.destroy()
    ws.destroy()
    assert random.getstate() == state


@pytest.mark.gpu(2)
@pytest.mark.parametrize("kind", ["gloo", pytest.param("nccl", marks=pytest.mark.distinct_gpus)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_engine_usage_end_to_end(world_size, kind, dtype):
    run_ranks(_rank_engine, world_size, backend="nccl", timeout_s=600, args=(kind, dtype))


# ------------------------------------------------------------------------------------------
# CUDA graphs and torch.compile


def _rank_graph(rank, world, pattern, oneshot):
    dtype = torch.bfloat16
    backend = comm.TorchDistBackend(dist.new_group(list(range(world)), backend="gloo"))
    ws = _make_workspace(backend, dtype, 256)
    order = list(range(world))
    n = 96
    gamma, residual_gen = _shared_params(dtype, 11)
    gen = torch.Generator(device="cuda").manual_seed(50 + rank)
    x = torch.zeros(n, HIDDEN, dtype=dtype, device="cuda")
    residual = torch.zeros_like(x)
    scale = torch.ones(1, dtype=torch.float32, device="cuda")
    outs = (
        {"output": torch.empty_like(x)} if pattern == P.kAllReduce else _outputs(pattern, n, dtype)
    )
    extra = (
        {}
        if pattern == P.kAllReduce
        else dict(residual_in=residual, rms_gamma=gamma, scale_factor=scale)
    )

    def call():
        comm.allreduce_fusion(
            x,
            ws,
            pattern,
            use_oneshot=oneshot,
            fp32_acc=True,
            launch_with_pdl=True,
            **extra,
            **outs,
        )

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()  # warm-up (builds the kernel) before capture
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    for step in range(4):
        x.copy_(torch.randn(n, HIDDEN, generator=gen, device="cuda").to(dtype))
        residual.copy_(torch.randn(n, HIDDEN, generator=residual_gen, device="cuda").to(dtype))
        scale.fill_(0.25 * (step + 1))  # a new scale, read on the device by the replay
        for t in outs.values():
            _poison(t)
        graph.replay()
        torch.cuda.synchronize()
        xs = _gather(x, order)
        if pattern == P.kAllReduce:
            ref = allreduce_fusion_reference(xs, 0)["allreduce_out"]
            assert torch.equal(outs["output"].cpu(), ref), f"replay {step}"
            assert _same_on_every_rank(outs["output"])
        else:
            _check_fused(
                pattern, outs, xs, residual, gamma, scale.cpu(), dtype, True, 0.0, f"replay {step}"
            )
    del graph
    torch.cuda.synchronize()
    barrier()
    ws.destroy()


@pytest.mark.gpu(2)
@pytest.mark.parametrize(
    "pattern",
    [P.kAllReduce, P.kARResidualRMSNormOutFP8Quant, P.kARResidualRMSNormOutDynamicFP8Quant],
)
@pytest.mark.parametrize("oneshot", [True, None])
def test_cuda_graph_replay_with_new_inputs_and_scale(world_size, pattern, oneshot):
    run_ranks(_rank_graph, world_size, backend="nccl", timeout_s=300, args=(pattern, oneshot))


def _rank_compile(rank, world):
    dtype = torch.bfloat16
    backend = comm.TorchDistBackend(dist.new_group(list(range(world))))
    ws = _make_workspace(backend, dtype, 512)
    order = list(range(world))
    gamma, residual_gen = _shared_params(dtype, 3)
    gen = torch.Generator(device="cuda").manual_seed(80 + rank)

    @torch.compile(fullgraph=True)
    def layer(h, residual, scale):
        h = h * 1  # the producer (e.g. the row-parallel GEMM) inside the graph
        q = torch.empty(h.shape, dtype=torch.float8_e4m3fn, device=h.device)
        comm.allreduce_fusion(
            h,
            ws,
            P.kARResidualRMSNormOutFP8Quant,
            residual_in=residual,
            residual_out=residual,
            norm_out=h,
            quant_out=q,
            rms_gamma=gamma,
            scale_factor=scale,
            fp32_acc=True,
            launch_with_pdl=True,
        )
        return h, q

    for step, n in enumerate((5, 64, 64, 300)):
        x, _ = _fused_inputs(gen, n, dtype)
        residual = torch.randn(n, HIDDEN, generator=residual_gen, device="cuda").to(dtype)
        residual_in = residual.clone()
        scale = torch.full((1,), 0.5 + step, device="cuda")
        norm, q = layer(x, residual, scale)
        got = {"residual_out": residual, "norm_out": norm, "quant_out": q}
        _check_fused(
            P.kARResidualRMSNormOutFP8Quant,
            got,
            _gather(x, order),
            residual_in,
            gamma,
            scale.cpu(),
            dtype,
            True,
            0.0,
            f"compiled n={n}",
        )

    x = torch.randn(8, HIDDEN, device="cuda").to(dtype)
    out = torch.empty_like(x)
    torch.library.opcheck(
        torch.ops.fusedcomm.allreduce_fusion.default,
        (
            x,
            ws.workspace_tensor,
            world,
            rank,
            0,
            8,
            HIDDEN,
            False,
            True,
            True,
            None,
            out,
            None,
            None,
            None,
            None,
            None,
            None,
            1e-6,
            None,
            0,
            0.0,
            None,
        ),
        test_utils=("test_schema", "test_faketensor"),
    )
    torch.cuda.synchronize()
    barrier()
    ws.destroy()


@pytest.mark.gpu(2)
def test_torch_compile_fullgraph(world_size):
    run_ranks(_rank_compile, world_size, backend="nccl", timeout_s=600)


# ------------------------------------------------------------------------------------------
# Failures: a lost peer, a creation that cannot succeed, calls that do not fit


def _rank_lost_peer(rank, world):
    backend = comm.TorchDistBackend(dist.new_group(list(range(world))))
    ws = _make_workspace(backend, torch.bfloat16, 64, timeout_s=2.0)
    x = torch.randn(8, HIDDEN, device="cuda").to(torch.bfloat16)
    if rank == 0:
        start = time.monotonic()
        with pytest.raises(comm.PeerTimeoutError) as info:
            comm.allreduce_fusion(x, ws, P.kAllReduce)  # the other ranks never join
            torch.cuda.synchronize()
            comm.check_errors()
            comm.allreduce_fusion(x, ws, P.kAllReduce)
            torch.cuda.synchronize()
            comm.check_errors()
        elapsed = time.monotonic() - start
        assert elapsed < 2.0 + 15, f"the timeout took {elapsed:.1f} s"
        assert info.value.rank == 0 and info.value.peer != 0
        assert torch.ones(4, device="cuda").sum().item() == 4.0  # the context still works
    barrier()
    ws.destroy()


@pytest.mark.gpu(2)
def test_missing_peer_raises_within_the_timeout(world_size):
    run_ranks(_rank_lost_peer, world_size, backend="nccl", timeout_s=180)


def _rank_creation_failures(rank, world):
    backend = comm.TorchDistBackend(dist.new_group(list(range(world)), backend="gloo"))
    torch.cuda.synchronize()
    before = torch.cuda.mem_get_info()[0]
    too_many = (torch.cuda.get_device_properties(0).total_memory // (HIDDEN * 2)) * 2
    with pytest.raises((RuntimeError, ValueError)) as info:
        _make_workspace(backend, torch.bfloat16, too_many)
    assert len(str(info.value)) > 20, "the error must say what failed"
    torch.cuda.synchronize()
    assert before - torch.cuda.mem_get_info()[0] < (64 << 20), "a failed creation leaked"
    with pytest.raises(ValueError, match="says rank"):
        comm.create_allreduce_fusion_workspace(
            "trtllm",
            world_size=world,
            rank=(rank + 1) % world,
            max_token_num=64,
            hidden_dim=HIDDEN,
            dtype=torch.bfloat16,
            comm_backend=backend,
        )
    ws = _make_workspace(backend, torch.bfloat16, 64)  # a good creation still works
    x = torch.randn(65, HIDDEN, device="cuda").to(torch.bfloat16)
    with pytest.raises(ValueError, match="capacity"):
        comm.allreduce_fusion(x, ws, P.kAllReduce)
    with pytest.raises(ValueError, match="multiple of 8"):
        comm.allreduce_fusion(x[:4, :100].contiguous(), ws, P.kAllReduce)
    y = torch.randint(-4, 5, (64, HIDDEN), device="cuda").to(torch.bfloat16)
    out = comm.allreduce_fusion(y[:32].reshape(16, 2 * HIDDEN).contiguous(), ws, 0)
    want = y[:32].reshape(16, 2 * HIDDEN).clone()
    all_reduce(want)  # integer values: NCCL's sum is exact too
    assert torch.equal(out, want), "workspace reuse with another shape"
    torch.cuda.synchronize()
    barrier()
    ws.destroy()


@pytest.mark.gpu(2)
def test_creation_failures_and_capacity(world_size):
    run_ranks(_rank_creation_failures, world_size, backend="nccl", timeout_s=300)
