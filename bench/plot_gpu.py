"""Plot the committed GPU offline-throughput results: output tokens/s per model, minivllm
against transformers' static and continuous batching (log scale), as a PNG.

    python -m bench.plot_gpu bench/results/offline_gpu_*_h100.json --out bench/results/gpu_h100.png
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
    args = ap.parse_args()
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


if __name__ == "__main__":
    main()
