"""EngineCore: the step loop. Read it top to bottom: add, schedule, execute, update, outputs.

The seam between the core and everything above it is arrays, not objects. A caller adds a
request under an int64 `owner` it chooses (the engine process packs its client and request into
one; `LLM` counts), and each `step()` returns the step's outputs as arrays: owners, tokens,
finish codes (ipc/minivllm_ipc.h's MV_FINISH_*) and, when any row asked, logprobs in the wire
layout. One torch-free output processor (frontend/output_processor.py) turns those into text,
stop strings and finish reasons, for the engine process's clients and for `LLM` alike.

Async scheduling (on CUDA by default) overlaps the host with the GPU: a call schedules and
launches step k+1, then waits for step k's tokens, applies them (Scheduler.resolve) and returns
them, so the GPU runs step k+1 while the host applies step k, publishes it and schedules k+2.
Outputs come one call later, and a request that stops at step k has computed one wasted token
in step k+1 (discarded).

Structured outputs (structured_output.py): a constrained request waits for its grammar outside
the scheduler, and a step with constrained rows masks their logits just before sampling; the
mask is filled on a helper thread while the forward runs. Under async scheduling the mask needs
the previous step's tokens, which that thread waits for itself (from before this step's forward
is launched), and such a step is sampled at the top of the next call, so the fill overlaps the
launch, the forward and what the caller does with the outputs.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from minivllm.config import EngineConfig
from minivllm.core.scheduler import core_implementation
from minivllm.distributed.rank_group import RankGroup, rank_info
from minivllm.engine.model_runner import ModelRunner, max_model_len
from minivllm.engine.prompt_logprobs import PromptLogprobs, PromptLogprobsTracker
from minivllm.engine.structured_output import StepMasks, StructuredOutputs
from minivllm.engine.request_timings import RequestTimings
from minivllm.inputs import check_prompt
from minivllm.layers.sampler import SamplerOutput
from minivllm.loader import load_tokenizer, resolve_model
from minivllm.loader.generation_config import sampling_defaults
from minivllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# Logprobs as the wire carries them (ipc/PROTOCOL.md, "Step output"): the sampled token's
# logprob [n] (NaN where a row asked none), top ids [n, k] (-1 past what a row asked) and their
# logprobs [n, k].
Logprobs = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass
class StepOutputs:
    """One step's new tokens, one entry per sampled request (views valid until the next step)."""

    owners: np.ndarray     # int64: the handle each request was added under
    token_ids: np.ndarray  # int64
    finish: np.ndarray     # uint8 MV_FINISH_* codes: FINISH_REASONS[code] is the reason
    logprobs: Optional[Logprobs] = None
    prompt_logprobs: Optional[PromptLogprobs] = None  # owner -> the prompt positions computed

    def __len__(self) -> int:
        return len(self.owners)


_NO_OUTPUTS = StepOutputs(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint8))


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        t0 = time.perf_counter()
        self.source = resolve_model(config.model.model, config.model.load_format)
        self.tokenizer = load_tokenizer(self.source)
        self.sampling_defaults = self._sampling_defaults(config.model.generation_config)
        self.overlap = overlap = self._overlap(config)
        # Tensor parallel: the other ranks start (or join) here, each running every step.
        self.ranks = RankGroup(config, self.source.arch, max_model_len(config, self.source)) \
            if config.parallel.tensor_parallel_size > 1 else None
        try:
            self.runner = ModelRunner(config, self.source, overlap, ranks=self.ranks)
        except BaseException:
            self.close()
            raise
        self.sampler = self.runner.sampler
        self._in_flight = None  # async scheduling: the step launched last
        self._unsampled = None  # a masked step's (logits, req_indices, masks), sampled next call
        self.last_batch = None  # the batch the last step scheduled (the dashboard's events)
        self.max_model_len = self.runner.max_model_len
        spec = self.runner.kv_spec
        impl = core_implementation(config.scheduler.implementation)
        self._request_cls = impl.Request
        self.allocator = impl.BlockAllocator(
            spec.num_blocks, spec.block_size, config.scheduler.max_num_seqs,
            -(-self.max_model_len // spec.block_size), config.cache.enable_prefix_caching)
        self.scheduler = impl.Scheduler(config.scheduler, self.allocator)
        eos = set(self.source.arch.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos))
        self.grammars = StructuredOutputs(self.tokenizer, self.source.arch.vocab_size,
                                          self.eos_token_ids, self.runner.device,
                                          config.scheduler.max_num_seqs,
                                          self.runner.kernels.mask_rows)
        self._arrivals = 0
        self.timings = RequestTimings()
        self.prompt_logprobs = PromptLogprobsTracker()
        logger.info("engine ready in %.1f s: %s on %s, %s, KV cache %d blocks x %d = %d tokens, "
                    "%s scheduler%s", time.perf_counter() - t0, self.source.name,
                    self.runner.device, self.runner.dtype, spec.num_blocks, spec.block_size,
                    spec.num_tokens, config.scheduler.implementation,
                    ", async scheduling" if overlap else "")

    @staticmethod
    def _overlap(config: EngineConfig) -> bool:
        """Async scheduling: on by default on CUDA; not yet with tensor parallelism (the other
        ranks would need the in-flight step's tokens)."""
        overlap = config.scheduler.async_scheduling
        if config.parallel.tensor_parallel_size > 1:
            if overlap:
                raise ValueError("async_scheduling is not supported with "
                                 "tensor_parallel_size > 1 yet")
            return False
        return config.model.torch_device().type == "cuda" if overlap is None else overlap

    def ranks_info(self) -> list[dict]:
        """Each tensor-parallel rank's identity and KV-cache size (rank 0: this process)."""
        own = [rank_info(0, self.runner.kv_cache_bytes)]
        return own + (self.ranks.ranks_info() if self.ranks is not None else [])

    def check_ranks(self) -> None:
        """Raise RankDiedError if a tensor-parallel rank that this process spawned is gone."""
        if self.ranks is not None:
            self.ranks.check()

    def close(self) -> None:
        """Stop the other tensor-parallel ranks, if any (idempotent)."""
        if self.ranks is not None:
            self.ranks.close()

    def _sampling_defaults(self, setting: str) -> dict:
        """The generation config's sampling, for frontends to apply to requests that leave it
        unset (SamplingParams themselves are always complete)."""
        model_dir = self.source.path if self.source.kind == "hf" else None
        path, defaults = sampling_defaults(setting, model_dir)
        if defaults:
            logger.info("default sampling from %s for requests that do not set it: %s "
                        "(--generation-config vllm ignores it)", path,
                        ", ".join(f"{k}={v}" for k, v in defaults.items()))
        return defaults

    # ---- requests -----------------------------------------------------------------------
    def add_request(self, owner: int, prompt_token_ids: Sequence[int], params: SamplingParams,
                    priority: int = 0):
        """Queue a request under `owner` (an int64 unique among unfinished requests); raises
        ValueError for a prompt or owner the engine cannot take."""
        check_prompt(prompt_token_ids, self.max_model_len, self.source.arch.vocab_size)
        params.check_vocab(self.source.arch.vocab_size)
        req = self._request_cls(owner, prompt_token_ids, params, self.eos_token_ids,
                                self.max_model_len, self._arrivals, time.monotonic(), priority)
        if params.structured_outputs is None:
            self.scheduler.add_request(req)
        elif owner in self.scheduler.requests or owner in self.grammars.waiting:
            raise ValueError(f"owner {owner} is already in use")
        else:
            self.grammars.add(req)  # the scheduler gets it once its grammar is compiled
        self._arrivals += 1
        return req

    def abort_request(self, owner: int) -> bool:
        self.timings.forget(owner)
        self.prompt_logprobs.forget(owner)
        return (self.grammars.abort(owner) is not None
                or self.scheduler.abort(owner) is not None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self.grammars.waiting)

    def take_failed(self) -> list[tuple[int, str]]:
        """(owner, message) of the requests that failed outside a step's outputs (a grammar
        that does not compile) since the last call: each is finished."""
        return self.grammars.take_failed()

    # ---- the step -----------------------------------------------------------------------
    def step(self) -> StepOutputs:
        """One step: schedule, forward and sample, update. Returns its outputs as arrays."""
        if self._unsampled is not None:  # before schedule() can reuse its rows' req_indices
            logits, req_indices, masks = self._unsampled
            self._unsampled = None
            self._launched(self.runner.sample(logits, req_indices, masks), masks)
        if self.grammars.waiting:
            for req in self.grammars.take_ready():
                self.scheduler.add_request(req)
        batch, admitted = self.scheduler.schedule()
        self.last_batch = batch
        self.timings.scheduled(admitted, time.monotonic())
        for req_index in self.scheduler.take_released().tolist():  # before a req_index is reused
            self.sampler.remove_request(req_index)
            self.grammars.unbind(req_index)
        for req in admitted:
            self.sampler.add_request(req.req_index, req.params,
                                     req.token_ids[:req.num_prompt_tokens], self.eos_token_ids,
                                     req.output_token_ids)
            self.grammars.bind(req.req_index, req.owner)
        self.prompt_logprobs.admitted(admitted)
        masks = None if batch is None else self.grammars.masks(
            batch.req_indices[batch.sample_rows])
        if self.overlap:
            return self._with_prompt_logprobs(batch, self._step_overlapped(batch, masks))
        if batch is None:
            if self.grammars.waiting and not self.scheduler.has_unfinished():
                self.grammars.wait(0.01)  # nothing runs: leave the CPU to the compile
            return _NO_OUTPUTS
        sampled = self.runner.execute(batch, masks and masks.start())
        tokens = sampled.token_ids.cpu().numpy()  # the step's one device->host sync
        self.scheduler.update(tokens)
        if masks is not None:
            self.grammars.sampled(masks, lambda: tokens)
        return self._with_prompt_logprobs(batch, self._outputs(sampled))

    def _with_prompt_logprobs(self, batch, outputs: StepOutputs) -> StepOutputs:
        """`outputs` with the prompt logprobs of `batch`, the forward that just ran."""
        if batch is None or not self.prompt_logprobs:
            return outputs
        found = self.prompt_logprobs.compute(batch, self.runner.hidden,
                                             self.runner.compute_logits)
        return dataclasses.replace(outputs, prompt_logprobs=found) if found else outputs

    def _step_overlapped(self, batch, masks: Optional[StepMasks]) -> StepOutputs:
        """Launch this step, then apply the previous one's tokens while the GPU runs it. A step
        with grammar masks needs those tokens before it samples: its forward is launched, the
        tokens are applied while it runs, the fill starts, and the next call samples it."""
        done, outputs = self._in_flight, _NO_OUTPUTS
        self._in_flight = None
        if batch is not None and masks is not None and done is not None:
            masks.start()  # its thread waits for the tokens it needs while the forward launches
            logits = self.runner.forward(batch)
            outputs, done = self._resolve(done), None
            self._unsampled = (*logits, masks)
        elif batch is not None:
            self._launched(self.runner.execute(batch, masks), masks)
        if done is not None:
            outputs = self._resolve(done)
        if batch is not None:
            self.scheduler.defer()
        return outputs

    def _launched(self, sampled: SamplerOutput, masks: Optional[StepMasks]) -> None:
        """Async scheduling: `sampled` is the step in flight; its constrained rows' matchers
        advance on its tokens before the next fill."""
        self._in_flight = self.runner.in_flight(sampled)
        if masks is not None:
            self.grammars.sampled(masks, self._in_flight.tokens)

    def _resolve(self, done) -> StepOutputs:
        self.scheduler.resolve(done.tokens())
        return self._outputs(done.sampled)

    def _outputs(self, sampled: SamplerOutput) -> StepOutputs:
        s = self.scheduler
        logprobs = None
        if sampled.logprobs is not None and len(s.out_index):
            index = s.out_index
            logprobs = (sampled.logprobs[index].cpu().numpy(),
                        sampled.top_ids[index].cpu().numpy().astype(np.int32),
                        sampled.top_logprobs[index].cpu().numpy())
        self.timings.sampled(s.out_owners, time.monotonic())
        self.grammars.retire(s.out_owners, s.out_finish)
        return StepOutputs(s.out_owners, s.out_tokens, s.out_finish, logprobs)
