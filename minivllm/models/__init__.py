"""Model registry: ArchConfig.architecture -> model class."""
from minivllm.models.llama import LlamaForCausalLM

# Qwen2/2.5 is Llama's network with q/k/v biases, which ArchConfig.attention_bias turns on.
MODEL_REGISTRY = {"llama": LlamaForCausalLM, "qwen2": LlamaForCausalLM}
