"""Data parallel: `minivllm serve` with 1 and with N engines, the same workload, in one run.

    python -m bench.data_parallel --sizes 1 2 --requests 64 --prompt-len 128 --output-len 128 \
        --repeats 2 --json bench/results/data_parallel_cpu.json

One workload (`--requests` token-id prompts, greedy, exactly `--output-len` new tokens each,
all sent at once, every request streamed by bench/serve_load.py's generator in this process)
against the embedded model served at each `--data-parallel-size`, interleaved `--repeats`
times. Recorded: output tok/s, TTFT and ITL percentiles, and the share of the generated tokens
each engine made (/metrics, `minivllm:engine_generation_tokens_total{engine=...}`): both busy.

On a 2-core machine the engines (one core each at N=2: data_parallel.take_share), the API server
and this load generator share the cores, so the ratio is reported, not targeted; on a machine
with a GPU per engine it is the point of data parallelism.
"""
from __future__ import annotations

import argparse
import asyncio
from typing import Optional

from bench.records import record, write
from bench.serve_load import run_load
from bench.serving_overhead import workload
from bench.server_proc import ServeProcess, check_served, metrics


def served(size: int, work: list, serve_args: list[str]) -> dict:
    srv = ServeProcess([*serve_args, "--data-parallel-size", str(size)])
    try:
        pids = srv.process_tree()
        asyncio.run(run_load(srv.url, work[:4], model="default", progress=False))  # warm-up
        before = metrics(srv.url)
        summary, _ = asyncio.run(run_load(srv.url, work, model="default", progress=False))
        after = metrics(srv.url)
    finally:
        code = srv.stop()
    check_served(code, pids, summary, len(work))
    name = "minivllm:engine_generation_tokens_total{{engine={}}}"
    made = [after[name.format(r)] - before.get(name.format(r), 0) for r in range(size)]
    return {"tok_s": summary["output_token_throughput"], "tokens": summary["output_tokens"],
            "engine_tokens": made, "ttft_ms": summary["ttft_ms"], "itl_ms": summary["itl_ms"]}


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    work = workload(args.requests, args.prompt_len, args.output_len, args.seed)
    serve_args = ["--dtype", args.dtype, "--max-num-seqs", str(args.requests),
                  "--served-model-name", "default"]
    runs: dict[int, list[dict]] = {size: [] for size in args.sizes}
    for repeat in range(args.repeats):
        for size in args.sizes:
            run = served(size, work, serve_args)
            runs[size].append(run)
            print(f"repeat {repeat} data-parallel {size}: {run['tok_s']:.1f} tok/s, engines "
                  f"made {run['engine_tokens']}", flush=True)
    base = max(r["tok_s"] for r in runs[args.sizes[0]])
    records = []
    for size in args.sizes:
        best = max(runs[size], key=lambda r: r["tok_s"])
        records.append(record(
            f"served output tok/s at data-parallel size {size}", best["tok_s"], "tok/s",
            **{f"vs_size_{args.sizes[0]}": best["tok_s"] / base, "runs": runs[size],
               "workload": {"requests": args.requests, "prompt_len": args.prompt_len,
                            "output_len": args.output_len, "dtype": args.dtype}}))
    write(args.json, records)


if __name__ == "__main__":
    main()
