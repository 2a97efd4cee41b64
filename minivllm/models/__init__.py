"""Model registry: ArchConfig.architecture -> model class."""
from minivllm.models.llama import LlamaForCausalLM
from minivllm.models.qwen2 import Qwen2ForCausalLM

MODEL_REGISTRY = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM}
