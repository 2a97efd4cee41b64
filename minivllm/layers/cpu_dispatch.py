"""Whether a layer runs the CPU kernels (csrc/cpu_kernels.pyx) or plain torch.

Plain torch is the reference and what runs on GPU; the kernels serve float32 and bfloat16 on
CPUs with AVX-512. Layers decide once, when built: the model runner builds the model under
`torch.device(...)` and its dtype as torch's default, so those defaults say where it will run.
MINIVLLM_CPU_KERNELS=0 turns the kernels off (A/B timings, debugging).
"""
from __future__ import annotations

import os

import torch

from minivllm._cext import cpu_kernels

KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def cpu_kernels_apply(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the CPU kernels serve a model of this dtype on this device."""
    return (torch.device(device).type == "cpu" and dtype in KERNEL_DTYPES
            and os.environ.get("MINIVLLM_CPU_KERNELS", "1") != "0" and cpu_kernels.supported())


def cpu_kernels_for_new_layer() -> bool:
    """`cpu_kernels_apply` for a layer being built under torch's default device and dtype."""
    return cpu_kernels_apply(torch.get_default_device(), torch.get_default_dtype())
