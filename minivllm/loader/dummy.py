"""Random weights with a real model's shape, for benchmarks of shapes we have no weights for.

Also home of `expected_parameters`, the Hugging Face parameter names and shapes of an
architecture, which the other loaders check checkpoints against.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Iterator

from minivllm.config import ArchConfig

if TYPE_CHECKING:  # torch only where weights are made: frontends resolve models without it
    import torch

# The real models' config.json values. smollm2-135m is the embedded model's shape and, like the
# embedded GGUF once dequantized, float32.
PRESETS: dict[str, ArchConfig] = {
    "smollm2-135m": ArchConfig(
        architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
        tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,), torch_dtype="float32"),
    "qwen2.5-0.5b": ArchConfig(
        architecture="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
        num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, head_dim=64,
        max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=True, attention_bias=True, bos_token_id=151643,
        eos_token_ids=(151645,), torch_dtype="bfloat16"),
    "llama-3-8b": ArchConfig(
        architecture="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
        tie_word_embeddings=False, bos_token_id=128000, eos_token_ids=(128001, 128009),
        torch_dtype="bfloat16"),
}


def preset(name: str) -> ArchConfig:
    """A copy of the named preset (callers may adjust it)."""
    if name not in PRESETS:
        raise ValueError(f"unknown dummy preset {name!r}; presets: {', '.join(PRESETS)} "
                         f"(or a config.json path or a Hugging Face model directory)")
    return dataclasses.replace(PRESETS[name])


def expected_parameters(arch: ArchConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter, named as transformers' *ForCausalLM state_dict."""
    h, q_out = arch.hidden_size, arch.num_attention_heads * arch.head_dim
    kv_out = arch.num_key_value_heads * arch.head_dim
    params = [("model.embed_tokens.weight", (arch.vocab_size, h))]
    for i in range(arch.num_hidden_layers):
        p = f"model.layers.{i}."
        params += [(p + "self_attn.q_proj.weight", (q_out, h)),
                   (p + "self_attn.k_proj.weight", (kv_out, h)),
                   (p + "self_attn.v_proj.weight", (kv_out, h)),
                   (p + "self_attn.o_proj.weight", (h, q_out))]
        if arch.attention_bias:
            params += [(p + "self_attn.q_proj.bias", (q_out,)),
                       (p + "self_attn.k_proj.bias", (kv_out,)),
                       (p + "self_attn.v_proj.bias", (kv_out,))]
            if arch.architecture == "llama":  # Llama's attention_bias covers o_proj, Qwen2's not
                params.append((p + "self_attn.o_proj.bias", (h,)))
        params += [(p + "mlp.gate_proj.weight", (arch.intermediate_size, h)),
                   (p + "mlp.up_proj.weight", (arch.intermediate_size, h)),
                   (p + "mlp.down_proj.weight", (h, arch.intermediate_size)),
                   (p + "input_layernorm.weight", (h,)),
                   (p + "post_attention_layernorm.weight", (h,))]
    params.append(("model.norm.weight", (h,)))
    if not arch.tie_word_embeddings:
        params.append(("lm_head.weight", (arch.vocab_size, h)))
    return params


def load_weights(arch: ArchConfig, dtype: torch.dtype, device: torch.device, seed: int
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """Deterministic random weights made on `device`: N(0, 0.02) matrices (small enough that
    activations stay finite and logits are not degenerate), ones for norms, zeros for biases."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    for name, shape in expected_parameters(arch):
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape, dtype=dtype, device=device)
        elif name.endswith(".bias"):
            yield name, torch.zeros(shape, dtype=dtype, device=device)
        else:
            yield name, torch.empty(shape, dtype=dtype, device=device).normal_(0.0, 0.02,
                                                                                generator=gen)
