"""The frontend: incremental detokenization, stop strings, AsyncEngineClient against a real
engine process under a real supervisor (concurrency, several frontend processes, cancel, abort,
engine crash and restart, shutdown)."""
import asyncio
import multiprocessing as mp
import os
import random
import signal
import time

import pytest

from minivllm.config import SupervisorConfig, TransportConfig
from minivllm.engine.supervisor import EngineStartError, Supervisor
from minivllm.frontend.async_client import AsyncEngineClient, EngineDeadError
from minivllm.frontend.detokenizer import IncrementalDetokenizer
from minivllm.frontend.output_processor import CompletionStream
from minivllm.llm import build_engine_config
from minivllm.loader import load_tokenizer, resolve_model
from minivllm.sampling_params import SamplingParams
from minivllm.transport import shm
from sync_client import EngineClient

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "List three colours:", "def fibonacci(n):", "Bonjour, comment ça va ?",
           "日本の首都は", "Tell me a joke.", "1, 2, 3, 4,"]
GREEDY = SamplingParams(temperature=0, max_tokens=24)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model(None))


# ---- detokenization and stop strings (no engine) --------------------------------------------
def _windowed(tokenizer):
    """The same tokenizer with its ByteLevel decoder in a Sequence: the same decoding, but not
    the byte table's (IncrementalDetokenizer decodes windows of tokens)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders

    from minivllm.tokenizer import Tokenizer

    backend = Backend.from_str(tokenizer.backend.to_str())
    backend.decoder = decoders.Sequence([decoders.ByteLevel()])
    return Tokenizer(backend, {}, None)


@pytest.mark.parametrize("path", ["byte table", "windows"])
def test_incremental_detokenization_equals_full_decode(tokenizer, path):
    from minivllm.frontend.detokenizer import byte_tables

    tokenizer = tokenizer if path == "byte table" else _windowed(tokenizer)
    assert (byte_tables(tokenizer) is not None) == (path == "byte table")
    rng = random.Random(0)
    texts = ["héllo 世界 🎉 ok", "naïve café — “quotes” ✓", "🙂🙃😉" * 3, "abc\n\tdef  ghi"]
    for text in texts:
        ids = tokenizer.encode(text)
        detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("Say: "))
        pieces = [detok.push(t) for t in ids] + [detok.flush()]
        assert "".join(pieces) == tokenizer.decode(ids) == text
        assert not any("\ufffd" in p for p in pieces)  # no half characters streamed
    for _ in range(50):  # random ids, incomplete bytes included: same text as a full decode
        ids = [rng.choice((rng.randrange(20), rng.randrange(49152)))
               for _ in range(rng.randrange(1, 40))]
        skip = rng.random() < 0.5  # special tokens (ids below 17) kept or skipped
        detok = IncrementalDetokenizer(tokenizer, [1], skip_special_tokens=skip)
        assert "".join([detok.push(t) for t in ids] + [detok.flush()]) == \
            tokenizer.decode(ids, skip_special_tokens=skip)
    for _ in range(200):  # tokens arriving together: the text their pushes would have made
        ids = [rng.choice((rng.randrange(400), rng.randrange(49152)))
               for _ in range(rng.randrange(1, 40))]
        one, many = IncrementalDetokenizer(tokenizer, [1]), IncrementalDetokenizer(tokenizer, [1])
        start = 0
        while start < len(ids):
            group = ids[start:start + rng.randint(1, 6)]
            start += len(group)
            assert many.push_many(group) == "".join(one.push(t) for t in group)
        assert many.flush() == one.flush()


def test_stop_string_across_tokens_is_cut_and_never_streamed(tokenizer):
    text = "The answer is 42. The end"
    ids = tokenizer.encode(text)
    params = SamplingParams(stop=["is 42", "end"])
    stream = CompletionStream(0, params, tokenizer, [1], eos_token_ids=[2])
    streamed, aborted = "", False
    for t in ids:
        aborted = stream.add(t, 0)
        streamed += stream.delta()[0]
        if aborted:
            break
    assert aborted and stream.finish_reason == "stop" and stream.stop_reason == "is 42"
    assert stream.text == "The answer " and streamed == "The answer "


def test_stop_token_id_is_reported_as_stop_reason(tokenizer):
    stream = CompletionStream(0, SamplingParams(stop_token_ids=[30]), tokenizer, [1], [2])
    stream.add(28, 0)
    stream.add(30, 1)  # the engine finished it on a stop token id
    assert (stream.finish_reason, stream.stop_reason) == ("stop", 30)
    eos = CompletionStream(0, SamplingParams(), tokenizer, [1], [2])
    eos.add(2, 1)
    assert (eos.finish_reason, eos.stop_reason, eos.text) == ("stop", None, "")


class _CountedPieces(list):
    """A stream's pieces of text that count the pieces read out of them (by a join, a slice
    or an iteration)."""
    read = 0

    def __iter__(self):
        _CountedPieces.read += len(self)
        return super().__iter__()

    def __getitem__(self, i):
        got = super().__getitem__(i)
        _CountedPieces.read += len(got) if isinstance(i, slice) else 1
        return got


@pytest.mark.parametrize("path", ["byte table", "windows"])
def test_an_output_costs_the_same_however_long_the_text_before_it(tokenizer, path):
    """A stream's output after every token (a stop string: the Python path), 2,000 tokens:
    making an output reads none of the text given out before (each once joined all of it:
    quadratic over the output); reading an output's text joins what it had, once."""
    from minivllm.frontend.output_processor import RequestState

    tokenizer = tokenizer if path == "byte table" else _windowed(tokenizer)
    ids = (tokenizer.encode("Once upon a time, café 東京 🙂, there was a stream.") * 200)[:2000]
    stream = CompletionStream(0, SamplingParams(stop=["<|never|>"], logprobs=1), tokenizer,
                              [1], eos_token_ids=[2])
    stream._given = pieces = _CountedPieces()
    state = RequestState("r", None, [1], [stream])
    state.copy_lists = False
    _CountedPieces.read = 0
    outputs, streamed = [], ""
    for i, t in enumerate(ids):
        stream.add(t, 1 if i == len(ids) - 1 else 0, {t: -1.0})
        out = state.snapshot().outputs[0]
        streamed += out.delta_text
        outputs.append((out, streamed))
        assert out.logprobs is stream.logprobs and out.token_ids is stream.token_ids
    assert _CountedPieces.read == 0 and stream._given is pieces
    assert outputs[-1][0].text == streamed == tokenizer.decode(ids)
    assert _CountedPieces.read <= len(pieces)  # one join, when read
    for out, text in outputs[::97]:  # each output's text is what was given out by then
        assert out.text == text


# ---- against a supervised engine ------------------------------------------------------------
@pytest.fixture(scope="module")
def supervisor():
    sup = Supervisor(build_engine_config(None, dtype="float32", num_blocks=1024,
                                         max_num_seqs=64),
                     TransportConfig(), SupervisorConfig(backoff_s=0.1))
    sup.start()
    yield sup
    sup.shutdown(drain=False)


@pytest.fixture(scope="module")
def offline():
    from minivllm import LLM

    llm = LLM(dtype="float32", num_blocks=1024)

    def run(prompts, params, all_outputs=False):
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [o.outputs if all_outputs else o.outputs[0] for o in outs]
    return run


def run_async(coro):
    return asyncio.run(coro)


async def _connect(sup):
    return await AsyncEngineClient.connect(sup.control, timeout=120)


def test_async_generate_streams_the_offline_greedy_text(supervisor, offline):
    """Read by iterating (half the prompts) or by a listener the reader calls (the server's
    way: each output's new text alone while it runs, then the whole output)."""
    expected = offline(PROMPTS, GREEDY)

    async def iterated(client, prompt):
        deltas, last = [], None
        async for out in client.generate(prompt, GREEDY):
            deltas.append(out.outputs[0].delta_text)
            last = out
        return "".join(deltas), last

    async def listened(client, prompt):
        stream, deltas = client.open(prompt, GREEDY), []
        done = asyncio.get_running_loop().create_future()

        def on_output():
            news = stream.running_delta()
            if news is not None:
                deltas.append(news[0])
                return
            out = stream.poll()
            deltas.append(out.outputs[0].delta_text)
            if out.finished:
                done.set_result(out)
        stream.listen(on_output)
        last = await asyncio.wait_for(done, 300)
        return "".join(deltas), last

    async def go():
        client = await _connect(supervisor)
        try:
            return await asyncio.gather(*((iterated, listened)[i % 2](client, p)
                                          for i, p in enumerate(PROMPTS)))
        finally:
            await client.shutdown()

    for (streamed, out), exp in zip(run_async(go()), expected):
        comp = out.outputs[0]
        assert comp.token_ids == exp.token_ids and comp.text == exp.text == streamed
        assert comp.finish_reason == exp.finish_reason


def test_stop_strings_n_and_logprobs_match_the_offline_path(supervisor, offline):
    cases = [SamplingParams(temperature=0, max_tokens=40, stop=[".", "\n"]),
             SamplingParams(temperature=0.8, seed=3, max_tokens=12, n=3),
             SamplingParams(temperature=0, max_tokens=6, logprobs=3)]
    for params in cases:
        expected = offline(PROMPTS[:3], params, all_outputs=True)

        async def go():
            client = await _connect(supervisor)
            try:
                return await asyncio.gather(*(client.submit(p, params) for p in PROMPTS[:3]))
            finally:
                await client.shutdown()
        for out, exp in zip(run_async(go()), expected):
            assert len(out.outputs) == len(exp) == params.n
            for comp, want in zip(out.outputs, exp):
                assert (comp.text, comp.token_ids, comp.finish_reason, comp.stop_reason) == \
                    (want.text, want.token_ids, want.finish_reason, want.stop_reason)
                if params.logprobs:
                    assert [sorted(d) for d in comp.logprobs] == \
                        [sorted(d) for d in want.logprobs]
                    for got, ref in zip(comp.logprobs, want.logprobs):
                        assert all(abs(got[t] - ref[t]) < 1e-4 for t in ref)


def test_sync_wrapper_and_thousands_of_concurrent_requests(supervisor):
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    with EngineClient(supervisor.control) as client:
        outs = client.generate([[1, 2 + i % 500, 3] for i in range(2000)], params)
        stats = client.call("stats")
    assert len(outs) == 2000 and all(len(o.outputs[0].token_ids) == 2 for o in outs)
    assert stats["free_blocks"] == stats["num_blocks"]


def test_bad_input_raises_before_or_from_the_engine(supervisor):
    async def go():
        client = await _connect(supervisor)
        try:
            with pytest.raises(ValueError, match="context holds"):
                client.submit([1] * 9000, GREEDY)
            with pytest.raises(ValueError, match=r"\[0, 49152\)"):
                client.submit([1, -5], GREEDY)
            with pytest.raises(ValueError, match="prompt is empty"):
                client.submit([], GREEDY)
            client.submit([1, 2], GREEDY, request_id="dup")
            with pytest.raises(ValueError, match="already in flight"):
                client.submit([1, 2], GREEDY, request_id="dup")
        finally:
            await client.shutdown()
    run_async(go())


def _wait_idle(client_call, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        stats = client_call()
        if stats["running"] == 0 and stats["waiting"] == 0 or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


def test_cancel_and_abort_free_the_engine(supervisor):
    long = SamplingParams(temperature=0, max_tokens=4000, ignore_eos=True)

    async def go():
        client = await _connect(supervisor)
        try:
            task = client.submit(PROMPTS[0], long)
            agen = client.generate(PROMPTS[1], long, request_id="to-abort")
            first = await agen.__anext__()
            assert not first.finished
            await asyncio.sleep(0.3)
            task.cancel()
            assert await client.abort("to-abort")
            outs = [o async for o in agen]
            assert outs[-1].outputs[0].finish_reason == "abort"
            with pytest.raises(asyncio.CancelledError):
                await task
            stats = None
            for _ in range(100):
                stats = await client.call("stats")
                if stats["running"] == 0:
                    break
                await asyncio.sleep(0.05)
            return stats
        finally:
            await client.shutdown()
    stats = run_async(go())
    assert stats["running"] == 0 and stats["free_blocks"] == stats["num_blocks"]


def _frontend_process(control, prompts, queue):
    with EngineClient(control) as client:
        outs = client.generate(prompts, GREEDY)
    queue.put([(o.outputs[0].text, o.outputs[0].token_ids) for o in outs])


def test_several_frontend_processes_on_one_engine(supervisor, offline):
    expected = [(c.text, c.token_ids) for c in offline(PROMPTS, GREEDY)]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_frontend_process, args=(supervisor.control, PROMPTS, queue))
             for _ in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert all(r == expected for r in results)


def test_engine_killed_mid_generation_fails_requests_fast_then_recovers(offline):
    sup = Supervisor(build_engine_config(None, dtype="float32", num_blocks=512),
                     TransportConfig(), SupervisorConfig(backoff_s=0.1))
    sup.start()
    expected = offline(PROMPTS[:1], GREEDY)[0]

    async def go():
        client = await _connect(sup)
        try:
            long = SamplingParams(temperature=0, max_tokens=4000, ignore_eos=True)
            tasks = [client.submit(p, long) for p in PROMPTS]
            await asyncio.sleep(0.5)
            # The reader falls behind (the loop blocked): the engine dies with records unread in
            # its output ring. A reader that kept polling them spun without yielding.
            time.sleep(1.0)
            old_pid = sup.engine_pid
            os.kill(old_pid, signal.SIGKILL)
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert all(isinstance(r, EngineDeadError) for r in results), results
            assert sup.restarts == 0  # failed at the death, not once a new engine was up
            with pytest.raises(EngineDeadError):
                client.submit(PROMPTS[0], GREEDY)  # refused while the engine restarts
            deadline = time.monotonic() + 120
            while client.state != "ready":
                assert time.monotonic() < deadline, "the client did not re-attach"
                await asyncio.sleep(0.1)
            assert sup.engine_pid != old_pid and sup.restarts == 1 and sup.state == "ready"
            out = await client.submit(PROMPTS[0], GREEDY)
            return out.outputs[0]
        finally:
            await client.shutdown()
    try:
        comp = run_async(go())
    finally:
        sup.shutdown()
    assert comp.token_ids == expected.token_ids
    assert sup.state == "stopped" and not sup.process.is_alive()


def test_engine_that_cannot_start_gives_a_clear_error():
    sup = Supervisor(build_engine_config("/no/such/model.gguf"), TransportConfig(),
                     SupervisorConfig(start_timeout_s=120))
    with pytest.raises(EngineStartError, match="the engine failed to start: .*no/such/model"):
        sup.start()
    assert sup.state == "failed" and not sup.process.is_alive()
    sup.shutdown()


def test_shutdown_leaves_no_process_segment_or_socket():
    sup = Supervisor(build_engine_config(None, dtype="float32", num_blocks=256),
                     TransportConfig(), SupervisorConfig())
    sup.start()
    engine_pid = sup.engine_pid

    async def go():
        client = await _connect(sup)
        task = client.submit(PROMPTS[0], SamplingParams(temperature=0, max_tokens=8))
        names = [client.channel.request_ring.name, client.channel.output_ring.name]
        await task
        await client.shutdown()
        return names
    names = run_async(go())
    sup.shutdown()
    assert not sup.process.is_alive() and sup.process.exitcode == 0
    assert sup.process not in mp.active_children() and not shm.pid_alive(engine_pid)
    assert not any(n in shm.list_segments() for n in names)
    assert not shm.list_segments(pid=engine_pid)
    assert not shm.list_segments(pid=engine_pid, directory=shm.SOCKET_DIR)
    assert not os.path.exists(sup.control[len("ipc://"):])
