"""Shared fixtures: the embedded GGUF, tiny random Hugging Face model directories, an engine
process, and shared-memory rings."""
from __future__ import annotations

import atexit
from typing import Callable, Optional

import pytest
import torch

from minivllm.config import SupervisorConfig, TransportConfig
from minivllm.engine.supervisor import Supervisor
from minivllm.loader.embedded import embedded_gguf_path
from minivllm.transport import shm


@pytest.fixture(scope="session")
def embedded_gguf() -> str:
    """Path of the embedded SmolLM2-135M-Instruct GGUF."""
    return embedded_gguf_path()


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory, embedded_gguf) -> Callable[..., str]:
    """Factory: `tiny_hf_dir("llama" | "qwen2", dtype=, max_shard_size=, seed=, **config)` saves
    a tiny random transformers model (safetensors; norms and biases perturbed) with the embedded
    model's tokenizer and returns the directory. The vocabulary is the tokenizer's, so the model
    can generate text. Each distinct set of arguments makes one directory per session."""
    made: dict = {}

    def make(architecture: str = "llama", *, dtype: torch.dtype = torch.float32,
             max_shard_size: Optional[str] = None, seed: int = 0, **config) -> str:
        key = (architecture, dtype, max_shard_size, seed, tuple(sorted(config.items())))
        if key not in made:
            path = tmp_path_factory.mktemp(f"tiny-{architecture}")
            _save_tiny_model(str(path), architecture, dtype, max_shard_size, seed, config)
            _save_tokenizer(str(path), embedded_gguf)
            made[key] = str(path)
        return made[key]

    return make


def _save_tiny_model(path: str, architecture: str, dtype: torch.dtype,
                     max_shard_size: Optional[str], seed: int, overrides: dict) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM),
                             "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[architecture]
    config = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
                  tie_word_embeddings=architecture == "qwen2", bos_token_id=1, eos_token_id=2)
    config.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**config))
    # transformers initialises norms to ones and biases to zeros; perturb them so a loader that
    # mixes them up, or drops them, is caught.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(torch.randn_like(param) * 0.1)
            elif name.endswith(".bias"):
                param.copy_(torch.randn_like(param) * 0.02)
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)


def _save_tokenizer(path: str, gguf_path: str) -> None:
    from transformers import PreTrainedTokenizerFast

    from minivllm.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(gguf_path)
    PreTrainedTokenizerFast(tokenizer_object=tok.backend, bos_token="<|im_start|>",
                            eos_token="<|im_end|>", unk_token="<|endoftext|>",
                            pad_token="<|im_end|>", chat_template=tok.chat_template
                            ).save_pretrained(path)


class EngineServer(Supervisor):
    """A real engine process serving the embedded model over the transport, started by the
    product's supervisor (which waits until it is ready). It is not restarted when it exits, so
    a test may stop it through the control channel and watch it go."""

    def __init__(self, transport: Optional[TransportConfig] = None, **engine_options) -> None:
        from minivllm.llm import build_engine_config

        config = build_engine_config(None, **{"dtype": "float32", "num_blocks": 512,
                                              **engine_options})
        super().__init__(config,
                         transport or TransportConfig(zmq_endpoint=shm.socket_endpoint("zmq")),
                         SupervisorConfig(restart_limit=0))
        # The engine is not a daemon process: multiprocessing would wait for it at exit, so a
        # test that fails before stopping it would hang the run.
        atexit.register(self.stop)
        self.start()

    @property
    def zmq_endpoint(self) -> str:
        return self.transport.zmq_endpoint

    def channel(self, **kwargs):
        from minivllm.transport.channel import EngineChannel

        return EngineChannel(self.control, self.transport, register_timeout=120, **kwargs)

    def stop(self) -> None:
        self.shutdown(drain=False, timeout=15.0)


@pytest.fixture(scope="module")
def engine_server():
    """One engine process per test module (embedded SmolLM2, fp32, 512 KV blocks)."""
    server = EngineServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_token_model(tmp_path_factory) -> Callable[..., str]:
    """Factory: `tiny_token_model("llama" | "qwen2", head_dim=16)` saves a small random
    transformers model without a tokenizer (prompts are token ids; vocabulary 1024; GQA with
    groups of 2; biases on Qwen2's q/k/v) and returns the directory. Needs no embedded model,
    so it serves on the GPU machine too."""
    made: dict = {}

    def make(architecture: str = "llama", head_dim: int = 16) -> str:
        from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

        if (architecture, head_dim) not in made:
            config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM),
                                     "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[architecture]
            torch.manual_seed(3)
            model = model_cls(config_cls(
                vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                max_position_embeddings=512, tie_word_embeddings=architecture == "qwen2"))
            path = tmp_path_factory.mktemp(f"tiny-{architecture}-{head_dim}")
            model.save_pretrained(path)
            made[architecture, head_dim] = str(path)
        return made[architecture, head_dim]

    return make


@pytest.fixture
def ring_pair() -> Callable[[int], tuple]:
    """make(capacity): a writer and a reader attached to one fresh shared-memory ring, both
    closed (and the segment unlinked) after the test."""
    from minivllm.transport import shm

    made = []

    def make(capacity: int) -> tuple:
        writer = shm.create_ring("test", capacity)
        made.append(writer)
        reader = shm.attach_ring(writer.name)
        made.append(reader)
        return writer, reader

    yield make
    for ring in reversed(made):
        ring.close()
