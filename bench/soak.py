"""Soak: steady load for minutes; RSS, open fds, shm segments and KV usage must stay flat.

    python -m bench.soak --duration 600 --rate 2 --json bench/results/soak_cpu.json \
        --plot bench/results/soak_cpu.png
    python -m bench.soak --replot bench/results/soak_cpu.json   # redraw the PNG, run nothing

Open-loop Poisson load (streaming clients, a few of which hang up mid-stream, so aborts are
soaked too) against `minivllm serve --api-servers 2`, sampling every `--every` s each server
process's RSS and open file descriptors, the transport's /dev/shm segments, and the engine's
KV-cache usage and running requests. "Flat": after the first minute (allocator and caches
warming up), growth from the first to the last quarter stays under `--max-growth` (RSS) and
the fd and segment counts end where they started; the engine ends idle.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import sys
import threading
import time
from typing import Optional

from bench import plots, records
from bench.chaos.run import body, client, stream
from bench.server_proc import ServeProcess, leftovers, metrics, segments, wait_engine_idle


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def sample(srv: ServeProcess, t0: float) -> dict:
    pids = [p for p in srv.process_tree() if os.path.exists(f"/proc/{p}")]
    names = {srv.pid: "launcher", srv.engine_pid(): "engine"}
    for i, p in enumerate(sorted(srv.api_server_pids())):
        names[p] = f"api-{i}"
    row = {"t": time.monotonic() - t0, "rss_mb": {}, "fds": {}}
    for p in pids:
        if p in names:
            try:
                row["rss_mb"][names[p]] = _rss_mb(p)
                row["fds"][names[p]] = len(os.listdir(f"/proc/{p}/fd"))
            except OSError:
                pass
    row["shm_segments"] = len(segments(pids))
    m = metrics(srv.url)
    # Missing when the engine did not answer the scrape's stats call within its 2 s.
    row["kv_usage"] = m.get("minivllm:kv_cache_usage_perc")
    row["running"] = m.get("minivllm:num_requests_running")
    return row


async def load(url: str, duration: float, rate: float, timeout: float,
               hung_at: list[float]) -> dict:
    rng = random.Random(0)
    outcomes: dict[str, int] = {}
    tasks = []
    t0 = time.monotonic()

    async def one(c, leave):
        sent = time.monotonic() - t0
        o = await stream(c, body(rng.randint(8, 64)), timeout, leave_after=leave)
        outcomes[o] = outcomes.get(o, 0) + 1
        if o == "hung":
            hung_at.append(round(sent, 1))
    async with client(url, timeout) as c:
        t_end = time.monotonic() + duration
        while time.monotonic() < t_end:
            leave = rng.randint(1, 4) if rng.random() < 0.1 else -1
            tasks.append(asyncio.ensure_future(one(c, leave)))
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
    return outcomes


def plot(doc: dict, source: Optional[str], path: str) -> None:
    """RSS, open fds, KV usage and running requests against time; a series that never moves
    (the shm segments, as a rule) is named in the title with its value instead of drawn."""
    rows = doc["samples"]
    plt = plots.pyplot()
    t = [r["t"] / 60 for r in rows]
    shm = plots.constant(r["shm_segments"] for r in rows)
    fig, axes = plt.subplots(1, 3 if shm is not None else 4, figsize=(17, 5.2))
    growth = doc.get("rss_growth", {})
    for name in rows[-1]["rss_mb"]:
        for ax, key, unit in ((axes[0], "rss_mb", " MiB"), (axes[1], "fds", "")):
            ys = [r[key].get(name) for r in rows]
            flat = plots.constant(ys)
            label = name + (f", {flat:,.0f}{unit} throughout" if flat is not None else "")
            if key == "rss_mb" and flat is None and name in growth:
                label += f", {growth[name]:+.1%} first to last quarter"
            ax.plot(t, ys, label=label)
    axes[0].set_ylabel("resident memory (MiB)")
    axes[0].set_title("RSS per process")
    axes[1].set_ylabel("open file descriptors")
    axes[1].set_title("open fds per process")
    kv, run = axes[2], axes[2].twinx()
    kv.plot(t, [None if r["kv_usage"] is None else 100 * r["kv_usage"] for r in rows],
            color="tab:blue", label="KV cache used (%, left)")
    run.plot(t, [r["running"] for r in rows], color="tab:orange", alpha=0.7,
             label="running requests (right)")
    kv.set_ylabel("KV cache blocks in use (%)")
    run.set_ylabel("running requests")
    seqs = shlex.split(doc["serve"])
    cap = int(seqs[seqs.index("--max-num-seqs") + 1]) if "--max-num-seqs" in seqs else None
    run.set_ylim(0, cap or None)
    kv.set_title("engine load" + (f" (running cap: --max-num-seqs {cap})" if cap else ""))
    if shm is None:
        axes[3].plot(t, [r["shm_segments"] for r in rows])
        axes[3].set_ylabel("/dev/shm segments")
        axes[3].set_title("transport shared-memory segments")
    for ax in axes:
        ax.set_xlabel("time since start (min)")
        ax.set_ylim(bottom=0)  # zero-based: a flat line reads flat
        ax.grid(alpha=0.3)
    for ax in (*axes[:2], kv):
        handles, labels = ax.get_legend_handles_labels()
        if ax is kv:
            handles += run.get_legend_handles_labels()[0]
            labels += run.get_legend_handles_labels()[1]
        plots.legend_below(ax, handles, labels)
    said = {"left": "hung up by their client mid-stream (on purpose)"}
    outcomes = ", ".join(f"{v} {said.get(k, k)}" for k, v in doc.get("outcomes", {}).items())
    what = (f"soak: {doc['duration_s'] / 60:g} min at {doc['rate']:g} req/s Poisson "
            f"({outcomes}); minivllm serve {doc['serve']}")
    if shm is not None:
        what += f"\n/dev/shm segments: {shm} in every one of the {len(rows)} samples (not drawn)"
    plots.save(fig, path,
               plots.caption(source, doc, what, subject=plots.model(doc["serve"])))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--serve-common", default="--dtype float32 --num-blocks 1024 "
                                              "--api-servers 2 --max-num-seqs 16")
    ap.add_argument("--duration", type=float, default=600.0)
    ap.add_argument("--rate", type=float, default=2.0)
    ap.add_argument("--every", type=float, default=5.0)
    ap.add_argument("--max-growth", type=float, default=0.10, help="RSS, first to last quarter")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="PNG (default with --replot: the JSON's name)")
    ap.add_argument("--replot", default=None, metavar="JSON",
                    help="run nothing: redraw --plot from this committed soak JSON")
    args = ap.parse_args()
    if args.replot:
        with open(args.replot) as f:
            plot(json.load(f), args.replot, args.plot or args.replot[:-len(".json")] + ".png")
        return 0
    srv = ServeProcess(shlex.split(args.serve_common))
    rows: list[dict] = []
    try:
        t0 = time.monotonic()
        done = threading.Event()

        def sampler():
            while not done.wait(args.every):
                rows.append(sample(srv, t0))
        thread = threading.Thread(target=sampler, daemon=True)
        thread.start()
        hung_at: list[float] = []
        outcomes = asyncio.run(load(srv.url, args.duration, args.rate, args.timeout, hung_at))
        done.set()
        thread.join()
        wait_engine_idle(srv.url)
        rows.append(sample(srv, t0))
        pids = srv.process_tree()
    finally:
        code = srv.stop()
    left = leftovers(pids)
    steady = [r for r in rows if r["t"] >= 60] or rows
    q = max(1, len(steady) // 4)
    first, last = steady[:q], steady[-q:]

    def mean(rs, key, name):
        vals = [r[key][name] for r in rs if name in r[key]]
        return sum(vals) / len(vals) if vals else 0.0
    growth = {name: mean(last, "rss_mb", name) / mean(first, "rss_mb", name) - 1
              for name in steady[0]["rss_mb"] if mean(first, "rss_mb", name)}
    # (least during the run, at the end once idle); the end may hold one more: the scrape's
    # own connection to the API server that answered it.
    fds = {name: (min(r["fds"][name] for r in rows if name in r["fds"]),
                  rows[-1]["fds"].get(name)) for name in rows[-1]["fds"]}
    checks = {
        f"RSS growth < {args.max_growth:.0%} (first to last quarter)":
            all(g < args.max_growth for g in growth.values()),
        "fds back to their least once idle (+1 for the scrape)":
            all(end <= least + 1 for least, end in fds.values()),
        "shm segments flat": len({r["shm_segments"] for r in rows}) == 1,
        "engine idle at the end (KV 0, running 0)":
            rows[-1]["kv_usage"] == 0 and rows[-1]["running"] == 0,
        "no hung request": outcomes.get("hung", 0) == 0,
        "server exit 0, nothing left behind": code == 0 and not any(left.values()),
    }
    print(f"outcomes {outcomes}; RSS growth {({k: f'{v:+.1%}' for k, v in growth.items()})}; "
          f"fds (least, end) {fds}; shm segments {sorted({r['shm_segments'] for r in rows})}")
    for name, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    doc = {"serve": args.serve_common, "duration_s": args.duration, "rate": args.rate,
           "outcomes": outcomes, "rss_growth": growth, "fds": fds, "checks": checks,
           "hung_sent_at_s": hung_at, "server_stderr_tail": "".join(srv.stderr)[-5000:],
           "samples": rows, "server_exit": code, "left_behind": left, **records.context()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    if args.plot:
        plot(doc, args.json, args.plot)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
