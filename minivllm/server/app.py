"""The OpenAI-compatible HTTP app: one per API-server process, each a frontend of the engine.

Here are the routes and the gate every request passes before it reaches the engine
(`ServerState`): the API key, the body size, the request's shape (`protocol.py`), draining
(503), the engine being up (503), and the pending-request bound (429 with Retry-After).
Completions and chat completions then go down one serving path (`serving.py`); the API
server's app (`asgi_app`) serves their POSTs without FastAPI's per-request machinery.
"""
from __future__ import annotations

import asyncio
import hmac
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Awaitable, Callable, Optional, TypeVar, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from minivllm.config import ServerConfig
from minivllm.frontend.data_parallel_client import DataParallelClient
from minivllm.server import metrics, tool_calls
from minivllm.server.dashboard import add_dashboard
from minivllm.server.protocol import (APIError, ChatCompletionRequest, ChatMessage,
                                      CompletionRequest, DetokenizeRequest, TokenizeRequest,
                                      validation_error)
from minivllm.server.responses import tokenize_body
from minivllm.server.serving import serve
from minivllm.server.sse import EventStream, with_server_send
from minivllm.tokenizer import Tokenizer

RequestModel = TypeVar("RequestModel", bound=BaseModel)
Result = TypeVar("Result")
Reply = Union[dict, EventStream]  # a generating route's: the whole response, or its stream
Handler = Callable[["ServerState", Request], Awaitable[Reply]]

# Texts (in characters) and token lists longer than this are encoded or decoded in a worker
# thread. Below it the work (~0.5 us a character) costs less than the hop to a thread (~100 us)
# and holds the event loop under a millisecond; an 8 MB text would hold it for seconds, and
# every other request of this server with it. The tokenizer releases the GIL while it works
# (see Tokenizer._encoding), so the loop runs on meanwhile.
OFF_LOOP_SIZE = 1024
# Worker threads for those: a burst of huge bodies queues here instead of taking every core.
TOKENIZER_THREADS = 2


class ServerState:
    """One API server's view of the engine and its admission state."""

    def __init__(self, config: ServerConfig, all_up=None) -> None:
        self.config = config
        self.client: Optional[DataParallelClient] = None
        self.all_up = all_up  # a shared flag the launcher sets once every API server is up
        self.draining = False
        self.in_flight = 0
        self.model_name = config.served_model_name
        self._pool = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="tokenizer")

    @property
    def started(self) -> bool:
        return self.client is not None and (self.all_up is None or bool(self.all_up.value))

    @property
    def ready(self) -> bool:
        return self.started and self.client.state == "ready" and not self.draining

    def check_key(self, request: Request) -> None:
        """/v1/*, /tokenize, /detokenize and /dashboard/events call this; /health, /metrics and
        /version do not (probes and scrapers carry no key). The comparison takes the same time
        wherever the two differ, so timing the 401 tells nothing about the key."""
        key = self.config.api_key
        sent = request.headers.get("authorization", "")
        if key is not None and not hmac.compare_digest(sent.encode(), f"Bearer {key}".encode()):
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
        return self._with_sampling_defaults(req)

    def _with_sampling_defaults(self, req: RequestModel) -> RequestModel:
        """The model's generation config (--generation-config) in the sampling fields `req`
        leaves unset, as vLLM applies it."""
        defaults = self.client.sampling_defaults if self.client is not None else {}
        unset = {k: v for k, v in defaults.items() if getattr(req, k, 0) is None}
        return req.model_copy(update=unset) if unset else req

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
        metrics.in_flight.inc()

    def release(self) -> None:
        self.in_flight -= 1
        metrics.in_flight.dec()
        # A request's last tokens are counted when it ends, however it ends: an aborted
        # stream's would otherwise wait for this server's next token, and another server's
        # scrape would miss them.
        metrics.token_tally.flush()

    @property
    def tokenizer(self) -> Tokenizer:
        if self.client is None or self.client.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send token ids", param="prompt")
        return self.client.tokenizer

    async def off_loop(self, size: int, fn: Callable[..., Result], *args) -> Result:
        """fn(*args): in a worker thread when `size` (characters or tokens of its input) is
        past OFF_LOOP_SIZE, so that a long input does not hold the event loop."""
        if size <= OFF_LOOP_SIZE:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)


def build_app(state: ServerState) -> FastAPI:
    """The routes: OpenAI's completions, chat completions and models; tokenize, detokenize,
    health, metrics and version."""
    # No redirect of /tokenize/ to /tokenize: a 404 naming the URL, as OpenAI answers
    app = FastAPI(title="minivllm", docs_url=None, redoc_url=None, redirect_slashes=False)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
        """Starlette's own errors (no such route: 404, a wrong method: 405) in OpenAI's
        shape."""
        where = f"{request.method} {request.url.path}"
        message = {404: f"Invalid URL ({where})",
                   405: f"Method not allowed ({where})"}.get(exc.status_code, str(exc.detail))
        return await on_api_error(request, APIError(exc.status_code, message,
                                                    headers=exc.headers))

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception) -> JSONResponse:
        """A bug of ours: a 500 in OpenAI's shape; the traceback goes to the log only."""
        return error_response(internal_error())

    def endpoint(handler: Handler) -> Callable[[Request], Awaitable[Reply]]:
        async def route(request: Request) -> Reply:
            return await handler(state, request)
        return route
    for path, handler in GENERATE_ROUTES.items():  # (asgi_app serves their POSTs itself)
        app.post(path, response_model=None)(endpoint(handler))

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
        if state.ready:  # one engine of several may be restarting: the others serve
            return {"status": "ok", "engines": state.client.engines()}
        status = "draining" if state.draining else (
            "starting" if not state.started else "engine_" + state.client.state)
        return JSONResponse({"status": status}, status_code=503)

    @app.get("/metrics")
    async def metrics_endpoint():
        stats: list = []
        if state.client is not None:
            metrics.restarts.set(state.client.restarts)
            stats = await state.client.call_all("stats", timeout=2.0)
        body, content_type = metrics.render(stats, state.model_name)
        return Response(body, media_type=content_type)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        req = await state.parse(request, TokenizeRequest)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give either 'prompt' or 'messages'", param="prompt")
        text = req.prompt if req.messages is None else await _chat_prompt(
            state, req.messages, req.add_generation_prompt)
        ids = await state.off_loop(len(text), state.tokenizer.encode, text,
                                   req.add_special_tokens)
        body = await state.off_loop(len(ids), tokenize_body, ids, state.client.max_model_len)
        return Response(body, media_type="application/json")

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req = await state.parse(request, DetokenizeRequest)
        text = await state.off_loop(len(req.tokens), _detokenize, state.tokenizer, req.tokens,
                                    state.client.vocab_size)
        return {"prompt": text}

    @app.get("/version")
    async def version():
        from importlib import metadata

        return {"version": metadata.version("minivllm")}

    if state.config.dashboard:
        add_dashboard(app, state)
    return app


async def completions(state: ServerState, request: Request) -> Reply:
    req = await state.parse(request, CompletionRequest)
    req.check_supported()
    params = req.sampling_params(req.completion_limit()[0], req.logprobs)
    return await serve(state, request, req, params, req.prompts(), chat=False)


async def chat_completions(state: ServerState, request: Request) -> Reply:
    req = await state.parse(request, ChatCompletionRequest)
    req.check_supported()
    params = req.sampling_params(req.completion_limit()[0], req.num_logprobs())
    template = state.config.chat_template
    tools, tool_mode, params = tool_calls.plan(
        req, params, state.tokenizer,
        f"the chat template {template}" if template else "the model's chat template",
        state.config.tool_call_parser)
    prompt = await _chat_prompt(state, req.messages, req.add_generation_prompt, tools)
    return await serve(state, request, req, params, [prompt], chat=True, tools=tool_mode)


# The routes that generate, by path. asgi_app serves their POSTs itself, not through FastAPI:
# its middlewares (errors, exceptions, telemetry, body limit, exit stacks), routing and
# endpoint machinery took ~0.1 ms of CPU per request, a sixth of a streamed request's (and
# their exit stacks left each request's objects in reference cycles). Their other methods (a
# 405) go to FastAPI.
GENERATE_ROUTES: dict[str, Handler] = {"/v1/completions": completions,
                                       "/v1/chat/completions": chat_completions}


def asgi_app(state: ServerState) -> ASGIApp:
    """The API server's ASGI app: build_app's, with POSTs to GENERATE_ROUTES answered here
    as FastAPI would (the route's reply, an APIError in OpenAI's shape, any other exception a
    500 in that shape, then raised for the HTTP server to log)."""
    app = with_server_send(build_app(state))

    async def api_server_app(scope: Scope, receive: Receive, send: Send) -> None:
        handler = (GENERATE_ROUTES.get(scope["path"])
                   if scope["type"] == "http" and scope["method"] == "POST" else None)
        if handler is None:
            await app(scope, receive, send)
            return
        try:
            reply = await handler(state, Request(scope, receive))
            response = JSONResponse(reply) if isinstance(reply, dict) else reply
        except APIError as exc:
            response = error_response(exc)
        except Exception:
            await error_response(internal_error())(scope, receive, send)
            raise
        # the response's own send is the HTTP server's: a stream's chunks go straight to it
        await response(scope, receive, send)
    return api_server_app


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def internal_error() -> APIError:
    return APIError(500, "internal server error", type_="internal_error")


def _detokenize(tokenizer: Tokenizer, tokens: list[int], vocab_size: int) -> str:
    if tokens and not (min(tokens) >= 0 and max(tokens) < vocab_size):
        raise APIError(400, f"tokens must be integers in [0, {vocab_size})", param="tokens")
    return tokenizer.decode(tokens)


async def _chat_prompt(state: ServerState, messages: list[ChatMessage],
                       add_generation_prompt: bool, tools: Optional[list[dict]] = None) -> str:
    conversation = [m.template_dict() for m in messages]
    size = sum(len(m["content"] or "") for m in conversation)
    try:
        return await state.off_loop(size, state.tokenizer.apply_chat_template, conversation,
                                    add_generation_prompt, tools)
    except ValueError as exc:
        raise APIError(400, str(exc), param="messages") from None
