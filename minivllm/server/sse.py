"""The streamed response's transport: an ASGI response whose body chunks are written by the
engine client's reader as outputs come, and the watch for the client going away.

A server's hot path is one SSE chunk per stream per engine step. Here a chunk is one write to
the connection's transport, made by the caller at once (`ChunkWriter`): no task is woken per
chunk, no ASGI message is made, and none of the Python wrappers of send that the middlewares
and the route add per message runs (`with_server_send` finds the HTTP server's own send; the
wrappers only watch for the response's start, which goes through them).
"""
from __future__ import annotations

import asyncio
import functools
import logging
from typing import Awaitable, Callable, Optional

from fastapi.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from minivllm.server import metrics
from minivllm.server.protocol import APIError

logger = logging.getLogger(__name__)

# The scope key of the HTTP server's own ASGI send (with_server_send)
SERVER_SEND = "minivllm.server_send"


def with_server_send(app: ASGIApp) -> ASGIApp:
    """`app` with the HTTP server's own send in every request's scope (for EventStream)."""
    async def app_with_server_send(scope: Scope, receive: Receive, send: Send) -> None:
        scope[SERVER_SEND] = send
        await app(scope, receive, send)
    return app_with_server_send


def _body(data: bytes) -> Message:
    return {"type": "http.response.body", "body": data, "more_body": True}


class ChunkWriter:
    """A response's body chunks, each written by the caller now. Under uvicorn's httptools
    protocol (the send of a RequestResponseCycle framing the body in chunks) a chunk goes
    straight to the connection's transport, framed as that send would, while the connection
    takes writes (not paused by flow control, not gone); otherwise the chunks queue behind one
    task that awaits ASGI send, in order. The response's start and end go through send."""

    def __init__(self, send: Send) -> None:
        self.send = send
        # uvicorn's cycle; the response has started, so it knows whether it frames in chunks
        self._cycle = getattr(send, "__self__", None)
        if getattr(self._cycle, "chunked_encoding", None) is not True:
            self._cycle = None
            _log_send_once()
        self._queued: list[bytes] = []
        self._flusher: Optional[asyncio.Task] = None

    def write(self, data: bytes) -> None:
        # (a TextSink, csrc/text_sink.pyx, makes a stricter test before its direct writes)
        cycle = self._cycle
        if (cycle is not None and self._flusher is None and not cycle.flow.write_paused
                and not cycle.disconnected):
            cycle.transport.write(b"%x\r\n%s\r\n" % (len(data), data))
            return
        self._queued.append(data)
        if self._flusher is None:
            self._flusher = asyncio.ensure_future(self._flush())

    async def _flush(self) -> None:
        while self._queued:
            data = b"".join(self._queued)
            self._queued.clear()
            await self.send(_body(data))
        self._flusher = None

    async def drain(self) -> None:
        """Until every chunk written is in the connection's buffer."""
        if self._flusher is not None:
            await self._flusher


@functools.lru_cache(maxsize=None)
def _log_send_once() -> None:
    logger.info("the HTTP server is not uvicorn's httptools protocol: SSE chunks go through "
                "its ASGI send, from a task")


class EventStream(Response):
    """The SSE response: `run(writer)` writes its body through a ChunkWriter (the engine
    client's reader writes the chunks, see serving.py) but for its last bytes, which it returns
    (sent with the response's end: one write); a client's disconnect cancels it."""

    media_type = "text/event-stream"

    # the same for every response: made once, as Response.init_headers makes them (a tuple:
    # nothing may add a header to every response through one's `headers`)
    raw_headers = ((b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no"),
                   (b"content-type", b"text/event-stream; charset=utf-8"))

    def __init__(self, run: Callable[[ChunkWriter], Awaitable[Optional[bytes]]]) -> None:
        self.run, self.status_code, self.background = run, 200, None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        writer = ChunkWriter(scope.get(SERVER_SEND, send))
        try:
            end = await until_done_or_disconnect(receive, self.run(writer))
        except APIError:  # the client has gone: there is nobody to end the response for
            return
        await writer.drain()
        await send({"type": "http.response.body", "body": end or b"", "more_body": False})


async def until_done_or_disconnect(receive: Receive, work: Awaitable):
    """`work`'s result; if the client goes away first (`receive`: the request's ASGI receive),
    `work` is cancelled and this raises a 499. `work` runs in the caller's task: the watch is
    the one task made per request, which cancels the caller's on a disconnect."""
    caller = asyncio.current_task()
    watcher = asyncio.ensure_future(_disconnected(receive))
    watching = True  # the caller is in `await work`: a disconnect cancels it

    def on_disconnect(w: asyncio.Future) -> None:
        if watching and not w.cancelled():
            caller.cancel()

    watcher.add_done_callback(on_disconnect)
    try:
        return await work
    except asyncio.CancelledError:
        if not watcher.done() or watcher.cancelled():
            raise  # cancelled from elsewhere
        if hasattr(caller, "uncancel"):  # (3.11 on: its cancel, not another's, is undone)
            caller.uncancel()
        metrics.aborted.labels("disconnect").inc()
        raise APIError(499, "client disconnected") from None
    finally:
        watching = False
        watcher.cancel()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
