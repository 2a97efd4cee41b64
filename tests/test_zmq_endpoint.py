"""The ZeroMQ endpoint as a public door (issue 18), against a real engine process behind CURVE
on TCP, with small in-flight bounds: frames past the size limit disconnect their peer, submits
past the bounds get OVERLOADED naming them (and those a gone peer left queued too), a flood is
read at a bounded pace, malformed frames are answered before the second next step, status
records report health, limits and draining, a peer that ignores its refusals is cut off, only
allowed CURVE keys get in (from Python and from the C client), and the socket directory is
checked like OpenSSH's."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from minivllm.config import TransportConfig, ZmqEndpointConfig
from minivllm.sampling_params import SamplingParams
from minivllm.transport import protocol

PROMPT = [1, 4093, 3060, 314, 4649, 30]
LONG = SamplingParams(temperature=0, max_tokens=5000, ignore_eos=True)
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PER_PEER, TOTAL = 2, 3
WAIT_MS = 120_000  # generous: a loaded 2-core machine is slow


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> SimpleNamespace:
    d = tmp_path_factory.mktemp("curve")
    allowed = d / "allowed"
    allowed.mkdir()
    server, server_secret = zmq.auth.create_certificates(str(d), "server")
    client, client_secret = zmq.auth.create_certificates(str(d), "client")
    _, stranger_secret = zmq.auth.create_certificates(str(d), "stranger")
    shutil.copy(client, allowed)
    return SimpleNamespace(server=server, server_secret=server_secret, client=client_secret,
                           stranger=stranger_secret, allowed=str(allowed))


@pytest.fixture(scope="module")
def door(keys):
    from conftest import EngineServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = EngineServer(TransportConfig(
        zmq_endpoint=f"tcp://127.0.0.1:{port}",
        zmq=ZmqEndpointConfig(max_in_flight_per_peer=PER_PEER, max_in_flight=TOTAL,
                              curve_secret_key=keys.server_secret,
                              curve_clients=keys.allowed)))
    yield server
    server.stop()


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def dealer(ctx, door, keys, cert=None, curve: bool = True, connect: bool = True) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if curve:
        public, secret = zmq.auth.load_certificate(cert or keys.client)
        sock.curve_publickey, sock.curve_secretkey = public, secret
        sock.curve_serverkey = zmq.auth.load_certificate(keys.server)[0]
    if connect:
        sock.connect(door.zmq_endpoint)
    return sock


def receive(sock):
    assert sock.poll(WAIT_MS), "no answer from the engine"
    return protocol.decode(sock.recv())


def status(sock, tag: int = 1) -> dict:
    sock.send(protocol.encode_status_query(tag))
    while not isinstance(rec := receive(sock), protocol.Status):
        pass  # step outputs of the socket's requests
    assert rec.tag == tag
    return rec.fields


def until_finished(sock, request_ids) -> dict:
    """request id -> the record that ended it (finish code or ErrorRecord)."""
    ended = {}
    while set(request_ids) - set(ended):
        rec = receive(sock)
        if isinstance(rec, protocol.ErrorRecord):
            ended[rec.request_id] = rec
        elif isinstance(rec, protocol.StepOutput):
            for rid, fin in zip(rec.request_ids.tolist(), rec.finish_reasons.tolist()):
                if fin:
                    ended[rid] = fin
    return ended


def until_finished_into(sock, tokens: list) -> bool:
    """Read one record of a single request, appending its tokens; True once it finished."""
    rec = receive(sock)
    assert isinstance(rec, protocol.StepOutput), rec
    tokens.extend(rec.token_ids.tolist())
    return bool(rec.finish_reasons.any())


def monitor_until(mon: zmq.Socket, events: set) -> int:
    """The first of `events` the monitored socket reports."""
    deadline = time.monotonic() + WAIT_MS / 1000
    while time.monotonic() < deadline:
        if mon.poll(1000) and (event := recv_monitor_message(mon)["event"]) in events:
            return event
    raise AssertionError(f"none of the events {events} within {WAIT_MS} ms")


def test_status_record_reports_health_limits_and_counters(door, keys, ctx):
    fields = status(dealer(ctx, door, keys), tag=77)
    assert fields["state"] == protocol.STATE_READY and fields["pid"] == door.process.pid
    assert fields["max_message_bytes"] == 112 + 8 * 8192  # a whole context's prompt and stops
    assert (fields["max_in_flight_per_peer"], fields["max_in_flight"]) == (PER_PEER, TOTAL)
    assert fields["vocab_size"] == 49152 and fields["max_model_len"] == 8192
    assert fields["free_blocks"] == fields["num_blocks"] == 512
    with door.channel() as ch:  # a frontend asks on its request ring, hears on its output ring
        protocol.put_status_query(ch.request_ring, 78)
        while (rec := ch.read()) is None:
            ch.wait(1.0)
    assert isinstance(rec, protocol.Status) and rec.tag == 78
    assert rec.fields["pid"] == door.process.pid and rec.fields["peer_in_flight"] == 0


def test_a_frame_over_the_size_limit_disconnects_its_peer(door, keys, ctx):
    sock = dealer(ctx, door, keys)
    limit = status(sock)["max_message_bytes"]
    mon = sock.get_monitor_socket()
    sock.send(b"\0" * (limit + 8))
    assert monitor_until(mon, {zmq.EVENT_DISCONNECTED}) == zmq.EVENT_DISCONNECTED
    # The engine serves on, and this peer too once it has reconnected.
    assert status(sock, tag=2)["state"] == protocol.STATE_READY


def test_submits_past_the_in_flight_bounds_get_overloaded_naming_them(door, keys, ctx):
    a, b = dealer(ctx, door, keys), dealer(ctx, door, keys)
    for rid in (1, 2, 3):
        a.send(protocol.encode_submit(rid, PROMPT, LONG))
    refused = receive(a)
    assert isinstance(refused, protocol.ErrorRecord)
    assert (refused.code, refused.request_id) == (protocol.ERR_OVERLOADED, 3)
    assert "limit per connection" in refused.message
    b.send(protocol.encode_submit(1, PROMPT, LONG))
    b.send(protocol.encode_submit(2, PROMPT, LONG))
    while not isinstance(rec := receive(b), protocol.ErrorRecord):
        pass
    assert (rec.code, rec.request_id) == (protocol.ERR_OVERLOADED, 2)
    assert "endpoint's connections" in rec.message
    fields = status(b)
    assert (fields["zmq_in_flight"], fields["peer_in_flight"]) == (TOTAL, 1)
    assert fields["overloaded"] >= 2
    a.send(protocol.encode_abort(1))  # a slot frees: the refused submit may come again
    assert until_finished(a, [1]) == {1: protocol.FINISH_ABORT}
    b.send(protocol.encode_submit(2, PROMPT, LONG))
    for sock, rids in ((a, [2]), (b, [1, 2])):
        for rid in rids:
            sock.send(protocol.encode_abort(rid))
        assert set(until_finished(sock, rids).values()) == {protocol.FINISH_ABORT}
    fields = status(b)
    assert fields["zmq_in_flight"] == 0


def test_unread_submits_past_the_bound_are_refused_not_queued(door, keys, ctx):
    """A peer that sends 300 submits and reads nothing has PER_PEER admitted and the rest
    refused; once it is gone its requests are aborted and their blocks freed."""
    flooder, watcher = dealer(ctx, door, keys), dealer(ctx, door, keys)
    before = status(watcher)
    for rid in range(300):
        flooder.send(protocol.encode_submit(rid, PROMPT, LONG))
    while (now := status(watcher))["overloaded"] - before["overloaded"] < 300 - PER_PEER:
        assert now["zmq_in_flight"] <= PER_PEER
        time.sleep(0.05)
    assert now["requests"] - before["requests"] == PER_PEER
    flooder.close()
    while (now := status(watcher))["zmq_in_flight"]:  # gone: noticed at the next send
        time.sleep(0.05)
    assert now["aborted"] - before["aborted"] == PER_PEER
    assert now["free_blocks"] == now["num_blocks"]


def test_a_peer_that_ignores_its_refusals_is_cut_off(door, keys, ctx):
    """A peer that keeps submitting past its limit (max_refusals refusals in a row) floods:
    its admitted requests are aborted at once, not left to share every step until its send
    queue fills; what it submits later is refused until it reconnects."""
    limit = ZmqEndpointConfig().max_refusals
    peer = dealer(ctx, door, keys)
    sent = range(PER_PEER + limit)
    for rid in sent:
        peer.send(protocol.encode_submit(rid, PROMPT, LONG))
    ended = until_finished(peer, sent)
    assert [ended[rid] for rid in range(PER_PEER)] == [protocol.FINISH_ABORT] * PER_PEER
    assert {ended[rid].code for rid in sent[PER_PEER:]} == {protocol.ERR_OVERLOADED}
    peer.send(protocol.encode_submit(limit + 10, PROMPT, GREEDY))
    refused = receive(peer)
    assert isinstance(refused, protocol.ErrorRecord) and "cut off" in refused.message, refused
    fresh = dealer(ctx, door, keys)
    fresh.send(protocol.encode_submit(1, PROMPT, GREEDY))
    assert until_finished(fresh, [1]) == {1: protocol.FINISH_LENGTH}
    assert status(fresh)["zmq_in_flight"] == 0


# A peer in a process of its own: sends `count` long submits (0: until killed) and reads
# nothing; send blocks while the endpoint pushes back. Then it exits (its submits delivered).
FLOODER = """
import sys, zmq, zmq.auth
from minivllm.sampling_params import SamplingParams
from minivllm.transport import protocol
endpoint, client, server, count = sys.argv[1:]
ctx = zmq.Context()
sock = ctx.socket(zmq.DEALER)
sock.curve_publickey, sock.curve_secretkey = zmq.auth.load_certificate(client)
sock.curve_serverkey = zmq.auth.load_certificate(server)[0]
sock.connect(endpoint)
params = SamplingParams(temperature=0, max_tokens=5000, ignore_eos=True)
rid = 0
while rid < int(count) or count == "0":
    sock.send(protocol.encode_submit(rid, [1, 2, 3], params))
    rid += 1
sock.close()
ctx.term()
"""


def flooder(door, keys, count: int = 0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", FLOODER, door.zmq_endpoint, keys.client,
                             keys.server, str(count)])


def test_a_flood_is_read_at_a_bounded_pace(door, keys, ctx):
    """A second process submits as fast as the endpoint takes them and never reads: the engine
    answers at most ZMQ_READS_PER_INGEST of its messages per ZMQ_BACKLOG_INTERVAL_S (the rest
    wait in ZeroMQ, which pushes back on it), however fast it could refuse them. The window is
    timed from before the first status query's send to after the last one's answer, so it
    holds the engine's own interval between the two whatever the machine's load."""
    from minivllm.engine.engine_proc import ZMQ_BACKLOG_INTERVAL_S, ZMQ_READS_PER_INGEST

    watcher = dealer(ctx, door, keys)
    peer = flooder(door, keys)
    try:
        start = status(watcher)["overloaded"]
        while True:  # until the flood is under way
            t0 = time.monotonic()
            first = status(watcher)
            if first["overloaded"] - start >= 1000:
                break
            assert peer.poll() is None, f"the flooder exited with {peer.returncode}"
            time.sleep(0.05)
        time.sleep(2.0)
        last = status(watcher)
        elapsed = time.monotonic() - t0
    finally:
        peer.kill()
        peer.wait()
    turns = elapsed / ZMQ_BACKLOG_INTERVAL_S + 2  # and one turn at each end of the window
    assert 0 < last["overloaded"] - first["overloaded"] <= ZMQ_READS_PER_INGEST * turns
    settle(watcher)


def settle(watcher) -> None:
    """Until the engine has read what a killed flooder left queued (nothing in flight, its
    counters still for a second): the next test counts refusals."""
    last, deadline = None, time.monotonic() + WAIT_MS / 1000
    while (now := {k: v for k, v in status(watcher).items()
                   if k in ("requests", "overloaded", "zmq_in_flight")}) != last \
            or now["zmq_in_flight"]:
        assert time.monotonic() < deadline, f"the engine was still reading the flood: {now}"
        last = now
        time.sleep(1.0)


def test_submits_a_gone_peer_left_queued_are_refused_not_run(door, keys, ctx):
    """A second process sends 300 submits and exits before the engine has read them: once the
    engine finds it gone, the rest it left queued are refused, not admitted PER_PEER at a time
    for nobody to read."""
    watcher = dealer(ctx, door, keys)
    before = status(watcher)
    assert flooder(door, keys, count=300).wait(WAIT_MS / 1000) == 0
    while True:
        now = status(watcher)
        admitted = now["requests"] - before["requests"]
        if admitted + now["overloaded"] - before["overloaded"] == 300:
            break
        time.sleep(0.05)
    assert admitted <= PER_PEER
    while status(watcher)["zmq_in_flight"]:
        time.sleep(0.05)


def test_malformed_frames_are_answered_before_the_second_next_step(door, keys, ctx):
    """PROTOCOL.md's bound, by the engine's own step numbers: a record that reaches the engine
    after it published step S is answered before any step output numbered S + 2."""
    sock = dealer(ctx, door, keys)
    sock.send(protocol.encode_submit(9, PROMPT, LONG))
    while not isinstance(receive(sock), protocol.StepOutput):
        pass  # it runs: every step now has an output for this socket
    for tag in range(5):
        sock.send(protocol.encode_status_query(tag))
        sock.send(b"junk" * 4)
        published = None
        while True:
            rec = receive(sock)
            if isinstance(rec, protocol.Status):
                published = rec.fields["step"]
            elif isinstance(rec, protocol.ErrorRecord):
                assert rec.code == protocol.ERR_MALFORMED and published is not None
                break
            else:
                assert published is None or rec.step < published + 2
    sock.send(protocol.encode_abort(9))
    assert until_finished(sock, [9]) == {9: protocol.FINISH_ABORT}


def test_curve_lets_in_only_the_allowed_keys(door, keys, ctx):
    # A key the engine does not allow is refused by its ZAP handler (status 400); a client
    # without CURVE fails the handshake, seen as a failure or as the engine hanging up.
    refused = {zmq.EVENT_HANDSHAKE_FAILED_AUTH}
    no_curve = refused | {zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                          zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_DISCONNECTED}
    for sock, failures in ((dealer(ctx, door, keys, cert=keys.stranger, connect=False), refused),
                           (dealer(ctx, door, keys, curve=False, connect=False), no_curve)):
        mon = sock.get_monitor_socket()  # before connecting: the handshake's events are quick
        sock.connect(door.zmq_endpoint)
        sock.send(protocol.encode_status_query(1))
        assert monitor_until(mon, failures | {zmq.EVENT_HANDSHAKE_SUCCEEDED}) in failures
        assert not sock.poll(0)


def test_c_client_speaks_curve(door, keys, ctx, tmp_path):
    from test_c_client_codec import _compiler_missing, _make

    missing = _compiler_missing()
    if missing:
        pytest.skip(reason=missing)
    binary = _make(tmp_path)
    sock = dealer(ctx, door, keys)
    sock.send(protocol.encode_submit(1, PROMPT, GREEDY))
    expected = []
    while not until_finished_into(sock, expected):
        pass
    args = [str(binary), "--endpoint", door.zmq_endpoint, "--curve-server-key", keys.server,
            "--max-tokens", "8", "--temperature", "0", "--ignore-eos", "--timeout-ms", "5000"]
    out = subprocess.run(args + ["--curve-client-key", keys.client, "--", *map(str, PROMPT)],
                         capture_output=True, text=True, timeout=WAIT_MS / 1000)
    assert out.returncode == 0, out.stderr
    assert [int(x.split()[1]) for x in out.stdout.splitlines() if x.startswith("token ")] == \
        expected
    out = subprocess.run(args + ["--curve-client-key", keys.stranger, "--", "1", "2"],
                         capture_output=True, text=True, timeout=WAIT_MS / 1000)
    assert out.returncode == 3 and "is this client's public key allowed" in out.stderr


def test_socket_directory_of_another_owner_or_mode_is_refused(tmp_path):
    """A second process whose <tmp>/minivllm-<uid> is open to others, or not its user's,
    refuses to put a socket there and says why."""
    socket_dir = tmp_path / f"minivllm-{os.getuid()}"
    socket_dir.mkdir(mode=0o755)
    socket_dir.chmod(0o755)
    probe = [sys.executable, "-c",
             "from minivllm.transport import shm; print(shm.socket_endpoint('probe'))"]
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    out = subprocess.run(probe, capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode != 0 and "has mode 0755, not 0700" in out.stderr
    socket_dir.chmod(0o700)
    if os.getuid() == 0:
        os.chown(socket_dir, 65534, 65534)
        out = subprocess.run(probe, capture_output=True, text=True, env=env, timeout=60)
        assert out.returncode != 0 and "is owned by uid 65534" in out.stderr
        os.chown(socket_dir, 0, 0)
    out = subprocess.run(probe, capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith(f"ipc://{socket_dir}/")


def test_draining_is_reported_and_refuses_submits(door, keys, ctx):
    """Last: it leaves the module's engine draining."""
    from minivllm.transport.control import ControlClient

    control = ControlClient(ctx, door.control)
    control.call("drain", timeout=WAIT_MS / 1000)
    sock = dealer(ctx, door, keys)
    assert status(sock)["state"] == protocol.STATE_DRAINING
    sock.send(protocol.encode_submit(4, PROMPT, GREEDY))
    refused = receive(sock)
    assert (refused.code, refused.request_id) == (protocol.ERR_DRAINING, 4)
    control.close()
