"""ScheduledBatch: one step of work, as flat numpy arrays the model runner consumes directly.

This is the seam between the scheduler (Python reference or Cython) and the model runner: rows
are sequences in batch order, tokens are flattened across rows, and requests are named by their
request index, so nothing here is a per-request Python object. Two words, two things: a request's
*index* (`req_index`) is its row in the per-request tables (block tables, sampler state), held
while it runs; a *slot* is a token's position in the KV cache (`slot_mapping`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ScheduledBatch:
    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64: KV-cache slot of each token
    query_start_loc: np.ndarray  # [B+1] int64
    seq_lens: np.ndarray  # [B] int64: context length after this step
    block_tables: np.ndarray  # [B, max_blocks] int32
    req_indices: np.ndarray  # [B] int64: request index of each row
    sample_rows: np.ndarray  # [S] int64: rows whose last token yields a new token this step

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)
