"""Whether a layer runs the fused Triton kernels (minivllm/layers/triton_fused.py) or plain torch.

As with the CPU kernels (cpu_dispatch.py), layers decide once, when built: the model runner
builds the model under `torch.device(...)`, so a CUDA default device means the GPU. The kernels'
module is imported only then: importing triton costs CPU-only processes time, and Triton reads
its interpreter switch (TRITON_INTERPRET, used by the tests) when kernels are defined.
MINIVLLM_TRITON_KERNELS=0 turns them off (A/B timings, debugging).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType
from typing import Optional

import torch


def triton_kernels_for_new_layer() -> Optional[ModuleType]:
    """The triton_fused module for a layer being built on a CUDA default device, else None."""
    if (torch.get_default_device().type != "cuda" or importlib.util.find_spec("triton") is None
            or os.environ.get("MINIVLLM_TRITON_KERNELS", "1") == "0"):
        return None
    return importlib.import_module("minivllm.layers.triton_fused")
