"""The engine process over the real transport: rings + doorbells from a frontend, the ZeroMQ
ROUTER endpoint, the control channel; greedy tokens equal the offline path's; bad input gets
error records while the engine keeps serving; a killed frontend's blocks come back."""
import multiprocessing as mp
import os
import time

import numpy as np
import pytest
import zmq

from minivllm.sampling_params import SamplingParams
from minivllm.transport import protocol, shm
from minivllm.transport.control import ControlClient, ControlError

PROMPTS = [[1, 4093, 3060, 314, 4649, 30], [1, 504, 2365, 282, 1707, 314], [28, 29, 30],
           [1, 9690, 198, 1780]]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def offline_tokens():
    from minivllm import LLM

    llm = LLM(dtype="float32", num_blocks=512)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def collect(channel, n_requests, timeout=300.0):
    """request id -> (tokens, finish code) until n_requests finished; errors -> ErrorRecords."""
    tokens, finished, errors = {}, {}, {}
    deadline = time.monotonic() + timeout
    while len(finished) + len(errors) < n_requests:
        assert time.monotonic() < deadline, "requests did not finish in time"
        channel.wait(1.0)
        while (rec := channel.read()) is not None:
            if isinstance(rec, protocol.ErrorRecord):
                errors[rec.request_id] = rec
                continue
            for rid, tok, fin in zip(rec.request_ids.tolist(), rec.token_ids.tolist(),
                                     rec.finish_reasons.tolist()):
                if tok >= 0:
                    tokens.setdefault(rid, []).append(tok)
                if fin:
                    finished[rid] = fin
    return tokens, finished, errors


def greedy_equals_offline(ch, offline_tokens) -> None:
    """PROMPTS through the channel: the offline path's greedy tokens, every one to its length."""
    for i, prompt in enumerate(PROMPTS):
        ch.submit(100 + i, prompt, GREEDY)
    tokens, finished, errors = collect(ch, len(PROMPTS))
    assert not errors
    assert [tokens[100 + i] for i in range(len(PROMPTS))] == offline_tokens
    assert set(finished.values()) == {protocol.FINISH_LENGTH}


def test_ring_client_greedy_equals_offline(engine_server, offline_tokens):
    with engine_server.channel() as ch:
        greedy_equals_offline(ch, offline_tokens)


def test_logprobs_travel_as_arrays(engine_server):
    with engine_server.channel() as ch:
        ch.submit(1, PROMPTS[0], SamplingParams(temperature=0, max_tokens=3, logprobs=2))
        ch.submit(2, PROMPTS[1], SamplingParams(temperature=0, max_tokens=3))
        recs = []
        deadline = time.monotonic() + 30
        while sum(int(r.finish_reasons.astype(bool).sum()) for r in recs) < 2:
            assert time.monotonic() < deadline
            ch.wait(1.0)
            while (rec := ch.read()) is not None:
                recs.append(rec)
    for rec in recs:
        for i, rid in enumerate(rec.request_ids.tolist()):
            if rid == 1:
                assert rec.top_token_ids[i, 0] == rec.token_ids[i]  # greedy: top-1 is sampled
                assert rec.logprobs[i] <= 0 and np.isfinite(rec.top_logprobs[i, :2]).all()
            elif rec.logprobs is not None:
                assert np.isnan(rec.logprobs[i]) and (rec.top_token_ids[i] == -1).all()


def test_bad_requests_get_error_records_naming_the_problem(engine_server):
    with engine_server.channel() as ch:
        ch.submit(1, [1, 10**6], GREEDY)  # beyond the vocabulary
        ch.submit(2, [1] * 9000, GREEDY)  # longer than the context
        ch.submit(3, PROMPTS[2], SamplingParams(temperature=0, max_tokens=4))
        ch.submit(3, PROMPTS[2], GREEDY)  # duplicate id while 3 is in flight
        tokens, finished, errors = collect(ch, 4)
    assert errors[1].code == protocol.ERR_INVALID_REQUEST and "[0, 49152)" in errors[1].message
    assert errors[2].code == protocol.ERR_INVALID_REQUEST and "8192" in errors[2].message
    assert errors[3].code == protocol.ERR_DUPLICATE_ID
    assert len(tokens[3]) == 4 and finished[3] == protocol.FINISH_LENGTH


def abort_mid_stream(ch, rid: int) -> None:
    """Submit a long request, abort it once its tokens flow: it ends as aborted, early."""
    ch.submit(rid, PROMPTS[0], SamplingParams(temperature=0, max_tokens=5000, ignore_eos=True))
    while not ch.wait(1.0):
        pass
    ch.abort(rid)
    tokens, finished, _ = collect(ch, 1)
    assert finished[rid] == protocol.FINISH_ABORT and 0 < len(tokens[rid]) < 5000


def test_abort_ends_the_request_and_frees_its_blocks(engine_server):
    with engine_server.channel() as ch:
        abort_mid_stream(ch, 7)
        stats = ch.call("stats")
    assert stats["free_blocks"] == stats["num_blocks"] and stats["running"] == 0


def _dealer(ctx, endpoint):
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def _router_collect(sock, n_requests, timeout=300.0):
    tokens, finished, errors = {}, {}, []
    deadline = time.monotonic() + timeout
    while len(finished) < n_requests:
        assert sock.poll(int((deadline - time.monotonic()) * 1000) + 1), "no answer in time"
        rec = protocol.decode(sock.recv())
        if isinstance(rec, protocol.ErrorRecord):
            errors.append(rec)
            if rec.request_id is not None:
                finished[rec.request_id] = "error"
            continue
        for rid, tok, fin in zip(rec.request_ids.tolist(), rec.token_ids.tolist(),
                                 rec.finish_reasons.tolist()):
            tokens.setdefault(rid, []).append(tok)
            if fin:
                finished[rid] = fin
    return tokens, finished, errors


def test_zmq_endpoint_serves_records_as_frames(engine_server, offline_tokens):
    ctx = zmq.Context()
    a, b = _dealer(ctx, engine_server.zmq_endpoint), _dealer(ctx, engine_server.zmq_endpoint)
    try:
        for i, prompt in enumerate(PROMPTS):
            a.send(protocol.encode_submit(i, prompt, GREEDY))
        b.send(protocol.encode_submit(0, PROMPTS[3], GREEDY))  # same id, other client: no clash
        tokens, _, errors = _router_collect(a, len(PROMPTS))
        tokens_b, _, _ = _router_collect(b, 1)
    finally:
        a.close()
        b.close()
        ctx.term()
    assert not errors
    assert [tokens[i] for i in range(len(PROMPTS))] == offline_tokens
    assert tokens_b[0] == offline_tokens[3]


def test_zmq_endpoint_answers_garbage_with_error_frames_and_keeps_serving(engine_server,
                                                                         offline_tokens):
    ctx = zmq.Context()
    sock = _dealer(ctx, engine_server.zmq_endpoint)
    rng = np.random.default_rng(0)
    try:
        garbage = [b"", b"hello", rng.bytes(64), protocol.encode_abort(1)[:20],
                   protocol.encode_step_output(1, np.ones(1, np.uint64), np.ones(1, np.int32),
                                               np.zeros(1, np.uint8))]
        for frame in garbage:
            sock.send(frame)
        sock.send_multipart([b"two", b"frames"])
        for _ in range(len(garbage) + 1):
            assert sock.poll(10000)
            rec = protocol.decode(sock.recv())
            assert isinstance(rec, protocol.ErrorRecord) and rec.code == protocol.ERR_MALFORMED
        sock.send(protocol.encode_submit(5, PROMPTS[0], GREEDY))
        tokens, _, errors = _router_collect(sock, 1)
    finally:
        sock.close()
        ctx.term()
    assert tokens[5] == offline_tokens[0] and not errors


def test_control_channel_operations(engine_server):
    ctx = zmq.Context()
    client = ControlClient(ctx, engine_server.control)
    try:
        health = client.call("health", timeout=120)
        assert health["state"] == "ready" and health["pid"] == engine_server.process.pid
        stats = client.call("stats")
        for key in ("running", "waiting", "kv_usage", "prefix_hits", "preemptions",
                    "free_blocks", "generation_tokens"):
            assert key in stats
        with pytest.raises(ControlError, match="unknown control op 'reboot'"):
            client.call("reboot")
        with pytest.raises(ControlError, match="needs the field 'request_ring'"):
            client.call("register", frontend="x", pid=1)
        client.socket.send_multipart([b"", b"{not json"])
        reply = client.socket.recv_multipart()[-1]
        assert b"not JSON" in reply
        assert client.call("health")["state"] == "ready"  # still serving
    finally:
        client.close()
        ctx.term()


def _doomed_frontend(control, transport, queue):
    from minivllm.transport.channel import EngineChannel

    ch = EngineChannel(control, transport)
    for i in range(4):
        ch.submit(i, [1, 2, 3, 4 + i], SamplingParams(temperature=0, max_tokens=5000,
                                                      ignore_eos=True))
    while not ch.wait(1.0):
        pass
    queue.put((ch.request_ring.name, ch.output_ring.name))
    time.sleep(600)


def test_killed_frontend_is_noticed_its_blocks_freed_others_keep_working(engine_server,
                                                                        offline_tokens):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_doomed_frontend,
                       args=(engine_server.control, engine_server.transport, queue))
    proc.start()
    rings = queue.get(timeout=120)
    with engine_server.channel() as ch:
        assert ch.call("stats")["running"] == 4
        os.kill(proc.pid, 9)
        proc.join(10)
        deadline = time.monotonic() + 60  # generous: a loaded machine is slow
        while (stats := ch.call("stats"))["running"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert stats["running"] == 0 and stats["free_blocks"] == stats["num_blocks"]
        assert len(stats["frontends"]) == 1
        assert not any(name in shm.list_segments() for name in rings)
        ch.submit(1, PROMPTS[0], GREEDY)
        tokens, _, _ = collect(ch, 1)
    assert tokens[1] == offline_tokens[0]


def test_shutdown_leaves_no_process_segment_or_socket():
    from conftest import EngineServer

    server = EngineServer()
    ch = server.channel()
    names = [ch.request_ring.name, ch.output_ring.name]
    ch.submit(1, PROMPTS[0], SamplingParams(temperature=0, max_tokens=4))
    collect(ch, 1)
    engine_pid = server.process.pid
    ch.call("shutdown", drain=True)
    server.process.join(300)  # generous: a loaded machine is slow
    # The supervisor's watcher thread may reap the process first (this join then sees
    # ECHILD): its exit code shows once that thread has stored it.
    deadline = time.monotonic() + 60
    while server.process.exitcode is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.process.exitcode == 0
    ch.close()
    assert not any(n in shm.list_segments() for n in names)
    assert not shm.list_segments(pid=engine_pid)
    assert not shm.list_segments(pid=engine_pid, directory=shm.SOCKET_DIR)  # its bell
    for endpoint in (server.control, server.zmq_endpoint):  # sockets it bound
        assert not os.path.exists(endpoint[len("ipc://"):])


def test_zmq_peers_that_vanish_are_forgotten_and_the_engine_keeps_serving(engine_server,
                                                                         offline_tokens):
    ctx = zmq.Context()
    with engine_server.channel() as ch:
        ch.submit(1, PROMPTS[1], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
        for i in range(5):  # junk, a request, then gone: answers go to vanished peers
            sock = _dealer(ctx, engine_server.zmq_endpoint)
            sock.send(b"junk" * 4)
            sock.send(protocol.encode_submit(i, PROMPTS[0], GREEDY))
            time.sleep(0.05)
            sock.close()
        tokens, finished, errors = collect(ch, 1)
        assert len(tokens[1]) == 40 and not errors
        deadline = time.monotonic() + 60  # generous: a loaded machine is slow
        # until the vanished peers' requests ran (waiting ones too) and the peers are forgotten
        while (stats := ch.call("stats"))["zmq_peers"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert stats["zmq_peers"] == 0 and stats["free_blocks"] == stats["num_blocks"]
    ctx.term()


def test_c_client_streams_the_same_greedy_tokens_as_the_python_client(engine_server,
                                                                      offline_tokens,
                                                                      tmp_path):
    import subprocess

    from test_c_client_codec import _compiler_missing, _make

    missing = _compiler_missing()
    if missing:
        pytest.skip(reason=missing)
    binary = _make(tmp_path)
    for prompt, expected in zip(PROMPTS, offline_tokens):
        out = subprocess.run([str(binary), "--endpoint", engine_server.zmq_endpoint,
                              "--max-tokens", "12", "--temperature", "0", "--ignore-eos",
                              "--", *map(str, prompt)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.split("\n")
        assert [int(line.split()[1]) for line in lines if line.startswith("token ")] == expected
        assert "finish length" in lines


def test_a_request_done_in_its_first_step_still_gets_its_token(engine_server):
    # "What is the capital of France?" without a chat template: SmolLM2's first token is EOS,
    # so the request is admitted, sampled and finished within one step.
    with engine_server.channel() as ch:
        ch.submit(1, [1780, 314, 260, 3575, 282, 4649, 47],
                  SamplingParams(temperature=0, max_tokens=20))
        tokens, finished, errors = collect(ch, 1)
    assert tokens[1] == [2] and finished[1] == protocol.FINISH_STOP and not errors


@pytest.mark.parametrize("implementation", ["cython", "python"])
def test_async_scheduling_engine_process(offline_tokens, implementation):
    """The engine process with async scheduling (the CUDA default) forced on the CPU: each
    step's tokens are published one call late, and they are the same greedy tokens; an abort
    while a token is in flight ends the request with its blocks freed; a one-token request
    still gets its token. "python" runs the whole engine on the reference scheduler and
    allocator, the drop-in twins of the compiled ones."""
    from conftest import EngineServer

    server = EngineServer(async_scheduling=True, implementation=implementation)
    try:
        with server.channel() as ch:
            greedy_equals_offline(ch, offline_tokens)
            abort_mid_stream(ch, 7)
            ch.submit(8, PROMPTS[2], SamplingParams(temperature=0, max_tokens=1))
            tokens, finished, _ = collect(ch, 1)
            assert len(tokens[8]) == 1 and finished[8] == protocol.FINISH_LENGTH
            stats = ch.call("stats")
        assert stats["running"] == 0 and stats["free_blocks"] == stats["num_blocks"]
    finally:
        server.stop()
