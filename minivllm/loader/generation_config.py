"""The model's recommended sampling, from its generation_config.json, as vLLM's
`--generation-config` reads it: defaults for the requests that do not set those fields.

`auto` reads the model directory's file (a GGUF or dummy model has none), `vllm` reads nothing
(SamplingParams' own defaults, as vLLM's value of that name), anything else is the path of a
generation_config.json or of a directory holding one.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from minivllm.sampling_params import SamplingParams

FILE_NAME = "generation_config.json"
# The fields vLLM takes from the file, by their SamplingParams names (the same in both).
FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def generation_config_path(setting: str, model_dir: Optional[str]) -> Optional[str]:
    """The file `setting` names, or None when there is none to read."""
    if setting == "vllm":
        return None
    if setting == "auto":
        path = os.path.join(model_dir, FILE_NAME) if model_dir else None
        return path if path and os.path.isfile(path) else None
    path = os.path.join(setting, FILE_NAME) if os.path.isdir(setting) else setting
    if not os.path.isfile(path):
        raise ValueError(f"generation_config {setting!r}: no {FILE_NAME} there")
    return path


def sampling_defaults(setting: str, model_dir: Optional[str]) -> tuple[Optional[str], dict]:
    """(the file read or None, {field: value}) of the sampling defaults `setting` gives."""
    path = generation_config_path(setting, model_dir)
    if path is None:
        return None, {}
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"generation_config {path}: cannot read it ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"generation_config {path}: not a JSON object")
    defaults = {k: config[k] for k in FIELDS if config.get(k) is not None}
    if defaults.get("top_k") == 0:  # transformers' "no top-k"; SamplingParams says -1
        defaults["top_k"] = -1
    try:
        SamplingParams(**defaults)
    except ValueError as exc:
        raise ValueError(f"generation_config {path}: {exc}") from None
    return path, defaults
