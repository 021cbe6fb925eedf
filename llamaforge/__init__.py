"""llamaforge: build, run, serve and train Llama-family language models in PyTorch.

Public names are imported lazily so that `import llamaforge` stays cheap and optional parts
(server, training, spaCy) are only imported when used.
"""

from typing import TYPE_CHECKING, Any

from llamaforge.errors import (
    ChatFormatError,
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    DeviceError,
    GenerationError,
    HubError,
    LlamaforgeError,
    TokenizerError,
    TrainingDiverged,
    TrainingError,
)

__version__ = "0.1.0"

_LAZY = {
    "Llama": "llamaforge.api",
    "ModelArgs": "llamaforge.model.args",
    "Tokenizer": "llamaforge.tokenizer",
}

__all__ = [
    "Llama",
    "ModelArgs",
    "Tokenizer",
    "LlamaforgeError",
    "ConfigError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "TokenizerError",
    "GenerationError",
    "HubError",
    "DeviceError",
    "ChatFormatError",
    "TrainingError",
    "TrainingDiverged",
]

if TYPE_CHECKING:
    from llamaforge.api import Llama
    from llamaforge.model.args import ModelArgs
    from llamaforge.tokenizer import Tokenizer


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llamaforge' has no attribute {name!r}")
