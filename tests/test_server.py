"""`minivllm serve` as users run it (a subprocess on 127.0.0.1), driven by the official openai
client, curl, httpx and a ZeroMQ peer: OpenAI shapes, streaming, every error row, overload,
disconnects, metrics across two API servers, a long input on one API server, the ZeroMQ
endpoint's refusals, engine crash, and SIGTERM under load."""
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time

import httpx
import openai
import pytest
import zmq

from bench.server_proc import ServeProcess, leftovers, metrics, wait_engine_idle, wait_healthy
from minivllm.sampling_params import SamplingParams
from minivllm.transport import protocol
from wire_spec import LAYOUT

KEY = "test-key"
MODEL = "SmolLM2-135M-Instruct"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
NOTHING_LEFT = {"processes": [], "shm": [], "sockets": []}
SCORED = "The capital of France is Paris, and the capital of Spain is Madrid."


def serve(*args: str) -> ServeProcess:
    """`minivllm serve --port 0` on the embedded model (fp32, 1024 KV blocks) with `args`; its
    log level is SERVER_LOG_LEVEL's, WARNING by default."""
    return ServeProcess(["--dtype", "float32", "--num-blocks", "1024", *args],
                        env={"MINIVLLM_LOG_LEVEL": os.environ.get("SERVER_LOG_LEVEL", "WARNING")})


@pytest.fixture(scope="module")
def server():
    srv = serve("--api-servers", "2", "--api-key", KEY, "--max-pending", "8")
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def offline():
    from minivllm import LLM, SamplingParams

    llm = LLM(dtype="float32", num_blocks=1024)
    params = SamplingParams(temperature=0, max_tokens=16)
    scored = llm.generate(SCORED, SamplingParams(max_tokens=1, prompt_logprobs=1),
                          use_tqdm=False)[0]
    return {"chat": llm.chat(CHAT, params, use_tqdm=False)[0].outputs[0].text,
            "completion": llm.generate("The capital of France is", params,
                                       use_tqdm=False)[0].outputs[0].text,
            "scored": (scored.prompt_token_ids, scored.prompt_logprobs)}


def post(server, path, body=None, key=KEY, **kwargs):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if body is not None and not isinstance(body, (bytes, str)):
        body = json.dumps(body)
    return httpx.post(server.url + path, content=body, headers=headers, timeout=60, **kwargs)


# ---- the openai client ----------------------------------------------------------------------
def test_openai_client_chat_and_completions_equal_offline_greedy(oai, offline):
    chat = oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, temperature=0)
    assert chat.choices[0].message.content == offline["chat"]
    assert chat.usage.completion_tokens > 0 and chat.usage.total_tokens == \
        chat.usage.prompt_tokens + chat.usage.completion_tokens
    comp = oai.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=16,
                                  temperature=0)
    assert comp.choices[0].text == offline["completion"]
    assert comp.usage.prompt_tokens == 5

    stream = oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16,
                                         temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == offline["chat"] and chunks[-1].usage.completion_tokens > 0
    stream = oai.completions.create(model=MODEL, prompt="The capital of France is",
                                    max_tokens=16, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == offline["completion"]


def test_n_logprobs_stop_and_seed(oai):
    out = oai.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, n=3,
                                 temperature=1.0, seed=5, logprobs=2)
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    for c in out.choices:
        assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) > 0
        assert all(len(top) <= 2 for top in c.logprobs.top_logprobs)
    again = oai.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, n=3,
                                   temperature=1.0, seed=5, logprobs=2)
    assert [c.text for c in again.choices] == [c.text for c in out.choices]
    chat = oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16,
                                       temperature=0, logprobs=True, top_logprobs=3,
                                       stop=["Paris"])
    choice = chat.choices[0]
    assert "Paris" not in choice.message.content and choice.finish_reason == "stop"
    assert all(len(t.top_logprobs) == 3 for t in choice.logprobs.content)
    extra = oai.completions.create(model=MODEL, prompt="Hi", max_tokens=5, temperature=0.5,
                                   extra_body={"top_k": 5, "min_p": 0.1, "ignore_eos": True,
                                               "repetition_penalty": 1.2})
    assert len(extra.choices[0].text) > 0 and extra.usage.completion_tokens == 5


def test_logit_bias_allowed_ids_and_bad_words_served(server, oai):
    def ids(text):
        return post(server, "/tokenize", {"prompt": text}).json()["tokens"]
    paris, = ids(" Paris")
    lyon, = ids(" Lyon")
    prompt = "The capital of France is"
    free = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0)
    assert free.choices[0].text.startswith(" Paris")
    moved = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0,
                                   logit_bias={str(paris): -100})
    assert not moved.choices[0].text.startswith(" Paris")
    forced = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0,
                                    logit_bias={str(lyon): 100})
    assert forced.choices[0].text == " Lyon Lyon Lyon"
    chat = oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, temperature=0,
                                       logit_bias={str(lyon): 100})
    assert chat.choices[0].message.content.split() == ["Lyon", "Lyon"]
    allowed = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=1.0,
                                     extra_body={"allowed_token_ids": [lyon]})
    assert allowed.choices[0].text == " Lyon Lyon"
    banned = oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16,
                                         temperature=0, extra_body={"bad_words": ["Paris"]})
    assert "Paris" not in banned.choices[0].message.content
    for bias, words in (({"abc": 1}, "token ids"), ({str(lyon): 200}, "[-100, 100]"),
                        ({"1000000": 1}, "outside the vocabulary")):
        r = post(server, "/v1/completions", {"model": MODEL, "prompt": prompt,
                                             "logit_bias": bias})
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.text


def test_echo_scores_the_prompt_as_offline(server, oai, offline):
    """lm-evaluation-harness's loglikelihood request: echo, logprobs, max_tokens 0."""
    ids, want = offline["scored"]
    out = oai.completions.create(model=MODEL, prompt=SCORED, max_tokens=0, echo=True,
                                 logprobs=1, temperature=0).choices[0]
    assert out.text == SCORED and out.logprobs.token_logprobs[0] is None
    assert len(out.logprobs.tokens) == len(ids) and "".join(out.logprobs.tokens) == SCORED
    for got, row, token in zip(out.logprobs.token_logprobs[1:], want[1:], ids[1:]):
        assert abs(got - row[token]) < 1e-4
    both = oai.completions.create(model=MODEL, prompt=ids, max_tokens=3, echo=True,
                                  logprobs=2, temperature=0).choices[0]
    assert both.text.startswith(SCORED) and len(both.logprobs.tokens) == len(ids) + 3
    assert both.logprobs.token_logprobs[1:len(ids)] == \
        pytest.approx(out.logprobs.token_logprobs[1:], abs=1e-4)
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "hi",
                                                      "echo": True, "stream": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "echo"


def test_models_tokenize_detokenize_version(server):
    models = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert models.json()["data"][0]["id"] == MODEL
    tok = post(server, "/tokenize", {"prompt": "Hello world"}).json()
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 8192
    assert post(server, "/detokenize", {"tokens": tok["tokens"]}).json()["prompt"] == \
        "Hello world"
    assert httpx.get(server.url + "/version").json()["version"]


# ---- curl streams as tokens are made ---------------------------------------------------------
def test_curl_streams_sse_chunks_as_they_are_produced(server):
    if shutil.which("curl") is None:
        pytest.skip(reason="needs curl")
    body = json.dumps({"model": MODEL, "prompt": "Count: 1, 2, 3,", "max_tokens": 48,
                       "temperature": 0, "ignore_eos": True, "stream": True})
    proc = subprocess.Popen(["curl", "-sN", server.url + "/v1/completions",
                             "-H", "Content-Type: application/json",
                             "-H", f"Authorization: Bearer {KEY}", "-d", body],
                            stdout=subprocess.PIPE, text=True)
    arrivals = []
    for line in proc.stdout:
        if line.startswith("data: "):
            arrivals.append((time.monotonic(), line[6:].strip()))
    proc.wait(30)
    assert arrivals[-1][1] == "[DONE]"
    chunks = [json.loads(p) for _, p in arrivals[:-1]]
    assert sum(1 for c in chunks if c["choices"][0]["text"]) >= 40
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    # One by one: the first token arrived well before the last, not in one burst at the end.
    times = [t for t, _ in arrivals[:-1]]
    assert times[-1] - times[0] > 0.2
    assert len({round(t, 3) for t in times}) > len(times) // 2


def test_streamed_chunks_are_json_dumps_of_their_dicts():
    """A running chunk's event is framed from a template: its bytes are those of the chunk's
    dict dumped, for any text (escapes, non-ASCII, lone surrogates) and a strange model name;
    and it is one line even for str.splitlines (httpx's aiter_lines), which also breaks at
    U+0085, U+2028 and U+2029 (a sampled U+0085 once cut a chaos run's event in two)."""
    from minivllm.outputs import CompletionOutput, RequestOutput
    from minivllm.server.responses import ChatResponse, CompletionResponse, event

    texts = ["", "a", 'q"\\\n\t\r\b\f\x00\x1f\x7f', "é中文🙂", "\ud800 lone", "\u2028</script>",
             "\x85\x1c\x1d\x1e\x0b\x0c\u2029"]
    for response in (CompletionResponse('m"\u00e9', None, SamplingParams(n=2)),
                     ChatResponse("m", None, SamplingParams(n=2))):
        for text in texts:
            c = CompletionOutput(1, "x", [1], delta_text=text, delta_token_ids=[5])
            expected = event(response._envelope(response.chunk_name,
                                                [response.delta_choice(7, c)]))
            sent = response.stream_events(3, RequestOutput("r", None, [1], [c]))
            assert sent == expected
            line, blank = sent.splitlines()
            choice = json.loads(line.removeprefix("data: "))["choices"][0]
            got = choice["text"] if "text" in choice else choice["delta"]["content"]
            assert blank == "" and got == text


# ---- every error row ------------------------------------------------------------------------
@pytest.mark.parametrize("body, status, fragment", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": "8"}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ({"model": MODEL, "prompt": "hi", "n": 1.5}, 400, "'n'"),
    ({"model": MODEL, "prompt": 7}, 400, "prompt"),
    ({"model": MODEL}, 400, "'prompt' is a required property"),
    ({"model": MODEL, "prompt": "hi", "temperature": -1}, 400, "temperature must be >= 0"),
    ({"model": MODEL, "prompt": "hi", "top_p": 1.5}, 400, "top_p must be in (0, 1]"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": -1}, 400, "or null, got -1"),  # JSON's word
    ({"model": MODEL, "prompt": "hi", "logprobs": 9}, 400, "logprobs"),
    ({"model": MODEL, "prompt": "hi", "frobnicate": True}, 400,
     "Unrecognized request argument supplied: frobnicate"),
    ({"model": "gpt-4", "prompt": "hi"}, 404, "The model `gpt-4` does not exist"),
    ({"model": MODEL, "prompt": "hi " * 9000}, 400, "maximum context length is 8192 tokens"),
])
def test_completion_errors_in_openai_shape(server, body, status, fragment):
    resp = post(server, "/v1/completions", body)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert fragment in err["message"] and err["code"] == status and "type" in err


def test_the_api_servers_generate_routes_answer_as_fastapi_does():
    """asgi_app serves the generating routes' POSTs itself, past FastAPI: every answer that
    needs no engine (bad bodies, a missing key, the engine down, a bug: a 500) is FastAPI's, to
    the byte, and the routes' other methods still go to FastAPI (405)."""
    from types import SimpleNamespace

    from minivllm.config import ServerConfig
    from minivllm.server.app import ServerState, asgi_app, build_app

    async def answers(app, state) -> list[tuple]:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        out = []
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            for path in ("/v1/completions", "/v1/chat/completions"):
                for body, key in ((b"{not json", KEY), (b"[1]", KEY), (b'{"frob": 1}', KEY),
                                  (b'{"prompt": "hi", "max_tokens": "8"}', KEY),
                                  (b'{"messages": [{"role": "robot"}]}', KEY),
                                  (b'{"prompt": "hi", "messages": []}', None)):
                    resp = await http.post(path, content=body, headers={
                        "Authorization": f"Bearer {key}"} if key else {})
                    out.append((resp.status_code, sorted(resp.headers.items()), resp.content))
                resp = await http.get(path)
                out.append((resp.status_code, sorted(resp.headers.items()), resp.content))
            state.client = SimpleNamespace(state="dead", sampling_defaults={})  # 503
            resp = await http.post("/v1/completions", content=b'{"prompt": [1]}',
                                   headers={"Authorization": f"Bearer {KEY}"})
            out.append((resp.status_code, sorted(resp.headers.items()), resp.content))
            state.client = SimpleNamespace(sampling_defaults={})  # no state: a bug, a 500
            resp = await http.post("/v1/completions", content=b'{"prompt": [1]}',
                                   headers={"Authorization": f"Bearer {KEY}"})
            out.append((resp.status_code, sorted(resp.headers.items()), resp.content))
            state.client = None
        return out

    def state() -> ServerState:
        return ServerState(ServerConfig(api_key=KEY, dashboard=False))
    ours, fastapis = (asyncio.run(answers(make(s), s)) for make, s in (
        (asgi_app, state()), (build_app, state())))
    assert ours == fastapis
    assert [a[0] for a in ours] == [400, 400, 400, 400, 400, 401, 405] * 2 + [503, 500]


def test_chat_errors_name_the_field(server):
    cases = [({"model": MODEL, "messages": []}, "messages must not be empty"),
             ({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, "role"),
             ({"model": MODEL, "messages": CHAT, "top_logprobs": 2}, "needs logprobs"),
             ({"model": MODEL, "messages": CHAT, "max_completion_tokens": -3}, "max_tokens"),
             ({"model": MODEL, "messages": CHAT, "tools": [{"type": "function"}]}, "tools")]
    for body, fragment in cases:
        resp = post(server, "/v1/chat/completions", body)
        assert resp.status_code == 400 and fragment in resp.json()["error"]["message"], resp.text


def test_body_too_large_and_missing_key(server):
    resp = post(server, "/v1/completions", b'{"prompt": "' + b"a" * (9 << 20) + b'"}')
    assert resp.status_code == 413 and "limit" in resp.json()["error"]["message"]
    resp = post(server, "/v1/completions", {"model": MODEL, "prompt": "hi"}, key=None)
    assert resp.status_code == 401 and resp.json()["error"]["type"] == "authentication_error"
    for wrong in ("wrong", KEY[:-1] + "X", KEY + "X"):  # the same length too
        resp = post(server, "/v1/completions", {"model": MODEL, "prompt": "hi"}, key=wrong)
        assert resp.status_code == 401
    resp = httpx.post(server.url + "/v1/completions", json={"prompt": "hi"},
                      headers={"Authorization": "Bearer \u00e9".encode()})
    assert resp.status_code == 401  # a non-ASCII header is a wrong key, not a 500
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert post(server, "/tokenize", {"prompt": "hi"}, key=None).status_code == 401
    for path in ("/health", "/metrics", "/version"):  # probes and scrapers need no key
        assert httpx.get(server.url + path).status_code == 200, path


def test_max_tokens_past_the_context_is_a_400_with_both_numbers(server):
    """Repro of a bug: max_tokens (or prompt + max_tokens) past the context was accepted (a
    request for 8192 new tokens after a 1-token prompt ran to the end of the context)."""
    cases = [
        ("/v1/completions", {"prompt": "hi", "max_tokens": 8192}, "max_tokens",
         "you requested 8193 tokens (1 in the prompt, 8192 in the completion)"),
        ("/v1/completions", {"prompt": [5] * 8000, "max_tokens": 193}, "max_tokens",
         "you requested 8193 tokens (8000 in the prompt, 193 in the completion)"),
        ("/v1/completions", {"prompt": [[1], [5] * 8192], "max_tokens": 1}, "prompt",
         "you requested 8193 tokens (8192 in the prompt, 1 in the completion)"),
        ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 10**6},
         "max_completion_tokens", "in the messages, 1000000 in the completion)"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * 9000}]},
         "messages", "tokens in the messages, which leaves none for the completion"),
    ]
    for path, body, param, fragment in cases:
        resp = post(server, path, {"model": MODEL, **body})
        assert resp.status_code == 400, resp.text[:300]
        err = resp.json()["error"]
        assert err["message"].startswith("This model's maximum context length is 8192 tokens.")
        assert fragment in err["message"] and err["param"] == param, err


def test_errors_name_the_field_at_any_depth(server):
    """Repro of a bug: a wrong type in `stream` (or any field whose name starts with 'str' or
    'int') was reported as the field ''."""
    cases = [
        ({"prompt": "hi", "stream": "yes"}, "stream",
         "'stream': Input should be a valid boolean"),
        ({"prompt": "hi", "stream": True, "stream_options": {"include_usage": "yes"}},
         "stream_options", "'stream_options.include_usage': Input should be a valid boolean"),
        ({"messages": [{"content": "hi"}]}, "messages",
         "'messages.0.role' is a required property"),
        ({"messages": [{"role": "user", "content": "hi", "mood": "x"}]}, "messages",
         "Unrecognized request argument supplied: messages.0.mood"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages", "'messages.0.content': "),
    ]
    for body, param, message in cases:
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        err = post(server, path, body).json()["error"]
        assert err["message"].startswith(message), err
        assert err["param"] == param and err["code"] == 400, err


def test_tokenize_takes_vllms_add_special_tokens(server):
    """Repro of a bug: /tokenize refused add_special_tokens, which vLLM's bench tools send."""
    plain = post(server, "/tokenize", {"prompt": "Hello world"}).json()
    for flag in (True, False):
        resp = post(server, "/tokenize", {"prompt": "Hello world", "add_special_tokens": flag})
        assert resp.status_code == 200 and resp.json() == plain  # SmolLM2 adds no BOS
    resp = post(server, "/tokenize", {"messages": CHAT, "add_special_tokens": False})
    assert resp.status_code == 200 and resp.json()["count"] > plain["count"]
    err = post(server, "/tokenize", {"prompt": "x", "add_special_tokens": "yes"}).json()["error"]
    assert err["param"] == "add_special_tokens"


def test_unknown_routes_and_methods_answer_in_openai_shape(server):
    """Repro of a bug: 404 and 405 came as Starlette's {"detail": ...}."""
    resp = httpx.get(server.url + "/v1/nothing-here")
    assert resp.status_code == 404
    assert resp.json() == {"error": {"message": "Invalid URL (GET /v1/nothing-here)",
                                     "type": "invalid_request_error", "param": None,
                                     "code": 404}}
    resp = httpx.get(server.url + "/v1/completions")
    assert resp.status_code == 405 and resp.headers["allow"] == "POST"
    assert resp.json()["error"]["message"] == "Method not allowed (GET /v1/completions)"
    resp = post(server, "/tokenize/", {"prompt": "hi"})  # was a 307 with an empty body
    assert resp.status_code == 404 and resp.json()["error"]["code"] == 404


@pytest.mark.parametrize("path, field, extra", [
    ("/v1/completions", "max_tokens", {}), ("/v1/completions", "n", {}),
    ("/v1/completions", "top_k", {}), ("/v1/completions", "seed", {}),
    ("/v1/completions", "logprobs", {}), ("/v1/completions", "best_of", {}),
    ("/v1/completions", "min_tokens", {"max_tokens": None}),
    ("/v1/chat/completions", "max_completion_tokens", {}),
    ("/v1/chat/completions", "top_logprobs", {"logprobs": True})])
def test_every_integer_field_past_its_range_is_a_400_naming_it(server, path, field, extra):
    """The committed `malformed` chaos run recorded 13 x 500: integers past int32 (2**70 in
    max_tokens) reached the submit record's int32 fields, and the codec's OverflowError was a
    bare 500 (fixed since; the malformed scenario, rerun, records none). Every integer field,
    both ways."""
    base = {"prompt": "hi"} if path == "/v1/completions" else {"messages": CHAT}
    for value in (2**70, -2**70):
        resp = post(server, path, {**base, "max_tokens": 4, **extra, field: value})
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["param"] == field, resp.text


def test_overload_gets_429_with_retry_after_and_admitted_requests_complete(server):
    async def one(client):
        body = {"model": MODEL, "prompt": "Tell me a story.", "max_tokens": 64,
                "temperature": 0, "ignore_eos": True}
        return await client.post("/v1/completions", json=body,
                                 headers={"Authorization": f"Bearer {KEY}"})

    async def go():
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=server.url, timeout=600, limits=limits) as c:
            return await asyncio.gather(*(one(c) for _ in range(40)))
    responses = asyncio.run(go())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429} and codes.count(429) > 0 and codes.count(200) <= 16
    for r in responses:
        if r.status_code == 429:
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
        else:
            assert r.json()["usage"]["completion_tokens"] == 64


# ---- disconnects and metrics ----------------------------------------------------------------
def test_disconnect_mid_stream_aborts_and_frees_blocks(server):
    before = metrics(server.url)
    body = {"model": MODEL, "prompt": "Write a long essay.", "max_tokens": 2000,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as resp:
        for i, _ in enumerate(resp.iter_lines()):
            if i > 5:
                break
    after = wait_engine_idle(server.url)
    key = "minivllm:requests_aborted_total{reason=disconnect}"
    assert after.get(key, 0) == before.get(key, 0) + 1


def test_metrics_parse_and_count_the_requests_sent(server, oai):
    before = wait_engine_idle(server.url)
    usages = []
    for i in range(6):  # spread over both API servers by the kernel
        out = oai.completions.create(model=MODEL, prompt=f"Number {i}:", max_tokens=4 + i,
                                     temperature=0, extra_body={"ignore_eos": True})
        usages.append(out.usage)
    after = metrics(server.url)
    length = "minivllm:request_success_total{finished_reason=length}"
    assert after[length] - before.get(length, 0) == 6
    assert after["minivllm:generation_tokens_total"] - before["minivllm:generation_tokens_total"] \
        == sum(u.completion_tokens for u in usages)
    assert after["minivllm:prompt_tokens_total"] - before["minivllm:prompt_tokens_total"] == \
        sum(u.prompt_tokens for u in usages)
    assert after["minivllm:time_to_first_token_seconds_count"] - \
        before["minivllm:time_to_first_token_seconds_count"] == 6
    assert after["minivllm:api_requests_in_flight"] == 0  # every admission slot given back
    for name in ("minivllm:e2e_request_latency_seconds_count",
                 "minivllm:inter_token_latency_seconds_count", "minivllm:num_requests_waiting",
                 "minivllm:prefix_cache_hit_rate", "minivllm:num_preemptions_total"):
        assert name in after


# The queries of vLLM's Grafana dashboard (examples/online_serving/prometheus_grafana/grafana.json);
# {M} stands for its {model_name="$model_name"}.
GRAFANA_VLLM = """
histogram_quantile(0.99, sum by(le) (rate(vllm:e2e_request_latency_seconds_bucket{M}[1m])))
rate(vllm:e2e_request_latency_seconds_sum{M}[1m]) / rate(vllm:e2e_request_latency_seconds_count{M}[1m])
rate(vllm:prompt_tokens_total{M}[1m])
rate(vllm:generation_tokens_total{M}[1m])
histogram_quantile(0.99, sum by(le) (rate(vllm:time_per_output_token_seconds_bucket{M}[1m])))
rate(vllm:time_per_output_token_seconds_sum{M}[1m]) / rate(vllm:time_per_output_token_seconds_count{M}[1m])
vllm:num_requests_running{M}
vllm:num_requests_waiting{M}
histogram_quantile(0.99, sum by(le) (rate(vllm:time_to_first_token_seconds_bucket{M}[1m])))
rate(vllm:time_to_first_token_seconds_sum{M}[1m]) / rate(vllm:time_to_first_token_seconds_count{M}[1m])
vllm:gpu_cache_usage_perc{M}
sum by(le) (increase(vllm:request_prompt_tokens_bucket{M}[1m]))
sum by(le) (increase(vllm:request_generation_tokens_bucket{M}[1m]))
sum by(finished_reason) (increase(vllm:request_success_total{M}[1m]))
rate(vllm:request_queue_time_seconds_sum{M}[1m])
rate(vllm:request_prefill_time_seconds_sum{M}[1m])
rate(vllm:request_decode_time_seconds_sum{M}[1m])
rate(vllm:request_max_num_generation_tokens_sum{M}[1m])
"""


def test_vllm_grafana_queries_resolve_against_metrics(server, oai):
    from prometheus_client.parser import text_string_to_metric_families

    oai.completions.create(model=MODEL, prompt="Metrics", max_tokens=3, temperature=0,
                           extra_body={"ignore_eos": True})
    samples = {}  # (name, labels without model_name) -> value, for samples labelled MODEL
    text = httpx.get(server.url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = dict(s.labels)
            if labels.pop("model_name", MODEL) == MODEL:
                samples[s.name, tuple(sorted(labels.items()))] = s.value
    names = {name for name, _ in samples}
    wanted = set(re.findall(r"vllm:[a-z0-9_]+", GRAFANA_VLLM))
    assert len(wanted) == 21 and wanted <= names, sorted(wanted - names)
    # the same figures as minivllm's own names, in the same units
    for key, value in samples.items():
        vllm_name = key[0].removeprefix("vllm:")
        if key[0].startswith("vllm:") and ("minivllm:" + vllm_name, key[1]) in samples:
            assert samples["minivllm:" + vllm_name, key[1]] == value, key
    engine = (("engine", "0"),)  # the engine's figures carry its data-parallel rank, as vLLM's
    assert samples["vllm:gpu_cache_usage_perc", engine] == \
        samples["minivllm:kv_cache_usage_perc", engine]
    assert samples["vllm:time_per_output_token_seconds_count", ()] == \
        samples["minivllm:inter_token_latency_seconds_count", ()]
    assert samples["vllm:request_queue_time_seconds_count", engine] >= 1
    assert samples["vllm:request_prefill_time_seconds_count", engine] >= 1
    assert samples["vllm:request_max_num_generation_tokens_count", ()] >= 1


def test_api_servers_run_no_torch(server):
    engine_pid = server.engine_pid()
    api_pids = server.api_server_pids()
    assert len(api_pids) == 2
    for pid in api_pids:
        with open(f"/proc/{pid}/maps") as f:
            maps = f.read()
        assert "libtorch" not in maps and "/torch/" not in maps
    with open(f"/proc/{engine_pid}/maps") as f:
        assert "libtorch" in f.read()  # the check can see torch where it is


# ---- one API server, whose event loop all its requests share ---------------------------------
SINGLE_MAX_BODY = 9 << 20  # past the default 8 MiB: an 8.5 MiB body gets in by the flag only


@pytest.fixture(scope="module")
def single():
    """One API server with --max-body-bytes 9 MiB, the ZeroMQ endpoint (`.zmq`) and
    --stream-interval-ms 1000."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    srv = serve("--max-body-bytes", str(SINGLE_MAX_BODY), "--zmq-endpoint", endpoint,
                "--stream-interval-ms", "1000")
    srv.zmq = endpoint
    yield srv
    assert srv.stop() == 0


def test_a_long_tokenization_does_not_hold_up_the_server(single):
    """Repro of a bug: /tokenize encoded on the event loop, so one 8 MB body held /health of
    the same server for 16.8 s. Behaviour, not speed: /health answers all through the
    tokenization (no gap between two answers spans half of it). The 8.5 MiB body is past the
    default limit: --max-body-bytes lets it in."""
    repeats = (17 << 19) // len("hello world ")
    box = {}

    def tokenize():
        box["response"] = httpx.post(single.url + "/tokenize", timeout=600,
                                     json={"prompt": "hello world " * repeats})
        box["end"] = time.monotonic()
    answered = [time.monotonic()]
    worker = threading.Thread(target=tokenize)
    worker.start()
    with httpx.Client(base_url=single.url, timeout=600) as client:
        while worker.is_alive():
            assert client.get("/health").status_code == 200
            answered.append(time.monotonic())
    worker.join()
    body = box["response"].json()
    assert body["count"] == len(body["tokens"]) > repeats
    during = [t for t in answered if t < box["end"]] + [box["end"]]
    longest_gap = max(b - a for a, b in zip(during, during[1:]))
    assert longest_gap < (box["end"] - answered[0]) / 2, (longest_gap, len(during))


def test_the_body_limit_is_a_flag(single):
    resp = httpx.post(single.url + "/tokenize", content=b"x" * (SINGLE_MAX_BODY + 1),
                      timeout=60)
    assert resp.status_code == 413
    assert resp.json()["error"]["message"].endswith(f"the limit is {SINGLE_MAX_BODY}")


def test_a_stream_interval_sends_the_same_text_in_fewer_chunks(single):
    """--stream-interval-ms 1000: the steps of each pause go out as one chunk (fewer chunks
    than tokens unless every step took a second), and the chunks make the unstreamed text."""
    body = {"model": MODEL, "prompt": "Count: 1, 2, 3,", "max_tokens": 24, "temperature": 0,
            "ignore_eos": True}
    whole = httpx.post(single.url + "/v1/completions", json=body, timeout=120).json()
    chunks = []
    with httpx.stream("POST", single.url + "/v1/completions", json=dict(body, stream=True),
                      timeout=120) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:])["choices"][0])
    assert "".join(c["text"] for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["finish_reason"] == "length"
    assert len(chunks) < 24


def _submit(request_id: int, **wire) -> bytes:
    """A submit record (prompt [1, 2, 3], 2 tokens) with these raw values in its sampling
    fields."""
    frame = bytearray(protocol.encode_submit(request_id, [1, 2, 3], SamplingParams(max_tokens=2)))
    base = next(offset for field, offset, _ in LAYOUT["mv_submit"][1] if field == "sampling")
    for field, offset, kind in LAYOUT["mv_sampling"][1]:
        if field in wire:
            struct.pack_into("<" + kind, frame, base + offset, wire[field])
    return bytes(frame)


def test_zmq_endpoint_refuses_out_of_range_values_in_the_protocols_terms(single):
    """Repro of a bug: logprobs -2 was taken for -1 (none), where PROTOCOL.md allows -1 or
    0-20; refusals spoke Python ("or None", a record's repr)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 60_000)
    sock.connect(single.zmq)
    try:
        refusals = {7: _submit(7, logprobs=-2), 8: _submit(8, max_tokens=-5)}
        for frame in refusals.values():
            sock.send(frame)
        answers = {}
        for _ in refusals:
            rec = protocol.decode(sock.recv())
            assert isinstance(rec, protocol.ErrorRecord), rec
            answers[rec.request_id] = (rec.code, rec.message)
        assert answers == {
            7: (protocol.ERR_INVALID_REQUEST, "logprobs must be -1 (none) or in [0, 20], got -2"),
            8: (protocol.ERR_INVALID_REQUEST,
                "max_tokens must be >= 0 (0: up to the context length), got -5")}
        sock.send(protocol.encode_step_output(1, [7], [5], [0]))
        rec = protocol.decode(sock.recv())
        assert (rec.code, rec.message) == (protocol.ERR_MALFORMED, "the engine takes submit "
                                           "(kind 1), abort (kind 2) and status query (kind 5) "
                                           "records, not kind 3")
        sock.send(_submit(9, logprobs=-1))
        finish = protocol.FINISH_NONE
        while finish == protocol.FINISH_NONE:
            rec = protocol.decode(sock.recv())
            assert isinstance(rec, protocol.StepOutput) and rec.request_ids.tolist() == [9]
            finish = int(rec.finish_reasons[-1])
        assert finish == protocol.FINISH_LENGTH
    finally:
        sock.close()
        ctx.term()


# ---- faults: engine crash, then SIGTERM under load -------------------------------------------
def test_engine_crash_then_sigterm_under_load():
    srv = serve("--drain-timeout", "300")  # generous: CI machines may be slow
    try:
        engine_pid = srv.engine_pid()
        body = {"model": MODEL, "prompt": "Write a long essay.", "max_tokens": 4000,
                "ignore_eos": True, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as resp:
            lines = resp.iter_lines()
            next(lines)
            os.kill(engine_pid, signal.SIGKILL)
            rest = [line for line in lines if line.startswith("data: ")]
        assert '"error"' in rest[-2] and rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["error"]["code"] == 503
        health = httpx.get(srv.url + "/health")
        assert health.status_code == 503
        refused = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi"}, timeout=30)
        assert refused.status_code == 503
        wait_healthy(srv.url, engine_pid=engine_pid)
        ok = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4},
                        timeout=60)
        assert ok.status_code == 200
        assert metrics(srv.url)["minivllm:engine_restarts"] == 1
        pids = srv.process_tree()

        base = metrics(srv.url).get("minivllm:generation_tokens_total", 0)

        async def load():
            async with httpx.AsyncClient(base_url=srv.url, timeout=300) as c:
                req = {"prompt": "Count to a hundred:", "max_tokens": 96, "ignore_eos": True}
                tasks = [asyncio.ensure_future(c.post("/v1/completions", json=req))
                         for _ in range(6)]
                while metrics(srv.url).get("minivllm:generation_tokens_total", 0) < base + 12:
                    await asyncio.sleep(0.05)  # all six are generating
                srv.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                late = await c.post("/v1/completions", json=req)
                return await asyncio.gather(*tasks), late
        done, late = asyncio.run(load())
        assert all(r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 96
                   for r in done), [(r.status_code, r.text[:300]) for r in done]
        assert late.status_code == 503
        assert srv.proc.wait(60) == 0
    finally:
        srv.stop()
    assert leftovers(pids) == NOTHING_LEFT


def test_ctrl_c_stops_everything_cleanly():
    srv = serve("--api-servers", "2")
    assert len(srv.api_server_pids()) == 2
    pids = srv.process_tree()
    ok = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4},
                    timeout=60)
    assert ok.status_code == 200
    os.killpg(srv.proc.pid, signal.SIGINT)  # what Ctrl-C does: SIGINT to the whole group
    assert srv.proc.wait(60) == 0
    assert leftovers(pids) == NOTHING_LEFT
