"""Plot the committed GPU offline-throughput results: output tokens/s per model, minivllm
against transformers' static and continuous batching (log scale), as a PNG; or, with
--by-batch, tokens/s per batch size from one sweep (offline_throughput --workload fixed).
Both read only the committed JSON, so these commands redraw the committed PNGs:

    python -m bench.plot_gpu bench/results/offline_gpu_smollm2-135m_h100.json \
        bench/results/offline_gpu_qwen2.5-0.5b_h100.json --out bench/results/gpu_h100.png
    python -m bench.plot_gpu --by-batch bench/results/batch_sweep_h100.json \
        --out bench/results/batch_sweep_h100.png
"""
from __future__ import annotations

import argparse
import json

from bench import plots

ENGINES = ("minivllm", "transformers generate", "transformers continuous batching")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", nargs="+", help="offline_throughput JSON files, one per model")
    ap.add_argument("--out", required=True)
    ap.add_argument("--by-batch", action="store_true", help="one sweep file: x = batch size")
    args = ap.parse_args()
    if args.by_batch:
        plot_by_batch(args.results[0], args.out)
    else:
        plot_by_model(args.results, args.out)


def _subject(records: list[dict]) -> str:
    """The weights and dtype every record of the plot shares."""
    dummy = {plots.dummy(r["command"]) for r in records}
    weights = plots.DUMMY if dummy == {True} else "real weights" if dummy == {False} \
        else "dummy and real weights"
    dtypes = {r["name"].split()[1] for r in records}
    return f"{weights}, {'/'.join(sorted(dtypes))}"


def plot_by_model(paths: list[str], out: str) -> None:
    models, values, records = [], {e: [] for e in ENGINES}, []
    for path in paths:
        with open(path) as f:
            recs = json.load(f)
        records += recs
        models.append(recs[0]["name"].split()[0])
        for engine in ENGINES:
            values[engine].append(next(r["value"] for r in recs
                                       if r["name"].endswith(" " + engine)))
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    width = 0.8 / len(ENGINES)
    for i, engine in enumerate(ENGINES):
        xs = [m + (i - 1) * width for m in range(len(models))]
        bars = ax.bar(xs, values[engine], width, label=engine)
        ax.bar_label(bars, labels=[plots.number(v) for v in values[engine]], fontsize=8)
    for m in range(len(models)):
        best_peer = max(values[e][m] for e in ENGINES[1:])
        ax.annotate(f"{values['minivllm'][m] / best_peer:.1f}x the best peer",
                    (m - width, values["minivllm"][m]), textcoords="offset points",
                    xytext=(0, 14), ha="center", fontsize=8, weight="bold")
    ax.set_xticks(range(len(models)), models)
    ax.set_xlabel("model")
    ax.set_yscale("log")
    everything = [v for vs in values.values() for v in vs]
    ax.set_ylim(plots.decade_floor(everything), max(everything) * 4)
    plots.plain_numbers(ax.yaxis)
    ax.set_ylabel("output tokens/s (log scale)")
    ax.grid(axis="y", alpha=0.3)
    plots.legend_below(ax, offset=-0.14)
    what = "offline throughput: 256 ragged requests at once (prompt, output ~ U[100, 1024] tokens)"
    plots.save(fig, out, plots.caption(paths, records[0], what, subject=_subject(records)),
               dpi=120)


def plot_by_batch(path: str, out: str) -> None:
    with open(path) as f:
        records = json.load(f)
    series: dict[str, dict[int, float]] = {}
    for r in records:
        engine = "minivllm" if r["name"].endswith(" minivllm") else r["name"].split(" n=")[1] \
            .split(" ", 1)[1]
        series.setdefault(engine, {})[r["num_prompts"]] = r["value"]
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for engine, points in series.items():
        sizes = sorted(points)
        ax.plot(sizes, [points[b] for b in sizes], marker="o", label=engine)
        for b in sizes:
            ax.annotate(plots.number(points[b]), (b, points[b]), fontsize=7,
                        textcoords="offset points", xytext=(0, 6), ha="center")
    sizes = sorted({b for points in series.values() for b in points})
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.minorticks_off()
    ax.set_xlabel("batch size (requests, all submitted at once)")
    ax.set_yscale("log")
    everything = [v for points in series.values() for v in points.values()]
    ax.set_ylim(plots.decade_floor(everything), max(everything) * 2)
    plots.plain_numbers(ax.yaxis)
    ax.set_ylabel("output tokens/s (log scale)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    model = records[0]["name"].split()[0]
    what = f"{model}: 128 prompt + 128 output tokens per request, offline, by batch size"
    plots.save(fig, out, plots.caption(path, records[0], what, subject=_subject(records)),
               dpi=120)


if __name__ == "__main__":
    main()
