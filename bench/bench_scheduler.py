"""Scheduling overhead per engine step: the Cython scheduler against the Python reference (pyperf).

    python -m bench.bench_scheduler --json bench/results/scheduler_cpu.json
    python -m bench.bench_scheduler --seqs 256 --fast          # a quick look

Steady decode: N running requests (N = 8, 64, 256, 1024) with random 900-token prompts (no
shared prefix) are prefilled in one untimed step; every timed step then schedules N one-token
decodes and update() appends N sampled tokens, so contexts grow from 900 by one token a step
(to ~1.25k at the end of a worker). Otherwise engine defaults: decode-first, block size 16,
prefix caching on (every 16th step each request fills a block that gets hashed and registered).
The token budget is N x 900 so that the prefill takes one step; a decode step does not read it.

Two benchmarks per N, in the same run (update() writes its outputs into arrays in both):
    cython     schedule() + update()          the engine's path
    reference  schedule() + update()          scheduler_ref over block_allocator_ref

pyperf runs each in fresh worker processes (a fixed 50 steps per value, so that every worker
sees the same context lengths); the master process writes the records: the median per step,
with the reference as the peer. Targets (issue 4): >= 20x the reference at 256 sequences, and
under 50 us per step at 1024 sequences.
"""
from __future__ import annotations

import time

import numpy as np
import pyperf

from bench import records
from minivllm.config import SchedulerConfig
from minivllm.core.scheduler import core_implementation
from minivllm.sampling_params import SamplingParams

PROMPT_LEN = 900
MAX_MODEL_LEN = 2048
BLOCK_SIZE = 16
STEPS_PER_VALUE = 50
IMPLS = {"cython": core_implementation("cython"), "reference": core_implementation("python")}
SIZES = (8, 64, 256, 1024)


def decoding_scheduler(impl: str, num_seqs: int):
    """A scheduler whose num_seqs requests are all past their prefill, and the step's tokens."""
    scheduler_cls, request_cls, allocator_cls = IMPLS[impl]
    blocks_per_seq = MAX_MODEL_LEN // BLOCK_SIZE
    allocator = allocator_cls(num_seqs * blocks_per_seq, BLOCK_SIZE, num_seqs, blocks_per_seq)
    config = SchedulerConfig(max_num_seqs=num_seqs, max_num_batched_tokens=num_seqs * PROMPT_LEN)
    scheduler = scheduler_cls(config, allocator, MAX_MODEL_LEN)
    rng = np.random.default_rng(0)
    params = SamplingParams(max_tokens=MAX_MODEL_LEN, ignore_eos=True)
    for i in range(num_seqs):
        prompt = rng.integers(0, 32000, PROMPT_LEN).tolist()
        scheduler.add_request(request_cls(i, prompt, params, (2,), MAX_MODEL_LEN, i, 0.0))
    tokens = rng.integers(0, 32000, num_seqs)  # not eos: nothing finishes
    batch, _ = scheduler.schedule()
    assert batch.num_tokens == num_seqs * PROMPT_LEN
    scheduler.update(tokens)
    return scheduler, tokens


_built: dict = {}  # a worker builds its scheduler once, on its first timing call


def time_steps(loops: int, impl: str, num_seqs: int) -> float:
    key = (impl, num_seqs)
    if key not in _built:
        _built[key] = decoding_scheduler(impl, num_seqs)
    scheduler, tokens = _built[key]
    schedule, apply = scheduler.schedule, scheduler.update
    t0 = time.perf_counter()
    for _ in range(loops):
        schedule()
        apply(tokens)
    elapsed = time.perf_counter() - t0
    batch, _ = schedule()  # untimed check: still steady decode
    assert batch.num_tokens == num_seqs and len(batch.sample_rows) == num_seqs
    apply(tokens)
    return elapsed


def add_worker_args(cmd: list, args) -> None:
    cmd.extend(["--seqs", *map(str, args.seqs)])


def main() -> None:
    runner = pyperf.Runner(loops=STEPS_PER_VALUE, processes=8, values=6, warmups=1,
                           program_args=("-m", "bench.bench_scheduler"),
                           add_cmdline_args=add_worker_args)
    runner.argparser.add_argument("--seqs", type=int, nargs="+", default=list(SIZES))
    runner.argparser.add_argument("--json", default=None, help="write records here")
    args = runner.parse_args()
    benches = {}
    for n in args.seqs:
        for impl in IMPLS:
            name = f"scheduler step {n} seqs {impl} schedule+update"
            benches[impl, n] = runner.bench_time_func(name, time_steps, impl, n)
    if args.worker:
        return
    records.write(args.json, [rec for n in args.seqs for rec in step_records(benches, n)])


def step_records(benches: dict, n: int) -> list[dict]:
    cy, ref = (benches[impl, n].median() * 1e6 for impl in ("cython", "reference"))
    extra = {}
    if n == 256:
        extra = dict(target="speedup over the reference >= 20x", met=ref / cy >= 20)
    elif n == 1024:
        extra = dict(target="< 50 us per step", met=cy < 50)
    return [records.record(
                f"scheduler step, steady decode, {n} seqs: cython schedule()+update()", cy,
                "us/step", peer=ref, peer_name="reference schedule()+update()",
                speedup=ref / cy, **extra),
            records.record(
                f"scheduler step, steady decode, {n} seqs: reference schedule()+update()", ref,
                "us/step")]


if __name__ == "__main__":
    main()
