"""Programmatic dependent launch (PDL) hands over complete outputs.

With ``launch_with_pdl=True`` the next kernel of the stream may start while allreduce_fusion
still runs (right after the op's own dependency wait when ``trigger_completion_at_end=False``,
at its end otherwise); that kernel's ``griddepcontrol.wait`` must still see every output. The
consumer here is fusedcomm.testing.pdl's probe, launched with the PDL attribute right after
each call: it waits, then counts the elements of an output whose bits differ from the
expected tensor, computed before the call (outputs are poisoned before every call, so a read
that comes too early counts). Every count must be 0, eagerly and in CUDA graph replays.

Expected values: pattern 0 with fp32 accumulation is exact, so it is the reference sum of the
gathered inputs; for patterns with an RMSNorm (only close to the reference) it is the same
call made without PDL just before (the op is deterministic, so the bits must agree).
"""

import pytest
import torch

import fusedcomm as comm
from fusedcomm.enums import AllReduceFusionPattern as P
from fusedcomm.reference.fusion import fusion_all_reduce
from fusedcomm.testing import pdl
from fusedcomm.testing.dist import barrier, gather_all, run_ranks
from test_fusion_gpu import _poison

HIDDEN = 4096
DTYPE = torch.bfloat16
MAX_TOKENS = 512
SIZES = (16, 37, 128, 512)  # token counts, cycled through the iterations
ITERS = 200  # eager calls per (pattern, trigger, algorithm)
REPLAYS = 24  # graph replays per (pattern, trigger, algorithm)
PATTERNS = (P.kAllReduce, P.kARResidualRMSNorm, P.kARResidualRMSNormOutDynamicFP8Quant)
# What each pattern writes; the probe reads all of them, starting with a different one each
# iteration (the first probe is the kernel right after the op).
OUTS = {
    P.kAllReduce: ("output",),
    P.kARResidualRMSNorm: ("norm_out", "residual_out"),
    P.kARResidualRMSNormOutDynamicFP8Quant: ("norm_out", "quant_out", "scale_out", "residual_out"),
}
COMBOS = [(trigger, oneshot) for trigger in (True, False) for oneshot in (True, False)]
_WORD = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def _workspace(rank, world):
    return comm.create_allreduce_fusion_workspace(
        "trtllm",
        world_size=world,
        rank=rank,
        max_token_num=MAX_TOKENS,
        hidden_dim=HIDDEN,
        dtype=DTYPE,
        comm_backend=comm.TorchDistBackend(),
        timeout_s=30.0,
    )


def _outputs(pattern, n):
    shapes = {
        "output": ((n, HIDDEN), DTYPE),
        "residual_out": ((n, HIDDEN), DTYPE),
        "norm_out": ((n, HIDDEN), DTYPE),
        "quant_out": ((n, HIDDEN), torch.float8_e4m3fn),
        "scale_out": ((n, 1), torch.float32),
    }
    out = {}
    for name in OUTS[pattern]:
        shape, dtype = shapes[name]
        out[name] = torch.empty(shape, dtype=dtype, device="cuda")
        _poison(out[name])
    return out


def _call(pattern, ws, x, residual, gamma, outs, *, pdl_on, trigger, oneshot):
    extra = {} if pattern == P.kAllReduce else dict(residual_in=residual, rms_gamma=gamma)
    return comm.allreduce_fusion(
        x,
        ws,
        pattern,
        launch_with_pdl=pdl_on,
        trigger_completion_at_end=trigger,
        use_oneshot=oneshot,
        fp32_acc=True,
        rms_eps=1e-6,
        **extra,
        **outs,
    )


def _expected_into(expect, pattern, ws, x, residual, gamma, world, oneshot):
    """Fill ``expect`` (the pattern's outputs) with what the PDL call must produce."""
    if pattern == P.kAllReduce:
        parts = gather_all(x)  # the workspace's ranks are the default group's
        expect["output"].copy_(fusion_all_reduce(parts, fp32_acc=True))
    else:
        _call(pattern, ws, x, residual, gamma, expect, pdl_on=False, trigger=True, oneshot=oneshot)


def _probe_self_test():
    """The probe counts exactly the elements whose bits differ (+0.0 against -0.0 included)."""
    counter = pdl.new_counter()
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn):
        word = _WORD[dtype.itemsize]
        sign = {1: 0x80, 2: -0x8000, 4: -0x80000000}[dtype.itemsize]
        a = torch.randn(10007, device="cuda").to(dtype)
        a.view(word)[5] = 0  # +0.0
        b = a.clone()
        b.view(word)[5] = sign  # -0.0
        flip = torch.tensor([0, 77, 4096, 10006], device="cuda")
        b.view(word)[flip] ^= 1  # the lowest bit of four more elements
        counter.zero_()
        pdl.probe(a, a.clone(), counter, pdl=False)
        pdl.probe(a, b, counter, pdl=True)
        torch.cuda.synchronize()
        assert counter.item() == 5, f"probe {dtype}: counted {counter.item()} of 5 differences"


def _rank_eager(rank, world):
    ws = _workspace(rank, world)
    pdl.load_probe()
    _probe_self_test()
    gen = torch.Generator(device="cuda").manual_seed(1000 + rank)
    shared = torch.Generator(device="cuda").manual_seed(99)  # the same on every rank
    gamma = (1 + 0.1 * torch.randn(HIDDEN, generator=shared, device="cuda")).to(DTYPE)
    counts = {}
    for pattern in PATTERNS:
        names = OUTS[pattern]
        for trigger, oneshot in COMBOS:
            counter = pdl.new_counter()
            for it in range(ITERS):
                n = SIZES[it % len(SIZES)]
                x = torch.randn(n, HIDDEN, generator=gen, device="cuda").to(DTYPE)
                residual = torch.randn(n, HIDDEN, generator=shared, device="cuda").to(DTYPE)
                expect = _outputs(pattern, n)
                _expected_into(expect, pattern, ws, x, residual, gamma, world, oneshot)
                outs = _outputs(pattern, n)
                ret = _call(
                    pattern,
                    ws,
                    x,
                    residual,
                    gamma,
                    outs,
                    pdl_on=True,
                    trigger=trigger,
                    oneshot=oneshot,
                )
                first = names[it % len(names)]
                for name in (first, *(k for k in names if k != first)):
                    pdl.probe(outs[name], expect[name], counter, pdl=True)
                assert ret is outs[names[0]]
            torch.cuda.synchronize()
            counts[(int(pattern), trigger, oneshot)] = int(counter.item())
    torch.cuda.synchronize()
    barrier()
    ws.destroy()
    return counts


@pytest.mark.gpu(2)
def test_pdl_consumer_sees_complete_outputs(world_size):
    results = run_ranks(_rank_eager, world_size, backend="nccl", timeout_s=600)
    bad = [
        f"rank {r}: pattern {p} trigger_at_end={t} oneshot={o}: {c} elements read early or wrong"
        for r, counts in enumerate(results)
        for (p, t, o), c in counts.items()
        if c
    ]
    assert not bad, "\n".join(bad)


def _graph_count(ws, world, pattern, trigger, oneshot, gamma, gen, shared):
    """Capture poison + op + probes once, replay with new inputs; the probes' total count."""
    n = 96
    names = OUTS[pattern]
    x = torch.zeros(n, HIDDEN, dtype=DTYPE, device="cuda")
    residual = torch.zeros_like(x)
    outs, expect = _outputs(pattern, n), _outputs(pattern, n)
    counter = pdl.new_counter()

    def body():
        for t in outs.values():
            _poison(t)
        _call(pattern, ws, x, residual, gamma, outs, pdl_on=True, trigger=trigger, oneshot=oneshot)
        for name in names:
            pdl.probe(outs[name], expect[name], counter, pdl=True)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        body()  # warm-up outside the capture (its count is discarded below)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    counter.zero_()
    for _ in range(REPLAYS):
        x.copy_(torch.randn(n, HIDDEN, generator=gen, device="cuda").to(DTYPE))
        residual.copy_(torch.randn(n, HIDDEN, generator=shared, device="cuda").to(DTYPE))
        _expected_into(expect, pattern, ws, x, residual, gamma, world, oneshot)
        graph.replay()
    torch.cuda.synchronize()
    for name in names:  # what the last replay left is what the probes compared against
        assert torch.equal(outs[name].view(torch.uint8), expect[name].view(torch.uint8)), (
            f"pattern {int(pattern)} {name}: the last replay's output differs"
        )
    del graph
    return int(counter.item())


def _rank_graph(rank, world):
    ws = _workspace(rank, world)
    pdl.load_probe()
    gen = torch.Generator(device="cuda").manual_seed(2000 + rank)
    shared = torch.Generator(device="cuda").manual_seed(98)
    gamma = (1 + 0.1 * torch.randn(HIDDEN, generator=shared, device="cuda")).to(DTYPE)
    counts = {}
    for pattern in PATTERNS:
        for trigger, oneshot in COMBOS:
            counts[(int(pattern), trigger, oneshot)] = _graph_count(
                ws, world, pattern, trigger, oneshot, gamma, gen, shared
            )
    torch.cuda.synchronize()
    barrier()
    ws.destroy()
    return counts


@pytest.mark.gpu(2)
def test_pdl_consumer_in_cuda_graph_replays(world_size):
    results = run_ranks(_rank_graph, world_size, backend="nccl", timeout_s=600)
    bad = [
        f"rank {r}: pattern {p} trigger_at_end={t} oneshot={o}: {c} elements read early or wrong"
        for r, counts in enumerate(results)
        for (p, t, o), c in counts.items()
        if c
    ]
    assert not bad, "\n".join(bad)


def test_probe_checks_dtypes_before_loading():
    with pytest.raises(TypeError, match="must be src's"):
        pdl.probe(torch.zeros(4), torch.zeros(4, dtype=torch.float16), torch.zeros(1))
