"""What rank 0 hands to the other ranks, as flat records: a step's batch arrays, hidden states
to compute logits of (prompt logprobs), or STOP.

    int64 header[8]: kind (STEP, LOGITS or STOP), then
      STEP:   T tokens, B rows, max_blocks, S sampled rows, 0, 0, 0
              int64 input_ids[T], positions[T], slot_mapping[T], query_start_loc[B+1],
                    seq_lens[B], req_indices[B], sample_rows[S]
              int32 block_tables[B * max_blocks] (padded to 8 bytes)
      LOGITS: rows, columns, dtype (_DTYPES index), 0, 0, 0, 0
              the [rows, columns] hidden states' bytes (padded to 8 bytes)

No pickling: the arrays are copied in and viewed back out (native byte order: every rank of a
group runs the same build).
"""
from __future__ import annotations

from typing import Union

import numpy as np
import torch

from minivllm.core.batch import ScheduledBatch

STEP, STOP, LOGITS = 0, 1, 2
_HEADER = 8
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INT64_FIELDS = ("input_ids", "positions", "slot_mapping", "query_start_loc", "seq_lens",
                 "req_indices", "sample_rows")


def largest_record(max_tokens: int, max_seqs: int, max_blocks: int, logits_rows: int,
                   hidden_size: int) -> int:
    """Bytes of the largest record an engine with these limits sends: a step of `max_tokens`
    tokens over `max_seqs` rows with whole block tables, or `logits_rows` fp32 hidden states."""
    step = 8 * (_HEADER + 3 * max_tokens + 3 * max_seqs + 1 + max_seqs) + 4 * max_seqs * max_blocks
    return max(step + 8, 8 * _HEADER + 4 * logits_rows * hidden_size)


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


def encode_logits(hidden: torch.Tensor) -> np.ndarray:
    """The record of hidden states [rows, columns] whose logits every rank computes."""
    raw = hidden.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
    out = np.zeros(_HEADER + -(-raw.size // 8), dtype=np.int64)
    out[:3] = (LOGITS, *hidden.shape)
    out[3] = _DTYPES.index(hidden.dtype)
    out[_HEADER:].view(np.uint8)[:raw.size] = raw
    return out.view(np.uint8)


def decode_record(record: bytes) -> Union[ScheduledBatch, torch.Tensor, None]:
    """A STEP record's batch, a LOGITS record's hidden states, or None for STOP; ValueError
    for anything else."""
    if len(record) < 8 * _HEADER or len(record) % 8:
        raise ValueError(f"a step record is a multiple of 8 bytes >= {8 * _HEADER}, "
                         f"got {len(record)}")
    words = np.frombuffer(record, dtype=np.int64).copy()  # writable: torch wraps these
    kind, t, b, max_blocks, s = (int(v) for v in words[:5])
    if kind == STOP:
        return None
    if kind == LOGITS:
        return _hidden(words, t, b, max_blocks)
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


def _hidden(words: np.ndarray, rows: int, columns: int, dtype: int) -> torch.Tensor:
    if not 0 <= dtype < len(_DTYPES) or rows < 0 or columns < 0:
        raise ValueError(f"malformed logits record: header {words[:4].tolist()}")
    dt = _DTYPES[dtype]
    n = rows * columns * dt.itemsize
    if len(words) != _HEADER + -(-n // 8):
        raise ValueError(f"malformed logits record: {rows} x {columns} {dt} in "
                         f"{8 * len(words)} bytes")
    raw = torch.from_numpy(words[_HEADER:].view(np.uint8)[:n])
    return raw.view(dt).view(rows, columns)
