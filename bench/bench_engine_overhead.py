"""Engine-process overheads on this machine: idle CPU, and the frontend's CPU per token.

    python -m bench.bench_engine_overhead --json bench/results/engine_overhead_cpu.json

1. Idle: a supervised engine (embedded SmolLM2, fp32) with one attached frontend, both idle for
   `--idle-s` seconds; CPU time of each process over that window (/proc and getrusage), as a
   percentage of one core. Both sleep on their doorbells, so this should be near 0.
2. Per token: `--requests` concurrent greedy requests of `--tokens` tokens each (ignore_eos),
   streamed to (a) the AsyncEngineClient (detokenization, per-request state, asyncio) and (b) the
   bare EngineChannel (ring records only: the transport's floor). The frontend process's CPU time
   divided by the tokens it received is the client-side cost per token.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import resource
import time

from bench.records import record, write
from minivllm.config import SupervisorConfig, TransportConfig
from minivllm.engine.supervisor import Supervisor
from minivllm.frontend.async_client import AsyncEngineClient
from minivllm.llm import build_engine_config
from minivllm.sampling_params import SamplingParams
from minivllm.transport.channel import EngineChannel


def proc_cpu_s(pid: int) -> float:
    """CPU seconds of every thread of `pid`: the scheduler's run time in ns (schedstat), not
    utime + stime in 10-ms ticks (a tick is ~0.3 us a token in a 32 k-token run: the size of
    the differences bench/serving_overhead.py looks for)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat", "rb") as f:
                total += int(f.read().split()[0])
        except FileNotFoundError:  # a thread that just ended
            pass
    return total / 1e9


def self_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def idle(sup: Supervisor, seconds: float) -> tuple[float, float]:
    client = await AsyncEngineClient.connect(sup.control)
    await client.submit([1, 2, 3], SamplingParams(max_tokens=2))  # warm, then go quiet
    await asyncio.sleep(1.0)
    e0, f0, t0 = proc_cpu_s(sup.engine_pid), self_cpu_s(), time.monotonic()
    await asyncio.sleep(seconds)
    wall = time.monotonic() - t0
    engine, frontend = (proc_cpu_s(sup.engine_pid) - e0) / wall, (self_cpu_s() - f0) / wall
    await client.shutdown()
    return 100 * engine, 100 * frontend


def prompts(n: int) -> list[list[int]]:
    return [[1, 100 + i, 200 + i, 300 + i] for i in range(n)]


async def client_cost(sup: Supervisor, n: int, tokens: int) -> tuple[float, float, int]:
    client = await AsyncEngineClient.connect(sup.control)
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    c0, t0 = self_cpu_s(), time.monotonic()
    received = 0

    async def one(p):
        nonlocal received
        async for out in client.generate(p, params):
            received += len(out.outputs[0].delta_token_ids)
    await asyncio.gather(*(one(p) for p in prompts(n)))
    cpu, wall = self_cpu_s() - c0, time.monotonic() - t0
    await client.shutdown()
    return cpu, wall, received


def channel_cost(sup: Supervisor, n: int, tokens: int) -> tuple[float, float, int]:
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    with EngineChannel(sup.control, sup.transport) as ch:
        c0, t0 = self_cpu_s(), time.monotonic()
        for i, p in enumerate(prompts(n)):
            ch.submit(i, p, params)
        received = finished = 0
        while finished < n:
            ch.wait(1.0)
            while (rec := ch.read()) is not None:
                received += len(rec)
                finished += int(rec.finish_reasons.astype(bool).sum())
        cpu, wall = self_cpu_s() - c0, time.monotonic() - t0
    return cpu, wall, received


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--idle-s", type=float, default=10.0)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    sup = Supervisor(build_engine_config(None, dtype="float32"), TransportConfig(),
                     SupervisorConfig())
    sup.start()
    try:
        engine_idle, frontend_idle = asyncio.run(idle(sup, args.idle_s))
        asyncio.run(client_cost(sup, args.requests, 16))  # warm-up
        cpu_c, wall_c, tok_c = asyncio.run(client_cost(sup, args.requests, args.tokens))
        cpu_r, wall_r, tok_r = channel_cost(sup, args.requests, args.tokens)
    finally:
        sup.shutdown()
    cfg = dict(requests=args.requests, max_tokens=args.tokens)
    write(args.json, [
        record("engine idle CPU (one frontend attached)", engine_idle, "% of a core",
               idle_s=args.idle_s),
        record("frontend idle CPU (AsyncEngineClient)", frontend_idle, "% of a core",
               idle_s=args.idle_s),
        record("AsyncEngineClient CPU per token", 1e6 * cpu_c / tok_c, "us/token",
               peer=1e6 * cpu_r / tok_r, peer_name="bare EngineChannel",
               received_tokens=tok_c, wall_s=wall_c, **cfg),
        record("bare EngineChannel CPU per token", 1e6 * cpu_r / tok_r, "us/token",
               received_tokens=tok_r, wall_s=wall_r, **cfg),
        record("stream throughput through AsyncEngineClient", tok_c / wall_c, "tokens/s",
               peer=tok_r / wall_r, peer_name="bare EngineChannel", **cfg),
    ])


if __name__ == "__main__":
    main()
