"""The GPU's ceilings, measured in the same run as the result they judge.

- `copy_bandwidth`: a 4 GiB device-to-device copy, bytes read + written per second.
- `read_bandwidth`: a read-only stream (a sum over 4 GiB): what a decode step does to weights
  and KV cache. The floors use the higher of the two, so a fraction is never flattered.
- `matmul_peak`: an 8192^3 bf16 matmul, FLOP/s.
Medians over repeats after warm-up, timed with CUDA events (`graph_time_s`: of a CUDA graph's
replay, for kernels too short to time one launch at a time).
"""
from __future__ import annotations

import statistics
from typing import Callable

import torch


def median_s(fn: Callable[[], object], repeats: int = 12, warmup: int = 2) -> float:
    times = []
    for i in range(warmup + repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def graph_time_s(fn: Callable[[], object], repeats: int = 10) -> float:
    """Median time of one replay of a CUDA graph of fn() (warmed up already: compiled,
    allocated): back-to-back kernels as a captured step runs them."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return median_s(graph.replay, repeats=repeats)


def copy_bandwidth() -> float:
    src = torch.empty(1 << 31, dtype=torch.int16, device="cuda").random_()
    dst = torch.empty_like(src)
    return 2 * src.nbytes / median_s(lambda: dst.copy_(src))


def read_bandwidth() -> float:
    src = torch.empty(1 << 31, dtype=torch.bfloat16, device="cuda").normal_()
    return src.nbytes / median_s(lambda: torch.sum(src, dtype=torch.float32))


def matmul_peak(n: int = 8192) -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    return 2 * n ** 3 / median_s(lambda: a @ b)


def measure() -> dict[str, float]:
    """Every ceiling, and `bandwidth`: the one the floors divide by."""
    copy, read, flops = copy_bandwidth(), read_bandwidth(), matmul_peak()
    torch.cuda.empty_cache()  # the buffers above, for the engine that follows
    return {"copy_bytes_per_s": copy, "read_bytes_per_s": read,
            "bandwidth": max(copy, read), "matmul_flops": flops}


def weight_bytes(llm) -> int:
    """Bytes of the weights a decode step reads: all but the embedding table, of which it
    reads a row per sequence (the whole table when tied to the LM head: the logits read it)."""
    model = llm.engine.runner.model
    total = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                if n != "embed_tokens.weight")
    if model.lm_head is None:
        total += model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    return total


def kv_bytes_per_token(llm) -> float:
    """Bytes of cached keys and values one token of context holds, every layer."""
    spec = llm.engine.runner.kv_spec
    return spec.bytes_per_block / spec.block_size
