"""The streamed response's writer (minivllm/server/sse.py) under a real uvicorn: a client that
reads nothing for a while stops the writes (flow control), and the chunks queued meanwhile
arrive complete and in order once it reads."""
import asyncio
import socket

import pytest
import uvicorn
import uvloop

from minivllm.server.sse import SERVER_SEND, EventStream, with_server_send

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
