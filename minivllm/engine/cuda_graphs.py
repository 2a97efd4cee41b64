"""CUDA graphs: the model's forward captured at start-up, for every step shape that fits.

A step of a small model is a few hundred short kernels; launched one by one from Python the
GPU waits on the host (about 10 us a launch on the lent H100's slow host CPUs, 1.2 us from a
graph). Each graph is captured on fixed input buffers and replayed on a step padded to its
shape:
- a step of decodes (one query per row) by its batch size B: the ladder 1, 2, 4, 8, then every
  16 up to max_num_seqs;
- any other step (prefill chunks, with or without decodes) by its token count T, padded to the
  ladder 32, 64, 128, 256, then every 256 (every 1,024 past 2,048) up to
  max_num_batched_tokens, with room for
  min(T, max_num_seqs) sequences (each has a token at least). The attention kernels read every
  length from the device and launch a grid that depends on T and the sequence count alone
  (layers/triton_attention.py), so one graph serves any mix of chunks and decodes.
Padding tokens have slot -1 (the KV write skips them) and belong to no sequence; padding
sequences have no query and no context. They touch no real state, and their hidden states are
never read. A step larger than every graph (a whole prompt past the token budget, with chunked
prefill off) runs eagerly. All graphs share one memory pool, captured largest first.
"""
from __future__ import annotations

import bisect
import logging
import time
from typing import Optional

import numpy as np
import torch

from minivllm.core.batch import ScheduledBatch
from minivllm.engine.step_inputs import fill_placeholders, sampled_tokens
from minivllm.layers.attention import AttentionBackend, AttentionMetadata

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """The batch sizes of decode graphs: 1, 2, 4, 8, 16, 32, 48, ... and max_num_seqs."""
    sizes = {s for s in (1, 2, 4, 8) if s < max_num_seqs}
    sizes.update(range(16, max_num_seqs, 16))
    sizes.add(max_num_seqs)
    return sorted(sizes)


def token_sizes(max_num_batched_tokens: int) -> list[int]:
    """The token counts of mixed-step graphs: 32, 64, 128, then every 256 up to 2,048, every
    1,024 past it, and the budget: a step pads at most a quarter past 256 tokens, and a large
    budget does not make a hundred graphs."""
    sizes = {s for s in (32, 64, 128) if s < max_num_batched_tokens}
    sizes.update(range(256, min(max_num_batched_tokens, 2048), 256))
    sizes.update(range(2048, max_num_batched_tokens, 1024))
    sizes.add(max_num_batched_tokens)
    return sorted(sizes)


class StepGraphs:
    """Captured forwards, their static input buffers and outputs."""

    def __init__(self, model: torch.nn.Module, backend: AttentionBackend, block_size: int,
                 max_num_seqs: int, max_num_batched_tokens: int, max_blocks_per_seq: int,
                 device: torch.device, last_tokens: Optional[torch.Tensor] = None,
                 mode: str = "full") -> None:
        self.sizes = capture_sizes(max_num_seqs)
        self.token_sizes = token_sizes(max_num_batched_tokens) if mode == "full" else []
        self._n = n = max_num_seqs
        self._tokens = tokens = max([n, *self.token_sizes])
        self._block_size = block_size
        # One pinned buffer and one copy per step for the 1-D inputs, in regions of these
        # lengths; block tables apart, as the step's [B, width] corner of a
        # [max_num_seqs, max_blocks_per_seq] table. Decode graphs have their own query starts
        # (one query per row, written once), mixed-step graphs theirs.
        lengths = dict(ids=tokens, pos=tokens, slots=tokens, seq_lens=n, sample_indices=n,
                       sample_rows=n, decode_starts=n + 1, starts=n + 1)
        ends = np.cumsum(list(lengths.values()))
        self._at = {k: e - length for (k, length), e in zip(lengths.items(), ends)}
        self._host = torch.zeros(int(ends[-1]), dtype=torch.int64, pin_memory=True)
        self._host_np = self._host.numpy()
        self._host_view("decode_starts", n + 1)[:] = np.arange(n + 1)
        self._dev = self._host.to(device)
        self._tables_host = torch.zeros(n * max_blocks_per_seq, dtype=torch.int32,
                                        pin_memory=True)
        self._tables_host_np = self._tables_host.numpy()
        self._tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self._copied = torch.cuda.Event()
        self._graphs: dict[tuple[str, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.replays = {"decode": 0, "mixed": 0}  # steps run from graphs, by kind
        # Async scheduling: the graphs take placeholder input ids from the device themselves.
        self._last_tokens = last_tokens
        t0 = time.perf_counter()
        self._capture(model, backend)
        logger.info("captured %d CUDA graphs in %.1f s: decode steps of batch sizes %s; other "
                    "steps of token counts %s", len(self._graphs), time.perf_counter() - t0,
                    self.sizes, self.token_sizes or "none (cuda_graph_mode decode-only)")

    def _region(self, name: str, length: int) -> torch.Tensor:
        return self._dev[self._at[name]:self._at[name] + length]

    def _host_view(self, name: str, length: int) -> np.ndarray:
        return self._host_np[self._at[name]:self._at[name] + length]

    def _metadata(self, kind: str, tokens: int, seqs: int) -> AttentionMetadata:
        if kind == "decode":
            starts, host_starts, max_query_len = "decode_starts", np.arange(seqs + 1), 1
        else:  # host arrays of a decode and a chunk: the backend launches both kernels
            starts, host_starts, max_query_len = "starts", np.array([0, 1, 3]), 2
        return AttentionMetadata(
            slot_mapping=self._region("slots", tokens),
            query_start_loc=self._region(starts, seqs + 1),
            seq_lens=self._region("seq_lens", seqs), block_tables=self._tables[:seqs],
            query_start_host=host_starts, seq_lens_host=np.zeros(len(host_starts) - 1, np.int64),
            max_query_len=max_query_len)

    @torch.inference_mode()
    def _capture(self, model: torch.nn.Module, backend: AttentionBackend) -> None:
        # Captured on padding (slot -1, no query, no context): capturing writes nothing to the
        # KV cache.
        self._region("slots", self._tokens).fill_(-1)
        self._region("starts", self._n + 1).zero_()
        pool = torch.cuda.graph_pool_handle()
        shapes = [("mixed", t, min(t, self._n)) for t in self.token_sizes] + \
            [("decode", b, b) for b in self.sizes]
        for kind, tokens, seqs in sorted(shapes, key=lambda s: -s[1]):  # the largest first:
            meta = self._metadata(kind, tokens, seqs)                  # the others reuse its
            backend.prepare(meta, self._block_size)                     # memory
            ids, pos = self._region("ids", tokens), self._region("pos", tokens)
            self._forward(model, ids, pos, meta)  # warm-up: Triton compilation, cuBLAS
            torch.cuda.synchronize()                # handles, outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self._forward(model, ids, pos, meta)
            self._graphs[kind, tokens] = (graph, hidden)
        torch.cuda.synchronize()

    def _forward(self, model: torch.nn.Module, ids: torch.Tensor, pos: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor:
        if self._last_tokens is not None:
            ids = fill_placeholders(ids, self._last_tokens)
        return model(ids, pos, meta)

    def serves(self, batch: ScheduledBatch) -> bool:
        """A step of decodes no larger than the largest decode graph, or any other step within
        the largest token count."""
        if batch.num_tokens == batch.num_seqs <= self._n:
            return True
        return bool(self.token_sizes) and batch.num_tokens <= self.token_sizes[-1]

    def run(self, batch: ScheduledBatch):
        """Replays the graph for this step's shape; returns (hidden [T, H], sample index or
        None, sample request indices), as the model runner's eager path does."""
        T, B = batch.num_tokens, batch.num_seqs
        if T == B <= self._n:
            kind, size = "decode", self.sizes[bisect.bisect_left(self.sizes, B)]
            seqs, index = size, None if len(batch.sample_rows) == B else batch.sample_rows
        else:
            kind, size = "mixed", self.token_sizes[bisect.bisect_left(self.token_sizes, T)]
            seqs, index = min(size, self._n), sampled_tokens(batch)
        self._copied.synchronize()  # the previous step's copies have read the host buffers
        for name, values, length, pad in (("ids", batch.input_ids, size, 0),
                                          ("pos", batch.positions, size, 0),
                                          ("slots", batch.slot_mapping, size, -1),
                                          ("seq_lens", batch.seq_lens, seqs, 0)):
            view = self._host_view(name, length)
            view[:len(values)] = values
            view[len(values):] = pad
        if kind == "mixed":
            starts = self._host_view("starts", seqs + 1)
            starts[:B + 1] = batch.query_start_loc
            starts[B + 1:] = T
        rows = batch.sample_rows
        S = len(rows)
        self._host_view("sample_indices", S)[:] = batch.req_indices[rows]
        if index is not None:
            self._host_view("sample_rows", S)[:] = index
        self._dev.copy_(self._host, non_blocking=True)
        width = batch.block_tables.shape[1]
        tables = self._tables_host_np[:B * width].reshape(B, width)
        tables[:] = batch.block_tables
        self._tables[:B, :width].copy_(self._tables_host[:B * width].view(B, width),
                                       non_blocking=True)
        self._copied.record()
        graph, hidden = self._graphs[kind, size]
        graph.replay()
        self.replays[kind] += 1
        return (hidden[:T], None if index is None else self._region("sample_rows", S),
                self._region("sample_indices", S))
