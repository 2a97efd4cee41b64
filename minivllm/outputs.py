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

    # `text`, while it is the join of a stream's pieces (the list, how many) not yet made
    _pieces = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @classmethod
    def of_pieces(cls, index: int, pieces: list[str], *rest) -> "CompletionOutput":
        """A CompletionOutput whose text is the join of `pieces` as they are now (a list that
        may grow after), joined when first read: a stream's outputs then cost the same however
        long its text, where joining all of it for each would copy the text once per output."""
        out = cls(index, "", *rest)
        out._pieces = (pieces, len(pieces))
        return out


def _text(out: CompletionOutput) -> str:
    if out._pieces is not None:
        pieces, n = out._pieces
        out._text, out._pieces = pieces[0] if n == 1 else "".join(pieces[:n]), None
    return out._text


def _set_text(out: CompletionOutput, text: str) -> None:
    out._text, out._pieces = text, None


# (set after the dataclass is made: in its body, the property would be the field's default)
CompletionOutput.text = property(_text, _set_text)


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
