"""Linear layers on CPU through our own kernels (csrc/cpu_kernels_body.h, `linear`).

Weights are repacked once into 16-column panels that each thread streams sequentially with a
software prefetch ahead, all of them in one buffer backed by huge pages; one layout for every
ISA (`CpuKernels`). Measured on the 2-core dev machine with AVX-512, SmolLM2-135M's 30 layers
of linears (cold weights), what ran before -> ours:

    rows M               1              16             64            640
    fp32 (oneDNN)   21.5 -> 13.3   36.8 -> 21.0   85.4 -> 64.8   656 -> 617 ms
    bf16 (F.linear) 15.1 ->  6.9   22.2 -> 10.5   47.4 -> 33.2   343 -> 317 ms

At M = 1 weights stream at 30-50 GB/s (it varies with the host's other tenants); at M = 16
fp32 runs at ~170 GFLOPS of a ~190 hot-cache peak.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from minivllm._cext import cpu_kernels


class CpuLinear(nn.Module):
    """y = x W^T + b for x [M, in_features], from a packed weight (`pack_weights`), on one
    ISA's kernels. `out_dtype` float32 lets a bf16 layer write fp32 (the LM head's logits)."""

    def __init__(self, packed: torch.Tensor, out_features: int, bias: Optional[torch.Tensor],
                 kernels: cpu_kernels.CpuKernels, out_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.out_features, self.out_dtype, self.kernels = out_features, out_dtype, kernels
        self.register_buffer("packed", packed, persistent=False)
        # The kernel adds the bias in fp32 before its one rounding of the output.
        self.bias = None if bias is None else bias.detach().float().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.linear(x, self.packed, self.out_features, self.bias, self.out_dtype)


def pack_weights(weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The kernel's layout of each [N, K] weight, all in one huge-page buffer, in order."""
    shapes = [cpu_kernels.packed_shape(w) for w in weights]
    sizes = [torch.Size(s).numel() * w.element_size() for s, w in zip(shapes, weights)]
    arena = cpu_kernels.empty_huge_pages(sum(sizes))
    packed, offset = [], 0
    for w, shape, size in zip(weights, shapes, sizes):
        out = arena[offset:offset + size].view(w.dtype).view(shape)
        packed.append(cpu_kernels.pack_linear_weight(w, out))
        offset += size
    return packed


def use_cpu_linears(model: nn.Module, kernels: cpu_kernels.CpuKernels,
                    head: Optional[tuple] = None) -> None:
    """Replace every nn.Linear under `model` in place by a CpuLinear on `kernels` (their unpacked
    weights are dropped). `head` = (weight, bias) becomes `model.lm_head`, writing fp32 logits."""
    sites = list(_linears(model))
    specs = [(child.weight, child.bias, None) for _, _, child in sites]
    if head is not None:
        specs.append((head[0], head[1], torch.float32))
    packed = pack_weights([w for w, _, _ in specs])
    layers = [CpuLinear(p, w.shape[0], b, kernels, dt) for p, (w, b, dt) in zip(packed, specs)]
    for (parent, name, _), layer in zip(sites, layers):
        setattr(parent, name, layer)
    if head is not None:
        model.lm_head = layers[-1]


def _linears(module: nn.Module):
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            yield module, name, child
        else:
            yield from _linears(child)
