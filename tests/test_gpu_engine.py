"""The GPU host path: CUDA graphs (padding to the captured sizes), the pinned-buffer
staging of eager steps and async scheduling, against eager synchronous execution. Needs CUDA
and triton; the ladder of captured sizes is checked everywhere."""
from __future__ import annotations

import importlib.util
import random

import pytest
import torch

from minivllm import LLM, SamplingParams
from minivllm.config import ModelConfig
from minivllm.engine.cuda_graphs import capture_sizes, token_sizes

needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
    reason="needs a CUDA device and triton")



def test_capture_sizes_cover_every_batch():
    assert capture_sizes(256) == [1, 2, 4, 8] + list(range(16, 257, 16))
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(1) == [1]
    for n in (1, 3, 20, 100):
        sizes = capture_sizes(n)
        assert sizes[-1] == n and all(any(s >= b for s in sizes) for b in range(1, n + 1))


def test_token_sizes_cover_every_step():
    assert token_sizes(2048) == [32, 64, 128] + list(range(256, 2049, 256))
    assert token_sizes(8192) == [32, 64, 128] + list(range(256, 2048, 256)) + \
        list(range(2048, 8193, 1024))
    assert token_sizes(24) == [24] and token_sizes(100) == [32, 64, 100]
    for n in (24, 100, 2048, 5000):
        sizes = token_sizes(n)
        assert sizes[-1] == n and all(any(s >= t for s in sizes) for t in range(1, n + 1))


@pytest.mark.parametrize("kwargs,field", [(dict(kernels="flash"), "kernels"),
                                          (dict(enforce_eager="yes"), "enforce_eager"),
                                          (dict(cuda_graph_mode="piecewise"), "cuda_graph_mode")])
def test_bad_backend_options_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**kwargs)


def test_triton_backend_refuses_what_it_cannot_run(tiny_token_model, monkeypatch):
    """A head_dim the kernels cannot tile, and Triton on a CPU outside its interpreter, are
    clear errors at start-up, not failures in the first step."""
    path = tiny_token_model("llama")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if importlib.util.find_spec("triton") is None:
        with pytest.raises(ValueError, match="needs triton"):
            LLM(path, device="cpu", kernels="cuda-triton")
        return
    with pytest.raises(ValueError, match="CUDA"):
        LLM(path, device="cpu", kernels="cuda-triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # past the device check, to the head_dim one
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        LLM(tiny_token_model("llama", head_dim=24), device="cpu",
            kernels="cuda-triton")


@needs_gpu
@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_graphs_give_the_eager_tokens(tiny_token_model, architecture):
    """Batches of 1..11 running requests (padded to graphs of 1, 2, 4, 8, 16 rows), requests
    finishing at different steps, chunked prefills mixed into decode steps (replayed from
    graphs of 32 tokens in the full mode, eager in decode-only); fp32."""
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 1024) for _ in range(rng.randint(1, 40))] for _ in range(11)]
    params = [SamplingParams(temperature=0.0, max_tokens=rng.randint(3, 20), ignore_eos=True)
              for _ in prompts]
    path = tiny_token_model(architecture)
    tokens = {}
    # (eager, async scheduling): the graphs and the eager path each take placeholder input ids
    # from the device under async scheduling.
    for eager, overlap, mode in ((True, False, "full"), (True, True, "full"),
                                 (False, False, "full"), (False, True, "full"),
                                 (False, True, "decode-only")):
        llm = LLM(path, dtype="float32", device="cuda", block_size=4,
                  num_blocks=256, max_num_batched_tokens=32, max_num_seqs=16,
                  enforce_eager=eager, async_scheduling=overlap, cuda_graph_mode=mode)
        graphs = llm.engine.runner.graphs
        assert (graphs is None) == eager
        tokens[eager, overlap, mode] = [o.outputs[0].token_ids
                                        for o in llm.generate(prompts, params, use_tqdm=False)]
        if graphs is not None:
            assert graphs.replays["decode"] > 0
            assert (graphs.replays["mixed"] > 0) == (mode == "full"), graphs.replays
    assert len(set(map(str, tokens.values()))) == 1, tokens
