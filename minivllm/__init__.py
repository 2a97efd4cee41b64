"""minivllm: a small, fast LLM inference engine built the way vLLM is built.

Public names load lazily, so that processes which never run a model (API servers, clients)
can import `minivllm.*` without importing torch.
"""
import importlib

__version__ = "0.1.0"
_PUBLIC = {"LLM": "minivllm.llm", "SamplingParams": "minivllm.sampling_params",
           "StructuredOutputsParams": "minivllm.sampling_params",
           "RequestOutput": "minivllm.outputs", "CompletionOutput": "minivllm.outputs"}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'minivllm' has no attribute {name!r}")
