"""pyperf benchmark of the KV-cache block allocator: Cython vs the pure-Python reference.

    python bench/bench_allocator.py --fast --json bench/results/allocator.json

Each benchmark times one request-level operation on a realistically sized pool (16-token blocks,
4096 blocks, 512-token prompts = 32 blocks) and reports operations per second:

  alloc_free_512     allocate(512 tokens) + free, blocks from the free list, no prefix caching
  prefill_miss_512   a cold request's life: match_prefix (miss) + allocate + commit + free;
                     every prompt is new, so commit registers 32 blocks and, once the free list
                     is empty, allocate evicts cached blocks (steady state of a busy server)
  prefix_hit_512     match_prefix of a cached 512-token prompt (31 block hits) + free
  decode_step        one decode token: allocate(n + 1) + commit(n + 1) on a growing sequence
                     (a block boundary every 16 steps; the seq is recycled at 2048 tokens)

Every other option is pyperf's (--fast, --rigorous, -p, -o, ...); pyperf runs each benchmark in
worker processes and the parent process writes --json: a list of
{"name", "value", "unit", "peer", "ratio"} records, one per benchmark and implementation; for the
Cython records "peer" is "ref" and "ratio" is the speedup over it.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pyperf

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minivllm._cext.block_allocator import BlockAllocator as CAllocator  # noqa: E402
from minivllm.core.block_allocator_ref import BlockAllocator as RefAllocator  # noqa: E402

IMPLS = {"cython": CAllocator, "ref": RefAllocator}
BLOCK_SIZE, NUM_BLOCKS, MAX_SEQS, MAX_BLOCKS = 16, 4096, 256, 128
PROMPT = 512


def new_allocator(cls, caching=True):
    return cls(NUM_BLOCKS, BLOCK_SIZE, MAX_SEQS, MAX_BLOCKS, caching)


def prompt_tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 32000, PROMPT, dtype=np.int64)


def bench_alloc_free(loops, cls):
    a = new_allocator(cls, caching=False)
    allocate, free = a.allocate, a.free
    t0 = pyperf.perf_counter()
    for _ in range(loops):
        allocate(0, PROMPT)
        free(0)
    return pyperf.perf_counter() - t0


def bench_prefill_miss(loops, cls):
    a = new_allocator(cls)
    tokens = prompt_tokens()
    match, allocate, commit, free = a.match_prefix, a.allocate, a.commit, a.free
    t0 = pyperf.perf_counter()
    for i in range(loops):
        tokens[0] = i          # a new first token makes every block's chained hash new
        match(0, tokens, PROMPT)
        allocate(0, PROMPT)
        commit(0, tokens, PROMPT)
        free(0)
    return pyperf.perf_counter() - t0


def bench_prefix_hit(loops, cls):
    a = new_allocator(cls)
    tokens = prompt_tokens()
    a.match_prefix(0, tokens, PROMPT)
    a.allocate(0, PROMPT)
    a.commit(0, tokens, PROMPT)
    a.free(0)
    match, free = a.match_prefix, a.free
    t0 = pyperf.perf_counter()
    for _ in range(loops):
        match(1, tokens, PROMPT)
        free(1)
    return pyperf.perf_counter() - t0


def bench_decode_step(loops, cls):
    a = new_allocator(cls)
    limit = MAX_BLOCKS * BLOCK_SIZE
    tokens = np.random.default_rng(1).integers(0, 32000, limit, dtype=np.int64)
    allocate, commit, free = a.allocate, a.commit, a.free
    n = 0
    t0 = pyperf.perf_counter()
    for _ in range(loops):
        if n == limit:
            free(0)
            n = 0
        n += 1
        allocate(0, n)
        commit(0, tokens, n)
    return pyperf.perf_counter() - t0


BENCHMARKS = {
    "alloc_free_512": bench_alloc_free,
    "prefill_miss_512": bench_prefill_miss,
    "prefix_hit_512": bench_prefix_hit,
    "decode_step": bench_decode_step,
}


def main():
    runner = pyperf.Runner()  # workers need none of our options: --json is the parent's
    runner.argparser.add_argument("--json", metavar="PATH",
                                  help="write {name, value, unit, peer, ratio} records here")
    runner.metadata["description"] = "minivllm block allocator: Cython vs reference"
    results = {}
    for bench_name, func in BENCHMARKS.items():
        for impl_name, cls in IMPLS.items():
            bench = runner.bench_time_func(f"allocator.{bench_name}.{impl_name}", func, cls)
            if bench is not None and not runner.args.worker:  # workers only measure
                results[(bench_name, impl_name)] = 1.0 / bench.mean()
    if not results:
        return
    records = []
    for bench_name in BENCHMARKS:
        c, r = results[(bench_name, "cython")], results[(bench_name, "ref")]
        records.append({"name": f"allocator.{bench_name}.cython", "value": c, "unit": "ops/s",
                        "peer": "ref", "ratio": c / r})
        records.append({"name": f"allocator.{bench_name}.ref", "value": r, "unit": "ops/s",
                        "peer": None, "ratio": None})
    print()
    for rec in records:
        ratio = f"  x{rec['ratio']:.1f} vs ref" if rec["ratio"] else ""
        print(f"{rec['name']:36s} {rec['value']:>14,.0f} ops/s{ratio}")
    if runner.args.json:
        with open(runner.args.json, "w") as f:
            json.dump(records, f, indent=2)


if __name__ == "__main__":
    main()
