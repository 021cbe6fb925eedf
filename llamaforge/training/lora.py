"""LoRA: low-rank adapters on chosen projections, by module surgery after the model is built.

`apply_lora(model, targets=("wq", "wv"), rank=8, alpha=16)` replaces each matching `nn.Linear`
(matched by the last part of its name: "wq", "wk", "wv", "wo", "w1", "w2", "w3", "output") with a
`LoRALinear` that computes

    y = base(x) + (alpha / rank) * B(A(dropout(x)))

with A (rank, in) random and B (out, rank) zero, so the adapted model starts equal to the base
model (Hu et al. 2021). Only A and B train; every other weight is frozen. `merge_lora(model)`
folds `W + (alpha / rank) * B @ A` back into plain `nn.Linear`s, so the exported checkpoint has
the base model's names and shapes and loads anywhere.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from torch import nn

from llamaforge.errors import ConfigError

LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update scaled by alpha / rank."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if not isinstance(rank, int) or rank <= 0:
            raise ConfigError(f"LoRA rank must be a positive integer, got {rank!r}")
        self.base = base
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.in_features, self.out_features = base.in_features, base.out_features
        dev, dtype = base.weight.device, base.weight.dtype
        if not dtype.is_floating_point:
            dtype = torch.float32
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=dev, dtype=dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=dev, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for p in self.base.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = (self.dropout(x) @ self.lora_a.t().to(x.dtype)) @ self.lora_b.t().to(x.dtype)  # (..., out)
        return self.base(x) + self.scaling * update

    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / rank) * B @ A, in float32 then cast to the base weight's dtype."""
        w = self.base.weight
        delta = (self.lora_b.float() @ self.lora_a.float()) * self.scaling  # (out, in)
        return (w.float() + delta).to(w.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}"


def _check_targets(targets: Sequence[str]) -> None:
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if unknown or not targets:
        raise ConfigError(f"unknown LoRA targets {unknown or list(targets)}; choose from {list(LORA_TARGETS)}")


def apply_lora(
    model: nn.Module, targets: Sequence[str] = ("wq", "wv"), rank: int = 8, alpha: float = 16.0,
    dropout: float = 0.0,
) -> list[str]:
    """Wrap every `nn.Linear` whose name ends in one of `targets` with a LoRALinear; freeze the rest.

    Returns:
        The names of the wrapped modules.

    Raises:
        ConfigError: unknown target names, a target that is not a float `nn.Linear` (e.g. a quantized
            layer: build the model in float to fine-tune it), or nothing matched.
    """
    _check_targets(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in targets or isinstance(module, LoRALinear):
            continue
        if type(module) is not nn.Linear:
            raise ConfigError(
                f"LoRA target {name} is a {type(module).__name__}, not a float nn.Linear; load the model "
                "in float (dequantized) to fine-tune it"
            )
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        if leaf == "output" and getattr(getattr(model, "args", None), "tie_embeddings", False):
            raise ConfigError("the output projection shares the embedding matrix (tie_embeddings); "
                              "it cannot take a LoRA adapter: leave 'output' out of the targets")
        setattr(parent, leaf, LoRALinear(module, rank, alpha, dropout))
        wrapped.append(name)
    if not wrapped:
        raise ConfigError(f"no module matched the LoRA targets {list(targets)}")
    return wrapped


def lora_modules(model: nn.Module) -> Iterable[tuple[str, LoRALinear]]:
    """(name, module) for every LoRALinear in the model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter weights (`...wq.lora_a`, `...wq.lora_b`), detached."""
    return {k: v.detach() for k, v in model.state_dict().items() if k.endswith((".lora_a", ".lora_b"))}


def merge_lora_state_dict(state_dict: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """The state dict of a LoRA model with every adapter folded into its base weight.

    `X.base.weight`, `X.lora_a` (r, in) and `X.lora_b` (out, r) become `X.weight = W + (alpha / r) * B @ A`
    (computed in float32, cast to W's dtype); other entries are kept.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith((".lora_a", ".lora_b")):
            continue
        prefix, sep, leaf = key.rpartition(".base.")
        if not sep or prefix + ".lora_a" not in state_dict:
            out[key] = value
        elif leaf == "weight":
            a, b = state_dict[prefix + ".lora_a"].float(), state_dict[prefix + ".lora_b"].float()  # (r, in), (out, r)
            out[prefix + ".weight"] = (value.float() + (alpha / a.shape[0]) * (b @ a)).to(value.dtype)
        else:
            out[f"{prefix}.{leaf}"] = value
    return out


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Replace every LoRALinear by a plain nn.Linear holding the merged weight; returns how many.

    The model's state dict then has the base model's names again (`layers.0.attention.wq.weight`).
    """
    count = 0
    for name, module in lora_modules(model):
        merged = nn.Linear(module.in_features, module.out_features, bias=module.base.bias is not None,
                           device=module.base.weight.device, dtype=module.base.weight.dtype)
        merged.weight.copy_(module.merged_weight())
        if module.base.bias is not None:
            merged.bias.copy_(module.base.bias)
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], merged)
        count += 1
    return count
