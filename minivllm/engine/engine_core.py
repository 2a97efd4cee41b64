"""EngineCore: the step loop. Read it top to bottom: ingest, schedule, execute, update, publish.

This in-process core is what the offline `LLM` drives; the engine process runs the same
`step_arrays()` behind shared-memory rings.

Async scheduling (on CUDA by default) overlaps the host with the GPU: a call schedules and
launches step k+1, then waits for step k's tokens, applies them (Scheduler.resolve) and returns
them, so the GPU runs step k+1 while the host applies step k, publishes it and schedules k+2.
Outputs come one call later, and a request that stops at step k has computed one wasted token
in step k+1 (discarded).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from minivllm.config import EngineConfig
from minivllm.core.block_allocator import BlockAllocator
from minivllm.core.scheduler import FINISH_REASONS, Request, Scheduler
from minivllm.engine.model_runner import InFlight, ModelRunner
from minivllm.inputs import check_prompt
from minivllm.layers.sampler import SamplerOutput
from minivllm.loader import load_tokenizer, resolve_model
from minivllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class EngineOutput:
    """One new token of one request (a step emits one per sampled request)."""

    request_id: str
    token_id: int
    finish_reason: Optional[str]
    logprobs: Optional[dict[int, float]] = None  # sampled token and top-N, when asked


@dataclass
class StepResult:
    """A step's sampled rows as arrays (views valid until the next step)."""

    admitted: list[Request]  # requests that got a slot this step
    admitted_slots: list[int]  # their slots (a request done in its first step has none left)
    slots: np.ndarray        # slot of each sampled row
    token_ids: np.ndarray    # its new token
    finish: np.ndarray       # its finish code: FINISH_REASONS[code]
    sampled: Optional[SamplerOutput]  # logprobs, when any row asked


_NO_ROWS = np.zeros(0, dtype=np.int64)


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        t0 = time.perf_counter()
        self.source = resolve_model(config.model.model, config.model.load_format)
        self.tokenizer = load_tokenizer(self.source)
        overlap = config.scheduler.async_scheduling
        if overlap is None:
            overlap = config.model.torch_device().type == "cuda"
        self.overlap = overlap
        self.runner = ModelRunner(config, self.source, overlap)
        self._in_flight: Optional[InFlight] = None  # async scheduling: the step launched last
        self.max_model_len = self.runner.max_model_len
        spec = self.runner.kv_spec
        self.allocator = BlockAllocator(
            spec.num_blocks, spec.block_size, config.scheduler.max_num_seqs,
            -(-self.max_model_len // spec.block_size), config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.allocator, self.max_model_len,
                                   on_release=self.runner.sampler.remove_request)
        eos = set(self.source.arch.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos))
        self._arrivals = 0
        self._by_slot: list[Optional[Request]] = [None] * config.scheduler.max_num_seqs
        logger.info("engine ready in %.1f s: %s on %s, %s, KV cache %d blocks x %d = %d tokens%s",
                    time.perf_counter() - t0, self.source.name, self.runner.device,
                    self.runner.dtype, spec.num_blocks, spec.block_size, spec.num_tokens,
                    ", async scheduling" if overlap else "")

    # ---- ingest -----------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: Sequence[int],
                    params: SamplingParams, priority: int = 0) -> Request:
        check_prompt(prompt_token_ids, self.max_model_len, self.source.arch.vocab_size)
        req = Request(request_id, prompt_token_ids, params, self.eos_token_ids,
                      self.max_model_len, self._arrivals, time.monotonic(), priority)
        self._arrivals += 1
        self.scheduler.add_request(req)
        return req

    def abort_request(self, request_id: str) -> bool:
        return self.scheduler.abort(request_id) is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the step -----------------------------------------------------------------------
    def step_arrays(self) -> StepResult:
        """One step: schedule, forward and sample, update. The result is arrays, one entry per
        sampled row; the engine process publishes them without a Python object per token."""
        batch, admitted = self.scheduler.schedule()
        slots = [req.slot for req in admitted]
        for req in admitted:
            self._by_slot[req.slot] = req
            self.runner.sampler.add_request(req.slot, req.params,
                                            req.token_ids[:req.num_prompt_tokens],
                                            req.eos_ids, req.output_token_ids)
        if self.overlap:
            return self._step_overlapped(batch, admitted, slots)
        if batch is None:
            return self._result(admitted, slots, None)
        sampled = self.runner.execute(batch)
        token_ids = sampled.token_ids.cpu().numpy()  # the step's one device->host sync
        # No result tuples from the scheduler: rows name slots, and a finished request stays
        # in _by_slot until its slot is admitted again.
        self.scheduler.update_arrays(token_ids)
        return self._result(admitted, slots, sampled)

    def _step_overlapped(self, batch, admitted: list[Request], slots: list[int]) -> StepResult:
        """Launch this step, then apply the previous one's tokens while the GPU runs it."""
        done = self._in_flight
        self._in_flight = None if batch is None else self.runner.launch(batch)
        if done is not None:
            self.scheduler.resolve_arrays(done.tokens())
        if batch is not None:
            self.scheduler.defer()
        return self._result(admitted, slots, None if done is None else done.sampled)

    def _result(self, admitted: list[Request], slots: list[int],
                sampled: Optional[SamplerOutput]) -> StepResult:
        """The step's outputs; none when nothing was sampled (`sampled` None)."""
        if sampled is None:
            return StepResult(admitted, slots, _NO_ROWS, _NO_ROWS, _NO_ROWS, None)
        return StepResult(admitted, slots, self.scheduler.out_slots, self.scheduler.out_tokens,
                          self.scheduler.out_finish, sampled)

    def step(self) -> list[EngineOutput]:
        """step_arrays() as one EngineOutput per new token (the offline API's form)."""
        result = self.step_arrays()
        reqs = [self._by_slot[s] for s in result.slots.tolist()]
        if not reqs:
            return []
        logprobs = _logprob_rows(result.sampled, [r.params.logprobs for r in reqs])
        return [EngineOutput(req.request_id, token, FINISH_REASONS[code], lp)
                for req, token, code, lp in zip(reqs, result.token_ids.tolist(),
                                                 result.finish.tolist(), logprobs)]

    def request_in_slot(self, slot: int) -> Optional[Request]:
        return self._by_slot[slot]

def _logprob_rows(out: SamplerOutput, asked: list[Optional[int]]) -> list[Optional[dict]]:
    """Per sampled row: {token: logprob} for the sampled token and the top-N, if asked."""
    if out.logprobs is None or all(n is None for n in asked):
        return [None] * len(asked)
    chosen, lp = out.token_ids.tolist(), out.logprobs.tolist()
    top_ids, top_lp = out.top_ids.tolist(), out.top_logprobs.tolist()
    rows = []
    for i, n in enumerate(asked):
        if n is None:
            rows.append(None)
            continue
        row = dict(zip(top_ids[i][:n], top_lp[i][:n]))
        row[chosen[i]] = lp[i]
        rows.append(row)
    return rows
