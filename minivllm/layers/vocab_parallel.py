"""The vocabulary split across tensor-parallel ranks: the embedding and the LM head.

Each rank holds `per_rank = ceil(vocab / size)` rows of the table, rank r the ids
[r * per_rank, (r + 1) * per_rank); the last rank's rows past the vocabulary stay zero. The
embedding looks up the ids in its range (zeros elsewhere) and an all-reduce sums the ranks'
rows into each token's one embedding. The LM head multiplies by the same rows (a tied head is
the embedding's own table) and rank 0 gathers the vocabulary shards of the logits, cutting
the padding. A group of one holds the whole table.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from minivllm.distributed.group import TensorParallelGroup


def _rows(vocab_size: int, tp: TensorParallelGroup) -> tuple[int, int]:
    """(first id, rows) of this rank's slice of the table (padded past the vocabulary)."""
    per_rank = -(-vocab_size // tp.size)
    return tp.rank * per_rank, per_rank


def _load_vocab_rows(start: int, vocab_size: int, param: nn.Parameter, loaded: torch.Tensor,
                     shard_id: Optional[int] = None) -> None:
    if loaded.dim() != 2 or loaded.shape[0] != vocab_size or loaded.shape[1] != param.shape[1]:
        raise ValueError(f"shape {tuple(loaded.shape)} where the model expects "
                         f"({vocab_size}, {param.shape[1]})")
    n = max(0, min(param.shape[0], vocab_size - start))
    param.data.zero_()
    param.data[:n].copy_(loaded[start:start + n])


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallelGroup) -> None:
        super().__init__()
        self.tp, self.vocab_size = tp, vocab_size
        self.start, rows = _rows(vocab_size, tp)
        self.weight = nn.Parameter(torch.empty(rows, hidden_size), requires_grad=False)
        self.weight.weight_loader = functools.partial(_load_vocab_rows, self.start, vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(x.masked_fill_(outside.unsqueeze(-1), 0))


class VocabParallelHead(nn.Linear):
    """The untied LM head: this rank's vocabulary rows of the output projection."""

    def __init__(self, hidden_size: int, vocab_size: int, tp: TensorParallelGroup) -> None:
        start, rows = _rows(vocab_size, tp)
        super().__init__(hidden_size, rows, bias=False)
        self.weight.weight_loader = functools.partial(_load_vocab_rows, start, vocab_size)


def gather_logits(local: torch.Tensor, vocab_size: int, tp: TensorParallelGroup
                  ) -> Optional[torch.Tensor]:
    """[rows, vocab] logits on rank 0 from every rank's [rows, per_rank] (None elsewhere)."""
    if tp.size == 1:
        return local
    full = tp.gather_last_dim(local)
    return None if full is None else full[:, :vocab_size]
