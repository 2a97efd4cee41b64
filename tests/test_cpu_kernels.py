"""The CPU kernels (csrc/cpu_kernels.pyx) against the torch reference paths they replace, on
every ISA path this CPU runs (the others skip, saying what the CPU lacks)."""
from __future__ import annotations

import functools
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
from minivllm.layers.kernels import cpu_fused
from minivllm.layers.norm import RMSNorm
from minivllm.layers.rotary import RotaryEmbedding
from paged_steps import ragged_step, step_metadata

ISAS = [pytest.param(isa, marks=pytest.mark.skipif(
    cpu_kernels.missing(isa) is not None, reason=f"needs {cpu_kernels.missing(isa)}"))
    for isa in cpu_kernels.ISAS]


@pytest.fixture(params=ISAS)
def kernels(request) -> cpu_kernels.CpuKernels:
    return cpu_kernels.CpuKernels(request.param)


def _linear(kernels, weight, bias, out_dtype=None) -> CpuLinear:
    return CpuLinear(pack_weights([weight])[0], weight.shape[0], bias, kernels, out_dtype)


DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
# Row counts around each path's tile height (AVX-512 16, AVX2 6, portable 4) and its tails.
@pytest.mark.parametrize("m", [1, 5, 7, 16, 17, 40])
# N off and on 16 columns; an odd K in fp32 (bf16 panels pair K: 34 there).
@pytest.mark.parametrize("n,k,bias", [(40, 64, True), (576, 96, False), (16, 1536, False),
                                      (23, 33, True)])
def test_linear_matches_f_linear(kernels, dtype, m, n, k, bias):
    k += k % 2 * (dtype == torch.bfloat16)
    torch.manual_seed(m * n)
    weight = torch.randn(n, k).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    x = torch.randn(m, k).to(dtype)
    got = _linear(kernels, weight, b)(x)
    assert got.dtype == dtype and got.shape == (m, n)
    # The reference in fp32 from the same (rounded) inputs; the kernel rounds its output once.
    want = F.linear(x.float(), weight.float(), None if b is None else b.float())
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want, atol=tol * k ** 0.5, rtol=tol)


def test_linear_writes_float32_logits_from_bf16(kernels):
    weight, x = torch.randn(100, 64).bfloat16(), torch.randn(3, 64).bfloat16()
    got = _linear(kernels, weight, None, torch.float32)(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, F.linear(x.float(), weight.float()), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_accepts_strided_rows(kernels, dtype):
    weight, x = torch.randn(48, 32).to(dtype), torch.randn(7, 80).to(dtype)[:, 8:40]
    torch.testing.assert_close(_linear(kernels, weight, None, torch.float32)(x),
                               F.linear(x.float(), weight.float()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 576, 100])
def test_rms_norm_matches_native(kernels, dtype, hidden):
    torch.manual_seed(hidden)
    norm = RMSNorm(hidden, 1e-5, cpu_fused(kernels))
    norm.weight.data = (1 + 0.1 * torch.randn(hidden)).to(dtype)
    x, residual = torch.randn(9, hidden).to(dtype), torch.randn(9, hidden).to(dtype)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(norm(x), norm.forward_native(x), **tol)
    want_out, want_residual = norm.forward_native(x, residual)
    got_out, got_residual = norm(x, residual.clone())
    assert torch.equal(got_residual, want_residual)  # one rounded add, exactly as torch's
    torch.testing.assert_close(got_out, want_out, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [16, 64, 40])
def test_rotary_matches_native_exactly(kernels, dtype, head_dim):
    torch.manual_seed(head_dim)
    rope = RotaryEmbedding(head_dim, 512, 10000.0, fused=cpu_fused(kernels))
    qkv = torch.randn(11, (4 + 2 * 2) * head_dim).to(dtype)
    q = qkv[:, :4 * head_dim].view(11, 4, head_dim)
    k = qkv[:, 4 * head_dim:6 * head_dim].view(11, 2, head_dim)
    positions = torch.randint(0, 512, (11,))
    want_q, want_k = rope.forward_native(positions, q, k)
    got_q, got_k = rope(positions, q, k)  # in place
    assert got_q.data_ptr() == q.data_ptr()
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_native(kernels, dtype):
    torch.manual_seed(0)
    act = SiluAndMul(cpu_fused(kernels))
    gate_up = (torch.randn(13, 2 * 200) * 4).to(dtype)
    gate_up[0, :4] = torch.tensor([-200.0, -80.0, 80.0, 0.0])  # exp's range ends
    tol = dict(atol=1e-6, rtol=2e-6) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(act(gate_up), act.forward_native(gate_up), **tol)


def test_argmax_is_torch_argmax(kernels):
    """The greedy sampler's argmax: ties (first wins), infinities, NaNs (the first NaN wins, as
    torch's), tails of every width, strided rows."""
    torch.manual_seed(0)
    rows = torch.randn(12, 49152 + 7)
    rows[1, 100:] = rows[1, 5]  # a tie: the first
    rows[2] = float("-inf")
    rows[3, 9] = float("inf")
    rows[4, 30000] = float("nan")
    rows[5, 17] = float("inf")
    rows[5, 40000] = float("nan")  # a NaN after an infinite maximum still wins
    rows[6, 49152 + 6] = 1e9  # in the tail
    rows[7, :] = -3.0
    rows[8, 20] = float("nan")
    rows[8, 10] = float("inf")
    for view in (rows, rows[:, :49152], rows[:, :33], rows[:, :1]):
        assert torch.equal(kernels.argmax(view), view.argmax(dim=-1)), view.shape
    with pytest.raises(ValueError, match="float32"):
        kernels.argmax(rows.bfloat16())


def test_mask_rows_is_xgrammars_mask(kernels):
    """Grammar masks: the same -inf as xgrammar's own kernel, on the rows asked only, for words
    of all ones, all zeros and mixed bits, and a vocabulary that ends mid-word."""
    xgrammar = pytest.importorskip("xgrammar")
    torch.manual_seed(1)
    vocab = 49152 + 7
    logits = torch.randn(12, vocab)
    bitmask = xgrammar.allocate_token_bitmask(16, vocab)  # more rows than the step's, as ours
    bitmask.random_(-2**31, 2**31 - 1)
    bitmask[:, ::3] = -1  # every token of the word allowed
    bitmask[:, 1::5] = 0  # none
    bitmask[7] = 0        # a row refusing everything
    rows = [0, 3, 7, 11]
    want = logits.clone()
    xgrammar.apply_token_bitmask_inplace(want, bitmask, vocab_size=vocab, indices=rows)
    got = logits.clone()
    kernels.mask_rows_(got, bitmask, torch.tensor(rows))
    assert torch.equal(got, want)
    assert torch.equal(got[1], logits[1]) and got[7].eq(float("-inf")).all()
    with pytest.raises(IndexError, match="row"):
        kernels.mask_rows_(got, bitmask, torch.tensor([2, 12]))
    assert torch.equal(got, want)  # nothing touched
    with pytest.raises(ValueError, match="float32"):
        kernels.mask_rows_(logits.bfloat16(), bitmask, torch.tensor(rows))
    with pytest.raises(ValueError, match="bitmask"):
        kernels.mask_rows_(logits, bitmask[:, :-1].contiguous(), torch.tensor(rows))


# ---- attention: random ragged steps against the reference backend ---------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [
    (4, 2, 16, 4), (9, 3, 64, 16), (8, 8, 32, 16), (14, 2, 64, 16), (4, 1, 128, 8),
    (2, 1, 256, 16)])
def test_cpu_attention_matches_reference(kernels, dtype, heads, kv_heads, head_dim, block_size):
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
        ref, fast = TorchAttentionBackend(), CpuAttentionBackend(kernels)
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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (9, 3), (8, 2), (16, 2)])
def test_cpu_attention_long_contexts_every_gqa_ratio(kernels, dtype, heads, kv_heads):
    """The query heads of a KV head read its rows together (GQA ratios 1, 3, 4, 8): long,
    odd contexts, decodes and a chunk after a long cached prefix, against the reference."""
    head_dim, block_size = 64, 16
    rows = [(1020, 1), (517, 1), (333, 37), (0, 1), (1, 1), (700, 19)]
    need = [-(-(c + q) // block_size) for c, q in rows]
    num_blocks = sum(need) + 3
    blocks = np.random.RandomState(kv_heads).permutation(num_blocks)
    tables = np.zeros((len(rows), max(need)), dtype=np.int32)
    for i, n in enumerate(need):
        tables[i, :n], blocks = blocks[:n], blocks[n:]
    torch.manual_seed(heads)
    T = sum(q for _, q in rows)
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim).to(dtype)
    q = torch.randn(T, heads, head_dim).to(dtype)
    k, v = torch.randn(2, T, kv_heads, head_dim).to(dtype)
    ref, fast = TorchAttentionBackend(), CpuAttentionBackend(kernels)
    meta_ref, meta_fast = (step_metadata(rows, tables, block_size) for _ in range(2))
    ref.prepare(meta_ref, block_size)
    fast.prepare(meta_fast, block_size)
    want_cache = cache.float()
    want = ref.forward(q.float(), k.float(), v.float(), want_cache[0], want_cache[1], meta_ref,
                       head_dim ** -0.5)
    got = fast.forward(q, k, v, cache[0], cache[1], meta_fast, head_dim ** -0.5)
    assert torch.equal(cache.float(), want_cache)
    tol = dict(atol=2e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(got.float(), want, **tol)


def test_pack_weights_shares_one_buffer():
    weights = [torch.randn(40, 64), torch.randn(16, 96)]
    packed = pack_weights(weights)
    assert [p.shape for p in packed] == [(3, 64, 16), (1, 96, 16)]
    assert packed[1].data_ptr() == packed[0].data_ptr() + packed[0].numel() * 4
    assert torch.equal(packed[0][2, :, 8:], torch.zeros(64, 8))  # N padded to 16 columns
    assert torch.equal(packed[0][1, 5], weights[0][16:32, 5])


def test_kernels_refuse_indices_outside_their_tables(kernels):
    rope = RotaryEmbedding(16, 8, 10000.0, fused=cpu_fused(kernels))
    q, k = torch.randn(2, 2, 16), torch.randn(2, 1, 16)
    with pytest.raises(IndexError):
        rope(torch.tensor([0, 8]), q, k)
    cache = torch.zeros(2, 4, 4, 1, 16)
    meta = step_metadata([(0, 2)], np.array([[0]], dtype=np.int32), 4)
    backend = CpuAttentionBackend(kernels)
    for bad_table, bad_slot in ((4, 1), (0, 16)):
        meta.block_tables[0, 0] = bad_table
        meta.slot_mapping[1] = bad_slot
        backend.prepare(meta, 4)
        with pytest.raises(IndexError):
            backend.forward(torch.randn(2, 1, 16), k, k, cache[0], cache[1], meta, 0.25)


# ---- the kernel set: one knob, chosen once, named in one log line ----------------------------

CPU_SETS = [pytest.param(f"cpu-{p.values[0]}", marks=p.marks) for p in ISAS]


def _lacking(monkeypatch, *isas: str) -> None:
    """Simulates a CPU without the given ISAs, for kernels.py and CpuKernels alike."""
    real = cpu_kernels.missing
    monkeypatch.setattr(cpu_kernels, "missing",
                        lambda isa: f"a CPU with {isa} (simulated)" if isa in isas else real(isa))


@pytest.mark.parametrize("kernels,dtype,match", [
    ("cpu-avx512", "float16", "float32 or bfloat16"), ("cpu-portable", "float16", "float32"),
    ("cpu-avx2", "float32", "a CPU with avx2 \\(simulated\\)")])  # cuda-triton: test_gpu_engine
def test_a_set_that_cannot_run_here_is_a_clear_error(tiny_hf_dir, monkeypatch, kernels, dtype,
                                                     match):
    _lacking(monkeypatch, "avx2")
    with pytest.raises(ValueError, match=f"kernels={kernels!r} cannot run here: .*{match}"):
        LLM(tiny_hf_dir("llama"), dtype=dtype, device="cpu", kernels=kernels)


def test_an_isa_the_cpu_lacks_is_refused_before_any_kernel_runs(monkeypatch):
    with pytest.raises(ValueError, match="unknown ISA"):
        cpu_kernels.CpuKernels("avx9")
    _lacking(monkeypatch, "avx512")
    with pytest.raises(ValueError, match="the avx512 kernels need a CPU with avx512"):
        cpu_kernels.CpuKernels("avx512")


def test_the_knob_is_validated_and_read_from_the_environment(monkeypatch):
    with pytest.raises(ValueError, match="kernels"):
        ModelConfig(kernels="avx9")
    monkeypatch.setenv("MINIVLLM_KERNELS", "torch")
    assert ModelConfig().kernels == "torch" and ModelConfig(kernels="auto").kernels == "auto"
    monkeypatch.setenv("MINIVLLM_KERNELS", "fast")
    with pytest.raises(ValueError, match="MINIVLLM_KERNELS"):
        ModelConfig()


def test_auto_names_its_choice_in_one_log_line(tiny_hf_dir, caplog, monkeypatch):
    """auto takes the best CPU path the CPU has (CPUs without AVX-512, or without AVX2 either,
    are simulated), or plain torch with the reason where no path runs (float16)."""
    monkeypatch.delenv("MINIVLLM_KERNELS", raising=False)
    monkeypatch.setattr(logging.getLogger("minivllm"), "handlers", [caplog.handler])
    monkeypatch.setattr(logging.getLogger("minivllm"), "propagate", False)  # once, not twice
    caplog.set_level(logging.INFO, logger="minivllm")
    path, threads = tiny_hf_dir("llama"), torch.get_num_threads()

    def start(dtype: str = "float32"):
        caplog.clear()
        runner = LLM(path, dtype=dtype, num_blocks=16).engine.runner
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("kernels:")]
        return runner, lines

    best = next(isa for isa in cpu_kernels.ISAS if cpu_kernels.missing(isa) is None)
    runner, lines = start("auto")  # the checkpoint is float32; bf16 is the CPU paths' fastest
    assert lines == [f"kernels: cpu-{best} bfloat16, {threads} threads (dtype auto: bfloat16, "
                     f"the fastest on these kernels)"]
    assert runner.dtype == torch.bfloat16
    runner, lines = start()
    assert lines == [f"kernels: cpu-{best} float32, {threads} threads"]
    assert isinstance(runner.kernels.attention, CpuAttentionBackend)
    assert isinstance(runner.model.lm_head, CpuLinear)
    assert isinstance(runner.model.layers[0].self_attn.qkv_proj, CpuLinear)
    assert runner.model.lm_head.kernels.isa == best
    runner, lines = start("float16")
    assert lines == [f"kernels: torch float16, {threads} threads (cpu-avx512 kernels need "
                     f"float32 or bfloat16, not float16: running plain torch)"]
    assert isinstance(runner.kernels.attention, TorchAttentionBackend)
    _lacking(monkeypatch, "avx512")
    if cpu_kernels.missing("avx2") is None:
        assert start()[1] == [f"kernels: cpu-avx2 float32, {threads} threads"]
    with pytest.raises(ValueError, match="needs a CPU with avx512"):
        LLM(path, dtype="float32", num_blocks=16, kernels="cpu-avx512")
    _lacking(monkeypatch, "avx512", "avx2")
    assert start()[1] == [f"kernels: cpu-portable float32, {threads} threads"]


@functools.lru_cache(maxsize=None)
def _greedy_tokens(path: str, kernels: str, prompts: tuple, max_tokens: int, **kwargs) -> list:
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=max_tokens)
    llm = LLM(path, kernels=kernels, **kwargs)
    assert llm.engine.runner.kernels.name == kernels
    return [o.outputs[0].token_ids for o in llm.generate(list(prompts), params, use_tqdm=False)]


@pytest.mark.parametrize("kernels", CPU_SETS)
@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_greedy_tokens_match_the_torch_path(tiny_hf_dir, architecture, kernels):
    """End to end, kernels against the plain torch layers and reference attention: chunked
    prefills, prefix-cache hits (shared prompt heads) and decodes across block boundaries."""
    rng = random.Random(7)
    head = [rng.randrange(3, 49152) for _ in range(21)]
    prompts = tuple(tuple(head + [rng.randrange(3, 49152) for _ in range(rng.randint(1, 30))])
                    for _ in range(5)) + (tuple(rng.randrange(3, 49152) for _ in range(40)),)
    kwargs = dict(dtype="float32", block_size=4, num_blocks=128, max_num_batched_tokens=24)
    path = tiny_hf_dir(architecture)
    assert (_greedy_tokens(path, kernels, prompts, 20, **kwargs)
            == _greedy_tokens(path, "torch", prompts, 20, **kwargs))


@pytest.mark.parametrize("kernels", CPU_SETS)
def test_the_embedded_model_gives_the_torch_tokens(kernels):
    prompts = ("The capital of France is", "def fibonacci(n):")
    kwargs = dict(dtype="float32", num_blocks=32)
    # The kernels keep the file's Q4_1 / Q8_0 blocks (fp32 inputs); torch dequantizes at load.
    assert (_greedy_tokens(None, kernels, prompts, 8, quantization="gguf-native", **kwargs)
            == _greedy_tokens(None, "torch", prompts, 8, **kwargs))


# ---- the decoder stack in one call, against the module graph it replaces ---------------------

class _BothForwards:
    """A step model that runs the module graph and the C decoder on every step and checks that
    they agree exactly (they write the same keys and values into the cache)."""

    def __init__(self, runner) -> None:
        self.model, self.decoder, self.steps = runner.model, runner.step_model, 0

    def __call__(self, input_ids, positions, meta):
        want = self.model(input_ids, positions, meta).clone()
        got = self.decoder(input_ids, positions, meta)
        assert torch.equal(got, want)
        self.steps += 1
        return got

    def compute_logits(self, hidden):
        want = self.model.compute_logits(hidden)
        got = self.decoder.compute_logits(hidden)
        assert got.dtype == torch.float32 and torch.equal(got, want)
        return got


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decoder_matches_the_module_graph(tiny_hf_dir, kernels, dtype):
    """Chunked prefills, prefix-cache hits and decodes; qwen2 for the qkv bias."""
    llm = LLM(tiny_hf_dir("qwen2"), kernels=f"cpu-{kernels.isa}", dtype=dtype, block_size=4,
              num_blocks=64, max_num_batched_tokens=16)
    both = llm.engine.runner.step_model = _BothForwards(llm.engine.runner)
    rng = random.Random(3)
    head = [rng.randrange(3, 49152) for _ in range(9)]
    prompts = [head + [rng.randrange(3, 49152) for _ in range(n)] for n in (1, 12, 30)]
    llm.generate(prompts, SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=6),
                 use_tqdm=False)
    assert both.steps >= 8


def test_kernels_run_on_torchs_openmp_threads():
    """One OpenMP runtime in the process: the kernels' threads are torch's."""
    with open("/proc/self/maps") as f:
        runtimes = {line.split()[-1] for line in f if "libgomp" in line or "libiomp" in line}
    assert len(runtimes) == 1, runtimes
    old = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert cpu_kernels.num_threads() == n
    finally:
        torch.set_num_threads(old)


def test_thread_choice_runs_the_faster_count_and_probes_the_other(monkeypatch):
    """ThreadChoice (layers/cpu_decoder.py) on a clock where a step's time depends on the
    thread count: contended (2 threads 20x slower), then quiet (2 threads 1.5x faster)."""
    from minivllm.layers.cpu_decoder import ThreadChoice

    counts = []  # the clock decides here, not the real threads
    monkeypatch.setattr(torch, "set_num_threads", counts.append)
    cost, now = {1: 1.0, 2: 20.0}, [0.0]
    choice = ThreadChoice(2, clock=lambda: now[0])

    def run(steps: int) -> list[int]:
        ran = []
        for _ in range(steps):
            n = choice.choose(1)
            now[0] += cost[n]
            choice.done()
            assert counts[-1:] in ([], [2])  # the process's count is given back every step
            ran.append(n)
        return ran

    ran = run(2000)
    assert ran[:2] == [2, 1] and 2 in ran[2:]  # both timed, then the slower one probed again
    time_2 = sum(cost[n] for n in ran[2:] if n == 2)
    assert time_2 < 0.1 * sum(cost[n] for n in ran[2:])  # probes cost little
    cost.update({1: 1.5, 2: 1.0})
    ran = run(2000)[-500:]  # back to both threads once they are faster, probing one
    assert ran.count(2) > 0.95 * len(ran) and 1 in ran
    assert ThreadChoice(1).choose(16) == 1
