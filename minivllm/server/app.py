"""The OpenAI-compatible HTTP app: one per API-server process, each a frontend of the engine.

Here are the routes and the gate every request passes before it reaches the engine
(`ServerState`): the API key, the body size, the request's shape (`protocol.py`), draining
(503), the engine being up (503), and the pending-request bound (429 with Retry-After).
Completions and chat completions then go down one serving path (`serving.py`).
"""
from __future__ import annotations

import time
from typing import Optional, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from minivllm.config import ServerConfig
from minivllm.frontend.async_client import AsyncEngineClient
from minivllm.server import metrics
from minivllm.server.protocol import (APIError, ChatCompletionRequest, ChatMessage,
                                      CompletionRequest, DetokenizeRequest, TokenizeRequest,
                                      validation_error)
from minivllm.server.serving import serve
from minivllm.tokenizer import Tokenizer

RequestModel = TypeVar("RequestModel", bound=BaseModel)


class ServerState:
    """One API server's view of the engine and its admission state."""

    def __init__(self, config: ServerConfig, all_up=None) -> None:
        self.config = config
        self.client: Optional[AsyncEngineClient] = None
        self.all_up = all_up  # an Event the launcher sets once every API server is up
        self.draining = False
        self.in_flight = 0
        self.model_name = config.served_model_name

    @property
    def started(self) -> bool:
        return self.client is not None and (self.all_up is None or self.all_up.is_set())

    @property
    def ready(self) -> bool:
        return self.started and self.client.state == "ready" and not self.draining

    def check_key(self, request: Request) -> None:
        key = self.config.api_key
        if key is not None and request.headers.get("authorization") != f"Bearer {key}":
            raise APIError(401, "a valid API key is needed: send 'Authorization: Bearer <key>'",
                           type_="authentication_error")

    async def parse(self, request: Request, model_cls: type[RequestModel]) -> RequestModel:
        """The body, read up to the size limit and validated as `model_cls`."""
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
    """The routes: OpenAI's completions, chat completions and models; tokenize, detokenize,
    health, metrics and version."""
    app = FastAPI(title="minivllm", docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await state.parse(request, CompletionRequest)
        req.check_supported()
        params = req.sampling_params(req.max_tokens, req.logprobs)
        return await serve(state, request, req, params, req.prompts(), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await state.parse(request, ChatCompletionRequest)
        req.check_supported()
        params = req.sampling_params(req.completion_limit(), req.num_logprobs())
        prompt = _chat_prompt(state, req.messages, req.add_generation_prompt)
        return await serve(state, request, req, params, [prompt], chat=True)

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
            "starting" if not state.started else "engine_" + state.client.state)
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


def _tokenizer(state: ServerState) -> Tokenizer:
    if state.client is None or state.client.tokenizer is None:
        raise APIError(400, "this model has no tokenizer: send token ids", param="prompt")
    return state.client.tokenizer


def _chat_prompt(state: ServerState, messages: list[ChatMessage],
                 add_generation_prompt: bool) -> str:
    conversation = [{"role": m.role, "content": m.text()} for m in messages]
    try:
        return _tokenizer(state).apply_chat_template(conversation, add_generation_prompt)
    except ValueError as exc:
        raise APIError(400, str(exc), param="messages") from None
