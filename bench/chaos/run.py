"""Long chaos runs against a real `minivllm serve` (the fast versions are tests/test_chaos.py).

    python -m bench.chaos.run disconnect-storm --clients 1000
    python -m bench.chaos.run kill-engine --duration 90 --every 20
    python -m bench.chaos.run kill-api-server --api-servers 4 --duration 90 --every 10
    python -m bench.chaos.run sigterm --clients 64
    python -m bench.chaos.run slow-readers --clients 64 --slow 200
    python -m bench.chaos.run malformed --clients 2000
    python -m bench.chaos.run zmq-garbage --clients 5000
    python -m bench.chaos.run fuzz --clients 3000     # cases per parser (bench/chaos/fuzz.py)
    python -m bench.chaos.run flood --rounds 3 --duration 40 --rate 1   # bench/chaos/flood.py
    python -m bench.chaos.run kill-tp-rank --duration 120 --every 30 --rate 0.5  # tp_rank.py
    python -m bench.chaos.run kill-dp-engine --duration 120 --every 30 --rate 4  # dp_engine.py
    python -m bench.chaos.run all --json bench/results/chaos_cpu.json   # or several names

Each scenario starts its own server, runs, lets the dust settle, stops it (SIGTERM) and reports
requests sent / accepted (a 200 and a stream started) / completed ([DONE]) / errored (an error
event, or the connection cut by a killed process) / rejected (429 or 503 before starting) /
left (the client hung up on purpose) / hung (no end within --timeout: must be 0), then the
engine's running requests and KV-cache usage once idle (0 and 0), and after the stop the
server's leftover processes, /dev/shm segments and socket files (none).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import sys
import time
from collections import Counter
from typing import Awaitable, Callable, Optional

import httpx
import zmq

from bench.chaos import dp_engine, faults, tp_rank
from bench.chaos.flood import flood
from bench.chaos.fuzz import check_http, fuzz
from bench.server_proc import (ServeProcess, leftovers, metrics, wait_engine_idle,
                               wait_healthy)

SERVE = ["--dtype", "float32", "--num-blocks", "1024"]


def body(max_tokens: int, **extra) -> dict:
    return {"prompt": "Write a long story about a river.", "max_tokens": max_tokens,
            "ignore_eos": True, "stream": True, **extra}


async def stream(client: httpx.AsyncClient, req: dict, timeout: float,
                 leave_after: int = -1) -> str:
    """One streamed request's outcome: completed | errored | rejected | left | hung."""
    async def go() -> str:
        try:
            async with client.stream("POST", "/v1/completions", json=req) as resp:
                if resp.status_code in (429, 503):
                    return "rejected"
                if resp.status_code != 200:
                    return f"http {resp.status_code}"
                chunks, last = 0, None
                async for line in resp.aiter_lines():
                    if line.startswith("data: "):
                        last = line[6:]
                        if last != "[DONE]" and "error" in json.loads(last):
                            return "errored"
                        chunks += 1
                        if chunks == leave_after:
                            return "left"
                return "completed" if last == "[DONE]" else "errored"
        except httpx.TransportError:
            return "errored"  # the process serving it was killed
    try:
        return await asyncio.wait_for(go(), timeout)
    except asyncio.TimeoutError:
        return "hung"


def client(url: str, timeout: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, timeout=timeout, limits=httpx.Limits(
        max_connections=None, max_keepalive_connections=0))


async def poisson_load(url: str, duration: float, rate: float, max_tokens: int,
                       timeout: float, seed: int = 0) -> Counter:
    """Open-loop Poisson arrivals for `duration` s; the outcome of every request."""
    rng = random.Random(seed)
    tasks = []
    async with client(url, timeout) as c:
        t_end = time.monotonic() + duration
        while time.monotonic() < t_end:
            tasks.append(asyncio.ensure_future(stream(c, body(rng.randint(8, max_tokens)),
                                                      timeout)))
            await asyncio.sleep(rng.expovariate(rate))
        return Counter(await asyncio.gather(*tasks))


def under_load(srv: ServeProcess, args, fault: Callable[[], Awaitable[None]],
               max_tokens: int) -> Counter:
    """Poisson load (--duration, --rate) while the coroutine `fault()` runs; the outcomes."""
    async def go():
        k = asyncio.ensure_future(fault())
        outcomes = await poisson_load(srv.url, args.duration, args.rate, max_tokens,
                                      args.timeout)
        await k
        return outcomes
    return asyncio.run(go())


# ---- scenarios: each returns its outcome counter (and extra facts) ---------------------------
def disconnect_storm(srv: ServeProcess, args) -> dict:
    """`clients` streams at once; each hangs up after 1..5 chunks (some before a token)."""
    rng = random.Random(1)
    before = metrics(srv.url).get("minivllm:requests_aborted_total", 0)

    async def go():
        async with client(srv.url, args.timeout) as c:
            return Counter(await asyncio.gather(*(
                stream(c, body(500), args.timeout, leave_after=rng.randint(1, 5))
                for _ in range(args.clients))))
    outcomes = asyncio.run(go())
    wait_engine_idle(srv.url, timeout=args.timeout)
    return {"outcomes": outcomes,
            "aborted_by_server": metrics(srv.url)["minivllm:requests_aborted_total"] - before}


def kill_engine(srv: ServeProcess, args) -> dict:
    """Poisson load; SIGKILL the engine every `every` s; the supervisor restarts it."""
    kills = []

    async def killer():
        await asyncio.sleep(args.every)
        while len(kills) < max(1, int(args.duration // args.every) - 1):
            pid = srv.engine_pid()
            os.kill(pid, signal.SIGKILL)
            kills.append(pid)
            await asyncio.to_thread(wait_healthy, srv.url, 180, pid)
            await asyncio.sleep(args.every)

    outcomes = under_load(srv, args, killer, 64)
    wait_engine_idle(srv.url, timeout=args.timeout)
    return {"outcomes": outcomes, "engines_killed": len(kills),
            "killed_engines_left": leftovers(kills)}


def kill_api_server(srv: ServeProcess, args) -> dict:
    """Poisson load over N API servers; SIGKILL a random one every `every` s."""
    rng = random.Random(2)
    kills = []

    async def killer():
        t_end = time.monotonic() + args.duration - args.every
        while time.monotonic() < t_end:
            await asyncio.sleep(args.every)
            pids = srv.api_server_pids()
            victim = rng.choice(pids)
            os.kill(victim, signal.SIGKILL)
            kills.append(victim)

    outcomes = under_load(srv, args, killer, 64)
    deadline = time.monotonic() + 120
    while len(srv.api_server_pids()) < args.api_servers and time.monotonic() < deadline:
        time.sleep(0.5)
    wait_engine_idle(srv.url, timeout=args.timeout)
    return {"outcomes": outcomes, "api_servers_killed": len(kills),
            "api_servers_after": len(srv.api_server_pids()),
            "killed_servers_left": leftovers(kills)}


def sigterm(srv: ServeProcess, args) -> dict:
    """`clients` streams in flight, then SIGTERM: they finish, later ones get 503, exit 0."""
    async def go():
        async with client(srv.url, args.timeout) as c:
            in_flight = [asyncio.ensure_future(stream(c, body(48), args.timeout))
                         for _ in range(args.clients)]
            await asyncio.sleep(2.0)
            srv.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            late = [asyncio.ensure_future(stream(c, body(8), args.timeout)) for _ in range(8)]
            return Counter(await asyncio.gather(*in_flight)), Counter(
                await asyncio.gather(*late))
    outcomes, late = asyncio.run(go())
    return {"outcomes": outcomes, "sent_after_sigterm": late, "stopped": True}


def slow_readers(srv: ServeProcess, args) -> dict:
    """`slow` clients that never read their stream, `clients` normal ones alongside; then
    SIGTERM with the slow ones still connected: the server must still exit."""
    readers = [_slow_reader(srv.url) for _ in range(args.slow)]
    try:
        outcomes = asyncio.run(poisson_load(srv.url, args.duration, args.rate, 32,
                                            args.timeout))
        # Before the stop: their requests are running. The stop must not wait for them.
        t0 = time.monotonic()
        code = srv.stop(timeout=args.timeout)
        return {"outcomes": outcomes, "slow_readers": args.slow, "stopped": True,
                "server_exit": code, "stop_s": round(time.monotonic() - t0, 1)}
    finally:
        for r in readers:
            r.close()


# A slow reader's tokens: 64 of them hold ~640 of the 1,024 KV blocks (SERVE), so the load
# beside them finds room. At 2,000 tokens (as until 2026-12-05) they needed 8x the cache and
# the load queued behind them for blocks, first come first served, for minutes (44 of 124
# requests past the 300-s timeout, at 24013f3 too): KV capacity, which 64 fast readers of
# 2,000 tokens would exhaust alike, not slow reading. Their output still overflows the socket
# buffers (150 tokens with logprobs, ~75 KB against a 2-KB receive buffer).
SLOW_READER_TOKENS = 150


def _slow_reader(url: str) -> socket.socket:
    host, port = url[len("http://"):].rsplit(":", 1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.connect((host, int(port)))
    payload = json.dumps(body(SLOW_READER_TOKENS, logprobs=5)).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                 b"\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload))
    return sock


def malformed(srv: ServeProcess, args) -> dict:
    """`clients` requests with random damage (truncated, bit-flipped, wrong types, oversized),
    then real requests: every answer a 4xx in OpenAI's shape (or a good 200), no 5xx, no cut
    connection, and the engine still serves. One example of each wrong answer is kept."""
    rng = random.Random(3)
    good = json.dumps(body(4, stream=False)).encode()

    def damage() -> bytes:
        kind = rng.randrange(5)
        if kind == 0:
            return good[:rng.randrange(len(good))]
        if kind == 1:
            b = bytearray(good)
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            return bytes(b)
        if kind == 2:
            return rng.randbytes(rng.randint(0, 4096))
        if kind == 3:  # a wrong value (max_tokens None would be a valid, 8k-token request)
            doc = json.loads(good)
            key = rng.choice(list(doc))
            doc[key] = rng.choice([-1, 2 ** 70, "x", [], {}, 1.5, True] +
                                  ([None] if key != "max_tokens" else []))
            return json.dumps(doc).encode()
        return b'{"prompt": "' + b"a" * ((8 << 20) + rng.randint(1, 1000)) + b'"}'

    async def go():
        statuses, wrong = Counter(), {}
        async with client(srv.url, args.timeout) as c:
            sem = asyncio.Semaphore(32)

            async def one():
                payload = damage()
                async with sem:
                    try:
                        r = await c.post("/v1/completions", content=payload,
                                         headers={"Content-Type": "application/json"})
                    except httpx.TransportError as exc:
                        statuses[type(exc).__name__] += 1
                        wrong.setdefault(type(exc).__name__, repr(payload[:120]))
                        return
                statuses[r.status_code] += 1
                verdict = check_http("POST", "/v1/completions", payload, r)
                if verdict is not None:
                    wrong.setdefault(verdict, f"{payload[:120]!r} -> {r.text[:200]}")
            await asyncio.gather(*(one() for _ in range(args.clients)))
            return statuses, wrong, Counter(await asyncio.gather(
                *(stream(c, body(8), args.timeout) for _ in range(8))))
    statuses, wrong, after = asyncio.run(go())
    wait_engine_idle(srv.url, timeout=args.timeout)
    return {"outcomes": after, "damaged_statuses": dict(statuses), "wrong_answers": wrong,
            "5xx": sum(n for s, n in statuses.items() if isinstance(s, int) and s >= 500),
            "scenario_ok": not wrong}


def zmq_garbage(srv: ServeProcess, args) -> dict:
    """`clients` random multipart messages from every socket type, and raw TCP garbage, at the
    engine's ZeroMQ endpoint while HTTP load runs: the engine keeps serving, same pid."""
    engine = srv.engine_pid()
    endpoint = srv.args[srv.args.index("--zmq-endpoint") + 1]
    host, port = endpoint[len("tcp://"):].rsplit(":", 1)
    rng = random.Random(4)

    def garbage() -> None:
        ctx = zmq.Context()
        try:
            for i in range(args.clients):
                sock = ctx.socket(rng.choice([zmq.DEALER, zmq.REQ, zmq.PUSH, zmq.PAIR]))
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(endpoint)
                try:
                    sock.send_multipart([os.urandom(rng.choice([0, 1, 7, 64, 1000, 70000]))
                                         for _ in range(rng.randint(1, 4))], zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
                sock.close()
                if i % 10 == 0:
                    with socket.create_connection((host, int(port))) as raw:
                        raw.sendall(os.urandom(rng.randint(1, 5000)))
        finally:
            ctx.term()

    async def go():
        load = asyncio.ensure_future(poisson_load(srv.url, args.duration, args.rate, 32,
                                                  args.timeout))
        await asyncio.to_thread(garbage)
        return await load
    outcomes = asyncio.run(go())
    wait_engine_idle(srv.url, timeout=args.timeout)
    return {"outcomes": outcomes, "same_engine": srv.engine_pid() == engine}


SCENARIOS = {
    "disconnect-storm": (disconnect_storm, []),
    "kill-engine": (kill_engine, []),
    "kill-api-server": (kill_api_server, None),  # --api-servers N
    "sigterm": (sigterm, ["--drain-timeout", "120"]),
    "slow-readers": (slow_readers, ["--drain-timeout", "10"]),
    "malformed": (malformed, []),
    "zmq-garbage": (zmq_garbage, None),           # --zmq-endpoint
    "fuzz": (fuzz, None),                         # --zmq-endpoint
    "flood": (flood, None),                       # --zmq-endpoint
    **faults.SCENARIOS,  # issue 16: process deaths and shutdowns
    **tp_rank.SCENARIOS,  # issue 27: a tensor-parallel rank killed
    **dp_engine.SCENARIOS,  # issue 28: one data-parallel engine killed
}


def run(name: str, args) -> dict:
    fn, extra = SCENARIOS[name]
    if name == "kill-api-server":
        extra = ["--api-servers", str(args.api_servers)]
    elif name in ("zmq-garbage", "fuzz", "flood"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            extra = ["--zmq-endpoint", f"tcp://127.0.0.1:{s.getsockname()[1]}"]
    srv = ServeProcess(SERVE + ["--max-pending", str(max(1024, args.clients))] + extra,
                       env=getattr(fn, "serve_env", None))
    try:
        pids = srv.process_tree()
        t0 = time.monotonic()
        report = fn(srv, args)
        report["seconds"] = round(time.monotonic() - t0, 1)
        if not report.get("stopped"):
            idle = metrics(srv.url)
            report["running_after"] = idle["minivllm:num_requests_running"]
            report["kv_usage_after"] = idle["minivllm:kv_cache_usage_perc"]
            pids = sorted(set(pids) | set(srv.process_tree()))  # restarted processes too
            report["server_exit"] = srv.stop(timeout=args.timeout)
        else:
            report.setdefault("server_exit", srv.proc.wait(args.timeout))
    except BaseException:
        srv.kill()
        raise
    report["left_behind"] = leftovers(pids)
    outcomes = report["outcomes"]
    report["outcomes"] = dict(outcomes)
    report["sent"] = sum(outcomes.values())
    report["accepted"] = report["sent"] - outcomes.get("rejected", 0)
    report["hung"] = outcomes.get("hung", 0)
    report["ok"] = (report["hung"] == 0 and report["server_exit"] == 0
                    and report.get("kv_usage_after", 0) == 0
                    and report.get("running_after", 0) == 0
                    and not any(report["left_behind"].values())
                    and report.get("5xx", 0) == 0 and report.get("same_engine", True)
                    and not any(k.startswith("http 5") for k in outcomes)
                    and report.get("scenario_ok", True))
    return report


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("scenario", nargs="+", choices=[*SCENARIOS, "all"])
    ap.add_argument("--clients", type=int, default=None,
                    help="default: 1000 for disconnect-storm and malformed, 64 otherwise")
    ap.add_argument("--slow", type=int, default=64, help="slow readers (slow-readers)")
    ap.add_argument("--duration", type=float, default=60.0, help="s of load")
    ap.add_argument("--rate", type=float, default=2.0, help="requests/s of the load")
    ap.add_argument("--every", type=float, default=15.0, help="s between kills")
    ap.add_argument("--rounds", type=int, default=3, help="quiet/flooded window pairs (flood)")
    ap.add_argument("--api-servers", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=300.0, help="per request: past it, hung")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    names = list(SCENARIOS) if "all" in args.scenario else args.scenario
    reports, clients = {}, args.clients
    for name in names:
        args.clients = clients or (1000 if name in ("disconnect-storm", "malformed") else 64)
        print(f"== {name}", file=sys.stderr, flush=True)
        reports[name] = run(name, args)
        print(json.dumps({name: reports[name]}, indent=1), flush=True)
    if args.json:
        from bench import records

        with open(args.json, "w") as f:
            json.dump({"scenarios": reports, **records.context()}, f, indent=1)
    return 0 if all(r["ok"] for r in reports.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
