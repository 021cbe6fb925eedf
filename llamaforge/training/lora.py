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
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from llamaforge.errors import ConfigError
from llamaforge.quantize import QuantizedLinear, compute_dtype

LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")


def _base_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The base layer's weight (out, in) in `dtype`; a quantized one is dequantized afresh (not kept)."""
    if isinstance(base, QuantizedLinear):
        return base.dequantize().to(dtype)
    return base.weight.to(dtype)


class LoRAFunction(torch.autograd.Function):
    """`base(x) + scaling * (xd @ A.T) @ B.T` over a frozen base, with the gradients of x, xd, A and B.

    `xd` is x after LoRA dropout (the very tensor x when there is none: its two gradients are then
    summed here, in one addmm). Saved for the backward: xd and xd @ A.T (N, r) in the compute dtype;
    the base weight is a reference (float) or dequantized again (quantized).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, xd: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                base: nn.Module, scaling: float) -> torch.Tensor:
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)  # (N, in)
            xd2 = x2 if xd is x else xd.reshape(-1, xd.shape[-1]).to(dtype)
            a, b = lora_a.to(dtype), lora_b.to(dtype)  # (r, in), (out, r)
            bias = getattr(base, "bias", None)
            y = F.linear(x2, _base_weight(base, dtype), None if bias is None else bias.to(dtype))  # (N, out)
            xa = xd2 @ a.t()  # (N, r)
            y.addmm_(xa, b.t(), alpha=scaling)
        ctx.save_for_backward(xd2, xa, a, b)
        ctx.base, ctx.scaling, ctx.same, ctx.in_shape = base, scaling, xd is x, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        xd2, xa, a, b = ctx.saved_tensors
        s = ctx.scaling
        need_x, need_xd, need_a, need_b = ctx.needs_input_grad[:4]
        with torch.autocast(grad.device.type, enabled=False):
            g = grad.reshape(-1, grad.shape[-1]).to(xa.dtype)  # (N, out)
            gxa = (g @ b).mul_(s)  # (N, r)
            grad_b = (g.t() @ xa).mul_(s) if need_b else None  # (out, r)
            grad_a = gxa.t() @ xd2 if need_a else None  # (r, in)
            grad_x = grad_xd = None
            if need_x:
                grad_x = g @ _base_weight(ctx.base, g.dtype)  # (N, in)
                if ctx.same:
                    grad_x.addmm_(gxa, a)
                grad_x = grad_x.view(ctx.in_shape)
            if need_xd and not ctx.same:
                grad_xd = (gxa @ a).view(ctx.in_shape)
        return grad_x, grad_xd, grad_a, grad_b, None, None


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` or `QuantizedLinear` plus a trainable low-rank update scaled by alpha / rank."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if not isinstance(rank, int) or rank <= 0:
            raise ConfigError(f"LoRA rank must be a positive integer, got {rank!r}")
        self.base = base
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.in_features, self.out_features = base.in_features, base.out_features
        if isinstance(base, QuantizedLinear):
            dev, dtype = base.qweight.device, torch.float32
        else:
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
        if getattr(self.base, "weight", None) is not None and self.base.weight.requires_grad:
            # an unfrozen float base (not what apply_lora leaves): plain autograd, W gets its gradient too
            update = (self.dropout(x) @ self.lora_a.t().to(x.dtype)) @ self.lora_b.t().to(x.dtype)  # (..., out)
            return self.base(x) + self.scaling * update
        if not torch.is_grad_enabled() or not (x.requires_grad or self.lora_a.requires_grad):
            # inference: the base layer's own (possibly quantized-kernel) path plus the low-rank update
            update = (x @ self.lora_a.t().to(x.dtype)) @ self.lora_b.t().to(x.dtype)  # (..., out)
            return self.base(x) + self.scaling * update
        xd = self.dropout(x) if self.training else x
        return LoRAFunction.apply(x, xd, self.lora_a, self.lora_b, self.base, self.scaling)

    def base_weight(self) -> torch.Tensor:
        """The frozen base weight (out, in) as float32 (dequantized for a quantized base)."""
        return _base_weight(self.base, torch.float32)

    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / rank) * B @ A in float32, cast to a float base weight's dtype."""
        delta = (self.lora_b.float() @ self.lora_a.float()) * self.scaling  # (out, in)
        merged = self.base_weight() + delta
        return merged if isinstance(self.base, QuantizedLinear) else merged.to(self.base.weight.dtype)

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
        ConfigError: unknown target names, a target that is neither a float `nn.Linear` nor a
            `QuantizedLinear`, or nothing matched.
    """
    _check_targets(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in targets or isinstance(module, LoRALinear):
            continue
        if type(module) is not nn.Linear and not isinstance(module, QuantizedLinear):
            raise ConfigError(
                f"LoRA target {name} is a {type(module).__name__}, not an nn.Linear or QuantizedLinear; "
                "LoRA adapts linear projections only"
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
    A quantized base becomes a float32 nn.Linear holding the dequantized weight plus the update.
    """
    count = 0
    for name, module in lora_modules(model):
        weight = module.merged_weight()
        merged = nn.Linear(module.in_features, module.out_features, bias=module.base.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        merged.weight.copy_(weight)
        if module.base.bias is not None:
            merged.bias.copy_(module.base.bias)
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], merged)
        count += 1
    return count
