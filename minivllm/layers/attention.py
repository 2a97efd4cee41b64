"""Attention over the paged KV cache: the metadata of one step and the backend interface.

A step's batch is flattened: T tokens from B sequences, each sequence contributing a run of
`query_len` consecutive tokens (a prefill chunk, or 1 for a decode) whose keys/values are
written into the cache at `slot_mapping` before attention reads the sequence's whole context
through its block table. There is no padding to the longest prompt.

`TorchAttentionBackend` is the reference: plain torch ops, runs on CPU and GPU, and is the
oracle that faster kernels are checked against.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot (block * block_size + offset) of each token
    query_start_loc: torch.Tensor  # [B+1] int64: token offsets of each sequence's queries
    seq_lens: torch.Tensor  # [B] int64: context length after this step (cached + new)
    block_tables: torch.Tensor  # [B, max_blocks] int32
    # Host copies (numpy) of the same arrays: the reference backend loops over prefill chunks.
    query_start_host: np.ndarray
    seq_lens_host: np.ndarray
    max_query_len: int
    prepared: Optional[object] = None  # whatever the backend derives once per step (prepare())


class AttentionBackend:
    """Writes this step's keys/values into the cache, then attends each query to its context."""

    # Whether a decode step's forward can be captured in a CUDA graph and replayed for other
    # lengths and block tables: true when the backend reads them all from device memory and
    # launches the same kernels whatever their values (no host-side loops or shapes).
    cuda_graph_safe = False

    def prepare(self, meta: AttentionMetadata, block_size: int) -> None:
        """Derive per-step index tensors once, before the layers run (stored in meta.prepared)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float) -> torch.Tensor:
        """q [T, H, D], k/v [T, KVH, D], caches [num_blocks, block_size, KVH, D] -> [T, H, D]."""
        raise NotImplementedError


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter the step's keys/values into their cache slots."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def context_slots(block_tables: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """Cache slots of the first `length` positions of each row's context: [B, length]."""
    pos = torch.arange(length, device=block_tables.device)
    return block_tables[:, pos // block_size].long() * block_size + pos % block_size


@dataclass
class _Decodes:
    """Decode rows, batched: their token indices, context slots and padding bias."""

    tokens: Optional[torch.Tensor]  # [Bd] token index of each decode row (None: every token)
    slots: torch.Tensor  # [Bd, L] context slots (padding rows point at slot 0, masked)
    bias: torch.Tensor  # [Bd, 1, 1, L] 0 or -inf


@dataclass
class _Prefill:
    start: int
    end: int
    slots: Optional[torch.Tensor]  # [L] context slots; None when the chunk is its whole context
    mask: Optional[torch.Tensor]  # [qlen, L] bool, for chunks after a cached prefix


class TorchAttentionBackend(AttentionBackend):
    """Reference attention: decodes batched with a padding mask, prefill chunks one by one."""

    def prepare(self, meta, block_size):
        starts, seq_lens = meta.query_start_host, meta.seq_lens_host
        qlens = np.diff(starts)
        dev = meta.block_tables.device
        decodes = prefills = None
        rows = np.flatnonzero(qlens == 1)
        if len(rows):
            rows_t = torch.from_numpy(rows).to(dev)
            length = int(seq_lens[rows].max())
            slots = context_slots(meta.block_tables[rows_t], length, block_size)
            valid = torch.arange(length, device=dev)[None, :] < meta.seq_lens[rows_t][:, None]
            bias = torch.zeros(valid.shape, device=dev).masked_fill_(~valid, float("-inf"))
            tokens = None if len(rows) == len(qlens) else torch.from_numpy(starts[rows]).to(dev)
            decodes = _Decodes(tokens, slots, bias[:, None, None, :])
        prefills = [self._prepare_prefill(meta, i, block_size) for i in np.flatnonzero(qlens > 1)]
        meta.prepared = (decodes, prefills)

    @staticmethod
    def _prepare_prefill(meta, i, block_size) -> _Prefill:
        s, e = int(meta.query_start_host[i]), int(meta.query_start_host[i + 1])
        seq_len = int(meta.seq_lens_host[i])
        if seq_len == e - s:
            return _Prefill(s, e, None, None)
        dev = meta.block_tables.device
        slots = context_slots(meta.block_tables[i:i + 1], seq_len, block_size)[0]
        # Query j sits at absolute position seq_len - qlen + j and sees keys up to there.
        qpos = torch.arange(seq_len - (e - s), seq_len, device=dev)
        mask = torch.arange(seq_len, device=dev)[None, :] <= qpos[:, None]
        return _Prefill(s, e, slots, mask)

    def forward(self, q, k, v, k_cache, v_cache, meta, scale):
        write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        decodes, prefills = meta.prepared
        k_flat = k_cache.view(-1, *k_cache.shape[2:])
        v_flat = v_cache.view(-1, *v_cache.shape[2:])
        out = torch.empty_like(q) if prefills else None
        if decodes is not None:
            dq = q if decodes.tokens is None else q[decodes.tokens]
            dout = _decode(dq, k_flat, v_flat, decodes, scale)
            if out is None:
                return dout
            out[decodes.tokens] = dout
        for p in prefills:
            out[p.start:p.end] = _prefill(q[p.start:p.end], k[p.start:p.end], v[p.start:p.end],
                                          k_flat, v_flat, p, scale)
        return out


def _decode(q, k_flat, v_flat, d: _Decodes, scale):
    """One query per row against its padded context, as grouped matmuls (GQA without copies)."""
    B, H, D = q.shape
    keys, values = k_flat[d.slots], v_flat[d.slots]  # [B, L, KVH, D]
    kvh = keys.shape[2]
    qg = q.view(B, kvh, H // kvh, D)  # heads of a group share one KV head
    scores = torch.matmul(qg, keys.permute(0, 2, 3, 1)) * scale + d.bias  # [B, KVH, G, L]
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.matmul(probs, values.transpose(1, 2)).view(B, H, D)


def _prefill(q, k, v, k_flat, v_flat, p: _Prefill, scale):
    if p.slots is None:  # no cached prefix: the chunk attends to itself, causally
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1),
                                             v.transpose(0, 1), is_causal=True, scale=scale,
                                             enable_gqa=True)
    else:
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k_flat[p.slots].transpose(0, 1),
                                             v_flat[p.slots].transpose(0, 1), attn_mask=p.mask,
                                             scale=scale, enable_gqa=True)
    return out.transpose(0, 1)
