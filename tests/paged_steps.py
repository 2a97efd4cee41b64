"""Random ragged steps over a paged KV cache, for the attention kernels' tests (Triton, CPU)."""
from __future__ import annotations

import random

import numpy as np
import torch

from minivllm.layers.attention import AttentionMetadata


def ragged_step(rng: random.Random, block_size: int, num_blocks: int):
    """Rows of one step: decodes, prefill chunks after a cached prefix (a prefix-cache hit or an
    earlier chunk), whole prompts, one-token chunks; lengths on and around block boundaries.
    Returns (cached, query) lengths per row and block tables padded as the scheduler's."""
    rows = []
    for _ in range(rng.randint(1, 6)):
        kind = rng.choice(["decode", "chunk", "prompt", "one"])
        edge = block_size * rng.randint(1, 5) + rng.choice([-1, 0, 1])
        if kind == "decode":
            rows.append((max(edge, 1) - 1 + rng.choice([0, 70]), 1))
        elif kind == "chunk":
            rows.append((max(edge, 1), rng.randint(2, 2 * block_size + 3)))
        elif kind == "prompt":
            rows.append((0, rng.randint(2, 5 * block_size)))
        else:
            rows.append((0, 1))
    need = [-(-(c + q) // block_size) for c, q in rows]
    blocks = rng.sample(range(num_blocks), sum(need))
    tables = np.zeros((len(rows), max(need) + 2), dtype=np.int32)
    for i, n in enumerate(need):
        tables[i, :n], blocks = blocks[:n], blocks[n:]
    return rows, tables


def step_metadata(rows, tables, block_size: int, device="cpu") -> AttentionMetadata:
    """The step's attention metadata, as the model runner builds it, on `device`."""
    qlens = np.array([q for _, q in rows])
    seq_lens = np.array([c + q for c, q in rows], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(qlens)]).astype(np.int64)
    slots = np.concatenate([
        [tables[i, p // block_size] * block_size + p % block_size for p in range(c, c + q)]
        for i, (c, q) in enumerate(rows)]).astype(np.int64)
    t = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    return AttentionMetadata(t(slots), t(starts), t(seq_lens), t(tables), starts, seq_lens,
                             int(qlens.max()))
