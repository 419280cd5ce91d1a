"""CUDA-event timing: warm up, then the median over repeats of a timed loop."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def time_loop(fn: Callable[[], None], iters: int, repeats: int = 5, warmup: int = 3) -> float:
    """Median microseconds per call of ``fn`` over ``repeats`` loops of ``iters`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        stop.record()
        stop.synchronize()
        samples.append(start.elapsed_time(stop) * 1000.0 / iters)
    return statistics.median(samples)


def capture(fn: Callable[[], None], iters: int, warmup: bool = True) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``iters`` calls of ``fn``, captured on a side stream (after one warm-up
    call unless ``warmup`` is False)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    if warmup:
        with torch.cuda.stream(stream):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(iters):
            fn()
    return graph


def time_graph(graph: torch.cuda.CUDAGraph, calls_per_replay: int, repeats: int = 5) -> float:
    """Median microseconds per captured call over ``repeats`` replays."""
    return time_loop(graph.replay, 1, repeats=repeats) / calls_per_replay
