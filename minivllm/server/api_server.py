"""One API-server process: uvicorn serving the app, as one frontend of the engine.

Several of these share one port (SO_REUSEPORT: the kernel spreads connections over them). No
torch is imported here and no model code runs: the process loads the tokenizer only.

SIGTERM / SIGINT drain it: /health and new requests answer 503, in-flight requests (streams
included) get the drain of the shutdown rule (`config.shutdown_timeouts`: --drain-timeout, but
at least three of the engine's slow steps); those still running then end with an error (an
SSE error event and `data: [DONE]`, or a JSON error), uvicorn gets the rule's grace to deliver
them, and the server stops and detaches from the engine. It dies with the launcher
(`die_with_parent`: the same drain, on the launcher's death).
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import logging
import signal
import socket
from typing import Optional

import uvicorn

from minivllm.config import ServerConfig, TransportConfig, shutdown_timeouts
from minivllm.engine.supervisor import die_with_parent
from minivllm.frontend.data_parallel_client import DataParallelClient
from minivllm.server.app import ServerState, asgi_app

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


# An engine answers control requests between two steps; one that answers none for this long is
# taken as hung (its step time unknown) when a drain asks for it.
STEP_ANSWER_S = 60.0
# Net allocations of container objects between young collections (Python's default: 700). A
# request leaves no reference cycle, so a young collection frees nothing, but it walks every
# object of the requests in flight; at 700 one ran every request or two, ~10 % of a short
# request's CPU (perf: gc_collect_main and its visits).
GC_YOUNG_ALLOCATIONS = 50_000


async def _step_p99(client: DataParallelClient) -> float:
    """The slowest engine's p99 step time, asked now; 0 if all are down or hung."""
    stats = await client.call_all("stats", timeout=STEP_ANSWER_S)
    return max((s["step_p99_s"] for s in stats if s is not None), default=0.0)


async def _serve(controls: list[str], model: Optional[str], load_format: str,
                 config: ServerConfig, transport: TransportConfig, index: int, ready,
                 all_up) -> None:
    state = ServerState(config, all_up)
    client = await DataParallelClient.connect(controls, model, load_format, transport,
                                              name=f"api-server-{index}")
    state.client = client
    if config.chat_template and client.tokenizer is not None:
        with open(config.chat_template, encoding="utf-8") as f:
            client.tokenizer.use_chat_template(f.read())
    state.model_name = config.served_model_name or client.model_name
    http = "httptools" if _installed("httptools", index, "parse HTTP with h11") else "h11"
    server = _Server(uvicorn.Config(asgi_app(state), log_level="warning",
                                    access_log=False, http=http))
    loop = asyncio.get_running_loop()

    async def drain() -> None:
        start = loop.time()
        step_p99 = asyncio.ensure_future(_step_p99(client))
        # until nothing runs, or the rule's drain has passed (known once the engine answers)
        while state.in_flight:
            if step_p99.done() and loop.time() >= start + shutdown_timeouts(
                    config.drain_timeout_s, step_p99.result())[0]:
                break
            await asyncio.sleep(0.05)
        drain_s, grace_s = shutdown_timeouts(config.drain_timeout_s, await step_p99)
        if state.in_flight:
            logger.warning("API server %d: %d requests still running after the %g-s drain: "
                           "ending them with an error", index, state.in_flight, drain_s)
            client.fail_all(f"the server is shutting down and this request did not finish "
                            f"within the drain timeout ({drain_s:g} s)")
        server.config.timeout_graceful_shutdown = grace_s
        server.should_exit = True

    def on_signal() -> None:
        if not state.draining:
            state.draining = True
            logger.info("API server %d draining (%d requests in flight)", index, state.in_flight)
            asyncio.ensure_future(drain())
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    sock = listening_socket(config.host, config.port)
    sock.listen(2048)
    # Startup's objects (modules, the tokenizer, the app) out of the collector's way: the
    # objects of the requests in flight outlive the young collections, so full collections come
    # every few hundred requests, and each would walk all of startup's again (~70 k objects).
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_ALLOCATIONS, *gc.get_threshold()[1:])
    ready.value = 1
    try:
        await server.serve(sockets=[sock])
    finally:
        sock.close()
        await client.shutdown()


def _installed(module: str, index: int, instead: str) -> bool:
    """Whether `module` (a dependency with a compiled fast path) imports; if not, API server 0
    says once what runs instead."""
    try:
        importlib.import_module(module)
    except ImportError:
        if index == 0:
            logger.warning("%s is not installed: the API servers %s, with more CPU per "
                           "streamed token (pip install %s)", module, instead, module)
        return False
    return True


def run_api_server(controls: list[str], model: Optional[str], load_format: str,
                   config: ServerConfig, transport: TransportConfig, index: int,
                   parent_pid: int, ready, all_up) -> None:
    """Process main of API server `index` (spawned by `minivllm serve`, whose pid is
    `parent_pid`), a frontend of every engine (`controls`: their control endpoints, by
    data-parallel rank): it sets `ready` (a shared flag) once it listens, and answers /health
    200 only once the launcher has set `all_up` (every API server ready)."""
    from minivllm import logger as log_setup

    die_with_parent(parent_pid)
    log_setup.configure()
    main = _serve(controls, model, load_format, config, transport, index, ready, all_up)
    # uvloop: the event loop's callbacks, futures and socket writes compiled
    if _installed("uvloop", index, "run on asyncio's event loop"):
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)
