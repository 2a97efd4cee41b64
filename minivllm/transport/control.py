"""The control channel: small JSON requests to the engine over ZeroMQ, apart from the data rings.

The engine binds a ROUTER socket; a frontend (or an operator tool) connects a DEALER and sends
`[b"", json]`, the engine answers `[b"", json]` on the same connection. Each request carries
`op` and a `seq` that the reply echoes, so a late reply to a timed-out call is recognised and
dropped. Operations (ipc/PROTOCOL.md, "Control channel", gives every field):

    register    a frontend attaches its request and output rings and its doorbell
    unregister  it detaches (its unfinished requests are aborted)
    abort       abort requests by id, out of band
    stats       counters: requests, tokens, KV-cache usage, prefix hits, preemptions
    health      liveness and state (ready / draining)
    drain       finish in-flight requests, refuse new ones
    shutdown    stop the engine (after draining, when asked to)

Control traffic is rare (a few messages per frontend lifetime), so JSON's readability wins
over speed here; the data path never touches this socket.
"""
from __future__ import annotations

import itertools
import json
import time
from typing import Any, Optional

import zmq

from minivllm.transport.shm import pid_alive

PID_CHECK_S = 0.1  # how often a call watching the engine's pid checks that it lives

OPS = ("register", "unregister", "abort", "stats", "health", "drain", "shutdown")


class ControlError(RuntimeError):
    """The engine refused a control request (its message says why)."""


class EngineGoneError(TimeoutError):
    """The engine process died before it answered: the answer will never come."""


def encode(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def decode(frame: bytes) -> dict:
    """A control message, or ValueError naming what is wrong with the bytes."""
    try:
        message = json.loads(frame)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"control message is not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ValueError("control message must be a JSON object")
    return message


class ControlClient:
    """The frontend's end of the control channel."""

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        self.endpoint = endpoint
        self.socket = ctx.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)
        self._seq = itertools.count(1)

    def call(self, op: str, timeout: float = 10.0, engine_pid: Optional[int] = None,
             **args: Any) -> dict:
        """Send `op` and wait for its reply; raises ControlError if refused, TimeoutError if
        the engine does not answer within `timeout` seconds, EngineGoneError as soon as the
        process `engine_pid` (when given) dies: a request it received dies with it, and its
        successor on the endpoint never sees it."""
        seq = next(self._seq)
        self.socket.send_multipart([b"", encode({"op": op, "seq": seq, **args})])
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if engine_pid is not None and not pid_alive(engine_pid):
                raise EngineGoneError(f"the engine process {engine_pid} died before it "
                                      f"answered {op!r}")
            if remaining <= 0:
                raise TimeoutError(f"the engine at {self.endpoint} did not answer {op!r} "
                                   f"within {timeout:g} s")
            wait = remaining if engine_pid is None else min(remaining, PID_CHECK_S)
            if not self.socket.poll(int(wait * 1000) + 1):
                continue
            reply = decode(self.socket.recv_multipart()[-1])
            if reply.get("seq") != seq:
                continue  # the answer to an earlier call that timed out
            if not reply.get("ok"):
                raise ControlError(f"engine refused {op!r}: {reply.get('error', 'no reason given')}")
            return reply

    def close(self) -> None:
        self.socket.close(linger=0)
