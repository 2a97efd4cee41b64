"""GPU decode: step time against the memory-bandwidth floor, and the GPU's idle gap between steps.

    python -m bench.decode_bench --model llama-3-8b --batch 1 --json PATH
    python -m bench.decode_bench --model qwen2.5-0.5b --batch 256 --json PATH
    python -m bench.decode_bench --model qwen2.5-0.5b --batch 256 --no-async-scheduling ...
    python -m bench.decode_bench --model qwen2.5-0.5b --batch 256 --kernels torch ...

Dummy weights (bf16), random prompts, greedy, EOS ignored; the engine's own step loop
(EngineCore.step) is timed, so the host path (schedule, stage inputs, replay, sample, update)
is in the numbers. Decode steps only: timing starts once every request has its first token.

- Floor: the bytes one decode step must read (every weight except the embedding table, of
  which it reads B rows, plus the KV cache of the batch's contexts) over the bandwidth
  ceiling measured here (bench/roofline.py: the higher of a 4 GiB copy and a read-only stream,
  both recorded). MBU = floor / step. Any --prompt-len: the context is not capped.
- Idle gap: the torch profiler records every kernel of a window of steps (graph replays
  included); idle = the window's wall time not covered by any kernel, per step. The dozen
  kernels that take most of the busy time are listed with their time a step.
- Async scheduling (the engine's default on CUDA) runs the host's work for step k+1 while the
  GPU runs step k; `--no-async-scheduling` measures the synchronous loop. The host breakdown
  (which waits for the GPU inside each step) is taken for the synchronous loop only.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from bench import records, roofline
from minivllm import LLM, SamplingParams


def step_bytes(llm: LLM, batch: int, context: float) -> float:
    """Bytes a decode step of `batch` rows of mean context `context` reads at the least."""
    return roofline.weight_bytes(llm) + batch * context * roofline.kv_bytes_per_token(llm)


def host_breakdown(engine, steps: int) -> dict[str, float]:
    """Medians (s) over `steps` decode steps of where a step's wall time goes: the model
    runner's host work (staging, graph replay and sampler launches), the wait for the GPU after
    it, and the rest of EngineCore.step (schedule, update, outputs). The wait moves from the
    engine's token copy into this wrapper; the step's total is unchanged."""
    execute = engine.runner.execute
    phases: dict[str, list[float]] = {"execute": [], "wait": [], "step": []}

    def timed_execute(batch):
        t0 = time.perf_counter()
        out = execute(batch)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        phases["execute"].append(t1 - t0)
        phases["wait"].append(time.perf_counter() - t1)
        return out

    engine.runner.execute = timed_execute
    try:
        for _ in range(steps):
            t0 = time.perf_counter()
            engine.step()
            phases["step"].append(time.perf_counter() - t0)
    finally:
        engine.runner.execute = execute
    med = {k: statistics.median(v) for k, v in phases.items()}
    med["rest"] = med["step"] - med["execute"] - med["wait"]
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=128, help="decode steps timed")
    ap.add_argument("--profile-steps", type=int, default=30)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--kernels", default=None, help="a kernel set other than auto (A/B runs)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    total = 8 + 2 * args.steps + args.profile_steps + 8  # warm-up, timed, profiled, breakdown
    ceilings = roofline.measure()
    bandwidth = ceilings["bandwidth"]
    llm = LLM(args.model, load_format="dummy", dtype="bfloat16", max_num_seqs=max(args.batch, 1),
              max_model_len=args.prompt_len + total + 16, gpu_memory_utilization=0.5,
              enforce_eager=args.enforce_eager,
              async_scheduling=args.async_scheduling, kernels=args.kernels)
    engine = llm.engine
    vocab = engine.source.arch.vocab_size
    rng = random.Random(0)
    for i in range(args.batch):
        engine.add_request(i, [rng.randrange(10, vocab - 10) for _ in range(args.prompt_len)],
                           SamplingParams(temperature=0, max_tokens=total, ignore_eos=True))
    started: set[int] = set()
    while len(started) < args.batch:  # prefill until every request has its first token
        started.update(engine.step().owners.tolist())
    for _ in range(8):  # warm-up decode steps
        engine.step()
    torch.cuda.synchronize()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        assert len(engine.step()) == args.batch  # the step waits for its sampled tokens
        times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    context = args.prompt_len + 8 + args.steps / 2
    floor = step_bytes(llm, args.batch, context) / bandwidth

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(args.profile_steps):
            engine.step()
        wall = time.perf_counter() - t0
    events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    kernels = sorted((e.time_range.start, e.time_range.end) for e in events)
    if not kernels:
        raise RuntimeError("the profiler recorded no GPU activity")
    busy, cur_start, cur_end = 0.0, None, None
    for s, e in kernels:  # union of kernel intervals (us)
        if cur_end is None or s > cur_end:
            if cur_end is not None:
                busy += cur_end - cur_start
            cur_start, cur_end = s, e
        else:
            cur_end = max(cur_end, e)
    busy += cur_end - cur_start
    span = kernels[-1][1] - kernels[0][0]
    idle_per_step = (span - busy) / args.profile_steps / 1e3  # ms
    gpu_per_step = busy / args.profile_steps / 1e3
    by_kernel: dict[str, float] = {}  # GPU us per step by kernel name: where the step goes
    for e in events:
        by_kernel[e.name] = by_kernel.get(e.name, 0.0) + (e.time_range.end - e.time_range.start)
    top = sorted(by_kernel.items(), key=lambda kv: -kv[1])[:12]
    for kernel, us in top:
        print(f"  {us / args.profile_steps:8.1f} us a step  {kernel[:110]}")
    # After the profile: it adds a sync per step.
    host = {} if args.async_scheduling else host_breakdown(engine, args.steps)

    name = (f"{args.model} bf16 decode batch {args.batch}"
            f"{' eager' if args.enforce_eager else ''}"
            f"{' async' if args.async_scheduling else ' sync'} scheduling"
            f"{f', {args.kernels} kernels' if args.kernels else ''}")
    recs = [
        records.record(f"{name}: step time (median of {args.steps})", step * 1e3, "ms",
                       context=context),
        records.record(f"{name}: bandwidth floor", floor * 1e3, "ms",
                       bytes=step_bytes(llm, args.batch, context), bandwidth_bytes_per_s=bandwidth,
                       **ceilings),
        records.record(f"{name}: MBU (floor / step)", floor / step, "fraction"),
        records.record(f"{name}: output tokens/s", args.batch / step, "tok/s"),
        records.record(f"{name}: GPU busy per step (profiler)", gpu_per_step, "ms"),
        records.record(f"{name}: GPU idle gap per step (profiler)", idle_per_step, "ms",
                       fraction=idle_per_step / (idle_per_step + gpu_per_step),
                       profiled_wall_per_step_ms=wall / args.profile_steps * 1e3),
        # The profiler slows the host; without it the gap is the step's wall time less the
        # GPU's busy time (kernel durations barely change under the profiler).
        records.record(f"{name}: GPU idle gap per step (unprofiled step - busy)",
                       step * 1e3 - gpu_per_step, "ms",
                       fraction=(step * 1e3 - gpu_per_step) / (step * 1e3)),
    ] + [records.record(f"{name}: host breakdown: {k}", v * 1e3, "ms")
         for k, v in host.items()] + [
        records.record(f"{name}: kernel {kernel[:160]}", us / args.profile_steps, "us a step")
        for kernel, us in top]
    records.write(args.json, recs)


if __name__ == "__main__":
    main()
