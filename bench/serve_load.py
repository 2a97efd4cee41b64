"""Serving load generator for any OpenAI-compatible endpoint (minivllm, vLLM, ...).

    python -m bench.serve_load --url http://127.0.0.1:8000 --rate 4 --num-requests 200
    python -m bench.serve_load --serve-args "--max-num-seqs 16 --dtype float32" \
        --rate 1,2,4,8 --prompt-len uniform:64:256 --output-len 64 \
        --slo-ttft-ms 2000 --slo-tpot-ms 200 --json out.json --plot out.png

Arrivals are open loop (a request is sent at its arrival time whether or not earlier ones have
finished, as users do): Poisson (`--arrival poisson`) or evenly spaced (`fixed`) at `--rate`
requests/s, `--rate inf` for all at once, `--burst K` for K requests arriving together at each
arrival. `--max-concurrency C` caps requests in flight (later arrivals queue in the client).
`--static-batch B` puts a static batcher in front of the server: the requests that have arrived
(up to B) are sent together and no other is sent until all of them have finished (with
`--rate inf`: closed-loop batches of B). Latencies count from the arrival, so they include any
queueing in the client (also reported on its own, as `queued`; `--latency-from send` leaves
it out).

Every request streams (SSE) and every chunk is timestamped on arrival: TTFT (send to first
token), ITL (gap between token chunks, pooled), TPOT ((E2E - TTFT) / (tokens - 1), per
request) and E2E, p50/p90/p99; request and token throughput; goodput (requests/s that met
`--slo-ttft-ms` and `--slo-tpot-ms`); counts of ok / 429 / 5xx / other errors / timeouts.
`--rate a,b,c` sweeps rates; `--plot` draws latency percentiles against rate, and
`--replot out.json --plot out.png` redraws it from the JSON without sending anything.

Prompts: `--prompt-len` and `--output-len` take `N`, `fixed:N` or `uniform:A:B` (tokens);
completions prompts are token ids (exact lengths on any server), chat prompts are words (about
one token each). `--dataset file.jsonl` takes prompts from a file instead, one JSON object a
line with `prompt` (text or token ids) or `messages`, or `prompt_len`; and `output_len` (or
`max_tokens`). `ignore_eos` is sent so output lengths are what was asked (a vLLM extension;
`--no-ignore-eos` for servers that refuse it).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence, Union
from urllib.parse import urlsplit

import httpx
import numpy as np

PERCENTILES = (50, 90, 99)
_WORDS = ("time person year way day thing man world life hand part child eye woman place work "
          "week case point number group problem fact water river stone light house story").split()


# ---- the workload ---------------------------------------------------------------------------
@dataclass
class Request:
    prompt: Union[str, list[int], None]   # text or token ids (completions)
    messages: Optional[list[dict]]        # chat
    prompt_len: int                       # tokens (approximate for text)
    output_len: int


def length_sampler(spec: str):
    """`N`, `fixed:N` or `uniform:A:B` (inclusive) as a function rng -> int."""
    parts = spec.split(":")
    try:
        if len(parts) == 1 or (parts[0] == "fixed" and len(parts) == 2):
            n = int(parts[-1])
            if n < 1:
                raise ValueError
            return lambda rng: n
        if parts[0] == "uniform" and len(parts) == 3:
            lo, hi = int(parts[1]), int(parts[2])
            if not 1 <= lo <= hi:
                raise ValueError
            return lambda rng: rng.randint(lo, hi)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"a length is N, fixed:N or uniform:A:B with 1 <= A <= B; "
                                     f"got {spec!r}")


def synthetic_prompt(rng: random.Random, n: int, chat: bool, token_range: tuple[int, int]):
    if chat:
        return None, [{"role": "user", "content": " ".join(rng.choice(_WORDS) for _ in range(n))}]
    return [rng.randrange(*token_range) for _ in range(n)], None


def build_workload(args, rng: random.Random) -> list[Request]:
    chat = args.endpoint == "chat"
    token_range = (args.token_low, args.token_high)
    if args.dataset:
        with open(args.dataset) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if not rows:
            raise SystemExit(f"{args.dataset} has no requests")
        out = []
        for i in range(args.num_requests):
            row = rows[i % len(rows)]
            output_len = int(row.get("output_len") or row.get("max_tokens") or
                             args.output_len(rng))
            if "messages" in row or "prompt" in row:
                prompt, messages = row.get("prompt"), row.get("messages")
                if chat and messages is None:
                    if not isinstance(prompt, str):
                        raise SystemExit(f"{args.dataset}: token-id prompts need "
                                         f"--endpoint completions")
                    messages = [{"role": "user", "content": prompt}]
                elif not chat and prompt is None:  # a conversation sent as plain text
                    prompt = "\n".join(str(m.get("content") or "") for m in messages)
                out.append(Request(prompt, messages, len(prompt) if isinstance(prompt, list)
                                   else 0, output_len))
            else:
                n = int(row["prompt_len"])
                prompt, messages = synthetic_prompt(rng, n, chat, token_range)
                out.append(Request(prompt, messages, n, output_len))
        return out
    out = []
    for _ in range(args.num_requests):
        n = args.prompt_len(rng)
        prompt, messages = synthetic_prompt(rng, n, chat, token_range)
        out.append(Request(prompt, messages, n, args.output_len(rng)))
    return out


def arrival_times(n: int, rate: float, process: str, burst: int, rng: random.Random) -> list[float]:
    """Send times (s from the start) of n requests: groups of `burst` arriving together, the
    groups at `rate / burst` per second, Poisson or evenly spaced."""
    if math.isinf(rate):
        return [0.0] * n
    group_rate = rate / burst
    times, t = [], 0.0
    while len(times) < n:
        times.extend([t] * min(burst, n - len(times)))
        t += rng.expovariate(group_rate) if process == "poisson" else 1.0 / group_rate
    return times


# ---- one streaming client -------------------------------------------------------------------
@dataclass
class Result:
    status: str = "error"        # ok | 429 | 5xx | error | timeout
    http_status: int = 0
    queued_s: float = 0.0        # waiting in the client (concurrency cap, static batch)
    arrived: float = 0.0         # time.perf_counter() at its arrival
    ttft_s: Optional[float] = None
    e2e_s: Optional[float] = None
    chunk_times: list[float] = field(default_factory=list)  # token chunks, s after the send
    output_tokens: int = 0
    prompt_tokens: int = 0
    detail: str = ""

    @property
    def tpot_s(self) -> Optional[float]:
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def _body(req: Request, model: str, chat: bool, ignore_eos: bool) -> dict:
    body = {"model": model, "max_tokens": req.output_len, "stream": True, "temperature": 0.0,
            "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True
    if chat:
        body["messages"] = req.messages
    else:
        body["prompt"] = req.prompt
    return body


def _token_chunk(choice: dict) -> bool:
    """Whether an SSE choice carries generated output: not the chat stream's role-only head,
    not a bare finish marker."""
    text = choice.get("text")
    if text is None:
        delta = choice.get("delta") or {}
        text = delta.get("content")
        if "role" in delta and not text:
            return False
    return bool(text) or (choice.get("finish_reason") is None and text is not None) or \
        bool(choice.get("logprobs"))


class _Events:
    """A stream's SSE `data:` payloads applied to its Result, whichever client read them."""

    def __init__(self, res: Result, t0: float) -> None:
        self.res, self.t0 = res, t0
        self.done = self.failed = False
        self.final_at: Optional[float] = None

    def data(self, data: str) -> bool:
        """One payload; False once the stream is over ([DONE], or an error event)."""
        res = self.res
        if data == "[DONE]":
            self.done = True
            return False
        now = time.perf_counter() - self.t0
        chunk = json.loads(data)
        if "error" in chunk:  # an error event mid-stream (engine died, ...)
            err = chunk["error"]
            code = err.get("code") if isinstance(err, dict) else None
            res.status = "5xx" if isinstance(code, int) and code >= 500 else "error"
            res.detail = f"stream error: {json.dumps(err)[:200]}"
            self.failed = True
            return False
        if chunk.get("usage"):
            res.output_tokens = chunk["usage"].get("completion_tokens", 0)
            res.prompt_tokens = chunk["usage"].get("prompt_tokens", 0)
        choices = chunk.get("choices") or ()
        if any(_token_chunk(c) for c in choices):
            res.chunk_times.append(now)
        if any(c.get("finish_reason") for c in choices):
            self.final_at = now
        return True

    def end(self) -> None:
        """The stream closed: its status, TTFT and token count."""
        res = self.res
        if self.failed:
            return
        res.e2e_s = time.perf_counter() - self.t0
        if not self.done:
            res.status, res.detail = "error", "the stream ended without [DONE]"
            return
        if not res.chunk_times and res.output_tokens and self.final_at is not None:
            # A server that fell behind may send a request's tokens together with its finish
            # reason; with no visible text (a model without a tokenizer) that one chunk is
            # the only sign of them, and the usage chunk counts them.
            res.chunk_times.append(self.final_at)
        if not res.chunk_times:
            res.status, res.detail = "error", "no token in the stream"
            return
        res.ttft_s = res.chunk_times[0]
        res.output_tokens = res.output_tokens or len(res.chunk_times)
        res.status = "ok"

    def refused(self, status: int, text: str) -> None:
        res = self.res
        res.status = "429" if status == 429 else "5xx" if status >= 500 else "error"
        res.detail = f"HTTP {status}: {text[:200]}"


async def _bounded(stream, res: Result, timeout: float) -> Result:
    """Run `stream()` for at most `timeout` s; never raises: the outcome is the Result's."""
    try:
        await asyncio.wait_for(stream(), timeout)
    except asyncio.TimeoutError:
        res.status, res.detail = "timeout", f"not finished within {timeout:g} s"
    except (httpx.HTTPError, OSError, ValueError) as exc:
        res.status, res.detail = "error", f"{type(exc).__name__}: {exc}"[:200]
    return res


async def send(client: httpx.AsyncClient, path: str, body: dict, timeout: float,
               headers: dict, arrived: Optional[float] = None) -> Result:
    """One streamed request through httpx; every chunk timestamped, latencies counted from
    `arrived` (the request's arrival, before any client-side queueing; default now). Never
    raises: the outcome is the Result's status (a stream not ended within `timeout` s is a
    timeout)."""
    res = Result()
    events = _Events(res, time.perf_counter() if arrived is None else arrived)

    async def stream() -> None:
        async with client.stream("POST", path, json=body, headers=headers) as resp:
            res.http_status = resp.status_code
            if resp.status_code != 200:
                events.refused(resp.status_code, (await resp.aread()).decode(errors="replace"))
                return
            async for line in resp.aiter_lines():
                if line.startswith("data:") and not events.data(line[5:].strip()):
                    break
            events.end()

    return await _bounded(stream, res, timeout)


class _RawStream(asyncio.Protocol):
    """One streamed response read in the transport's callback: the status line and headers,
    then HTTP/1.1 chunked framing, then SSE lines, each `data:` payload to `events`; `ended`
    resolves when the stream is over. No coroutine step per chunk: what keeps a load generator
    cheaper than the server it measures."""

    def __init__(self, events: _Events, ended: asyncio.Future) -> None:
        self.events, self.ended = events, ended
        self.buf = b""
        self.status: Optional[int] = None
        self.length: Optional[int] = None  # a body not chunked: its length (-1: to the close)
        self.chunk_left = 0      # bytes of the current chunk not yet read
        self.body = b""          # the de-chunked bytes not yet split into lines
        self.error_body = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.status is None:
            head, sep, rest = self.buf.partition(b"\r\n\r\n")
            if not sep:
                return
            status_line, *fields = head.split(b"\r\n")
            self.status = int(status_line.split()[1])
            fields = dict(f.lower().split(b":", 1) for f in fields if b":" in f)
            self.buf = rest
            if fields.get(b"transfer-encoding", b"").strip() != b"chunked":  # an error's body
                self.length = int(fields.get(b"content-length", b"-1"))
        if self.length is not None:  # a plain body: its length, or up to the close
            self._payload(self.buf)
            self.buf = b""
            if 0 <= self.length <= len(self.error_body) + len(self.body):
                self._finish()
            return
        while not self.ended.done():
            if self.chunk_left == 0:
                line, sep, rest = self.buf.partition(b"\r\n")
                if not sep:
                    return
                if line == b"":  # the CRLF after a chunk's data
                    self.buf = rest
                    continue
                size = int(line.split(b";")[0], 16)
                self.buf = rest
                if size == 0:
                    self._finish()
                    return
                self.chunk_left = size
            take = self.buf[:self.chunk_left]
            self.buf = self.buf[len(take):]
            self.chunk_left -= len(take)
            self._payload(take)
            if self.chunk_left:
                return

    def _payload(self, data: bytes) -> None:
        if self.status != 200:
            self.error_body += data
            return
        self.body += data
        *lines, self.body = self.body.split(b"\n")
        for line in lines:
            if line.startswith(b"data:") and not self.events.data(line[5:].strip().decode()):
                self._finish()
                return

    def _finish(self) -> None:
        if not self.ended.done():
            self.ended.set_result(None)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._finish()


async def send_raw(url: str, path: str, body: dict, timeout: float, headers: dict,
                   arrived: Optional[float] = None) -> Result:
    """`send` over a bare asyncio connection (_RawStream): a fraction of httpx's CPU a chunk
    (h11's parser and anyio's streams are pure Python), for load generators that must not be
    what sets the pace (bench/serving_overhead.py)."""
    res = Result()
    events = _Events(res, time.perf_counter() if arrived is None else arrived)
    parts = urlsplit(url)
    loop = asyncio.get_running_loop()

    async def stream() -> None:
        ended = loop.create_future()
        transport, proto = await loop.create_connection(
            lambda: _RawStream(events, ended), parts.hostname, parts.port or 80)
        try:
            payload = json.dumps(body).encode()
            head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            transport.write(f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                            f"Content-Type: application/json\r\nContent-Length: {len(payload)}"
                            f"\r\n{head}\r\n".encode() + payload)
            await ended
        finally:
            transport.close()
        res.http_status = proto.status or 0
        if proto.status != 200:
            events.refused(res.http_status, proto.error_body.decode(errors="replace"))
        else:
            events.end()

    return await _bounded(stream, res, timeout)


# ---- one run at one rate --------------------------------------------------------------------
def _pct(values: Sequence[float], scale: float = 1000.0) -> dict:
    if not len(values):
        return {f"p{q}": None for q in PERCENTILES} | {"mean": None}
    arr = np.asarray(values, dtype=float) * scale
    return {f"p{q}": float(np.percentile(arr, q)) for q in PERCENTILES} | \
        {"mean": float(arr.mean())}


def summarize(results: list[Result], duration_s: float, slo_ttft_ms: Optional[float],
              slo_tpot_ms: Optional[float]) -> dict:
    ok = [r for r in results if r.status == "ok"]
    counts = {k: sum(r.status == k for r in results) for k in ("ok", "429", "5xx", "error",
                                                             "timeout")}
    itl = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    tpot = [r.tpot_s for r in ok if r.tpot_s is not None]

    def meets(r: Result) -> bool:
        return (slo_ttft_ms is None or r.ttft_s * 1000 <= slo_ttft_ms) and \
            (slo_tpot_ms is None or r.tpot_s is None or r.tpot_s * 1000 <= slo_tpot_ms)
    good = sum(meets(r) for r in ok)
    out_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    return {
        "requests": len(results), "counts": counts, "duration_s": duration_s,
        "request_throughput": len(ok) / duration_s if duration_s else 0.0,
        "output_token_throughput": out_tokens / duration_s if duration_s else 0.0,
        "total_token_throughput": (out_tokens + prompt_tokens) / duration_s if duration_s else 0.0,
        "goodput": good / duration_s if duration_s else 0.0,
        "slo_attainment": good / len(results) if results else 0.0,
        "output_tokens": out_tokens, "prompt_tokens": prompt_tokens,
        "ttft_ms": _pct([r.ttft_s for r in ok]), "itl_ms": _pct(itl), "tpot_ms": _pct(tpot),
        "e2e_ms": _pct([r.e2e_s for r in ok]), "queued_ms": _pct([r.queued_s for r in results]),
        "errors": sorted({r.detail for r in results if r.status not in ("ok", "429")})[:10],
    }


async def run_load(url: str, workload: list[Request], *, model: str, rate: float = math.inf,
                   arrival: str = "poisson", burst: int = 1, max_concurrency: int = 0,
                   static_batch: int = 0, endpoint: str = "completions", timeout: float = 600.0,
                   ignore_eos: bool = True, api_key: Optional[str] = None, seed: int = 0,
                   progress: bool = True, slo_ttft_ms: Optional[float] = None,
                   slo_tpot_ms: Optional[float] = None,
                   latency_from: str = "arrival",
                   client: str = "httpx") -> tuple[dict, list[Result]]:
    """Send `workload` to `url` as configured; (summary, per-request results). Latencies
    count from each request's arrival, or from its send (`latency_from="send"`: what the
    server alone adds, leaving out the client's queueing). `client`: httpx, or raw
    (send_raw: a fraction of the CPU a token)."""
    from tqdm import tqdm

    chat = endpoint == "chat"
    path = "/v1/chat/completions" if chat else "/v1/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    results = [Result() for _ in workload]
    bar = tqdm(total=len(workload), disable=not progress, unit="req", file=sys.stderr,
               desc=f"rate {rate:g}/s" if not static_batch else f"batch {static_batch}")
    counts = {"ok": 0, "429": 0, "err": 0}
    # One connection per request in flight: a pool cap would queue requests in httpx and hide
    # the server's own queueing.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def one(i: int, arrived: float, http: Optional[httpx.AsyncClient]) -> None:
        if sem is not None:
            await sem.acquire()
        queued = time.perf_counter() - arrived
        body = _body(workload[i], model, chat, ignore_eos)
        since = arrived if latency_from == "arrival" else None
        try:
            res = await (send_raw(url, path, body, timeout, headers, since) if http is None
                         else send(http, path, body, timeout, headers, since))
        finally:
            if sem is not None:
                sem.release()
        res.queued_s, res.arrived = queued, arrived
        results[i] = res
        counts["ok" if res.status == "ok" else "429" if res.status == "429" else "err"] += 1
        bar.set_postfix(counts, refresh=False)
        bar.update()

    async def arrive(i: int, at: float, t0: float, http: Optional[httpx.AsyncClient]) -> None:
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await one(i, time.perf_counter(), http)

    async def static_batches(times: list[float], t0: float, http) -> None:
        """A static batcher in front of the server: whatever has arrived (up to B) is sent
        together, and nothing more until that whole batch has finished."""
        start = 0
        while start < len(times):
            delay = t0 + times[start] - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            now = time.perf_counter() - t0
            end = start
            while end < len(times) and end - start < static_batch and times[end] <= now:
                end += 1
            await asyncio.gather(*(one(i, t0 + times[i], http) for i in range(start, end)))
            start = end

    rng = random.Random(seed + 1)
    times = arrival_times(len(workload), rate, arrival, burst, rng)
    async with contextlib.AsyncExitStack() as stack:
        http = None if client == "raw" else await stack.enter_async_context(
            httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(timeout), limits=limits))
        t0 = time.perf_counter()
        if static_batch:
            await static_batches(times, t0, http)
        else:
            await asyncio.gather(*(arrive(i, at, t0, http) for i, at in enumerate(times)))
        duration = time.perf_counter() - t0
    bar.close()
    summary = summarize(results, duration, slo_ttft_ms, slo_tpot_ms)
    summary.update(rate=None if math.isinf(rate) else rate, arrival=arrival, burst=burst,
                   max_concurrency=max_concurrency, static_batch=static_batch,
                   latency_from=latency_from)
    return summary, results


def run_fast(coro):
    """asyncio.run on uvloop where it is installed (as the server's event loop): a load
    generator's callbacks then cost it less CPU a token."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def served_model(url: str, api_key: Optional[str]) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.get(url + "/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]


def print_summary(s: dict) -> None:
    label = (f"static batches of <= {s['static_batch']}, " if s["static_batch"] else "") + \
        f"rate {s['rate'] if s['rate'] is not None else float('inf'):g}/s ({s['arrival']}" + \
        (f", bursts of {s['burst']}" if s["burst"] > 1 else "") + \
        (f", concurrency <= {s['max_concurrency']}" if s["max_concurrency"] else "") + ")"
    c = s["counts"]
    print(f"== {label}: {s['requests']} requests in {s['duration_s']:.1f} s")
    print(f"   ok {c['ok']}  429 {c['429']}  5xx {c['5xx']}  errors {c['error']}  "
          f"timeouts {c['timeout']}")
    print(f"   throughput {s['request_throughput']:.2f} req/s, "
          f"{s['output_token_throughput']:.1f} output tok/s, "
          f"{s['total_token_throughput']:.1f} total tok/s; goodput {s['goodput']:.2f} req/s "
          f"({100 * s['slo_attainment']:.0f}% of requests met the SLO)")
    for name in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms", "queued_ms"):
        p = s[name]
        if p["p50"] is not None and (name != "queued_ms" or p["p99"] > 1.0):
            print(f"   {name[:-3].upper():<6} ms  p50 {p['p50']:9.1f}  p90 {p['p90']:9.1f}  "
                  f"p99 {p['p99']:9.1f}  mean {p['mean']:9.1f}")
    for err in s["errors"]:
        print(f"   ! {err}")


def plot(doc: dict, source: Optional[str], path: str) -> None:
    """Latency percentiles against offered request rate (achieved rate for a run that sent
    everything at once), one panel per latency, from a --json document."""
    from bench import plots

    runs = doc["runs"]
    plt = plots.pyplot()
    xs = [r["rate"] if r["rate"] is not None else r["request_throughput"] for r in runs]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.8))
    names = {"ttft_ms": "time to first token", "itl_ms": "inter-token latency",
             "tpot_ms": "time per output token", "e2e_ms": "end-to-end latency"}
    for ax, (name, title) in zip(axes, names.items()):
        for q, style in zip(PERCENTILES, ("-o", "--s", ":^")):
            ys = [r[name][f"p{q}"] for r in runs]
            ax.plot(xs, [math.nan if y is None else y for y in ys], style, label=f"p{q}")
        ax.set_title(title)
        ax.set_xlabel("offered rate (req/s; achieved, for all at once)")
        ax.set_ylabel("ms")
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)  # zero-based: a flat latency reads flat
        plots.plain_numbers(ax.yaxis)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    what = f"{doc['model']} via /v1/{doc['endpoint']}: {runs[0]['requests']} requests per rate"
    if doc.get("serve_args"):
        what += f" (minivllm serve {doc['serve_args']})"
    subject = plots.model(doc["serve_args"]) if doc.get("serve_args") else doc["model"]
    plots.save(fig, path, plots.caption(source, doc, what, subject=subject))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 2)[2])
    target = ap.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="an OpenAI-compatible server, e.g. http://127.0.0.1:8000")
    target.add_argument("--serve-args", help="start `minivllm serve --port 0 ARGS` for the run "
                                             "(stopped with SIGTERM afterwards)")
    target.add_argument("--replot", metavar="JSON",
                        help="send nothing: redraw --plot (default: the JSON's name, .png) "
                             "from a --json file")
    ap.add_argument("--model", default=None, help="default: the first of /v1/models")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    ap.add_argument("--num-requests", type=int, default=100)
    ap.add_argument("--rate", default="inf", help="requests/s, or a comma list to sweep")
    ap.add_argument("--arrival", choices=["poisson", "fixed"], default="poisson")
    ap.add_argument("--burst", type=int, default=1, help="requests arriving together")
    ap.add_argument("--max-concurrency", type=int, default=0, help="0: no cap")
    ap.add_argument("--static-batch", type=int, default=0,
                    help="send what has arrived (up to B) at once, no more until it is done")
    ap.add_argument("--prompt-len", type=length_sampler, default=length_sampler("128"))
    ap.add_argument("--output-len", type=length_sampler, default=length_sampler("64"))
    ap.add_argument("--dataset", default=None, help="JSONL prompts (see above)")
    ap.add_argument("--token-low", type=int, default=1000, help="synthetic token-id range")
    ap.add_argument("--token-high", type=int, default=8000)
    ap.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false")
    ap.add_argument("--warmup", type=int, default=2, help="requests sent first, not counted")
    ap.add_argument("--timeout", type=float, default=600.0, help="per request, s")
    ap.add_argument("--latency-from", choices=["arrival", "send"], default="arrival",
                    help="send: leave the client's queueing (concurrency cap, static batch) "
                         "out of the latencies")
    ap.add_argument("--slo-ttft-ms", type=float, default=None)
    ap.add_argument("--slo-tpot-ms", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the summaries here")
    ap.add_argument("--per-request", action="store_true",
                    help="also write every request's timings into the JSON")
    ap.add_argument("--plot", default=None, help="PNG: latency percentiles against rate")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    ap.add_argument("--client", choices=["httpx", "raw"], default="httpx",
                    help="raw: a bare asyncio HTTP/1.1 client (a fraction of httpx's CPU a "
                         "token, for a load generator that must keep up with a fast server)")
    args = ap.parse_args(argv)
    args.rates = [float(r) for r in args.rate.split(",")]
    if args.burst < 1 or args.num_requests < 1 or any(r <= 0 for r in args.rates):
        ap.error("--burst and --num-requests must be >= 1, rates > 0")
    return args


async def _warmup(url: str, args, model: str) -> None:
    rng = random.Random(args.seed + 99)
    prompt, messages = synthetic_prompt(rng, 16, args.endpoint == "chat",
                                        (args.token_low, args.token_high))
    await run_load(url, [Request(prompt, messages, 16, 4)] * args.warmup, model=model,
                   endpoint=args.endpoint, ignore_eos=args.ignore_eos, api_key=args.api_key,
                   max_concurrency=1, progress=False, timeout=args.timeout)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            plot(json.load(f), args.replot, args.plot or args.replot[:-len(".json")] + ".png")
        return 0
    server = None
    if args.serve_args is not None:
        from bench.server_proc import ServeProcess

        server = ServeProcess(args.serve_args)
        print(f"started minivllm serve {args.serve_args} at {server.url}", file=sys.stderr)
    url = args.url.rstrip("/") if args.url else server.url
    runs, exit_code = [], None  # the server's exit status, when this run started it
    try:
        model = args.model or served_model(url, args.api_key)
        if args.warmup:
            asyncio.run(_warmup(url, args, model))
        for rate in args.rates:
            workload = build_workload(args, random.Random(args.seed))
            summary, results = asyncio.run(run_load(
                url, workload, model=model, rate=rate, arrival=args.arrival, burst=args.burst,
                max_concurrency=args.max_concurrency, static_batch=args.static_batch,
                endpoint=args.endpoint, timeout=args.timeout, ignore_eos=args.ignore_eos,
                api_key=args.api_key, seed=args.seed, progress=args.progress,
                slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms,
                latency_from=args.latency_from, client=args.client))
            if args.per_request:
                summary["per_request"] = [asdict(r) for r in results]
            print_summary(summary)
            runs.append(summary)
    finally:
        if server is not None:
            exit_code = server.stop()
            print(f"server stopped, exit status {exit_code}", file=sys.stderr)
    from bench import records

    doc = {"url": None if server else url, "serve_args": args.serve_args, "model": model,
           "endpoint": args.endpoint, "slo_ttft_ms": args.slo_ttft_ms,
           "slo_tpot_ms": args.slo_tpot_ms, "runs": runs, "server_exit": exit_code,
           **records.context()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    if args.plot:
        plot(doc, args.json, args.plot)
    return 1 if server is not None and exit_code != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
