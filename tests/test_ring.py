"""The shared-memory ring: framing, wrap-around, backpressure, limits, and the doorbell handshake
under a cross-process stress of a million records (no lost wake-up)."""
import multiprocessing as mp
import os
import random
import stat
import struct
import time

import pytest
import zmq

from minivllm._cext.ring import RecordTooLargeError, RingFullError
from minivllm.transport import shm
from minivllm.transport.doorbell import Bell, BellListener


@pytest.fixture
def pair(ring_pair):
    return ring_pair(4096)


def test_records_come_out_in_order_across_many_wraps(pair):
    writer, reader = pair
    rng = random.Random(0)
    sent = []
    for i in range(5000):
        record = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300)))
        writer.write(record)
        sent.append(record)
        if rng.random() < 0.5:  # let the ring fill up partly, then drain
            while sent:
                assert reader.read() == sent.pop(0)
    while sent:
        assert reader.read() == sent.pop(0)
    assert reader.read() is None
    assert reader.used_bytes() == 0


def test_full_ring_waits_then_raises_never_overwrites(pair):
    writer, reader = pair
    chunk = b"x" * 1000
    writes = 0
    with pytest.raises(RingFullError, match="consumer is not reading"):
        for _ in range(10):
            writer.write(chunk, timeout=0.05)
            writes += 1
    assert writes == 4  # 4 frames of 1008 bytes fit in 4096; the fifth waited and gave up
    for _ in range(writes):
        assert reader.read() == chunk  # nothing was overwritten
    writer.write(chunk, timeout=0.05)  # room again
    assert reader.read() == chunk


def test_blocked_producer_resumes_when_consumer_reads(pair):
    writer, reader = pair
    for _ in range(4):
        writer.write(b"y" * 1000)
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=_read_n_after_delay, args=(reader.name, 5, 0.2))
    proc.start()
    t0 = time.monotonic()
    writer.write(b"z" * 1000, timeout=10)  # waits for the child to make room
    assert time.monotonic() - t0 >= 0.1
    proc.join(10)
    assert proc.exitcode == 0


def _read_n_after_delay(name, n, delay):
    time.sleep(delay)
    ring = shm.attach_ring(name)
    got = 0
    while got < n:
        if ring.read() is not None:
            got += 1
    ring.close()


def test_record_larger_than_ring_is_refused_at_submit(pair):
    writer, _ = pair
    with pytest.raises(RecordTooLargeError, match="largest record is 4088 bytes"):
        writer.write(b"x" * 4089)
    writer.write(b"x" * 4088)  # exactly the largest fits


def test_segment_is_owner_only_and_unlinked_on_close():
    ring = shm.create_ring("perm", 4096)
    path = os.path.join(shm.SHM_DIR, ring.name)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert ring.name.startswith(f"mvl_{os.getpid()}_")
    other = shm.create_ring("perm", 4096)
    assert other.name != ring.name
    ring.close()
    other.close()
    assert not os.path.exists(path)
    ring.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        ring.write(b"x")


def test_attach_rejects_foreign_segments():
    with pytest.raises(ValueError, match="not a minivllm ring segment name"):
        shm.attach_ring("psm_1234")
    with pytest.raises(FileNotFoundError):
        shm.attach_ring("mvl_1_deadbeef_gone")


def test_stale_segments_of_dead_processes_are_cleaned():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_create_and_hang, args=(queue,))
    proc.start()
    name = queue.get(timeout=30)
    assert name in shm.list_segments(pid=proc.pid)
    proc.kill()  # no chance to clean up
    proc.join(10)
    assert name in shm.list_segments()
    removed = shm.cleanup_stale()
    assert name in removed and name not in shm.list_segments()
    live = shm.create_ring("live", 4096)
    assert live.name not in shm.cleanup_stale()  # a live process's segment stays
    live.close()


def _create_and_hang(queue):
    ring = shm.create_ring("stale", 4096)
    queue.put(ring.name)
    time.sleep(60)


# ---- the doorbell handshake ----------------------------------------------------------------
N_STRESS = 1_000_000


def _stress_consumer(name, endpoint, n, result):
    """Reads n sequence-numbered records; sleeps on the bell after 5 us of empty ring (so a
    producer pause of more than that is a sleep). A bell that never comes would show as a poll
    that times out with data waiting: a lost wake-up."""
    rng = random.Random(1)
    ring = shm.attach_ring(name)
    ctx = zmq.Context()
    listener = BellListener(ctx, endpoint)
    result.put("ready")
    expected, sleeps, lost = 0, 0, 0
    while expected < n:
        record = ring.read()
        if record is not None:
            assert struct.unpack("<Q", record[:8])[0] == expected
            expected += 1
            if rng.random() < 1e-3:
                time.sleep(rng.random() * 2e-4)
            continue
        if ring.spin(5e-6):
            continue
        if ring.prepare_sleep():
            sleeps += 1
            if not listener.socket.poll(2000) and ring.readable():
                lost += 1
            ring.awake()
            listener.drain()
        else:
            ring.awake()
    ring.close()
    listener.close()
    ctx.term()
    result.put((expected, sleeps, lost))


def test_every_bell_reaches_its_listener():
    """Each bell must wake the listener itself: a listener that refused the connection (a
    message-size limit below the handshake's) would still 'work', one poll timeout per sleep."""
    zctx = zmq.Context()
    listener = BellListener(zctx, shm.socket_endpoint("bell"))
    bell = Bell(zctx, listener.endpoint)
    try:
        for _ in range(20):
            bell()
            assert listener.wait(30.0)
    finally:
        bell.close()
        listener.close()
        zctx.destroy(linger=0)


def test_a_lost_wakeup_is_counted_not_hidden(pair):
    """A bell that never comes costs only latency; check_timeout must name it. Here the
    producer's bell goes to an endpoint nobody listens on (ours once refused every connection)."""
    writer, reader = pair
    zctx = zmq.Context()
    listener = BellListener(zctx, shm.socket_endpoint("deaf"))
    writer.bell = Bell(zctx, shm.socket_endpoint("nowhere"))
    try:
        assert reader.prepare_sleep()
        writer.write(b"x" * 8)
        assert not listener.wait(0.5)
        reader.awake()
        assert listener.check_timeout(reader.readable())
        assert listener.lost_wakeups == 1
        assert not listener.check_timeout(False)  # an idle timeout is not a lost wake-up
    finally:
        writer.bell.close()
        listener.close()
        zctx.destroy(linger=0)


def test_no_lost_wakeup_under_a_million_records_with_random_pauses():
    ctx = mp.get_context("spawn")
    result = ctx.Queue()
    endpoint = shm.socket_endpoint("stressbell")
    writer = shm.create_ring("stress", 1 << 16)
    zctx = zmq.Context()
    proc = ctx.Process(target=_stress_consumer, args=(writer.name, endpoint, N_STRESS, result))
    proc.start()
    try:
        assert result.get(timeout=60) == "ready"
        bell = Bell(zctx, endpoint)
        writer.bell = bell
        rng = random.Random(2)
        payload = bytes(24)
        for i in range(N_STRESS):
            writer.write(struct.pack("<Q", i) + payload, timeout=30)
            if rng.random() < 1e-3:
                time.sleep(rng.random() * 3e-4)
        received, sleeps, lost = result.get(timeout=120)
        proc.join(30)
    finally:
        if proc.is_alive():
            proc.kill()
        writer.close()
        zctx.destroy(linger=0)
    assert received == N_STRESS
    assert lost == 0
    assert sleeps > 100  # the handshake was exercised, not just the busy path
    assert writer.bells_rung > 100


def test_a_lying_frame_length_is_discarded_not_followed(pair):
    from multiprocessing import shared_memory

    from minivllm.transport import protocol

    writer, reader = pair
    writer.write(b"a" * 16)
    raw = shared_memory.SharedMemory(writer.name)
    try:
        struct.pack_into("<I", raw.buf, 256, 1_000_000)  # the first frame's length word
        with pytest.raises(protocol.ProtocolError, match="24 bytes discarded"):
            protocol.read_record(reader)
        assert reader.read() is None
        writer.write(b"b" * 8)  # the ring goes on working
        assert reader.read() == b"b" * 8
    finally:
        raw.close()


_GARBAGE_CYCLE = """
import gc, sys, zmq
from minivllm.transport import shm
from minivllm.transport.zmq_context import process_context
class Part: pass
part = Part()
part.ctx = process_context() if sys.argv[1] == 'process' else zmq.Context()
part.socket = part.ctx.socket(zmq.PULL)
part.endpoint = shm.socket_endpoint('cycle')
part.socket.bind(part.endpoint)
part.self = part  # only the cycle collector can free it
endpoint = part.endpoint
del part
gc.collect()
shm.remove_endpoint(endpoint)
print('collected')
"""


def test_a_part_left_to_the_garbage_collector_does_not_hang_it():
    """A ZeroMQ context collected in one cycle with its sockets blocks gc for good (the suite
    once hung so); the process context is never collected."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-W", "ignore", "-c", _GARBAGE_CYCLE, "process"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "collected", run.stderr
