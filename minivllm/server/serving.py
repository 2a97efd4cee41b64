"""The OpenAI serving path: one HTTP request in, engine streams out, OpenAI's JSON or SSE back.

Completions and chat completions differ only in their prompts and their response shape
(`responses.py`); the rest is one path, `serve`: the bound on sequences per request, admission,
one engine stream per prompt (each carrying its n sequences), the streams merged as their
outputs come, then either collected into one JSON body (a client that disconnects first has its
requests aborted) or sent as SSE chunks as they are made (at most one per stream per
`--stream-interval-ms` when set), with a usage chunk when asked for.
Engine errors become OpenAI errors (503 while the engine is down or draining), and every
output's latencies and token counts go into the metrics on the way.
"""
from __future__ import annotations

import asyncio
import time
from typing import (TYPE_CHECKING, AsyncGenerator, AsyncIterator, Awaitable, Callable, Optional,
                    Union)

from fastapi import Request
from fastapi.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from minivllm.frontend.async_client import EngineDeadError, EngineDrainingError, EngineError
from minivllm.outputs import RequestOutput
from minivllm.sampling_params import SamplingParams
from minivllm.server import metrics
from minivllm.server.protocol import APIError, ChatCompletionRequest, CompletionRequest
from minivllm.server.responses import ChatResponse, CompletionResponse, OpenAIResponse, event
from minivllm.server.tool_calls import ToolCalls

if TYPE_CHECKING:  # app.py imports this module
    from minivllm.server.app import ServerState

# One request takes one --max-pending slot however many sequences it asks for (n x prompts),
# so that number needs its own bound: OpenAI's cap on n.
MAX_SEQUENCES_PER_REQUEST = 128

# (prompt index, output) pairs of every prompt's engine stream, as they come
Merged = AsyncGenerator[tuple[int, RequestOutput], None]


async def serve(state: ServerState, request: Request,
                req: Union[CompletionRequest, ChatCompletionRequest], params: SamplingParams,
                prompts: list, chat: bool, tools: Optional[ToolCalls] = None
                ) -> Union[dict, "EventStream"]:
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
            for prompt in inputs:  # token_ids are read once finished: no copy per output
                streams.append(state.client.open(prompt, params, copy_token_ids=False))
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
            merged = _merge(streams, state.config.stream_interval_s)
            if params.structured_outputs is not None:
                merged = await _first_awaited(merged)
            streams = None  # the response owns the requests and the admission slot now
            return _sse(response, merged, recorder, include_usage, state.release)
        finals = await _until_done_or_disconnect(request.receive,
                                                 _collect(_merge(streams), recorder))
        return response.body(finals)
    finally:
        if streams is not None:
            for stream in streams:
                stream.close()
            state.release()


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
    """One request's outputs into the metrics, per prompt: TTFT, inter-token latency and
    end-to-end latency into the histograms; token counts, decode time and finish counters once
    finished."""

    def __init__(self, start: float, n_prompts: int) -> None:
        self.start = start
        self.first: list[Optional[float]] = [None] * n_prompts
        self.last: list[Optional[float]] = [None] * n_prompts

    def observe(self, i: int, out: RequestOutput) -> None:
        now = time.monotonic()
        new, finished = 0, True
        for c in out.outputs:  # (one loop: this runs per request per engine step)
            new += len(c.delta_token_ids)
            finished = finished and c.finish_reason is not None
        if new:
            last = self.last[i]
            if last is None:
                metrics.ttft.observe(now - self.start)
                self.first[i] = now
                metrics.token_tally.add(new, None, now)
            else:
                metrics.token_tally.add(new, (now - last) / new, now)
            self.last[i] = now
        if finished:
            self._finished(i, out, now)

    def _finished(self, i: int, out: RequestOutput, now: float) -> None:
        metrics.token_tally.flush()
        metrics.e2e.observe(now - self.start)
        if self.first[i] is not None:
            metrics.decode_time.observe(self.last[i] - self.first[i])
        metrics.prompt_tokens.inc(len(out.prompt_token_ids))
        metrics.request_prompt_tokens.observe(len(out.prompt_token_ids))
        for c in out.outputs:
            metrics.requests.labels(c.finish_reason).inc()
            metrics.request_generation_tokens.observe(len(c.token_ids))
        metrics.request_max_generation_tokens.observe(max(len(c.token_ids) for c in out.outputs))


async def _merge(streams: list, interval: float = 0.0) -> Merged:
    """(prompt index, output) from every prompt's stream, as they come; with `interval`, at
    most one output of a stream per `interval` s."""
    sources = streams if not interval else [_paced(s, interval) for s in streams]
    if len(streams) == 1:
        try:
            async for out in sources[0]:
                yield 0, out
        finally:
            streams[0].close()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, source):
        try:
            async for out in source:
                await queue.put((i, out, None))
        except BaseException as exc:  # noqa: BLE001  (handed to the consumer)
            await queue.put((i, None, exc))
        await queue.put((i, None, None))
    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(sources)]
    try:
        open_streams = len(streams)
        while open_streams:
            i, out, exc = await queue.get()
            if exc is not None:
                raise exc
            if out is None:
                open_streams -= 1
                continue
            yield i, out
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _paced(stream, interval: float) -> AsyncIterator[RequestOutput]:
    """`stream`'s outputs, `interval` s apart at least: the engine steps of each pause come
    as one output (its snapshot holds every token since the last), so as one SSE write."""
    async for out in stream:
        yield out
        if not out.finished:
            await asyncio.sleep(interval)


async def _first_awaited(merged: Merged) -> Merged:
    """`merged`, its first output awaited before the response starts: a grammar the engine
    cannot compile is then a 400 (EngineError), not an error event after a 200."""
    try:
        first = await merged.__anext__()
    except EngineError as exc:
        raise engine_error(exc) from None

    async def rest() -> Merged:
        try:
            yield first
            async for item in merged:
                yield item
        finally:
            await merged.aclose()
    return rest()


# ---- whole: every prompt's final output, unless the client leaves first --------------------
async def _collect(merged: Merged, recorder: MetricsRecorder) -> list[RequestOutput]:
    finals: list[Optional[RequestOutput]] = [None] * len(recorder.last)
    async for i, out in merged:
        recorder.observe(i, out)
        finals[i] = out
    return finals


async def _until_done_or_disconnect(receive: Receive, work: Awaitable):
    """Await `work`; if the client goes away first (`receive`: the request's ASGI receive),
    cancel it (aborting its requests)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return _result(task)
        task.cancel()
        metrics.aborted.labels("disconnect").inc()
        raise APIError(499, "client disconnected")
    finally:
        watcher.cancel()


def _result(task: asyncio.Task):
    try:
        return task.result()
    except EngineError as exc:
        raise engine_error(exc) from None


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


# ---- streamed: SSE chunks as outputs come, then [DONE] ---------------------------------------
# The scope key of the HTTP server's own ASGI send (with_server_send)
SERVER_SEND = "minivllm.server_send"


def with_server_send(app: ASGIApp) -> ASGIApp:
    """`app` with the HTTP server's own send in every request's scope: EventStream writes its
    body there, past the three Python wrappers of send that the middlewares and the route add
    per message (they only watch for the response's start, which goes through them)."""
    async def app_with_server_send(scope: Scope, receive: Receive, send: Send) -> None:
        scope[SERVER_SEND] = send
        await app(scope, receive, send)
    return app_with_server_send


class EventStream(Response):
    """The SSE response: `write(send)` sends its events straight to the HTTP server's ASGI
    send, one write per engine output, in a task that a client's disconnect cancels. This is
    the hot path of a server: StreamingResponse would add an async generator's step and a task
    group per response, and the middlewares' wrappers of send per chunk."""

    media_type = "text/event-stream"

    def __init__(self, write: Callable[[Send], Awaitable[None]]) -> None:
        self.write, self.status_code, self.background = write, 200, None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        send = scope.get(SERVER_SEND, send)
        try:
            await _until_done_or_disconnect(receive, self.write(send))
        except APIError:  # the client has gone: there is nobody to end the response for
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _sse(response: OpenAIResponse, merged: Merged, recorder: MetricsRecorder,
         include_usage: bool, release: Callable[[], None]) -> EventStream:
    async def write(send: Send) -> None:
        def body(events: str) -> dict:
            return {"type": "http.response.body", "body": events.encode(), "more_body": True}
        finals: dict[int, RequestOutput] = {}
        try:
            head = "".join(event(chunk) for chunk in response.stream_head())
            if head:
                await send(body(head))
            async for i, out in merged:
                recorder.observe(i, out)
                finals[i] = out
                events = response.stream_events(i, out)
                if events:
                    await send(body(events))
            if include_usage:
                await send(body(event(response.usage_chunk([finals[i] for i in sorted(finals)]))))
        except EngineError as exc:
            await send(body(event(engine_error(exc).body())))
        finally:
            await merged.aclose()
            release()
        await send(body("data: [DONE]\n\n"))
    return EventStream(write)
