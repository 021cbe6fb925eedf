"""The model a run trains, and the checkpoint it exports.

- From scratch: a `Transformer(ModelArgs)` with GPT-2-style initialisation (normal(0, init_std) for
  embeddings and projections, the residual outputs `wo` and `w2` scaled by 1/sqrt(2 * n_layers),
  norm gains 1), its vocabulary from the tokenizer.
- Fine-tuning: any checkpoint `checkpoints.load` reads (Meta, Hugging Face, GGUF), with its own
  tokenizer. Quantized GGUF weights are dequantized to float32, or, with `quantize` (QLoRA), stay in
  their blocks ("gguf") or a float checkpoint's linear layers are quantized on load ("q4_0", "q8_0", ...):
  the base is then frozen `QuantizedLinear` layers on the exact dequantize path, and only LoRA trains.
- Export: LoRA adapters merged, then `checkpoints.save_meta` / `save_hf` / `save_gguf` (whose writes
  are atomic), in a form `Llama.build` loads with the tokenizer inside or beside it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.checkpoint import checkpoint

from llamaforge import runtime
from llamaforge.errors import ConfigError
from llamaforge.model import ModelArgs, Transformer
from llamaforge.tokenizer import Tokenizer


@dataclass
class Source:
    """Where the trained model came from, which export needs: the tokenizer file or GGUF metadata."""

    format: str  # "scratch", "meta", "hf" or "gguf"
    tokenizer_path: Optional[Path]
    gguf_metadata: Optional[dict[str, Any]]


def init_weights(model: Transformer, std: float = 0.02) -> None:
    """GPT-2-style initialisation, in place (see the module docstring)."""
    n_layers = model.args.n_layers
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                p.normal_(0.0, std / math.sqrt(2 * n_layers))
            else:
                p.normal_(0.0, std)


def scratch_model(model_args: dict[str, Any], tokenizer: Tokenizer, device: torch.device, std: float,
                  seq_len: int) -> Transformer:
    """A freshly initialised model of the given shape (vocab_size defaults to the tokenizer's)."""
    values = dict(model_args)
    values.setdefault("vocab_size", tokenizer.n_words)
    values.setdefault("max_seq_len", seq_len)
    args = ModelArgs.from_dict(values)
    if args.vocab_size < tokenizer.n_words:
        raise ConfigError(f"model_args.vocab_size={args.vocab_size} is smaller than the tokenizer's {tokenizer.n_words} tokens")
    with torch.device(device):
        model = Transformer(args)
    init_weights(model, std)
    return model


def load_for_training(path: str, tokenizer_path: Optional[str], device: torch.device, seq_len: int,
                      progress: bool = True, quantize: Optional[str] = None) -> tuple[Transformer, Tokenizer, Source]:
    """A checkpoint as a model ready to train, with its tokenizer.

    Args:
        quantize: None: every weight float32 and trainable. "gguf": a GGUF file's quantized weights stay
            in their blocks. "q4_0", "q8_0", ...: linear layers (and a tied embedding) quantized on
            load. Quantized layers are frozen and take the exact path (see `quantized_base`).
    """
    from llamaforge import checkpoints
    from llamaforge.hub import resolve_model

    p = resolve_model(None if path in ("default", "") else path, progress=progress)
    ckpt = checkpoints.load(p, progress=progress, keep_quantized=quantize == "gguf")
    source = ckpt.tokenizer_source
    tokenizer = Tokenizer.from_source(source, tokenizer_path, hint="`tokenizer` in the training config")
    # the file export copies: the one given, else the checkpoint's own (None: a GGUF vocabulary)
    tok_file = Path(tokenizer_path) if tokenizer_path is not None else (
        source.file if source.gguf_metadata is None else None)
    args = ckpt.args
    if seq_len > args.max_seq_len:
        raise ConfigError(f"seq_len={seq_len} is longer than the model's context length {args.max_seq_len}")
    if quantize == "gguf":
        if device.type != "cpu":
            raise ConfigError(f"quantize = 'gguf' keeps GGUF blocks for the CPU; on {device} use quantize = "
                              "'q8_0' / 'q4_0' or leave quantize out")
        state = dict(ckpt.state_dict)
        if all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ConfigError(f"quantize = 'gguf' needs a quantized GGUF file, and {p} holds no quantized weights; "
                              "quantize on load with quantize = 'q4_0' or 'q8_0'")
    else:
        state = {k: (v.dequantize() if hasattr(v, "dequantize") and not isinstance(v, torch.Tensor) else v)
                 for k, v in ckpt.state_dict.items()}
    model = runtime.build(args, state, device=device, dtype=torch.float32)  # GGUF blocks as quantized layers
    if quantize not in (None, "gguf"):
        from llamaforge.quantize import quantize_model_weights

        quantize_model_weights(model, quantize)
    for p_ in model.parameters():
        p_.requires_grad_(True)
    quantized_base(model)
    source = Source(ckpt.format, tok_file, ckpt.gguf_metadata)
    return model.train(), tokenizer, source


def quantized_base(model: torch.nn.Module) -> int:
    """Put every QuantizedLinear on the exact dequantize path (losses and gradients of the dequantized
    weights, not of int8 activations); returns how many there are."""
    from llamaforge.quantize import QuantizedLinear

    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    for layer in layers:
        layer.exact = True
    return len(layers)


def full_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state_dict` plus the dequantized float32 weight of every quantized layer (`name.weight`), which a
    quantized model's state dict leaves out; for exporting a merged model."""
    from llamaforge.quantize import QuantizedEmbedding, QuantizedLinear

    full = dict(state_dict)
    for name, module in model.named_modules():
        if isinstance(module, (QuantizedLinear, QuantizedEmbedding)):
            full.setdefault(f"{name}.weight", module.dequantize())
    return full


def enable_activation_checkpointing(model: Transformer) -> None:
    """Recompute each transformer block in the backward pass instead of keeping its activations.

    The block's `forward` is wrapped on the instance, so parameter names do not change.
    """
    for block in model.layers:
        original = block.forward

        def forward(*args: Any, _original: Any = original, **kwargs: Any) -> torch.Tensor:
            if not torch.is_grad_enabled():
                return _original(*args, **kwargs)
            return checkpoint(_original, *args, use_reentrant=False, **kwargs)

        block.forward = functools.wraps(original)(forward)


def export_state_dict(args: ModelArgs, state_dict: dict[str, torch.Tensor],
                      lora_alpha: Optional[float] = None) -> dict[str, torch.Tensor]:
    """Meta-named float tensors on the CPU: LoRA adapters merged, a tied output matrix dropped."""
    from llamaforge.training.lora import merge_lora_state_dict

    sd = {k: v.detach().to("cpu") for k, v in state_dict.items()}
    if lora_alpha is not None:
        sd = merge_lora_state_dict(sd, lora_alpha)
    if args.tie_embeddings:
        sd.pop("output.weight", None)
    return sd


def export_format(requested: str, source: Source) -> str:
    """"auto": GGUF for a GGUF source (its tokenizer lives in the metadata), Hugging Face for a
    tokenizer.json, else Meta."""
    if requested != "auto":
        return requested
    if source.gguf_metadata is not None:
        return "gguf"
    if source.tokenizer_path is not None and Path(source.tokenizer_path).read_bytes()[:1] == b"{":
        return "hf"
    return "meta"


def export_model(args: ModelArgs, state_dict: dict[str, torch.Tensor], source: Source, out: Path,
                 fmt: str = "auto", dtype: Optional[str] = None, lora_alpha: Optional[float] = None) -> Path:
    """Write the trained model where `Llama.build` loads it; returns the path to give `Llama.build`.

    Args:
        args: the model's shape.
        state_dict: the trained model's full state dict (LoRA keys are merged with `lora_alpha`).
        source: where the model came from (its tokenizer file or GGUF metadata).
        out: the output folder (replaced if it exists).
        fmt: "auto", "meta", "hf" or "gguf" (see `export_format`).
        dtype: cast weights (Meta/HF: e.g. "bfloat16"; GGUF: "f32", "f16" (default) or "q8_0").
        lora_alpha: the LoRA alpha when the state dict holds adapters.

    Raises:
        ConfigError: a Meta/HF export of a model whose tokenizer lives only in GGUF metadata, or a GGUF
            export of a model without GGUF tokenizer metadata.
    """
    from llamaforge import checkpoints

    fmt = export_format(fmt, source)
    sd = export_state_dict(args, state_dict, lora_alpha)
    if fmt == "gguf":
        if source.gguf_metadata is None:
            raise ConfigError("GGUF export needs a GGUF source (its tokenizer metadata); use export = 'meta' or 'hf'")
        target = out / "model.gguf"
        checkpoints.save_gguf(args, sd, target, tokenizer_metadata=source.gguf_metadata, dtype=dtype or "f16",
                              overwrite=True)
        return target
    if source.tokenizer_path is None:
        raise ConfigError(f"{fmt} export needs a tokenizer file; this model's tokenizer is only in GGUF metadata "
                          "(use export = 'gguf')")
    save = checkpoints.save_meta if fmt == "meta" else checkpoints.save_hf
    save(args, sd, out, tokenizer_path=source.tokenizer_path, dtype=dtype, overwrite=True)
    return out
