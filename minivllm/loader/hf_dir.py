"""A Hugging Face model directory: config.json and *.safetensors (sharded or not)."""
from __future__ import annotations

import glob
import json
import os
from typing import TYPE_CHECKING, Iterator

from safetensors import safe_open

from minivllm.config import ArchConfig
from minivllm.loader.dummy import expected_parameters

if TYPE_CHECKING:  # torch only where weights are made: frontends resolve models without it
    import torch

_INDEX = "model.safetensors.index.json"


def read_arch(path: str) -> ArchConfig:
    """ArchConfig of a model directory, or of a config.json file."""
    config_path = path if os.path.isfile(path) else os.path.join(path, "config.json")
    try:
        with open(config_path, encoding="utf-8") as f:
            return ArchConfig.from_hf(json.load(f))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {config_path!r}: {e}") from None


def _safetensors_files(path: str) -> list[str]:
    # The index names the checkpoint's shards; other *.safetensors in the directory (a
    # consolidated copy, adapters) are not part of it.
    index_path = os.path.join(path, _INDEX)
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as f:
            shards = dict.fromkeys(json.load(f)["weight_map"].values())
        return [os.path.join(path, shard) for shard in shards]
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"{path!r} has no *.safetensors weights")
    return files


def _ignored(name: str, arch: ArchConfig) -> bool:
    """Tensors a checkpoint may carry that are not parameters of our model."""
    return ((name == "lm_head.weight" and arch.tie_word_embeddings)
            or name.endswith("rotary_emb.inv_freq"))


def load_weights(path: str, arch: ArchConfig, dtype: torch.dtype, device: torch.device
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter, one tensor at a time, checked against the architecture's names and
    shapes."""

    expected = dict(expected_parameters(arch))
    seen = set()
    for file in _safetensors_files(path):
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                if _ignored(name, arch):
                    continue
                if name not in expected:
                    raise ValueError(f"{file!r}: tensor {name!r} is not a parameter of "
                                     f"{arch.architecture} with this config.json")
                tensor = f.get_tensor(name)
                if tuple(tensor.shape) != expected[name]:
                    raise ValueError(f"{file!r}: {name!r} has shape {tuple(tensor.shape)}, "
                                     f"config.json implies {expected[name]}")
                seen.add(name)
                yield name, tensor.to(device=device, dtype=dtype)
    missing = [name for name in expected if name not in seen]
    if missing:
        raise ValueError(f"{path!r} lacks {len(missing)} parameter(s), e.g. {missing[:3]}")
