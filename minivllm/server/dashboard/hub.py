"""One API server's side of the dashboard: a subscriber to every engine's events, fanned out to
the browsers connected to this server as server-sent events.

The SUB sockets exist only while a browser listens here, so an engine with no dashboard open
anywhere computes nothing (engine/events.py). Engine messages go out as they came, one
`event: engine` each, never decoded here: only the engine's data-parallel rank is spliced in
front (`{"engine":i,...`). Every PULSE_S, and at once when an engine dies or comes back, an
`event: server` adds what only the API servers know: each engine's state and restarts, and the
request metrics of /metrics (TTFT and inter-token percentiles, finishes, rejections, aborts),
from the same multiprocess collection /metrics reads.
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, AsyncIterator, Optional

import zmq
import zmq.asyncio

from minivllm.server import metrics

if TYPE_CHECKING:  # app.py imports the dashboard
    from minivllm.server.app import ServerState

PULSE_S = 1.0        # a server event at least this often
WATCH_S = 0.1        # how often the engine's state is checked for a change
LISTENER_QUEUE = 256  # events queued per browser before its new ones are dropped
QUANTILES = (0.5, 0.9, 0.99)


def quantile(q: float, bounds: list[float], cumulative: list[float]) -> Optional[float]:
    """Prometheus's histogram_quantile: linear within the bucket holding rank q x count
    (the last finite bound if that is +Inf); None without observations."""
    total = cumulative[-1]
    if not total:
        return None
    rank = q * total
    i = next(i for i, count in enumerate(cumulative) if count >= rank)
    if bounds[i] == float("inf"):
        return bounds[i - 1] if i else 0.0
    lower, below = (bounds[i - 1], cumulative[i - 1]) if i else (0.0, 0.0)
    inside = cumulative[i] - below
    return bounds[i] if not inside else lower + (bounds[i] - lower) * (rank - below) / inside


def request_figures(families: list) -> dict:
    """The dashboard's request figures from this server's metric families."""
    out: dict = {}
    for family in families:
        name = family.name.removeprefix(metrics.PREFIX)
        if family.type == "histogram" and name in ("time_to_first_token_seconds",
                                                   "inter_token_latency_seconds"):
            buckets = sorted((float(s.labels["le"]), s.value) for s in family.samples
                             if s.name.endswith("_bucket"))
            bounds, cumulative = [b for b, _ in buckets], [c for _, c in buckets]
            out[name.split("_seconds")[0]] = {
                "count": cumulative[-1] if cumulative else 0,
                **{f"p{round(q * 100)}": quantile(q, bounds, cumulative) for q in QUANTILES}}
        elif name in ("request_success", "requests_rejected", "requests_aborted"):
            out[name] = {next(iter(s.labels.values()), ""): s.value for s in family.samples
                         if s.name.endswith("_total")}
    return out


def sse(event: str, data: bytes) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"


class EventHub:
    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.listeners: set[asyncio.Queue] = set()
        self._task: Optional[asyncio.Task] = None
        self._ctx: Optional[zmq.asyncio.Context] = None

    async def stream(self) -> AsyncIterator[bytes]:
        """One browser's events until it leaves or the server drains."""
        queue: asyncio.Queue = asyncio.Queue(LISTENER_QUEUE)
        self.listeners.add(queue)
        if self._task is None:
            self._task = asyncio.create_task(self._run())
        try:
            yield sse("server", self._server_event())
            while (item := await queue.get()) is not None:
                yield item
        finally:
            self.listeners.discard(queue)
            if not self.listeners and self._task is not None:
                self._task.cancel()
                self._task = None

    def _publish(self, item: Optional[bytes]) -> None:
        for queue in self.listeners:
            if not queue.full():
                queue.put_nowait(item)

    def _server_event(self) -> bytes:
        client = self.state.client
        return json.dumps({"time": time.time(), "engine_state": client.state,
                           "engines": client.engines(), "restarts": client.restarts,
                           "draining": self.state.draining, "in_flight": self.state.in_flight,
                           **request_figures(metrics.server_families())},
                          separators=(",", ":")).encode()

    async def _run(self) -> None:
        """Subscribe (again when a restarted engine has a new endpoint), forward, pulse."""
        if self._ctx is None:
            self._ctx = zmq.asyncio.Context()
        clients = self.state.client.clients
        subs: list = [None] * len(clients)
        endpoints: list = [None] * len(clients)
        poller = zmq.asyncio.Poller()
        loop = asyncio.get_running_loop()
        seen, next_pulse = self.state.client.engines(), loop.time() + PULSE_S
        try:
            while not self.state.draining:
                for i, client in enumerate(clients):
                    if client.events_endpoint != endpoints[i]:
                        if subs[i] is not None:
                            poller.unregister(subs[i])
                            subs[i].close(linger=0)
                        endpoints[i] = client.events_endpoint
                        subs[i] = self._ctx.socket(zmq.SUB)
                        subs[i].setsockopt(zmq.LINGER, 0)
                        subs[i].connect(endpoints[i])
                        subs[i].subscribe(b"")
                        poller.register(subs[i], zmq.POLLIN)
                for sub, _ in await poller.poll(int(WATCH_S * 1000)):
                    message = await sub.recv()
                    self._publish(sse("engine", b'{"engine":%d,' % subs.index(sub)
                                      + message[1:]))
                engines = self.state.client.engines()
                if engines != seen or loop.time() >= next_pulse:
                    seen, next_pulse = engines, loop.time() + PULSE_S
                    self._publish(sse("server", self._server_event()))
            self._publish(None)  # draining: the streams end, so uvicorn can stop
        finally:
            for sub in subs:
                if sub is not None:
                    sub.close(linger=0)
