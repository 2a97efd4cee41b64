"""The streamed response's writer (minivllm/server/sse.py) under a real uvicorn: a client that
reads nothing for a while stops the writes (flow control), and the chunks queued meanwhile
arrive complete and in order once it reads. And the disconnect watch: a client that goes away
cancels the work (a 499), one that goes away after it is done cancels nothing."""
import asyncio
import socket

import pytest
import uvicorn
import uvloop

from minivllm.server.protocol import APIError
from minivllm.server.sse import (SERVER_SEND, EventStream, until_done_or_disconnect,
                                 with_server_send)

CHUNKS = [b"data: %d %s\n\n" % (i, b"x" * 4000) for i in range(2000)]  # 8 MB


async def _read_body(reader: asyncio.StreamReader) -> bytes:
    """The response's body, its HTTP/1.1 chunked framing undone."""
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower()
    body = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
        data = await reader.readexactly(size + 2)
        if not size:
            return bytes(body)
        body += data[:-2]


def _write_chunks(writer) -> None:
    for chunk in CHUNKS:
        writer.write(chunk)


async def _serve_and_read(http: str, write=_write_chunks) -> tuple[bytes, bool, int]:
    """The body a client that reads nothing until `write(writer)` has made every write (no
    await between them) gets; whether flow control had paused the connection by then, and the
    bytes its transport held (the rest queue in the ChunkWriter)."""
    paused = []

    async def write_all(scope, writer):
        write(writer)
        cycle = scope[SERVER_SEND].__self__
        paused.append((cycle.flow.write_paused, cycle.transport.get_write_buffer_size()))

    async def app(scope, receive, send):
        await EventStream(lambda writer: write_all(scope, writer))(scope, receive, send)

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(with_server_send(app), http=http, lifespan="off",
                                           log_level="warning"))
    serving = asyncio.ensure_future(server.serve(sockets=[listener]))
    while not server.started:
        await asyncio.sleep(0.01)
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills at once
    client.connect(listener.getsockname())
    client.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=client)
    writer.write(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n")
    while not paused:  # the app has written everything, the client nothing read yet
        await asyncio.sleep(0.01)
    body = await asyncio.wait_for(_read_body(reader), 120)
    writer.close()
    server.should_exit = True
    await serving
    return body, *paused[0]


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_a_client_that_stops_reading_gets_every_chunk_in_order(http):
    body, paused, _ = uvloop.run(_serve_and_read(http))
    assert body == b"".join(CHUNKS)
    if http == "httptools":  # straight to the transport until flow control paused it
        assert paused


def _client() -> tuple:
    """An ASGI receive whose client goes away when the returned event is set."""
    gone = asyncio.Event()

    async def receive() -> dict:
        await gone.wait()
        return {"type": "http.disconnect"}
    return receive, gone


async def _work(log: list, done: asyncio.Future):
    try:
        return await done
    finally:
        log.append("work ended")


def test_a_disconnect_cancels_the_work_with_a_499():
    async def main() -> None:
        receive, gone = _client()
        log: list = []
        for work in ("coroutine", "future"):  # (a streamed body; a JSON body's done future)
            done = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_later(0.01, gone.set)
            with pytest.raises(APIError) as exc:
                await until_done_or_disconnect(
                    receive, _work(log, done) if work == "coroutine" else done)
            assert exc.value.status == 499 and done.cancelled()
            caller = asyncio.current_task()  # carries on (cancelling(): Python 3.11 on)
            assert getattr(caller, "cancelling", lambda: 0)() == 0
            await asyncio.sleep(0.01)
            gone.clear()
        assert log == ["work ended"]
    uvloop.run(main())


def test_work_done_first_returns_and_a_later_disconnect_cancels_nothing():
    async def main() -> None:
        receive, gone = _client()
        done = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.01, done.set_result, "body")
        assert await until_done_or_disconnect(receive, _work([], done)) == "body"
        gone.set()
        await asyncio.sleep(0.02)  # (the watch is gone: no cancel lands here)
        # and the same when the result and the disconnect come in one pass of the loop
        done = asyncio.get_running_loop().create_future()
        gone.clear()
        asyncio.get_running_loop().call_later(0.01, done.set_result, "body")
        asyncio.get_running_loop().call_later(0.01, gone.set)
        try:
            assert await until_done_or_disconnect(receive, done) == "body"
        except APIError as exc:  # the disconnect was seen first: also right
            assert exc.status == 499
        await asyncio.sleep(0.02)
    uvloop.run(main())


def test_a_caller_cancelled_from_elsewhere_is_cancelled_not_a_499():
    async def main() -> None:
        receive, _ = _client()
        log: list = []
        caller = asyncio.ensure_future(until_done_or_disconnect(
            receive, _work(log, asyncio.get_running_loop().create_future())))
        await asyncio.sleep(0.01)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert log == ["work ended"]
    uvloop.run(main())
