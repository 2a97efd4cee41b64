"""Plot the committed GPU offline-throughput results: output tokens/s per model, minivllm
against transformers' static and continuous batching (log scale), as a PNG; or, with
--by-batch, tokens/s per batch size from one sweep (offline_throughput --workload fixed).

    python -m bench.plot_gpu bench/results/offline_gpu_*_h100.json --out bench/results/gpu_h100.png
    python -m bench.plot_gpu --by-batch bench/results/batch_sweep_h100.json \
        --out bench/results/batch_sweep_h100.png
"""
from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", nargs="+", help="offline_throughput JSON files, one per model")
    ap.add_argument("--out", required=True)
    ap.add_argument("--by-batch", action="store_true", help="one sweep file: x = batch size")
    args = ap.parse_args()
    if args.by_batch:
        plot_by_batch(args.results[0], args.out)
        return
    engines = ["minivllm", "transformers generate", "transformers continuous batching"]
    models, values = [], {e: [] for e in engines}
    for path in args.results:
        with open(path) as f:
            records = json.load(f)
        models.append(records[0]["name"].split()[0])
        for engine in engines:
            values[engine].append(next(r["value"] for r in records
                                       if r["name"].endswith(" " + engine)))
    gpu = records[0]["machine"].get("gpu", "GPU")
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(engines)
    for i, engine in enumerate(engines):
        xs = [m + (i - 1) * width for m in range(len(models))]
        bars = ax.bar(xs, values[engine], width, label=engine)
        ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values[engine]], fontsize=8)
    ax.set_xticks(range(len(models)), models)
    ax.set_yscale("log")
    ax.set_ylabel("output tokens/s (log scale)")
    ax.set_title(f"256 ragged requests (prompt, output ~ U[100, 1024]), bf16, {gpu}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)


def plot_by_batch(path: str, out: str) -> None:
    with open(path) as f:
        records = json.load(f)
    series: dict[str, dict[int, float]] = {}
    for r in records:
        engine = "minivllm" if r["name"].endswith(" minivllm") else r["name"].split(" n=")[1] \
            .split(" ", 1)[1]
        series.setdefault(engine, {})[r["num_prompts"]] = r["value"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for engine, points in series.items():
        sizes = sorted(points)
        ax.plot(sizes, [points[b] for b in sizes], marker="o", label=engine)
        for b in sizes:
            ax.annotate(f"{points[b]:,.0f}", (b, points[b]), fontsize=7,
                        textcoords="offset points", xytext=(0, 5), ha="center")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (requests, all submitted at once)")
    ax.set_ylabel("output tokens/s (log scale)")
    model = records[0]["name"].split()[0]
    gpu = records[0]["machine"].get("gpu", "GPU")
    ax.set_title(f"{model}, 128 prompt + 128 output tokens per request, bf16, {gpu}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main()
