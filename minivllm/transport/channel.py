"""A frontend's connection to the engine process: two rings, a doorbell, the control socket.

The frontend owns its rings (it creates and unlinks them): the request ring it writes, the
output ring the engine writes. It registers them over the control channel; the reply names the
engine's doorbell, which the request ring rings when the engine sleeps. Reading is the
consumer's side of the doorbell protocol: `wait()` spins for `spin_us`, then sets the output
ring's `sleeping` flag and blocks on this frontend's own doorbell.

This is the synchronous core the asyncio client and the benchmarks build on; it imports no
torch and runs no model code.
"""
from __future__ import annotations

import os
import secrets
import time
from typing import Optional, Sequence

from minivllm.config import TransportConfig
from minivllm.transport import protocol, shm
from minivllm.transport.control import ControlClient, EngineGoneError
from minivllm.transport.doorbell import Bell, BellListener
from minivllm.transport.zmq_context import process_context


HEALTH_ATTEMPT_S = 1.0  # a health request lost with a dying engine is sent again after this


class EngineChannel:
    # The most step outputs one read_batch() returns: a batch pays for its arrays once, and
    # the cap bounds the copy and how long a reader goes without yielding.
    READ_BATCH_RECORDS = 256

    def __init__(self, control_endpoint: str, config: Optional[TransportConfig] = None,
                 name: Optional[str] = None, register_timeout: float = 30.0) -> None:
        self.config = config or TransportConfig()
        self.name = name or f"frontend-{os.getpid()}-{secrets.token_hex(2)}"
        shm.cleanup_stale()
        self.ctx = process_context()
        self.request_ring = self.output_ring = None
        self.listener = self.control = self.engine_bell = None
        self.engine_pid: Optional[int] = None
        try:
            self.request_ring = shm.create_ring("req", self.config.ring_capacity)
            self.output_ring = shm.create_ring("out", self.config.ring_capacity)
            self.listener = BellListener(self.ctx, shm.socket_endpoint("fbell"))
            self.control = ControlClient(self.ctx, control_endpoint)
            self.info = self.register(register_timeout)
        except BaseException:
            self.close()
            raise

    def register(self, timeout: float = 30.0) -> dict:
        """Attach this frontend's rings to the engine (again, after an engine restart: the
        rings are emptied first, since whatever they held belonged to the dead engine).

        An engine that dies before it answers takes the register with it, so the engine is
        asked its pid first and the register is sent again, to its successor, if that pid
        dies. An engine must answer within `timeout` s; its register then gets as long."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                pid = self.control.call("health", timeout=min(
                    HEALTH_ATTEMPT_S, max(0.0, deadline - time.monotonic())))["pid"]
            except TimeoutError:
                if time.monotonic() < deadline:
                    continue  # sent to an engine that died, or to none yet: ask again
                raise
            self.request_ring.reset()
            self.output_ring.reset()
            try:
                info = self.control.call(
                    "register", timeout=timeout, engine_pid=pid, frontend=self.name,
                    pid=os.getpid(), request_ring=self.request_ring.name,
                    output_ring=self.output_ring.name, bell=self.listener.endpoint)
                break
            except EngineGoneError:
                continue
        self.engine_pid = pid
        if self.engine_bell is not None:
            self.engine_bell.close()
        self.engine_bell = Bell(self.ctx, info["bell"])
        self.request_ring.bell = self.engine_bell
        return info

    # ---- requests -------------------------------------------------------------------------
    def submit(self, request_id: int, prompt_token_ids: Sequence[int], params,
               priority: int = 0) -> None:
        protocol.put_submit(self.request_ring, request_id, prompt_token_ids, params, priority,
                            timeout=self.config.ring_timeout_s)

    def abort(self, request_id: int) -> None:
        protocol.put_abort(self.request_ring, request_id, timeout=self.config.ring_timeout_s)

    # ---- outputs --------------------------------------------------------------------------
    def read(self):
        """The next record from the engine (StepOutput or ErrorRecord), or None."""
        return protocol.read_record(self.output_ring)

    def read_batch(self, max_records: int = READ_BATCH_RECORDS
                   ) -> protocol.StepBatch | protocol.ErrorRecord | None:
        """The step outputs waiting in the output ring as one StepBatch (their entries
        concatenated, in order), or the next record when it is an ErrorRecord, or None.
        Raises ProtocolError for a malformed record, as read() does (it is consumed)."""
        return protocol.read_batch(self.output_ring, max_records)

    def wait(self, timeout: float) -> bool:
        """Until the output ring has a record (True) or `timeout` seconds pass (False)."""
        return self.listener.wait_for(self.output_ring, min(self.config.spin_us * 1e-6, timeout),
                                      timeout)

    # ---- control --------------------------------------------------------------------------
    def call(self, op: str, timeout: float = 10.0, **args) -> dict:
        """A control request to the registered engine (EngineGoneError as soon as it dies)."""
        return self.control.call(op, timeout=timeout, engine_pid=self.engine_pid, **args)

    def close(self, unregister: bool = True) -> None:
        """Detach from the engine and remove this frontend's rings and sockets. Idempotent."""
        if self.control is not None and unregister and self.request_ring is not None:
            try:
                self.call("unregister", timeout=1.0, frontend=self.name)
            except Exception:  # noqa: BLE001  (the engine may be gone: we clean up regardless)
                pass
        for part in (self.engine_bell, self.listener, self.control, self.request_ring,
                     self.output_ring):
            if part is not None:
                part.close()
        self.engine_bell = self.listener = self.control = None
        self.request_ring = self.output_ring = None

    def __enter__(self) -> "EngineChannel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
