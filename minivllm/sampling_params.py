"""SamplingParams: what a request asks of the sampler and of the stop checks (vLLM's names)."""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

from minivllm._cext import records


def _finite(name: str, value: float) -> None:
    if type(value) is float and math.isfinite(value):
        return  # (the common case, without the ABC's isinstance)
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


# The submit record's integer fields are int32 (ipc/minivllm_ipc.h): larger values must be
# refused here, by name, not by the codec's OverflowError deep in a frontend.
_INT32_MAX = 2**31 - 1


def _is_int(value: object) -> bool:
    """Integers, numpy's included; bools are not (True as a token count is a caller's bug)."""
    return type(value) is int or isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_token_id(value: object) -> bool:
    return _is_int(value) and 0 <= value <= _INT32_MAX


def _int_in(name: str, value: object, lo: int, hi: int, optional: bool = False) -> None:
    if not (optional and value is None) and (not _is_int(value) or not lo <= value <= hi):
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}]"
                         f"{' or None' if optional else ''}, got {value!r}")


# The kinds in MV_STRUCTURED_* order, and the longest spec (a schema, regex or grammar as UTF-8)
# the submit record carries to the engine's compiler: ipc/minivllm_ipc.h's.
STRUCTURED_KINDS = tuple(records.STRUCTURED_KINDS.values())
MAX_SPEC_BYTES = records.MAX_SPEC_BYTES


@dataclass(frozen=True)
class StructuredOutputsParams:
    """One constraint on a request's output (vLLM's shape): a JSON schema (`json`, a dict or its
    JSON text), a `regex`, a `choice` among strings, an EBNF `grammar` (xgrammar's dialect), or
    `json_object=True` (any JSON object). Exactly one is set. The shape is checked here; whether
    the schema, regex or grammar compiles is the engine's answer (an error naming the problem)."""

    json: Union[None, str, dict] = None
    regex: Optional[str] = None
    choice: Optional[Sequence[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None

    def __post_init__(self) -> None:
        given = [k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError("structured outputs take exactly one of json, regex, choice, "
                             f"grammar, json_object; got {', '.join(given) or 'none'}")
        if self.json_object not in (None, False, True):
            raise ValueError(f"structured_outputs.json_object must be a bool, "
                             f"got {self.json_object!r}")
        if self.json is not None:
            schema = self.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError as exc:
                    raise ValueError(f"structured_outputs.json is not valid JSON: {exc}") from None
            if not isinstance(schema, dict):
                raise ValueError("structured_outputs.json must be a JSON schema object, "
                                 f"got {type(schema).__name__}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string")
        if self.choice is not None:
            if isinstance(self.choice, str) or not isinstance(self.choice, Sequence) \
                    or not self.choice or not all(isinstance(c, str) and c for c in self.choice):
                raise ValueError("structured_outputs.choice must be a non-empty list of "
                                 "non-empty strings")
            object.__setattr__(self, "choice", tuple(self.choice))
        if len(self.spec.encode()) > MAX_SPEC_BYTES:
            raise ValueError(f"structured_outputs.{self.kind} is longer than "
                             f"{MAX_SPEC_BYTES} bytes")

    @property
    def kind(self) -> str:
        return next(k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False))

    @property
    def spec(self) -> str:
        """The constraint as text, as the wire carries it: the schema's and the choices' JSON,
        the regex, the grammar, "" for json_object. (kind, spec) names a compiled grammar."""
        value = getattr(self, self.kind)
        if self.kind == "choice":
            return json.dumps(list(value), ensure_ascii=False)
        if self.kind == "json" and isinstance(value, dict):
            return json.dumps(value, ensure_ascii=False)
        return "" if self.kind == "json_object" else value

    @classmethod
    def from_spec(cls, kind: str, spec: str) -> "StructuredOutputsParams":
        """The inverse of (kind, spec), for a decoder of the wire's text."""
        if kind not in STRUCTURED_KINDS:
            raise ValueError(f"unknown structured-outputs kind {kind!r}")
        value: Any = True if kind == "json_object" else spec
        if kind == "choice":
            try:
                value = json.loads(spec)
            except ValueError as exc:
                raise ValueError(f"structured_outputs.choice is not a JSON list: {exc}") from None
        return cls(**{kind: value})


@dataclass
class SamplingParams:
    """Per-request sampling and stopping parameters. Validated on construction.

    temperature 0 means greedy. top_k -1 (or 0 with vLLM's older meaning, rejected here to avoid
    ambiguity) disables top-k. `seed` makes a request's samples reproducible whatever else is in
    the batch. `logprobs=N` returns the sampled token's logprob and the top N.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: Optional[int] = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    stop: Union[None, str, Sequence[str]] = None
    stop_token_ids: Sequence[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: Optional[int] = None
    # The prompt's logprobs too (vLLM's prompt_logprobs): each prompt token's and the top N at
    # its position, from the prefill's logits. Such a request skips the prefix cache.
    prompt_logprobs: Optional[int] = None
    skip_special_tokens: bool = True
    structured_outputs: Optional[StructuredOutputsParams] = None
    # Token choice, as vLLM: a bias added to a token's logit (OpenAI's logit_bias, in
    # [-100, 100]), the only tokens that may be sampled, and words never to generate. Frontends
    # with a tokenizer turn bad_words into bad_words_token_ids (with and without a leading
    # space, as vLLM), which is what the engine reads.
    logit_bias: Optional[dict[int, float]] = None
    allowed_token_ids: Optional[Sequence[int]] = None
    bad_words: Optional[Sequence[str]] = None
    bad_words_token_ids: Sequence[Sequence[int]] = ()

    def __post_init__(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        _finite("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        _finite("top_p", self.top_p)
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not _is_int(self.top_k) or self.top_k == 0 or not -1 <= self.top_k <= _INT32_MAX:
            raise ValueError(f"top_k must be -1 (disabled) or a positive integer, got {self.top_k!r}")
        _finite("min_p", self.min_p)
        if not (0.0 <= self.min_p <= 1.0):
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None and (not _is_int(self.seed) or not -2**63 <= self.seed < 2**64):
            raise ValueError(f"seed must be a 64-bit integer or None, got {self.seed!r}")
        _finite("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _finite(name, value)
            if not (-2.0 <= value <= 2.0):
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        _int_in("max_tokens", self.max_tokens, 1, _INT32_MAX, optional=True)
        _int_in("min_tokens", self.min_tokens, 0, _INT32_MAX)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed "
                             f"max_tokens ({self.max_tokens})")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop must be a non-empty string or a list of non-empty strings")
        self.stop_token_ids = list(self.stop_token_ids or [])
        if not all(map(_is_token_id, self.stop_token_ids)):
            raise ValueError(f"stop_token_ids must be integers in [0, {_INT32_MAX}], "
                             f"got {self.stop_token_ids!r}")
        _int_in("logprobs", self.logprobs, 0, 20, optional=True)
        _int_in("prompt_logprobs", self.prompt_logprobs, 0, 20, optional=True)
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if self.structured_outputs is not None and \
                not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError("structured_outputs must be a StructuredOutputsParams, got "
                             f"{type(self.structured_outputs).__name__}")

        self._check_token_choice()

    def _check_token_choice(self) -> None:
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError("logit_bias must map token ids to biases")
            for token, bias in self.logit_bias.items():
                if not _is_token_id(token):
                    raise ValueError(f"logit_bias keys must be token ids, got {token!r}")
                _finite(f"logit_bias[{token}]", bias)
                if not -100 <= bias <= 100:
                    raise ValueError(f"logit_bias[{token}] must be in [-100, 100], got {bias}")
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(self.allowed_token_ids)
            if not self.allowed_token_ids or not all(map(_is_token_id, self.allowed_token_ids)):
                raise ValueError("allowed_token_ids must be a non-empty list of token ids, got "
                                 f"{self.allowed_token_ids!r}")
        if self.bad_words is not None and (isinstance(self.bad_words, str) or any(
                not isinstance(w, str) or not w.strip() for w in self.bad_words)):
            raise ValueError("bad_words must be a list of non-empty strings")
        self.bad_words_token_ids = [list(ids) for ids in self.bad_words_token_ids]
        if any(not ids or not all(map(_is_token_id, ids)) for ids in self.bad_words_token_ids):
            raise ValueError("bad_words_token_ids must be non-empty lists of token ids")

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids past the vocabulary, by the field that holds them (ValueError)."""
        for name, ids in (("logit_bias", self.logit_bias or ()),
                          ("allowed_token_ids", self.allowed_token_ids or ()),
                          ("bad_words", [t for w in self.bad_words_token_ids for t in w])):
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                raise ValueError(f"{name}: token id {bad[0]} is outside the vocabulary "
                                 f"(size {vocab_size})")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5 or self.top_k == 1
