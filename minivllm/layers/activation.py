"""SiLU-and-multiply, the gated MLP's activation: silu(gate) * up from one fused projection.

On CPU one kernel call replaces chunk + silu + mul: per step of 16 decode rows, 30 calls took
0.56 ms as torch ops, 0.27 ms as the kernel (fp32; bf16 0.69 -> 0.43).
On CUDA the layer runs a fused Triton kernel instead (triton_fused.py; gains measured there).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minivllm._cext import cpu_kernels
from minivllm.layers.cpu_dispatch import cpu_kernels_for_new_layer
from minivllm.layers.gpu_dispatch import triton_kernels_for_new_layer


class SiluAndMul(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.use_cpu_kernel = cpu_kernels_for_new_layer()
        self.triton_kernels = triton_kernels_for_new_layer()  # None: not on the GPU

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[T, 2F] (gate | up) -> [T, F]."""
        if self.use_cpu_kernel:
            return cpu_kernels.silu_and_mul(gate_up)
        if self.triton_kernels is not None:
            return self.triton_kernels.silu_and_mul(gate_up)
        return self.forward_native(gate_up)

    @staticmethod
    def forward_native(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
