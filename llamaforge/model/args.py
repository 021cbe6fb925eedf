"""ModelArgs: the one description of a Llama model's shape.

Every checkpoint parser (Meta params.json, Hugging Face config.json, GGUF metadata) returns one of
these, and the model is built from nothing else. Values are validated when the object is made;
derived values (`n_kv_heads`, `head_dim`, `hidden_dim`) are filled in only when not given, never
overwritten.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

from llamaforge.errors import ConfigError


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1-style frequency-dependent rotary scaling (Meta's `apply_scaling`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        for name in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ConfigError(f"rope scaling {name} must be a finite number, got {value!r}")
        if not isinstance(self.original_max_position_embeddings, int) or self.original_max_position_embeddings > MAX_CONTEXT:
            raise ConfigError(
                f"rope scaling original_max_position_embeddings must be an integer <= {MAX_CONTEXT}, got {self}"
            )
        if self.factor <= 0 or self.low_freq_factor <= 0 or self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError(
                f"invalid rope scaling {self}: need factor > 0 and high_freq_factor > low_freq_factor > 0"
            )
        if self.original_max_position_embeddings <= 0:
            raise ConfigError(f"rope scaling original_max_position_embeddings must be > 0, got {self}")


@dataclass
class ModelArgs:
    """Shape of a Llama-family transformer, named as in Meta's reference `ModelArgs`.

    Args:
        dim: model width (embedding size).
        n_layers: number of transformer blocks.
        n_heads: attention heads for queries.
        vocab_size: rows of the embedding table; must be known (> 0) before a model is built.
        n_kv_heads: key/value heads (grouped-query attention); defaults to `n_heads`.
        head_dim: size of one head; defaults to `dim // n_heads`.
        hidden_dim: SwiGLU inner size. When None it is Meta's formula from `multiple_of` and
            `ffn_dim_multiplier`; Hugging Face and GGUF give it directly.
        multiple_of, ffn_dim_multiplier: Meta's inputs to the hidden size formula.
        norm_eps: RMSNorm epsilon.
        rope_theta: rotary base frequency.
        rope_scaling: Llama 3.1-style scaling of rotary frequencies, or None.
        max_seq_len: the model's context length (positions it was trained for).
        tie_embeddings: the output projection shares the token embedding matrix.
        qkv_bias: the q, k and v projections have biases (Qwen2 / Qwen2.5).
        qk_norm: an RMSNorm over each head of q and of k, before the rotary embedding (Qwen3).
        sliding_window: attention sees at most this many positions (Mistral, some Qwen configs); None means
            full attention. The model is exact only up to this many positions, so `max_seq_len` must not
            exceed it: parsers cap the context length at the window (see checkpoints/hf.py).
    """

    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    n_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    hidden_dim: Optional[int] = None
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: Optional[int] = None

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads != 0:
            raise ConfigError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim is None:
            if self.dim % self.n_heads != 0:
                raise ConfigError(f"dim ({self.dim}) is not divisible by n_heads ({self.n_heads})")
            self.head_dim = self.dim // self.n_heads
        if self.head_dim <= 0 or self.head_dim % 2 != 0:
            raise ConfigError(f"head_dim must be a positive even number for rotary embeddings, got {self.head_dim}")
        if self.hidden_dim is None:
            self.hidden_dim = meta_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)
        if self.hidden_dim <= 0:
            raise ConfigError(f"hidden_dim must be positive, got {self.hidden_dim}")
        if self.sliding_window is not None and self.max_seq_len > self.sliding_window:
            raise ConfigError(
                f"max_seq_len {self.max_seq_len} exceeds the sliding window {self.sliding_window}: llamaforge attends "
                "to every cached position, which equals sliding-window attention only within the window; "
                f"use max_seq_len <= {self.sliding_window}"
            )
        if isinstance(self.rope_scaling, dict):
            unknown = sorted(set(self.rope_scaling) - {f.name for f in dataclasses.fields(RopeScaling)})
            if unknown:
                raise ConfigError(f"unknown rope scaling fields {unknown}")
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ConfigError(f"ModelArgs.rope_scaling must be a RopeScaling, a dict or None, got {self.rope_scaling!r}")

    @property
    def n_params(self) -> int:
        """Number of parameters of a model of this shape."""
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        attn += self.qkv_bias * self.head_dim * (self.n_heads + 2 * self.n_kv_heads) + self.qk_norm * 2 * self.head_dim
        ffn = 3 * self.dim * self.hidden_dim
        block = attn + ffn + 2 * self.dim
        output = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return self.vocab_size * self.dim + self.n_layers * block + self.dim + output

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelArgs":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown ModelArgs fields {unknown}; known fields are {sorted(known)}")
        return cls(**values)


# Every field's type and range, checked before anything is sized by it: (kind, upper bound). "int" fields
# are positive integers up to the bound (far above any released model: a file that claims more is
# corrupt or hostile, and would make the KV cache or rotary tables allocate for it); "float" fields are
# finite positive numbers; None is allowed where the field's default is None. A new field is one line.
MAX_CONTEXT = 1 << 24  # 16M positions (Llama 4 Scout declares 10M)
_FIELDS: dict[str, tuple[str, float]] = {
    "dim": ("int", 1 << 17),
    "n_layers": ("int", 1 << 12),
    "n_heads": ("int", 1 << 12),
    "vocab_size": ("int", 1 << 24),
    "n_kv_heads": ("int", 1 << 12),
    "head_dim": ("int", 1 << 14),
    "hidden_dim": ("int", 1 << 20),
    "multiple_of": ("int", 1 << 20),
    "ffn_dim_multiplier": ("float", 1e3),
    "norm_eps": ("float", 1.0),
    "rope_theta": ("float", 1e12),
    "max_seq_len": ("int", MAX_CONTEXT),
    "tie_embeddings": ("bool", 1),
    "qkv_bias": ("bool", 1),
    "qk_norm": ("bool", 1),
    "sliding_window": ("int", MAX_CONTEXT),
}


def _check_fields(args: "ModelArgs") -> None:
    defaults = {f.name: f.default for f in dataclasses.fields(args)}
    for name, (kind, bound) in _FIELDS.items():
        value = getattr(args, name)
        if value is None and defaults.get(name, ...) is None:
            continue
        if kind == "bool":
            ok = isinstance(value, bool)
        elif kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool) and 0 < value <= bound
        else:
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                  and 0 < value <= bound)
        if not ok:
            what = {"bool": "true or false", "int": f"a positive integer <= {int(bound)}",
                    "float": f"a positive number <= {bound:g}"}[kind]
            hint = ("; a params.json with vocab_size -1 takes it from the tokenizer, so pass tokenizer_path"
                    if name == "vocab_size" and value == -1 else "")
            raise ConfigError(f"ModelArgs.{name} must be {what}, got {value!r}{hint}")


def meta_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """SwiGLU hidden size as Meta's `FeedForward` computes it from `dim`."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)
