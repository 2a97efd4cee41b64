"""Output processing: engine step arrays in, RequestOutputs with text out. No torch here.

One path for every caller: `AsyncEngineClient` feeds it the step outputs it reads from its ring
(keys are its wire request ids), `LLM` the arrays `EngineCore.step()` returns (keys are owners).

The engine knows token ids only. An engine request (one of a request's `n` completions) is a
`CompletionStream`: it appends tokens, detokenizes incrementally (in a short window, the tokens
that came since its text was last read decoded together: one pass per step, or per several
steps when the reader falls behind), collects logprobs, and matches stop strings on the text it
adds (the overlap a stop string can straddle included; a stream with stop strings decodes each
token as it comes, since a match ends it there): the cost per token stays flat however long the
output. A match truncates the text before the stop string and finishes the completion with
reason "stop"; the caller then aborts the engine request. While running, the last (longest stop
string - 1) characters are held back from the stream: they may be the start of a stop string.

A `RequestState` gathers a request's streams and turns them into RequestOutput snapshots, with
the text and tokens added since the previous snapshot in `delta_text` / `delta_token_ids`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import numpy as np

from minivllm.frontend.detokenizer import IncrementalDetokenizer, byte_tables
from minivllm.outputs import CompletionOutput, RequestOutput
from minivllm.sampling_params import SamplingParams
from minivllm.transport.protocol import FINISH_REASONS, FINISH_STOP


class CompletionStream:
    def __init__(self, index: int, params: SamplingParams, tokenizer,
                 prompt_token_ids: Sequence[int], eos_token_ids: Sequence[int]) -> None:
        self.index, self.params = index, params
        self.key = -1  # the engine request's handle (wire id or owner), set on submission
        self.eos_token_ids = set(eos_token_ids)
        self.detok = (None if tokenizer is None else
                      IncrementalDetokenizer(tokenizer, prompt_token_ids,
                                             params.skip_special_tokens))
        self.holdback = max((len(s) for s in params.stop), default=1) - 1
        # The text in pieces, never one string grown per token (a copy of all of it each
        # time): what was given out (only appended to: outputs join these when read), what
        # was not yet (`held` characters), and the last `holdback` characters, where a stop
        # string can start before the next piece.
        self._given: list[str] = []
        self._held: list[str] = []
        self.held_chars = 0
        self._recent = ""
        self._undecoded: list[int] = []  # tokens not yet in the text
        # a TextSink (csrc/text_sink.pyx) taking this stream's running tokens, if any
        self.sink = None
        self.token_ids: list[int] = []
        self.logprobs: Optional[list[dict[int, float]]] = [] if params.logprobs is not None \
            else None
        self.cumulative_logprob: Optional[float] = None
        self.finish_reason: Optional[str] = None
        self.stop_reason: Optional[object] = None
        self.sent_text = 0     # characters of `text` already given out
        self.sent_tokens = 0   # tokens already given out

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        """The output's text so far (before any stop string)."""
        self._decode()
        return "".join(self._given + self._held)

    def _decode(self) -> str:
        """Decode the tokens not yet in the text; returns the text they add."""
        if not self._undecoded:
            return ""
        new = self.detok.push_many(self._undecoded)
        self._undecoded = []
        self._hold(new)
        return new

    def _hold(self, new: str) -> None:
        if new:
            self._held.append(new)
            self.held_chars += len(new)

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
                self._undecoded.append(token_id)
        if finish_code:
            self._finish(FINISH_REASONS[finish_code], finish_code, token_id)
            return False
        return bool(self.params.stop) and self._match_stop(self._decode())

    def _finish(self, reason: str, code: int, token_id: int) -> None:
        self.unsink()  # (take() has closed it before the entry came here)
        new = ""
        if self.detok is not None:
            new = self._decode()
            last = self.detok.flush()
            self._hold(last)
            new += last
        self.finish_reason = reason
        if code == FINISH_STOP and token_id not in self.eos_token_ids:
            self.stop_reason = token_id  # a stop token id, as vLLM reports it
        if self.params.stop:
            self._match_stop(new)  # a stop string completed by the last token

    def _match_stop(self, new: str) -> bool:
        """The first stop string (in the order given) in the text ends the completion, cut
        before its first occurrence. Earlier text held none, so only the `new` text (and the
        len - 1 characters before it) is searched."""
        if not new:
            return False
        window = self._recent + new
        self._recent = window[len(window) - self.holdback:] if self.holdback else ""
        for stop in self.params.stop:
            at = window.find(stop, max(0, len(window) - len(new) - len(stop) + 1))
            if at >= 0:
                # Cut in the held text: stop strings start after what was given out (that
                # kept their length - 1 characters back)
                cut = self.held_chars - (len(window) - at)
                held = "".join(self._held)[:cut]
                self._held, self.held_chars = [held] if held else [], len(held)
                self.finish_reason, self.stop_reason = "stop", stop
                return True
        return False

    def fail(self, reason: str = "abort") -> None:
        self.unsink()
        if not self.finished:
            self.finish_reason = reason

    def unsink(self) -> None:
        """Take the running tokens back from the TextSink, if one has them: its state back."""
        if self.sink is not None:
            self.sink.close()
            self.sink = None

    def sinkable(self) -> bool:
        """Whether a TextSink can take this stream's running tokens: it decodes their bytes
        and gives all of their text out at once (no stop strings to hold text back for, no
        logprobs to collect)."""
        return (self.finish_reason is None and self.detok is not None
                and self.detok.table is not None and not self.params.stop
                and self.logprobs is None and not self._held and not self._undecoded)

    def delta(self) -> tuple[str, list[int]]:
        """Text and tokens not given out yet (text held back while a stop string may start)."""
        start = self.sent_tokens
        text, _ = self.news()
        return text, self.token_ids[start:]

    def news(self) -> tuple[str, int]:
        """delta(), with the number of new tokens instead of their list."""
        self._decode()
        held = self._held
        n = self.held_chars if self.finish_reason is not None else \
            self.held_chars - self.holdback
        if n <= 0:
            text = ""
        else:
            whole = held[0] if len(held) == 1 else "".join(held)
            text, rest = whole[:n], whole[n:]
            self._held, self.held_chars = [rest] if rest else [], len(rest)
            self._given.append(text)
            self.sent_text += n
        new, self.sent_tokens = len(self.token_ids) - self.sent_tokens, len(self.token_ids)
        return text, new

    def output(self, copy_lists: bool = True) -> CompletionOutput:
        """The completion so far (its text up to what delta() gave out: the whole text once
        finished, joined when read), with what is new since the last one in delta_text /
        delta_token_ids; its token_ids and logprobs copies of this stream's lists unless
        `copy_lists` is False. Its cost does not grow with the output's length."""
        delta_text, delta_tokens = self.delta()
        token_ids, logprobs = self.token_ids, self.logprobs
        if copy_lists:
            token_ids = list(token_ids)
            logprobs = None if logprobs is None else list(logprobs)
        return CompletionOutput.of_pieces(self.index, self._given, token_ids, self.finish_reason,
                                          self.stop_reason, self.cumulative_logprob, logprobs,
                                          delta_text, delta_tokens)


class RequestState:
    def __init__(self, request_id: str, prompt: Optional[str], prompt_token_ids: list[int],
                 streams: list[CompletionStream]) -> None:
        self.request_id, self.prompt, self.prompt_token_ids = request_id, prompt, prompt_token_ids
        self.streams = streams
        self.error: Optional[BaseException] = None
        # False: outputs share the streams' token_ids and logprobs lists and the prompt's
        self.copy_lists = True
        self.num_cached_tokens = 0
        self.prompt_logprobs: Optional[list[Optional[dict[int, float]]]] = (
            None if streams[0].params.prompt_logprobs is None else [None])

    @property
    def finished(self) -> bool:
        for s in self.streams:  # (a loop: a server asks this per request per step)
            if s.finish_reason is None:
                return False
        return True

    def snapshot(self) -> RequestOutput:
        """The request so far: cumulative text and tokens, plus what is new since last time."""
        outputs = [s.output(self.copy_lists) for s in self.streams]
        prompt_logprobs = self.prompt_logprobs
        if self.copy_lists and prompt_logprobs is not None:
            prompt_logprobs = list(prompt_logprobs)
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outputs,
                             self.num_cached_tokens, prompt_logprobs)

    def add_prompt_logprobs(self, first: int, logprobs: np.ndarray, top_ids: np.ndarray,
                            top_logprobs: np.ndarray) -> None:
        """Prompt positions first.. (positions already held, from a recompute, are skipped)."""
        for i in range(max(0, len(self.prompt_logprobs) - first), len(logprobs)):
            row = dict(zip(top_ids[i].tolist(), top_logprobs[i].tolist()))
            row[self.prompt_token_ids[first + i]] = float(logprobs[i])
            self.prompt_logprobs.append(row)


class OutputProcessor:
    """The streams in flight, by key, and the step arrays applied to them."""

    def __init__(self, tokenizer, eos_token_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = tuple(eos_token_ids)
        self.streams: dict[int, tuple[CompletionStream, RequestState]] = {}
        self.sinks: dict = {}  # key -> the TextSink of a stream that has one
        if tokenizer is not None:
            byte_tables(tokenizer)  # made now, not in the first request's latency

    def add_request(self, request_id: str, prompt: Optional[str], prompt_token_ids: list[int],
                    params: SamplingParams, new_key: Callable[[], int]) -> RequestState:
        """A request's state, one stream per completion, each under a key from `new_key`; the
        caller submits `state.streams` to the engine (and `release`s the state if that fails)."""
        streams = [CompletionStream(i, p, self.tokenizer, prompt_token_ids, self.eos_token_ids)
                   for i, p in enumerate(per_completion(params))]
        state = RequestState(request_id, prompt, prompt_token_ids, streams)
        for stream in streams:
            stream.key = new_key()
            self.streams[stream.key] = (stream, state)
        return state

    def process(self, keys: np.ndarray, token_ids: np.ndarray, finish: np.ndarray,
                logprobs=None) -> tuple[list[RequestState], list[int]]:
        """Apply a step's entries in order. Returns the requests they advanced (each once) and
        the keys whose stop string matched: the caller aborts those in the engine."""
        touched: dict[int, RequestState] = {}
        stopped = []
        rows = zip(keys.tolist(), token_ids.tolist(), finish.tolist())
        for i, (key, token, code) in enumerate(rows):
            entry = self.streams.get(key)
            if entry is None:
                continue  # released, or finished by a stop string: stragglers
            stream, state = entry
            row = None if logprobs is None else _row_logprobs(logprobs, i, stream, token)
            if stream.add(token, code, row):
                stopped.append(key)
            if stream.finish_reason is not None:  # (not .finished: this runs per token)
                del self.streams[key]
            touched[id(state)] = state
        return list(touched.values()), stopped

    def process_prompt_logprobs(self, found: dict) -> None:
        """A step's prompt logprobs: owner -> (first position, logprobs, top ids, top logprobs)."""
        for key, (first, *arrays) in found.items():
            entry = self.streams.get(key)
            if entry is not None:
                entry[1].add_prompt_logprobs(first, *arrays)

    def release(self, state: RequestState) -> list[int]:
        """Forget a request; returns the keys of its streams still running in the engine."""
        running = []
        for stream in state.streams:
            stream.unsink()
            if self.streams.pop(stream.key, None) is not None and not stream.finished:
                running.append(stream.key)
        return running


def _row_logprobs(logprobs: tuple, i: int, stream: CompletionStream,
                  token: int) -> Optional[dict[int, float]]:
    """Entry i's {token: logprob} (the sampled token and the top-N asked), if it asked."""
    if stream.logprobs is None or token < 0:
        return None
    sampled, top_ids, top_logprobs = logprobs
    k = stream.params.logprobs
    row = dict(zip(top_ids[i, :k].tolist(), top_logprobs[i, :k].tolist()))
    row[token] = float(sampled[i])
    return row


def per_completion(params: SamplingParams) -> list[SamplingParams]:
    """n completions are n engine requests; seeded ones get seed + i, so that they differ but
    stay reproducible."""
    if params.n == 1:
        return [params]
    return [dataclasses.replace(params, n=1,  # the prompt's logprobs are the first one's
                                seed=None if params.seed is None else params.seed + i,
                                prompt_logprobs=params.prompt_logprobs if i == 0 else None)
            for i in range(params.n)]
