"""Fused elementwise kernels for the GPU (Triton): RMSNorm with the residual add, rotary
embedding, SiLU-and-multiply.

In plain torch a decoder layer runs about 36 kernels, 26 of them elementwise: 9 per RMSNorm
(add, cast, pow, mean, add, rsqrt, mul, cast, mul), 10 for rotary, 2 for the activation. At
batch 1 each costs a couple of microseconds even replayed from a CUDA graph, which adds up to
milliseconds a step on a 32-layer model; fused, a layer runs 10 kernels. Each kernel rounds
where the torch ops (and Hugging Face's) round: to the activation dtype after each op, the
norm's statistics in fp32; only fp32 summation order differs (tests/test_triton_fused.py).
Measured on the H100 (bench/results/gpu_h100.md), fused against the torch ops, in CUDA graphs:
Llama-3-8B batch-1 decode step 7.75 -> 6.37 ms; Qwen2.5-0.5B batch-256 step 4.01 -> 2.06 ms.

They are the fused kernels of the cuda-triton kernel set (kernels.py).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """fp32 x rounded to the nearest DTYPE value (ties to even), kept in fp32. bf16 is rounded
    with integer ops: the compiler dropped a plain x.to(bf16).to(fp32) round trip (Triton 3.6 on
    the H100: rotary results differed from torch's in 11% of elements), and Triton's interpreter
    rounds toward zero; this way both round as torch does. Finite inputs only."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    elif DTYPE == tl.float32:
        return x
    else:
        return x.to(DTYPE).to(tl.float32)


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, stride_x, stride_r, stride_o, eps,
                     N: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    dtype = x_ptr.dtype.element_ty
    h = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:  # x + residual, rounded to the dtype, is also the next residual
        h = _round(h + tl.load(res_ptr + row * stride_r + offs, mask=mask,
                               other=0.0).to(tl.float32), dtype)
        tl.store(res_ptr + row * stride_r + offs, h.to(dtype), mask=mask)
    rstd = tl.math.rsqrt(tl.sum(h * h, 0) / N + eps)
    normed = _round(h * rstd, dtype)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, _round(w * normed, dtype).to(dtype), mask=mask)

@triton.jit
def _rotary_kernel(q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr, stride_qt, stride_qh,
                   stride_kt, stride_kh, HEADS: tl.constexpr, KV_HEADS: tl.constexpr,
                   BLOCK_H: tl.constexpr, HALF: tl.constexpr):
    """One program per token rotates its q and k heads in place (NeoX rotate_half)."""
    t = tl.program_id(0)
    pos = tl.load(pos_ptr + t)
    d = tl.arange(0, HALF)
    h = tl.arange(0, BLOCK_H)
    dtype = q_ptr.dtype.element_ty
    # cos/sin rounded to the activation dtype first, as the torch path and HF do.
    cos1 = _round(tl.load(cos_ptr + pos * 2 * HALF + d), dtype)
    cos2 = _round(tl.load(cos_ptr + pos * 2 * HALF + HALF + d), dtype)
    sin1 = _round(tl.load(sin_ptr + pos * 2 * HALF + d), dtype)
    sin2 = _round(tl.load(sin_ptr + pos * 2 * HALF + HALF + d), dtype)
    for which in tl.static_range(2):
        if which == 0:
            base, stride_t, stride_h, n = q_ptr, stride_qt, stride_qh, HEADS
        else:
            base, stride_t, stride_h, n = k_ptr, stride_kt, stride_kh, KV_HEADS
        ptr = base + t * stride_t + h[:, None] * stride_h + d[None, :]
        mask = h[:, None] < n
        x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32)
        # out1 = x1*cos - x2*sin, out2 = x2*cos + x1*sin, each product rounded as torch does
        o1 = _round(_round(x1 * cos1[None, :], dtype) + _round(-x2 * sin1[None, :], dtype), dtype)
        o2 = _round(_round(x2 * cos2[None, :], dtype) + _round(x1 * sin2[None, :], dtype), dtype)
        tl.store(ptr, o1.to(dtype), mask=mask)
        tl.store(ptr + HALF, o2.to(dtype), mask=mask)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, N: tl.constexpr,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = col < N
    gate = tl.load(x_ptr + row * stride_x + col, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + N + col, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    act = _round(gate / (1.0 + tl.exp(-gate)), dtype)
    tl.store(out_ptr + row * stride_o + col, _round(act * up, dtype).to(dtype), mask=mask)


def rms_norm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor,
             eps: float) -> torch.Tensor:
    """norm(x) or norm(x + residual), [T, N] rows; with a residual, x + residual is written
    into `residual` in place (it is the next layer's residual)."""
    T, N = x.shape
    out = torch.empty_like(x)
    if T:
        res = residual if residual is not None else x
        _rms_norm_kernel[(T,)](x, res, weight, out, x.stride(0), res.stride(0), out.stride(0),
                               eps, N=N, BLOCK=triton.next_power_of_2(N),
                               HAS_RESIDUAL=residual is not None, num_warps=4)
    return out


def rotary_(positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q: torch.Tensor,
            k: torch.Tensor) -> None:
    """Rotates q [T, H, D] and k [T, KVH, D] in place; cos/sin are [max_pos, D] fp32 tables."""
    T, heads, head_dim = q.shape
    if T:
        _rotary_kernel[(T,)](q, k, positions, cos, sin, q.stride(0), q.stride(1), k.stride(0),
                             k.stride(1), HEADS=heads, KV_HEADS=k.shape[1],
                             BLOCK_H=triton.next_power_of_2(max(heads, k.shape[1])),
                             HALF=head_dim // 2, num_warps=4)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2F] (gate | up) -> silu(gate) * up, [T, F]."""
    T, two_f = gate_up.shape
    out = torch.empty(T, two_f // 2, dtype=gate_up.dtype, device=gate_up.device)
    if T:
        block = 1024
        _silu_and_mul_kernel[(T, triton.cdiv(two_f // 2, block))](
            gate_up, out, gate_up.stride(0), out.stride(0), N=two_f // 2, BLOCK=block,
            num_warps=4)
    return out
