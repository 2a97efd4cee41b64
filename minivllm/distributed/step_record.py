"""A step's batch arrays as one flat record, the bytes rank 0 hands to the other ranks.

    int64 header[8]: kind (STEP or STOP), T tokens, B rows, max_blocks, S sampled rows, 0, 0, 0
    int64 input_ids[T], positions[T], slot_mapping[T], query_start_loc[B+1], seq_lens[B],
          req_indices[B], sample_rows[S]
    int32 block_tables[B * max_blocks] (padded to 8 bytes)

No pickling: the arrays are copied in and viewed back out (native byte order: every rank of a
group runs the same build).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from minivllm.core.batch import ScheduledBatch

STEP, STOP = 0, 1
_HEADER = 8
_INT64_FIELDS = ("input_ids", "positions", "slot_mapping", "query_start_loc", "seq_lens",
                 "req_indices", "sample_rows")


def encode_step(batch: ScheduledBatch) -> np.ndarray:
    """The record of `batch` (a uint8 array)."""
    tables = np.ascontiguousarray(batch.block_tables, dtype=np.int32)
    parts = [np.asarray(getattr(batch, f), dtype=np.int64) for f in _INT64_FIELDS]
    n64 = sum(p.size for p in parts)
    out = np.zeros(_HEADER + n64 + -(-tables.size // 2), dtype=np.int64)
    out[:5] = (STEP, batch.num_tokens, batch.num_seqs, tables.shape[1], len(batch.sample_rows))
    np.concatenate(parts, out=out[_HEADER:_HEADER + n64])
    out[_HEADER + n64:].view(np.int32)[:tables.size] = tables.reshape(-1)
    return out.view(np.uint8)


def encode_stop() -> np.ndarray:
    out = np.zeros(_HEADER, dtype=np.int64)
    out[0] = STOP
    return out.view(np.uint8)


def decode_step(record: bytes) -> Optional[ScheduledBatch]:
    """The batch of a STEP record, or None for STOP; ValueError for anything else."""
    if len(record) < 8 * _HEADER or len(record) % 8:
        raise ValueError(f"a step record is a multiple of 8 bytes >= {8 * _HEADER}, "
                         f"got {len(record)}")
    words = np.frombuffer(record, dtype=np.int64).copy()  # writable: torch wraps these
    kind, t, b, max_blocks, s = (int(v) for v in words[:5])
    if kind == STOP:
        return None
    sizes = (t, t, t, b + 1, b, b, s)
    n64 = sum(sizes)
    if kind != STEP or min(sizes) < 0 or max_blocks < 0 or \
            len(words) != _HEADER + n64 + -(-(b * max_blocks) // 2):
        raise ValueError(f"malformed step record: header {words[:5].tolist()}, "
                         f"{len(record)} bytes")
    bounds = np.cumsum((_HEADER,) + sizes)
    arrays = {f: words[lo:hi] for f, lo, hi in zip(_INT64_FIELDS, bounds[:-1], bounds[1:])}
    tables = words[_HEADER + n64:].view(np.int32)[:b * max_blocks].reshape(b, max_blocks)
    return ScheduledBatch(block_tables=tables, **arrays)
