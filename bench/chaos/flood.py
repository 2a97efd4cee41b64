"""Flood: a hostile peer on the ZeroMQ endpoint while HTTP clients are served (issue 18), run
by bench/chaos/run.py:

    python -m bench.chaos.run flood --rounds 3 --duration 40 --rate 1 \
        --json bench/results/flood_cpu.json

One `minivllm serve --zmq-endpoint tcp://127.0.0.1:PORT` serves a seeded Poisson HTTP workload
(streamed completions, TTFT measured by the client) in `rounds` pairs of windows: alone, then
the same requests while a second process (`python -m bench.chaos.flood`) floods the endpoint
with
  - submits as fast as the endpoint takes them, each asking 256 tokens, never reading an
    answer (PROTOCOL.md: at most --zmq-max-in-flight-per-peer are admitted, the rest get
    OVERLOADED);
  - frames announcing 1 GiB, written as ZMTP by hand over TCP (the 1 GiB is never made): the
    engine must drop each connection after its frame header (2 a second);
  - junk frames of random bytes, 50 from each fresh connection (500 a second).
The flooder's own sending is paced (on 2 cores its CPU would be the engine's); its submits are
not: they go as fast as the endpoint's backpressure lets them.
It passes when the HTTP TTFT p99 with the flood stays within 1.2x of without, the engine keeps
its pid, its memory stays bounded, and every HTTP request ends. The flooded requests are also
reported split by arrival: before the engine found the flooder gone (its unread records filled
its send queue; until then its admitted requests share every step) and after.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

import zmq

from bench.server_proc import zmq_status
from minivllm.sampling_params import SamplingParams
from minivllm.transport import protocol

TTFT_RATIO_BOUND = 1.2
HUGE = 1 << 30
FLOOD_PROMPT = [1, 4093, 3060, 314, 4649, 30]
FLOOD_TOKENS = 256  # each admitted flood request's length
HUGE_PER_S, JUNK_PER_S = 2, 500  # the flooder's own CPU is not the engine's to bound


# ---- the flooder (a process of its own) --------------------------------------------------------
def _zmtp_huge_frame(host: str, port: int, timeout: float) -> int:
    """Open a raw TCP connection, greet as a ZMTP 3.0 DEALER (NULL mechanism), announce a 1 GiB
    message and stream zeros until the engine hangs up; the bytes it took before it did."""
    greeting = b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + \
        b"\0" + b"\0" * 31
    props = b"\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"
    ready = b"\x05READY" + props
    header = greeting + b"\x04" + bytes([len(ready)]) + ready + b"\x02" + struct.pack(">Q", HUGE)
    sent = 0
    chunk = bytes(1 << 16)
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(header)
        try:
            while sent < HUGE:
                sent += s.send(chunk)
        except OSError:  # reset or broken pipe: the engine dropped us
            return sent
    return sent


def flooder(endpoint: str, out: str) -> None:
    """Flood until SIGTERM, then write what was sent to `out`."""
    import signal

    host, port = endpoint[len("tcp://"):].rsplit(":", 1)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    report = {"submits_sent": 0, "huge_frames": 0, "huge_bytes_taken_max": 0, "junk_frames": 0}
    ctx = zmq.Context()

    def submits() -> None:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDTIMEO, 100)
        sock.connect(endpoint)
        params = SamplingParams(temperature=0, max_tokens=FLOOD_TOKENS, ignore_eos=True)
        rid = 0
        while not stop.is_set():
            try:
                sock.send(protocol.encode_submit(rid, FLOOD_PROMPT, params))
                rid += 1
            except zmq.Again:  # the endpoint pushes back: its queue for us is full
                pass
        report["submits_sent"] = rid
        sock.close()

    def huge() -> None:
        while not stop.is_set():
            taken = _zmtp_huge_frame(host, int(port), timeout=30)
            report["huge_frames"] += 1
            report["huge_bytes_taken_max"] = max(report["huge_bytes_taken_max"], taken)
            stop.wait(1 / HUGE_PER_S)

    def junk() -> None:
        rng = random.Random(5)
        while not stop.is_set():
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
            for _ in range(50):
                sock.send(os.urandom(rng.choice([1, 16, 64, 1000, 60000])))
            report["junk_frames"] += 50
            sock.close()
            stop.wait(50 / JUNK_PER_S)

    threads = [threading.Thread(target=f) for f in (submits, huge, junk)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ctx.term()
    with open(out, "w") as f:
        json.dump(report, f)


# ---- the scenario (run.py) ---------------------------------------------------------------------
def _until_settled(endpoint: str, timeout: float) -> None:
    """Until the engine has read what a gone flooder left in the kernel's and ZeroMQ's buffers
    (nothing running, its counters still for a second): else the next quiet window pays."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        now = {k: v for k, v in zmq_status(endpoint).items()
               if k in ("requests", "overloaded", "errors", "running")}
        if now == last and now["running"] == 0:
            return
        assert time.monotonic() < deadline, f"the engine was still reading the flood: {now}"
        last = now
        time.sleep(1.0)


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def _load(srv, args, seed: int) -> list:
    """The seeded Poisson HTTP workload for args.duration s; every request's Result."""
    import asyncio

    from bench.serve_load import Request, run_load, served_model

    rng = random.Random(seed)
    n = max(1, int(args.duration * args.rate))
    workload = [Request(" ".join(rng.choice(["river", "stone", "light", "wind", "tree"])
                                 for _ in range(rng.randint(8, 48))), None, 0,
                        rng.randint(8, 32)) for _ in range(n)]
    _, results = asyncio.run(run_load(srv.url, workload, model=served_model(srv.url, None),
                                      rate=args.rate, seed=seed, timeout=args.timeout,
                                      progress=False))
    return results


def _watch_gone(endpoint: str, aborted: int, stop: threading.Event, found: list) -> None:
    """Append the time.perf_counter() at which the engine found the flooder gone (it never
    reads: its send queue filled), seen as its admitted requests' aborts (no HTTP client of
    this scenario aborts)."""
    while not stop.wait(0.25):
        if zmq_status(endpoint)["aborted"] > aborted:
            found.append(time.perf_counter())
            return


def _flooded(srv, args, endpoint: str, seed: int) -> tuple[list, dict, dict, float]:
    """The workload while a flooder process runs: results, the flooder's report, the engine's
    status during the flood, when the flooder was found gone (perf_counter; inf: never)."""
    out = os.path.join(tempfile.gettempdir(), f"flood-{os.getpid()}.json")
    before = zmq_status(endpoint)
    peer = subprocess.Popen([sys.executable, "-m", "bench.chaos.flood", endpoint, "--out", out])
    stop, found = threading.Event(), []
    watcher = threading.Thread(target=_watch_gone, args=(endpoint, before["aborted"], stop, found))
    try:
        watcher.start()
        deadline = time.monotonic() + args.timeout
        while zmq_status(endpoint)["overloaded"] == before["overloaded"]:  # under way
            assert time.monotonic() < deadline, "no flood arrived"
            assert peer.poll() is None, f"the flooder exited with {peer.returncode}"
            time.sleep(0.2)
        results = _load(srv, args, seed)
        during = zmq_status(endpoint)
    finally:
        stop.set()
        watcher.join()
        peer.terminate()
        peer.wait(args.timeout)
        _until_settled(endpoint, args.timeout)
    with open(out) as f:
        report = json.load(f)
    os.unlink(out)
    return results, report, during, found[0] if found else math.inf


def flood(srv, args) -> dict:
    """`rounds` x (the workload alone, then under a flood), TTFTs pooled per condition: the
    alternation spreads the machine's other load over both."""
    from collections import Counter

    from bench.serve_load import summarize
    from bench.server_proc import wait_engine_idle

    endpoint = srv.args[srv.args.index("--zmq-endpoint") + 1]
    engine = srv.engine_pid()
    _load(srv, argparse.Namespace(duration=4, rate=1, timeout=args.timeout), seed=99)  # warm
    quiet, flooded, reports = [], [], []
    before_gone, after_gone = [], []  # flooded requests by arrival: the flooder found gone?
    load_start = os.getloadavg()[0]
    rss = {"before": _rss_mb(engine), "max_during": 0.0}
    for r in range(args.rounds):
        quiet += _load(srv, args, seed=r)
        start = time.perf_counter()
        results, report, during, gone = _flooded(srv, args, endpoint, seed=r)
        flooded += results
        before_gone += [x for x in results if x.arrived < gone]
        after_gone += [x for x in results if x.arrived >= gone]
        reports.append({**report, "engine_status_during": during,
                        "found_gone_after_s": round(gone - start, 2) if gone < math.inf
                        else None})
        rss["max_during"] = max(rss["max_during"], _rss_mb(engine))
        wait_engine_idle(srv.url, timeout=args.timeout)
    q = summarize(quiet, args.duration * args.rounds, None, None)
    f = summarize(flooded, args.duration * args.rounds, None, None)
    ratio = f["ttft_ms"]["p99"] / q["ttft_ms"]["p99"]
    outcomes = Counter({"completed": q["counts"]["ok"] + f["counts"]["ok"],
                        "errored": q["counts"]["error"] + f["counts"]["error"],
                        "rejected": q["counts"]["429"] + f["counts"]["429"],
                        "hung": q["counts"]["timeout"] + f["counts"]["timeout"]})
    split = {name: {"requests": len(part), "ttft_ms": summarize(part, 1, None, None)["ttft_ms"]}
             for name, part in (("before", before_gone), ("after", after_gone)) if part}
    return {"outcomes": outcomes, "same_engine": srv.engine_pid() == engine,
            "rounds": args.rounds, "window_s": args.duration, "http_rate": args.rate,
            "ttft_ms_quiet": q["ttft_ms"], "ttft_ms_flooded": f["ttft_ms"],
            "ttft_p99_ratio": round(ratio, 3),
            # While the flooder's admitted requests run (until its unread records fill its
            # send queue, found_gone_after_s) and after: the quota's cost against the flood's.
            "ttft_ms_flooded_by_arrival_vs_flooder_found_gone": split,
            "tpot_ms_quiet": q["tpot_ms"],
            "tpot_ms_flooded": f["tpot_ms"], "flooders": reports,
            "engine_rss_mb": {k: round(v) for k, v in rss.items()},
            "machine_loadavg_1m": {"start": load_start, "end": os.getloadavg()[0]},
            "scenario_ok": ratio <= TTFT_RATIO_BOUND and outcomes["errored"] == 0
            and all(r["huge_bytes_taken_max"] < 64 << 20 for r in reports)}


def main() -> int:
    ap = argparse.ArgumentParser(description="the flooding peer (run.py's flood starts it)")
    ap.add_argument("endpoint")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    flooder(args.endpoint, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
