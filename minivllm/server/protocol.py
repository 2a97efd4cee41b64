"""OpenAI's request shapes, validated strictly, and its error shape.

Requests are pydantic models in strict mode with unknown fields forbidden, as OpenAI's API
answers: a string where a number belongs, a float where an integer belongs, or a field it does
not know is a 400 naming the field. vLLM's extra sampling fields (top_k, min_p,
repetition_penalty, ignore_eos, ...) are accepted too. Ranges are checked once, by
SamplingParams, whose ValueError names the field.

Structured outputs come by any of the doors vLLM users know: OpenAI's `response_format`
(json_object, json_schema), vLLM's `structured_outputs` ({json | regex | choice | grammar |
json_object}) and its older `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`;
one per request. Their shape is checked here; whether a schema, regex or grammar compiles is the
engine's answer, a 400 naming the problem.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, ValidationError

from minivllm.sampling_params import STRUCTURED_KINDS, SamplingParams, StructuredOutputsParams


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: Optional[str] = None, headers: Optional[dict] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.status}}


_UNION_HINTS = {
    "prompt": "a string, a list of strings, a list of token ids or a list of token-id lists",
    "stop": "a string or a list of strings",
}
# pydantic puts the member of a union it tried ('str', 'list[int]') in an error's location
_UNION_MEMBERS = {"str", "int", "float", "bool"}


def validation_error(exc: ValidationError) -> APIError:
    """The first problem pydantic found, as a 400 naming the field."""
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    if err["type"] == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {err['msg']}")
    if err["type"] == "model_type" or not loc:
        return APIError(400, "the body must be a JSON object")
    field = loc[0]
    # loc[0] is the field, whatever its name; union members after it are no fields
    path = ".".join([field] + [p for p in loc[1:] if p not in _UNION_MEMBERS and "[" not in p])
    if err["type"] == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {path}", param=field)
    if err["type"] == "missing":
        return APIError(400, f"'{path}' is a required property", param=field)
    if field in _UNION_HINTS:
        return APIError(400, f"'{field}' must be {_UNION_HINTS[field]}", param=field)
    return APIError(400, f"'{path}': {err['msg']}", param=field)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    """The fields both endpoints share (OpenAI's, then vLLM's extras)."""

    model: Optional[str] = None
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    user: Optional[str] = None
    # vLLM's extra sampling parameters
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: Optional[list[int]] = None
    skip_special_tokens: bool = True
    # the token choice: OpenAI's logit_bias (token id as a string -> bias), vLLM's
    # allowed_token_ids and bad_words
    logit_bias: Optional[dict[str, float]] = None
    allowed_token_ids: Optional[list[int]] = None
    bad_words: Optional[list[str]] = None
    # structured outputs (one of them per request)
    response_format: Optional[dict] = None
    structured_outputs: Optional[dict] = None
    guided_json: Optional[Union[str, dict]] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None

    def structured_outputs_params(self) -> Optional[StructuredOutputsParams]:
        """The request's output constraint, from whichever field carries it; APIError naming
        the field when its shape is wrong or more than one field carries one."""
        given = {name: value for name, value in (
            ("response_format", self._response_format_spec()),
            ("structured_outputs", self.structured_outputs),
            *((f"guided_{kind}", {kind: getattr(self, f"guided_{kind}")})
              for kind in ("json", "regex", "choice", "grammar")
              if getattr(self, f"guided_{kind}") is not None)) if value is not None}
        if len(given) > 1:
            raise APIError(400, f"only one of {', '.join(given)} may constrain the output",
                           param=list(given)[1])
        if not given:
            return None
        (field, spec), = given.items()
        unknown = sorted(set(spec) - set(STRUCTURED_KINDS))
        if unknown:
            raise APIError(400, f"{field}: unknown key {unknown[0]!r}; the keys are "
                                f"{', '.join(STRUCTURED_KINDS)}", param=field)
        try:
            return StructuredOutputsParams(**spec)
        except ValueError as exc:
            raise APIError(400, f"{field}: {exc}", param=field) from None

    def _response_format_spec(self) -> Optional[dict]:
        rf = self.response_format
        if rf is None or rf.get("type") == "text":
            return None
        if rf.get("type") == "json_object":
            return {"json_object": True}
        if rf.get("type") != "json_schema":
            raise APIError(400, "response_format.type must be one of text, json_object, "
                                f"json_schema; got {rf.get('type')!r}", param="response_format")
        inner = rf.get("json_schema")
        schema = inner.get("schema") if isinstance(inner, dict) else None
        if not isinstance(schema, dict):
            raise APIError(400, "response_format.json_schema.schema must be a JSON schema "
                                "object", param="response_format")
        return {"json": schema}

    def prompt_logprobs(self, logprobs: Optional[int]) -> Optional[int]:
        """The prompt's logprobs are asked for by echo (completions only)."""
        return None

    def _logit_bias(self) -> Optional[dict[int, float]]:
        """OpenAI's map, its keys token ids written as strings, with int keys."""
        if self.logit_bias is None:
            return None
        bad = next((k for k in self.logit_bias if not k.isdigit()), None)
        if bad is not None:
            raise APIError(400, f"logit_bias keys must be token ids (integers), got {bad!r}",
                           param="logit_bias")
        return {int(k): v for k, v in self.logit_bias.items()}

    def sampling_params(self, max_tokens: Optional[int], logprobs: Optional[int]) -> SamplingParams:
        """SamplingParams for this request; out-of-range values raise APIError naming the
        field."""
        values: dict[str, Any] = dict(
            n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            min_p=self.min_p, seed=self.seed, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            max_tokens=max_tokens, min_tokens=self.min_tokens, stop=self.stop,
            stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos, logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            prompt_logprobs=self.prompt_logprobs(logprobs),
            structured_outputs=self.structured_outputs_params(), logit_bias=self._logit_bias(),
            allowed_token_ids=self.allowed_token_ids, bad_words=self.bad_words)
        try:
            # None means "the default", except max_tokens, where it means "up to the context"
            return SamplingParams(**{k: v for k, v in values.items()
                                     if v is not None or k == "max_tokens"})
        except ValueError as exc:
            message = str(exc).replace("None", "null")  # SamplingParams speaks Python, we JSON
            field = message.split(" ", 1)[0].split("[", 1)[0]  # logit_bias[5] -> logit_bias
            if field == "max_tokens":  # chat's limit may have come as max_completion_tokens
                field = self.completion_limit()[1]
            raise APIError(400, message, param=field) from None


class CompletionRequest(_SamplingFields):
    # (list[int] before list[str]: pydantic takes the first member that matches exactly, and
    # trying list[str] on a prompt of ids first fails on every id, 14 us for 128 of them)
    prompt: Union[str, list[int], list[str], list[list[int]]]
    max_tokens: Optional[int] = 16
    logprobs: Optional[int] = None
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    def check_supported(self) -> None:
        if self.echo and self.stream:
            raise APIError(400, "echo is not supported with stream", param="echo")
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "max_tokens 0 needs echo (scoring the prompt)",
                           param="max_tokens")
        if self.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "best_of must equal n (or be left out)", param="best_of")
        if self.logprobs is not None and not 0 <= self.logprobs <= 5:
            raise APIError(400, f"logprobs must be in [0, 5], got {self.logprobs}",
                           param="logprobs")

    def completion_limit(self) -> tuple[Optional[int], str]:
        """The completion's token limit and the field that set it. The engine samples at least
        one token: echo with max_tokens 0 (scoring a prompt, as lm-evaluation-harness does) asks
        for one and the response leaves it out."""
        return (1 if self.max_tokens == 0 else self.max_tokens), "max_tokens"

    def prompt_logprobs(self, logprobs: Optional[int]) -> Optional[int]:
        return logprobs if self.echo else None

    def prompts(self) -> list[Union[str, list[int]]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if isinstance(p[0], int):
            return [p]
        return list(p)


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[str, list[dict], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[dict]] = None  # an assistant turn's calls
    tool_call_id: Optional[str] = None  # a tool turn's answer to one

    def template_dict(self) -> dict:
        """The message as chat templates read it (an assistant's calls kept, content None
        there when it had none)."""
        message = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
            message["content"] = self.text() if self.content is not None else None
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message

    def text(self) -> str:
        """Text content; a list of parts may hold text parts only (no images here)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, "only text content parts are supported",
                               param="messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    tools: Optional[list[dict]] = None
    tool_choice: Optional[Union[str, dict]] = None
    parallel_tool_calls: Optional[bool] = None
    add_generation_prompt: bool = True

    def check_supported(self) -> None:
        if not self.messages:
            raise APIError(400, "messages must not be empty", param="messages")
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
            if not 0 <= self.top_logprobs <= 20:
                raise APIError(400, f"top_logprobs must be in [0, 20], got {self.top_logprobs}",
                               param="top_logprobs")

    def completion_limit(self) -> tuple[Optional[int], str]:
        """The completion's token limit and the field that set it (OpenAI's newer name first)."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    def num_logprobs(self) -> Optional[int]:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(_Strict):
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_generation_prompt: bool = True
    # vLLM's field (its bench tools send it). Default: no BOS/EOS added, as a completion's
    # prompt is encoded, so that the count is what the engine gets.
    add_special_tokens: bool = False


class DetokenizeRequest(_Strict):
    model: Optional[str] = None
    tokens: list[int]
