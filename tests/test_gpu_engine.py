"""The GPU host path: decode CUDA graphs (padding to the captured sizes), the pinned-buffer
staging of eager steps and async scheduling, against eager synchronous execution. Needs CUDA
and triton; the ladder of captured sizes is checked everywhere."""
from __future__ import annotations

import importlib.util
import random

import pytest
import torch

from minivllm import LLM, SamplingParams
from minivllm.config import ModelConfig
from minivllm.engine.cuda_graphs import capture_sizes

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


@pytest.mark.parametrize("kwargs,field", [(dict(kernels="flash"), "kernels"),
                                          (dict(enforce_eager="yes"), "enforce_eager")])
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
    finishing at different steps, chunked prefills mixed into decode steps; fp32."""
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 1024) for _ in range(rng.randint(1, 40))] for _ in range(11)]
    params = [SamplingParams(temperature=0.0, max_tokens=rng.randint(3, 20), ignore_eos=True)
              for _ in prompts]
    path = tiny_token_model(architecture)
    tokens = {}
    # (eager, async scheduling): the graphs and the eager path each take placeholder input ids
    # from the device under async scheduling.
    for eager, overlap in ((True, False), (True, True), (False, False), (False, True)):
        llm = LLM(path, dtype="float32", device="cuda", block_size=4,
                  num_blocks=256, max_num_batched_tokens=32, max_num_seqs=16,
                  enforce_eager=eager, async_scheduling=overlap)
        assert (llm.engine.runner.graphs is None) == eager
        tokens[eager, overlap] = [o.outputs[0].token_ids
                                  for o in llm.generate(prompts, params, use_tqdm=False)]
    assert len(set(map(str, tokens.values()))) == 1, tokens
