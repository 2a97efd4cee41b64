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
    max_seq_len: int


class AttentionBackend:
    """Writes this step's keys/values into the cache, then attends each query to its context."""

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


def gather_kv(cache: torch.Tensor, block_tables: torch.Tensor, length: int) -> torch.Tensor:
    """Read the first `length` positions of each row's context: [B, length, KVH, D]."""
    block_size = cache.shape[1]
    pos = torch.arange(length, device=cache.device)
    blocks = block_tables[:, pos // block_size].long()
    return cache.view(-1, *cache.shape[2:])[blocks * block_size + pos % block_size]


class TorchAttentionBackend(AttentionBackend):
    """Reference attention: decodes batched with a padding mask, prefill chunks one by one."""

    def forward(self, q, k, v, k_cache, v_cache, meta, scale):
        write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.max_query_len == 1:
            return self._decode(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                meta.max_seq_len, scale)
        out = torch.empty_like(q)
        starts = meta.query_start_host
        qlens = np.diff(starts)
        decode_rows = np.flatnonzero(qlens == 1)
        if len(decode_rows):
            rows = torch.from_numpy(decode_rows).to(q.device)
            tok = torch.from_numpy(starts[decode_rows]).to(q.device)
            out[tok] = self._decode(q[tok], k_cache, v_cache, meta.block_tables[rows],
                                    meta.seq_lens[rows], int(meta.seq_lens_host[decode_rows].max()),
                                    scale)
        for i in np.flatnonzero(qlens > 1):
            s, e = int(starts[i]), int(starts[i + 1])
            out[s:e] = self._prefill(q[s:e], k_cache, v_cache, meta.block_tables[i:i + 1],
                                     int(meta.seq_lens_host[i]), scale)
        return out

    @staticmethod
    def _decode(q, k_cache, v_cache, block_tables, seq_lens, max_len, scale):
        keys = gather_kv(k_cache, block_tables, max_len).transpose(1, 2)  # [B, KVH, L, D]
        values = gather_kv(v_cache, block_tables, max_len).transpose(1, 2)
        mask = torch.arange(max_len, device=q.device)[None, :] < seq_lens[:, None]  # [B, L]
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2), keys, values, attn_mask=mask[:, None, None, :], scale=scale,
            enable_gqa=True)  # [B, H, 1, D]
        return out.squeeze(2)

    @staticmethod
    def _prefill(q, k_cache, v_cache, block_table, seq_len, scale):
        qlen = q.shape[0]
        keys = gather_kv(k_cache, block_table, seq_len)[0].transpose(0, 1)  # [KVH, L, D]
        values = gather_kv(v_cache, block_table, seq_len)[0].transpose(0, 1)
        # Query i sits at absolute position seq_len - qlen + i and sees keys up to there.
        qpos = torch.arange(seq_len - qlen, seq_len, device=q.device)
        mask = torch.arange(seq_len, device=q.device)[None, :] <= qpos[:, None]
        out = F.scaled_dot_product_attention(q.transpose(0, 1), keys, values, attn_mask=mask,
                                             scale=scale, enable_gqa=True)  # [H, qlen, D]
        return out.transpose(0, 1)

