"""Llama (SmolLM2, Llama 2/3) on the paged KV cache. Qwen2 is the same network with q/k/v biases.

Input is one flattened varlen batch: `input_ids` and `positions` are [T] for all sequences of
the step together; attention finds each sequence's run through `AttentionMetadata`.
q/k/v and gate/up projections are fused into one matmul each (fewer, larger GEMMs); the
checkpoint's separate tensors load into them as shards (`load_weights`, minivllm/layers/linear.py).
The kernel set (minivllm/layers/kernels.py) gives attention and the norm, rotary and activation
layers their kernels; on CPU the model runner also swaps in its linears (layers/cpu_linear.py).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from minivllm.config import ArchConfig
from minivllm.layers.activation import SiluAndMul
from minivllm.layers.attention import AttentionBackend, AttentionMetadata
from minivllm.layers.kernels import KernelSet
from minivllm.layers.linear import MergedLinear, default_weight_loader
from minivllm.layers.norm import RMSNorm
from minivllm.layers.rotary import RotaryEmbedding


class Attention(nn.Module):
    def __init__(self, arch: ArchConfig, rotary: RotaryEmbedding, backend: AttentionBackend) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = arch.num_attention_heads, arch.num_key_value_heads
        self.head_dim = arch.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(arch.hidden_size, [self.q_size, self.kv_size, self.kv_size],
                                     bias=arch.attention_bias)
        self.o_proj = nn.Linear(self.q_size, arch.hidden_size, bias=False)
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
    def __init__(self, arch: ArchConfig, kernels: KernelSet) -> None:
        super().__init__()
        self.gate_up_proj = MergedLinear(arch.hidden_size, [arch.intermediate_size] * 2, bias=False)
        self.down_proj = nn.Linear(arch.intermediate_size, arch.hidden_size, bias=False)
        self.act_fn = SiluAndMul(kernels.fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, arch: ArchConfig, rotary: RotaryEmbedding, kernels: KernelSet) -> None:
        super().__init__()
        self.self_attn = Attention(arch, rotary, kernels.attention)
        self.mlp = MLP(arch, kernels)
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

    def __init__(self, arch: ArchConfig, kernels: KernelSet, max_position: int) -> None:
        super().__init__()
        self.arch = arch
        rotary = RotaryEmbedding(arch.head_dim, max_position, arch.rope_theta, arch.rope_scaling,
                                 kernels.fused)
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(arch, rotary, kernels)
                                    for _ in range(arch.num_hidden_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, kernels.fused)
        self.lm_head = None if arch.tie_word_embeddings else \
            nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """[T] token ids and positions -> [T, hidden] final hidden states."""
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:  # tied to the embedding
            return F.linear(hidden, self.embed_tokens.weight)
        return self.lm_head(hidden)

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
