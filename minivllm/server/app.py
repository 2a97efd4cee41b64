"""The OpenAI-compatible HTTP app: one per API-server process, each a frontend of the engine.

Every request passes the same gate before it reaches the engine (`ServerState.admit`): the API
key, the body size, draining (503), the engine being up (503), and the pending-request bound
(429 with Retry-After). Completions and chat completions share one path (`_serve`): a list of
engine streams (prompts x n), merged, turned into OpenAI's JSON or SSE chunks, with metrics
taken on the way. A client that disconnects has its requests aborted in the engine.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import AsyncIterator, Callable, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from minivllm.config import ServerConfig
from minivllm.frontend.async_client import (AsyncEngineClient, EngineDeadError,
                                            EngineDrainingError, EngineError)
from minivllm.outputs import CompletionOutput, RequestOutput
from minivllm.sampling_params import SamplingParams
from minivllm.server import metrics
from minivllm.server.protocol import (APIError, ChatCompletionRequest, CompletionRequest,
                                      DetokenizeRequest, TokenizeRequest, validation_error)


# One request takes one --max-pending slot however many sequences it asks for (n x prompts),
# so that number needs its own bound: OpenAI's cap on n.
MAX_SEQUENCES_PER_REQUEST = 128


class ServerState:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.client: Optional[AsyncEngineClient] = None
        self.draining = False
        self.in_flight = 0
        self.model_name = config.served_model_name

    @property
    def ready(self) -> bool:
        return self.client is not None and self.client.state == "ready" and not self.draining

    def check_key(self, request: Request) -> None:
        key = self.config.api_key
        if key is not None and request.headers.get("authorization") != f"Bearer {key}":
            raise APIError(401, "a valid API key is needed: send 'Authorization: Bearer <key>'",
                           type_="authentication_error")

    async def parse(self, request: Request, model_cls):
        self.check_key(request)
        size = request.headers.get("content-length")
        limit = self.config.max_body_bytes
        if size is not None and size.isdigit() and int(size) > limit:
            raise APIError(413, f"the body has {size} bytes, the limit is {limit}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise APIError(413, f"the body exceeds the {limit}-byte limit")
        try:
            req = model_cls.model_validate_json(bytes(body))
        except ValidationError as exc:
            raise validation_error(exc) from None
        if getattr(req, "model", None) not in (None, self.model_name):
            raise APIError(404, f"The model `{req.model}` does not exist.", param="model",
                           type_="NotFoundError")
        return req

    def admit(self) -> None:
        """Take one pending-request slot (give it back with release()), or refuse."""
        if self.draining:
            metrics.rejected.labels("draining").inc()
            raise APIError(503, "the server is shutting down", type_="service_unavailable")
        if self.client is None or self.client.state != "ready":
            metrics.rejected.labels("engine_unavailable").inc()
            raise APIError(503, "the engine is restarting; retry shortly",
                           type_="service_unavailable",
                           headers={"Retry-After": str(self.config.retry_after_s)})
        if self.in_flight >= self.config.max_pending:
            metrics.rejected.labels("overloaded").inc()
            raise APIError(429, f"more than {self.config.max_pending} requests pending; "
                                f"retry later", type_="rate_limit_error",
                           headers={"Retry-After": str(self.config.retry_after_s)})
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="minivllm", docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await state.parse(request, CompletionRequest)
        req.check_supported()
        params = req.sampling_params(req.max_tokens, req.logprobs)
        return await _serve(state, request, req, params, req.prompts(), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await state.parse(request, ChatCompletionRequest)
        req.check_supported()
        params = req.sampling_params(req.completion_limit(), req.num_logprobs())
        prompt = _chat_prompt(state, req.messages, req.add_generation_prompt)
        return await _serve(state, request, req, params, [prompt], chat=True)

    @app.get("/v1/models")
    async def models(request: Request):
        state.check_key(request)
        client = state.client
        return {"object": "list", "data": [{
            "id": state.model_name, "object": "model", "created": int(time.time()),
            "owned_by": "minivllm",
            "max_model_len": None if client is None else client.max_model_len}]}

    @app.get("/health")
    async def health():
        if state.ready:
            return {"status": "ok", "engine_pid": state.client.engine_pid}
        status = "draining" if state.draining else (
            "starting" if state.client is None else "engine_" + state.client.state)
        return JSONResponse({"status": status}, status_code=503)

    @app.get("/metrics")
    async def metrics_endpoint():
        stats = None
        if state.client is not None:
            metrics.restarts.set(state.client.restarts)
        if state.client is not None and state.client.state == "ready":
            try:
                stats = await state.client.call("stats", timeout=2.0)
            except (TimeoutError, RuntimeError):
                pass
        body, content_type = metrics.render(stats)
        return Response(body, media_type=content_type)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        req = await state.parse(request, TokenizeRequest)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give either 'prompt' or 'messages'", param="prompt")
        text = req.prompt if req.messages is None else _chat_prompt(
            state, req.messages, req.add_generation_prompt)
        ids = _tokenizer(state).encode(text)
        return {"tokens": ids, "count": len(ids), "max_model_len": state.client.max_model_len}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req = await state.parse(request, DetokenizeRequest)
        vocab = state.client.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            raise APIError(400, f"tokens must be integers in [0, {vocab})", param="tokens")
        return {"prompt": _tokenizer(state).decode(req.tokens)}

    @app.get("/version")
    async def version():
        from importlib import metadata

        return {"version": metadata.version("minivllm")}

    return app


def _tokenizer(state: ServerState):
    if state.client is None or state.client.tokenizer is None:
        raise APIError(400, "this model has no tokenizer: send token ids", param="prompt")
    return state.client.tokenizer


def _chat_prompt(state: ServerState, messages, add_generation_prompt: bool) -> str:
    conversation = [{"role": m.role, "content": m.text()} for m in messages]
    try:
        return _tokenizer(state).apply_chat_template(conversation, add_generation_prompt)
    except ValueError as exc:
        raise APIError(400, str(exc), param="messages") from None


# ---- one request: engine streams in, OpenAI JSON or SSE out ---------------------------------
async def _serve(state: ServerState, request: Request, req, params: SamplingParams,
                 prompts: list, chat: bool):
    start = time.monotonic()
    if len(prompts) * params.n > MAX_SEQUENCES_PER_REQUEST:
        raise APIError(400, f"this request asks for {len(prompts) * params.n} sequences (n x "
                            f"prompts); the limit is {MAX_SEQUENCES_PER_REQUEST}",
                       param="n" if len(prompts) == 1 else "prompt")
    state.admit()
    streams: list = []
    try:
        try:
            for prompt in prompts:
                streams.append(state.client.open(prompt, params))
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages" if chat else "prompt") from None
        except EngineError as exc:
            raise _engine_error(exc) from None
        shape = (_Chat if chat else _Completion)(state, params, len(prompts))
        timing = _Timing(start, len(prompts))
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            body = _sse(shape, _merge(streams), timing, include_usage, state.release)
            streams = None  # the stream owns the requests and the admission slot now
            return StreamingResponse(body, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache",
                                              "X-Accel-Buffering": "no"})
        finals = await _until_done_or_disconnect(request, _collect(_merge(streams), timing))
        return shape.response(finals)
    finally:
        if streams is not None:
            for stream in streams:
                stream.close()
            state.release()


async def _merge(streams: list) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from every prompt's stream, as they come."""
    if len(streams) == 1:
        try:
            async for out in streams[0]:
                yield 0, out
        finally:
            streams[0].close()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, stream):
        try:
            async for out in stream:
                await queue.put((i, out, None))
        except BaseException as exc:  # noqa: BLE001  (handed to the consumer)
            await queue.put((i, None, exc))
        await queue.put((i, None, None))
    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
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


async def _collect(merged, timing: "_Timing") -> list[RequestOutput]:
    finals: list[Optional[RequestOutput]] = [None] * len(timing.last)
    async for i, out in merged:
        timing.observe(i, out)
        finals[i] = out
    return finals


async def _until_done_or_disconnect(request: Request, work):
    """Await `work`; if the client goes away first, cancel it (aborting its requests)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
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
        raise _engine_error(exc) from None


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _engine_error(exc: EngineError) -> APIError:
    if isinstance(exc, (EngineDeadError, EngineDrainingError)):
        return APIError(503, str(exc), type_="service_unavailable")
    if isinstance(exc, ValueError):
        return APIError(400, str(exc))
    return APIError(500, str(exc), type_="internal_error")


class _Timing:
    """Per prompt: TTFT, inter-token latency and end-to-end latency into the histograms, and
    token and finish counters once finished."""

    def __init__(self, start: float, n: int) -> None:
        self.start = start
        self.last = [None] * n

    def observe(self, i: int, out: RequestOutput) -> None:
        now = time.monotonic()
        new = sum(len(c.delta_token_ids) for c in out.outputs)
        if new:
            if self.last[i] is None:
                metrics.ttft.observe(now - self.start)
            else:
                gap = (now - self.last[i]) / new
                for _ in range(new):
                    metrics.itl.observe(gap)
            self.last[i] = now
            metrics.generation_tokens.inc(new)
        if out.finished:
            metrics.e2e.observe(now - self.start)
            metrics.prompt_tokens.inc(len(out.prompt_token_ids))
            for c in out.outputs:
                metrics.requests.labels(c.finish_reason).inc()


async def _sse(shape, merged, timing: _Timing, include_usage: bool,
               release: Callable[[], None]):
    finals: dict[int, RequestOutput] = {}
    try:
        for chunk in shape.stream_head():
            yield _event(chunk)
        async for i, out in merged:
            timing.observe(i, out)
            finals[i] = out
            for chunk in shape.stream_chunks(i, out):
                yield _event(chunk)
        if include_usage:
            yield _event(shape.usage_chunk([finals[i] for i in sorted(finals)]))
    except EngineError as exc:
        yield _event(_engine_error(exc).body())
    except asyncio.CancelledError:
        metrics.aborted.labels("disconnect").inc()
        raise
    finally:
        await merged.aclose()
        release()
    yield "data: [DONE]\n\n"


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


# ---- OpenAI shapes --------------------------------------------------------------------------
def _usage(finals: list[RequestOutput]) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in finals)
    completion = sum(len(c.token_ids) for o in finals for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


class _Shape:
    object_name = ""
    chunk_name = ""
    id_prefix = ""

    def __init__(self, state: ServerState, params: SamplingParams, n_prompts: int) -> None:
        self.model, self.params, self.n_prompts = state.model_name, params, n_prompts
        self.tokenizer = state.client.tokenizer
        self.id = f"{self.id_prefix}{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.n = params.n

    def _envelope(self, obj: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def response(self, finals: list[RequestOutput]) -> dict:
        choices = [self.choice(i * self.n + c.index, c)
                   for i, out in enumerate(finals) for c in out.outputs]
        return self._envelope(self.object_name, choices, usage=_usage(finals))

    def stream_head(self) -> list[dict]:
        return []

    def stream_chunks(self, i: int, out: RequestOutput) -> list[dict]:
        chunks = []
        for c in out.outputs:
            if c.delta_text or c.delta_token_ids or c.finished:
                chunks.append(self._envelope(self.chunk_name,
                                             [self.delta_choice(i * self.n + c.index, c)]))
        return chunks

    def usage_chunk(self, finals: list[RequestOutput]) -> dict:
        return self._envelope(self.chunk_name, [], usage=_usage(finals))

    def _token(self, token_id: int) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode(
            [token_id], skip_special_tokens=False)

    def _delta_logprobs(self, c: CompletionOutput, ids: list[int]) -> Optional[list[dict]]:
        if c.logprobs is None:
            return None
        return c.logprobs[len(c.logprobs) - len(ids):] if ids else []


class _Completion(_Shape):
    object_name, chunk_name, id_prefix = "text_completion", "text_completion", "cmpl-"

    def choice(self, index: int, c: CompletionOutput) -> dict:
        return {"index": index, "text": c.text,
                "logprobs": self._logprobs(c.token_ids, c.logprobs),
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}

    def delta_choice(self, index: int, c: CompletionOutput) -> dict:
        ids = c.delta_token_ids
        return {"index": index, "text": c.delta_text,
                "logprobs": self._logprobs(ids, self._delta_logprobs(c, ids)),
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}

    def _logprobs(self, ids: list[int], rows: Optional[list[dict]]) -> Optional[dict]:
        if rows is None:
            return None
        tokens = [self._token(t) for t in ids]
        offsets, pos = [], 0
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        k = self.params.logprobs or 0
        return {"tokens": tokens, "token_logprobs": [row[t] for t, row in zip(ids, rows)],
                "top_logprobs": [{self._token(t): lp for t, lp in
                                  sorted(row.items(), key=lambda kv: -kv[1])[:max(k, 1)]}
                                 for row in rows],
                "text_offset": offsets}


class _Chat(_Shape):
    object_name, chunk_name, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl-"

    def choice(self, index: int, c: CompletionOutput) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": c.text},
                "logprobs": self._logprobs(c.token_ids, c.logprobs),
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}

    def stream_head(self) -> list[dict]:
        return [self._envelope(self.chunk_name, [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
             "finish_reason": None} for i in range(self.n)])]

    def delta_choice(self, index: int, c: CompletionOutput) -> dict:
        ids = c.delta_token_ids
        delta = {"content": c.delta_text} if c.delta_text or not c.finished else {}
        return {"index": index, "delta": delta,
                "logprobs": self._logprobs(ids, self._delta_logprobs(c, ids)),
                "finish_reason": c.finish_reason}

    def _logprobs(self, ids: list[int], rows: Optional[list[dict]]) -> Optional[dict]:
        if rows is None:
            return None
        k = self.params.logprobs or 0

        def entry(t: int, lp: float) -> dict:
            text = self._token(t)
            return {"token": text, "logprob": lp, "bytes": list(text.encode())}
        return {"content": [dict(entry(t, row[t]), top_logprobs=[
            entry(tt, lp) for tt, lp in sorted(row.items(), key=lambda kv: -kv[1])[:k]])
            for t, row in zip(ids, rows)]}
