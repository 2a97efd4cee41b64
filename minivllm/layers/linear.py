"""How checkpoint tensors get into parameters: each parameter's `weight_loader`, as in vLLM; and
the tensor-parallel linears, which keep their rank's slice of each checkpoint tensor.

A model maps a checkpoint name to (its parameter, a shard id) and calls
`weight_loader(param, loaded, shard_id)`; parameters without one take `default_weight_loader`.
Under tensor parallelism a column-parallel layer keeps rows of the checkpoint's weight (its
output features: heads, FFN rows) and needs no communication; a row-parallel layer keeps the
matching columns (its input features), so each rank's output is a partial sum that an
all-reduce completes. A group of one keeps whole tensors: the single-process model is the
same code.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from minivllm.distributed.group import TensorParallelGroup


class Shard(NamedTuple):
    """This rank's rows [start, start + size) of a checkpoint dimension of `total`."""

    start: int
    size: int
    total: int

    @classmethod
    def of(cls, tp: TensorParallelGroup, total: int, what: str) -> "Shard":
        return cls(*tp.shard(total, what), total)


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor,
                          shard_id: Optional[int] = None) -> None:
    """The whole checkpoint tensor into the whole parameter."""
    _copy(param.data, loaded)


class MergedColumnLinear(nn.Linear):
    """Projections of the same input fused into one matmul (q/k/v, gate/up): their weights and
    biases stacked by rows, in `shards` order, each shard being this rank's rows of one
    checkpoint projection. The checkpoint keeps them apart; loading shard i copies its rows."""

    def __init__(self, in_features: int, shards: Sequence[Shard], bias: bool) -> None:
        super().__init__(in_features, sum(s.size for s in shards), bias=bias)
        # Bound to the shards, not to the module: a bound method would make a reference cycle,
        # and the weights the CPU kernels drop after packing would wait for the collector.
        loader = functools.partial(_load_rows, tuple(shards))
        for param in self.parameters():
            param.weight_loader = loader


class RowParallelLinear(nn.Linear):
    """y = x W^T over this rank's input features `shard`, summed over the ranks (no bias: the
    models' row-parallel projections, o_proj and down_proj, have none)."""

    def __init__(self, shard: Shard, out_features: int, tp: TensorParallelGroup) -> None:
        super().__init__(shard.size, out_features, bias=False)
        self.tp = tp
        self.weight.weight_loader = functools.partial(_load_columns, shard)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(F.linear(x, self.weight))


def _load_rows(shards: tuple[Shard, ...], param: nn.Parameter, loaded: torch.Tensor,
               shard_id: int) -> None:
    shard = shards[shard_id]
    offset = sum(s.size for s in shards[:shard_id])
    _copy(param.data.narrow(0, offset, shard.size), _narrow(loaded, 0, shard))


def _load_columns(shard: Shard, param: nn.Parameter, loaded: torch.Tensor,
                  shard_id: Optional[int] = None) -> None:
    _copy(param.data, _narrow(loaded, 1, shard))


def _narrow(loaded: torch.Tensor, dim: int, shard: Shard) -> torch.Tensor:
    if loaded.dim() <= dim or loaded.shape[dim] != shard.total:
        want = list(loaded.shape) + [1] * (dim + 1 - loaded.dim())
        want[dim] = shard.total
        raise ValueError(f"shape {tuple(loaded.shape)} where the model expects {tuple(want)}")
    return loaded.narrow(dim, shard.start, shard.size)


def _copy(target: torch.Tensor, loaded: torch.Tensor) -> None:
    if target.shape != loaded.shape:  # copy_ would broadcast some mismatches silently
        raise ValueError(f"shape {tuple(loaded.shape)} where the model expects "
                         f"{tuple(target.shape)}")
    target.copy_(loaded)
