"""DataParallelClient: the engines behind one API server (`serve --data-parallel-size N`; one
engine without data parallelism), with AsyncEngineClient's face for the server.

Each new request goes to the engine with the least outstanding work and stays there for its
whole life: its KV blocks, its stream and its abort are that engine's. An engine's death fails
only its own requests; new ones go to the others while its supervisor restarts it, and its
AsyncEngineClient re-attaches on its own.

Outstanding work of an engine = this server's requests in flight on it (exact, now) plus what
the engine's stats, polled every LOAD_POLL_S, counted beyond them (the other API servers' and
the ZeroMQ peers' requests). Ties go to the engine that last took a prompt beginning the same
way (its prefix cache may still hold the blocks), else to the lowest index.
"""
from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Optional

from minivllm.config import TransportConfig
from minivllm.frontend.async_client import AsyncEngineClient, RequestStream
from minivllm.inputs import PromptType
from minivllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

LOAD_POLL_S = 0.25     # how often each engine's stats are asked for its whole load
AFFINITY_CHARS = 256   # a text prompt's beginning that keys prefix affinity (~4 KV blocks)
AFFINITY_TOKENS = 64   # a token-id prompt's
AFFINITY_KEYS = 4096   # prompt beginnings remembered (least recently used forgotten)


def affinity_key(prompt: PromptType) -> Optional[object]:
    """What identifies a prompt's first KV blocks, cheaply (no tokenizing here)."""
    if isinstance(prompt, dict):
        prompt = prompt.get("prompt_token_ids", prompt.get("prompt"))
    if isinstance(prompt, str):
        return prompt[:AFFINITY_CHARS]
    try:
        return tuple(prompt[:AFFINITY_TOKENS])
    except TypeError:
        return None  # not a prompt: the engine client names what is wrong


class DataParallelClient:
    def __init__(self, clients: list[AsyncEngineClient]) -> None:
        self.clients = clients
        self.others = [0] * len(clients)  # per engine: requests in flight not this server's
        self._affinity: OrderedDict[object, int] = OrderedDict()
        self._poller = asyncio.create_task(self._poll_loads()) if len(clients) > 1 else None

    @classmethod
    async def connect(cls, controls: list[str], model: Optional[str] = None,
                      load_format: str = "auto", transport: Optional[TransportConfig] = None,
                      name: Optional[str] = None) -> "DataParallelClient":
        """Register with every engine (their control endpoints, by rank); the tokenizer is
        loaded once."""
        first = await AsyncEngineClient.connect(controls[0], model, load_format, transport, name)
        clients = [first]
        try:
            for control in controls[1:]:
                clients.append(await AsyncEngineClient.connect(
                    control, model, load_format, transport, name, tokenizer=first.tokenizer))
        except BaseException:
            for client in clients:
                await client.shutdown()
            raise
        return cls(clients)

    # ---- what the server reads: the engines are one model ---------------------------------
    @property
    def first(self) -> AsyncEngineClient:
        return self.clients[0]

    tokenizer = property(lambda self: self.first.tokenizer)
    model_name = property(lambda self: self.first.model_name)
    max_model_len = property(lambda self: self.first.max_model_len)
    vocab_size = property(lambda self: self.first.vocab_size)
    sampling_defaults = property(lambda self: self.first.sampling_defaults)

    @property
    def state(self) -> str:
        """ready while any engine is; else the first engine's state (dead: restarting)."""
        states = [c.state for c in self.clients]
        return "ready" if "ready" in states else states[0]

    @property
    def restarts(self) -> int:
        return sum(c.restarts for c in self.clients)

    def engines(self) -> list[dict]:
        """Each engine's state and pid, by rank."""
        return [{"engine": i, "state": c.state, "pid": c.engine_pid, "restarts": c.restarts}
                for i, c in enumerate(self.clients)]

    # ---- routing --------------------------------------------------------------------------
    def load(self, engine: int) -> int:
        return self.clients[engine].in_flight + self.others[engine]

    def pick(self, prompt: PromptType) -> int:
        """The engine for a new request: the least loaded ready one (prefix affinity, then the
        lowest index, break ties); the first engine when none is ready (it raises)."""
        ready = [i for i, c in enumerate(self.clients) if c.state == "ready"]
        if len(ready) <= 1:
            return ready[0] if ready else 0
        loads = {i: self.load(i) for i in ready}
        least = min(loads.values())
        key = affinity_key(prompt)
        engine = self._affinity.get(key)
        if engine is None or loads.get(engine) != least:
            engine = next(i for i in ready if loads[i] == least)
        if key is not None:
            self._affinity[key] = engine
            self._affinity.move_to_end(key)
            if len(self._affinity) > AFFINITY_KEYS:
                self._affinity.popitem(last=False)
        return engine

    def open(self, prompt: PromptType, params: Optional[SamplingParams] = None,
             request_id: Optional[str] = None, copy_lists: bool = True) -> RequestStream:
        """AsyncEngineClient.open on the engine pick() chooses."""
        return self.clients[self.pick(prompt)].open(prompt, params, request_id, copy_lists)

    async def _poll_loads(self) -> None:
        while True:
            await asyncio.sleep(LOAD_POLL_S)
            for i, client in enumerate(self.clients):
                if client.state != "ready":
                    self.others[i] = 0
                    continue
                mine = client.in_flight
                try:
                    stats = await client.call("stats", timeout=LOAD_POLL_S * 4)
                except (TimeoutError, RuntimeError):
                    continue  # a slow step, or it died: its own client notices that
                self.others[i] = max(0, stats["running"] + stats["waiting"] - mine)

    # ---- control --------------------------------------------------------------------------
    async def call_all(self, op: str, timeout: float = 5.0, **args) -> list[Optional[dict]]:
        """`op` on every ready engine at once: replies by rank, None where an engine is down
        or did not answer in time."""
        async def one(client: AsyncEngineClient) -> Optional[dict]:
            if client.state != "ready":
                return None
            try:
                return await client.call(op, timeout=timeout, **args)
            except (TimeoutError, RuntimeError):
                return None
        return list(await asyncio.gather(*(one(c) for c in self.clients)))

    def fail_all(self, message: str) -> None:
        for client in self.clients:
            client.fail_all(message)

    async def shutdown(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        await asyncio.gather(*(c.shutdown() for c in self.clients))
