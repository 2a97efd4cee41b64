"""fp32 linear layers on CPU through oneDNN instead of MKL's sgemm.

Measured on the 2-core dev machine (60 cold [3072, 576] weights): MKL's sgemm runs the skinny
decode shapes at 7-12 GB/s of weights, oneDNN's prepacked inner product 1.6-2.3x faster at
M = 1..16. bf16 already goes through oneDNN in F.linear, so only fp32 is swapped.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class OneDNNLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        super().__init__()
        self.out_features = weight.shape[0]
        self.weight = weight.detach().contiguous().to_mkldnn()  # prepacked once
        self.bias = None if bias is None else bias.detach().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The pointwise op takes a dense input: no per-call conversion to oneDNN's layout.
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def use_onednn_linears(model: nn.Module) -> None:
    """Replace every fp32 nn.Linear under `model` in place."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear) and child.weight.dtype == torch.float32:
            setattr(model, name, OneDNNLinear(child.weight, child.bias))
        else:
            use_onednn_linears(child)
