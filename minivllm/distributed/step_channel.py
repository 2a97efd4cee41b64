"""How rank 0 hands each step's record (step_record.py) to the other ranks.

A rank on rank 0's host reads it from its own shared-memory ring (single producer, single
consumer: the transport's Ring), sleeping on a ZeroMQ doorbell when the ring is empty, as the
engine's frontends do. A rank on another host (or any rank, when `remote` forces it, as tests
do) gets it as one ZeroMQ message from rank 0's ROUTER socket. Either way the bytes are the same
record, never pickled.

The ranks meet through the group's TCPStore: each rank > 0 posts its host name; rank 0 answers
with a ring name (same host) or its ROUTER endpoint, and a ring's reader posts its doorbell.
"""
from __future__ import annotations

import socket
from typing import Optional

import numpy as np
import torch.distributed as dist
import zmq

from minivllm.distributed.group import RankDiedError, store_key
from minivllm.transport import shm
from minivllm.transport.doorbell import Bell, BellListener
from minivllm.transport.zmq_context import process_context

SPIN_S = 50e-6  # as TransportConfig.spin_us: a reader spins this long before it sleeps
_HELLO = b"rank"
HELLO_TIMEOUT_MS = 300_000  # a remote rank connects right after joining the process group


def _key(rank: int, what: str) -> str:
    return store_key("steps", rank, what)


class StepSender:
    """Rank 0's end: one ring per local rank, one ROUTER for the remote ones."""

    def __init__(self, store: dist.Store, size: int, remote: bool, host: str,
                 ring_capacity: int) -> None:
        self.ctx = process_context()
        self.rings: list = []
        self.router: Optional[zmq.Socket] = None
        self.identities: list[bytes] = []
        try:
            self._connect(store, size, remote, host, ring_capacity)
        except BaseException:
            self.close()
            raise

    def _connect(self, store: dist.Store, size: int, remote: bool, host: str,
                 ring_capacity: int) -> None:
        here = socket.gethostname()
        far = [r for r in range(1, size)
               if remote or store.get(_key(r, "host")).decode() != here]
        if far:
            self.router = self.ctx.socket(zmq.ROUTER)
            self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unknown rank is an error
            self.router.bind(f"tcp://{host}:*")
            endpoint = self.router.getsockopt(zmq.LAST_ENDPOINT).decode()
        for r in range(1, size):
            if r in far:
                store.set(_key(r, "ring"), "zmq " + endpoint)
                continue
            ring = shm.create_ring(f"tp{r}", ring_capacity)
            self.rings.append(ring)
            store.set(_key(r, "ring"), ring.name)
        for ring, r in zip(self.rings, (r for r in range(1, size) if r not in far)):
            ring.bell = Bell(self.ctx, store.get(_key(r, "bell")).decode())
        for _ in far:  # each remote rank says hello once connected: then sends reach it
            if not self.router.poll(HELLO_TIMEOUT_MS):
                raise RankDiedError(f"{len(far) - len(self.identities)} remote tensor-parallel "
                                    f"rank(s) joined the group but never connected to "
                                    f"{endpoint}")
            self.identities.append(self.router.recv_multipart()[0])

    def send(self, record: np.ndarray) -> None:
        for ring in self.rings:
            ring.write(record, timeout=60.0)
        for identity in self.identities:
            try:
                self.router.send_multipart([identity, record], copy=False)
            except zmq.ZMQError as exc:  # ROUTER_MANDATORY: the rank's connection is gone
                raise RankDiedError(f"a tensor-parallel rank on the remote path is "
                                    f"unreachable: {exc}") from exc

    def close(self) -> None:
        for ring in self.rings:
            if ring.bell is not None:
                ring.bell.close()
            ring.close()  # the creator's close unlinks the segment
        self.rings = []
        if self.router is not None:
            self.router.close(linger=0)
            self.router = None


class StepReceiver:
    """A rank > 0's end: its ring and doorbell, or a DEALER connected to rank 0."""

    def __init__(self, store: dist.Store, rank: int) -> None:
        self.ctx = process_context()
        self.ring = self.listener = self.dealer = None
        try:
            self._connect(store, rank)
        except BaseException:
            self.close()
            raise

    def _connect(self, store: dist.Store, rank: int) -> None:
        store.set(_key(rank, "host"), socket.gethostname())
        where = store.get(_key(rank, "ring")).decode()
        if where.startswith("zmq "):
            self.dealer = self.ctx.socket(zmq.DEALER)
            self.dealer.connect(where[4:])
            self.dealer.send(_HELLO)
            return
        self.ring = shm.attach_ring(where)
        self.listener = BellListener(self.ctx, shm.socket_endpoint(f"tpbell{rank}"))
        store.set(_key(rank, "bell"), self.listener.endpoint)

    def recv(self, timeout: float) -> Optional[bytes]:
        """The next record, or None after `timeout` seconds without one."""
        if self.dealer is not None:
            if not self.dealer.poll(int(timeout * 1000)):
                return None
            return self.dealer.recv()
        record = self.ring.read()
        if record is None and self.listener.wait_for(self.ring, SPIN_S, timeout):
            record = self.ring.read()
        return record

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()
        for sock in (self.listener, self.dealer):
            if sock is not None:
                sock.close()
        self.ring = self.listener = self.dealer = None
