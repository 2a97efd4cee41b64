"""CUDA graphs for decode steps: the model's forward captured once per batch size at start-up.

A decode step of a small model is a few hundred short kernels; launched one by one from Python
the GPU waits on the host (about 10 us a launch on the lent H100's slow host CPUs, 1.2 us from a
graph). Each graph is captured for a fixed batch size on fixed input buffers; a step of B
decodes fills the buffers, pads to the next captured size G >= B and replays that graph.
Padded rows have slot -1 (the KV write skips them) and context length 0 (attention writes zeros
for them), so they touch no real state; their hidden states are never read.

The ladder is 1, 2, 4, 8, then every 16 up to max_num_seqs: at most 15 padded rows past 16,
and a couple of dozen graphs, which share one memory pool.
"""
from __future__ import annotations

import logging
import time
from typing import Optional

import numpy as np
import torch

from minivllm.core.batch import ScheduledBatch
from minivllm.engine.step_inputs import fill_placeholders
from minivllm.layers.attention import AttentionBackend, AttentionMetadata

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """The batch sizes that get a graph: 1, 2, 4, 8, 16, 32, 48, ... and max_num_seqs."""
    sizes = {s for s in (1, 2, 4, 8) if s < max_num_seqs}
    sizes.update(range(16, max_num_seqs, 16))
    sizes.add(max_num_seqs)
    return sorted(sizes)


class DecodeGraphs:
    """Captured decode forwards, their static input buffers and outputs."""

    # Regions of the static int64 input buffer, each max_num_seqs long (query starts one more).
    _IDS, _POS, _SLOTS, _SEQ_LENS, _SAMPLE_INDICES, _SAMPLE_ROWS, _QUERY_START = range(7)

    def __init__(self, model: torch.nn.Module, backend: AttentionBackend, block_size: int,
                 max_num_seqs: int, max_blocks_per_seq: int, device: torch.device,
                 last_tokens: Optional[torch.Tensor] = None) -> None:
        self.sizes = capture_sizes(max_num_seqs)
        self._n = n = self.sizes[-1]
        self._block_size = block_size
        # One pinned buffer and one copy per step for the 1-D inputs; block tables apart, as
        # the step's [B, width] corner of a [max_num_seqs, max_blocks_per_seq] table.
        self._host = torch.zeros(7 * n + 1, dtype=torch.int64, pin_memory=True)
        self._host_np = self._host.numpy()
        self._host_np[self._QUERY_START * n:] = np.arange(n + 1)  # one query per row, always
        self._dev = self._host.to(device)
        self._tables_host = torch.zeros(n * max_blocks_per_seq, dtype=torch.int32,
                                        pin_memory=True)
        self._tables_host_np = self._tables_host.numpy()
        self._tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self._copied = torch.cuda.Event()
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # Async scheduling: the graphs take placeholder input ids from the device themselves.
        self._last_tokens = last_tokens
        t0 = time.perf_counter()
        self._capture(model, backend)
        logger.info("captured %d decode CUDA graphs (batch sizes %s) in %.1f s",
                    len(self.sizes), self.sizes, time.perf_counter() - t0)

    def _region(self, region: int, length: int) -> torch.Tensor:
        return self._dev[region * self._n:region * self._n + length]

    def _metadata(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self._region(self._SLOTS, size),
            query_start_loc=self._region(self._QUERY_START, size + 1),
            seq_lens=self._region(self._SEQ_LENS, size), block_tables=self._tables[:size],
            query_start_host=np.arange(size + 1), seq_lens_host=np.zeros(size, np.int64),
            max_query_len=1)

    @torch.inference_mode()
    def _capture(self, model: torch.nn.Module, backend: AttentionBackend) -> None:
        # Captured on padding (slot -1, no context): capturing writes nothing to the KV cache.
        self._dev[self._SLOTS * self._n:(self._SLOTS + 1) * self._n] = -1
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):  # the largest first: smaller ones reuse its memory
            meta = self._metadata(size)
            backend.prepare(meta, self._block_size)
            ids, pos = self._region(self._IDS, size), self._region(self._POS, size)
            self._forward(model, ids, pos, meta)  # warm-up: Triton compilation, cuBLAS
            torch.cuda.synchronize()                # handles, outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self._forward(model, ids, pos, meta)
            self._graphs[size] = (graph, hidden)
        torch.cuda.synchronize()

    def _forward(self, model: torch.nn.Module, ids: torch.Tensor, pos: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor:
        if self._last_tokens is not None:
            ids = fill_placeholders(ids, self._last_tokens)
        return model(ids, pos, meta)

    def serves(self, batch: ScheduledBatch) -> bool:
        """A step of decodes (one query per row) no larger than the largest graph."""
        return batch.num_tokens == batch.num_seqs <= self._n

    def run(self, batch: ScheduledBatch):
        """Replays the graph for this step's size; returns (hidden [B, H], sample index or None,
        sample request indices), as the model runner's eager path does."""
        B = batch.num_seqs
        size = next(s for s in self.sizes if s >= B)
        n, h = self._n, self._host_np
        self._copied.synchronize()  # the previous step's copies have read the host buffers
        for region, values, pad in ((self._IDS, batch.input_ids, 0),
                                    (self._POS, batch.positions, 0),
                                    (self._SLOTS, batch.slot_mapping, -1),
                                    (self._SEQ_LENS, batch.seq_lens, 0)):
            h[region * n:region * n + B] = values
            h[region * n + B:region * n + size] = pad
        rows = batch.sample_rows
        S = len(rows)
        h[self._SAMPLE_INDICES * n:self._SAMPLE_INDICES * n + S] = batch.req_indices[rows]
        h[self._SAMPLE_ROWS * n:self._SAMPLE_ROWS * n + S] = rows
        self._dev.copy_(self._host, non_blocking=True)
        width = batch.block_tables.shape[1]
        tables = self._tables_host_np[:B * width].reshape(B, width)
        tables[:] = batch.block_tables
        self._tables[:B, :width].copy_(self._tables_host[:B * width].view(B, width),
                                       non_blocking=True)
        self._copied.record()
        graph, hidden = self._graphs[size]
        graph.replay()
        index = None if S == B else self._region(self._SAMPLE_ROWS, S)
        return hidden[:B], index, self._region(self._SAMPLE_INDICES, S)
