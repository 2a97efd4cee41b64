"""GGUF quantized weights on the CPU kernels (csrc/cpu_quant.h, `qlinear`): against
gguf.quants.dequantize then torch, on every ISA path this CPU runs (the others skip, saying what
the CPU lacks), and end to end on the embedded Q4_1 / Q8_0 model."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from minivllm import LLM, SamplingParams
from minivllm._cext import cpu_kernels
from minivllm.layers.cpu_linear import (CpuLinear, pack_weights, quantization_mode,
                                        quantized_modules)

ISAS = [pytest.param(isa, marks=pytest.mark.skipif(
    cpu_kernels.missing(isa) is not None, reason=f"needs {cpu_kernels.missing(isa)}"))
    for isa in cpu_kernels.ISAS]
QTYPES = [GGMLQuantizationType[name] for name in cpu_kernels.QUANT_TYPES]


def random_blocks(qtype: GGMLQuantizationType, n: int, k: int, rng: np.random.Generator
                  ) -> np.ndarray:
    """Valid blocks of an [n, k] weight: random quants, finite fp16 scales (and mins)."""
    block, nbytes = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n, k // block, nbytes), dtype=np.uint8)
    scales = 2 if qtype in (GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q4_K) else 1
    # byte offsets of the fp16 scale (and min): Q6_K keeps its d last
    offsets = [208] if qtype == GGMLQuantizationType.Q6_K else [0, 2][:scales]
    for at, spread in zip(offsets, (0.02, 0.2)):
        raw[:, :, at:at + 2] = (rng.standard_normal((n, k // block, 1)) * spread
                                ).astype(np.float16).view(np.uint8)
    return raw.reshape(n, -1)


def _shapes(qtype: GGMLQuantizationType, shapes: list) -> list:
    """(m, n, k) with k in whole file blocks: Q4_K's super-blocks take 256 features."""
    block = GGML_QUANT_SIZES[qtype][0]
    return [(m, n, -(-k // block) * block if block > 32 else k) for m, n, k in shapes]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", QTYPES, ids=lambda t: t.name)
def test_quantized_linear_matches_the_dequantize_oracle(isa, qtype):
    """Rows around each path's tile height (AVX-512 16, AVX2 4, portable 2) and past it; N off
    16 columns; K of 1, 3, 5 and 18 blocks (not a multiple of 64; Q4_K: 1-3 super-blocks of
    256, each of 8 sub-blocks); fp32 and bf16 inputs."""
    kernels, rng = cpu_kernels.CpuKernels(isa), np.random.default_rng(int(qtype))
    for m, n, k in _shapes(qtype, [(1, 37, 96), (17, 33, 160), (5, 16, 32), (40, 50, 576)]):
        raw = random_blocks(qtype, n, k, rng)
        w = torch.from_numpy(dequantize(raw, qtype))
        layer = CpuLinear(pack_weights([(int(qtype), raw)])[0], n, torch.randn(n), kernels,
                          qtype=int(qtype))
        x = torch.from_numpy(rng.standard_normal((m, k), dtype=np.float32))
        want = x @ w.T + layer.bias
        # The weights are the oracle's bit for bit: what differs is fp32 summation order.
        bound = (x.abs() @ w.abs().T) * 1e-5 + 1e-6
        assert ((layer(x) - want).abs() <= bound).all(), (m, n, k)
        xb = x.bfloat16()
        want = xb.float() @ w.T + layer.bias
        got = layer(xb)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want, rtol=2 ** -8, atol=1e-3)


INT8 = pytest.mark.skipif(
    cpu_kernels.missing("avx512") is not None or not cpu_kernels.CpuKernels("avx512").int8_dot,
    reason="the int8 path needs AVX-512 with AVX512-VNNI")


@INT8
@pytest.mark.parametrize("qtype", QTYPES, ids=lambda t: t.name)
def test_int8_path_matches_the_oracle_on_quantized_inputs(qtype):
    """The oracle: inputs rounded per block of 32 to xd * int8 with xd = max|x| / 127 (what
    llama.cpp's Q8_0 activations hold), times the dequantized weights; Q6_K (two scales a
    block) takes fp32 inputs there."""
    kernels, rng = cpu_kernels.CpuKernels("avx512"), np.random.default_rng(int(qtype) + 1)
    for m, n, k in _shapes(qtype, [(1, 37, 96), (13, 33, 160), (25, 50, 576)]):
        raw = random_blocks(qtype, n, k, rng)
        w = torch.from_numpy(dequantize(raw, qtype))
        layer = CpuLinear(pack_weights([(int(qtype), raw)])[0], n, None, kernels,
                          qtype=int(qtype), act_q8=True)
        x = torch.from_numpy(rng.standard_normal((m, k), dtype=np.float32))
        blocks = x.view(m, k // 32, 32)
        xd = blocks.abs().amax(-1, keepdim=True) / 127
        rounded = torch.round(blocks * (1 / xd)) * xd  # times the reciprocal, as llama.cpp
        want = (x if qtype == GGMLQuantizationType.Q6_K else rounded.view(m, k)) @ w.T
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5 * want.abs().max())
        assert layer(x.bfloat16()).dtype == torch.bfloat16


def test_packing_refuses_what_no_kernel_runs():
    with pytest.raises(ValueError, match="multiple of 32"):
        cpu_kernels.quant_packed_shape(int(GGMLQuantizationType.Q4_1), 16, 48)
    with pytest.raises(ValueError, match="no kernel runs ggml type 13"):
        cpu_kernels.quant_packed_shape(int(GGMLQuantizationType.Q5_K), 16, 256)


# ---- the embedded model, end to end -----------------------------------------------------------

PARITY_PROMPTS = ["The capital of France is", "def fibonacci(n):",
                  "Write a haiku about the sea.", "1, 2, 3, 4,"]


def _greedy(llm: LLM) -> list:
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=16)
    return [o.outputs[0].token_ids for o in llm.generate(PARITY_PROMPTS, params, use_tqdm=False)]


_FP32_INPUTS: list = []  # the gguf-native fp32 path's tokens, for the int8 path's agreement


@pytest.fixture
def minivllm_log(caplog, monkeypatch):
    """caplog for the `minivllm` logger, which does not propagate to the root."""
    monkeypatch.setattr(logging.getLogger("minivllm"), "handlers", [caplog.handler])
    monkeypatch.setattr(logging.getLogger("minivllm"), "propagate", False)
    caplog.set_level(logging.INFO, logger="minivllm")
    return caplog


def test_the_embedded_model_runs_4_bit_with_the_dequantized_tokens(minivllm_log):
    """fp32 activations: greedy tokens equal to the weights dequantized at load, with the
    linears and the tied embedding held as the file's Q4_1 / Q8_0 blocks (0.16x fp32 bytes)."""
    native = LLM(None, dtype="float32", num_blocks=32, quantization="gguf-native")
    caplog = minivllm_log
    assert "quantization: gguf-native (asked for)" in caplog.text
    model = native.engine.runner.model
    assert model.embed_tokens.weight.numel() == 0  # looked up in the quantized head
    linears = [m for m in model.modules() if isinstance(m, CpuLinear)]
    assert {m.qtype for m in linears} == {int(GGMLQuantizationType.Q4_1),
                                          int(GGMLQuantizationType.Q8_0)}
    held = sum(m.packed.numel() for m in linears)
    assert held <= 0.2 * 134_515_008 * 4
    got = _greedy(native)
    del native
    assert got == _greedy(LLM(None, dtype="float32", num_blocks=32, quantization="none"))
    _FP32_INPUTS[:] = got


@INT8
def test_the_int8_path_tokens_agree_with_fp32_inputs():
    """Teacher-forced: at each position of the fp32-input path's own continuation, the int8
    path's greedy choice. bench/gguf_native.py measures it on the 16 chat prompts x 64 tokens
    (96.8 % there, in bench/results/gguf_native_cpu.json); here 62 of 64 agree."""
    from bench.gguf_native import agreement

    llm = LLM(None, dtype="float32", num_blocks=32, quantization="gguf-native-q8")
    assert llm.engine.runner.model.lm_head.act_q8
    reference = _FP32_INPUTS or _greedy(LLM(None, dtype="float32", num_blocks=32,
                                            quantization="gguf-native"))
    tok = llm.get_tokenizer()
    work = [(tok.encode(p), 16) for p in PARITY_PROMPTS]
    assert agreement(llm, work, reference) >= 0.9


@pytest.mark.parametrize("isa", ISAS)
def test_auto_names_its_mode_in_one_log_line(isa, minivllm_log):
    """float32 keeps fp32 inputs (parity) where the GGUF blocks are faster than dense weights
    (not on the portable path); bf16 takes dense weights (the int8 path is opt-in)."""
    kernels = cpu_kernels.CpuKernels(isa)
    fp32 = quantization_mode("auto", "gguf", kernels, torch.float32)
    assert fp32 == ("none" if isa == "portable" else "gguf-native")
    bf16 = quantization_mode("auto", "gguf", kernels, torch.bfloat16)
    assert bf16 == "none"
    lines = [r.getMessage() for r in minivllm_log.records]
    assert lines[0].startswith(f"quantization: {fp32} (auto: ")
    assert lines[1].startswith(f"quantization: {bf16} (auto: ")
    assert quantization_mode("auto", "hf", kernels, torch.bfloat16) == "none"
    if not kernels.int8_dot:
        with pytest.raises(ValueError, match="gguf-native-q8 needs AVX-512 kernels"):
            quantization_mode("gguf-native-q8", "gguf", kernels, torch.float32)
