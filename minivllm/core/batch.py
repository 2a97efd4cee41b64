"""ScheduledBatch: one step of work, as flat numpy arrays the model runner consumes directly.

This is the seam between the scheduler (Python reference or Cython) and the model runner: rows
are sequences in batch order, tokens are flattened across rows, and requests are named by their
integer slot, so nothing here is a per-request Python object.
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
    slots: np.ndarray  # [B] int64: request slot of each row
    sample_rows: np.ndarray  # [S] int64: rows whose last token yields a new token this step

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)
