"""Doorbells: how a producer wakes a consumer that sleeps on ZeroMQ.

A consumer binds one `BellListener` (a PULL socket) and polls it, together with whatever else it
waits on, only after `Ring.prepare_sleep()` said all its rings are empty. Producers connect a
`Bell` (a PUSH socket) to it; a ring calls its bell only when its consumer's `sleeping` flag is
set, so a busy consumer costs its producers no system call. Many rings may share one listener
(the engine has one for all frontends' request rings).
"""
from __future__ import annotations

import zmq

from minivllm.transport.shm import remove_endpoint


class Bell:
    """The producer's end: `bell()` sends one empty message, never blocking."""

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        self.socket = ctx.socket(zmq.PUSH)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDHWM, 64)
        self.socket.connect(endpoint)
        self.endpoint = endpoint

    def __call__(self) -> None:
        try:
            self.socket.send(b"", zmq.NOBLOCK)
        except zmq.Again:
            pass  # 64 bells already queued: the consumer is bound to wake and read the ring

    def close(self) -> None:
        self.socket.close(linger=0)


class BellListener:
    """The consumer's end: bind once, poll `socket`, `drain()` after waking."""

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        self.socket = ctx.socket(zmq.PULL)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(endpoint)
        self.endpoint = endpoint

    def drain(self) -> int:
        """Swallow the bells that woke us (the rings are read next); returns how many."""
        n = 0
        while True:
            try:
                self.socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return n
            n += 1

    def close(self) -> None:
        self.socket.close(linger=0)
        remove_endpoint(self.endpoint)
