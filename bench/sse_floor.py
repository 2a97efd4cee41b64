"""The socket + event loop floor of a streamed token: a raw uvloop server writing OpenAI SSE.

    python -m bench.sse_floor --step-ms 30       # prints its URL, serves until SIGTERM

It answers every POST /v1/completions with a completions SSE stream of `max_tokens` chunks,
one per "engine step" of `--step-ms` for every stream at once, each a fixed byte string made
when the request arrives (a 4-character token's chunk, as large as minivllm's) written with one
transport.write; then the finish chunk, the usage chunk and [DONE]. No engine, no detokenizer,
no JSON per token, no ASGI: what is left per token is the write() syscall to a connection and
the event loop's bookkeeping. bench/serving_overhead.py --floor measures its CPU per streamed
token under the same load as minivllm's API server: the part of that figure no Python server
can go below on this machine.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
import uuid

HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
        b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n")


def _chunk(payload: dict) -> bytes:
    """One SSE event as an HTTP/1.1 chunk."""
    body = f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()
    return b"%x\r\n%s\r\n" % (len(body), body)


class Stream:
    """One request's response: `left` token chunks still to write, then its end."""

    def __init__(self, transport: asyncio.Transport, tokens: int) -> None:
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def choice(finish) -> bytes:
            return _chunk({"id": cid, "object": "text_completion", "created": created,
                           "model": "default", "choices": [{
                               "index": 0, "text": " the", "logprobs": None,
                               "finish_reason": finish, "stop_reason": None}]})
        self.transport, self.left = transport, tokens
        self.token, self.last = choice(None), choice("length")
        self.end = _chunk({"id": cid, "object": "text_completion", "created": created,
                           "model": "default", "choices": [], "usage": {
                               "prompt_tokens": 0, "completion_tokens": tokens,
                               "total_tokens": tokens}}) + \
            b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"

    def step(self) -> bool:
        """Write this step's chunk; whether the stream goes on."""
        self.left -= 1
        if self.left:
            self.transport.write(self.token)
            return True
        self.transport.write(self.last + self.end)
        return False


class Server:
    def __init__(self, step_s: float) -> None:
        self.step_s = step_s
        self.streams: list[Stream] = []
        self.stepping = False

    def start(self, stream: Stream) -> None:
        self.streams.append(stream)
        if not self.stepping:
            self.stepping = True
            asyncio.ensure_future(self._steps())

    async def _steps(self) -> None:
        """Every step_s, a chunk to every stream: as an engine's output step does."""
        while self.streams:
            self.streams = [s for s in self.streams if s.step()]
            await asyncio.sleep(self.step_s)
        self.stepping = False


class Connection(asyncio.Protocol):
    """HTTP/1.1 just enough for the load generator: one POST with a Content-Length body."""

    def __init__(self, server: Server) -> None:
        self.server, self.buffer = server, b""

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        head, sep, body = self.buffer.partition(b"\r\n\r\n")
        if not sep:
            return
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        if len(body) < length:
            return
        self.buffer = b""
        self.transport.write(HEAD)
        self.server.start(Stream(self.transport, json.loads(body[:length])["max_tokens"]))


async def serve(host: str, port: int, step_s: float) -> None:
    loop = asyncio.get_running_loop()
    server = Server(step_s)
    listener = await loop.create_server(lambda: Connection(server), host, port, backlog=2048)
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
    print(f"serving on http://{host}:{listener.sockets[0].getsockname()[1]}", flush=True)
    await stop
    listener.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--step-ms", type=float, default=30.0)
    args = ap.parse_args()
    import uvloop

    uvloop.run(serve(args.host, args.port, args.step_ms / 1000))


if __name__ == "__main__":
    main()
