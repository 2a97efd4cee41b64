"""Qwen2 / Qwen2.5: Llama's network with biases on the q/k/v projections.

`ArchConfig.attention_bias` (true for qwen2) is the only difference the forward pass needs, so
the class exists to name the architecture and to keep a place for what later Qwen versions add.
"""
from minivllm.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    pass
