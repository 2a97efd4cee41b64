"""Frontend output processing: engine tokens in, RequestOutputs with text out.

A `CompletionStream` follows one engine request (one of a request's `n` completions): it appends
tokens, detokenizes incrementally, collects logprobs, and matches stop strings on the text (the
engine knows token ids only). A match truncates the text before the stop string, finishes the
completion with reason "stop", and tells the caller to abort the engine request. While running,
the last (longest stop string - 1) characters are held back from the stream: they may be the
start of a stop string that must not be shown.

A `RequestState` gathers a request's streams and turns them into RequestOutput snapshots, with
the text and tokens added since the previous snapshot in `delta_text` / `delta_token_ids`.
"""
from __future__ import annotations

from typing import Optional, Sequence

from minivllm.frontend.detokenizer import IncrementalDetokenizer
from minivllm.outputs import CompletionOutput, RequestOutput
from minivllm.sampling_params import SamplingParams
from minivllm.transport.protocol import FINISH_REASONS


class CompletionStream:
    def __init__(self, index: int, params: SamplingParams, tokenizer,
                 prompt_token_ids: Sequence[int], eos_token_ids: Sequence[int]) -> None:
        self.index, self.params = index, params
        self.wire_id = -1  # the engine request's id, set by the client
        self.eos_token_ids = set(eos_token_ids)
        self.detok = (None if tokenizer is None else
                      IncrementalDetokenizer(tokenizer, prompt_token_ids,
                                             params.skip_special_tokens))
        self.holdback = max((len(s) for s in params.stop), default=1) - 1
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: Optional[list[dict[int, float]]] = [] if params.logprobs is not None \
            else None
        self.cumulative_logprob: Optional[float] = None
        self.finish_reason: Optional[str] = None
        self.stop_reason: Optional[object] = None
        self.sent_text = 0    # characters of `text` already given out
        self.sent_tokens = 0  # tokens already given out

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, token_id: int, finish_code: int,
            logprobs: Optional[dict[int, float]] = None) -> bool:
        """Apply one engine entry (token -1 carries only a finish). True if a stop string
        matched: the engine must be told to abort this request."""
        if token_id >= 0:
            self.token_ids.append(token_id)
            if logprobs is not None and self.logprobs is not None:
                self.logprobs.append(logprobs)
                self.cumulative_logprob = (self.cumulative_logprob or 0.0) + logprobs[token_id]
            if self.detok is not None:
                self.text += self.detok.push(token_id)
        if finish_code:
            self._finish(FINISH_REASONS[finish_code], token_id)
            return False
        return bool(self.params.stop) and self._match_stop()

    def _finish(self, reason: str, token_id: int) -> None:
        if self.detok is not None:
            self.text += self.detok.flush()
        self.finish_reason = reason
        if reason == "stop" and token_id not in self.eos_token_ids:
            self.stop_reason = token_id  # a stop token id, as vLLM reports it
        if self.params.stop:
            self._match_stop()  # a stop string completed by the last token

    def _match_stop(self) -> bool:
        """The first stop string (in the order given) found in the text ends the completion,
        cut before its first occurrence (the offline path's rule)."""
        hit = next((s for s in self.params.stop if s in self.text), None)
        if hit is None:
            return False
        self.text = self.text[:self.text.index(hit)]
        self.finish_reason, self.stop_reason = "stop", hit
        return True

    def fail(self, reason: str = "abort") -> None:
        if not self.finished:
            self.finish_reason = reason

    def delta(self) -> tuple[str, list[int]]:
        """Text and tokens not given out yet (text held back while a stop string may start)."""
        end = len(self.text) if self.finished else max(self.sent_text,
                                                       len(self.text) - self.holdback)
        text = self.text[self.sent_text:end]
        tokens = self.token_ids[self.sent_tokens:]
        self.sent_text, self.sent_tokens = end, len(self.token_ids)
        return text, tokens


class RequestState:
    def __init__(self, request_id: str, prompt: Optional[str], prompt_token_ids: list[int],
                 streams: list[CompletionStream]) -> None:
        self.request_id, self.prompt, self.prompt_token_ids = request_id, prompt, prompt_token_ids
        self.streams = streams
        self.error: Optional[BaseException] = None

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.streams)

    def snapshot(self) -> RequestOutput:
        """The request so far: cumulative text and tokens, plus what is new since last time."""
        outputs = []
        for s in self.streams:
            delta_text, delta_tokens = s.delta()
            outputs.append(CompletionOutput(
                s.index, s.text if s.finished else s.text[:s.sent_text], list(s.token_ids),
                s.finish_reason, s.stop_reason, s.cumulative_logprob,
                None if s.logprobs is None else list(s.logprobs),
                delta_text=delta_text, delta_token_ids=delta_tokens))
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outputs)

