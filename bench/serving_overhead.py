"""Serving at engine speed: served output tok/s against offline, and API-server CPU per token.

    python -m bench.serving_overhead --requests 64 --prompt-len 128 --output-len 128 \
        --api-servers 1 --json bench/results/serving_overhead_cpu.json
    python -m bench.serving_overhead ... --tree /tmp/before --tree .   # two code trees, A/B

One workload (`--requests` token-id prompts of `--prompt-len`, greedy, exactly `--output-len`
new tokens each, all sent at once) goes through the same engine settings twice in one run:
1. offline: `LLM.generate` in this process (one warm-up run first), output tok/s;
2. served: `minivllm serve --api-servers K` in a subprocess, every request streamed (SSE, the
   load generator of bench/serve_load.py in this process); output tok/s from the first send
   to the last [DONE], and each API server's CPU time (its threads' run time from /proc, over
   the load window, warm-up excluded) divided by the tokens streamed: the CPU per streamed
   token.
   Their CPU while idle (`IDLE_S` before the load: doorbell poll timeouts, uvicorn's ticks) is
   recorded too, and the figure less that rate over the load's wall time: at a few hundred
   tokens a second the idle floor alone is several us per token.
With several `--tree`s the served run is repeated per code tree (each a checkout whose
minivllm the server subprocess imports: its working directory), interleaved `--repeats`
times, so a before/after pair shares the machine's state; `--stream-interval-ms` adds the last
tree served with that flag. `--floor` adds, per repeat, bench/sse_floor.py's raw uvloop server
under the same load, writing a prebuilt chunk to every stream at the last tree's inter-token
latency: the socket + event loop part of a streamed token, which no Python server goes below.
The CPU figure recorded is the lowest of the repeats (contention from other work only adds CPU
time: cache misses, preemptions); every run is in `runs`.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional

from bench.records import record, write
from bench.serve_load import Request, run_fast, run_load
from bench.server_proc import ServeProcess, check_served
from bench.bench_engine_overhead import proc_cpu_s


def tiny_model(directory: str) -> str:
    """A 2-layer Llama of SmolLM2's vocabulary (dummy weights) beside the embedded model's
    tokenizer: an engine whose steps take milliseconds on this CPU, so the API servers, not
    the model, set the pace (the GPU's regime). Returns its config.json."""
    import json

    from minivllm.loader import embedded_gguf_path
    from minivllm.tokenizer import Tokenizer

    os.makedirs(directory, exist_ok=True)
    tok = Tokenizer.from_gguf(embedded_gguf_path())
    tok.backend.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                   "chat_template": tok.chat_template}, f)
    config = os.path.join(directory, "config.json")
    with open(config, "w") as f:
        json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                   "vocab_size": tok.vocab_size, "hidden_size": 64, "intermediate_size": 128,
                   "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                   "max_position_embeddings": 2048, "tie_word_embeddings": True,
                   "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}, f)
    return config


IDLE_S = 5.0  # the API servers' idle CPU is measured over this long before the load


def workload(n: int, prompt_len: int, output_len: int, seed: int,
             ragged: bool = False) -> list[Request]:
    """`n` token-id prompts; `ragged`: bench.offline_throughput's ragged lengths (prompt and
    output each 100..1024) instead of `prompt_len` / `output_len`."""
    if ragged:
        from bench.offline_throughput import ragged_workload
        return [Request(ids, None, len(ids), out)
                for ids, out in ragged_workload(8000, n, seed)]
    rng = random.Random(seed)
    return [Request([rng.randrange(1000, 8000) for _ in range(prompt_len)], None, prompt_len,
                    output_len) for _ in range(n)]


@dataclass(frozen=True)
class Load:
    """How the workload is sent: by `procs` load-generator processes, each through `client`
    (serve_load.run_load's: httpx, or raw)."""
    procs: int = 1
    client: str = "raw"


def _load_part(url: str, part: list[Request], client: str, out) -> None:
    """One load-generator process: its share of the requests, timed on the wall clock."""
    start, cpu = time.time(), time.process_time()
    summary, _ = run_fast(run_load(url, part, model="default", progress=False, client=client))
    out.put((start, time.time(), summary | {"cpu_s": time.process_time() - cpu}))


def load(url: str, work: list[Request], how: Load) -> dict:
    """The workload sent by `how.procs` load-generator processes (round-robin shares, all at
    once); one process runs in this one. The summary's throughput is every process's tokens
    over the span from the first start to the last end."""
    procs = how.procs
    if procs <= 1:
        cpu = time.process_time()
        summary = run_fast(run_load(url, work, model="default", progress=False,
                                    client=how.client))[0]
        return summary | {"load_cpu_s": [time.process_time() - cpu]}
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    out = ctx.Queue()
    workers = [ctx.Process(target=_load_part, args=(url, work[i::procs], how.client, out))
               for i in range(procs)]
    for w in workers:
        w.start()
    parts = [out.get() for _ in workers]
    for w in workers:
        w.join()
    tokens = sum(p[2]["output_tokens"] for p in parts)
    span = max(p[1] for p in parts) - min(p[0] for p in parts)
    itl = sorted(p[2]["itl_ms"]["p50"] for p in parts)
    counts = {k: sum(p[2]["counts"][k] for p in parts) for k in parts[0][2]["counts"]}
    return {"output_tokens": tokens, "duration_s": span, "output_token_throughput": tokens / span,
            "counts": counts, "errors": [e for p in parts for e in p[2]["errors"]],
            "itl_ms": {"p50": itl[len(itl) // 2]},  # the median of the processes' medians
            "ttft_ms": {"p50": sorted(p[2]["ttft_ms"]["p50"] for p in parts)[len(parts) // 2],
                        "p99": max(p[2]["ttft_ms"]["p99"] for p in parts)},
            "load_cpu_s": sorted(p[2]["cpu_s"] for p in parts)}


def offline(work: list[Request], engine_args: dict) -> float:
    """LLM.generate's output tok/s on `work` (after one warm-up run of it), as
    bench/offline_throughput.py runs it."""
    from bench.offline_throughput import run_minivllm
    from minivllm.llm import LLM

    llm = LLM(**engine_args)
    pairs = [(r.prompt, r.output_len) for r in work]
    run_minivllm(llm, pairs)
    steps: dict = {}
    tok_s = run_minivllm(llm, pairs, steps)
    print(f"offline: {tok_s:.1f} tok/s, {sum(k['steps'] for k in steps.values())} steps",
          flush=True)
    return tok_s


def measure(url: str, pids: list[int], work: list[Request], how: Load,
            srv: Optional[ServeProcess] = None) -> tuple[dict, dict]:
    """A warm-up, `pids`' idle CPU over IDLE_S, then the load: its summary, and the CPU
    figures of `pids` over it (and `srv`'s engine's steps and CPU)."""
    asyncio.run(run_load(url, work[:4], model="default", progress=False,  # warm-up
                         client=how.client))
    idle = {p: proc_cpu_s(p) for p in pids}
    time.sleep(IDLE_S)
    before = {p: proc_cpu_s(p) for p in pids}
    if srv is not None:
        engine = srv.engine_pid()
        steps, engine_cpu = srv.engine_stats()["step"], proc_cpu_s(engine)
    summary = load(url, work, how)
    cpu = {p: proc_cpu_s(p) - before[p] for p in pids}
    # More steps than offline: the requests reached the engine spread out (smaller batches);
    # its CPU near the wall time: the engine, not the servers, was busy.
    extra = {} if srv is None else {"engine_steps": srv.engine_stats()["step"] - steps,
                                    "engine_cpu_s": proc_cpu_s(engine) - engine_cpu}
    idle_rate = sum(before[p] - idle[p] for p in pids) / IDLE_S
    tokens, wall = summary["output_tokens"], summary["duration_s"]
    return summary, {
        "tok_s": summary["output_token_throughput"], "tokens": tokens,
        "cpu_s": sum(cpu.values()), "cpu_s_per_server": sorted(cpu.values()),
        "us_per_token": 1e6 * sum(cpu.values()) / tokens,
        "idle_cpu_percent": 100 * idle_rate,
        "us_per_token_less_idle": 1e6 * (sum(cpu.values()) - idle_rate * wall) / tokens,
        "itl_p50_ms": summary["itl_ms"]["p50"], "wall_s": wall,
        "ttft_p50_ms": summary["ttft_ms"]["p50"], "ttft_p99_ms": summary["ttft_ms"]["p99"],
        # a load generator busy near the whole wall time is what sets the pace, not the server
        "load_cpu_s": summary["load_cpu_s"], **extra}


def served(tree: str, work: list[Request], serve_args: list[str], how: Load) -> dict:
    """One served run from code tree `tree`: throughput and each API server's CPU."""
    srv = ServeProcess(serve_args, cwd=tree)
    try:
        pids = srv.process_tree()
        summary, run = measure(srv.url, srv.api_server_pids(), work, how, srv)
    finally:
        code = srv.stop()
    check_served(code, pids, summary, len(work))
    return run


def floor(work: list[Request], step_ms: float, how: Load) -> dict:
    """bench/sse_floor.py's raw uvloop SSE server under the same load, a chunk to every stream
    every `step_ms` (the served run's inter-token latency): its CPU per streamed token."""
    proc = subprocess.Popen([sys.executable, "-m", "bench.sse_floor", "--step-ms", str(step_ms)],
                            stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        url = proc.stdout.readline().split()[-1]
        summary, run = measure(url, [proc.pid], work, how)
    finally:
        proc.terminate()
        proc.wait(60)
    if summary["counts"]["ok"] != len(work):
        raise RuntimeError(f"the floor server served {summary['counts']}, not {len(work)} ok")
    return run


def _report(label: str, runs: dict[str, list[dict]], run: dict) -> None:
    runs[label].append(run)
    print(f"{label}: {run['tok_s']:.1f} tok/s served, {run['us_per_token']:.2f} us CPU per "
          f"streamed token ({run['us_per_token_less_idle']:.2f} less idle "
          f"{run['idle_cpu_percent']:.2f} % of a core; {run['tokens']} tokens, server CPU "
          f"{run['cpu_s']:.2f} s, ITL p50 {run['itl_p50_ms']:.1f} ms, TTFT p50 "
          f"{run['ttft_p50_ms']:.0f} p99 {run['ttft_p99_ms']:.0f} ms; wall {run['wall_s']:.2f} s, "
          f"load generators' CPU {sum(run['load_cpu_s']):.2f} s, engine "
          f"{run.get('engine_steps', '-')} steps, CPU {run.get('engine_cpu_s', 0):.2f} s)",
          flush=True)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--api-servers", type=int, default=1)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--model", default="tiny",
                    help="tiny: 2 layers of dummy weights with SmolLM2's tokenizer (steps of "
                         "milliseconds); embedded: SmolLM2-135M-Instruct; or any model name "
                         "or path serve takes (on a GPU: qwen2.5-0.5b --load-format dummy)")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--workload", choices=["fixed", "ragged"], default="fixed",
                    help="fixed: --prompt-len / --output-len; ragged: bench.offline_throughput's")
    ap.add_argument("--load-procs", type=int, default=1,
                    help="load-generator processes sharing the requests")
    ap.add_argument("--client", choices=["raw", "httpx"], default="raw",
                    help="the load generators' HTTP client (bench/serve_load.py): raw, a bare "
                         "asyncio one, costs them a fraction of httpx's CPU a token")
    ap.add_argument("--kernels", default="auto")
    ap.add_argument("--tiny-dir", default="/tmp/minivllm-tiny-smollm2")
    ap.add_argument("--tree", action="append", default=None,
                    help="a code tree to serve from (repeat for an A/B; default: this one)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--stream-interval-ms", type=float, default=0.0,
                    help="also serve from the last tree with this --stream-interval-ms")
    ap.add_argument("--floor", action="store_true",
                    help="also run bench/sse_floor.py's raw uvloop SSE server under the same "
                         "load, at each repeat's inter-token latency of the last tree")
    ap.add_argument("--no-offline", dest="offline", action="store_false")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    trees = [os.path.abspath(t) for t in (args.tree or ["."])]
    how = Load(args.load_procs, args.client)
    work = workload(args.requests, args.prompt_len, args.output_len, args.seed,
                    args.workload == "ragged")
    load = [os.getloadavg()]
    engine_args: dict = {"max_num_seqs": args.max_num_seqs, "kernels": args.kernels}
    serve_args = ["--max-num-seqs", str(args.max_num_seqs), "--api-servers",
                  str(args.api_servers), "--kernels", args.kernels, "--served-model-name",
                  "default", "--no-dashboard"]
    if args.model == "tiny":
        config = tiny_model(args.tiny_dir)
        engine_args.update(model=config, load_format="dummy")
        serve_args += [config, "--load-format", "dummy"]
    elif args.model != "embedded":
        engine_args.update(model=args.model, load_format=args.load_format, dtype=args.dtype)
        serve_args += [args.model, "--load-format", args.load_format, "--dtype", args.dtype]
    offline_tok_s = offline(work, engine_args) if args.offline else None
    # (label, code tree, extra serve arguments) of each served configuration
    configs = [(tree, tree, []) for tree in trees]
    if args.stream_interval_ms:
        configs.append((f"{trees[-1]} --stream-interval-ms {args.stream_interval_ms:g}",
                        trees[-1], ["--stream-interval-ms", str(args.stream_interval_ms)]))
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in configs}
    floor_label = "raw uvloop SSE server, bench/sse_floor.py: the socket + event loop floor"
    if args.floor:
        runs[floor_label] = []
    for _ in range(args.repeats):
        for label, tree, extra in configs:
            _report(label, runs, served(tree, work, serve_args + extra, how))
            load.append(os.getloadavg())
        if args.floor:
            step_ms = runs[trees[-1]][-1]["itl_p50_ms"]
            _report(floor_label, runs, floor(work, step_ms, how) | {
                "step_ms": step_ms})
            load.append(os.getloadavg())
    cfg = dict(requests=args.requests, workload=args.workload, prompt_len=args.prompt_len,
               output_len=args.output_len, api_servers=args.api_servers,
               load_procs=args.load_procs, client=args.client, max_num_seqs=args.max_num_seqs,
               kernels=args.kernels, dtype=args.dtype,
               model=("2-layer Llama, hidden 64, dummy weights, SmolLM2's tokenizer"
                      if args.model == "tiny" else "embedded SmolLM2-135M-Instruct"
                      if args.model == "embedded" else f"{args.model} ({args.load_format})"),
               load_average=[[round(x, 2) for x in la] for la in load])
    records = []
    for label, rs in runs.items():
        best = min(rs, key=lambda r: r["us_per_token"])
        records.append(record(f"API-server CPU per streamed token ({label})",
                              best["us_per_token"], "us/token", target=10.0,
                              runs=rs, **cfg))
        if label == floor_label:
            continue
        tok_s = sorted(r["tok_s"] for r in rs)[len(rs) // 2]
        records.append(record(f"served output tok/s ({label})", tok_s, "tokens/s",
                              peer=offline_tok_s, peer_name="offline LLM.generate, same run",
                              **cfg))
    write(args.json, records)


if __name__ == "__main__":
    main()
