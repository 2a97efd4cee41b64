"""The offline API, shaped like vLLM's: LLM(model).generate(prompts, params) / .chat(messages)."""
from __future__ import annotations

import dataclasses
import itertools
import os
from typing import Any, Iterator, Optional, Sequence, Union

from tqdm import tqdm

from minivllm import logger
from minivllm.config import (CacheConfig, EngineConfig, ModelConfig, ParallelConfig,
                             SchedulerConfig)
from minivllm.engine.engine_core import EngineCore
from minivllm.frontend.output_processor import OutputProcessor, RequestState
from minivllm.inputs import PromptType, parse_prompt, resolve_bad_words
from minivllm.outputs import RequestOutput
from minivllm.sampling_params import SamplingParams

_SCHEDULER_ALIASES = {"scheduling_policy": "policy"}


def build_engine_config(model: Optional[str] = None, **kwargs: Any) -> EngineConfig:
    """Spread flat keyword options over the per-concern dataclasses; unknown names are errors."""
    groups: dict[type, dict] = {ModelConfig: {"model": model}, CacheConfig: {},
                                SchedulerConfig: {}, ParallelConfig: {}}
    fields = {cls: {f.name for f in dataclasses.fields(cls)} for cls in groups}
    for key, value in kwargs.items():
        name = _SCHEDULER_ALIASES.get(key, key)
        owner = next((cls for cls in groups if name in fields[cls]), None)
        if owner is None:
            raise ValueError(f"unknown engine option {key!r}")
        groups[owner][name] = value
    return EngineConfig(ModelConfig(**groups[ModelConfig]), CacheConfig(**groups[CacheConfig]),
                        SchedulerConfig(**groups[SchedulerConfig]),
                        ParallelConfig(**groups[ParallelConfig]))


class LLM:
    """An engine in this process. `LLM()` loads the embedded SmolLM2-135M-Instruct.

    It drives the same EngineCore as the engine process and feeds its step arrays to the same
    output processor as AsyncEngineClient: one output path, offline and served."""

    def __init__(self, model: Optional[str] = None, chat_template: Optional[str] = None,
                 **kwargs: Any) -> None:
        """`chat_template`: a jinja template file (or its text) used instead of the model's
        by chat(); the engine's settings are build_engine_config's keywords."""
        logger.configure()
        config = build_engine_config(model, **kwargs)
        if config.parallel.data_parallel_size > 1:
            raise ValueError("data_parallel_size > 1 runs several engine processes: use "
                             "`minivllm serve --data-parallel-size N` (LLM is one engine)")
        self.engine = EngineCore(config)
        if chat_template is not None:
            if self.engine.tokenizer is None:
                raise ValueError("chat_template needs a tokenizer, and this model has none")
            if os.path.isfile(chat_template):
                with open(chat_template, encoding="utf-8") as f:
                    chat_template = f.read()
            self.engine.tokenizer.use_chat_template(chat_template)
        self.processor = OutputProcessor(self.engine.tokenizer, self.engine.eos_token_ids)
        self._owners = itertools.count()
        self._request_ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def close(self) -> None:
        """Stop the engine's other tensor-parallel ranks, if any (also done at exit)."""
        self.engine.close()

    def get_default_sampling_params(self) -> SamplingParams:
        """What a generate() without sampling params uses: the model's generation config
        (generation_config=auto|vllm|path), over SamplingParams' own defaults."""
        return SamplingParams(**self.engine.sampling_defaults)

    def generate(self, prompts: Union[PromptType, Sequence[PromptType]],
                 sampling_params: Union[None, SamplingParams, Sequence[SamplingParams]] = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """One RequestOutput per prompt, in prompt order. Prompts are text or token-id lists."""
        states: list[RequestState] = []
        for states in self._steps(prompts, sampling_params, use_tqdm):
            pass
        return [state.snapshot() for state in states]

    def stream(self, prompt: PromptType,
               sampling_params: Optional[SamplingParams] = None) -> Iterator[RequestOutput]:
        """One prompt's output after every engine step that advanced it, its new text in
        `outputs[i].delta_text`; the last one is finished. Closing the iterator early (or an
        interrupt) aborts the request."""
        for states in self._steps(prompt, sampling_params, use_tqdm=False):
            out = states[0].snapshot()
            if out.finished or any(c.delta_token_ids for c in out.outputs):
                yield out
            if out.finished:
                return

    def _steps(self, prompts: Union[PromptType, Sequence[PromptType]],
               sampling_params: Union[None, SamplingParams, Sequence[SamplingParams]],
               use_tqdm: bool) -> Iterator[list[RequestState]]:
        """Add the prompts' requests and step until the engine is idle, yielding their states
        after each step and once more at the end; however the iteration ends, nothing of
        these requests stays in the engine."""
        prompts = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params or self.get_default_sampling_params(),
                                 len(prompts))
        states: list[RequestState] = []
        requests = []  # the engine's Request of each state's first completion
        try:
            for prompt, p in zip(prompts, params):
                state = self.processor.add_request(
                    str(next(self._request_ids)), *parse_prompt(prompt, self.engine.tokenizer),
                    resolve_bad_words(p, self.engine.tokenizer), lambda: next(self._owners))
                states.append(state)
                requests.append([self.engine.add_request(stream.key, state.prompt_token_ids,
                                                         stream.params)
                                 for stream in state.streams][0])
            total = sum(len(s.streams) for s in states)
            with tqdm(total=total, desc="generating", disable=not use_tqdm) as bar:
                while self.engine.has_unfinished():
                    bar.update(self._step())
                    yield states
        finally:
            for state in states:  # a bad prompt or an interrupt: leave nothing in the engine
                for owner in self.processor.release(state):
                    self.engine.abort_request(owner)
        for state, req in zip(states, requests):
            state.num_cached_tokens = req.num_cached_tokens
        yield states

    def chat(self, messages: Union[list[dict], list[list[dict]]],
             sampling_params: Union[None, SamplingParams, Sequence[SamplingParams]] = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             tools: Optional[list[dict]] = None) -> list[RequestOutput]:
        """Apply the chat template to one conversation or a list of them (with the OpenAI-style
        `tools` offered, for a template that shows them), then generate."""
        tok = self.engine.tokenizer
        if tok is None:
            raise ValueError("chat needs a tokenizer, and this model has none: pass token ids "
                             "to generate() instead")
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts "
                             "or a list of such conversations")
        conversations = messages if isinstance(messages[0], list) else [messages]
        prompts = [tok.apply_chat_template(c, add_generation_prompt, tools)
                   for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _step(self) -> int:
        """One engine step; the processor keeps what it brought. Returns the completions it
        finished."""
        out = self.engine.step()
        for _, message in self.engine.take_failed():
            raise ValueError(message)  # _steps' finally aborts the others
        if out.prompt_logprobs:
            self.processor.process_prompt_logprobs(out.prompt_logprobs)
        if not len(out):
            return 0
        running = len(self.processor.streams)
        _, stopped = self.processor.process(out.owners, out.token_ids, out.finish,
                                            out.logprobs)
        for owner in stopped:
            self.engine.abort_request(owner)
        return running - len(self.processor.streams)


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
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} sampling params for {n} prompts")
    return params
