"""Attention over the paged KV cache on the GPU: Triton kernels, CUDA-graph capturable.

Four launches per layer at most, none of which reads a device value back to the host:

- `_write_kv_kernel` scatters the step's keys and values into their cache slots (both caches in
  one launch; a negative slot is padding and is skipped, which is what lets a CUDA graph of a
  fixed batch size serve a smaller batch).
- `_decode_kernel`, one program per (sequence, KV head, split): the group of query heads sharing
  that KV head attends together, so each cached key/value is read once per group (GQA), walking
  its run of the context through the block table in tiles with an online softmax. A long
  context is split (flash-decoding) so that a small batch still fills every SM: each split
  writes its partial output and log-sum-exp, and `_combine_kernel` merges them.
- `_prefill_kernel`, one program per (window of consecutive tokens of the step, KV head): each
  prefill chunk in the window attends to its cached prefix and causally within itself, all
  straight from the cache (the chunk's own keys were just written there), FlashAttention-style;
  a tile holds every head of a GQA group, so each key tile loaded serves them all, and only
  tiles on the causal diagonal are masked. The grid is the step's token count over the window:
  no program per (sequence, tile of the longest chunk) that finds nothing to do, and a CUDA
  graph of a padded token count serves any mix of chunks and decodes.

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
def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_out_ptr, part_lse_ptr,
                   arrived_ptr, block_tables_ptr, seq_lens_ptr, query_start_ptr, scale_log2,
                   stride_qt, stride_qh, stride_ot, stride_oh, stride_bt, GROUP: tl.constexpr,
                   BLOCK_G: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
                   MIN_SPLIT: tl.constexpr, PRECISION: tl.constexpr, DOT: tl.constexpr,
                   FUSED_COMBINE: tl.constexpr):
    """One program per (sequence, KV head, split of its context). FUSED_COMBINE: the split
    that finishes last for its (sequence, KV head) merges the partials itself, counted in
    `arrived_ptr` (zeros, left zero), instead of a second launch of _combine_kernel."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    token = tl.load(query_start_ptr + b)
    if tl.load(query_start_ptr + b + 1) - token != 1:
        return  # a prefill row: the prefill kernel's
    seq_len = tl.load(seq_lens_ptr + b)
    n_splits, chunk = _splits_of(seq_len, SPLITS, MIN_SPLIT, BLOCK_N)
    if split >= n_splits:
        return
    lo = split * chunk
    hi = tl.minimum(lo + chunk, seq_len)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, HEAD_DIM)
    head_ok = g < GROUP
    heads = kvh * GROUP + g
    q = tl.load(q_ptr + token * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=head_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    last = tl.full([BLOCK_G], 0, tl.int64) + hi - 1  # every head sees keys lo..hi-1
    for n0 in range(lo, hi, BLOCK_N):
        m_i, l_i, acc = _attend_tile(q, k_cache_ptr, v_cache_ptr, block_tables_ptr, b, kvh, n0,
                                     hi, last, m_i, l_i, acc, scale_log2, stride_bt, KV_HEADS,
                                     HEAD_DIM, BLOCK_SIZE, BLOCK_N, PRECISION, DOT, True)
    # A padding row of a CUDA graph has no context (seq_len 0): it writes zeros, not NaN.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if n_splits == 1:
        tl.store(out_ptr + token * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])
    else:  # this split's normalized output and log2-sum-exp, for _combine_kernel
        part = (b * KV_HEADS * GROUP + heads) * SPLITS + split
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + d[None, :], out,
                 mask=head_ok[:, None])
        tl.store(part_lse_ptr + part, m_i + tl.log2(l_i), mask=head_ok)
        if FUSED_COMBINE:
            tl.debug_barrier()  # every thread's partial is stored before the count says so
            count = arrived_ptr + b * KV_HEADS + kvh
            if tl.atomic_add(count, 1, sem="acq_rel") == n_splits - 1:
                for h in range(kvh * GROUP, kvh * GROUP + GROUP):
                    _combine_head(out_ptr, part_out_ptr, part_lse_ptr, b, h, token, n_splits,
                                  stride_ot, stride_oh, KV_HEADS * GROUP, HEAD_DIM, SPLITS)
                tl.store(count, 0)  # for the next launch (a CUDA graph's replay)


@triton.jit
def _splits_of(seq_len, SPLITS: tl.constexpr, MIN_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr):
    """How a context is cut: into at most SPLITS runs of whole key tiles, none shorter than
    MIN_SPLIT tokens (a short context is one run: no partials, no combine). (count, run)."""
    n_splits = tl.minimum(tl.maximum(tl.cdiv(seq_len, MIN_SPLIT), 1), SPLITS)
    chunk = tl.cdiv(tl.cdiv(seq_len, n_splits), BLOCK_N) * BLOCK_N
    return n_splits, chunk


@triton.jit
def _combine_kernel(out_ptr, part_out_ptr, part_lse_ptr, seq_lens_ptr, query_start_ptr,
                    stride_ot, stride_oh, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                    SPLITS: tl.constexpr, MIN_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per (sequence, query head): the splits' outputs weighted by their share
    of the softmax's denominator (flash-decoding's second pass)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    token = tl.load(query_start_ptr + b)
    if tl.load(query_start_ptr + b + 1) - token != 1:
        return
    n_splits, _ = _splits_of(tl.load(seq_lens_ptr + b), SPLITS, MIN_SPLIT, BLOCK_N)
    if n_splits == 1:
        return  # the decode kernel wrote the output itself
    _combine_head(out_ptr, part_out_ptr, part_lse_ptr, b, h, token, n_splits, stride_ot,
                  stride_oh, HEADS, HEAD_DIM, SPLITS)


@triton.jit
def _combine_head(out_ptr, part_out_ptr, part_lse_ptr, b, h, token, n_splits, stride_ot,
                  stride_oh, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                  SPLITS: tl.constexpr):
    """Query head h's output from its splits' partials."""
    s = tl.arange(0, SPLITS)
    part = (b * HEADS + h) * SPLITS + s
    lse = tl.load(part_lse_ptr + part, mask=s < n_splits, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))  # an empty split (-inf) weighs 0
    d = tl.arange(0, HEAD_DIM)
    o = tl.load(part_out_ptr + part[:, None] * HEAD_DIM + d[None, :],
                mask=(s < n_splits)[:, None], other=0.0)
    out = tl.sum(w[:, None] * o, 0) / tl.sum(w, 0)
    tl.store(out_ptr + token * stride_ot + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))


@triton.jit(do_not_specialize=["stride_bt", "num_seqs"])
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, seq_lens_ptr,
                    query_start_ptr, num_seqs, scale_log2, stride_qt, stride_qh, stride_ot,
                    stride_oh, stride_bt, GROUP: tl.constexpr, KV_HEADS: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, DOT: tl.constexpr):
    """One program per (window of BLOCK_M // GROUP consecutive tokens of the step, KV head):
    the window's prefill queries, a run per sequence it meets (decode rows are the decode
    kernel's). The grid depends on the step's token count alone, so a CUDA graph captured
    for a padded token count serves any mix of chunks; tokens past the last query start
    (padding) are nobody's."""
    QUERIES: tl.constexpr = BLOCK_M // GROUP
    tok = (tl.program_id(0) * QUERIES).to(tl.int64)  # int64 as the query starts it meets
    kvh = tl.program_id(1)
    total = tl.load(query_start_ptr + num_seqs)
    win_end = tl.minimum(tok + QUERIES, total)
    lo = 0  # the sequence holding `tok`: the last one starting at or before it
    hi = num_seqs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if tl.load(query_start_ptr + mid) <= tok:
            lo = mid
        else:
            hi = mid
    b = lo
    while tok < win_end:
        start = tl.load(query_start_ptr + b)
        end = tl.load(query_start_ptr + b + 1)
        run_end = tl.minimum(end, win_end)
        if end - start > 1 and run_end > tok:
            _prefill_run(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr,
                         tl.load(seq_lens_ptr + b), b, kvh, start, end, tok, run_end,
                         scale_log2, stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
                         GROUP, KV_HEADS, HEAD_DIM, BLOCK_SIZE, BLOCK_M, BLOCK_N, PRECISION,
                         DOT)
        tok = tl.maximum(tok, run_end)
        b += 1


@triton.jit
def _prefill_run(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, seq_len, b, kvh,
                 start, end, first, last, scale_log2, stride_qt, stride_qh, stride_ot,
                 stride_oh, stride_bt, GROUP: tl.constexpr, KV_HEADS: tl.constexpr,
                 HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, DOT: tl.constexpr):
    """Tokens [first, last) of sequence b's chunk [start, end): BLOCK_M rows of (query, head)
    pairs of the KV head's group, query-major, so each key/value tile loaded serves every head
    of the group (GQA): row r is token first + r // GROUP, head r % GROUP."""
    prefix = seq_len - (end - start)  # tokens cached before this chunk
    r = tl.arange(0, BLOCK_M)
    t = first + r // GROUP
    q_ok = (t < last) & (r < (BLOCK_M // GROUP) * GROUP)
    q_pos = prefix + t - start  # absolute positions: a query at q_pos sees keys 0..q_pos
    q_off = t * stride_qt + (kvh * GROUP + r % GROUP) * stride_qh
    o_off = t * stride_ot + (kvh * GROUP + r % GROUP) * stride_oh
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + q_off[:, None] + d[None, :], mask=q_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # Keys before the run's first query are seen by every row of it (no mask); from there to
    # its last query, the causal diagonal; past that, nothing. Every row sees key 0, so no
    # row's running maximum stays -inf.
    diagonal = prefix + first - start
    stop = prefix + last - start
    full = (diagonal // BLOCK_N) * BLOCK_N
    for n0 in range(0, full, BLOCK_N):
        m_i, l_i, acc = _attend_tile(q, k_cache_ptr, v_cache_ptr, block_tables_ptr, b, kvh,
                                      n0, stop, q_pos, m_i, l_i, acc, scale_log2, stride_bt,
                                      KV_HEADS, HEAD_DIM, BLOCK_SIZE, BLOCK_N, PRECISION, DOT,
                                      False)
    for n0 in range(full, stop, BLOCK_N):
        m_i, l_i, acc = _attend_tile(q, k_cache_ptr, v_cache_ptr, block_tables_ptr, b, kvh,
                                      n0, stop, q_pos, m_i, l_i, acc, scale_log2, stride_bt,
                                      KV_HEADS, HEAD_DIM, BLOCK_SIZE, BLOCK_N, PRECISION, DOT,
                                      True)
    out = acc / l_i[:, None]
    tl.store(out_ptr + o_off[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=q_ok[:, None])


@triton.jit
def _attend_tile(q, k_cache_ptr, v_cache_ptr, block_tables_ptr, b, kvh, n0, end, q_pos, m_i,
                  l_i, acc, scale_log2, stride_bt, KV_HEADS: tl.constexpr,
                  HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                  PRECISION: tl.constexpr, DOT: tl.constexpr, CAUSAL: tl.constexpr):
    """One key/value tile [n0, n0 + BLOCK_N) of the online softmax for query rows `q`; keys
    from `end` on are absent, and CAUSAL masks those past each row's position `q_pos`."""
    d = tl.arange(0, HEAD_DIM)
    pos = n0 + tl.arange(0, BLOCK_N)
    valid = pos < end
    block = tl.load(block_tables_ptr + b * stride_bt + pos // BLOCK_SIZE, mask=valid, other=0)
    offs = (block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE) * (KV_HEADS * HEAD_DIM) \
        + kvh * HEAD_DIM
    k = tl.load(k_cache_ptr + offs[:, None] + d[None, :], mask=valid[:, None], other=0.0)
    v = tl.load(v_cache_ptr + offs[:, None] + d[None, :], mask=valid[:, None], other=0.0)
    s = tl.dot(q.to(DOT), tl.trans(k.to(DOT)), input_precision=PRECISION) * scale_log2
    if CAUSAL:
        s = tl.where(valid[None, :] & (pos[None, :] <= q_pos[:, None]), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype).to(DOT), v.to(DOT),
                                           input_precision=PRECISION)
    return m_new, l_i, acc


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

    # Prefill tiles by head_dim: (BLOCK_M (query, head) rows, BLOCK_N keys, warps, stages),
    # the fastest of bench/long_context.py's sweep on the H200 (Qwen2.5-0.5B at 16 k tokens,
    # Llama-3-8B at 8 k); head_dim 64 and below take the first, larger the second (bf16).
    PREFILL_TILES = {64: (64, 64, 4, 2), 128: (128, 128, 8, 3)}
    # Split-KV decode: a context is cut into runs of at least MIN_SPLIT tokens, at most
    # MAX_SPLITS of them, so that batch x KV heads x splits programs fill the GPU (WAVES per
    # SM); a short context stays one run and pays no second pass. Tiles of DECODE_BLOCK_N keys,
    # DECODE_WARPS warps a program, DECODE_STAGES software-pipeline stages for the tile loads.
    DECODE_BLOCK_N = 64
    DECODE_WARPS = 4
    DECODE_STAGES = 3
    FUSED_COMBINE = False  # the last split of a context combines (no second launch)
    MIN_SPLIT = 128
    MAX_SPLITS = 128
    WAVES = 4

    def __init__(self) -> None:
        self.num_sms = (torch.cuda.get_device_properties(0).multi_processor_count
                        if torch.cuda.is_available() else 4)
        self._arrived: torch.Tensor | None = None  # FUSED_COMBINE's per-(sequence, KV head) counts

    def decode_splits(self, num_seqs: int, kv_heads: int) -> int:
        """Splits per context: a power of two, from the batch's shape alone (not its lengths),
        so a CUDA graph captured for a batch size holds for every context it replays."""
        splits = 1
        while splits < self.MAX_SPLITS and num_seqs * kv_heads * splits * 2 <= (
                self.WAVES * self.num_sms):
            splits *= 2
        return splits

    def _counts(self, device: torch.device) -> torch.Tensor:
        """FUSED_COMBINE's arrival counts. Allocated once, at the most a split step can need
        (decode_splits splits only batch x KV heads <= WAVES x SMs / 2), never reallocated:
        a captured CUDA graph keeps the address it saw."""
        if self._arrived is None:
            self._arrived = torch.zeros(self.WAVES * self.num_sms, dtype=torch.int32,
                                        device=device)
        return self._arrived

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

    def decode_params(self, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int,
                      block_size: int, splits: int) -> dict:
        """The decode kernel's compile-time parameters, warps and stages for a shape."""
        group = heads // kv_heads
        return dict(GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)),
                    KV_HEADS=kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
                    BLOCK_N=self.DECODE_BLOCK_N, SPLITS=splits, MIN_SPLIT=self.MIN_SPLIT,
                    FUSED_COMBINE=self.FUSED_COMBINE and splits > 1,
                    num_warps=self.DECODE_WARPS, num_stages=self.DECODE_STAGES,
                    **_products(dtype))

    def prefill_params(self, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int,
                       block_size: int) -> dict:
        """The prefill kernel's compile-time parameters, warps and stages for a shape."""
        # fp32 tiles take twice the shared memory: the small ones (128 x 128 overflows it)
        small = head_dim <= 64 or dtype.itemsize > 2
        block_m, block_n, warps, stages = self.PREFILL_TILES[64 if small else 128]
        return dict(GROUP=heads // kv_heads, KV_HEADS=kv_heads, HEAD_DIM=head_dim,
                    BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
                    num_stages=stages, **_products(dtype))

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               out: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """Attention of q [T, H, D] over the caches (this step's keys already written) into
        `out` [T, H, D]; every row of `out` that a query maps to is written."""
        T, heads, head_dim = q.shape
        _, block_size, kv_heads, _ = k_cache.shape
        num_seqs = meta.seq_lens.shape[0]
        tables = (meta.block_tables, meta.seq_lens, meta.query_start_loc)
        strides = (q.stride(0), q.stride(1), out.stride(0), out.stride(1))
        if meta.prepared:
            splits = self.decode_splits(num_seqs, kv_heads)
            part_out = q.new_empty((num_seqs, heads, splits, head_dim), dtype=torch.float32)
            part_lse = q.new_empty((num_seqs, heads, splits), dtype=torch.float32)
            params = self.decode_params(q.dtype, heads, kv_heads, head_dim, block_size, splits)
            fused = params["FUSED_COMBINE"]
            _decode_kernel[(num_seqs, kv_heads, splits)](
                q, k_cache, v_cache, out, part_out, part_lse,
                self._counts(q.device) if fused else part_lse, *tables, scale * _LOG2E,
                *strides, meta.block_tables.stride(0), **params)
            if splits > 1 and not fused:
                _combine_kernel[(num_seqs, heads)](
                    out, part_out, part_lse, meta.seq_lens, meta.query_start_loc,
                    out.stride(0), out.stride(1), HEADS=heads, HEAD_DIM=head_dim,
                    SPLITS=splits, MIN_SPLIT=self.MIN_SPLIT, BLOCK_N=self.DECODE_BLOCK_N,
                    num_warps=4)
        if meta.max_query_len > 1:  # never in a step of decodes (a CUDA-graph replay)
            params = self.prefill_params(q.dtype, heads, kv_heads, head_dim, block_size)
            grid = (triton.cdiv(T, params["BLOCK_M"] // params["GROUP"]), kv_heads)
            _prefill_kernel[grid](
                q, k_cache, v_cache, out, *tables, num_seqs, scale * _LOG2E, *strides,
                meta.block_tables.stride(0), **params)
        return out


def _products(dtype: torch.dtype) -> dict:
    """How the kernels' tl.dot runs for a model dtype: fp32 models get fp32 products (tf32
    would cost them parity with the reference). Triton's interpreter (3.9) computes bf16 tl.dot
    wrongly; there the operands, already rounded to bf16, are multiplied in fp32, which is what
    the tensor cores do exactly."""
    return dict(PRECISION="ieee" if dtype == torch.float32 else "tf32",
                DOT=tl.float32 if triton.knobs.runtime.interpret else _TL_DTYPES[dtype])
