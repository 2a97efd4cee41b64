"""The fused Triton kernels (RMSNorm + residual, rotary, SiLU-and-mul) against the torch ops
they replace (the layers' forward_native), in bf16 and fp32. Without CUDA they run under
Triton's interpreter (TRITON_INTERPRET=1, set before the kernels are defined)."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from minivllm.layers.activation import SiluAndMul
from minivllm.layers.norm import RMSNorm
from minivllm.layers.rotary import RotaryEmbedding

HAVE_TRITON = importlib.util.find_spec("triton") is not None
ON_GPU = torch.cuda.is_available()
if HAVE_TRITON and not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"
pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="needs triton (pip install triton)")
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.bfloat16, torch.float32]


def _kernels():
    from minivllm.layers import triton_fused
    return triton_fused


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """Same roundings as the torch ops; fp32 summation order and exp/rsqrt implementations
    may move a result by one unit in the last place of the dtype, rarely."""
    assert got.dtype == want.dtype and got.shape == want.shape
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -22
    torch.testing.assert_close(got, want, atol=1e-6, rtol=ulp)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 576, 896])
def test_rms_norm_with_and_without_residual(dtype, hidden):
    torch.manual_seed(hidden)
    norm = RMSNorm(hidden, 1e-6).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(hidden))
    weight = norm.weight.detach().to(dtype)
    x = torch.randn(7, hidden, device=DEVICE).to(dtype)
    res = torch.randn(7, hidden, device=DEVICE).to(dtype)
    norm = norm.to(dtype)
    want = norm.forward_native(x)
    _close(_kernels().rms_norm(x, None, weight, 1e-6), want, dtype)
    want_out, want_res = norm.forward_native(x, res.clone())
    res_inplace = res.clone()
    got = _kernels().rms_norm(x, res_inplace, weight, 1e-6)
    assert torch.equal(res_inplace, want_res)  # x + residual, written in place
    _close(got, want_out, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (14, 2, 64), (8, 2, 128)])
def test_rotary_in_place_on_strided_views(dtype, heads, kv_heads, head_dim):
    torch.manual_seed(heads)
    rope = RotaryEmbedding(head_dim, 4096, 500000.0).to(DEVICE)
    T = 6
    qkv = torch.randn(T, (heads + 2 * kv_heads) * head_dim, device=DEVICE).to(dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    q, k = q.view(T, heads, head_dim), k.view(T, kv_heads, head_dim)
    positions = torch.tensor([0, 1, 17, 300, 4095, 2048], device=DEVICE)
    want_q, want_k = rope.forward_native(positions, q, k)
    v_before = v.clone()
    _kernels().rotary_(positions, rope.cos, rope.sin, q, k)
    if dtype == torch.bfloat16:  # every product and sum rounded as torch rounds: the same bits
        assert torch.equal(q, want_q) and torch.equal(k, want_k)
    else:  # fp32: the compiler may fuse a product and a sum into one FMA (one rounding less)
        _close(q, want_q, dtype)
        _close(k, want_k, dtype)
    assert torch.equal(v, v_before)  # the neighbouring columns of the fused output untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [128, 1536, 4864])
def test_silu_and_mul(dtype, width):
    torch.manual_seed(width)
    gate_up = (3 * torch.randn(5, 2 * width, device=DEVICE)).to(dtype)
    _close(_kernels().silu_and_mul(gate_up), SiluAndMul.forward_native(gate_up), dtype)
