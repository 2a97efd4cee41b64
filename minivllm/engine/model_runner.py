"""ModelRunner: owns the model, its paged KV cache and the sampler; runs one step's forward.

On CUDA a step's inputs go through pinned staging buffers in one asynchronous copy
(step_inputs.py), and steps replay CUDA graphs captured at start-up (cuda_graphs.py): decode
steps by batch size, the others by padded token count; a step larger than every graph runs
eagerly. The kernels are `ModelConfig.kernels`' set (layers/kernels.py), selected here once
and passed to the model.

Under async scheduling a step is sampled `in_flight()`, not waited for: its tokens land in a
pinned host buffer, and on the device in `last_tokens[req_index]`, where the next step, built
before they were known, takes its decodes' input tokens.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from minivllm.config import EngineConfig
from minivllm.core.batch import ScheduledBatch
from minivllm.distributed.group import TensorParallelGroup
from minivllm.engine.cuda_graphs import StepGraphs
from minivllm.engine.step_inputs import StepStaging, cpu_inputs, fill_placeholders
from minivllm.engine.structured_output import StepMasks
from minivllm.layers.cpu_decoder import CpuDecoder
from minivllm.layers.cpu_linear import quantization_mode, quantized_modules, use_cpu_linears
from minivllm.layers.kernels import KernelSet, select_kernels
from minivllm.layers.sampler import Sampler, SamplerOutput
from minivllm.loader import ModelSource, load_blocks, load_weights
from minivllm.models import MODEL_REGISTRY

if TYPE_CHECKING:  # rank_group imports the worker, which imports this module
    from minivllm.distributed.rank_group import RankGroup

logger = logging.getLogger(__name__)


@dataclass
class KVCacheSpec:
    num_blocks: int
    block_size: int
    bytes_per_block: int

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size


class InFlight:
    """A launched step: its sampler output on the device, its tokens on their way to the host
    (into `host`, a pinned buffer, signalling `event`; both reused every other step)."""

    def __init__(self, sampled: SamplerOutput, host: Optional[torch.Tensor],
                 event: Optional[torch.cuda.Event]) -> None:
        self.sampled = sampled
        self._event = event
        n = sampled.token_ids.shape[0]
        if host is None:  # on the CPU the step is done already
            self._tokens = sampled.token_ids.numpy()
            return
        host[:n].copy_(sampled.token_ids, non_blocking=True)
        self._tokens = host.numpy()[:n]
        event.record()

    def tokens(self) -> np.ndarray:
        """The sampled tokens, once the step is done (the loop's one wait for the device)."""
        if self._event is not None:
            self._event.synchronize()
        return self._tokens


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class ModelRunner:
    def __init__(self, config: EngineConfig, source: ModelSource, overlap: bool = False,
                 tp: TensorParallelGroup = TensorParallelGroup(),
                 ranks: Optional[RankGroup] = None) -> None:
        """`tp`: this rank's tensor-parallel group; `ranks` (rank 0 of a group, whose `tp` it
        brings): the other ranks, handed each step's batch before the forward."""
        arch = source.arch
        tp = tp if ranks is None else ranks.tp
        self.tp, self.ranks = tp, ranks
        self.device = config.model.torch_device()
        self.max_model_len = max_model_len(config, source)
        self.kernels = _sharded(select_kernels(config.model, self.device, arch), tp)
        self.dtype = self.kernels.dtype
        logger.info("%s", self.kernels.describe())
        quantization = quantization_mode(config.model.quantization, source.kind,
                                         self.kernels.cpu_linears, self.dtype)
        with torch.device(self.device), _default_dtype(self.dtype):
            self.model = MODEL_REGISTRY[arch.architecture](
                arch, self.kernels, max_position=self.max_model_len, tp=tp)
        self.model.load_weights(load_weights(source, self.dtype, self.device, config.model.seed))
        self.model.eval()
        if self.kernels.cpu_linears:
            self._use_cpu_linears(source, quantization,
                                  strict=config.model.quantization.startswith("gguf-native"))
        self.kv_spec = self._allocate_kv_cache(config)
        # What runs a step's forward: on the CPU kernels the decoder stack as one C call.
        self.step_model = (CpuDecoder(self.model, self.kernels.cpu_linears,
                                      config.scheduler.max_num_seqs)
                           if self.kernels.cpu_linears else self.model)
        self.sampler = Sampler(config.scheduler.max_num_seqs, arch.vocab_size, self.device,
                               seed=config.model.seed, argmax=self.kernels.argmax)
        logger.info("KV cache: %d blocks of %d tokens = %d tokens (%.1f MiB)",
                    self.kv_spec.num_blocks, self.kv_spec.block_size, self.kv_spec.num_tokens,
                    self.kv_spec.num_blocks * self.kv_spec.bytes_per_block / 2**20)
        self.staging = StepStaging(self.device) if self.device.type == "cuda" else None
        n = config.scheduler.max_num_seqs
        # Async scheduling: each request index's last sampled token, and a pinned buffer and an event for
        # each of the two steps that can be unresolved at once, which their tokens come back by.
        self.last_tokens = torch.zeros(n, dtype=torch.int64, device=self.device) if overlap \
            else None
        self._returns = [(torch.empty(n, dtype=torch.int64, pin_memory=True), torch.cuda.Event())
                         for _ in range(2)] if overlap and self.staging else [(None, None)]
        # Captured after the KV cache is allocated: the graphs' memory comes out of what the
        # cache budget left free.
        self.graphs = None
        if self.kernels.cuda_graphs:
            max_blocks = -(-self.max_model_len // self.kv_spec.block_size)
            self.graphs = StepGraphs(self.model, self.kernels.attention,
                                     self.kv_spec.block_size, config.scheduler.max_num_seqs,
                                     config.scheduler.max_num_batched_tokens, max_blocks,
                                     self.device, self.last_tokens,
                                     config.model.cuda_graph_mode)

    def _use_cpu_linears(self, source: ModelSource, quantization: str, strict: bool) -> None:
        """`quantization` (cpu_linear.quantization_mode) other than none: the linears keep the
        GGUF file's quantization blocks (`strict`: every one of them, else an error)."""
        model, head = self.model, self.model.lm_head
        # A tied head gets its own packed copy. Logits come out in fp32 straight from the
        # kernel's accumulators: the sampler's argmax over bf16 rows took 1.4 ms a step at 16
        # rows (0.4 in fp32), and bf16 rounding makes ties among the top logits.
        weight, bias = ((model.embed_tokens.weight, None) if head is None
                        else (head.weight, head.bias))
        model.lm_head = None  # packed with the others, as the last weight
        quantized = None if quantization == "none" else quantized_modules(
            model, load_blocks(source), strict)
        use_cpu_linears(model, self.kernels.cpu_linears, head=(weight, bias), quantized=quantized,
                        act_q8=quantization == "gguf-native-q8")

    def _allocate_kv_cache(self, config: EngineConfig) -> KVCacheSpec:
        arch, cache = self.model.arch, config.cache
        kv_heads = self.model.layers[0].self_attn.num_kv_heads  # this rank's
        per_block = (2 * arch.num_hidden_layers * cache.block_size * kv_heads
                     * arch.head_dim * torch.finfo(self.dtype).bits // 8)
        if cache.num_blocks is not None:
            num_blocks = cache.num_blocks
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            num_blocks = int(free * cache.gpu_memory_utilization) // per_block
        else:
            num_blocks = cache.cpu_kv_cache_bytes // per_block
        # Each rank sized its cache from its own memory; rank 0's scheduler hands out slots
        # that every rank must hold.
        num_blocks = self.tp.min_int(num_blocks)
        if num_blocks < 1:
            raise ValueError(f"the KV-cache budget holds no block of {per_block} bytes: "
                             f"raise cpu_kv_cache_bytes or gpu_memory_utilization")
        shape = (2, arch.num_hidden_layers, num_blocks, cache.block_size, kv_heads,
                 arch.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.model.bind_kv_cache(list(self.kv_cache[0]), list(self.kv_cache[1]))
        return KVCacheSpec(num_blocks, cache.block_size, per_block)

    @property
    def kv_cache_bytes(self) -> int:
        return self.kv_cache.numel() * self.kv_cache.element_size()

    def execute(self, batch: ScheduledBatch, masks: Optional[StepMasks] = None) -> SamplerOutput:
        """Forward the batch and sample one token for each row in `batch.sample_rows`, under
        the grammar masks of its constrained rows if any."""
        return self.sample(*self.forward(batch), masks)

    @torch.inference_mode()
    def forward(self, batch: ScheduledBatch) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """The logits of the batch's sampled rows (None on a tensor-parallel rank > 0), and
        those rows' request indices."""
        if self.ranks is not None:
            self.ranks.send(batch)
        if self.graphs is not None and self.graphs.serves(batch):
            hidden, sample_index, sample_indices = self.graphs.run(batch)
        else:
            inputs = (self.staging.stage(batch) if self.staging is not None
                      else cpu_inputs(batch))
            self.kernels.attention.prepare(inputs.meta, self.kv_spec.block_size)
            ids = inputs.input_ids
            if self.last_tokens is not None and batch.input_ids.min() < 0:
                ids = fill_placeholders(ids, self.last_tokens)
            hidden = self.step_model(ids, inputs.positions, inputs.meta)
            sample_index, sample_indices = inputs.sample_index, inputs.sample_indices
        self.hidden = hidden  # every token's, for prompt logprobs (engine/prompt_logprobs.py)
        if sample_index is not None:  # None: every token is sampled (a step of decodes)
            hidden = hidden[sample_index]
        return self.step_model.compute_logits(hidden), sample_indices

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> Optional[torch.Tensor]:
        """Logits of any hidden states (prompt logprobs); every rank of a group computes its
        vocabulary shard, so rank 0 hands them the states first."""
        if self.ranks is not None:
            self.ranks.send_hidden(hidden)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, req_indices: torch.Tensor,
               masks: Optional[StepMasks] = None) -> SamplerOutput:
        if masks is not None:
            masks.apply(logits)
        out = self.sampler.sample(logits, req_indices)
        if self.last_tokens is not None:
            self.last_tokens[req_indices] = out.token_ids
        return out

    def in_flight(self, out: SamplerOutput) -> InFlight:
        """A sampled step whose tokens the host has not waited for (async scheduling)."""
        self._returns.append(self._returns.pop(0))  # the older pair's step is resolved by now
        return InFlight(out, *self._returns[-1])


def _sharded(kernels: KernelSet, tp: TensorParallelGroup) -> KernelSet:
    """The kernel set a rank of `tp` runs: with more than one rank, the packed CPU linears and
    the one-call CPU decoder (whole weights only) and CUDA graphs (no collectives captured yet)
    are off, and the log line says so."""
    if tp.size == 1:
        return kernels
    off = [what for what, on in (("packed CPU linears and one-call CPU decoder",
                                   kernels.cpu_linears), ("CUDA graphs", kernels.cuda_graphs))
           if on]
    note = f"tensor parallel rank {tp.rank} of {tp.size}: per-layer path, torch linears" + \
        (f" ({' and '.join(off)} not sharded)" if off else "")
    # (torch's linears write logits in the model's dtype: the kernels' fp32 argmax goes too)
    return dataclasses.replace(kernels, cpu_linears=None, argmax=None, cuda_graphs=False,
                               note="; ".join(filter(None, (kernels.note, note))))


def max_model_len(config: EngineConfig, source: ModelSource) -> int:
    limit = source.arch.max_position_embeddings
    want = config.model.max_model_len or limit
    if want > limit:
        raise ValueError(f"max_model_len {want} exceeds the model's context of {limit} tokens")
    return want
