"""The OpenAI serving path: one HTTP request in, engine streams out, OpenAI's JSON or SSE back.

Completions and chat completions differ only in their prompts and their response shape
(`responses.py`); the rest is one path, `serve`: the bound on sequences per request, admission,
one engine stream per prompt (each carrying its n sequences), every stream's outputs handled
by the engine client's reader as it reads them (`PromptStreams`: one pass over the requests
per engine step, no task woken per request), then either collected into one JSON body (a client
that disconnects first has its requests aborted) or written as SSE chunks as they are made (at
most one per stream per `--stream-interval-ms` when set), with a usage chunk when asked for. A
plain stream's running chunks, after its first, are the reader's own work in C (a TextSink,
csrc/text_sink.pyx): no Python runs per token or per stream for them.
Engine errors become OpenAI errors (503 while the engine is down or draining), and every
output's latencies and token counts go into the metrics on the way.
"""
from __future__ import annotations

import asyncio
import functools
import time
from typing import TYPE_CHECKING, Callable, Optional, Union

from fastapi import Request

from minivllm.frontend.async_client import (EngineDeadError, EngineDrainingError, EngineError,
                                            RequestStream)
from minivllm.outputs import RequestOutput
from minivllm.sampling_params import SamplingParams
from minivllm.server import metrics
from minivllm.server.protocol import APIError, ChatCompletionRequest, CompletionRequest
from minivllm.server.responses import ChatResponse, CompletionResponse, OpenAIResponse, event
from minivllm.server.sse import ChunkWriter, EventStream, until_done_or_disconnect
from minivllm.server.tool_calls import ToolCalls

if TYPE_CHECKING:  # app.py imports this module
    from minivllm.server.app import ServerState

# One request takes one --max-pending slot however many sequences it asks for (n x prompts),
# so that number needs its own bound: OpenAI's cap on n.
MAX_SEQUENCES_PER_REQUEST = 128


async def serve(state: ServerState, request: Request,
                req: Union[CompletionRequest, ChatCompletionRequest], params: SamplingParams,
                prompts: list, chat: bool, tools: Optional[ToolCalls] = None
                ) -> Union[dict, EventStream]:
    """Generate for every prompt of `req`; the whole response, or its SSE stream (a chat's
    tool calls taken out of its text by `tools`)."""
    start = time.monotonic()
    if len(prompts) * params.n > MAX_SEQUENCES_PER_REQUEST:
        raise APIError(400, f"this request asks for {len(prompts) * params.n} sequences (n x "
                            f"prompts); the limit is {MAX_SEQUENCES_PER_REQUEST}",
                       param="n" if len(prompts) == 1 else "prompt")
    state.admit()
    streams: list = []
    try:
        limit, limit_field = req.completion_limit()
        inputs = [await _engine_prompt(state, p, limit, limit_field, chat) for p in prompts]
        try:
            for prompt in inputs:  # outputs are read as they come: no copies per output
                streams.append(state.client.open(prompt, params, copy_lists=False))
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages" if chat else "prompt") from None
        except EngineError as exc:
            raise engine_error(exc) from None
        response = (ChatResponse(state.model_name, state.client.tokenizer, params, tools)
                    if chat else
                    CompletionResponse(state.model_name, state.client.tokenizer, params,
                                       req.echo, req.max_tokens == 0))
        recorder = MetricsRecorder(start, len(prompts))
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            if params.structured_outputs is not None:
                await _first_output(streams[0])
            outputs = PromptStreams(streams, recorder, state.config.stream_interval_s)
            streams = None  # the response owns the requests and the admission slot now
            return EventStream(StreamedBody(response, outputs, include_usage,
                                            state.release).run)
        outputs = PromptStreams(streams, recorder)
        outputs.start()
        try:
            await until_done_or_disconnect(request.receive, outputs.done)
        except EngineError as exc:
            raise engine_error(exc) from None
        return response.body(outputs.latest)
    finally:
        if streams is not None:
            for stream in streams:
                stream.close()
            state.release()


async def _first_output(stream: RequestStream) -> None:
    """Await a stream's first output before its response starts: a grammar the engine cannot
    compile is then a 400 (EngineError), not an error event after a 200."""
    try:
        await stream.ready()
    except EngineError as exc:
        raise engine_error(exc) from None


async def _engine_prompt(state: ServerState, prompt: Union[str, list[int]],
                         max_tokens: Optional[int], limit_field: str, chat: bool
                         ) -> Union[dict, list[int]]:
    """The prompt as the engine client takes it, encoded (off the event loop when long), with
    room left in the context for the completion, else a 400 with both numbers (vLLM's
    wording)."""
    context, where = state.client.max_model_len, "messages" if chat else "prompt"
    room = context - (max_tokens or 1)  # no max_tokens: up to the context, at least 1
    if isinstance(prompt, str):
        n, ids = await state.off_loop(len(prompt), state.tokenizer.encode_within, prompt, room)
        engine_prompt = {"prompt": prompt, "prompt_token_ids": ids}
    else:
        n, engine_prompt = len(prompt), prompt
    if n <= room:
        return engine_prompt
    if max_tokens is None:
        asked, shorten = f"{n} tokens in the {where}, which leaves none for the completion", where
    else:
        asked = f"{n + max_tokens} tokens ({n} in the {where}, {max_tokens} in the completion)"
        shorten = f"{where} or completion"
    raise APIError(400, f"This model's maximum context length is {context} tokens. However, "
                        f"you requested {asked}. Please reduce the length of the {shorten}.",
                   param=limit_field if max_tokens is not None and n < context else where)


def engine_error(exc: EngineError) -> APIError:
    """An engine failure as the error the client sees."""
    if isinstance(exc, (EngineDeadError, EngineDrainingError)):
        return APIError(503, str(exc), type_="service_unavailable")
    if isinstance(exc, ValueError):
        return APIError(400, str(exc))
    return APIError(500, str(exc), type_="internal_error")


class MetricsRecorder:
    """One request's outputs into the metrics (through metrics.request_tally and token_tally),
    per prompt: TTFT, inter-token latency and end-to-end latency into the histograms; token
    counts, decode time and finish counters once finished."""

    def __init__(self, start: float, n_prompts: int) -> None:
        self.start = start
        self.first: list[Optional[float]] = [None] * n_prompts
        self.last: list[Optional[float]] = [None] * n_prompts

    def observe(self, i: int, out: RequestOutput) -> None:
        new, finished = 0, True
        for c in out.outputs:  # (one loop: this runs per request per engine step)
            new += len(c.delta_token_ids)
            finished = finished and c.finish_reason is not None
        now = self.tokens(i, new)
        if finished:
            self._finished(i, out, now)

    def tokens(self, i: int, new: int) -> float:
        """`new` tokens of prompt i streamed now (its TTFT, or their gaps); returns now."""
        now = time.monotonic()
        if new:
            last = self.last[i]
            if last is None:
                metrics.request_tally.observe(metrics.ttft, now - self.start)
                self.first[i] = now
                metrics.token_tally.add(new, None, now)
            else:
                metrics.token_tally.add(new, (now - last) / new, now)
            self.last[i] = now
        return now

    def _finished(self, i: int, out: RequestOutput, now: float) -> None:
        tally = metrics.request_tally
        tally.observe(metrics.e2e, now - self.start)
        if self.first[i] is not None:
            tally.observe(metrics.decode_time, self.last[i] - self.first[i])
        tally.inc(metrics.prompt_tokens, len(out.prompt_token_ids))
        tally.observe(metrics.request_prompt_tokens, len(out.prompt_token_ids))
        for c in out.outputs:
            tally.inc(metrics.requests.labels(c.finish_reason))
            tally.observe(metrics.request_generation_tokens, len(c.token_ids))
        tally.observe(metrics.request_max_generation_tokens,
                      max(len(c.token_ids) for c in out.outputs))


class PromptStreams:
    """Every prompt's engine stream of one HTTP request, read by the engine client's reader
    itself (RequestStream.listen), without a task per request woken per engine step: each
    output goes into the metrics and `latest`, then to `on_output(i, output)` if set; with
    `on_text` set, a running single-sequence output is not built: its new text goes to
    `on_text(i, text)` instead. With `interval`, a stream gives at most one output per
    `interval` s (the steps of each pause come as one output: its snapshot holds every token
    since the last). `done` resolves once every prompt has finished, or fails with the first
    error (the callbacks' included); close() aborts what still runs."""

    def __init__(self, streams: list[RequestStream], recorder: MetricsRecorder,
                 interval: float = 0.0) -> None:
        self.streams, self.recorder, self.interval = streams, recorder, interval
        self.on_output: Optional[Callable[[int, RequestOutput], None]] = None
        self.on_text: Optional[Callable[[int, str], None]] = None
        self.latest: list[Optional[RequestOutput]] = [None] * len(streams)
        self.loop = asyncio.get_running_loop()
        self.done = self.loop.create_future()
        self.running = len(streams)  # prompts not finished
        self._next = [0.0] * len(streams)  # when each stream may give its next output (paced)
        self._timers: dict[int, asyncio.TimerHandle] = {}  # paced streams with output waiting

    def start(self) -> None:
        for i, stream in enumerate(self.streams):
            stream.listen(functools.partial(self._read, i))

    def _read(self, i: int) -> None:
        if self.done.done() or i in self._timers:
            return
        if self.interval and self._next[i] > self.loop.time():
            self._timers[i] = self.loop.call_at(self._next[i], self._read_paced, i)
            return
        try:
            finished = self._take(i)
        except Exception as exc:  # noqa: BLE001  (the awaiter of done gets it)
            self.done.set_exception(exc)
            return
        if finished:
            self.running -= 1
            if not self.running:
                self.done.set_result(None)
        elif self.interval:
            self._next[i] = self.loop.time() + self.interval

    def _take(self, i: int) -> bool:
        """Hand on stream i's news; whether it has finished."""
        stream = self.streams[i]
        news = stream.running_delta() if self.on_text is not None else None
        if news is not None:
            text, tokens = news
            self.recorder.tokens(i, tokens)
            if text or tokens:
                self.on_text(i, text)
            return False
        out = stream.poll()
        self.recorder.observe(i, out)
        self.latest[i] = out
        if self.on_output is not None:
            self.on_output(i, out)
        return stream.state.finished

    def sink(self, i: int, before: bytes, after: bytes, writer: ChunkWriter) -> None:
        """Have stream i's running text written by the reader itself, between `before` and
        `after` (RequestStream.sink), once it has streamed a token."""
        if self.recorder.last[i] is not None:
            self.streams[i].sink(before, after, writer, self.recorder.last, i,
                                 metrics.token_tally)

    def _read_paced(self, i: int) -> None:
        del self._timers[i]
        self._read(i)

    def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for stream in self.streams:
            stream.close()
        # (the response's callbacks hold it, and it them: freed now, not by the collector)
        self.on_output = self.on_text = None


class StreamedBody:
    """A streamed response's body: the head chunk, then a chunk per output, written as the
    engine client's reader reads it, the usage chunk when asked for, and [DONE]. The last
    output's chunk, the usage chunk and [DONE] go with the response's end, in one write."""

    def __init__(self, response: OpenAIResponse, outputs: PromptStreams, include_usage: bool,
                 release: Callable[[], None]) -> None:
        self.response, self.outputs = response, outputs
        self.include_usage, self.release = include_usage, release
        self.writer: Optional[ChunkWriter] = None
        self._sunk: set[int] = set()  # prompts whose stream was offered a TextSink
        self._last = b""  # the last output's chunk, held for the response's end
        outputs.on_output = self._on_output
        if response.plain:
            outputs.on_text = self._on_text

    async def run(self, writer: ChunkWriter) -> bytes:
        """Writes the body but its end, which it returns."""
        self.writer = writer
        end = ""
        try:
            head = "".join(event(chunk) for chunk in self.response.stream_head())
            if head:
                writer.write(head.encode())
            self.outputs.start()
            await self.outputs.done
            if self.include_usage:
                end = event(self.response.usage_chunk(self.outputs.latest))
        except EngineError as exc:
            end = event(engine_error(exc).body())
        finally:
            self.outputs.close()
            self.release()
        return self._last + f"{end}data: [DONE]\n\n".encode()

    def _on_output(self, i: int, out: RequestOutput) -> None:
        events = self.response.stream_events(i, out).encode()
        if out.finished and self.outputs.running == 1:
            self._last = events  # done resolves now: run() writes it with the rest
        elif events:
            self.writer.write(events)

    def _on_text(self, i: int, text: str) -> None:
        self.writer.write(self.response.text_event(i, text).encode())
        if not self.outputs.interval and i not in self._sunk:
            # its next chunks are the same but for their text: written by the reader in C
            self._sunk.add(i)
            before, after = self.response.text_frame(i)
            self.outputs.sink(i, before.encode(), after.encode(), self.writer)
