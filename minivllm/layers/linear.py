"""How checkpoint tensors get into parameters: each parameter's `weight_loader`, as in vLLM.

A model maps a checkpoint name to (its parameter, a shard id) and calls
`weight_loader(param, loaded, shard_id)`; parameters without one take `default_weight_loader`.
Tensor parallelism will only add the rank (tp_rank, tp_size) to these loaders: each keeps its
rank's slice of `loaded` (rows of a column-parallel layer, columns of a row-parallel one).
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
from torch import nn


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor,
                          shard_id: Optional[int] = None) -> None:
    """The whole checkpoint tensor into the whole parameter."""
    _copy(param.data, loaded)


class MergedLinear(nn.Linear):
    """Projections of the same input fused into one matmul (q/k/v, gate/up): their weights and
    biases stacked by rows, in `output_sizes` order. The checkpoint keeps them apart; loading
    shard i copies it into its rows."""

    def __init__(self, in_features: int, output_sizes: Sequence[int], bias: bool) -> None:
        super().__init__(in_features, sum(output_sizes), bias=bias)
        # Bound to the sizes, not to the module: a bound method would make a reference cycle,
        # and the weights the CPU kernels drop after packing would wait for the collector.
        loader = functools.partial(_load_rows, tuple(output_sizes))
        for param in self.parameters():
            param.weight_loader = loader


def _load_rows(output_sizes: tuple[int, ...], param: nn.Parameter, loaded: torch.Tensor,
               shard_id: int) -> None:
    offset = sum(output_sizes[:shard_id])
    _copy(param.data.narrow(0, offset, output_sizes[shard_id]), loaded)


def _copy(target: torch.Tensor, loaded: torch.Tensor) -> None:
    if target.shape != loaded.shape:  # copy_ would broadcast some mismatches silently
        raise ValueError(f"shape {tuple(loaded.shape)} where the model expects "
                         f"{tuple(target.shape)}")
    target.copy_(loaded)
