"""/health latency of an API server while it tokenizes an 8 MB body: one long input must not
stall the event loop that every request of that server shares (issue 17, item 1).

    python -m bench.health_during_tokenize --json bench/results/health_during_tokenize_cpu.json

One `minivllm serve` with one API server. A poller process sends GET /health every 10 ms, each
on a new connection as health checkers do, and keeps every latency; meanwhile this process sends, one at a time
and `--repeats` times each, a body just under the 8 MiB limit to every endpoint that encodes or
decodes it: /tokenize (English text: the README, repeated), /v1/completions and
/v1/chat/completions (the same text as the prompt: too long for the context, so it is counted
and refused), /detokenize (the text's ids, as many as fit). A record per workload gives the
largest /health latency seen while its bodies were in flight (first byte sent to last byte of
the answer), with p50 and p99 and the latency at idle as the peer.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Optional

import httpx
import numpy as np

from bench import records
from bench.server_proc import ServeProcess

BODY_BYTES = (8 << 20) - 1024  # just under the default --max-body-bytes
POLL_S = 0.01


def _poll(url: str, stop, out) -> None:
    """In its own process (no GIL shared with the sender): (start time, latency) of each
    /health, sent back when `stop` is set."""
    samples = []
    with httpx.Client(base_url=url, timeout=120,
                      limits=httpx.Limits(max_keepalive_connections=0)) as client:
        while not stop.is_set():
            t = time.monotonic()
            client.get("/health").raise_for_status()
            samples.append((t, time.monotonic() - t))
            time.sleep(POLL_S)
    out.send(samples)


def _fit(make_body, items) -> bytes:
    """The largest body make_body(items[:n]) under BODY_BYTES (`items`: a str or a list)."""
    lo, hi = 1, len(items)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(make_body(items[:mid])) <= BODY_BYTES:
            lo = mid
        else:
            hi = mid - 1
    return make_body(items[:lo])


def workloads(url: str) -> dict[str, tuple[str, bytes]]:
    """name -> (path, body), each body just under BODY_BYTES."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    text = readme * (BODY_BYTES // len(readme) + 1)
    prompt = _fit(lambda t: json.dumps({"prompt": t}).encode(), text)
    ids = httpx.post(url + "/tokenize", content=prompt, timeout=600).json()["tokens"]
    return {"/tokenize": ("/tokenize", prompt),
            "/v1/completions": ("/v1/completions", _fit(
                lambda t: json.dumps({"prompt": t, "max_tokens": 16}).encode(), text)),
            "/v1/chat/completions": ("/v1/chat/completions", _fit(
                lambda t: json.dumps({"messages": [{"role": "user", "content": t}],
                                      "max_tokens": 16}).encode(), text)),
            "/detokenize": ("/detokenize", _fit(
                lambda i: json.dumps({"tokens": i}).encode(), ids))}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--idle-s", type=float, default=3.0, help="polling before the first body")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    srv = ServeProcess(["--dtype", "float32", "--num-blocks", "1024"])
    try:
        work = workloads(srv.url)
        ctx = mp.get_context("spawn")
        stop, (receive, send) = ctx.Event(), ctx.Pipe(duplex=False)
        poller = ctx.Process(target=_poll, args=(srv.url, stop, send))
        poller.start()
        time.sleep(args.idle_s)
        idle_end, windows = time.monotonic(), []
        with httpx.Client(base_url=srv.url, timeout=600) as client:
            for _ in range(args.repeats):
                for name, (path, body) in work.items():
                    t0 = time.monotonic()
                    status = client.post(path, content=body).status_code
                    windows.append((name, t0, time.monotonic(), status, len(body)))
                    time.sleep(0.5)
        stop.set()
        samples = receive.recv()
        poller.join()
    finally:
        srv.stop()
    idle = np.array([lat for t, lat in samples if t < idle_end]) * 1e3
    recs = [records.record("health latency at idle, max", float(idle.max()), "ms",
                           p50_ms=float(np.percentile(idle, 50)), polls=len(idle))]
    for name in work:
        mine = [w for w in windows if w[0] == name]
        # a poll that started before the body's answer came and ended after its first byte
        lat = np.array([lat for t, lat in samples
                        if any(t0 < t + lat and t < t1 for _, t0, t1, _, _ in mine)]) * 1e3
        recs.append(records.record(
            f"health latency during {name} of an 8 MB body, max", float(lat.max()), "ms",
            peer=float(idle.max()), peer_name="idle", p50_ms=float(np.percentile(lat, 50)),
            p99_ms=float(np.percentile(lat, 99)), polls=len(lat),
            statuses=sorted({w[3] for w in mine}), body_bytes=mine[0][4],
            request_s=[round(t1 - t0, 2) for _, t0, t1, _, _ in mine]))
    load = os.getloadavg()[0]  # the CPU is shared: what else ran says what the figures mean
    records.write(args.json, [dict(r, load_avg_1m=load) for r in recs])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
