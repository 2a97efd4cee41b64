"""RMSNorm, with the residual add folded in (the layer's output is the next layer's residual)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        """Returns norm(x) alone, or (norm(x + residual), x + residual) when given a residual."""
        if residual is not None:
            x = x + residual
            residual = x
        # Variance in float32 like Hugging Face, so that bf16 outputs round the same way.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(x.dtype)
        return out if residual is None else (out, residual)
