"""TextSink (csrc/text_sink.pyx): a plain stream's chunks written from the reader's batches
are byte for byte the Python path's (responses.text_event of CompletionStream.news(), framed as
uvicorn frames a body chunk), and the stream's state is the Python path's once it leaves the
sink (finished, aborted, released). No engine: step batches are made here."""
import itertools
import json
import random

import numpy as np
import pytest
import uvloop

from minivllm._cext import text_sink
from minivllm.frontend.detokenizer import byte_tables
from minivllm.frontend.output_processor import CompletionStream, OutputProcessor
from minivllm.loader import load_tokenizer, resolve_model
from minivllm.sampling_params import SamplingParams
from minivllm.server.responses import ChatResponse, CompletionResponse
from minivllm.transport.protocol import FINISH_LENGTH
from test_sse import _serve_and_read


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model(None))


class Transport:
    """uvloop's transport, as a TextSink uses it; `buffered` says what it reports as buffered:
    the sink writes through the ChunkWriter while that is not 0."""

    def __init__(self) -> None:
        self.data, self.buffered = b"", 0

    def write(self, data: bytes) -> None:
        self.data += data

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def is_closing(self) -> bool:
        return False


class Cycle:
    """What a TextSink reads of uvicorn's httptools RequestResponseCycle."""

    def __init__(self) -> None:
        self.transport, self.disconnected = Transport(), False
        self.flow = type("Flow", (), {"write_paused": False})()


class Writer:
    """A ChunkWriter: direct writes to `_cycle`'s transport, or (no cycle) through write()."""

    def __init__(self, direct: bool) -> None:
        self._cycle = Cycle() if direct else None
        self._flusher = None
        self.bodies: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.bodies.append(data)
        if self._cycle is not None:  # as ChunkWriter's direct write frames it
            self._cycle.transport.write(b"%x\r\n%s\r\n" % (len(data), data))

    def chunks(self) -> list[bytes]:
        """The bodies written, each checked to be framed as uvicorn frames one."""
        if self._cycle is None:
            return self.bodies
        raw, bodies = self._cycle.transport.data, []
        while raw:
            head, raw = raw.split(b"\r\n", 1)
            size = int(head, 16)
            assert raw[size:size + 2] == b"\r\n"
            bodies.append(raw[:size])
            raw = raw[size + 2:]
        return bodies


class Tally(text_sink.Tally):
    def __init__(self) -> None:
        super().__init__([0.001, 0.01, float("inf")], 1e9)

    def flush(self) -> None:
        pass


def _ids(tokenizer, rng: random.Random) -> list[int]:
    """Token ids whose text has what JSON and SSE escape (quotes, backslashes, control
    characters, U+0085, U+2028/9), multi-byte characters split across tokens, invalid UTF-8,
    special tokens and ids past the vocabulary."""
    table = byte_tables(tokenizer)[0]
    byte_id = {data[0]: i for i, data in enumerate(table) if len(data) == 1}
    words = [tokenizer.encode(t) for t in
             ["Hello", ' "quoted"', " back\\slash", "\n\t\r", " é世🎉", "\u2028\u2029\x85",
              "\x00\x01\x1f\x7f", " plain words here"]]
    ids = []
    while len(ids) < 400:
        kind = rng.random()
        if kind < 0.5:
            ids += rng.choice(words)
        elif kind < 0.8:  # raw bytes: characters split, or invalid
            ids += [byte_id[b] for b in rng.choice(
                [b"\xe2\x80\xa8", b"\xc2\x85", b"\xe4\xb8", b"\xe2\x28", b"\xf0\x9f\x8e\x89",
                 b"\x80\x80", b"\x08\x0c"])]
        elif kind < 0.9:
            ids.append(rng.randrange(20))  # special tokens among them
        else:
            ids.append(rng.choice([rng.randrange(49152), len(table) + 5]))
    return ids


@pytest.mark.parametrize("direct", [True, False])
def test_sink_chunks_and_state_equal_the_python_path(tokenizer, direct):
    rng = random.Random(1)
    responses = [CompletionResponse("m", tokenizer, SamplingParams()),
                 ChatResponse("m", tokenizer, SamplingParams()),
                 CompletionResponse("m", tokenizer, SamplingParams(skip_special_tokens=False))]
    streams = [_ids(tokenizer, rng) for _ in responses]
    keys = itertools.count(7)
    py, sunk = OutputProcessor(tokenizer, [2]), OutputProcessor(tokenizer, [2])
    states = []
    for response in responses:
        a = py.add_request("r", None, [1, 2, 3], response.params, lambda: next(keys))
        b = sunk.add_request("r", None, [1, 2, 3], response.params, lambda: a.streams[0].key)
        states.append((a.streams[0], b.streams[0]))
    expected = [[] for _ in responses]
    writers = [Writer(direct) for _ in responses]
    tally, last = Tally(), [0.0] * len(responses)
    pos, attached = [0] * len(responses), [0] * len(responses)
    while any(p < len(s) for p, s in zip(pos, streams)):
        entries = []  # a batch of 1-3 steps, each with a token of every running stream
        for _ in range(rng.randint(1, 3)):
            for i, ids in enumerate(streams):
                if pos[i] < len(ids):
                    last_one = pos[i] == len(ids) - 1
                    entries.append((states[i][0].key, ids[pos[i]],
                                    FINISH_LENGTH if last_one else 0))
                    pos[i] += 1
        entries.append((999, 5, 0))  # a straggler: left out
        keys_a = np.array([e[0] for e in entries], np.uint64)
        tokens_a = np.array([e[1] for e in entries], np.int32)
        finish_a = np.array([e[2] for e in entries], np.uint8)
        py.process(keys_a, tokens_a, finish_a)
        for w in writers:  # some chunks through the writer: its transport has some buffered
            if w._cycle is not None:
                w._cycle.transport.buffered = rng.choice([0, 0, 100])
        rest = text_sink.take(sunk.streams, sunk.sinks, keys_a, tokens_a, finish_a)
        if rest is None:  # it took nothing
            rest = np.arange(len(entries))
        else:
            assert len(entries) - 1 not in rest.tolist()
        sunk.process(keys_a[rest], tokens_a[rest], finish_a[rest])
        for i, (a, b) in enumerate(states):
            # the Python path: each output's chunk (the final one is not the sink's business)
            if a.finish_reason is None:
                text, new = a.news()
                if text or new:
                    expected[i].append(responses[i].text_event(i, text).encode())
            if b.sink is None and b.finish_reason is None:
                text, new = b.news()  # the first output goes the usual way, then a sink
                if text or new:
                    writers[i].write(responses[i].text_event(i, text).encode())
                    before, after = responses[i].text_frame(i)
                    b.sink = text_sink.TextSink(b, sunk.sinks, before.encode(), after.encode(),
                                                writers[i], last, i, tally)
                    attached[i] = len(b.token_ids)
    for i, (a, b) in enumerate(states):
        assert writers[i].chunks() == expected[i]
        if direct:  # the writer wrote the first chunk, and those while the transport buffered
            assert 1 < len(writers[i].bodies) < len(expected[i]) / 2
        assert (a.finish_reason, b.finish_reason) == ("length", "length") and b.sink is None
        out_a, out_b = a.output(), b.output()
        assert out_b == out_a and out_a.text == a.text == b.text
        assert out_a.text == tokenizer.decode(streams[i], skip_special_tokens=i != 2)
    # the sinks' tokens: not those before the sink (the first output's) nor the finish's batch
    assert 0 < tally.tokens <= sum(len(ids) - first - 1 for ids, first in zip(streams, attached))
    assert sum(tally.gap_counts) == tally.tokens and not sunk.sinks


def test_release_gives_the_stream_its_state_back(tokenizer):
    response = CompletionResponse("m", tokenizer, SamplingParams())
    proc = OutputProcessor(tokenizer, [2])
    state = proc.add_request("r", None, [1], response.params, lambda: 3)
    stream = state.streams[0]
    table = byte_tables(tokenizer)[0]
    ids = tokenizer.encode("Once upon a time, 世界") + [table.index(b"\xe4")]  # a char cut
    stream.add(ids[0], 0)
    text, _ = stream.news()
    writer = Writer(True)
    before, after = response.text_frame(0)
    last = [0.0]
    stream.sink = text_sink.TextSink(stream, proc.sinks, before.encode(), after.encode(),
                                     writer, last, 0, Tally())
    for t in ids[1:]:
        assert text_sink.take(proc.streams, proc.sinks, np.array([3], np.uint64),
                              np.array([t], np.int32), np.zeros(1, np.uint8)).size == 0
    proc.release(state)
    assert stream.sink is None and not proc.sinks and last[0] > 0
    assert stream.token_ids == ids and stream.sent_tokens == len(ids)
    assert stream.detok.pending == b"\xe4"
    streamed = text + "".join(json.loads(body[len(b"data: "):])["choices"][0]["text"]
                              for body in writer.chunks())
    assert stream.text == streamed == tokenizer.decode(ids[:-1])


def test_a_sink_under_flow_control_keeps_its_chunks_in_order(tokenizer):
    """A real uvicorn (httptools), a client that reads nothing until every chunk is written:
    the sink's direct writes stop once the transport buffers, and the rest queue behind the
    ChunkWriter's task (not in the transport: flow control holds), in order."""
    # a long model name: 2 kB chunks, 8 MB in all (more than the kernel's socket buffers)
    response = CompletionResponse("m" * 2000, tokenizer, SamplingParams())
    ids = tokenizer.encode(" The quick brown fox jumps over the lazy dog, 世界." * 300)
    expected = CompletionStream(0, response.params, tokenizer, [1], [2])
    chunks = []
    for t in ids:
        expected.add(t, 0)
        text, _ = expected.news()
        chunks.append(response.text_event(0, text).encode())

    def write(writer) -> None:
        proc = OutputProcessor(tokenizer, [2])
        stream = proc.add_request("r", None, [1], response.params, lambda: 3).streams[0]
        stream.add(ids[0], 0)
        writer.write(response.text_event(0, stream.news()[0]).encode())
        before, after = response.text_frame(0)
        stream.sink = text_sink.TextSink(stream, proc.sinks, before.encode(), after.encode(),
                                         writer, [0.0], 0, Tally())
        for t in ids[1:]:
            text_sink.take(proc.streams, proc.sinks, np.array([3], np.uint64),
                           np.array([t], np.int32), np.zeros(1, np.uint8))

    body, paused, buffered = uvloop.run(_serve_and_read("httptools", write))
    assert paused and buffered < 1 << 20 and body == b"".join(chunks)
