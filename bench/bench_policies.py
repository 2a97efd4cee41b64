"""Scheduling policies on one workload: time to first token against inter-token latency.

    python -m bench.bench_policies --json bench/results/policies_cpu.json

Requests arrive on a fixed schedule (open loop) at an in-process engine; each policy sees the
same arrivals, prompts and output lengths. decode-first (with chunked prefill) should give the
lower inter-token latency p99, prefill-first the lower time to first token.
"""
from __future__ import annotations

import argparse
import random
import time

import numpy as np

from bench import records
from minivllm.config import EngineConfig, ModelConfig, SchedulerConfig
from minivllm.engine.engine_core import EngineCore
from minivllm.sampling_params import SamplingParams

POLICIES = {
    "decode-first, chunked prefill": dict(policy="decode-first", max_num_batched_tokens=64),
    "prefill-first": dict(policy="prefill-first", max_num_batched_tokens=4096),
}


def workload(n: int, vocab: int, gap_s: float, seed: int = 0):
    rng = random.Random(seed)
    return [(i * gap_s, [rng.randrange(10, vocab - 10) for _ in range(rng.randint(150, 300))],
             rng.randint(24, 48)) for i in range(n)]


def run(engine: EngineCore, work) -> tuple[list[float], list[float]]:
    """Drive the step loop in real time; return every TTFT and every inter-token gap (s)."""
    arrivals, last, ttft, itl = {}, {}, [], []
    pending = list(enumerate(work))
    t0 = time.perf_counter()
    while pending or engine.has_unfinished():
        now = time.perf_counter() - t0
        while pending and pending[0][1][0] <= now:
            i, (at, ids, out_len) = pending.pop(0)
            engine.add_request(i, ids, SamplingParams(temperature=0, max_tokens=out_len,
                                                           ignore_eos=True))
            arrivals[i] = t0 + at
        if not engine.has_unfinished():
            time.sleep(max(0.0, pending[0][1][0] - now))
            continue
        outs = engine.step()
        stamp = time.perf_counter()
        for owner in outs.owners.tolist():
            prev = last.get(owner)
            (ttft if prev is None else itl).append(stamp - (arrivals[owner]
                                                            if prev is None else prev))
            last[owner] = stamp
    return ttft, itl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--num-requests", type=int, default=24)
    ap.add_argument("--gap-ms", type=float, default=250.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    results = []
    for label, opts in POLICIES.items():
        engine = EngineCore(EngineConfig(
            ModelConfig(args.model, load_format=args.load_format, dtype=args.dtype),
            scheduler=SchedulerConfig(**opts)))
        work = workload(args.num_requests, engine.source.arch.vocab_size, args.gap_ms / 1000)
        run(engine, workload(2, engine.source.arch.vocab_size, 0.0, seed=1))  # warm-up
        ttft, itl = run(engine, work)
        for metric, values in (("TTFT", ttft), ("ITL", itl)):
            for q in (50, 99):
                results.append(records.record(f"{label}: {metric} p{q}",
                                              1000 * float(np.percentile(values, q)), "ms"))
        del engine
    records.write(args.json, results)


if __name__ == "__main__":
    main()
