"""What a generation returns, in vLLM's shape: RequestOutput holding CompletionOutputs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: Optional[str] = None  # "stop" | "length" | "abort" | None while running
    stop_reason: Optional[object] = None  # the stop string or token id that ended it
    cumulative_logprob: Optional[float] = None
    # One dict per generated token: token id -> logprob, holding the sampled token and the top-N.
    logprobs: Optional[list[dict[int, float]]] = None
    # Streaming (AsyncEngineClient): what this output adds to the previous one of its request.
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    num_cached_tokens: int = 0
    # With SamplingParams.prompt_logprobs: one {token: logprob} per prompt token (its own and
    # the top N at its position), None for the first, which has no context.
    prompt_logprobs: Optional[list[Optional[dict[int, float]]]] = None

    @property
    def finished(self) -> bool:
        return all(o.finished for o in self.outputs)
