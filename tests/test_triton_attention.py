"""The Triton paged-attention kernels against the torch reference backend.

On a machine without CUDA the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set
below before the kernels are defined), which executes them on the CPU with numpy: the same
indexing, masking and online softmax as on the GPU, so a wrong offset or mask fails here.
Errors are relative, ||out - ref|| / ||ref||, against a float64 reference on the same
(rounded) inputs: bf16 operands land between 1e-3 and 1e-2, fp32 far under 1e-3.
"""
from __future__ import annotations

import importlib.util
import os
import random

import numpy as np
import pytest
import torch

from minivllm.layers.attention import AttentionMetadata, TorchAttentionBackend
from paged_steps import ragged_step, step_metadata

HAVE_TRITON = importlib.util.find_spec("triton") is not None
ON_GPU = torch.cuda.is_available()
if HAVE_TRITON and not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated, at import
pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="needs triton (pip install triton)")
DEVICE = "cuda" if ON_GPU else "cpu"



def _backend():
    from minivllm.layers.triton_attention import TritonAttentionBackend
    return TritonAttentionBackend()


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [
    (9, 3, 64, 16),     # SmolLM2: groups of 3
    (14, 2, 64, 16),    # Qwen2.5-0.5B: groups of 7
    (4, 4, 32, 8),      # no GQA, blocks smaller than a key tile
    (8, 2, 128, 32),    # Llama-3 head size, blocks of 32
])
def test_matches_reference_on_ragged_steps(dtype, heads, kv_heads, head_dim, block_size):
    rng = random.Random(heads * 1000 + head_dim + block_size)
    torch.manual_seed(rng.randrange(1 << 30))
    for _ in range(3):
        rows, tables = ragged_step(rng, block_size, 48)
        _check(_backend(), rows, tables, dtype, heads, kv_heads, head_dim, block_size, 48)


@pytest.mark.parametrize("fused", [False, True], ids=["combine-kernel", "fused-combine"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_split_kv_decode_matches_reference_at_long_contexts(dtype, fused):
    """Flash-decoding: contexts cut into runs (odd lengths, a run of one token, one exactly
    one run long), a one-token prompt, a prefill chunk beside them, GQA groups of 7; the
    partials merged by a second kernel or by each context's last split. On the CPU the
    interpreter gets short contexts and small runs; the GPU the real lengths."""
    backend = _backend()
    backend.FUSED_COMBINE = fused
    if ON_GPU:
        lengths, block_size = [30001, 7900, 257, 256, 4097], 16
    else:
        backend.MIN_SPLIT, backend.num_sms = 64, 64
        lengths, block_size = [599, 64, 65, 193, 130], 16
    rows = [(n - 1, 1) for n in lengths] + [(0, 1), (40, 19)]
    assert backend.decode_splits(len(rows), 2) > 1
    need = [-(-(c + q) // block_size) for c, q in rows]
    rng = random.Random(7)
    blocks = rng.sample(range(sum(need) + 8), sum(need))
    tables = np.zeros((len(rows), max(need)), dtype=np.int32)
    for i, n in enumerate(need):
        tables[i, :n], blocks = blocks[:n], blocks[n:]
    torch.manual_seed(7)
    for _ in range(2):  # twice: the arrival counts are left at zero for the next launch
        _check(backend, rows, tables, dtype, 14, 2, 64, block_size, sum(need) + 8)
    if fused:
        assert not backend._arrived.any()


def _check(backend, rows, tables, dtype, heads, kv_heads, head_dim, block_size, num_blocks):
    """The backend's write and attention of one step against the float64 reference."""
    T = sum(q for _, q in rows)
    # Fresh random cache (the cached prefixes) and q/k/v as the model passes them: strided
    # views into one fused projection output. Rounded to dtype first, so that the float64
    # reference sees exactly the kernels' inputs.
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim).to(dtype)
    qkv = torch.randn(T, (heads + 2 * kv_heads) * head_dim).to(dtype)
    sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    shapes = ((T, heads, head_dim), (T, kv_heads, head_dim), (T, kv_heads, head_dim))
    ref_cache = cache.double()
    meta_ref = step_metadata(rows, tables, block_size, "cpu")
    ref = TorchAttentionBackend()
    ref.prepare(meta_ref, block_size)
    want = ref.forward(*(x.view(s) for x, s in zip(qkv.double().split(sizes, -1), shapes)),
                       ref_cache[0], ref_cache[1], meta_ref, head_dim ** -0.5)

    got_cache = cache.to(DEVICE)
    meta = step_metadata(rows, tables, block_size, DEVICE)
    backend.prepare(meta, block_size)
    got = backend.forward(*(x.view(s) for x, s in zip(qkv.to(DEVICE).split(sizes, -1), shapes)),
                          got_cache[0], got_cache[1], meta, head_dim ** -0.5)
    assert got.dtype == dtype and got.shape == want.shape
    assert torch.equal(got_cache.cpu(), ref_cache.to(dtype))  # the write is an exact copy
    err = _rel_err(got.cpu(), want)
    assert err < (1e-2 if dtype == torch.bfloat16 else 1e-4), (rows, err)


def test_every_output_row_is_written():
    """Outputs poisoned with NaN before the kernels run: each query's row must be overwritten,
    in a mixed step of decodes, a one-token chunk, a chunk after a prefix and a whole prompt."""
    rows, tables = [(40, 1), (0, 1), (17, 20), (0, 70), (63, 1)], None
    block_size, num_blocks, heads, kv_heads, head_dim = 16, 40, 6, 2, 32
    need = [-(-(c + q) // block_size) for c, q in rows]
    tables = np.zeros((len(rows), max(need)), dtype=np.int32)
    free = list(np.random.default_rng(1).permutation(num_blocks))
    for i, n in enumerate(need):
        tables[i, :n], free = free[:n], free[n:]
    T = sum(q for _, q in rows)
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, device=DEVICE)
    q = torch.randn(T, heads, head_dim, device=DEVICE).bfloat16()
    cache = cache.bfloat16()
    meta = step_metadata(rows, tables, block_size, DEVICE)
    backend = _backend()
    backend.prepare(meta, block_size)
    out = backend.attend(q, cache[0], cache[1], torch.full_like(q, float("nan")), meta, 0.125)
    assert not out.isnan().any()


def test_padding_rows_write_nothing_and_attend_to_nothing():
    """A CUDA graph of a fixed batch size pads a smaller batch: padded rows have slot -1 (no
    cache write) and context length 0 (zeros out, no NaN), and leave real rows unchanged."""
    from minivllm.layers.triton_attention import write_kv_cache_triton

    block_size, num_blocks, heads, kv_heads, head_dim = 16, 8, 4, 2, 16
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, device=DEVICE).bfloat16()
    before = cache.clone()
    k = torch.randn(3, kv_heads, head_dim, device=DEVICE).bfloat16()
    slots = torch.tensor([5, -1, -1], device=DEVICE)
    write_kv_cache_triton(k, k, cache[0], cache[1], slots)
    flat = cache.view(2, -1, kv_heads, head_dim)
    assert torch.equal(flat[:, 5], torch.stack([k[0], k[0]]))
    flat[:, 5] = before.view(2, -1, kv_heads, head_dim)[:, 5]
    assert torch.equal(cache, before)

    tables = np.array([[3, 1], [0, 0], [0, 0]], dtype=np.int32)
    starts, seq_lens = np.arange(4, dtype=np.int64), np.array([20, 0, 0], dtype=np.int64)
    t = lambda a: torch.from_numpy(a).to(DEVICE)  # noqa: E731
    meta = AttentionMetadata(slots, t(starts), t(seq_lens), t(tables), starts, seq_lens, 1)
    backend = _backend()
    backend.prepare(meta, block_size)
    q = torch.randn(3, heads, head_dim, device=DEVICE).bfloat16()
    out = backend.attend(q, cache[0], cache[1], torch.full_like(q, float("nan")), meta, 0.25)
    assert torch.equal(out[1:].float().cpu(), torch.zeros(2, heads, head_dim))
    real = step_metadata([(19, 1)], tables[:1], block_size, DEVICE)
    backend.prepare(real, block_size)
    alone = backend.attend(q[:1], cache[0], cache[1], torch.empty_like(q[:1]), real, 0.25)
    assert torch.equal(out[:1], alone)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_padded_mixed_step_matches_the_reference(dtype):
    """A mixed step as a CUDA graph of a padded token count runs it: short chunks side by side
    (one prefill window meets several sequences), decodes between them, a long chunk; then
    padding tokens (slot -1, no sequence) and padding sequences (no query, no context). Real
    rows match the reference, and the padding writes nothing to the cache."""
    rows = [(5, 2), (0, 3), (9, 1), (16, 2), (0, 40), (3, 1), (0, 2), (30, 17)]
    heads, kv_heads, head_dim, block_size = 14, 2, 64, 16
    need = [-(-(c + q) // block_size) for c, q in rows]
    num_blocks = sum(need) + 4
    blocks = random.Random(3).sample(range(num_blocks), sum(need))
    tables = np.zeros((len(rows), max(need)), dtype=np.int32)
    for i, n in enumerate(need):
        tables[i, :n], blocks = blocks[:n], blocks[n:]
    torch.manual_seed(3)
    T, pad_tokens, pad_seqs = sum(q for _, q in rows), 13, 5
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim).to(dtype)
    q = torch.randn(T + pad_tokens, heads, head_dim).to(dtype)
    k, v = (torch.randn(T + pad_tokens, kv_heads, head_dim).to(dtype) for _ in range(2))
    meta = step_metadata(rows, tables, block_size)
    ref = TorchAttentionBackend()
    ref.prepare(meta, block_size)
    ref_cache = cache.double()
    want = ref.forward(q[:T].double(), k[:T].double(), v[:T].double(), ref_cache[0],
                       ref_cache[1], meta, head_dim ** -0.5)
    t = lambda a: torch.from_numpy(np.asarray(a)).to(DEVICE)  # noqa: E731
    starts = np.concatenate([meta.query_start_host, [T] * pad_seqs])
    seq_lens = np.concatenate([meta.seq_lens_host, [0] * pad_seqs])
    padded = AttentionMetadata(
        t(np.concatenate([meta.slot_mapping.numpy(), [-1] * pad_tokens])), t(starts),
        t(seq_lens), t(np.concatenate([tables, np.zeros((pad_seqs, tables.shape[1]),
                                                        np.int32)])),
        starts, seq_lens, meta.max_query_len)
    backend = _backend()
    backend.prepare(padded, block_size)
    got_cache = cache.to(DEVICE)
    got = backend.forward(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), got_cache[0], got_cache[1],
                          padded, head_dim ** -0.5)
    assert torch.equal(got_cache.cpu(), ref_cache.to(dtype))  # the real keys, nothing more
    err = _rel_err(got[:T].cpu(), want)
    assert err < (1e-2 if dtype == torch.bfloat16 else 1e-4), err


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_engine_greedy_tokens_match_the_torch_backend(tiny_token_model, architecture):
    """End to end through the engine: chunked prefills (a budget of 24 tokens), prefix-cache
    hits (prompts sharing a 21-token head) and decodes across blocks of 4, with the Triton
    kernels (attention and fused) against plain torch; fp32, so the tokens must be the same."""
    from minivllm import LLM, SamplingParams

    rng = random.Random(11)
    head = [rng.randrange(3, 1024) for _ in range(21)]
    prompts = [head + [rng.randrange(3, 1024) for _ in range(rng.randint(1, 30))]
               for _ in range(4)] + [[rng.randrange(3, 1024)]]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    path = tiny_token_model(architecture)
    tokens = {}
    for kernels in ("torch", "cuda-triton"):
        llm = LLM(path, dtype="float32", device=DEVICE, block_size=4,
                  num_blocks=128, max_num_batched_tokens=24, kernels=kernels)
        assert llm.engine.runner.kernels.name == kernels
        tokens[kernels] = [o.outputs[0].token_ids
                           for o in llm.generate(prompts, params, use_tqdm=False)]
    assert tokens["cuda-triton"] == tokens["torch"]
