"""vLLM-style custom all-reduce on 2 GPUs: exactness against NCCL, graphs, timeouts, disposal."""

import pytest
import torch
import torch.distributed as dist

import fusedcomm as comm
from fusedcomm.testing.dist import run_ranks
from fusedcomm.runtime.vllm_comm import VllmComm

VEC = {torch.float32: 4, torch.float16: 8, torch.bfloat16: 8}
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
MAX_BYTES = 8 * 1024 * 1024 + 4096


def _sizes(dtype):
    v = VEC[dtype]
    # 16-byte multiples, including odd ones, up to 2 Mi elements
    return [v, 3 * v, 512, 125 * v, 4096 + v, 3 * 65536 + v, 2 * 1024 * 1024]


def _poisoned_like(x):
    out = torch.empty_like(x)
    out.fill_(float("nan"))
    return out


def _gather(x):
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return parts


def _check_exact_and_close(c, dtype, numel, num_ctas, algorithm, gen):
    # integer-valued inputs: the fp32 sum is exact, so NCCL and we must agree bit for bit
    ints = torch.randint(-64, 64, (numel,), generator=gen, device="cuda").to(dtype)
    out = _poisoned_like(ints)
    c.all_reduce(ints, out, num_ctas=num_ctas, algorithm=algorithm)
    expected = ints.clone()
    dist.all_reduce(expected)
    assert torch.equal(out, expected), f"{dtype} n={numel} ctas={num_ctas} {algorithm}: != NCCL"
    # random inputs: compare with a float64 reference; every rank must hold the same bits
    x = torch.randn(numel, generator=gen, device="cuda").to(dtype)
    out = _poisoned_like(x)
    c.all_reduce(x, out, num_ctas=num_ctas, algorithm=algorithm)
    ref = torch.stack([p.double() for p in _gather(x)]).sum(0)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < TOL[dtype], f"{dtype} n={numel} ctas={num_ctas} {algorithm}: rel err {err:.2e}"
    outs = _gather(out)
    assert all(torch.equal(outs[0], o) for o in outs[1:]), "ranks disagree"


def _rank_correctness(rank, world, dtype, algorithm):
    gen = torch.Generator(device="cuda")
    gen.manual_seed(1234 + rank)  # inputs differ per rank
    shared = torch.Generator().manual_seed(4321)  # launch shapes must agree on every rank
    with VllmComm(MAX_BYTES) as c:
        for numel in _sizes(dtype):
            for num_ctas in (1, 7, 36, int(torch.randint(1, 37, (1,), generator=shared))):
                for _ in range(10 if numel <= 65536 else 2):
                    _check_exact_and_close(c, dtype, numel, num_ctas, algorithm, gen)


@pytest.mark.gpu(2)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("algorithm", ["oneshot", "twoshot"])
def test_allreduce_matches_nccl(dtype, algorithm):
    run_ranks(_rank_correctness, 2, backend="nccl", timeout_s=300, args=(dtype, algorithm))


def _rank_registered_in_place(rank, world):
    gen = torch.Generator(device="cuda")
    gen.manual_seed(99 + rank)
    with VllmComm(MAX_BYTES) as c:
        for numel in (512, 4096 + 8, 1 << 20):
            inp = c.buffer_view(torch.bfloat16, numel)
            for _ in range(5):
                inp.copy_(torch.randint(-8, 8, (numel,), generator=gen, device="cuda"))
                torch.cuda.synchronize()
                dist.barrier()
                out = _poisoned_like(inp)
                comm.vllm_all_reduce(c.fa, inp, out, 0, 0, 36)
                expected = inp.clone()
                dist.all_reduce(expected)
                assert torch.equal(out, expected)
                torch.cuda.synchronize()
                dist.barrier()


@pytest.mark.gpu(2)
def test_registered_input_read_in_place():
    run_ranks(_rank_registered_in_place, 2, backend="nccl", timeout_s=180)


def _rank_graph(rank, world):
    gen = torch.Generator(device="cuda")
    gen.manual_seed(7 + rank)
    sizes = [(torch.bfloat16, 4096), (torch.float16, 8 * 3), (torch.float32, 65536 + 4)]
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
            for x in inputs:
                x.copy_(torch.randint(-100, 100, x.shape, generator=gen, device="cuda"))
            for y in outputs:
                y.fill_(float("nan"))
            graph.replay()
            for x, y in zip(inputs, outputs):
                expected = x.clone()
                dist.all_reduce(expected)
                assert torch.equal(y, expected), f"replay {step}: {x.dtype} n={x.numel()}"
            # interleave an eager (staged) call between replays
            z = torch.randn(1000 * 8, generator=gen, device="cuda", dtype=torch.bfloat16)
            eager = c.all_reduce(z)
            ref = z.clone()
            dist.all_reduce(ref)
            assert torch.allclose(eager.float(), ref.float(), rtol=1.6e-2, atol=1e-2)


@pytest.mark.gpu(2)
def test_cuda_graph_capture_and_replay():
    run_ranks(_rank_graph, 2, backend="nccl", timeout_s=180)


def _rank_timeout(rank, world):
    c = VllmComm(1 << 20, timeout_s=2.0)
    x = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    if rank == 0:
        c.all_reduce(x)  # rank 1 never joins
        torch.cuda.synchronize()  # returns: the kernel gives up instead of hanging
        with pytest.raises(comm.PeerTimeoutError, match="rank 1 did not arrive within 2 s") as info:
            comm.check_errors()
        assert info.value.peer == 1 and info.value.rank == 0
        assert torch.ones(4, device="cuda").sum().item() == 4.0  # the context is still usable
        with pytest.raises(RuntimeError, match="created before a peer timeout"):
            c.all_reduce(x)  # its counters are out of step: refused, not silently wrong
    dist.barrier()
    comm.vllm_dispose(c.fa)
    # a fresh communicator works after the failure
    with VllmComm(1 << 20) as fresh:
        y = torch.randint(-4, 4, (4096,), device="cuda").to(torch.bfloat16)
        expected = y.clone()
        dist.all_reduce(expected)
        assert torch.equal(fresh.all_reduce(y), expected)


@pytest.mark.gpu(2)
def test_missing_peer_times_out_with_clear_error():
    run_ranks(_rank_timeout, 2, backend="nccl", timeout_s=120)


def _rank_dispose(rank, world):
    meta_bytes = comm.vllm_meta_size() + (1 << 20)
    meta = comm.create_shared_buffer(meta_bytes)
    buf = comm.create_shared_buffer(1 << 20)
    comm.pack_strided_memory(meta[rank], meta_bytes, meta_bytes, 1, torch.uint8, torch.cuda.current_device()).zero_()
    rank_data = torch.empty(64 * 64, dtype=torch.uint8, device="cuda")
    x = torch.randn(2048, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    dist.barrier()
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
    dist.barrier()
    comm.free_shared_buffer(meta)
    comm.free_shared_buffer(buf)


@pytest.mark.gpu(2)
def test_init_dispose_does_not_leak():
    run_ranks(_rank_dispose, 2, backend="nccl", timeout_s=180)


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
            expected = x * 2
            dist.all_reduce(expected)
            assert torch.equal(step(x), expected + 1)
        x = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
        torch.library.opcheck(torch.ops.fusedcomm.vllm_all_reduce.default,
                              (c.fa, x, torch.empty_like(x), reg, 1 << 20, 8, 0))


@pytest.mark.gpu(2)
def test_torch_compile_fullgraph_and_opcheck():
    run_ranks(_rank_compile_and_opcheck, 2, backend="nccl", timeout_s=300)
