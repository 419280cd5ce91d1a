"""vLLM-style custom all-reduce on `world_size` GPUs: exact against NCCL and the reference,
graphs, timeouts, disposal.

The kernels sum in fp32 in ascending rank order and round once, so every result is compared
with ``fusedcomm.reference.all_reduce`` by ``torch.equal``. Integer-valued inputs are kept
small enough (``_int_bound``) that every partial sum is exact in bf16, so NCCL's result, whatever
its order and precision, must match bit for bit as well.
"""

import pytest
import torch
import torch.distributed as dist

import fusedcomm as comm
from fusedcomm import reference
from fusedcomm.testing.checks import Failures, assert_no_failures
from fusedcomm.testing.dist import all_reduce, barrier, gather_all, run_ranks
from fusedcomm.testing.vllm_comm import VllmComm

VEC = {torch.float32: 4, torch.float16: 8, torch.bfloat16: 8}
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
MAX_BYTES = 8 * 1024 * 1024 + 4096
EXACT_BF16 = 256  # bf16 holds every integer of magnitude <= 256


def _sizes(dtype):
    v = VEC[dtype]
    # 16-byte multiples, including odd ones, up to 2 Mi elements
    return [v, 3 * v, 512, 125 * v, 4096 + v, 3 * 65536 + v, 2 * 1024 * 1024]


def _poisoned_like(x):
    out = torch.empty_like(x)
    out.fill_(float("nan"))
    return out


def _gather(x):
    return gather_all(x)


def _int_bound(world, total=EXACT_BF16 // 2):
    """Per-rank bound for integer inputs whose every partial sum is exact in bf16."""
    return max(total // world, 1)


def _random_ints(shape, world, gen, total=EXACT_BF16 // 2):
    bound = _int_bound(world, total)
    return torch.randint(-bound, bound, shape, generator=gen, device="cuda")


def _nccl_sum(x):
    expected = x.clone()
    all_reduce(expected)
    return expected


def _check_exact(c, dtype, numel, num_ctas, algorithm, gen, failures):
    """One case: integer inputs against NCCL, random inputs against the reference."""
    case = f"{dtype} n={numel} ctas={num_ctas} {algorithm}"
    world = dist.get_world_size()
    # integer-valued inputs: every partial sum is exact, so NCCL and we agree bit for bit
    ints = _random_ints((numel,), world, gen).to(dtype)
    out = _poisoned_like(ints)
    c.all_reduce(ints, out, num_ctas=num_ctas, algorithm=algorithm)
    failures.check(torch.equal(out, _nccl_sum(ints)), f"{case}: integer inputs != NCCL")
    # random inputs: fp32 sum in rank order, rounded once, on every rank alike
    x = torch.randn(numel, generator=gen, device="cuda").to(dtype)
    out = _poisoned_like(x)
    c.all_reduce(x, out, num_ctas=num_ctas, algorithm=algorithm)
    parts = _gather(x)
    ref = reference.all_reduce(parts)
    same = torch.equal(out, ref)
    detail = "" if same else f" ({int((out != ref).sum())} of {numel} elements differ)"
    failures.check(same, f"{case}: random inputs != reference{detail}")
    exact = torch.stack([p.double() for p in parts]).sum(0)  # independent of the reference
    err = ((out.double() - exact).norm() / exact.norm()).item()
    failures.check(err < TOL[dtype], f"{case}: rel err {err:.2e} against the float64 sum")
    outs = _gather(out)
    failures.check(all(torch.equal(outs[0], o) for o in outs[1:]), f"{case}: ranks disagree")


def _rank_correctness(rank, world, dtype, algorithm):
    gen = torch.Generator(device="cuda")
    gen.manual_seed(1234 + rank)  # inputs differ per rank
    shared = torch.Generator().manual_seed(4321)  # launch shapes must agree on every rank
    failures = Failures()  # every failing case is reported, not just the first
    with VllmComm(MAX_BYTES) as c:
        for numel in _sizes(dtype):
            for num_ctas in (1, 7, 36, int(torch.randint(1, 37, (1,), generator=shared))):
                for _ in range(10 if numel <= 65536 else 2):
                    _check_exact(c, dtype, numel, num_ctas, algorithm, gen, failures)
    return failures.messages


@pytest.mark.gpu(2)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("algorithm", ["oneshot", "twoshot"])
def test_allreduce_matches_nccl_and_reference(dtype, algorithm, world_size):
    # One launch runs every size and CTA count (spawning ranks is slow); failures are collected.
    per_rank = run_ranks(
        _rank_correctness, world_size, backend="nccl", timeout_s=300, args=(dtype, algorithm)
    )
    assert_no_failures(per_rank)


def _rank_registered_in_place(rank, world):
    gen = torch.Generator(device="cuda")
    gen.manual_seed(99 + rank)
    failures = Failures()
    with VllmComm(MAX_BYTES) as c:
        for numel in (512, 4096 + 8, 1 << 20):
            inp = c.buffer_view(torch.bfloat16, numel)
            for step in range(5):
                inp.copy_(torch.randint(-8, 8, (numel,), generator=gen, device="cuda"))
                torch.cuda.synchronize()
                barrier()
                out = _poisoned_like(inp)
                comm.vllm_all_reduce(c.fa, inp, out, 0, 0, 36)
                expected = _nccl_sum(inp)
                failures.check(torch.equal(out, expected), f"n={numel} step {step}: != NCCL")
                torch.cuda.synchronize()
                barrier()
    return failures.messages


@pytest.mark.gpu(2)
def test_registered_input_read_in_place(world_size):
    per_rank = run_ranks(_rank_registered_in_place, world_size, backend="nccl", timeout_s=180)
    assert_no_failures(per_rank)


def _rank_graph(rank, world):
    gen = torch.Generator(device="cuda")
    gen.manual_seed(7 + rank)
    sizes = [(torch.bfloat16, 4096), (torch.float16, 8 * 3), (torch.float32, 65536 + 4)]
    failures = Failures()
    with VllmComm(MAX_BYTES) as c:
        inputs = [torch.zeros(n, dtype=d, device="cuda") for d, n in sizes]
        outputs = [torch.empty_like(x) for x in inputs]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for x, y in zip(inputs, outputs):
                comm.vllm_all_reduce(c.fa, x, y, 0, 0, 36)
        assert c.register_graph_inputs() == len(inputs)
        for step in range(6):
            for x in inputs:  # inputs change between replays
                x.copy_(_random_ints(x.shape, world, gen, total=200))
            for y in outputs:
                y.fill_(float("nan"))
            graph.replay()
            for x, y in zip(inputs, outputs):
                expected = _nccl_sum(x)
                failures.check(
                    torch.equal(y, expected), f"replay {step}: {x.dtype} n={x.numel()} != NCCL"
                )
            # interleave an eager (staged) call between replays
            z = torch.randn(1000 * 8, generator=gen, device="cuda", dtype=torch.bfloat16)
            eager = c.all_reduce(z)
            ref = _nccl_sum(z)
            failures.check(
                torch.allclose(eager.float(), ref.float(), rtol=1.6e-2, atol=1e-2),
                f"eager after replay {step}: not close to NCCL",
            )
            failures.check(
                torch.equal(eager, reference.all_reduce(_gather(z))),
                f"eager after replay {step}: != reference",
            )
    return failures.messages


@pytest.mark.gpu(2)
def test_cuda_graph_capture_and_replay(world_size):
    per_rank = run_ranks(_rank_graph, world_size, backend="nccl", timeout_s=180)
    assert_no_failures(per_rank)


def _rank_timeout(rank, world):
    c = VllmComm(1 << 20, timeout_s=2.0)
    x = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    if rank == 0:
        c.all_reduce(x)  # no other rank joins
        torch.cuda.synchronize()  # returns: the kernel gives up instead of hanging
        with pytest.raises(
            comm.PeerTimeoutError, match=r"rank (\d+) did not arrive within 2 s"
        ) as info:
            comm.check_errors()
        # the error names one of the absent ranks (with two ranks: rank 1)
        assert info.value.peer in range(1, world) and info.value.rank == 0
        assert f"rank {info.value.peer} did not arrive" in str(info.value)
        assert torch.ones(4, device="cuda").sum().item() == 4.0  # the context is still usable
        with pytest.raises(comm.PeerTimeoutError, match="refused on every rank"):
            c.all_reduce(x)  # its counters are out of step: refused, not silently wrong
    barrier()
    comm.vllm_dispose(c.fa)
    # a fresh communicator works after the failure
    with VllmComm(1 << 20) as fresh:
        y = torch.randint(-4, 4, (4096,), device="cuda").to(torch.bfloat16)
        assert torch.equal(fresh.all_reduce(y), _nccl_sum(y))


@pytest.mark.gpu(2)
def test_missing_peer_times_out_with_clear_error(world_size):
    run_ranks(_rank_timeout, world_size, backend="nccl", timeout_s=120)


def _rank_dispose(rank, world):
    meta_bytes = comm.vllm_meta_size() + (1 << 20)
    meta = comm.create_shared_buffer(meta_bytes)
    buf = comm.create_shared_buffer(1 << 20)
    dev = torch.cuda.current_device()
    comm.pack_strided_memory(meta[rank], meta_bytes, meta_bytes, 1, torch.uint8, dev).zero_()
    rank_data = torch.empty(64 * 64, dtype=torch.uint8, device="cuda")
    x = torch.randn(2048, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    barrier()
    before = torch.cuda.mem_get_info()[0]
    for _ in range(100):
        fa = comm.vllm_init_custom_ar(meta, rank_data, rank, True)
        comm.vllm_register_buffer(fa, buf)
        out = torch.empty_like(x)
        comm.vllm_all_reduce(fa, x, out, buf[rank], 1 << 20, 8)
        torch.cuda.synchronize()
        comm.vllm_dispose(fa)
        with pytest.raises(ValueError, match="not a live handle"):
            comm.vllm_all_reduce(fa, x, out, buf[rank], 1 << 20, 8)
    torch.cuda.synchronize()
    after = torch.cuda.mem_get_info()[0]
    assert before - after < (2 << 20), f"device memory fell by {before - after} bytes"
    barrier()
    comm.free_shared_buffer(meta)
    comm.free_shared_buffer(buf)


@pytest.mark.gpu(2)
def test_init_dispose_does_not_leak(world_size):
    run_ranks(_rank_dispose, world_size, backend="nccl", timeout_s=180)


def _rank_compile_and_opcheck(rank, world):
    with VllmComm(1 << 20) as c:
        reg = c.buffer[rank]

        @torch.compile(fullgraph=True)
        def step(x):
            y = x * 2
            out = torch.empty_like(y)
            comm.vllm_all_reduce(c.fa, y, out, reg, 1 << 20, 16)
            return out + 1

        for _ in range(3):
            x = torch.randint(-8, 8, (8192,), device="cuda").to(torch.bfloat16)
            expected = _nccl_sum(x * 2)
            assert torch.equal(step(x), expected + 1)
        x = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
        torch.library.opcheck(
            torch.ops.fusedcomm.vllm_all_reduce.default,
            (c.fa, x, torch.empty_like(x), reg, 1 << 20, 8, 0),
        )


@pytest.mark.gpu(2)
def test_torch_compile_fullgraph_and_opcheck(world_size):
    run_ranks(_rank_compile_and_opcheck, world_size, backend="nccl", timeout_s=300)


def _rank_two_streams(rank, world):
    """Calls on one handle from two streams, with no sync between them, stay ordered."""
    c = VllmComm(1 << 20)
    streams = (torch.cuda.Stream(), torch.cuda.Stream())
    gen = torch.Generator(device="cuda").manual_seed(99 + rank)
    xs = [
        torch.randint(-8, 8, (4096 * (1 + i % 3),), device="cuda", generator=gen).to(torch.bfloat16)
        for i in range(24)
    ]
    outs = [torch.full_like(x, float("nan")) for x in xs]
    torch.cuda.synchronize()
    for i, (x, out) in enumerate(zip(xs, outs)):
        with torch.cuda.stream(streams[i % 2]):
            c.all_reduce(x, out)
    torch.cuda.synchronize()
    wrong = [i for i, (x, out) in enumerate(zip(xs, outs)) if not torch.equal(out, _nccl_sum(x))]
    assert not wrong, f"calls {wrong} differ from NCCL"
    comm.check_errors()
    c.close()


@pytest.mark.gpu(2)
def test_calls_from_two_streams_are_ordered(world_size):
    run_ranks(_rank_two_streams, world_size, backend="nccl", timeout_s=180)
