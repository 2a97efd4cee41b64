"""Llama (SmolLM2, Llama 2/3) on the paged KV cache. Qwen2 is the same network with q/k/v biases.

Input is one flattened varlen batch: `input_ids` and `positions` are [T] for all sequences of
the step together; attention finds each sequence's run through `AttentionMetadata`.
q/k/v and gate/up projections are fused into one matmul each (fewer, larger GEMMs); the
checkpoint's separate tensors load into them as shards (`load_weights`, minivllm/layers/linear.py).
The kernel set (minivllm/layers/kernels.py) gives attention and the norm, rotary and activation
layers their kernels; on CPU the model runner also swaps in its linears (layers/cpu_linear.py).

Under tensor parallelism (`tp`, a group of more than one rank) each rank holds its share of the
heads and FFN rows (column-parallel qkv and gate/up, row-parallel o and down, followed by an
all-reduce) and of the vocabulary (layers/vocab_parallel.py). KV heads are split like the query
heads; with fewer KV heads than ranks each rank keeps the one KV head its query heads use.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from minivllm.config import ArchConfig
from minivllm.layers.activation import SiluAndMul
from minivllm.layers.attention import AttentionBackend, AttentionMetadata
from minivllm.layers.kernels import KernelSet
from minivllm.distributed.group import TensorParallelGroup
from minivllm.layers.linear import (MergedColumnLinear, RowParallelLinear, Shard,
                                    default_weight_loader)
from minivllm.layers.norm import RMSNorm
from minivllm.layers.rotary import RotaryEmbedding
from minivllm.layers.vocab_parallel import (VocabParallelEmbedding, VocabParallelHead,
                                            gather_logits)


def kv_head_shard(arch: ArchConfig, tp: TensorParallelGroup) -> Shard:
    """This rank's KV heads: an equal share, or with fewer KV heads than ranks the one that
    its query heads attend with (replicated on size / num_kv_heads ranks)."""
    kv = arch.num_key_value_heads
    if kv >= tp.size:
        return Shard.of(tp, kv, "num_key_value_heads")
    if tp.size % kv:
        raise ValueError(f"tensor_parallel_size {tp.size} is neither a divisor nor a multiple "
                         f"of num_key_value_heads ({kv})")
    return Shard(tp.rank // (tp.size // kv), 1, kv)


class Attention(nn.Module):
    def __init__(self, arch: ArchConfig, rotary: RotaryEmbedding, backend: AttentionBackend,
                 tp: TensorParallelGroup) -> None:
        super().__init__()
        d = self.head_dim = arch.head_dim
        heads, kv_heads = (Shard.of(tp, arch.num_attention_heads, "num_attention_heads"),
                           kv_head_shard(arch, tp))
        self.num_heads, self.num_kv_heads = heads.size, kv_heads.size
        self.q_size = self.num_heads * d
        self.kv_size = self.num_kv_heads * d
        q, kv = (Shard(s.start * d, s.size * d, s.total * d) for s in (heads, kv_heads))
        self.qkv_proj = MergedColumnLinear(arch.hidden_size, [q, kv, kv],
                                           bias=arch.attention_bias)
        self.o_proj = RowParallelLinear(q, arch.hidden_size, tp)
        self.rotary, self.backend = rotary, backend
        self.scale = self.head_dim ** -0.5
        self.k_cache = self.v_cache = torch.empty(0)  # bound by the model runner

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata):
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary(positions, q.view(T, self.num_heads, self.head_dim),
                           k.view(T, self.num_kv_heads, self.head_dim))
        out = self.backend.forward(q, k, v.view(T, self.num_kv_heads, self.head_dim),
                                   self.k_cache, self.v_cache, meta, self.scale)
        return self.o_proj(out.reshape(T, self.q_size))


class MLP(nn.Module):
    def __init__(self, arch: ArchConfig, kernels: KernelSet, tp: TensorParallelGroup) -> None:
        super().__init__()
        rows = Shard.of(tp, arch.intermediate_size, "intermediate_size")
        self.gate_up_proj = MergedColumnLinear(arch.hidden_size, [rows, rows], bias=False)
        self.down_proj = RowParallelLinear(rows, arch.hidden_size, tp)
        self.act_fn = SiluAndMul(kernels.fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, arch: ArchConfig, rotary: RotaryEmbedding, kernels: KernelSet,
                 tp: TensorParallelGroup) -> None:
        super().__init__()
        self.self_attn = Attention(arch, rotary, kernels.attention, tp)
        self.mlp = MLP(arch, kernels, tp)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, kernels.fused)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps,
                                                kernels.fused)

    def forward(self, positions, x, residual, meta):
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    # Checkpoint projection -> (our fused parameter, its shard), as nano-vllm names it.
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, arch: ArchConfig, kernels: KernelSet, max_position: int,
                 tp: TensorParallelGroup = TensorParallelGroup()) -> None:
        super().__init__()
        self.arch, self.tp = arch, tp
        rotary = RotaryEmbedding(arch.head_dim, max_position, arch.rope_theta, arch.rope_scaling,
                                 kernels.fused)
        self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(arch, rotary, kernels, tp)
                                    for _ in range(arch.num_hidden_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, kernels.fused)
        self.lm_head = None if arch.tie_word_embeddings else \
            VocabParallelHead(arch.hidden_size, arch.vocab_size, tp)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """[T] token ids and positions -> [T, hidden] final hidden states."""
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> Optional[torch.Tensor]:
        """[rows, vocab] logits (on rank 0 of a tensor-parallel group; None on the others)."""
        if self.lm_head is None:  # tied to the embedding
            local = F.linear(hidden, self.embed_tokens.weight)
        else:
            local = self.lm_head(hidden)
        return gather_logits(local, self.arch.vocab_size, self.tp)

    def bind_kv_cache(self, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> None:
        for layer, k, v in zip(self.layers, k_caches, v_caches):
            layer.self_attn.k_cache, layer.self_attn.v_cache = k, v

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Fill every parameter from Hugging Face-named tensors (as `minivllm.loader` yields
        them), each through its parameter's weight_loader."""
        params = dict(self.named_parameters())
        unfilled = set(params)
        for hf_name, tensor in weights:
            name, shard = hf_name.removeprefix("model."), None
            for part, (fused, shard_id) in self.packed_modules_mapping.items():
                if f".{part}." in name:
                    name, shard = name.replace(f".{part}.", f".{fused}."), shard_id
                    break
            if name not in params:
                raise ValueError(f"checkpoint tensor {hf_name!r} has no place in this model")
            param = params[name]
            try:
                getattr(param, "weight_loader", default_weight_loader)(param, tensor, shard)
            except ValueError as e:
                raise ValueError(f"checkpoint tensor {hf_name!r}: {e}") from None
            unfilled.discard(name)
        if unfilled:
            raise ValueError(f"checkpoint lacks {len(unfilled)} parameter(s), "
                             f"e.g. {sorted(unfilled)[:3]}")
