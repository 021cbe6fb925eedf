"""Hugging Face checkpoints: config.json + safetensors (single, or sharded with an index) or pytorch_model*.bin.

Names go through `keymaps.HF_TO_META`. Hugging Face's Llama stores the q/k projection rows permuted
for its rotate-half rotary embedding (transformers' convert_llama_weights_to_hf `permute`): within each
head, the first half of the rows holds the even ("real") components and the second half the odd ones.
Meta and GGUF keep them interleaved in pairs. `hf_to_meta_qk` undoes the permutation once at load time
and `meta_to_hf_qk` redoes it for saving; tests prove both against transformers' LlamaForCausalLM.

config.json is read for model_type "llama" (LlamaForCausalLM), "mistral" (MistralForCausalLM, same
tensors), "qwen2" (Qwen2ForCausalLM, Qwen2.5: biases on q/k/v, `ModelArgs.qkv_bias`) and "qwen3"
(Qwen3ForCausalLM: RMSNorm per head on q and k, `ModelArgs.qk_norm`). Qwen keeps q/k in the same
rotate-half layout, so the same permutation applies (to the q/k biases and norm weights as well).
A sliding window only matters past `sliding_window` positions, so such a model's context length is capped
at the window (`ModelArgs.sliding_window`), where it is exactly full attention. Rotary scaling:
none/"default" and "llama3" are supported; "linear", "dynamic", "yarn", "longrope", ... are refused by name.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import torch

from llamaforge.checkpoints import keymaps
from llamaforge.errors import CheckpointError, ConfigError
from llamaforge.model.args import ModelArgs, RopeScaling
from llamaforge.progress import iterate_bytes

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                         "qwen3": "Qwen3ForCausalLM"}
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def hf_to_meta_qk(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Hugging Face (rotate-half) q/k rows -> Meta's interleaved pairs; inverse of `meta_to_hf_qk`."""
    dim = w.shape[1]
    # (n_heads, 2 halves, head_dim/2, dim) -> (n_heads, head_dim/2, 2, dim): pair (re, im) row by row
    return w.view(n_heads, 2, head_dim // 2, dim).transpose(1, 2).reshape(n_heads * head_dim, dim)


def permute_qk_rows(key: str, w: torch.Tensor, args: ModelArgs, to_meta: bool) -> torch.Tensor:
    """Apply `hf_to_meta_qk` (or its inverse) to a q/k weight, bias or per-head norm weight named `key`; others pass."""
    if key.endswith(("wq.weight", "wq.bias")):
        heads = args.n_heads
    elif key.endswith(("wk.weight", "wk.bias")):
        heads = args.n_kv_heads
    elif key.endswith(("q_norm.weight", "k_norm.weight")):
        heads = 1  # one head's worth of weights, shared by every head
    else:
        return w
    fn = hf_to_meta_qk if to_meta else meta_to_hf_qk
    return fn(w, heads, args.head_dim) if w.dim() == 2 else fn(w.unsqueeze(1), heads, args.head_dim).squeeze(1)


def meta_to_hf_qk(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Meta's interleaved q/k rows -> Hugging Face's layout (transformers' `permute`)."""
    dim = w.shape[1]
    # (n_heads, head_dim/2 pairs, 2, dim) -> (n_heads, 2, head_dim/2, dim): evens first, then odds
    return w.view(n_heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(n_heads * head_dim, dim)


def is_safetensors(path: Path) -> bool:
    """Whether a file starts like safetensors: an 8-byte little-endian header length, then '{'."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 32)


def read_config(folder: Path) -> dict[str, Any]:
    """config.json as a dict, or a CheckpointError saying what is wrong with it."""
    return keymaps.read_json_object(folder / "config.json",
                                    f"{folder} has no config.json; a Hugging Face checkpoint needs one")


def _rope(config: dict[str, Any], source: str) -> tuple[float, Optional[RopeScaling]]:
    """(rope_theta, RopeScaling or None) from legacy `rope_theta`/`rope_scaling` or v5 `rope_parameters`."""
    theta = config.get("rope_theta", 10000.0)
    scaling = config.get("rope_scaling")
    params = config.get("rope_parameters")
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        if not scaling:
            scaling = params
    if not scaling:
        return theta, None
    if not isinstance(scaling, dict):
        raise CheckpointError(f"{source}/config.json: rope_scaling must be an object, got {scaling!r}")
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise CheckpointError(
            f"{source}/config.json: rope scaling type {kind!r} is not supported; llamaforge implements "
            "Llama 3 frequency scaling ('llama3') only"
        )
    try:
        return theta, RopeScaling(
            factor=scaling.get("factor", 8.0),
            low_freq_factor=scaling.get("low_freq_factor", 1.0),
            high_freq_factor=scaling.get("high_freq_factor", 4.0),
            original_max_position_embeddings=scaling.get("original_max_position_embeddings", 8192),
        )
    except ConfigError as e:
        raise CheckpointError(f"{source}/config.json: invalid llama3 rope scaling: {e}") from e


# The JSON type each config.json key llamaforge reads must have (None: the key may be null). Checked
# before any value is used, so a string where a number belongs is a CheckpointError naming the key;
# ranges (a huge max_position_embeddings) are ModelArgs' to check. A new key is one line.
CONFIG_TYPES: dict[str, tuple[type, ...]] = {
    "model_type": (str,),
    "architectures": (list, type(None)),
    "hidden_act": (str,),
    "attention_bias": (bool,),
    "mlp_bias": (bool,),
    "quantization_config": (dict, type(None)),
    "hidden_size": (int,),
    "intermediate_size": (int,),
    "num_hidden_layers": (int,),
    "num_attention_heads": (int,),
    "num_key_value_heads": (int, type(None)),
    "head_dim": (int, type(None)),
    "vocab_size": (int,),
    "max_position_embeddings": (int,),
    "sliding_window": (int, type(None)),
    "rms_norm_eps": (int, float),
    "rope_theta": (int, float),
    "rope_scaling": (dict, type(None)),
    "rope_parameters": (dict, type(None)),
    "tie_word_embeddings": (bool,),
}


def args_from_config(config: dict[str, Any], source: str) -> ModelArgs:
    """ModelArgs from a transformers LlamaConfig/MistralConfig dict.

    Raises:
        CheckpointError: another architecture, unsupported features (biases, activations, rope types,
            quantization), missing keys, a value of the wrong type or an invalid shape.
    """
    keymaps.check_json_types(config, CONFIG_TYPES, f"{source}/config.json")
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if model_type is None and any(a in SUPPORTED_MODEL_TYPES.values() for a in archs):
        model_type = "llama"
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{source}/config.json describes model_type={model_type!r} (architectures {archs}); llamaforge loads "
            f"Llama-architecture checkpoints: model_type {sorted(SUPPORTED_MODEL_TYPES)}"
        )
    problems = []
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={config['hidden_act']!r} (Llama uses 'silu')")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            problems.append(f"{flag}=true (a bias on the output or MLP projections)")
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        problems.append(f"quantization_config ({method}): quantized Hugging Face checkpoints")
    if problems:
        raise CheckpointError(f"{source}/config.json: not supported: {'; '.join(problems)}")
    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in required if k not in config]
    if missing:
        raise CheckpointError(f"{source}/config.json lacks {missing}")
    theta, scaling = _rope(config, source)
    max_pos = config.get("max_position_embeddings", 2048)
    window = config.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and not config.get("use_sliding_window", False):
        window = None  # Qwen configs name a window but use it only with use_sliding_window
    if window and window < max_pos:
        log.warning(
            "%s: sliding window %d < max_position_embeddings %d: context length capped at %d, "
            "where full attention is exactly sliding-window attention", source, window, max_pos, window,
        )
        max_pos = window
    else:
        window = None
    try:
        return ModelArgs(
            dim=config["hidden_size"], n_layers=config["num_hidden_layers"], n_heads=config["num_attention_heads"],
            vocab_size=config["vocab_size"], n_kv_heads=config.get("num_key_value_heads"),
            head_dim=config.get("head_dim"), hidden_dim=config["intermediate_size"],
            norm_eps=config.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
            max_seq_len=max_pos, tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2", qk_norm=model_type == "qwen3", sliding_window=window,
        )
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{source}/config.json describes an invalid model: {e}") from e


def config_from_args(args: ModelArgs, torch_dtype: str = "float32") -> dict[str, Any]:
    """A config.json that transformers (4.x and 5.x) builds exactly this model from.

    LlamaForCausalLM, or Qwen2ForCausalLM for q/k/v biases, Qwen3ForCausalLM for per-head q/k norms.
    """
    rope_scaling = None
    if args.rope_scaling is not None:
        rs = args.rope_scaling
        rope_scaling = {
            "rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
            "high_freq_factor": rs.high_freq_factor,
            "original_max_position_embeddings": rs.original_max_position_embeddings,
        }
    if args.qkv_bias and args.qk_norm:
        raise CheckpointError("no Hugging Face architecture has both q/k/v biases and q/k norms; save as GGUF or Meta")
    model_type = "qwen3" if args.qk_norm else "qwen2" if args.qkv_bias else "llama"
    config = {
        "architectures": [SUPPORTED_MODEL_TYPES[model_type]],
        "model_type": model_type,
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": args.tie_embeddings,
        "vocab_size": args.vocab_size,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": torch_dtype,
    }
    if model_type != "llama":
        del config["mlp_bias"], config["pretraining_tp"]
        config["use_sliding_window"] = False
        if model_type == "qwen2":  # always has q/k/v biases, no flag
            del config["attention_bias"]
    return config


def _read_index(path: Path) -> dict[str, str]:
    try:
        index = json.loads(path.read_text())
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not a valid weight index ({type(e).__name__}: {e})") from e
    return weight_map


def weight_files(folder: Path, chosen: Optional[Path] = None) -> tuple[list[Path], Optional[dict[str, str]]]:
    """The weight files of a Hugging Face folder and, when sharded, the index's weight map.

    Preference: model.safetensors.index.json, model.safetensors, a lone *.safetensors, then the same
    for pytorch_model*.bin. With `chosen` (a file the user named), that file alone unless an index lists it.

    Raises:
        CheckpointNotFoundError/CheckpointError: no weights, or files the index names are missing.
    """
    from llamaforge.errors import CheckpointNotFoundError

    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index_path = folder / index_name
        if not index_path.is_file():
            continue
        weight_map = _read_index(index_path)
        names = sorted(set(weight_map.values()))
        if chosen is not None and chosen.name not in names:
            continue
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(
                f"{index_path} lists {len(names)} shard file(s), {len(missing)} of them missing: {', '.join(missing)}; "
                "the download is incomplete, fetch the missing files"
            )
        return [folder / n for n in names], weight_map
    if chosen is not None:
        return [chosen], None
    for single, pattern, check in (("model.safetensors", "*.safetensors", is_safetensors),
                                   ("pytorch_model.bin", "*.bin", None)):
        if (folder / single).is_file():
            return [folder / single], None
        found = sorted(p for p in folder.glob(pattern) if p.is_file())
        if len(found) == 1:
            return found, None
        if len(found) > 1:
            raise CheckpointError(
                f"{folder} has several {pattern} files ({', '.join(p.name for p in found)}) but no index; "
                "point at one file, or add the model.safetensors.index.json that belongs to them"
            )
    raise CheckpointNotFoundError(f"{folder} has config.json but no model.safetensors or pytorch_model.bin")


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    with open(path, "rb") as f:
        head = f.read(4)
    if not is_safetensors(path) and not (head == b"PK\x03\x04" or head[:1] == b"\x80"):
        raise CheckpointError(
            f"{path} is neither a safetensors nor a PyTorch file (it starts with {head!r}); the file is truncated "
            "or corrupt, download it again"
        )
    try:
        if is_safetensors(path):
            from safetensors import safe_open

            out = {}
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    out[key] = f.get_tensor(key)
            return out
        sd = torch.load(path, map_location="cpu", mmap=head == b"PK\x03\x04", weights_only=True)
    except Exception as e:  # safetensors raises SafetensorError/OSError, torch RuntimeError/UnpicklingError...
        first = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(
            f"{path}: cannot read these weights ({type(e).__name__}: {first}); the file is truncated or corrupt, "
            "download it again"
        ) from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} does not hold a flat dict of tensors (got {type(sd).__name__})")
    return sd


def load_hf(
    folder: Path, chosen: Optional[Path] = None, *, progress: bool = False
) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """Load a Hugging Face Llama checkpoint as (ModelArgs, Meta-named state dict in Meta's q/k layout).

    Raises:
        CheckpointError: bad config, missing or corrupt shards, unknown/missing tensors, wrong shapes.
    """
    source = str(folder)
    args = args_from_config(read_config(folder), source)
    files, weight_map = weight_files(folder, chosen)
    iterator = iterate_bytes(files, lambda f: f.stat().st_size, f"loading {folder.name}", enabled=progress)
    raw: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for path in iterator:
        for key, tensor in _read_file(path).items():
            if key in raw:
                raise CheckpointError(f"{key} is stored twice, in {origin[key]} and {path.name}")
            raw[key], origin[key] = tensor, path.name
    if weight_map is not None:
        absent = [f"{k} (in {f})" for k, f in weight_map.items() if origin.get(k) != f]
        if absent:
            raise CheckpointError(
                f"{source}: the weight index names {len(absent)} tensor(s) its files do not hold: {', '.join(absent[:8])}"
            )
    sd = keymaps.rename(raw, keymaps.HF_TO_META, fmt="Hugging Face", source=source, ignored=keymaps.IGNORED["hf"])
    if args.tie_embeddings:
        sd.pop("output.weight", None)  # transformers ties it to the embedding and ignores a stored copy
    keymaps.check_state_dict(sd, args, source=source, config="config.json")
    return args, {key: permute_qk_rows(key, w, args, to_meta=True) for key, w in sd.items()}


def to_hf_state_dict(args: ModelArgs, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Meta-named tensors -> Hugging Face names, q/k permuted to HF's layout."""
    out = {}
    table = keymaps.invert(keymaps.HF_TO_META)
    for key, value in state_dict.items():
        value = permute_qk_rows(key, value, args, to_meta=False)
        out.update(keymaps.rename({key: value}, table, fmt="Meta", source="state_dict"))
    return out
