"""The llamaforge exception hierarchy.

Every error a user can cause is one of these, and its message says what was wrong, the values
involved, and what to do. Each subclass also derives from the built-in exception a caller would
naturally catch (ValueError for bad values, FileNotFoundError for missing files), so existing
`except ValueError:` code keeps working.
"""


class LlamaforgeError(Exception):
    """Base class of every error llamaforge raises on purpose."""


class ConfigError(LlamaforgeError, ValueError):
    """A model shape or build setting is invalid or inconsistent."""


class CheckpointError(LlamaforgeError, ValueError):
    """A checkpoint is missing, truncated, of an unknown format or does not match its config."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint path does not exist or holds no known checkpoint file."""


class TokenizerError(LlamaforgeError, ValueError):
    """A tokenizer file cannot be read, or text/ids cannot be encoded/decoded."""


class GenerationError(LlamaforgeError, ValueError):
    """A generation request is invalid (prompt too long, batch too large, bad sampling values)."""


class DeviceError(LlamaforgeError, RuntimeError):
    """A requested device or dtype is not available on this machine."""


class ChatFormatError(LlamaforgeError, ValueError):
    """A dialog does not fit the model's chat format (roles out of order, no template)."""


class TrainingError(LlamaforgeError, RuntimeError):
    """A training run cannot go on (diverged loss, data or resume mismatch)."""


class TrainingDiverged(TrainingError):
    """The loss or the gradient norm became NaN or infinite; the weights were not updated with it."""


class HubError(LlamaforgeError, OSError):
    """A model reference cannot be fetched from the Hugging Face Hub (no network, gated or private repo)."""
