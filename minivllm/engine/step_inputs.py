"""A step's inputs on the model's device: the scheduler's numpy arrays as tensors.

On CPU the arrays are wrapped, not copied. On CUDA every integer array of the step (token ids,
positions, slot mapping, query starts, context lengths, block tables, sampled rows and their
request indices) is packed into one pinned host buffer and moved in one asynchronous copy, so a
step costs one host-to-device transfer and never waits for it: the only wait of a step is for
its sampled tokens (EngineCore.step).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from minivllm.core.batch import ScheduledBatch
from minivllm.layers.attention import AttentionMetadata


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    sample_index: Optional[torch.Tensor]  # [S] token index of each sampled row; None: all [T]
    sample_indices: torch.Tensor  # [S] request index of each sampled row


def sampled_tokens(batch: ScheduledBatch) -> Optional[np.ndarray]:
    """Token index of each sampled row (its last token), or None when every token is sampled
    in order (a step of decodes), which spares the model runner a gather."""
    if len(batch.sample_rows) == batch.num_tokens:
        return None
    return batch.query_start_loc[batch.sample_rows + 1] - 1


def _metadata(batch: ScheduledBatch, slot_mapping: torch.Tensor, query_start: torch.Tensor,
              seq_lens: torch.Tensor, block_tables: torch.Tensor) -> AttentionMetadata:
    return AttentionMetadata(
        slot_mapping=slot_mapping, query_start_loc=query_start, seq_lens=seq_lens,
        block_tables=block_tables, query_start_host=batch.query_start_loc,
        seq_lens_host=batch.seq_lens, max_query_len=int(np.diff(batch.query_start_loc).max()))


def fill_placeholders(input_ids: torch.Tensor, last_tokens: torch.Tensor) -> torch.Tensor:
    """Under async scheduling a decode's input token was sampled by the step still in flight
    when the batch was built: the scheduler writes it as -1 - req_index, and the device holds it in
    `last_tokens[req_index]` (ModelRunner keeps it). No host sync: a gather and a select."""
    return torch.where(input_ids < 0, last_tokens[(-1 - input_ids).clamp_(min=0)], input_ids)


def cpu_inputs(batch: ScheduledBatch) -> StepInputs:
    """The arrays themselves, as tensors sharing their memory."""
    t = torch.from_numpy
    index = sampled_tokens(batch)
    meta = _metadata(batch, t(batch.slot_mapping), t(batch.query_start_loc), t(batch.seq_lens),
                     t(batch.block_tables))
    return StepInputs(t(batch.input_ids), t(batch.positions), meta,
                      None if index is None else t(index), t(batch.req_indices[batch.sample_rows]))


class StepStaging:
    """One pinned host buffer and its device twin; each step's arrays are packed into a prefix
    of them (int64 throughout: the kernels take block tables of either width)."""

    def __init__(self, device: torch.device, capacity: int = 1 << 16) -> None:
        self.device = device
        self._copied = torch.cuda.Event()
        self._allocate(capacity)

    def _allocate(self, capacity: int) -> None:
        self._host = torch.empty(capacity, dtype=torch.int64, pin_memory=True)
        self._host_np = self._host.numpy()
        self._dev = torch.empty(capacity, dtype=torch.int64, device=self.device)

    def stage(self, batch: ScheduledBatch) -> StepInputs:
        index = sampled_tokens(batch)
        arrays = [batch.input_ids, batch.positions, batch.slot_mapping, batch.query_start_loc,
                  batch.seq_lens, batch.req_indices[batch.sample_rows],
                  batch.block_tables.reshape(-1)]
        if index is not None:
            arrays.append(index)
        total = sum(a.size for a in arrays)
        # The previous step's copy reads the host buffer until it lands; waiting for that event
        # costs nothing in the engine (it already waited for the tokens sampled after it).
        self._copied.synchronize()
        if total > self._host.numel():
            self._allocate(max(total, 2 * self._host.numel()))
        offsets = np.cumsum([0] + [a.size for a in arrays])
        for a, o in zip(arrays, offsets):
            self._host_np[o:o + a.size] = a
        self._dev[:total].copy_(self._host[:total], non_blocking=True)
        self._copied.record()
        views = [self._dev[o:o + a.size] for a, o in zip(arrays, offsets)]
        ids, pos, slot_mapping, query_start, seq_lens, sample_indices, tables = views[:7]
        meta = _metadata(batch, slot_mapping, query_start, seq_lens,
                         tables.view(batch.block_tables.shape))
        return StepInputs(ids, pos, meta, views[7] if index is not None else None, sample_indices)
