"""OpenAI's response bodies, made from engine outputs: completions and chat completions, whole
(one JSON body) or streamed (SSE chunks), with token usage and logprobs; and /tokenize's.

One object per HTTP request holds what every body and chunk of its response shares (id,
creation time, model); the two endpoints differ only in where the text and the logprobs go. A
request of several prompts numbers its choices prompt by prompt: choice index = prompt index x n
+ the sequence's own index.

A streamed response sends a chunk per sequence per engine step: the hot path of a server. Its
SSE events are framed as text here: the envelope is rendered once per response, and a plain
running chunk (no logprobs, no tool calls, not the last) is its choice filled into a fixed
template, only the new text JSON-encoded. The bytes are json.dumps' of the same dict (the
tests compare the two); every other chunk is that dict, dumped.
"""
from __future__ import annotations

import json
import time
import uuid
from json.encoder import encode_basestring  # what json.dumps(str, ensure_ascii=False) runs
from typing import Optional

from minivllm.outputs import CompletionOutput, RequestOutput
from minivllm.sampling_params import SamplingParams
from minivllm.server.tool_calls import ToolCalls
from minivllm.tokenizer import Tokenizer


# One json.dumps of a million ids holds the GIL for ~100 ms; between slices of this size the
# event loop's thread gets it (tokenize_body runs in a worker thread for long inputs).
_IDS_PER_SLICE = 16384


def tokenize_body(ids: list[int], max_model_len: int) -> bytes:
    """/tokenize's JSON body, rendered a slice of ids at a time."""
    slices = (json.dumps(ids[i:i + _IDS_PER_SLICE])[1:-1]
              for i in range(0, len(ids), _IDS_PER_SLICE))
    return (f'{{"tokens":[{",".join(slices)}],"count":{len(ids)},'
            f'"max_model_len":{max_model_len}}}').encode()


# SSE ends lines at CR and LF only, but Python's str.splitlines also at these (httpx's
# aiter_lines splits a generated U+0085 into two lines, and the event's JSON is cut): escaped,
# they decode the same and split nothing.
_LINE_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def event(payload: dict) -> str:
    """One SSE event carrying `payload` as compact JSON."""
    return f"data: {_dumps(payload).translate(_LINE_BREAKS)}\n\n"


def _dumps(payload: dict) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def _text(text: str) -> str:
    """`text` as a JSON string for an SSE event."""
    quoted = encode_basestring(text)
    return quoted if text.isascii() else quoted.translate(_LINE_BREAKS)


def usage(finals: list[RequestOutput]) -> dict:
    """OpenAI's usage object over every prompt of a request."""
    prompt = sum(len(o.prompt_token_ids) for o in finals)
    completion = sum(len(c.token_ids) for o in finals for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


class OpenAIResponse:
    """One request's response: `body` once every prompt has finished, or, streamed,
    `stream_head`, then `stream_events` per engine output, then `usage_chunk` if asked for."""

    object_name = ""
    chunk_name = ""
    id_prefix = ""
    # a plain running choice's JSON around its index and its text (text_json)
    text_template = ("", "", "")

    def __init__(self, model: str, tokenizer: Optional[Tokenizer],
                 params: SamplingParams) -> None:
        self.model, self.tokenizer, self.params = model, tokenizer, params
        self.id = f"{self.id_prefix}{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.n = params.n
        # A chunk's event up to its choices: `data: {"id":...,"model":...,"choices":[`
        self._chunk_start = "data: " + _dumps(self._envelope(self.chunk_name, []))[:-3] + "["
        # whether every running chunk is text_event's (one sequence per prompt, no logprobs)
        self.plain = self.n == 1 and params.logprobs is None

    def _envelope(self, obj: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def body(self, finals: list[RequestOutput]) -> dict:
        choices = [self.choice(i * self.n + c.index, c)
                   for i, out in enumerate(finals) for c in out.outputs]
        return self._envelope(self.object_name, choices, usage=usage(finals))

    def stream_head(self) -> list[dict]:
        return []

    def stream_events(self, i: int, out: RequestOutput) -> str:
        """The SSE events for one output of prompt `i`: a chunk per sequence with news."""
        return "".join(f"{self._chunk_start}{self.delta_json(i * self.n + c.index, c)}]}}\n\n"
                       for c in out.outputs if c.delta_text or c.delta_token_ids or c.finished)

    def text_event(self, index: int, text: str) -> str:
        """The SSE event of a plain running chunk: choice `index`'s new `text`."""
        before, after = self.text_frame(index)
        return f"{before}{_text(text)}{after}"

    def text_frame(self, index: int) -> tuple[str, str]:
        """The SSE event of choice `index`'s plain running chunks, before and after its text's
        JSON string."""
        start, middle, end = self.text_template
        return f"{self._chunk_start}{start}{index}{middle}", f"{end}]}}\n\n"

    def usage_chunk(self, finals: list[RequestOutput]) -> dict:
        return self._envelope(self.chunk_name, [], usage=usage(finals))

    def choice(self, index: int, c: CompletionOutput) -> dict:
        raise NotImplementedError

    def delta_choice(self, index: int, c: CompletionOutput) -> dict:
        raise NotImplementedError

    def delta_json(self, index: int, c: CompletionOutput) -> str:
        """delta_choice(index, c) as JSON."""
        return _dumps(self.delta_choice(index, c))

    def text_json(self, index: int, text: str) -> str:
        """delta_json of a running choice without logprobs (or tool calls) whose new text is
        `text`: `text_template` filled, only the text JSON-encoded."""
        start, middle, end = self.text_template
        return f"{start}{index}{middle}{_text(text)}{end}"

    def _token(self, token_id: int) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode(
            [token_id], skip_special_tokens=False)

    def _delta_logprobs(self, c: CompletionOutput, ids: list[int]) -> Optional[list[dict]]:
        if c.logprobs is None:
            return None
        return c.logprobs[len(c.logprobs) - len(ids):] if ids else []


class CompletionResponse(OpenAIResponse):
    object_name, chunk_name, id_prefix = "text_completion", "text_completion", "cmpl-"
    text_template = ('{"index":', ',"text":',
                     ',"logprobs":null,"finish_reason":null,"stop_reason":null}')

    def __init__(self, model: str, tokenizer: Optional[Tokenizer], params: SamplingParams,
                 echo: bool = False, prompt_only: bool = False) -> None:
        super().__init__(model, tokenizer, params)
        self.echo, self.prompt_only = echo, prompt_only

    def body(self, finals: list[RequestOutput]) -> dict:
        body = super().body(finals)
        if self.echo:
            pairs = [(out, c) for out in finals for c in out.outputs]
            for choice, (out, c) in zip(body["choices"], pairs):
                self._echo(choice, out, c)
        return body

    def _echo(self, choice: dict, out: RequestOutput, c: CompletionOutput) -> None:
        """OpenAI's echo: the prompt before the completion, in the text and in the logprobs
        (the first prompt token has none). max_tokens 0 keeps the prompt alone."""
        kept = 0 if self.prompt_only else len(c.token_ids)
        prompt = out.prompt if out.prompt is not None else self.tokenizer.decode(
            out.prompt_token_ids, skip_special_tokens=False)
        choice["text"] = prompt + (c.text if kept else "")
        if choice["logprobs"] is None:
            return
        ids = out.prompt_token_ids
        lp = self._logprobs(ids[1:] + c.token_ids[:kept],
                            out.prompt_logprobs[1:] + c.logprobs[:kept])
        lp["tokens"].insert(0, self._token(ids[0]))
        lp["token_logprobs"].insert(0, None)
        lp["top_logprobs"].insert(0, None)
        lp["text_offset"] = _offsets(lp["tokens"])
        choice["logprobs"] = lp

    def choice(self, index: int, c: CompletionOutput) -> dict:
        return {"index": index, "text": c.text,
                "logprobs": self._logprobs(c.token_ids, c.logprobs),
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}

    def delta_json(self, index: int, c: CompletionOutput) -> str:
        if c.logprobs is None and not c.finished:
            return self.text_json(index, c.delta_text)
        return super().delta_json(index, c)

    def delta_choice(self, index: int, c: CompletionOutput) -> dict:
        ids = c.delta_token_ids
        return {"index": index, "text": c.delta_text,
                "logprobs": self._logprobs(ids, self._delta_logprobs(c, ids)),
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}

    def _logprobs(self, ids: list[int], rows: Optional[list[dict]]) -> Optional[dict]:
        if rows is None:
            return None
        tokens = [self._token(t) for t in ids]
        k = self.params.logprobs or 0
        return {"tokens": tokens, "token_logprobs": [row[t] for t, row in zip(ids, rows)],
                "top_logprobs": [{self._token(t): lp for t, lp in
                                  sorted(row.items(), key=lambda kv: -kv[1])[:max(k, 1)]}
                                 for row in rows],
                "text_offset": _offsets(tokens)}


def _offsets(tokens: list[str]) -> list[int]:
    """Each token's start in the text the tokens make."""
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return offsets


class ChatResponse(OpenAIResponse):
    """With `tools` (a request offering tools), each sequence's text becomes content and
    tool_calls (tool_calls.py), and a sequence that stopped on its own after calling a tool
    finishes with "tool_calls", as OpenAI's do."""

    object_name, chunk_name, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl-"
    text_template = ('{"index":', ',"delta":{"content":', '},"logprobs":null,"finish_reason":null}')

    def __init__(self, model: str, tokenizer: Optional[Tokenizer], params: SamplingParams,
                 tools: Optional[ToolCalls] = None) -> None:
        super().__init__(model, tokenizer, params)
        self.tools = tools
        self.plain = self.plain and tools is None

    def choice(self, index: int, c: CompletionOutput) -> dict:
        message: dict = {"role": "assistant", "content": c.text}
        finish = c.finish_reason
        if self.tools is not None:
            message["content"], calls = self.tools.message(c.text)
            if calls:
                message["tool_calls"] = calls
                finish = "tool_calls" if finish == "stop" else finish
        return {"index": index, "message": message,
                "logprobs": self._logprobs(c.token_ids, c.logprobs),
                "finish_reason": finish, "stop_reason": c.stop_reason}

    def stream_head(self) -> list[dict]:
        return [self._envelope(self.chunk_name, [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
             "finish_reason": None} for i in range(self.n)])]

    def delta_json(self, index: int, c: CompletionOutput) -> str:
        if self.tools is None and c.logprobs is None and not c.finished:
            return self.text_json(index, c.delta_text)
        return super().delta_json(index, c)

    def delta_choice(self, index: int, c: CompletionOutput) -> dict:
        ids = c.delta_token_ids
        finish = c.finish_reason
        if self.tools is None:
            delta = {"content": c.delta_text} if c.delta_text or not c.finished else {}
        else:
            delta = self.tools.delta(index, c.delta_text, c.finished,
                                     c.text if c.finished else "")
            if finish == "stop" and self.tools.called(index):
                finish = "tool_calls"
        return {"index": index, "delta": delta,
                "logprobs": self._logprobs(ids, self._delta_logprobs(c, ids)),
                "finish_reason": finish}

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
