"""LoRA adapters as files of their own: PEFT's layout (which PEFT and vLLM load) and llama.cpp's GGUF LoRA.

An `Adapter` holds, per adapted module (Meta names, "layers.0.attention.wq"), A (r, in) and B (out, r)
in Meta's row order, with `alpha` and `rank`: the update is `(alpha / rank) * B @ A`.

- PEFT (`save_peft` / `read_adapter` on a folder): `adapter_config.json` (peft_type LORA, r, lora_alpha,
  target_modules as Hugging Face names) and `adapter_model.safetensors` with PEFT's keys
  `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`. Hugging Face permutes the rows of
  q_proj / k_proj for its rotate-half rotary embedding, so B of wq / wk is permuted the same way
  (`meta_to_hf_qk`); A is not (its rows are the rank).
- GGUF LoRA (`save_gguf_lora` / `read_adapter` on a .gguf file), as llama.cpp's convert_lora_to_gguf.py
  writes it: general.type = "adapter", adapter.type = "lora", adapter.lora.alpha, tensors
  `blk.0.attn_q.weight.lora_a` (r, in) and `.lora_b` (out, r), in GGUF's (= Meta's) row order.

`apply_adapters(model, adapters)` adds adapters to a built model: merged into float weights
(`W += s * B @ A`, exact, no cost per token) or, over quantized weights, as LoRALinear wrappers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from llamaforge.errors import CheckpointError, ConfigError
from llamaforge.model import ModelArgs

PathLike = Union[str, Path]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

# Meta module suffix -> (Hugging Face module, GGUF tensor) names.
_NAMES = {
    "attention.wq": ("self_attn.q_proj", "attn_q"),
    "attention.wk": ("self_attn.k_proj", "attn_k"),
    "attention.wv": ("self_attn.v_proj", "attn_v"),
    "attention.wo": ("self_attn.o_proj", "attn_output"),
    "feed_forward.w1": ("mlp.gate_proj", "ffn_gate"),
    "feed_forward.w2": ("mlp.down_proj", "ffn_down"),
    "feed_forward.w3": ("mlp.up_proj", "ffn_up"),
}
_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_GGUF_LAYER = re.compile(r"blk\.(\d+)\.(.+)")


@dataclass
class Adapter:
    """A LoRA adapter: {Meta module name: (A (r, in), B (out, r))} float32, Meta row order."""

    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    alpha: float
    rank: int
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


# -- names ----------------------------------------------------------------------------------------------

def _hf_name(meta: str) -> str:
    if meta == "output":
        return "lm_head"
    m = _LAYER.fullmatch(meta)
    if m is None or m.group(2) not in _NAMES:
        raise ConfigError(f"no Hugging Face name for the adapted module {meta!r}")
    return f"model.layers.{m.group(1)}.{_NAMES[m.group(2)][0]}"


def _gguf_name(meta: str) -> str:
    if meta == "output":
        return "output"
    m = _LAYER.fullmatch(meta)
    if m is None or m.group(2) not in _NAMES:
        raise ConfigError(f"no GGUF name for the adapted module {meta!r}")
    return f"blk.{m.group(1)}.{_NAMES[m.group(2)][1]}"


def _meta_from(name: str, pattern: re.Pattern, column: int, where: str) -> str:
    if name in ("lm_head", "output"):
        return "output"
    m = pattern.fullmatch(name)
    inverse = {names[column]: meta for meta, names in _NAMES.items()}
    if m is None or m.group(2) not in inverse:
        raise CheckpointError(f"{where}: adapter tensor for {name!r}, which is no projection of a Llama model")
    return f"layers.{m.group(1)}.{inverse[m.group(2)]}"


def _qk_heads(meta: str, args: ModelArgs) -> Optional[int]:
    """Heads whose rows Hugging Face permutes for this module (q: n_heads, k: n_kv_heads), else None."""
    if meta.endswith("attention.wq"):
        return args.n_heads
    if meta.endswith("attention.wk"):
        return args.n_kv_heads
    return None


# -- from a model ---------------------------------------------------------------------------------------

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


# -- PEFT -----------------------------------------------------------------------------------------------

def save_peft(adapter: Adapter, args: ModelArgs, out_dir: PathLike, *, dropout: float = 0.0,
              base_model: Optional[str] = None, overwrite: bool = True) -> Path:
    """Write `adapter` as a PEFT LoRA folder (atomically); returns the folder."""
    from safetensors.torch import save_file

    from llamaforge.checkpoints.hf import meta_to_hf_qk
    from llamaforge.checkpoints.save import atomic_dir

    tensors: dict[str, torch.Tensor] = {}
    targets = set()
    for meta, (a, b) in sorted(adapter.weights.items()):
        hf = _hf_name(meta)
        heads = _qk_heads(meta, args)
        if heads is not None:
            b = meta_to_hf_qk(b, heads, args.head_dim)
        tensors[f"{PEFT_PREFIX}{hf}.lora_A.weight"] = a.contiguous()
        tensors[f"{PEFT_PREFIX}{hf}.lora_B.weight"] = b.contiguous()
        targets.add(hf.rsplit(".", 1)[-1])
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": adapter.rank, "lora_alpha": adapter.alpha,
        "lora_dropout": dropout, "target_modules": sorted(targets), "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "base_model_name_or_path": base_model, "modules_to_save": None,
    }
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return Path(out_dir)


def _read_peft(folder: Path, args: ModelArgs) -> Adapter:
    from safetensors.torch import load_file

    from llamaforge.checkpoints.hf import hf_to_meta_qk

    cfg_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not cfg_path.is_file() or not weights_path.is_file():
        raise CheckpointError(f"{folder} is not a PEFT adapter folder: it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({exc})") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{cfg_path}: only LoRA adapters (peft_type 'LORA') load, got {cfg.get('peft_type')!r}")
    for option in ("use_dora", "use_rslora", "fan_in_fan_out"):
        if cfg.get(option):
            raise CheckpointError(f"{cfg_path}: {option} adapters are not supported; save the adapter without it")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise CheckpointError(f"{cfg_path}: per-module rank_pattern / alpha_pattern are not supported")
    rank, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(rank, int) or rank <= 0 or not isinstance(alpha, (int, float)):
        raise CheckpointError(f"{cfg_path}: r must be a positive integer and lora_alpha a number, got {rank!r}, {alpha!r}")
    raw = load_file(str(weights_path))
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, a in raw.items():
        if ".lora_A." not in key:
            if ".lora_B." not in key:
                raise CheckpointError(f"{weights_path}: unexpected tensor {key!r} (only lora_A / lora_B load)")
            continue
        stem = key.split(".lora_A.")[0]
        stem = stem[len(PEFT_PREFIX):] if stem.startswith(PEFT_PREFIX) else stem
        b_key = key.replace(".lora_A.", ".lora_B.")
        if b_key not in raw:
            raise CheckpointError(f"{weights_path}: {key} has no matching {b_key}")
        meta = _meta_from(stem, _HF_LAYER, 0, str(weights_path))
        b = raw[b_key].float()
        heads = _qk_heads(meta, args)
        if heads is not None:
            if b.dim() != 2 or b.shape[0] != heads * args.head_dim:
                raise CheckpointError(f"{weights_path}: {b_key} has shape {tuple(b.shape)}, the model's {meta} has "
                                      f"{heads * args.head_dim} rows; is the adapter for another model?")
            b = hf_to_meta_qk(b, heads, args.head_dim)
        weights[meta] = (a.float(), b)
    return Adapter(weights, float(alpha), rank, str(folder), {"lora_dropout": cfg.get("lora_dropout", 0.0)})


# -- GGUF LoRA ------------------------------------------------------------------------------------------

def save_gguf_lora(adapter: Adapter, out_path: PathLike, *, dtype: str = "f32", overwrite: bool = True) -> Path:
    """Write `adapter` as a llama.cpp GGUF LoRA file (atomically): `llama-cli -m base.gguf --lora file`."""
    import gguf
    import numpy as np

    from llamaforge.checkpoints.save import atomic_file

    if dtype not in ("f32", "f16"):
        raise ConfigError(f"GGUF LoRA dtype must be 'f32' or 'f16', got {dtype!r}")
    np_dtype = np.float32 if dtype == "f32" else np.float16
    with atomic_file(out_path, overwrite=overwrite) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        try:
            writer.add_type(gguf.GGUFType.ADAPTER)
            writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(adapter.alpha))
            for meta, (a, b) in sorted(adapter.weights.items()):
                name = _gguf_name(meta)
                writer.add_tensor(f"{name}.weight.lora_a", a.numpy().astype(np_dtype))  # (r, in)
                writer.add_tensor(f"{name}.weight.lora_b", b.numpy().astype(np_dtype))  # (out, r)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return Path(out_path)


def _read_gguf_lora(path: Path) -> Adapter:
    import gguf
    import numpy as np

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError / struct errors on a bad file
        raise CheckpointError(f"{path} is not a readable GGUF file ({exc})") from None

    def field_value(key: str) -> Any:
        f = reader.get_field(key)
        return None if f is None else f.contents()

    if field_value("general.type") != "adapter" or field_value("adapter.type") != "lora":
        raise CheckpointError(f"{path} is a GGUF file but not a LoRA adapter (general.type = 'adapter', "
                              "adapter.type = 'lora'); give a model with `model`, an adapter with `adapters`")
    alpha = field_value("adapter.lora.alpha")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for t in reader.tensors:
        stem, _, part = t.name.rpartition(".weight.lora_")
        if part not in ("a", "b") or t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            raise CheckpointError(f"{path}: unexpected tensor {t.name!r} ({t.tensor_type.name}); F32/F16 "
                                  "`<name>.weight.lora_a` / `.lora_b` pairs load")
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists dimensions innermost first
        pairs.setdefault(stem, {})[part] = torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(shape))
    weights = {}
    for stem, ab in pairs.items():
        if set(ab) != {"a", "b"}:
            raise CheckpointError(f"{path}: {stem} has lora_{next(iter(ab))} without its pair")
        weights[_meta_from(stem, _GGUF_LAYER, 1, str(path))] = (ab["a"], ab["b"])
    ranks = {a.shape[0] for a, _ in weights.values()}
    if not weights or len(ranks) != 1:
        raise CheckpointError(f"{path}: a LoRA adapter needs tensor pairs of one rank, found ranks {sorted(ranks)}")
    rank = ranks.pop()
    return Adapter(weights, float(alpha) if alpha is not None else float(rank), rank, str(path))


# -- reading and applying -------------------------------------------------------------------------------

def read_adapter(path: PathLike, args: ModelArgs) -> Adapter:
    """A PEFT folder (or its adapter_config.json) or a GGUF LoRA file, checked against the model shape."""
    p = Path(path)
    if p.is_file() and p.name == ADAPTER_CONFIG:
        p = p.parent
    if p.is_dir():
        adapter = _read_peft(p, args)
    elif p.is_file():
        adapter = _read_gguf_lora(p)
    else:
        raise CheckpointError(f"adapter {p} does not exist (give a PEFT adapter folder or a GGUF LoRA file)")
    for meta, (a, b) in adapter.weights.items():
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != adapter.rank or b.shape[1] != adapter.rank:
            raise CheckpointError(f"{p}: {meta} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                                  f"not (r, in) and (out, r) with r = {adapter.rank}")
        m = _LAYER.fullmatch(meta)
        if m is not None and int(m.group(1)) >= args.n_layers:
            raise CheckpointError(f"{p} adapts {meta}, but the model has {args.n_layers} layers; is it for another model?")
    return adapter


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
                wrapped = LoRALinear(module, adapter.rank, adapter.alpha)
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
