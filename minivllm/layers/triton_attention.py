"""Attention over the paged KV cache on the GPU: Triton kernels, CUDA-graph capturable.

Three launches per layer at most, none of which reads a device value back to the host:

- `_write_kv_kernel` scatters the step's keys and values into their cache slots (both caches in
  one launch; a negative slot is padding and is skipped, which is what lets a CUDA graph of a
  fixed batch size serve a smaller batch).
- `_decode_kernel`, one program per (sequence, KV head): the group of query heads sharing that KV
  head attends together, so each cached key/value is read once per group (GQA), walking the
  context through the block table in tiles with an online softmax.
- `_prefill_kernel`, one program per (query tile, sequence, query head): a prefill chunk attends
  to its cached prefix and causally within itself, all straight from the cache (the chunk's own
  keys were just written there), FlashAttention-style.

Rows with one query (decodes, and one-token chunks, which are the same computation) go to the
decode kernel, the others to the prefill kernel; each kernel skips the other's rows, so a mixed
step needs no host-side split. Scores and the softmax run in fp32; probabilities are rounded to
the value dtype for the second matrix product, as FlashAttention does.
`TorchAttentionBackend` is the reference these are tested against (tests/test_triton_attention.py).
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from minivllm.layers.attention import AttentionBackend, AttentionMetadata

_LOG2E = 1.4426950408889634
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, stride_kt, stride_vt,
                     ROW: tl.constexpr, BLOCK: tl.constexpr):
    """One program per token: copies its KVH*D keys and values (contiguous per token in both
    the projection output and the cache) to the token's slot."""
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot < 0:
        return
    offs = tl.arange(0, BLOCK)
    mask = offs < ROW
    dst = slot.to(tl.int64) * ROW + offs
    tl.store(k_cache_ptr + dst, tl.load(k_ptr + t * stride_kt + offs, mask=mask), mask=mask)
    tl.store(v_cache_ptr + dst, tl.load(v_ptr + t * stride_vt + offs, mask=mask), mask=mask)


# The block table's row stride is the step's widest table: not specialized on, so that a new
# width does not compile a new kernel variant mid-run.
@triton.jit(do_not_specialize=["stride_bt"])
def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, seq_lens_ptr,
                   query_start_ptr, scale_log2, stride_qt, stride_qh, stride_ot, stride_oh,
                   stride_bt, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, KV_HEADS: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                   PRECISION: tl.constexpr, DOT: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    token = tl.load(query_start_ptr + b)
    if tl.load(query_start_ptr + b + 1) - token != 1:
        return  # a prefill row: the prefill kernel's
    seq_len = tl.load(seq_lens_ptr + b)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, HEAD_DIM)
    head_ok = g < GROUP
    heads = kvh * GROUP + g
    q = tl.load(q_ptr + token * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=head_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    row_stride = KV_HEADS * HEAD_DIM  # one token's keys in the cache
    for n0 in range(0, seq_len, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        valid = pos < seq_len
        block = tl.load(block_tables_ptr + b * stride_bt + pos // BLOCK_SIZE, mask=valid, other=0)
        offs = ((block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE) * row_stride
                + kvh * HEAD_DIM)
        k = tl.load(k_cache_ptr + offs[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_cache_ptr + offs[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        s = tl.dot(q.to(DOT), tl.trans(k.to(DOT)), input_precision=PRECISION) * scale_log2
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype).to(DOT), v.to(DOT),
                                               input_precision=PRECISION)
        m_i = m_new
    # A padding row of a CUDA graph has no context (seq_len 0): it writes zeros, not NaN.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + token * stride_ot + heads[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])


@triton.jit(do_not_specialize=["stride_bt"])
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, seq_lens_ptr,
                    query_start_ptr, scale_log2, stride_qt, stride_qh, stride_ot, stride_oh,
                    stride_bt, GROUP: tl.constexpr, KV_HEADS: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, DOT: tl.constexpr):
    tile = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    start = tl.load(query_start_ptr + b)
    qlen = tl.load(query_start_ptr + b + 1) - start
    if qlen <= 1 or tile * BLOCK_M >= qlen:
        return  # a decode row (the decode kernel's), or past this chunk's end
    seq_len = tl.load(seq_lens_ptr + b)
    prefix = seq_len - qlen  # tokens cached before this chunk
    kvh = h // GROUP
    m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    q_ok = m < qlen
    q_pos = prefix + m  # absolute positions: query j sees keys 0..q_pos[j]
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + (start + m)[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=q_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    row_stride = KV_HEADS * HEAD_DIM
    # Keys past the tile's last query are masked for every row of it: stop there. Every row
    # sees key 0, so no row's running maximum stays -inf.
    end = tl.minimum(seq_len, prefix + (tile + 1) * BLOCK_M)
    for n0 in range(0, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        valid = pos < end
        block = tl.load(block_tables_ptr + b * stride_bt + pos // BLOCK_SIZE, mask=valid, other=0)
        offs = ((block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE) * row_stride
                + kvh * HEAD_DIM)
        k = tl.load(k_cache_ptr + offs[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_cache_ptr + offs[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        s = tl.dot(q.to(DOT), tl.trans(k.to(DOT)), input_precision=PRECISION) * scale_log2
        s = tl.where(valid[None, :] & (pos[None, :] <= q_pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype).to(DOT), v.to(DOT),
                                               input_precision=PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + (start + m)[:, None] * stride_ot + h * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=q_ok[:, None])


def write_kv_cache_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                          v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """`attention.write_kv_cache` in one launch for both caches; slots < 0 are skipped."""
    T, kv_heads, head_dim = k.shape
    row = kv_heads * head_dim
    if T == 0:
        return
    assert k.stride(1) == v.stride(1) == head_dim and k.stride(2) == v.stride(2) == 1
    _write_kv_kernel[(T,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0),
                           ROW=row, BLOCK=triton.next_power_of_2(row))


class TritonAttentionBackend(AttentionBackend):
    """Paged attention in Triton kernels; see the module docstring. Needs a power-of-two
    head_dim >= 16 (the kernels tile it whole, and tl.dot wants 16 at least)."""

    cuda_graph_safe = True

    # Tile sizes: 64x64 query/key tiles keep a prefill program's fp32 scores and accumulator in
    # registers at head_dim 128; the decode kernel's tile of 64 keys is 4 cache blocks of 16.
    BLOCK_M = 64
    BLOCK_N = 64
    DECODE_BLOCK_N = 64

    def prepare(self, meta: AttentionMetadata, block_size: int) -> None:
        # Whether any row has one query: a step of prefill chunks alone skips the decode launch.
        meta.prepared = bool(meta.max_query_len == 1
                             or (np.diff(meta.query_start_host) == 1).any())

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float) -> torch.Tensor:
        assert k_cache.is_contiguous() and v_cache.is_contiguous() and q.stride(2) == 1
        write_kv_cache_triton(k, v, k_cache, v_cache, meta.slot_mapping)
        return self.attend(q, k_cache, v_cache, torch.empty_like(q), meta, scale)

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               out: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """Attention of q [T, H, D] over the caches (this step's keys already written) into
        `out` [T, H, D]; every row of `out` that a query maps to is written."""
        T, heads, head_dim = q.shape
        _, block_size, kv_heads, _ = k_cache.shape
        num_seqs = meta.seq_lens.shape[0]
        group = heads // kv_heads
        # fp32 models get fp32 products (tf32 would cost them parity with the reference).
        precision = "ieee" if q.dtype == torch.float32 else "tf32"
        # Triton's interpreter (3.9) computes bf16 tl.dot wrongly; there the operands, already
        # rounded to bf16, are multiplied in fp32, which is what the tensor cores do exactly.
        dot = tl.float32 if triton.knobs.runtime.interpret else _TL_DTYPES[q.dtype]
        common = (q, k_cache, v_cache, out, meta.block_tables, meta.seq_lens,
                  meta.query_start_loc, scale * _LOG2E, q.stride(0), q.stride(1), out.stride(0),
                  out.stride(1), meta.block_tables.stride(0))
        if meta.prepared:
            _decode_kernel[(num_seqs, kv_heads)](
                *common, GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)),
                KV_HEADS=kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
                BLOCK_N=self.DECODE_BLOCK_N, PRECISION=precision, DOT=dot,
                num_warps=4)
        if meta.max_query_len > 1:  # never in a step of decodes (a CUDA-graph replay)
            grid = (triton.cdiv(meta.max_query_len, self.BLOCK_M), num_seqs, heads)
            _prefill_kernel[grid](
                *common, GROUP=group, KV_HEADS=kv_heads, HEAD_DIM=head_dim,
                BLOCK_SIZE=block_size, BLOCK_M=self.BLOCK_M, BLOCK_N=self.BLOCK_N,
                PRECISION=precision, DOT=dot, num_warps=4, num_stages=2)
        return out
