"""LoRA adapter files, read and written in one place: PEFT's layout (which PEFT and vLLM load) and llama.cpp's
GGUF LoRA. Training writes them and merges them (`training/adapters.py`); serving reads them per request
(`runtime/adapters.py`); both read through `read_adapter` here.

An `Adapter` holds, per adapted module (Meta names, "layers.0.attention.wq", or "output"), A (r, in) and
B (out, r) float32 in Meta's row order, with `alpha` and `rank`: the update is `scaling * B @ A`, scaling
= alpha / rank (alpha / sqrt(rank) for rsLoRA).

- PEFT (`save_peft` / `read_peft`, a folder): `adapter_config.json` (peft_type LORA, r, lora_alpha,
  target_modules as Hugging Face names) and `adapter_model.safetensors` with PEFT's keys
  `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (an optional `.default` before
  `.weight`). Hugging Face permutes the rows of q_proj / k_proj for its rotate-half rotary embedding, so
  B of wq / wk is permuted the same way (`permute_qk_rows`, as the checkpoint loader does for the weights);
  A is not (its rows are the rank).
- GGUF LoRA (`save_gguf_lora` / `read_gguf_lora`, a .gguf file), as llama.cpp's convert_lora_to_gguf.py
  writes it: general.type = "adapter", adapter.type = "lora", adapter.lora.alpha, tensors
  `blk.0.attn_q.weight.lora_a` (r, in) and `.lora_b` (out, r), in GGUF's (= Meta's) row order; read with
  the one validated GGUF reader (`gguf_reader.py`).

Every tensor is checked against the model's shapes (`ModelArgs`) before it is used: a file for another
model is a CheckpointError that says so.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from llamaforge.checkpoints.hf import permute_qk_rows
from llamaforge.checkpoints.keymaps import read_json_object
from llamaforge.errors import CheckpointError, ConfigError
from llamaforge.model import ModelArgs

PathLike = Union[str, Path]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
MAX_CONFIG_BYTES = 1 << 20

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
_PEFT_KEY = re.compile(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight")
_QK = ("attention.wq", "attention.wk")  # modules whose rows Hugging Face permutes for rotate-half rotary


@dataclass
class Adapter:
    """A LoRA adapter: {Meta module name: (A (r, in), B (out, r))} float32, Meta row order."""

    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    alpha: float
    rank: int
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    use_rslora: bool = False  # rank-stabilised LoRA (PEFT's use_rslora): scaling alpha / sqrt(rank)

    @property
    def scaling(self) -> float:
        return self.alpha / (self.rank ** 0.5 if self.use_rslora else self.rank)


# -- names and shapes -----------------------------------------------------------------------------------

def _name_in(fmt: str, meta: str) -> str:
    """The Hugging Face ("hf") or GGUF ("gguf") name of a Meta module."""
    hf = fmt == "hf"
    if meta == "output":
        return "lm_head" if hf else "output"
    m = _LAYER.fullmatch(meta)
    if m is None or m.group(2) not in _NAMES:
        raise ConfigError(f"no {'Hugging Face' if hf else 'GGUF'} name for the adapted module {meta!r}")
    return f"model.layers.{m.group(1)}.{_NAMES[m.group(2)][0]}" if hf else f"blk.{m.group(1)}.{_NAMES[m.group(2)][1]}"


def _meta_from(name: str, pattern: re.Pattern, column: int, where: str) -> str:
    """The Meta module of a Hugging Face (column 0) or GGUF (column 1) module name."""
    if name in ("lm_head", "output"):
        return "output"
    m = pattern.fullmatch(name)
    inverse = {names[column]: meta for meta, names in _NAMES.items()}
    if m is None or m.group(2) not in inverse:
        raise CheckpointError(f"{where}: adapter tensor for {name!r}, which is no projection of a Llama model")
    return f"layers.{m.group(1)}.{inverse[m.group(2)]}"


def module_shape(meta: str, args: ModelArgs) -> tuple[int, int]:
    """(out_features, in_features) of a projection named by its Meta module path ("output" included)."""
    if meta == "output":
        return args.vocab_size, args.dim
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    leaf = meta.rsplit(".", 1)[-1]
    return {"wq": (q, args.dim), "wk": (kv, args.dim), "wv": (kv, args.dim), "wo": (args.dim, q),
            "w1": (args.hidden_dim, args.dim), "w3": (args.hidden_dim, args.dim),
            "w2": (args.dim, args.hidden_dim)}[leaf]


# -- reading --------------------------------------------------------------------------------------------

def read_adapter(path: PathLike, args: ModelArgs) -> Adapter:
    """A PEFT folder (or its adapter_config.json) or a GGUF LoRA file, checked against the model's shapes.

    Raises:
        CheckpointError: no adapter there, a file that is no LoRA adapter, or one for another model's shapes.
    """
    p = Path(path)
    if p.is_file() and p.name == ADAPTER_CONFIG:
        p = p.parent
    if p.is_dir():
        adapter = read_peft(p, args)
    elif p.is_file():
        adapter = read_gguf_lora(p, args)
    else:
        raise CheckpointError(f"adapter {p} does not exist (give a PEFT adapter folder or a GGUF LoRA file)")
    for meta, (a, b) in adapter.weights.items():
        m = _LAYER.fullmatch(meta)
        if m is not None and int(m.group(1)) >= args.n_layers:
            raise CheckpointError(f"{p} adapts {meta}, but the model has {args.n_layers} layers; is it for another model?")
        out_f, in_f = module_shape(meta, args)
        r = adapter.rank
        if tuple(a.shape) != (r, in_f) or tuple(b.shape) != (out_f, r):
            raise CheckpointError(f"{p}: {meta} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; this model "
                                  f"needs ({r}, {in_f}) and ({out_f}, {r}) at r={r}: is the adapter for another model?")
    return adapter


def read_peft(folder: PathLike, args: ModelArgs) -> Adapter:
    """A PEFT LoRA folder -> Adapter (B of wq / wk permuted to Meta's rows); see `read_adapter` for the checks."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not cfg_path.is_file() or not weights_path.is_file():
        raise CheckpointError(f"{folder} is not a PEFT adapter folder: it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    cfg = read_json_object(cfg_path, f"{folder} has no {ADAPTER_CONFIG}", MAX_CONFIG_BYTES)
    if cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{cfg_path}: only LoRA adapters (peft_type 'LORA') load, got {cfg.get('peft_type')!r}")
    for option in ("use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "modules_to_save"):
        if cfg.get(option):
            raise CheckpointError(f"{cfg_path}: {option} adapters are not supported; save the adapter without it")
    rank, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0 or isinstance(alpha, bool) \
            or not isinstance(alpha, (int, float)):
        raise CheckpointError(f"{cfg_path}: r must be a positive integer and lora_alpha a number, "
                              f"got {rank!r}, {alpha!r}")
    try:
        raw = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights_path} is not a readable safetensors file ({exc})") from None
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in raw.items():
        m = _PEFT_KEY.fullmatch(key)
        if m is None:
            raise CheckpointError(f"{weights_path}: unexpected tensor {key!r} (only lora_A / lora_B weights load)")
        meta = _meta_from(m.group(1), _HF_LAYER, 0, str(weights_path))
        if m.group(2) in halves.get(meta, {}):
            raise CheckpointError(f"{weights_path}: two lora_{m.group(2)} tensors for {meta}")
        halves.setdefault(meta, {})[m.group(2)] = tensor
    if not halves:
        raise CheckpointError(f"{weights_path} holds no LoRA weights")
    weights = {}
    for meta, ab in sorted(halves.items()):
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{weights_path}: {meta} has lora_{'A' if 'A' in ab else 'B'} but not its pair")
        a, b = ab["A"].float(), ab["B"].float()
        if meta.endswith(_QK):
            rows = module_shape(meta, args)[0]
            if b.dim() != 2 or b.shape[0] != rows:
                raise CheckpointError(f"{weights_path}: {meta} has lora_B {tuple(b.shape)}, the model's {meta} has "
                                      f"{rows} rows; is the adapter for another model?")
            b = permute_qk_rows(f"{meta}.weight", b, args, to_meta=True)  # (out, r): rows to Meta's rotary pairs
        weights[meta] = (a.contiguous(), b.contiguous())
    return Adapter(weights, float(alpha), rank, str(folder), {"lora_dropout": cfg.get("lora_dropout", 0.0)},
                   use_rslora=bool(cfg.get("use_rslora")))


def read_gguf_lora(path: PathLike, args: Optional[ModelArgs] = None) -> Adapter:
    """A llama.cpp GGUF LoRA file -> Adapter (through the one validated GGUF reader).

    With the base model's `args`, the file's `general.architecture` must be the model's (as llama.cpp
    requires), and for qwen2 / qwen3 files, whose q/k rows are rotate-half, B of wq / wk is permuted to
    Meta's rows.
    """
    from llamaforge.checkpoints.gguf import NEOX_ARCHS
    from llamaforge.checkpoints.gguf_reader import read_gguf
    from llamaforge.checkpoints.gguf_write import gguf_arch

    path = Path(path)
    gguf_file = read_gguf(path)
    meta = gguf_file.metadata
    if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
        raise CheckpointError(f"{path} is a GGUF file but not a LoRA adapter (general.type = 'adapter', "
                              "adapter.type = 'lora'); give a model with `model`, an adapter with `adapters`")
    arch = meta.get("general.architecture", "llama")
    if args is not None and arch != gguf_arch(args):
        raise CheckpointError(f"{path} is a LoRA adapter for a {arch!r} model, but this model is "
                              f"{gguf_arch(args)!r}; is the adapter for another model?")
    alpha = meta.get("adapter.lora.alpha")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))):
        raise CheckpointError(f"{path}: adapter.lora.alpha must be a number, got {alpha!r}")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, info in gguf_file.tensors.items():
        stem, _, part = name.rpartition(".weight.lora_")
        if part not in ("a", "b") or info.qtype not in ("F32", "F16") or len(info.shape) != 2:
            raise CheckpointError(f"{path}: unexpected tensor {name!r} ({info.qtype}, shape {info.shape}); "
                                  "2-D F32/F16 `<name>.weight.lora_a` / `.lora_b` pairs load")
        dtype = torch.float32 if info.qtype == "F32" else torch.float16
        t = gguf_file.raw(info).view(dtype).reshape(info.shape).float()  # (rows, cols), a copy in float32
        pairs.setdefault(_meta_from(stem, _GGUF_LAYER, 1, str(path)), {})[part] = t
    weights = {}
    for module, ab in pairs.items():
        if set(ab) != {"a", "b"}:
            raise CheckpointError(f"{path}: {module} has lora_{next(iter(ab))} without its pair")
        a, b = ab["a"], ab["b"]
        if (args is not None and arch in NEOX_ARCHS and module.endswith(_QK)
                and b.shape[0] == module_shape(module, args)[0]):  # other shapes: refused by read_adapter
            b = permute_qk_rows(f"{module}.weight", b, args, to_meta=True).contiguous()  # (out, r): Meta's rows
        weights[module] = (a, b)
    ranks = {a.shape[0] for a, _ in weights.values()}
    if not weights or len(ranks) != 1:
        raise CheckpointError(f"{path}: a LoRA adapter needs tensor pairs of one rank, found ranks {sorted(ranks)}")
    rank = ranks.pop()
    return Adapter(weights, float(alpha) if alpha is not None else float(rank), rank, str(path))


# -- writing --------------------------------------------------------------------------------------------

def save_peft(adapter: Adapter, args: ModelArgs, out_dir: PathLike, *, dropout: float = 0.0,
              base_model: Optional[str] = None, overwrite: bool = True) -> Path:
    """Write `adapter` as a PEFT LoRA folder (atomically); returns the folder."""
    from safetensors.torch import save_file

    from llamaforge.checkpoints.save import atomic_dir

    tensors: dict[str, torch.Tensor] = {}
    targets = set()
    for meta, (a, b) in sorted(adapter.weights.items()):
        hf = _name_in("hf", meta)
        b = permute_qk_rows(f"{meta}.weight", b, args, to_meta=False)  # (out, r): q/k rows to rotate-half
        tensors[f"{PEFT_PREFIX}{hf}.lora_A.weight"] = a.contiguous()
        tensors[f"{PEFT_PREFIX}{hf}.lora_B.weight"] = b.contiguous()
        targets.add(hf.rsplit(".", 1)[-1])
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": adapter.rank, "lora_alpha": adapter.alpha,
        "lora_dropout": dropout, "target_modules": sorted(targets), "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "use_rslora": adapter.use_rslora, "use_dora": False, "init_lora_weights": True,
        "base_model_name_or_path": base_model, "modules_to_save": None,
    }
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return Path(out_dir)


def save_gguf_lora(adapter: Adapter, args: ModelArgs, out_path: PathLike, *, dtype: str = "f32",
                   overwrite: bool = True) -> Path:
    """Write `adapter` as a llama.cpp GGUF LoRA file (atomically): `llama-cli -m base.gguf --lora file`.

    The file names the base model's architecture (llama.cpp refuses an adapter of another), and for qwen2 /
    qwen3 B of wq / wk goes back to their rotate-half rows, as the base GGUF's q/k are.
    """
    import gguf
    import numpy as np

    from llamaforge.checkpoints.gguf import NEOX_ARCHS
    from llamaforge.checkpoints.gguf_write import gguf_arch
    from llamaforge.checkpoints.save import atomic_file

    if dtype not in ("f32", "f16"):
        raise ConfigError(f"GGUF LoRA dtype must be 'f32' or 'f16', got {dtype!r}")
    if adapter.use_rslora:
        raise ConfigError("a GGUF LoRA file has no rsLoRA scaling; merge the adapter or save it as PEFT")
    np_dtype = np.float32 if dtype == "f32" else np.float16
    with atomic_file(out_path, overwrite=overwrite) as tmp:
        arch = gguf_arch(args)
        writer = gguf.GGUFWriter(str(tmp), arch)
        try:
            writer.add_type(gguf.GGUFType.ADAPTER)
            writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(adapter.alpha))
            for meta, (a, b) in sorted(adapter.weights.items()):
                name = _name_in("gguf", meta)
                if arch in NEOX_ARCHS:
                    b = permute_qk_rows(f"{meta}.weight", b, args, to_meta=False)  # (out, r): q/k to rotate-half
                writer.add_tensor(f"{name}.weight.lora_a", a.numpy().astype(np_dtype))  # (r, in)
                writer.add_tensor(f"{name}.weight.lora_b", b.numpy().astype(np_dtype))  # (out, r)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return Path(out_path)
