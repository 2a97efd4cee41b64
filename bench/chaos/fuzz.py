"""Fuzz the request parsers of a real `minivllm serve` (the `fuzz` scenario of bench/chaos/run.py).

    python -m bench.chaos.run fuzz --clients 3000 --json bench/results/fuzz_cpu.json

hypothesis draws `--clients` HTTP requests and as many ZeroMQ messages, sends each to the
server and checks its answer:

- HTTP: bodies for every endpoint built field by field (valid values, edge values, values of
  any JSON type, unknown and missing fields, unicode, long strings and lists), sometimes
  damaged as bytes (cut, bit-flipped, invalid UTF-8, lone surrogates, NaN, deep nesting), and
  requests with the wrong method or path. Every answer must be a 200 of the endpoint's shape
  (streams: chunks, then [DONE], no error event) or a 4xx in OpenAI's error shape whose
  message is not empty and leaks nothing (no traceback, no Python repr) and whose param is a
  field of that endpoint or of the body. Never a 5xx, never a cut connection.
- ZeroMQ: submit records with every field drawn from values of its size (edge integers, NaN,
  infinities), prompts past the context or the vocabulary, lying counts, unknown kinds, flags
  and versions, cut and padded frames, multi-frame messages, random bytes. Each message gets
  the answer PROTOCOL.md says, found by decoding it locally with the same codec: malformed ->
  an error record of code 1; values outside the documented range -> code 2 naming the
  request; a valid submit -> tokens until a finish (the fuzzer aborts it at once); an abort
  -> nothing; error messages speak the protocol's terms. A one-token request after each
  message marks where its answers end.

After both: the engine is the process it was, and the API servers hold no admitted request
(run.py then checks that the engine is idle and that the stop leaves nothing behind).
"""
from __future__ import annotations

import json
import math
import queue
import struct
import threading
import time
from collections import Counter
from typing import Optional

import httpx
import zmq
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from bench.server_proc import ServeProcess, metrics
from minivllm.inputs import check_prompt
from minivllm.loader import load_tokenizer, resolve_model
from minivllm.sampling_params import SamplingParams
from minivllm.server.protocol import (ChatCompletionRequest, CompletionRequest,
                                      DetokenizeRequest, TokenizeRequest)
from minivllm.transport import protocol
from tests.wire_spec import compiled_layout

MODEL = "SmolLM2-135M-Instruct"
SEED = 17
LEAKS = ("Traceback", 'File "', "object at 0x", "None", "array(", "Submit(", "StepOutput(",
         "ErrorRecord(")
FAILURES_KEPT = 20  # examples of each kind of failure kept in the report

# ---- HTTP ------------------------------------------------------------------------------------
EDGE_INTS = [-2**63, -2**31 - 1, -2**31, -2, -1, 0, 1, 2, 5, 20, 21, 128, 129, 8191, 8192, 8193,
             2**31 - 1, 2**31, 2**63, 2**64, 10**30]
EDGE_FLOATS = [0.0, -0.0, 1e-320, 0.5, 1.0, 1.5, 2.0, 2.5, -1.0, 1e308, -1e308]
edge_ints, edge_floats = st.sampled_from(EDGE_INTS), st.sampled_from(EDGE_FLOATS)
short_texts = st.text(max_size=40)
texts = short_texts | st.builds(lambda t, k: t * k, st.text(min_size=1, max_size=8),
                                st.sampled_from([100, 5000, 200_000]))
scalars = (st.none() | st.booleans() | edge_ints | st.integers() | edge_floats
           | st.floats(allow_nan=False, allow_infinity=False) | texts)
any_json = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4)
                        | st.dictionaries(st.text(max_size=10), kids, max_size=4), max_leaves=12)
vocab_ids = st.integers(0, 49151)
short_ids = st.lists(vocab_ids, min_size=1, max_size=40)
# Past the context (or the vocabulary) for sure: a valid request never prefills for long.
long_ids = st.builds(lambda t, n: [t] * n, vocab_ids | edge_ints, st.sampled_from([8192, 70000]))
bools = st.booleans()
messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant"]), "content": short_texts}),
    min_size=1, max_size=3)
odd_messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["tool", "developer"]) | texts, "content": st.none() | texts
     | st.lists(st.fixed_dictionaries({"type": st.just("text") | texts, "text": texts}),
                max_size=3)}, optional={"name": texts, "extra": any_json}), max_size=4)
# Limits are small or invalid for sure (never null: that means "up to the context").
LIMIT = (st.integers(1, 4), st.sampled_from([-1, 0, 8193, 2**31, 2**63]) | st.floats())

# field -> (valid values, edge or invalid values)
SAMPLING = {
    "model": (st.just(MODEL), texts), "n": (st.integers(1, 3), edge_ints),
    "stream": (bools, bools), "stream_options": (st.fixed_dictionaries(
        {}, optional={"include_usage": bools}), any_json),
    "stop": (short_texts | st.lists(short_texts, max_size=4), texts),
    "seed": (st.integers(0, 2**63), edge_ints),
    "temperature": (st.floats(0, 2), edge_floats), "top_p": (st.floats(0.01, 1), edge_floats),
    "presence_penalty": (st.floats(-2, 2), edge_floats),
    "frequency_penalty": (st.floats(-2, 2), edge_floats), "user": (short_texts, texts),
    "top_k": (st.integers(1, 50) | st.just(-1), edge_ints), "min_p": (st.floats(0, 1), edge_floats),
    "repetition_penalty": (st.floats(0.5, 2), edge_floats), "ignore_eos": (bools, bools),
    "min_tokens": (st.integers(0, 1), edge_ints),
    "stop_token_ids": (st.lists(vocab_ids, max_size=4), st.lists(edge_ints, max_size=4)),
    "skip_special_tokens": (bools, bools),
}
ENDPOINTS = {  # path -> (request model, fields, the required field)
    "/v1/completions": (CompletionRequest, {
        **SAMPLING, "prompt": (short_texts | st.lists(short_texts, min_size=1, max_size=4)
                               | short_ids | st.lists(short_ids, min_size=1, max_size=3),
                               texts | long_ids | st.lists(long_ids | texts, max_size=3)),
        "max_tokens": LIMIT, "logprobs": (st.integers(0, 5), edge_ints),
        "echo": (st.just(False), bools), "best_of": (st.none(), st.integers(1, 3)),
        "suffix": (st.none(), texts),
        "logit_bias": (st.none(), st.dictionaries(texts, st.floats(), max_size=2))}, "prompt"),
    "/v1/chat/completions": (ChatCompletionRequest, {
        **SAMPLING, "messages": (messages, odd_messages), "max_tokens": LIMIT,
        "max_completion_tokens": LIMIT, "logprobs": (bools, bools),
        "top_logprobs": (st.integers(0, 20), edge_ints), "tools": (st.none(), any_json),
        "tool_choice": (st.none(), any_json),
        "response_format": (st.just({"type": "text"}), st.fixed_dictionaries({"type": texts})),
        "add_generation_prompt": (bools, bools),
        "logit_bias": (st.none(), st.dictionaries(texts, st.floats(), max_size=2))}, "messages"),
    "/tokenize": (TokenizeRequest, {
        "model": (st.just(MODEL), texts), "prompt": (short_texts, texts),
        "messages": (messages, odd_messages), "add_generation_prompt": (bools, bools),
        "add_special_tokens": (bools, bools)}, "prompt"),
    "/detokenize": (DetokenizeRequest, {
        "model": (st.just(MODEL), texts),
        "tokens": (st.lists(vocab_ids, max_size=50), st.lists(edge_ints, max_size=50) | long_ids)},
        "tokens"),
}


@st.composite
def http_requests(draw) -> tuple[str, str, bytes]:
    """(method, path, body): half of them with valid values only, the others with edge values
    or anything JSON in their fields, unknown fields, damaged bytes, a wrong method or path."""
    path = draw(st.sampled_from(sorted(ENDPOINTS)))
    _, fields, required = ENDPOINTS[path]
    names = draw(st.sets(st.sampled_from(sorted(fields)), max_size=6)) | {required}
    if path == "/v1/chat/completions" and not names & {"max_tokens", "max_completion_tokens"}:
        names.add("max_tokens")  # chat's default limit is the context: keep valid ones short
    if draw(bools):
        doc = {name: draw(fields[name][0]) for name in sorted(names)}
        return "POST", path, json.dumps(doc).encode()
    if draw(st.integers(0, 9)) == 0:
        names.discard(required)
    doc = {name: draw(st.one_of(*fields[name], scalars, any_json)) for name in sorted(names)}
    if draw(st.integers(0, 9)) == 0:
        doc[draw(st.text(min_size=1, max_size=12))] = draw(any_json)
    body = json.dumps(doc, ensure_ascii=draw(bools)).encode()
    damage = draw(st.integers(0, 9))
    if damage == 0:
        body = body[:draw(st.integers(0, len(body)))]
    elif damage == 1:
        pos = draw(st.integers(0, max(0, len(body) - 1)))
        body = body[:pos] + bytes([draw(st.integers(0, 255))]) + body[pos + 1:]
    elif damage == 2:
        body = body.replace(b'"', draw(st.sampled_from([b'"\\ud800', b'"\xff', b'"\x00'])), 2)
    elif damage == 3:
        body = body.replace(b"1", draw(st.sampled_from([b"NaN", b"Infinity", b"1e400"])), 1)
    elif damage == 4:
        depth = draw(st.sampled_from([10, 200, 100_000]))
        body = b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"
    method = "POST"
    if draw(st.integers(0, 9)) == 0:
        method = draw(st.sampled_from(["GET", "PUT", "DELETE", "PATCH"]))
    if draw(st.integers(0, 9)) == 0:
        path = draw(st.sampled_from(["/", "/v1", "/v1/completion", "/tokenize/", "/v2/models"]))
    return method, path, body


def check_http(method: str, path: str, body: bytes, resp: httpx.Response) -> Optional[str]:
    """What is wrong with this answer, or None."""
    if resp.status_code >= 500:
        return f"{resp.status_code}"
    try:
        answer = json.loads(resp.content) if not _is_sse(resp) else None
    except ValueError:
        return "a body that is not JSON"
    if resp.status_code >= 400:
        return _check_error(answer, resp.status_code, path, body)
    if resp.status_code != 200:
        return f"status {resp.status_code}"
    try:
        request = json.loads(body)
    except (ValueError, RecursionError):
        return "a 200 for a body that is not JSON"
    if _is_sse(resp):
        return _check_stream(resp.text)
    try:
        ok = _well_shaped(path, request, answer)
    except (KeyError, TypeError, IndexError):
        ok = False
    return None if ok else "a 200 of the wrong shape"


def _well_shaped(path: str, request: dict, answer: dict) -> bool:
    if path == "/tokenize":
        return answer["count"] == len(answer["tokens"])
    if path == "/detokenize":
        return isinstance(answer["prompt"], str)
    prompt = request.get("prompt", "")
    prompts = 1 if path.endswith("chat/completions") or isinstance(prompt, str) or (
        prompt and isinstance(prompt[0], int)) else len(prompt)
    indices = sorted(c["index"] for c in answer["choices"])
    usage = answer["usage"]
    return (indices == list(range(prompts * request.get("n", 1)))
            and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
            and all(c["finish_reason"] in ("stop", "length") for c in answer["choices"]))


def _is_sse(resp: httpx.Response) -> bool:
    return resp.headers.get("content-type", "").startswith("text/event-stream")


def _check_error(answer, status: int, path: str, body: bytes) -> Optional[str]:
    err = answer.get("error") if isinstance(answer, dict) else None
    if not isinstance(err, dict) or set(err) != {"message", "type", "param", "code"}:
        return f"{status} not in OpenAI's error shape"
    if not err["message"] or err["code"] != status:
        return f"{status} without a message or with code {err['code']}"
    if any(leak in err["message"] for leak in LEAKS):
        return f"{status} message leaks: {err['message'][:120]}"
    known = set(ENDPOINTS[path][0].model_fields) if path in ENDPOINTS else set()
    try:
        known |= set(json.loads(body))
    except (ValueError, TypeError, RecursionError):
        pass
    if err["param"] is not None and err["param"] not in known:
        return f"{status} names a param that is no field: {err['param']!r}"
    return None


def _check_stream(text: str) -> Optional[str]:
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        return "a stream without [DONE]"
    for event in events[:-1]:
        if "error" in json.loads(event):
            return f"an error event: {event[:120]}"
    return None


# ---- ZeroMQ ----------------------------------------------------------------------------------
FIELDS = {(rec, field): (offset, size) for rec, field, offset, size in compiled_layout() if field}
SAMPLING_AT = FIELDS["mv_submit", "sampling"][0]
RAW = {4: [struct.pack("<i", v) for v in (-2**31, -2, -1, 0, 1, 20, 21, 2**31 - 1)]
       + [struct.pack("<I", v) for v in (2**31, 2**32 - 1)] + [struct.pack("<f", math.nan)],
       8: [struct.pack("<d", v) for v in (math.nan, math.inf, -math.inf, -1.0, 0.0, 0.5, 1.0,
                                          2.0, 3.0, 1e308, 5e-324)]
       + [struct.pack("<q", v) for v in (-1, 0, 1, 2**63 - 1)] + [struct.pack("<Q", 2**64 - 1)],
       2: [struct.pack("<H", v) for v in (0, 1, 2, 3, 4, 5, 0xFFFF)]}
PING_ID = 2**64 - 1  # the one-token request that marks the end of a message's answers


@st.composite
def zmq_messages(draw) -> list[bytes]:
    """One ZeroMQ message (a list of frames): usually one record, drawn and damaged."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return [draw(st.binary(max_size=300))]
    if kind == 1:
        return [protocol.encode_abort(draw(st.integers(0, PING_ID - 1)))]
    if kind == 2:
        return [protocol.encode_step_output(draw(st.integers(0, 10)), [1], [2], [0])]
    if kind == 3:
        return [protocol.encode_error(1, draw(st.text(max_size=20)), None)]
    prompt = draw(st.lists(st.integers(0, 49151) | st.sampled_from([-1, 49152, 2**31 - 1]),
                           min_size=1, max_size=20)
                  | st.sampled_from([[7] * 8192, [7] * 9000]))
    stop = draw(st.lists(st.integers(0, 60000), max_size=3))
    frame = bytearray(protocol.encode_submit(
        draw(st.integers(0, PING_ID - 1)), prompt,
        SamplingParams(max_tokens=draw(st.integers(1, 3)), stop_token_ids=stop)))
    if kind == 4 and not stop:  # an empty prompt, well formed (the encoder refuses to write one)
        fixed = FIELDS["mv_submit", "num_prompt_tokens"][0] + 8
        frame = _set(frame[:fixed], "mv_header", "size", struct.pack("<I", fixed))
        frame = _set(frame, "mv_submit", "num_prompt_tokens", bytes(4))
    for _ in range(draw(st.integers(0, 4))):
        (rec, field), (_, size) = draw(st.sampled_from(sorted(FIELDS.items())))
        if rec in ("mv_header", "mv_sampling", "mv_submit") and size in RAW:
            frame = _set(frame, rec, field, draw(st.sampled_from(RAW[size])))
    cut = draw(st.integers(0, 11))
    if cut == 0:
        del frame[draw(st.integers(0, len(frame))):]
    elif cut == 1:
        frame += draw(st.binary(min_size=1, max_size=16))
    frames = [bytes(frame)]
    if draw(st.integers(0, 19)) == 0:
        frames.append(draw(st.binary(max_size=40)))
    return frames


def _set(frame: bytearray, rec: str, field: str, value: bytes) -> bytearray:
    """`frame` with a submit's field (of its header, sampling or fixed part) set to `value`."""
    at = FIELDS[rec, field][0] + (SAMPLING_AT if rec == "mv_sampling" else 0)
    frame[at:at + len(value)] = value
    return frame


def expected_answer(frames: list[bytes], max_model_len: int, vocab: int) -> tuple:
    """What PROTOCOL.md says the engine answers: ("error", code, request id or None),
    ("runs", request id) or ("nothing",)."""
    if len(frames) != 1:
        return ("error", protocol.ERR_MALFORMED, None)
    try:
        rec = protocol.decode(frames[0])
    except protocol.ProtocolError as exc:
        return ("error", protocol.ERR_MALFORMED, exc.request_id)
    if isinstance(rec, protocol.Abort):
        return ("nothing",)
    if not isinstance(rec, protocol.Submit):
        return ("error", protocol.ERR_MALFORMED, None)
    try:
        rec.sampling_params()
        check_prompt(rec.prompt_token_ids, max_model_len, vocab)
    except ValueError:
        return ("error", protocol.ERR_INVALID_REQUEST, rec.request_id)
    return ("runs", rec.request_id)


class ZmqPeer:
    """A DEALER at the engine's endpoint that sends a message, then its ping, and reads what
    came back up to the ping's finish."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, 120_000)
        self.sock.connect(endpoint)
        self.ping = protocol.encode_submit(PING_ID, [1], SamplingParams(max_tokens=1))

    def exchange(self, frames: list[bytes]) -> list:
        """Every error record and (request id, finish code) entry the message brought."""
        self.sock.send_multipart(frames)
        try:
            rec = protocol.decode(frames[0]) if len(frames) == 1 else None
        except protocol.ProtocolError:
            rec = None
        if isinstance(rec, protocol.Submit):  # a request that runs ends at once
            self.sock.send(protocol.encode_abort(rec.request_id))
        self.sock.send(self.ping)
        answers = []
        while True:
            rec = protocol.decode(self.sock.recv())
            if isinstance(rec, protocol.ErrorRecord):
                answers.append(rec)
                continue
            for rid, finish in zip(rec.request_ids.tolist(), rec.finish_reasons.tolist()):
                if rid == PING_ID and finish:
                    return answers
                answers.append((rid, finish))

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


def check_zmq(expected: tuple, answers: list) -> Optional[str]:
    errors = [a for a in answers if isinstance(a, protocol.ErrorRecord)]
    for err in errors:
        if not err.message or any(leak in err.message for leak in LEAKS):
            return f"error message: {err.message[:120]!r}"
    if expected[0] == "nothing":
        return None if not answers else f"answers to an abort: {answers[:3]}"
    if expected[0] == "error":
        got = [(e.code, e.request_id) for e in errors]
        return None if got == [expected[1:]] and len(answers) == 1 else \
            f"expected error {expected[1:]}, got {answers[:3]}"
    entries = [a for a in answers if not isinstance(a, protocol.ErrorRecord)]
    ok = not errors and all(rid == expected[1] for rid, _ in entries) and \
        sum(1 for _, finish in entries if finish) == 1
    return None if ok else f"a valid submit got {answers[:3]}"


# ---- the scenario ----------------------------------------------------------------------------
HTTP_CLIENTS = 8  # HTTP cases in flight at once (hypothesis draws them one by one)


def fuzz(srv: ServeProcess, args) -> dict:
    """`args.clients` HTTP requests and as many ZeroMQ messages, every answer checked."""
    engine = srv.engine_pid()
    endpoint = srv.args[srv.args.index("--zmq-endpoint") + 1]
    max_model_len = httpx.get(srv.url + "/v1/models", timeout=30).json()["data"][0][
        "max_model_len"]
    vocab = load_tokenizer(resolve_model(None, "auto")).vocab_size  # run.py's model
    outcomes, failures, lock = Counter(), {}, threading.Lock()

    def record(kind: str, verdict: Optional[str], example) -> None:
        with lock:
            outcomes[kind] += 1
            if verdict is not None:
                outcomes["failed"] += 1
                failures.setdefault(verdict.split(":")[0], []).append(repr(example)[:300])

    run_settings = settings(max_examples=args.clients, deadline=None, database=None,
                            phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    t0 = time.monotonic()
    cases: queue.Queue = queue.Queue(maxsize=2 * HTTP_CLIENTS)

    def http_client() -> None:
        with httpx.Client(base_url=srv.url, timeout=args.timeout) as client:
            while (case := cases.get()) is not None:
                record(*http_exchange(client, *case))
    clients = [threading.Thread(target=http_client) for _ in range(HTTP_CLIENTS)]
    for thread in clients:
        thread.start()
    try:
        @seed(SEED)
        @run_settings
        @given(http_requests())
        def http_case(case):
            cases.put(case)
        http_case()
    finally:
        for thread in clients:
            cases.put(None)
        for thread in clients:
            thread.join()
    http_s = time.monotonic() - t0

    peer = ZmqPeer(endpoint)
    t0 = time.monotonic()
    try:
        @seed(SEED)
        @run_settings
        @given(zmq_messages())
        def zmq_case(frames):
            expected = expected_answer(frames, max_model_len, vocab)
            verdict = check_zmq(expected, peer.exchange(frames))
            kind = "zmq " + (f"error {expected[1]}" if expected[0] == "error" else expected[0])
            record(kind, verdict, [f[:64] for f in frames])
        zmq_case()
    finally:
        peer.close()
    zmq_s = time.monotonic() - t0
    in_flight = _admitted_after(srv.url, args.timeout)
    return {"outcomes": outcomes, "http_cases": sum(n for k, n in outcomes.items()
                                                     if k.startswith("http")),
            "zmq_cases": sum(n for k, n in outcomes.items() if k.startswith("zmq")),
            "http_s": round(http_s, 1), "zmq_s": round(zmq_s, 1),
            "failures": {k: v[:FAILURES_KEPT] for k, v in failures.items()},
            "admitted_after": in_flight, "same_engine": srv.engine_pid() == engine,
            "scenario_ok": not failures and in_flight == 0}


def http_exchange(client: httpx.Client, method: str, path: str,
                  body: bytes) -> tuple[str, Optional[str], tuple]:
    """(outcome, what is wrong or None, the case) for one HTTP case."""
    try:
        resp = client.request(method, path, content=body,
                              headers={"Content-Type": "application/json"})
    except httpx.HTTPError as exc:
        return "http error", f"transport error {type(exc).__name__}", (method, path, body[:200])
    return (f"http {resp.status_code}", check_http(method, path, body, resp),
            (method, path, body[:200]))


def _admitted_after(url: str, timeout: float) -> float:
    """Requests the API servers still count as admitted, once the last ones have ended."""
    deadline = time.monotonic() + timeout
    while True:
        left = metrics(url)["minivllm:api_requests_in_flight"]
        if left == 0 or time.monotonic() > deadline:
            return left
        time.sleep(0.2)
