"""One API-server process: uvicorn serving the app, as one frontend of the engine.

Several of these share one port (SO_REUSEPORT: the kernel spreads connections over them). No
torch is imported here and no model code runs: the process loads the tokenizer only.

SIGTERM / SIGINT drain it: /health and new requests answer 503, in-flight requests (streams
included) get `drain_timeout_s` to finish, then the server stops and detaches from the engine.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from typing import Optional

import uvicorn

from minivllm.config import ServerConfig, TransportConfig
from minivllm.frontend.async_client import AsyncEngineClient
from minivllm.server.app import ServerState, build_app

logger = logging.getLogger(__name__)


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket on (host, port) that other processes may bind too (SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: draining is ours (503 first, then stop)."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


async def _serve(control: str, model: Optional[str], load_format: str, config: ServerConfig,
                 transport: TransportConfig, index: int, ready) -> None:
    state = ServerState(config)
    client = await AsyncEngineClient.connect(control, model, load_format, transport,
                                             name=f"api-server-{index}")
    state.client = client
    state.model_name = config.served_model_name or client.model_name
    server = _Server(uvicorn.Config(build_app(state), log_level="warning", access_log=False,
                                    timeout_graceful_shutdown=5))
    loop = asyncio.get_running_loop()
    drained = asyncio.Event()

    async def drain() -> None:
        deadline = loop.time() + config.drain_timeout_s
        while state.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        server.should_exit = True
        drained.set()

    def on_signal() -> None:
        if not state.draining:
            state.draining = True
            logger.info("API server %d draining (%d requests in flight)", index, state.in_flight)
            asyncio.ensure_future(drain())
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    sock = listening_socket(config.host, config.port)
    sock.listen(2048)
    if ready is not None:
        ready.set()
    try:
        await server.serve(sockets=[sock])
    finally:
        sock.close()
        await client.shutdown()


def run_api_server(control: str, model: Optional[str], load_format: str, config: ServerConfig,
                   transport: TransportConfig, index: int = 0, ready=None) -> None:
    """Process main of API server `index` (spawned by `minivllm serve`)."""
    from minivllm import logger as log_setup

    log_setup.configure()
    asyncio.run(_serve(control, model, load_format, config, transport, index, ready))
