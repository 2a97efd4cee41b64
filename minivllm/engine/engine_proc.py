"""The engine process: EngineCore's step loop behind the transport. Read `run()` top to bottom.

    loop:
      ingest()   every frontend's request ring, the ZeroMQ endpoint, the control socket
      step       EngineCore.step_arrays(): schedule, forward + sample, update (arrays)
      publish()  one step-output record per client with new tokens; bells only for sleepers
      idle?      spin briefly on the rings, then sleep on the doorbells and sockets

Clients (frontends with rings, ZeroMQ peers) and the owner table are in clients.py, the drain
state in drain.py. Every accepted request ends with a finishing entry or an error record; a
client that dies has its requests aborted and its blocks freed.
"""
from __future__ import annotations

import itertools
import logging
import os
import time
from collections import OrderedDict, deque
from typing import Callable, Optional

import numpy as np
import zmq

from minivllm.config import TransportConfig, shutdown_timeouts
from minivllm.distributed import data_parallel
from minivllm.engine.clients import Client, FrontendClient, Owners, RouterClient
from minivllm.engine.drain import Drain
from minivllm.engine.endpoint import Endpoint, status_fields
from minivllm.engine.events import EngineEvents
from minivllm.engine.engine_core import EngineCore, StepOutputs
from minivllm.transport import control, protocol, shm
from minivllm.transport.doorbell import Bell, BellListener
from minivllm.transport.zmq_context import process_context, readable
from minivllm.transport.protocol import ProtocolError

logger = logging.getLogger(__name__)

NO_TOKEN = -1  # token id of an entry that only reports a finish (an abort)

# Fault injection for tests (real processes, a real race made reproducible):
# "<frontend name>:<path>" holds that frontend's register while <path> exists, so that a test
# can kill the engine while a registration is in flight; a number of seconds makes every step
# at least that slow.
FAULT_HOLD_REGISTER = "MINIVLLM_FAULT_HOLD_REGISTER"
FAULT_STEP_S = "MINIVLLM_FAULT_STEP_S"

# ZeroMQ messages one ingest reads: a flooding peer costs a step at most this many decodes;
# the rest wait in ZeroMQ's bounded queue, which pushes back on the sender.
ZMQ_READS_PER_INGEST = 64
# While messages are left waiting after a read, the endpoint is read again only this much
# later, idle or not: a flood gets at most ZMQ_READS_PER_INGEST answers per interval instead of
# as many as the engine can write (an idle engine looped on it at ~28,000/s, and the flooder
# and both sides' ZeroMQ threads with it, on the cores the steps need). Its senders then
# block on ZeroMQ's backpressure, costing no CPU.
ZMQ_BACKLOG_INTERVAL_S = 0.02
CONTROL_MAX_MESSAGE_BYTES = 1 << 20  # control messages are small JSON objects
# Identities of peers found gone (disconnected, or their send queue left full) or cut off
# (they ignored their refusals), remembered so that the submits they left queued are refused,
# not run for nobody.
GONE_MEMORY = 4096


def _remember(identities: OrderedDict, identity: bytes) -> None:
    """Add `identity` to a bounded memory of peers, forgetting the oldest past GONE_MEMORY."""
    identities[identity] = None
    identities.move_to_end(identity)
    if len(identities) > GONE_MEMORY:
        identities.popitem(last=False)


class EngineProc:
    def __init__(self, core: EngineCore, transport: TransportConfig) -> None:
        self.core, self.transport = core, transport
        shm.cleanup_stale()
        self.ctx = process_context()
        self.control_endpoint = transport.control or shm.socket_endpoint("control")
        self.control = self.ctx.socket(zmq.ROUTER)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.setsockopt(zmq.MAXMSGSIZE, CONTROL_MAX_MESSAGE_BYTES)
        self.control.bind(self.control_endpoint)
        self.bells = BellListener(self.ctx, shm.socket_endpoint("bell"))
        self.events = EngineEvents(self.ctx, shm.socket_endpoint("events"),
                                   core.allocator.num_blocks)
        self.endpoint: Optional[Endpoint] = None
        self.router: Optional[zmq.Socket] = None
        # The sockets an idle loop sleeps on; paced: all but the endpoint, while it waits its turn.
        self.poller, self.paced_poller = zmq.Poller(), zmq.Poller()
        for poller in (self.poller, self.paced_poller):
            poller.register(self.control, zmq.POLLIN)
            poller.register(self.bells.socket, zmq.POLLIN)
        self.router_paced_until = 0.0  # time.monotonic() before which the endpoint is not read
        if transport.zmq_endpoint:
            self.endpoint = Endpoint(self.ctx, transport.zmq_endpoint, transport.zmq,
                                     core.max_model_len)
            self.router = self.endpoint.socket
            self.poller.register(self.router, zmq.POLLIN)
        self.clients: dict[int, Client] = {}
        self.frontends: dict[str, FrontendClient] = {}
        self.peers: dict[bytes, RouterClient] = {}
        self.gone_peers: OrderedDict[bytes, None] = OrderedDict()
        self.cut_off_peers: OrderedDict[bytes, None] = OrderedDict()
        self._keys = itertools.count(1)  # each client's key
        self.owners = Owners()
        self.step_count = 0
        self.drain = Drain()
        self.stopping = False
        self.counters = dict(requests=0, finished=0, aborted=0, errors=0, overloaded=0,
                             prompt_tokens=0, generation_tokens=0)
        self._next_check = time.monotonic()
        self._fault_step_s = float(os.environ.get(FAULT_STEP_S, 0))
        self.step_times: deque[float] = deque(maxlen=1000)

    # ---- the loop -------------------------------------------------------------------------
    def run(self) -> None:
        logger.info("engine process %d serving: control %s%s", os.getpid(),
                    self.control_endpoint,
                    f", zmq endpoint {self.transport.zmq_endpoint}" if self.router else "")
        try:
            while not self.stopping:
                self.ingest()
                if self.core.has_unfinished():
                    self.publish(self._step())
                elif self.drain.stop_when_done:
                    break
                else:
                    self.wait_for_work()
                self._check_frontends()
                self.events.tick(self)
                if self.drain.expired():
                    self._abort_all()
        finally:
            self.close()

    # ---- ingest ---------------------------------------------------------------------------
    def ingest(self) -> None:
        for client in list(self.frontends.values()):
            self._read_ring(client)
        if self.router is not None:
            self._read_router()
        self._read_control()

    def _read_ring(self, client: FrontendClient) -> None:
        for _ in range(4096):  # bounded: a flood from one frontend must not starve the step
            try:
                record = protocol.read_record(client.request_ring)
            except ProtocolError as exc:
                client.send_error(exc.code, str(exc), exc.request_id)
                continue
            if record is None:
                return
            self._handle(client, record)

    def _read_router(self) -> None:
        now = time.monotonic()
        if now < self.router_paced_until:
            return
        for _ in range(ZMQ_READS_PER_INGEST):
            if not readable(self.router):
                return
            frames = self.router.recv_multipart(zmq.NOBLOCK)
            identity = frames[0]
            client = self.peers.get(identity)
            if client is None:
                client = self.peers[identity] = RouterClient(next(self._keys), identity,
                                                             self.router)
                self.clients[client.key] = client
            if len(frames) != 2:
                client.send_error(protocol.ERR_MALFORMED,
                                  f"expected one record per message, got {len(frames) - 1} frames")
                continue
            try:
                self._handle(client, protocol.decode(frames[1]))
            except ProtocolError as exc:
                client.send_error(exc.code, str(exc), exc.request_id)
            self._forget_idle_peer(client)
        if readable(self.router):  # a backlog: its next turn comes after the interval
            self.router_paced_until = now + ZMQ_BACKLOG_INTERVAL_S

    def _forget_idle_peer(self, client: Client) -> None:
        """A ROUTER peer is remembered only while it has requests in flight (every connection
        is a new identity: remembering all would grow without bound); a gone one is dropped."""
        if isinstance(client, RouterClient) and (client.gone or not client.requests):
            self._drop(client)

    def _handle(self, client: Client, record) -> None:
        if isinstance(record, protocol.Submit):
            self._submit(client, record)
        elif isinstance(record, protocol.Abort):
            self._abort(client, record.request_id)
        elif isinstance(record, protocol.StatusQuery):
            client.send_status(record.tag, status_fields(self, client))
        else:
            client.send_error(protocol.ERR_MALFORMED,
                              f"the engine takes submit (kind {protocol.KIND_SUBMIT}), abort "
                              f"(kind {protocol.KIND_ABORT}) and status query (kind "
                              f"{protocol.KIND_STATUS_QUERY}) records, not kind {record.kind}")

    def _submit(self, client: Client, rec: protocol.Submit) -> None:
        rid = rec.request_id
        if self.drain.active:
            client.send_error(protocol.ERR_DRAINING,
                              "the engine is draining and takes no new requests", rid)
            return
        if rid in client.requests:
            client.send_error(protocol.ERR_DUPLICATE_ID,
                              f"request id {rid} is already in flight", rid)
            return
        if isinstance(client, RouterClient):
            refusal = self._overload(client)
            if refusal:
                self.counters["overloaded"] += 1
                client.send_error(protocol.ERR_OVERLOADED, refusal, rid)
                if not client.gone:  # that answer went out: the peer reads again
                    self.gone_peers.pop(client.identity, None)
                if len(client.requests) >= self.transport.zmq.max_in_flight_per_peer:
                    client.refused += 1
                    if client.refused >= self.transport.zmq.max_refusals:
                        self._cut_off(client)
                return
            client.refused = 0
        owner = self.owners.add(client.key, rid)
        try:
            self.core.add_request(owner, rec.prompt_token_ids, rec.sampling_params(),
                                  priority=rec.priority)
        except ValueError as exc:
            self.owners.remove(owner)
            self.counters["errors"] += 1
            client.send_error(protocol.ERR_INVALID_REQUEST, str(exc), rid)
            return
        client.requests[rid] = owner
        self.counters["requests"] += 1
        self.counters["prompt_tokens"] += len(rec.prompt_token_ids)

    def _overload(self, client: RouterClient) -> Optional[str]:
        """Why the endpoint takes no new request from `client` now, or None (the in-flight
        bounds: OVERLOADED, as HTTP's 429)."""
        limits = self.transport.zmq
        if client.identity in self.cut_off_peers:
            return (f"this connection was cut off: it sent {limits.max_refusals} submits in a "
                    f"row past its limit of {limits.max_in_flight_per_peer} requests in flight, "
                    f"so its requests were aborted; reconnect, and retry a refused submit only "
                    f"once one of your requests has ended")
        if client.identity in self.gone_peers:
            return (f"this connection was found gone (disconnected, or {limits.send_queue} "
                    f"records left unread), so its requests were aborted: read what the engine "
                    f"sends, then retry")
        if len(client.requests) >= limits.max_in_flight_per_peer:
            return (f"this connection has {len(client.requests)} requests in flight, the limit "
                    f"per connection: retry when one finishes")
        if self.zmq_in_flight() >= limits.max_in_flight:
            return (f"the endpoint's connections have {limits.max_in_flight} requests in "
                    f"flight, its limit: retry later")
        return None

    def _cut_off(self, client: RouterClient) -> None:
        """A peer that ignores its refusals floods: its requests, which share every step with
        everyone else's, end now (an abort entry each), not once its send queue fills."""
        logger.warning("client %s sent %d submits in a row past its limit of %d in flight: "
                       "cut off, its %d requests aborted", client.name, client.refused,
                       self.transport.zmq.max_in_flight_per_peer, len(client.requests))
        _remember(self.cut_off_peers, client.identity)
        for rid in list(client.requests):
            self._abort(client, rid)

    def zmq_in_flight(self) -> int:
        return sum(len(p.requests) for p in self.peers.values())

    def _abort(self, client: Client, rid: int, notify: bool = True) -> None:
        owner = client.requests.get(rid)
        if owner is None or not self.core.abort_request(owner):
            return  # finished already: its last entry is on its way
        del client.requests[rid]
        self.owners.remove(owner)
        self.counters["aborted"] += 1
        if notify:
            client.send_step(self.step_count, np.array([rid], np.uint64),
                             np.array([NO_TOKEN], np.int32),
                             np.array([protocol.FINISH_ABORT], np.uint8))

    def _step(self) -> StepOutputs:
        start = time.perf_counter()
        out = self.core.step()
        for owner, message in self.core.take_failed():
            self._fail(owner, message)
        if self._fault_step_s:
            time.sleep(self._fault_step_s)
        end = time.perf_counter()
        self.step_times.append(end - start)
        self.events.on_step(self.core.last_batch, start, end)
        return out

    def _fail(self, owner: int, message: str) -> None:
        """A request the core refused after taking it (its grammar does not compile): an
        error record names it, as a refused submit's does."""
        key, rid = int(self.owners.client[owner]), int(self.owners.request_id[owner])
        self.owners.remove(owner)
        self.counters["errors"] += 1
        client = self.clients.get(key)
        if client is not None:
            client.requests.pop(rid, None)
            client.send_error(protocol.ERR_INVALID_REQUEST, message, rid)
            self._forget_idle_peer(client)

    def step_p99(self) -> float:
        """The p99 of the recent steps' durations in s (0 before the first): shutdowns wait
        at least three of these (config.shutdown_timeouts)."""
        return float(np.percentile(self.step_times, 99)) if self.step_times else 0.0

    # ---- publish --------------------------------------------------------------------------
    def publish(self, out: StepOutputs) -> None:
        """The step's entries, one record per client that has some; finished requests end.
        Prompt logprobs go first: a request may finish in the step that ends its prefill."""
        self.step_count += 1
        for owner, (first, *arrays) in (out.prompt_logprobs or {}).items():
            client = self.clients.get(int(self.owners.client[owner]))
            if client is not None:
                client.send_prompt_logprobs(int(self.owners.request_id[owner]), first, *arrays)
        if len(out):
            clients = self.owners.client[out.owners]
            request_ids = self.owners.request_id[out.owners]
            token_ids = out.token_ids.astype(np.int32)
            self.counters["generation_tokens"] += len(out)
            first = clients[0]
            if (clients == first).all():  # the common case: one client this step
                self._send(int(first), request_ids, token_ids, out.finish, out.logprobs)
            else:
                for key in np.unique(clients).tolist():
                    rows = np.flatnonzero(clients == key)
                    self._send(key, request_ids[rows], token_ids[rows], out.finish[rows],
                               None if out.logprobs is None
                               else tuple(a[rows] for a in out.logprobs))
            for i in np.flatnonzero(out.finish).tolist():
                self.owners.remove(int(out.owners[i]))
                self.counters["finished"] += 1
                client = self.clients.get(int(clients[i]))
                if client is not None:
                    client.requests.pop(int(request_ids[i]), None)
                    self._forget_idle_peer(client)
            for client in [p for p in self.peers.values() if p.gone]:  # vanished mid-stream
                logger.info("client %s is gone (%s): aborting its requests", client.name,
                            "it left its send queue full" if client.stalled else "disconnected")
                self._drop(client)
        for client in self.frontends.values():
            client.flush()

    def _send(self, key: int, request_ids, token_ids, finish, logprobs) -> None:
        client = self.clients.get(key)
        if client is not None:  # else gone: its requests were aborted, these are stragglers
            client.send_step(self.step_count, request_ids, token_ids, finish,
                             *(logprobs or ()))

    # ---- idle -----------------------------------------------------------------------------
    def wait_for_work(self) -> None:
        """Spin on the rings for spin_us, then sleep on the bells and sockets (no busy CPU)."""
        rings = [c.request_ring for c in self.frontends.values()]
        deadline = time.perf_counter() + self.transport.spin_us * 1e-6
        while time.perf_counter() < deadline:
            if any(r.readable() for r in rings):
                return
        if not all(r.prepare_sleep() for r in rings):
            for r in rings:
                r.awake()
            return
        timeout = self.drain.wait_s(self.transport.frontend_check_s)
        poller, paced = self.poller, self.router_paced_until - time.monotonic()
        if paced > 0:  # the endpoint has a backlog but not its turn: sleep until the turn
            poller, timeout = self.paced_poller, min(timeout, paced)
        events = dict(poller.poll(int(timeout * 1000) + 1))
        for r in rings:
            r.awake()
        if self.bells.socket in events:
            self.bells.drain()
        elif not events and paced <= 0:
            self.bells.check_timeout(any(r.readable() for r in rings))

    # ---- clients --------------------------------------------------------------------------
    def _drop(self, client: Client, unlink: bool = False) -> None:
        for rid in list(client.requests):
            self._abort(client, rid, notify=False)
        self.clients.pop(client.key, None)
        if isinstance(client, FrontendClient):
            self.frontends.pop(client.name, None)
            client.close(unlink=unlink)
        elif isinstance(client, RouterClient):
            self.peers.pop(client.identity, None)
            if client.gone:  # refused until it reads (_overload)
                _remember(self.gone_peers, client.identity)

    def _check_frontends(self) -> None:
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + self.transport.frontend_check_s
        self.core.check_ranks()  # a dead tensor-parallel rank ends the engine, even when idle
        for client in list(self.frontends.values()):
            if not client.alive():
                logger.warning("frontend %s (pid %d) died: aborting its %d requests",
                               client.name, client.pid, len(client.requests))
                self._drop(client, unlink=True)

    # ---- control --------------------------------------------------------------------------
    def _read_control(self) -> None:
        while readable(self.control):
            try:
                identity, *_, frame = self.control.recv_multipart(zmq.NOBLOCK)
            except ValueError:
                continue  # fewer than two frames: nothing to answer to
            seq = None
            try:
                message = control.decode(frame)
                seq = message.get("seq")
                reply = {"ok": True, **self._control_op(message)}
            except KeyError as exc:
                reply = {"ok": False, "error": f"{message.get('op')!r} needs the field {exc}"}
            except (ValueError, TypeError, OSError) as exc:
                reply = {"ok": False, "error": str(exc)}
            self.control.send_multipart([identity, b"", control.encode({**reply, "seq": seq})])

    def _control_op(self, m: dict) -> dict:
        op = m.get("op")
        if op == "register":
            return self._register(m)
        if op == "unregister":
            client = self.frontends.get(m["frontend"])
            if client is not None:
                self._drop(client)
            return {}
        if op == "abort":
            client = self.frontends.get(m["frontend"])
            if client is None:
                raise ValueError(f"no frontend named {m['frontend']!r} is registered")
            for rid in m["request_ids"]:
                self._abort(client, int(rid))
            return {}
        if op == "stats":
            return self.stats()
        if op == "health":
            return {"state": "draining" if self.drain.active else "ready", "pid": os.getpid()}
        if op == "drain":
            self.drain.start(m.get("timeout_s"))
            return {}
        if op == "shutdown":
            if m.get("drain", True):
                self.drain.start(m.get("timeout_s"), then_stop=True)
            else:
                self.stopping = True
            return {}
        raise ValueError(f"unknown control op {op!r}: expected one of {', '.join(control.OPS)}")

    def _register(self, m: dict) -> dict:
        name = str(m["frontend"])
        frontend, _, path = os.environ.get(FAULT_HOLD_REGISTER, "").partition(":")
        if frontend == name and os.path.exists(path):
            logger.warning("fault injection: holding the register of %s while %s exists "
                           "(engine pid %d)", name, path, os.getpid())
            while os.path.exists(path):
                time.sleep(0.05)
        if name in self.frontends:
            self._drop(self.frontends[name])
        request_ring = shm.attach_ring(m["request_ring"])
        try:
            output_ring = shm.attach_ring(m["output_ring"])
        except BaseException:
            request_ring.close()
            raise
        client = FrontendClient(next(self._keys), name, int(m["pid"]), request_ring, output_ring,
                                Bell(self.ctx, m["bell"]))
        self.clients[client.key] = client
        self.frontends[name] = client
        logger.info("frontend %s (pid %d) registered", name, client.pid)
        core = self.core
        return {"bell": self.bells.endpoint, "events": self.events.endpoint,
                "pid": os.getpid(), "model": core.source.name,
                "max_model_len": core.max_model_len,
                "vocab_size": core.source.arch.vocab_size,
                "eos_token_ids": list(core.eos_token_ids),
                "sampling_defaults": core.sampling_defaults}

    def stats(self) -> dict:
        alloc, sched = self.core.allocator, self.core.scheduler
        return {"step": self.step_count, "running": len(sched.running),
                "waiting": len(sched.waiting),
                "waiting_for_grammar": len(self.core.grammars.waiting),
                "num_blocks": alloc.num_blocks,
                "free_blocks": alloc.num_free_blocks, "kv_usage": alloc.usage,
                "prefix_queries": alloc.prefix_queries, "prefix_hits": alloc.prefix_hits,
                "preemptions": sched.num_preemptions, "frontends": sorted(self.frontends),
                "zmq_peers": len(self.peers), "zmq_in_flight": self.zmq_in_flight(),
                "step_p99_s": self.step_p99(), "ranks": self.core.ranks_info(),
                **self.core.timings.snapshot(), **self.counters}

    # ---- stop -------------------------------------------------------------------------------
    def _abort_all(self) -> None:
        """Abort every request in flight, telling its client (a drain deadline, or the end)."""
        for client in list(self.clients.values()):
            for rid in list(client.requests):
                self._abort(client, rid)

    def close(self) -> None:
        self._abort_all()
        for client in self.frontends.values():
            client.flush()
            client.close()
        self.clients.clear()
        self.frontends.clear()
        self.peers.clear()
        self.bells.close()
        self.events.close()
        self.control.close(linger=0)
        shm.remove_endpoint(self.control_endpoint)
        if self.endpoint is not None:
            self.endpoint.close()
            shm.remove_endpoint(self.transport.zmq_endpoint)
        self.core.close()
        logger.info("engine process %d stopped", os.getpid())


def run_engine(engine_config, transport: TransportConfig,
               ready: Optional[Callable[[], None]] = None,
               drain_timeout_s: Optional[float] = None) -> None:
    """The engine process's main: load the model, bind the sockets, call `ready`, then serve
    until told to stop. SIGTERM and SIGINT drain (refuse new requests; in-flight ones get
    `drain_timeout_s` by the shutdown rule, or all they need if None) and stop."""
    import signal

    from minivllm import logger as log_setup

    log_setup.configure()
    data_parallel.take_share(engine_config)
    proc = EngineProc(EngineCore(engine_config), transport)
    if ready is not None:
        ready()

    def on_signal(signum, frame):
        proc.drain.start(None if drain_timeout_s is None else
                         shutdown_timeouts(drain_timeout_s, proc.step_p99())[0], then_stop=True)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    proc.run()
