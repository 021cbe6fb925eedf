"""LoRA adapters for training: made from a trained model, and added to a built one.

The files (PEFT folders, llama.cpp GGUF LoRA) are read and written by `llamaforge.checkpoints.adapters`,
the one reader the server uses too; this module holds what training adds:
- `adapter_from_state_dict`: the `Adapter` of a LoRA model's trained `lora_a` / `lora_b` (then `save_peft` /
  `save_gguf_lora` write it);
- `apply_adapters(model, adapters)`: adapters added to a built model, merged into float weights
  (`W += s * B @ A`, exact, no cost per token) or, over quantized weights, as LoRALinear wrappers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import torch
from torch import nn

from llamaforge.checkpoints.adapters import Adapter, read_adapter
from llamaforge.errors import CheckpointError, ConfigError

PathLike = Union[str, Path]


def adapter_from_state_dict(state_dict: dict[str, torch.Tensor], alpha: float) -> Adapter:
    """The adapters in a LoRA model's state dict (`X.lora_a`, `X.lora_b`, e.g. `lora_state_dict(model)`)."""
    weights = {}
    for key, a in state_dict.items():
        if key.endswith(".lora_a"):
            stem = key[: -len(".lora_a")]
            weights[stem] = (a.detach().float().cpu().clone(), state_dict[stem + ".lora_b"].detach().float().cpu().clone())
    if not weights:
        raise ConfigError("the model has no LoRA adapters to save")
    ranks = {a.shape[0] for a, _ in weights.values()}
    if len(ranks) != 1:
        raise ConfigError(f"adapters of several ranks {sorted(ranks)} cannot be saved as one LoRA file")
    return Adapter(weights, float(alpha), ranks.pop())


@torch.no_grad()
def apply_adapters(model: nn.Module, adapters: Sequence[PathLike | Adapter]) -> list[str]:
    """Add LoRA adapters to a built model, in order; returns the adapted module names.

    Float `nn.Linear` weights get `W += (alpha / r) * B @ A` (exact; a tied output matrix is refused);
    a `QuantizedLinear` is wrapped in a LoRALinear (its blocks stay as they are; one adapter per layer).

    Raises:
        CheckpointError: a file that is no adapter, or one for a model of another shape.
    """
    from llamaforge.quantize import QuantizedLinear
    from llamaforge.training.lora import LoRALinear

    args = model.args
    names = []
    for item in adapters:
        adapter = item if isinstance(item, Adapter) else read_adapter(item, args)
        where = adapter.source or "the adapter"
        for meta, (a, b) in sorted(adapter.weights.items()):
            try:
                module = model.get_submodule(meta)
            except AttributeError:
                raise CheckpointError(f"{where} adapts {meta}, which the model does not have") from None
            out_f, in_f = getattr(module, "out_features", None), getattr(module, "in_features", None)
            if (b.shape[0], a.shape[1]) != (out_f, in_f):
                raise CheckpointError(f"{where}: {meta} adapts a ({b.shape[0]}, {a.shape[1]}) weight, the model's is "
                                      f"({out_f}, {in_f}); is the adapter for another model?")
            if meta == "output" and getattr(args, "tie_embeddings", False):
                raise CheckpointError(f"{where} adapts the output layer, which shares the embedding matrix here")
            if isinstance(module, QuantizedLinear):
                wrapped = LoRALinear(module, adapter.rank, adapter.scaling * adapter.rank)  # its scale: alpha / r
                wrapped.lora_a.copy_(a)
                wrapped.lora_b.copy_(b)
                wrapped.requires_grad_(False)
                parent, _, leaf = meta.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, leaf, wrapped)
            elif isinstance(module, nn.Linear):
                delta = (b.to(module.weight.device) @ a.to(module.weight.device)) * adapter.scaling  # (out, in)
                module.weight.copy_((module.weight.float() + delta).to(module.weight.dtype))
            else:
                raise CheckpointError(f"{where} adapts {meta}, a {type(module).__name__}: merge it into a float model "
                                      "or apply one adapter per quantized layer")
            names.append(meta)
    return names
