"""How batching trades latency for throughput: one workload, one server per batching scheme.

    python -m bench.batching_table --tag cpu --num-requests 96 --rate 3   # embedded SmolLM2
    python -m bench.batching_table --tag h100 --max-num-seqs 128 --num-requests 1000 \
        --rate R --serve-common "qwen2.5-0.5b --load-format dummy --dtype bfloat16"

Pick the rate below the batched rows' capacity (about 60% of it: the CPU table used 3/s
against ~5 req/s), e.g. from `python -m bench.serve_load --serve-args "..." --num-requests N`
(all at once). The one-at-a-time row is then overloaded on purpose: that is its point.

Every row serves the same requests (same prompts, output lengths and Poisson arrival times)
through `minivllm serve` started with that row's scheduler flags, measured by bench.serve_load
(streaming clients, latencies from each request's arrival). Writes
bench/results/batching_<tag>.{json,md,png}. Redraw a committed PNG from its JSON, running nothing:

    python -m bench.batching_table --replot bench/results/batching_cpu.json
    python -m bench.batching_table --replot bench/results/batching_h100.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import sys
from typing import Optional

from bench import plots, records
from bench.serve_load import build_workload, length_sampler, print_summary, run_load, \
    served_model
from bench.server_proc import ServeProcess, leftovers, wait_engine_idle

WINDOWS_MS = (20, 100, 400)


def rows(seqs: int) -> list[tuple[str, str, dict, str]]:
    """(label, serve flags, client-side options, why it behaves so: two sentences)."""
    # The chunked rows' step budget: every running decode plus room for prompt chunks (a
    # budget below max_num_seqs would leave decodes out of full steps).
    chunk = max(64, 4 * seqs)
    out = [
        ("one request at a time", "--max-num-seqs 1", {},
         "Each request has the whole engine, so a decode step is as short as it gets, but every "
         "step does one token of work. Arrivals queue behind the one running request, so time "
         "to first token grows with the queue and throughput is the single-sequence decode "
         "rate."),
        (f"static batching (B={seqs})",
         f"--max-num-seqs {seqs} --policy prefill-first --no-chunked-prefill",
         {"static_batch": seqs},
         "Requests that arrive while a batch runs wait for the whole batch to drain, its "
         "longest output included, and the batch rows of finished requests sit idle meanwhile: time "
         "to first token is the worst of the batched rows and capacity below continuous "
         "batching. No prefill ever interrupts a running batch, so its inter-token latency is "
         "the smoothest."),
        ("continuous batching, prefill-first",
         f"--max-num-seqs {seqs} --policy prefill-first --no-chunked-prefill", {},
         "A new request joins the running batch at the next step and its whole prompt is "
         "computed before anyone decodes, so time to first token is short. The price is "
         "inter-token latency: every running stream stalls for the length of each arriving "
         "prefill."),
        (f"continuous batching, decode-first + chunked prefill ({chunk})",
         f"--max-num-seqs {seqs} --policy decode-first --max-num-batched-tokens {chunk}", {},
         f"Running streams decode first and prompts fill the rest of a {chunk}-token step budget in "
         "chunks, so no step is much longer than a decode and the inter-token tail stays low. "
         "A long prompt now takes several steps to prefill, which costs time to first token."),
    ]
    for ms in WINDOWS_MS:
        out.append((f"decode-first + chunked + dynamic window {ms} ms",
                    f"--max-num-seqs {seqs} --policy decode-first --max-num-batched-tokens {chunk} "
                    f"--batch-wait-ms {ms}", {},
                    f"An idle engine waits up to {ms} ms (or {seqs} arrivals) before its first "
                    f"prefill, so requests arriving close together start as one batch; the "
                    f"wait applies only when nothing is running. At this load the engine is "
                    f"rarely idle, so the row differs from plain decode-first by about "
                    f"run-to-run noise (the window pays off for bursty, light traffic)."))
    return out


def markdown(rows: list[dict]) -> str:
    lines = [
        "| scheme | server flags | max throughput, output tok/s (req/s) | TTFT p50 ms | "
        "TTFT p99 ms | ITL p50 ms | ITL p99 ms | ok / 429 / errors |",
        "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s, sat = r["summary"], r["saturated"]
        c = s["counts"]
        lines.append(
            f"| {r['label']} | `{r['flags']}`" + (" + client batcher" if r["client"] else "") +
            f" | {sat['output_token_throughput']:.0f} ({sat['request_throughput']:.2f}) | "
            f"{s['ttft_ms']['p50']:.0f} | {s['ttft_ms']['p99']:.0f} | {s['itl_ms']['p50']:.0f} | "
            f"{s['itl_ms']['p99']:.0f} | {c['ok']} / {c['429']} / "
            f"{c['5xx'] + c['error'] + c['timeout']} |")
    lines.append("")
    for r in rows:
        lines.append(f"- **{r['label']}**: {r['why']}")
    return "\n".join(lines) + "\n"


def plot(doc: dict, source: Optional[str], path: str) -> None:
    """One row per scheme, three panels: throughput, TTFT and inter-token latency."""
    import numpy as np

    plt = plots.pyplot()
    rows = doc["rows"]
    y = np.arange(len(rows))
    fig, axes = plt.subplots(1, 3, figsize=(17, 1.8 + 0.62 * len(rows)), sharey=True)
    panels = (
        (axes[0], "throughput (output tokens/s, linear)",
         (("saturated", "output_token_throughput", f"max: all {doc['num_requests']} sent at once",
           "tab:green"),
          ("summary", "output_token_throughput", f"at {doc['rate']:g} req/s Poisson arrivals",
           "tab:olive"))),
        (axes[1], "time to first token (ms, log scale)",
         (("summary", ("ttft_ms", "p50"), "p50", "tab:blue"),
          ("summary", ("ttft_ms", "p99"), "p99", "tab:red"))),
        (axes[2], "inter-token latency (ms, log scale)",
         (("summary", ("itl_ms", "p50"), "p50", "tab:blue"),
          ("summary", ("itl_ms", "p99"), "p99", "tab:red"))))
    for ax, xlabel, bars in panels:
        shown: list[float] = []
        for off, (part, key, name, color) in zip((-0.2, 0.2), bars):
            vals = [r[part][key] if isinstance(key, str) else r[part][key[0]][key[1]]
                    for r in rows]
            drawn = ax.barh(y + off, vals, 0.4, label=name, color=color)
            ax.bar_label(drawn, labels=[plots.number(v) for v in vals], fontsize=7, padding=2)
            shown += vals
        if ax is axes[0]:
            ax.set_xlim(0, max(shown) * 1.15)  # room for the value labels
        else:
            ax.set_xscale("log")
            ax.set_xlim(plots.decade_floor(shown), max(shown) * 2.0)
        plots.plain_numbers(ax.xaxis)
        ax.set_xlabel(xlabel)
        ax.grid(axis="x", alpha=0.3)
        plots.legend_below(ax, offset=-0.1)
    axes[0].set_yticks(y, [r["label"] for r in rows], fontsize=9)
    axes[0].invert_yaxis()
    what = (f"batching schemes, one workload of {doc['num_requests']} requests: max throughput "
            f"with all sent at once; latencies at {doc['rate']:g} req/s Poisson arrivals, "
            f"from each arrival\nevery server: minivllm serve {doc['serve_common']} + the "
            f"row's flags (bench/results/{os.path.basename(path)[:-4]}.md)")
    plots.save(fig, path,
               plots.caption(source, doc, what, subject=plots.model(doc["serve_common"])))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tag", default="cpu", help="names bench/results/batching_<tag>.*")
    ap.add_argument("--serve-common", default="--dtype bfloat16 --num-blocks 2048",
                    help="flags every row's server gets (model, dtype, KV blocks)")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--rate", type=float, default=2.0, help="Poisson arrivals, requests/s")
    ap.add_argument("--prompt-len", default="uniform:32:256", help="N, fixed:N, uniform:A:B")
    ap.add_argument("--output-len", default="uniform:16:64")
    ap.add_argument("--max-num-seqs", type=int, default=16, help="batch size of the batched rows")
    ap.add_argument("--rows", default=None, help="comma list of row numbers (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--replot", default=None, metavar="JSON",
                    help="run nothing: redraw the PNG beside this committed batching JSON")
    args = ap.parse_args()
    if args.replot:
        with open(args.replot) as f:
            plot(json.load(f), args.replot, args.replot[:-len(".json")] + ".png")
        return 0
    args.prompt_spec, args.output_spec = args.prompt_len, args.output_len
    args.prompt_len, args.output_len = map(length_sampler, (args.prompt_len, args.output_len))
    # build_workload's remaining knobs: synthetic token-id prompts on /v1/completions.
    args.endpoint, args.dataset, args.token_low, args.token_high = "completions", None, 1000, 8000
    table_rows = rows(args.max_num_seqs)
    chosen = table_rows if args.rows is None else [table_rows[int(i)]
                                                   for i in args.rows.split(",")]
    workload = build_workload(args, random.Random(args.seed))
    out = []
    for label, flags, client, why in chosen:
        server = ServeProcess(shlex.split(args.serve_common) + shlex.split(flags))
        try:
            model = served_model(server.url, None)
            warm = build_workload(args, random.Random(args.seed + 7))[:2]
            asyncio.run(run_load(server.url, warm, model=model, progress=False))
            summary, _ = asyncio.run(run_load(
                server.url, workload, model=model, rate=args.rate, seed=args.seed, **client))
            # The same requests all at once: the most this scheme can do (its capacity).
            saturated, _ = asyncio.run(run_load(server.url, workload, model=model, **client))
            wait_engine_idle(server.url)
            pids = server.process_tree()
        finally:
            code = server.stop()
        left = leftovers(pids)
        print(f"\n## {label}  ({flags})")
        print_summary(summary)
        print_summary(saturated)
        print(f"   server exit {code}, left behind: {left}")
        out.append({"label": label, "flags": flags, "client": client, "why": why,
                    "summary": summary, "saturated": saturated, "server_exit": code,
                    "leftovers": left})
    base = f"bench/results/batching_{args.tag}"
    doc = {"serve_common": args.serve_common, "num_requests": args.num_requests,
           "rate": args.rate, "seed": args.seed, "rows": out, **records.context()}
    with open(base + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    table = markdown(out)
    with open(base + ".md", "w") as f:
        f.write(f"# Batching schemes, one workload ({args.tag})\n\n"
                f"`python -m bench.batching_table {' '.join(map(shlex.quote, sys.argv[1:]))}`: "
                f"{args.num_requests} requests (prompts of {args.prompt_spec} tokens, outputs of "
                f"{args.output_spec}); every server started with `{args.serve_common}`. Max "
                f"throughput: all the requests sent at once. Latencies: the same requests at "
                f"Poisson arrivals of {args.rate:g}/s, counted from each request's arrival.\n\n"
                + table)
    print("\n" + table)
    plot(doc, base + ".json", base + ".png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
