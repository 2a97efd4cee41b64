"""The engine process's clients: where each one's records go, and the one owner table.

A client is a frontend process (its own request and output rings, registered over the control
channel) or a peer of the ZeroMQ ROUTER endpoint; clients choose their request ids
independently. The core knows a request by an int64 owner: `Owners` maps owners to (client,
request id), and each client's `requests` maps its ids back to owners.
"""
from __future__ import annotations

from collections import deque
from typing import Optional

import numpy as np
import zmq

from minivllm._cext.ring import RingFullError
from minivllm.transport import protocol, shm
from minivllm.transport.doorbell import Bell


class Owners:
    """owner -> (client key, request id) for every request in the core. Owners are indices into
    arrays, reused once a request has ended (the core never names an ended owner again), so a
    step's outputs find their clients with numpy, not a Python lookup per token."""

    def __init__(self, capacity: int = 256) -> None:
        self.client = np.full(capacity, -1, np.int64)
        self.request_id = np.zeros(capacity, np.uint64)
        self._free = list(range(capacity - 1, -1, -1))

    def add(self, client_key: int, request_id: int) -> int:
        if not self._free:
            grown = len(self.client)
            self.client = np.concatenate([self.client, np.full(grown, -1, np.int64)])
            self.request_id = np.concatenate([self.request_id, np.zeros(grown, np.uint64)])
            self._free = list(range(2 * grown - 1, grown - 1, -1))
        owner = self._free.pop()
        self.client[owner], self.request_id[owner] = client_key, request_id
        return owner

    def remove(self, owner: int) -> None:
        self.client[owner] = -1
        self._free.append(owner)


class Client:
    """Where one client's records go, and which of its requests are in flight (id -> owner)."""

    def __init__(self, key: int, name: str) -> None:
        self.key, self.name = key, name
        self.requests: dict[int, int] = {}

    def _put(self, put, encode, *args) -> None:
        """Send one record: `put` writes it into a ring, `encode` makes it a frame."""
        raise NotImplementedError

    def send_step(self, step: int, *arrays) -> None:
        self._put(protocol.put_step_output, protocol.encode_step_output, step, *arrays)

    def send_error(self, code: int, message: str, request_id: Optional[int] = None) -> None:
        self._put(protocol.put_error, protocol.encode_error, code, message, request_id)

    def send_prompt_logprobs(self, request_id: int, first_position: int, *arrays) -> None:
        self._put(protocol.put_prompt_logprobs, protocol.encode_prompt_logprobs, request_id,
                  first_position, *arrays)

    def send_status(self, tag: int, fields: dict) -> None:
        self._put(protocol.put_status, protocol.encode_status, tag, fields)

    def close(self) -> None:
        pass


class FrontendClient(Client):
    """A frontend process: records go into its output ring; a full ring (a frontend that reads
    slowly) queues them here instead of stalling the step loop."""

    def __init__(self, key: int, name: str, pid: int, request_ring, output_ring,
                 bell: Bell) -> None:
        super().__init__(key, name)
        self.pid, self.request_ring, self.output_ring, self.bell = pid, request_ring, output_ring, bell
        self.output_ring.bell = bell
        self.backlog: deque[bytes] = deque()

    def _put(self, put, encode, *args) -> None:
        if not self.backlog:
            try:
                put(self.output_ring, *args, timeout=0.0)
                return
            except RingFullError:
                pass
        self.backlog.append(encode(*args))

    def flush(self) -> None:
        while self.backlog:
            try:
                self.output_ring.write(self.backlog[0], timeout=0.0)
            except RingFullError:
                return
            self.backlog.popleft()

    def alive(self) -> bool:
        return shm.pid_alive(self.pid)

    def close(self, unlink: bool = False) -> None:
        names = (self.request_ring.name, self.output_ring.name)
        self.request_ring.close()
        self.output_ring.close()
        self.bell.close()
        if unlink:  # the frontend died: its segments are ours to remove
            for name in names:
                shm.unlink_segment(name)


class RouterClient(Client):
    """A peer of the ZeroMQ endpoint: records go out as frames. A peer is `gone` once a send
    fails: it disconnected, or it left the endpoint's whole send queue unread (`stalled`)."""

    def __init__(self, key: int, identity: bytes, socket: zmq.Socket) -> None:
        super().__init__(key, f"zmq:{identity.hex()}")
        self.identity, self.socket = identity, socket
        self.gone = self.stalled = False
        self.refused = 0  # submits refused in a row for its own in-flight limit

    def _put(self, put, encode, *args) -> None:
        try:
            self.socket.send_multipart([self.identity, encode(*args)], zmq.NOBLOCK)
        except zmq.Again:  # ROUTER_MANDATORY: its send queue (SNDHWM) is full
            self.gone = self.stalled = True
        except zmq.ZMQError:  # ROUTER_MANDATORY: the peer disconnected
            self.gone = True
