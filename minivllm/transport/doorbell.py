"""Doorbells: how a producer wakes a consumer that sleeps on ZeroMQ.

A consumer binds one `BellListener` (a PULL socket) and polls it, together with whatever else it
waits on, only after `Ring.prepare_sleep()` said all its rings are empty. Producers connect a
`Bell` (a PUSH socket) to it; a ring calls its bell only when its consumer's `sleeping` flag is
set, so a busy consumer costs its producers no system call. Many rings may share one listener
(the engine has one for all frontends' request rings).
"""
from __future__ import annotations

import logging

import zmq

from minivllm.transport.shm import remove_endpoint
from minivllm.transport.zmq_context import readable

logger = logging.getLogger(__name__)

BELL_MAX_MESSAGE_BYTES = 1024


class Bell:
    """The producer's end: `bell()` sends one empty message.

    A ring calls it once per sleep of its consumer (it claims the `sleeping` flag), so bells
    never pile up; but ZeroMQ updates a sender's credit lazily, so even a drained peer can make
    a non-blocking send fail. A failed send is retried after letting ZeroMQ process its
    commands, then sent blocking for up to a second: a dropped bell would be a hung request.
    """

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        self.socket = ctx.socket(zmq.PUSH)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDTIMEO, 1000)
        self.socket.connect(endpoint)
        self.endpoint = endpoint

    def __call__(self) -> None:
        try:
            self.socket.send(b"", zmq.NOBLOCK)
            return
        except zmq.Again:
            self.socket.getsockopt(zmq.EVENTS)  # process pending credit updates
        try:
            self.socket.send(b"")
        except zmq.Again:  # a consumer stuck for a second is dead or gone: nobody to wake
            pass

    def close(self) -> None:
        self.socket.close(linger=0)


class BellListener:
    """The consumer's end: bind once, poll `socket`, `drain()` after waking."""

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        self.socket = ctx.socket(zmq.PULL)
        self.socket.setsockopt(zmq.LINGER, 0)
        # Bells are empty, so a peer sending more is junk and gets disconnected; but the limit
        # also applies to the ZMTP handshake's READY command (~30-60 bytes): 0 refused every
        # connection and each sleep ended only at its poll timeout.
        self.socket.setsockopt(zmq.MAXMSGSIZE, BELL_MAX_MESSAGE_BYTES)
        self.socket.bind(endpoint)
        self.endpoint = endpoint
        self.lost_wakeups = 0

    def check_timeout(self, data_waiting: bool) -> bool:
        """Call after a sleep that ended at its timeout. Data waiting with no bell queued is a
        wake-up that never came: it costs only latency (the sleep's timeout), so nothing else
        would show it. Logs the first and every 100th; returns True when one was lost."""
        if not data_waiting or readable(self.socket):
            return False
        self.lost_wakeups += 1
        if self.lost_wakeups % 100 == 1:
            logger.warning("doorbell %s: %d sleep(s) ended at their timeout with data waiting "
                           "and no bell: producers' bells are not arriving", self.endpoint,
                           self.lost_wakeups)
        return True

    def drain(self) -> int:
        """Swallow the bells that woke us (the rings are read next); returns how many."""
        n = 0
        while readable(self.socket):
            self.socket.recv(zmq.NOBLOCK)
            n += 1
        return n

    def wait(self, timeout: float) -> bool:
        """Block until a bell (True) or `timeout` seconds (False). A blocking recv wakes
        faster than poll-then-recv: one trip through ZeroMQ instead of two."""
        self.socket.setsockopt(zmq.RCVTIMEO, max(1, int(timeout * 1000)))
        try:
            self.socket.recv()
        except zmq.Again:
            return False
        self.drain()
        return True

    def wait_for(self, ring, spin_s: float, timeout: float) -> bool:
        """The consumer's side of the protocol for one `ring` whose producer rings this bell:
        spin `spin_s`, then sleep until a record is waiting (True) or `timeout` s pass (False)."""
        if ring.spin(spin_s) or not ring.prepare_sleep():
            return True
        try:
            rang = self.wait(timeout)
        finally:
            ring.awake()
        if not rang:
            self.check_timeout(ring.readable())
        return ring.readable()

    def close(self) -> None:
        self.socket.close(linger=0)
        remove_endpoint(self.endpoint)
