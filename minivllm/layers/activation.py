"""SiLU-and-multiply, the gated MLP's activation: silu(gate) * up from one fused projection.

On CPU one kernel call replaces chunk + silu + mul: per step of 16 decode rows, 30 calls took
0.56 ms as torch ops, 0.27 ms as the kernel (fp32; bf16 0.69 -> 0.43).
On CUDA the kernel set gives a fused Triton kernel instead (triton_fused.py; gains measured there).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from minivllm.layers.kernels import FusedOps


class SiluAndMul(nn.Module):
    def __init__(self, fused: Optional[FusedOps] = None) -> None:
        super().__init__()
        self.fused = fused  # the kernel set's; None: torch ops

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[T, 2F] (gate | up) -> [T, F]."""
        if self.fused is not None:
            return self.fused.silu_and_mul(gate_up)
        return self.forward_native(gate_up)

    @staticmethod
    def forward_native(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
