"""The offline API, shaped like vLLM's: LLM(model).generate(prompts, params) / .chat(messages)."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence, Union

from tqdm import tqdm

from minivllm import logger
from minivllm.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from minivllm.core.request import Request
from minivllm.engine.engine_core import EngineCore, EngineOutput
from minivllm.inputs import PromptType, parse_prompt
from minivllm.outputs import CompletionOutput, RequestOutput
from minivllm.sampling_params import SamplingParams

_SCHEDULER_ALIASES = {"scheduling_policy": "policy"}


def build_engine_config(model: Optional[str] = None, **kwargs: Any) -> EngineConfig:
    """Spread flat keyword options over the per-concern dataclasses; unknown names are errors."""
    groups: dict[type, dict] = {ModelConfig: {"model": model}, CacheConfig: {},
                                SchedulerConfig: {}}
    fields = {cls: {f.name for f in dataclasses.fields(cls)} for cls in groups}
    for key, value in kwargs.items():
        name = _SCHEDULER_ALIASES.get(key, key)
        owner = next((cls for cls in groups if name in fields[cls]), None)
        if owner is None:
            raise ValueError(f"unknown engine option {key!r}")
        groups[owner][name] = value
    return EngineConfig(ModelConfig(**groups[ModelConfig]), CacheConfig(**groups[CacheConfig]),
                        SchedulerConfig(**groups[SchedulerConfig]))


class LLM:
    """An engine in this process. `LLM()` loads the embedded SmolLM2-135M-Instruct."""

    def __init__(self, model: Optional[str] = None, **kwargs: Any) -> None:
        logger.configure()
        self.engine = EngineCore(build_engine_config(model, **kwargs))
        self._next_id = 0

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Union[PromptType, Sequence[PromptType]],
                 sampling_params: Union[None, SamplingParams, Sequence[SamplingParams]] = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """One RequestOutput per prompt, in prompt order. Prompts are text or token-id lists."""
        prompts = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(prompts))
        pending: dict[str, _Pending] = {}
        try:
            outputs = [self._add(*self._tokenize(prompt), p, pending)
                       for prompt, p in zip(prompts, params)]
        except ValueError:
            for rid in pending:  # a bad prompt rejects the whole call: queue nothing
                self.engine.abort_request(rid)
            raise
        self._run(pending, use_tqdm)
        return outputs

    def chat(self, messages: Union[list[dict], list[list[dict]]],
             sampling_params: Union[None, SamplingParams, Sequence[SamplingParams]] = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        tok = self._need_tokenizer("chat")
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts "
                             "or a list of such conversations")
        conversations = messages if isinstance(messages[0], list) else [messages]
        prompts = [tok.apply_chat_template(c, add_generation_prompt=add_generation_prompt)
                   for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    # ---- internals -----------------------------------------------------------------------
    def _tokenize(self, prompt: PromptType) -> tuple[Optional[str], list[int]]:
        return parse_prompt(prompt, self.engine.tokenizer)

    def _need_tokenizer(self, what: str):
        if self.engine.tokenizer is None:
            raise ValueError(f"{what} need a tokenizer, and this model has none: "
                             f"pass token ids instead")
        return self.engine.tokenizer

    def _add(self, text: Optional[str], ids: list[int], params: SamplingParams,
             pending: dict[str, "_Pending"]) -> RequestOutput:
        rid = str(self._next_id)
        self._next_id += 1
        out = RequestOutput(rid, text, ids)
        for i in range(params.n):
            # n samples of one prompt: distinct seeds so they differ but stay reproducible
            p = params if params.n == 1 else dataclasses.replace(
                params, n=1, seed=None if params.seed is None else params.seed + i)
            comp = CompletionOutput(i, "", [], logprobs=[] if p.logprobs is not None else None)
            req = self.engine.add_request(f"{rid}-{i}", ids, p)
            pending[req.request_id] = _Pending(out, comp, p, req)
            out.outputs.append(comp)
        return out

    def _run(self, pending: dict[str, "_Pending"], use_tqdm: bool) -> None:
        bar = tqdm(total=len(pending), desc="generating", disable=not use_tqdm)
        try:
            while self.engine.has_unfinished():
                for ev in self.engine.step():
                    if self._apply(ev, pending[ev.request_id]):
                        bar.update(1)
        finally:
            bar.close()
            for rid, p in pending.items():
                if p.comp.finish_reason is None:  # interrupted: leave nothing queued in the engine
                    self.engine.abort_request(rid)
        for p in pending.values():
            p.comp.text = self._finalize_text(p.params, p.comp)
            p.out.num_cached_tokens = p.req.num_cached_tokens

    def _apply(self, ev: EngineOutput, p: "_Pending") -> bool:
        comp = p.comp
        comp.token_ids.append(ev.token_id)
        if ev.logprobs is not None:
            comp.logprobs.append(ev.logprobs)
            comp.cumulative_logprob = (comp.cumulative_logprob or 0.0) + ev.logprobs[ev.token_id]
        comp.finish_reason = ev.finish_reason
        if ev.finish_reason == "stop" and ev.token_id not in self.engine.eos_token_ids:
            comp.stop_reason = ev.token_id
        if ev.finish_reason is None and p.params.stop and self._stop_string(p.params, comp):
            self.engine.abort_request(ev.request_id)
            comp.finish_reason = "stop"
        return comp.finish_reason is not None

    def _stop_string(self, params: SamplingParams, comp: CompletionOutput) -> bool:
        text = self._decode(params, comp.token_ids)
        hit = next((s for s in params.stop if s in text), None)
        comp.stop_reason = hit
        return hit is not None

    def _finalize_text(self, params: SamplingParams, comp: CompletionOutput) -> str:
        text = self._decode(params, comp.token_ids)
        if isinstance(comp.stop_reason, str):
            text = text[:text.index(comp.stop_reason)]
        return text

    def _decode(self, params: SamplingParams, ids: list[int]) -> str:
        tok = self.engine.tokenizer
        return "" if tok is None else tok.decode(ids, skip_special_tokens=params.skip_special_tokens)


@dataclasses.dataclass
class _Pending:
    out: RequestOutput
    comp: CompletionOutput
    params: SamplingParams
    req: Request


def _as_prompt_list(prompts) -> list:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, Sequence) and prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt given as token ids
    if not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts must be a string, a list of token ids, or a non-empty list "
                         "of those")
    return list(prompts)


def _as_params_list(params, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} sampling params for {n} prompts")
    return params
