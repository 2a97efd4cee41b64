"""The engine's ZeroMQ endpoint for other-language clients: a ROUTER socket bound with the
limits that let it face peers the engine does not trust (ipc/PROTOCOL.md, "ZeroMQ endpoint"),
and CURVE authentication when keys are configured.

ZeroMQ itself enforces the byte bounds: a frame over `max_message_bytes` disconnects its peer
before it is stored, RECEIVE_QUEUE bounds what waits per peer (then TCP pushes back on the
sender), `send_queue` what waits for a peer that does not read. The engine enforces the
request bounds (engine_proc: MV_ERR_OVERLOADED).
"""
from __future__ import annotations

import ipaddress
import logging
import os

import zmq

from minivllm.config import ZmqEndpointConfig
from minivllm.transport import protocol

logger = logging.getLogger(__name__)

RECEIVE_QUEUE = 256  # messages ZeroMQ holds per peer before the sender is pushed back
# The kernel's receive buffer per TCP connection (autotuned, it grows to megabytes of unread
# submits that outlive a flooder that has gone): room for two of the largest messages.
MIN_RECEIVE_BUFFER = 256 << 10
# The kernel's send buffer per TCP connection: autotuned, it holds ~20,000 more records for a
# peer that does not read, so `send_queue` alone would take three times as long to fill (the
# flooder's admitted requests run all that while). Step outputs are small; this is plenty.
SEND_BUFFER = 256 << 10
MIN_MESSAGE_BYTES = 64 << 10


def message_limit(config: ZmqEndpointConfig, max_model_len: int) -> int:
    """The endpoint's ZMQ_MAXMSGSIZE: as configured, or room for a submit of a whole context's
    prompt and as many stop ids (at least 64 KiB)."""
    if config.max_message_bytes is not None:
        return config.max_message_bytes
    return max(MIN_MESSAGE_BYTES, (protocol.SUBMIT_FIXED_BYTES + 8 * max_model_len + 7) & ~7)


class Endpoint:
    """The bound ROUTER socket, and the CURVE authenticator that vets its peers (if any)."""

    def __init__(self, ctx: zmq.Context, address: str, config: ZmqEndpointConfig,
                 max_model_len: int) -> None:
        self.max_message_bytes = message_limit(config, max_model_len)
        self.auth = None
        self.socket = ctx.socket(zmq.ROUTER)
        try:
            self.socket.setsockopt(zmq.LINGER, 0)
            self.socket.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
            self.socket.setsockopt(zmq.RCVHWM, RECEIVE_QUEUE)
            self.socket.setsockopt(zmq.RCVBUF, max(MIN_RECEIVE_BUFFER,
                                                   2 * self.max_message_bytes))
            self.socket.setsockopt(zmq.SNDHWM, config.send_queue)
            self.socket.setsockopt(zmq.SNDBUF, SEND_BUFFER)
            self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a gone or full peer raises
            if config.curve:
                self.auth = _start_curve(ctx, self.socket, config)
            else:
                _warn_if_exposed(address)
            self.socket.bind(address)
        except BaseException:
            self.close()
            raise
        logger.info("zmq endpoint %s: frames up to %d bytes, %d requests in flight per "
                    "connection and %d in all, %s", address, self.max_message_bytes,
                    config.max_in_flight_per_peer, config.max_in_flight,
                    f"CURVE, client keys from {config.curve_clients}" if self.auth
                    else "no authentication")

    def close(self) -> None:
        self.socket.close(linger=100)  # time to deliver the last aborts; bounded by SNDHWM
        if self.auth is not None:
            self.auth.stop()


def _start_curve(ctx: zmq.Context, socket: zmq.Socket, config: ZmqEndpointConfig):
    """Make `socket` a CURVE server whose ZAP handler admits the keys in curve_clients."""
    import zmq.auth
    from zmq.auth.thread import ThreadAuthenticator

    if not zmq.has("curve"):
        raise ValueError("this libzmq has no CURVE support: the endpoint cannot authenticate")
    public, secret = zmq.auth.load_certificate(config.curve_secret_key)
    if secret is None:
        raise ValueError(f"curve_secret_key: {config.curve_secret_key} holds no secret key "
                         f"(give the .key_secret file)")
    clients = [n for n in os.listdir(config.curve_clients) if n.endswith(".key")]
    if not clients:
        raise ValueError(f"curve_clients: {config.curve_clients} holds no client public key "
                         f"(*.key): nobody could connect")
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=config.curve_clients)
    socket.curve_secretkey, socket.curve_publickey, socket.curve_server = secret, public, True
    return auth


def _warn_if_exposed(address: str) -> None:
    """One line when a TCP endpoint without CURVE is reachable from other hosts."""
    if not address.startswith("tcp://"):
        return
    host = address[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        logger.warning("zmq endpoint %s takes connections from other hosts with no "
                       "authentication: anyone who reaches it can submit requests (set "
                       "--zmq-curve-secret-key and --zmq-curve-clients)", address)


def status_fields(proc, client) -> dict:
    """The fields of a status record (mv_status after its tag) for `client` of EngineProc
    `proc`."""
    stats = proc.stats()
    core = proc.core
    limits = proc.transport.zmq
    return {"state": protocol.STATE_DRAINING if proc.drain.active else protocol.STATE_READY,
            "pid": os.getpid(),
            "max_message_bytes": proc.endpoint.max_message_bytes if proc.endpoint else 0,
            "max_model_len": core.max_model_len, "vocab_size": core.source.arch.vocab_size,
            "max_in_flight_per_peer": limits.max_in_flight_per_peer,
            "max_in_flight": limits.max_in_flight, "peer_in_flight": len(client.requests),
            "zmq_in_flight": proc.zmq_in_flight(),
            **{k: stats[k] for k in ("zmq_peers", "running", "waiting", "num_blocks",
                                     "free_blocks", "step", "requests", "finished", "aborted",
                                     "errors", "overloaded", "prompt_tokens",
                                     "generation_tokens", "preemptions", "prefix_queries",
                                     "prefix_hits", "step_p99_s")}}
