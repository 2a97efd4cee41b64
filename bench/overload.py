"""Overload: offered load at 3x the measured capacity against `--max-pending`.

    python -m bench.overload --json bench/results/overload_cpu.json

1. Capacity: the server kept full (closed loop, exactly --max-pending requests in flight, so
   nothing is refused); its request throughput is the capacity, and its TTFT p99 the latency
   an admitted request sees when the server is at capacity.
2. Overload: open-loop Poisson arrivals at `--factor` x capacity, same server. The excess must
   get 429 (with Retry-After), the admitted requests' TTFT p99 must stay within 2x its value at
   capacity (the pending bound keeps the queue short), with no 5xx and no hung request.
Afterwards the engine must be idle (no running request, no KV block held).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import sys

from bench import records
from bench.serve_load import (build_workload, length_sampler, print_summary, run_load,
                              served_model)
from bench.server_proc import ServeProcess, leftovers, wait_engine_idle


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--serve-common", default="--dtype bfloat16 --num-blocks 2048 "
                                              "--max-num-seqs 16")
    ap.add_argument("--max-pending", type=int, default=24)
    ap.add_argument("--factor", type=float, default=3.0)
    ap.add_argument("--capacity-requests", type=int, default=96)
    ap.add_argument("--overload-requests", type=int, default=600)
    ap.add_argument("--prompt-len", type=length_sampler, default=length_sampler("uniform:32:128"))
    ap.add_argument("--output-len", type=length_sampler, default=length_sampler("32"))
    ap.add_argument("--timeout", type=float, default=300.0, help="per request: past it, hung")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    args.endpoint, args.dataset, args.token_low, args.token_high = "completions", None, 1000, 8000
    serve = shlex.split(args.serve_common) + ["--max-pending", str(args.max_pending)]
    srv = ServeProcess(serve)
    try:
        model = served_model(srv.url, None)
        args.num_requests = 4
        asyncio.run(run_load(srv.url, build_workload(args, random.Random(99)), model=model,
                             progress=False))  # warm-up
        args.num_requests = args.capacity_requests
        cap, _ = asyncio.run(run_load(
            srv.url, build_workload(args, random.Random(args.seed)), model=model,
            max_concurrency=args.max_pending, timeout=args.timeout, latency_from="send"))
        print_summary(cap)
        capacity = cap["request_throughput"]
        rate = args.factor * capacity
        args.num_requests = args.overload_requests
        over, _ = asyncio.run(run_load(
            srv.url, build_workload(args, random.Random(args.seed + 1)), model=model, rate=rate,
            seed=args.seed, timeout=args.timeout))
        print_summary(over)
        idle = wait_engine_idle(srv.url)
        pids = srv.process_tree()
    finally:
        code = srv.stop()
    left = leftovers(pids)
    c = over["counts"]
    checks = {
        "excess refused with 429": c["429"] > 0,
        "admitted TTFT p99 <= 2x at capacity":
            over["ttft_ms"]["p99"] <= 2 * cap["ttft_ms"]["p99"],
        "no 5xx": c["5xx"] == 0 and cap["counts"]["5xx"] == 0,
        "no other error": c["error"] == 0 and cap["counts"]["error"] == 0,
        "none hung": c["timeout"] == 0 and cap["counts"]["timeout"] == 0,
        "engine idle after (KV 0, running 0)": idle["minivllm:kv_cache_usage_perc"] == 0,
        "server exit 0, nothing left behind": code == 0 and not any(left.values()),
    }
    print(f"\ncapacity {capacity:.2f} req/s ({cap['output_token_throughput']:.0f} output tok/s) "
          f"with {args.max_pending} in flight; offered {rate:.2f} req/s ({args.factor:g}x)")
    print(f"admitted {c['ok']} of {over['requests']} ({c['429']} got 429); TTFT p99 "
          f"{over['ttft_ms']['p99']:.0f} ms vs {cap['ttft_ms']['p99']:.0f} ms at capacity "
          f"({over['ttft_ms']['p99'] / cap['ttft_ms']['p99']:.2f}x)")
    for name, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"serve": serve, "capacity_rps": capacity, "offered_rps": rate,
                       "at_capacity": cap, "overload": over, "checks": checks,
                       "server_exit": code, "left_behind": left, **records.context()},
                      f, indent=1)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
