"""The CPU kernels (csrc/cpu_kernels.pyx) against the torch reference paths they replace."""
from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minivllm import LLM, SamplingParams
from minivllm._cext import cpu_kernels
from minivllm.config import ModelConfig
from minivllm.layers.activation import SiluAndMul
from minivllm.layers.attention import TorchAttentionBackend
from minivllm.layers.cpu_attention import CpuAttentionBackend
from minivllm.layers.cpu_linear import CpuLinear, pack_weights
from minivllm.layers.kernels import AVX512_FUSED
from minivllm.layers.norm import RMSNorm
from minivllm.layers.rotary import RotaryEmbedding
from paged_steps import ragged_step, step_metadata

avx512 = pytest.mark.skipif(not cpu_kernels.supported(), reason="needs AVX-512")


def _linear(weight, bias, out_dtype=None) -> CpuLinear:
    return CpuLinear(pack_weights([weight])[0], weight.shape[0], bias, out_dtype)


DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not cpu_kernels.supported(bf16=True), reason="needs AVX512-BF16"))]


@avx512
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 5, 16, 17, 40])
@pytest.mark.parametrize("n,k,bias", [(40, 64, True), (576, 96, False), (16, 1536, False)])
def test_linear_matches_f_linear(dtype, m, n, k, bias):
    torch.manual_seed(m * n)
    weight = torch.randn(n, k).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    x = torch.randn(m, k).to(dtype)
    got = _linear(weight, b)(x)
    assert got.dtype == dtype and got.shape == (m, n)
    # The reference in fp32 from the same (rounded) inputs; the kernel rounds its output once.
    want = F.linear(x.float(), weight.float(), None if b is None else b.float())
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want, atol=tol * k ** 0.5, rtol=tol)


@avx512
def test_linear_writes_float32_logits_from_bf16():
    if not cpu_kernels.supported(bf16=True):
        pytest.skip(reason="the bf16 kernels need a CPU with AVX512-BF16")
    weight, x = torch.randn(100, 64).bfloat16(), torch.randn(3, 64).bfloat16()
    got = _linear(weight, None, torch.float32)(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, F.linear(x.float(), weight.float()), atol=1e-3, rtol=1e-4)


@avx512
def test_linear_accepts_strided_rows():
    weight, x = torch.randn(48, 32), torch.randn(7, 80)[:, 8:40]
    torch.testing.assert_close(_linear(weight, None)(x), F.linear(x, weight))


@avx512
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 576, 100])
def test_rms_norm_matches_native(dtype, hidden):
    torch.manual_seed(hidden)
    norm = RMSNorm(hidden, 1e-5, AVX512_FUSED)
    norm.weight.data = (1 + 0.1 * torch.randn(hidden)).to(dtype)
    x, residual = torch.randn(9, hidden).to(dtype), torch.randn(9, hidden).to(dtype)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(norm(x), norm.forward_native(x), **tol)
    want_out, want_residual = norm.forward_native(x, residual)
    got_out, got_residual = norm(x, residual.clone())
    assert torch.equal(got_residual, want_residual)  # one rounded add, exactly as torch's
    torch.testing.assert_close(got_out, want_out, **tol)


@avx512
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [16, 64, 40])
def test_rotary_matches_native_exactly(dtype, head_dim):
    torch.manual_seed(head_dim)
    rope = RotaryEmbedding(head_dim, 512, 10000.0, fused=AVX512_FUSED)
    qkv = torch.randn(11, (4 + 2 * 2) * head_dim).to(dtype)
    q = qkv[:, :4 * head_dim].view(11, 4, head_dim)
    k = qkv[:, 4 * head_dim:6 * head_dim].view(11, 2, head_dim)
    positions = torch.randint(0, 512, (11,))
    want_q, want_k = rope.forward_native(positions, q, k)
    got_q, got_k = rope(positions, q, k)  # in place
    assert got_q.data_ptr() == q.data_ptr()
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)


@avx512
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_native(dtype):
    torch.manual_seed(0)
    act = SiluAndMul(AVX512_FUSED)
    gate_up = (torch.randn(13, 2 * 200) * 4).to(dtype)
    gate_up[0, :4] = torch.tensor([-200.0, -80.0, 80.0, 0.0])  # exp's range ends
    tol = dict(atol=1e-6, rtol=2e-6) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(act(gate_up), act.forward_native(gate_up), **tol)


# ---- attention: random ragged steps against the reference backend ---------------------------

@avx512
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [
    (4, 2, 16, 4), (9, 3, 64, 16), (8, 8, 32, 16), (14, 2, 64, 16), (4, 1, 128, 8)])
def test_cpu_attention_matches_reference(dtype, heads, kv_heads, head_dim, block_size):
    rng = random.Random(heads * 1000 + head_dim + block_size)
    torch.manual_seed(rng.randrange(1 << 30))
    num_blocks = 64
    for _ in range(6):
        rows, tables = ragged_step(rng, block_size, num_blocks)
        T = sum(q for _, q in rows)
        # Cached prefixes: random values everywhere; the step writes its own tokens' slots.
        # Values are rounded to the dtype, so that the fp32 reference sees the kernel's inputs.
        cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim).to(dtype).float()
        # q/k/v as the model passes them: strided views into one fused projection output.
        qkv = torch.randn(T, (heads + 2 * kv_heads) * head_dim).to(dtype).float()
        q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
        shapes = ((T, heads, head_dim), (T, kv_heads, head_dim), (T, kv_heads, head_dim))
        want_cache = cache.clone()
        ref, fast = TorchAttentionBackend(), CpuAttentionBackend()
        meta_ref, meta_fast = (step_metadata(rows, tables, block_size) for _ in range(2))
        ref.prepare(meta_ref, block_size)
        fast.prepare(meta_fast, block_size)
        want = ref.forward(*(x.view(s) for x, s in zip((q, k, v), shapes)), want_cache[0],
                           want_cache[1], meta_ref, head_dim ** -0.5)
        got_cache = cache.to(dtype)
        qkv_d = qkv.to(dtype)
        qd, kd, vd = qkv_d.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
        got = fast.forward(*(x.view(s) for x, s in zip((qd, kd, vd), shapes)), got_cache[0],
                           got_cache[1], meta_fast, head_dim ** -0.5)
        assert got.dtype == dtype and got.shape == want.shape
        if dtype == torch.float32:
            assert torch.equal(got_cache, want_cache)
            torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
        else:  # the fp32 reference; the kernel computes in fp32 and rounds once at the end
            assert torch.equal(got_cache, want_cache.to(dtype))
            torch.testing.assert_close(got.float(), want, atol=1e-2, rtol=1e-2)


@avx512
def test_pack_weights_shares_one_buffer():
    weights = [torch.randn(40, 64), torch.randn(16, 96)]
    packed = pack_weights(weights)
    assert [p.shape for p in packed] == [(3, 64, 16), (1, 96, 16)]
    assert packed[1].data_ptr() == packed[0].data_ptr() + packed[0].numel() * 4
    assert torch.equal(packed[0][2, :, 8:], torch.zeros(64, 8))  # N padded to 16 columns
    assert torch.equal(packed[0][1, 5], weights[0][16:32, 5])


@avx512
def test_kernels_refuse_indices_outside_their_tables():
    rope = RotaryEmbedding(16, 8, 10000.0, fused=AVX512_FUSED)
    q, k = torch.randn(2, 2, 16), torch.randn(2, 1, 16)
    with pytest.raises(IndexError):
        rope(torch.tensor([0, 8]), q, k)
    cache = torch.zeros(2, 4, 4, 1, 16)
    meta = step_metadata([(0, 2)], np.array([[0]], dtype=np.int32), 4)
    backend = CpuAttentionBackend()
    for bad_table, bad_slot in ((4, 1), (0, 16)):
        meta.block_tables[0, 0] = bad_table
        meta.slot_mapping[1] = bad_slot
        backend.prepare(meta, 4)
        with pytest.raises(IndexError):
            backend.forward(torch.randn(2, 1, 16), k, k, cache[0], cache[1], meta, 0.25)


# ---- the kernel set: one knob, chosen once, named in one log line ----------------------------

@pytest.mark.parametrize("kernels,dtype,match", [
    ("cpu-avx2", "float32", "not built yet"), ("cpu-portable", "float32", "not built yet"),
    ("cpu-avx512", "float16", "float32 or bfloat16")])  # cuda-triton: tests/test_gpu_engine.py
def test_a_set_that_cannot_run_here_is_a_clear_error(tiny_hf_dir, kernels, dtype, match):
    with pytest.raises(ValueError, match=f"kernels={kernels!r} cannot run here: .*{match}"):
        LLM(tiny_hf_dir("llama"), dtype=dtype, device="cpu", kernels=kernels)


def test_the_knob_is_validated_and_read_from_the_environment(monkeypatch):
    with pytest.raises(ValueError, match="kernels"):
        ModelConfig(kernels="avx9")
    monkeypatch.setenv("MINIVLLM_KERNELS", "torch")
    assert ModelConfig().kernels == "torch" and ModelConfig(kernels="auto").kernels == "auto"
    monkeypatch.setenv("MINIVLLM_KERNELS", "fast")
    with pytest.raises(ValueError, match="MINIVLLM_KERNELS"):
        ModelConfig()


def test_auto_names_its_choice_in_one_log_line(tiny_hf_dir, caplog, monkeypatch):
    """auto takes the AVX-512 kernels where the CPU has them, else plain torch and says why
    (an AVX2-only CPU is simulated); asked for by name there, they are an error."""
    monkeypatch.delenv("MINIVLLM_KERNELS", raising=False)
    monkeypatch.setattr(logging.getLogger("minivllm"), "handlers", [caplog.handler])
    caplog.set_level(logging.INFO, logger="minivllm")
    path, threads = tiny_hf_dir("llama"), torch.get_num_threads()
    runner = LLM(path, dtype="float32", num_blocks=16).engine.runner
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("kernels:")]
    if cpu_kernels.supported():
        assert lines == [f"kernels: cpu-avx512 float32, {threads} threads"]
        assert isinstance(runner.kernels.attention, CpuAttentionBackend)
        assert isinstance(runner.model.lm_head, CpuLinear)
        assert isinstance(runner.model.layers[0].self_attn.qkv_proj, CpuLinear)
    caplog.clear()
    monkeypatch.setattr(cpu_kernels, "supported", lambda bf16=False: False)
    runner = LLM(path, dtype="float32", num_blocks=16).engine.runner
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("kernels:")]
    assert lines == [f"kernels: torch float32, {threads} threads (cpu-avx512 kernels need a CPU "
                     f"with AVX-512 (avx512f, avx512bw, avx512vl, avx512dq): running plain torch)"]
    assert isinstance(runner.kernels.attention, TorchAttentionBackend)
    with pytest.raises(ValueError, match="needs a CPU with AVX-512"):
        LLM(path, dtype="float32", num_blocks=16, kernels="cpu-avx512")


@avx512
@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_greedy_tokens_match_the_torch_path(tiny_hf_dir, architecture):
    """End to end, kernels against the plain torch layers and reference attention: chunked
    prefills, prefix-cache hits (shared prompt heads) and decodes across block boundaries."""
    rng = random.Random(7)
    head = [rng.randrange(3, 49152) for _ in range(21)]
    prompts = [head + [rng.randrange(3, 49152) for _ in range(rng.randint(1, 30))]
               for _ in range(5)] + [[rng.randrange(3, 49152) for _ in range(40)]]
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=20)
    kwargs = dict(dtype="float32", block_size=4, num_blocks=128, max_num_batched_tokens=24)
    path = tiny_hf_dir(architecture)
    fast = LLM(path, kernels="cpu-avx512", **kwargs).generate(prompts, params, use_tqdm=False)
    ref = LLM(path, kernels="torch", **kwargs).generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in fast] == [o.outputs[0].token_ids for o in ref]


@avx512
def test_torch_gives_the_auto_tokens_on_the_embedded_model(monkeypatch):
    monkeypatch.delenv("MINIVLLM_KERNELS", raising=False)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=8)
    tokens = {}
    for kernels in ("auto", "torch"):
        llm = LLM(dtype="float32", num_blocks=32, kernels=kernels)
        tokens[llm.engine.runner.kernels.name] = [
            o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert tokens["cpu-avx512"] == tokens["torch"]
