"""The model's forward on CPU as one C call a step: what CUDA graphs are to the GPU path.

`CpuDecoder` takes a LlamaForCausalLM (Llama, Qwen2) whose linears were packed for one ISA's
kernels (cpu_linear.py) and whose KV caches are bound, and runs its decoder stack through
`cpu_kernels.CpuDecoder`: embedding, 30 layers of norm / qkv / rotary / paged attention / o /
norm / gate-up / SiLU / down, and the final norm in one OpenMP parallel region whose only
synchronisation is the kernels' own barriers, on activations allocated once. The module graph
stays the specification (tests/test_cpu_kernels.py holds the two to the same outputs); this
replaces the ~300 Python calls, tensor allocations and parallel regions it costs per step.
Logits come from the packed LM head into a buffer reused every step. Linears packed quantized
(cpu_linear.quantized_modules) run so inside the C call too, and a tied embedding whose head is
quantized is looked up in the head's blocks.
"""
from __future__ import annotations

import torch

from minivllm._cext import cpu_kernels
from minivllm.layers.attention import AttentionMetadata


class CpuDecoder:
    def __init__(self, model: torch.nn.Module, kernels: cpu_kernels.CpuKernels,
                 max_num_seqs: int) -> None:
        arch, layers = model.arch, model.layers
        rotary = layers[0].self_attn.rotary

        def tensors(layer) -> dict:
            attn, mlp = layer.self_attn, layer.mlp
            return dict(in_norm=layer.input_layernorm.weight.data,
                        post_norm=layer.post_attention_layernorm.weight.data,
                        qkv=attn.qkv_proj.packed, qkv_bias=attn.qkv_proj.bias,
                        o=attn.o_proj.packed, gate_up=mlp.gate_up_proj.packed,
                        down=mlp.down_proj.packed, k_cache=attn.k_cache, v_cache=attn.v_cache,
                        types=dict(qkv=attn.qkv_proj.qtype, o=attn.o_proj.qtype,
                                   gate_up=mlp.gate_up_proj.qtype, down=mlp.down_proj.qtype))

        self.head = head = model.lm_head
        # An empty embedding: the tied embedding was dropped for its quantized head.
        embed, embed_type = ((head.packed, head.qtype) if model.embed_tokens.weight.numel() == 0
                             else (model.embed_tokens.weight.data, 0))
        self.decoder = cpu_kernels.CpuDecoder(
            kernels, embed, model.norm.weight.data, rotary.cos, rotary.sin,
            [tensors(layer) for layer in layers], arch.num_attention_heads,
            arch.num_key_value_heads, arch.rms_norm_eps, embed_type, arch.vocab_size,
            head.act_q8)
        self.logits = torch.empty(max_num_seqs, arch.vocab_size, dtype=torch.float32)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor:
        """[T] token ids and positions -> [T, hidden] final hidden states (until the next call);
        `meta.prepared` is the step's AttentionPlan (CpuAttentionBackend.prepare)."""
        return self.decoder.forward(input_ids, positions, meta.prepared)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [rows, vocab], in a buffer the next step overwrites."""
        head = self.head
        return head.kernels.linear(hidden.contiguous(), head.packed, head.out_features,
                                   head.bias, torch.float32, self.logits[:hidden.shape[0]],
                                   qtype=head.qtype, act_q8=head.act_q8)
