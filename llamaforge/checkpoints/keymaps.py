"""Weight-name tables: every checkpoint format mapped to Meta's names, and the checks on the result.

Inside llamaforge parameters carry the names of Meta's reference checkpoints (`tok_embeddings`,
`layers.{i}.attention.wq`, `feed_forward.w1..w3`, ...). Each other format has ONE declarative table
here, `{their name template: Meta name template}`, with `{i}` standing for a layer number; renaming
goes through `rename` in either direction and names every key it does not know. Known-harmless
extras (rotary frequency buffers some writers include) are listed per format and dropped.

`meta_shapes(args)` says what shape each Meta-named tensor must have, and `check_state_dict` compares
a state dict against it, reporting missing, unknown and wrongly shaped tensors by name, with the
`ModelArgs` values that imply each expected shape.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from llamaforge.errors import CheckpointError
from llamaforge.model.args import ModelArgs

# Meta's names: one entry per tensor kind. `{i}` is the layer number.
META_TOP = ("tok_embeddings.weight", "norm.weight", "output.weight")
META_LAYER = (
    "layers.{i}.attention.wq.weight",
    "layers.{i}.attention.wk.weight",
    "layers.{i}.attention.wv.weight",
    "layers.{i}.attention.wo.weight",
    "layers.{i}.feed_forward.w1.weight",
    "layers.{i}.feed_forward.w2.weight",
    "layers.{i}.feed_forward.w3.weight",
    "layers.{i}.attention_norm.weight",
    "layers.{i}.ffn_norm.weight",
)
# Present only for the architectures whose ModelArgs ask for them.
META_QKV_BIAS = ("layers.{i}.attention.wq.bias", "layers.{i}.attention.wk.bias", "layers.{i}.attention.wv.bias")
META_QK_NORM = ("layers.{i}.attention.q_norm.weight", "layers.{i}.attention.k_norm.weight")

# Hugging Face transformers `LlamaForCausalLM` names -> Meta names.
HF_TO_META: dict[str, str] = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attention.wq.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attention.wk.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attention.wv.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attention.wo.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.feed_forward.w1.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.feed_forward.w2.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.feed_forward.w3.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attention_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.ffn_norm.weight",
    # Qwen2 (biases) and Qwen3 (per-head q/k norms)
    "model.layers.{i}.self_attn.q_proj.bias": "layers.{i}.attention.wq.bias",
    "model.layers.{i}.self_attn.k_proj.bias": "layers.{i}.attention.wk.bias",
    "model.layers.{i}.self_attn.v_proj.bias": "layers.{i}.attention.wv.bias",
    "model.layers.{i}.self_attn.q_norm.weight": "layers.{i}.attention.q_norm.weight",
    "model.layers.{i}.self_attn.k_norm.weight": "layers.{i}.attention.k_norm.weight",
}

# llama.cpp GGUF tensor names (gguf-py `MODEL_TENSOR` for arch "llama") -> Meta names.
GGUF_TO_META: dict[str, str] = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.attention.wq.weight",
    "blk.{i}.attn_k.weight": "layers.{i}.attention.wk.weight",
    "blk.{i}.attn_v.weight": "layers.{i}.attention.wv.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.attention.wo.weight",
    "blk.{i}.ffn_gate.weight": "layers.{i}.feed_forward.w1.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.feed_forward.w2.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.feed_forward.w3.weight",
    "blk.{i}.attn_norm.weight": "layers.{i}.attention_norm.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.ffn_norm.weight",
    # qwen2 (biases) and qwen3 (per-head q/k norms)
    "blk.{i}.attn_q.bias": "layers.{i}.attention.wq.bias",
    "blk.{i}.attn_k.bias": "layers.{i}.attention.wk.bias",
    "blk.{i}.attn_v.bias": "layers.{i}.attention.wv.bias",
    "blk.{i}.attn_q_norm.weight": "layers.{i}.attention.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "layers.{i}.attention.k_norm.weight",
}

# Keys some writers include that carry nothing the model needs (recomputed rotary buffers).
IGNORED: dict[str, tuple[str, ...]] = {
    "meta": ("rope.freqs",),
    "hf": ("model.layers.{i}.self_attn.rotary_emb.inv_freq", "model.rotary_emb.inv_freq"),
    # `rope_freqs.weight` is not ignored: the GGUF loader turns it into a RopeScaling first.
    "gguf": ("blk.{i}.attn_rot_embd",),
}

# How Meta's model-parallel (fairscale) layers split each tensor across shards:
# ColumnParallelLinear on dim 0, RowParallelLinear on dim 1, norms replicated.
# The embedding is special: Llama 1/2's ParallelEmbedding splits dim 1, Llama 3's
# VocabParallelEmbedding splits dim 0; meta.py decides from the shapes.
META_SHARD_DIM: dict[str, int | None] = {
    "tok_embeddings.weight": 1,
    "output.weight": 0,
    "norm.weight": None,
    "layers.{i}.attention.wq.weight": 0,
    "layers.{i}.attention.wk.weight": 0,
    "layers.{i}.attention.wv.weight": 0,
    "layers.{i}.attention.wo.weight": 1,
    "layers.{i}.feed_forward.w1.weight": 0,
    "layers.{i}.feed_forward.w2.weight": 1,
    "layers.{i}.feed_forward.w3.weight": 0,
    "layers.{i}.attention_norm.weight": None,
    "layers.{i}.ffn_norm.weight": None,
    "layers.{i}.attention.wq.bias": 0,
    "layers.{i}.attention.wk.bias": 0,
    "layers.{i}.attention.wv.bias": 0,
    "layers.{i}.attention.q_norm.weight": None,
    "layers.{i}.attention.k_norm.weight": None,
}

_LAYER = re.compile(r"\.(\d+)\.")


def _template_of(key: str) -> tuple[str, str | None]:
    """Split `layers.12.attention.wq.weight` into (`layers.{i}.attention.wq.weight`, "12")."""
    match = _LAYER.search(key)
    if match is None:
        return key, None
    return key[: match.start()] + ".{i}." + key[match.end():], match.group(1)


def template(key: str) -> str:
    """The table template a concrete key belongs to (`{i}` in place of its layer number)."""
    return _template_of(key)[0]


def _limit(names: Iterable[str], n: int = 12) -> str:
    names = sorted(names, key=_natural)
    shown = ", ".join(names[:n])
    return shown + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def _natural(key: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key))


def rename(
    state_dict: Mapping[str, Any],
    table: Mapping[str, str],
    *,
    fmt: str,
    source: str,
    ignored: Iterable[str] = (),
) -> dict[str, Any]:
    """Rename every key of `state_dict` through `table` (templates with `{i}`).

    Keys matching an `ignored` template are dropped. Any other key the table does not know is an
    error that names it, the source, and the names the table does know.

    Raises:
        CheckpointError: unknown keys.
    """
    ignored = set(ignored)
    out: dict[str, Any] = {}
    unknown = []
    for key, value in state_dict.items():
        tmpl, layer = _template_of(key)
        if tmpl in ignored or key in ignored:
            continue
        target = table.get(tmpl)
        if target is None:
            unknown.append(key)
            continue
        out[target.replace("{i}", layer) if layer is not None else target] = value
    if unknown:
        raise CheckpointError(
            f"{source}: {len(unknown)} tensor name(s) unknown to the {fmt} key table: {_limit(unknown)}. "
            f"Known {fmt} names are: {', '.join(sorted(table))}. This is not a Llama-architecture "
            f"checkpoint, or it has extra parts llamaforge does not support (e.g. biases, vision towers)."
        )
    return out


def invert(table: Mapping[str, str]) -> dict[str, str]:
    """The reverse table (Meta name template -> format name template)."""
    return {meta: theirs for theirs, meta in table.items()}


def meta_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """The shape each Meta-named tensor of a model with these args must have."""
    d, hd, hidden = args.dim, args.head_dim, args.hidden_dim
    shapes: dict[str, tuple[int, ...]] = {
        "tok_embeddings.weight": (args.vocab_size, d),
        "norm.weight": (d,),
    }
    if not args.tie_embeddings:
        shapes["output.weight"] = (args.vocab_size, d)
    per_layer = {
        "attention.wq.weight": (args.n_heads * hd, d),
        "attention.wk.weight": (args.n_kv_heads * hd, d),
        "attention.wv.weight": (args.n_kv_heads * hd, d),
        "attention.wo.weight": (d, args.n_heads * hd),
        "feed_forward.w1.weight": (hidden, d),
        "feed_forward.w2.weight": (d, hidden),
        "feed_forward.w3.weight": (hidden, d),
        "attention_norm.weight": (d,),
        "ffn_norm.weight": (d,),
    }
    if args.qkv_bias:
        per_layer.update({"attention.wq.bias": (args.n_heads * hd,), "attention.wk.bias": (args.n_kv_heads * hd,),
                          "attention.wv.bias": (args.n_kv_heads * hd,)})
    if args.qk_norm:
        per_layer.update({"attention.q_norm.weight": (hd,), "attention.k_norm.weight": (hd,)})
    for i in range(args.n_layers):
        for name, shape in per_layer.items():
            shapes[f"layers.{i}.{name}"] = shape
    return shapes


def _why(key: str, args: ModelArgs) -> str:
    """Which ModelArgs values give the expected shape of `key` (for error messages)."""
    t = template(key)
    head = f"head_dim={args.head_dim}"
    if args.head_dim == args.dim // args.n_heads:
        head += f" = dim/n_heads = {args.dim}/{args.n_heads}"
    if t.endswith(("q_norm.weight", "k_norm.weight")):
        return head
    if t.endswith("wq.bias"):
        return f"n_heads={args.n_heads} x {head}"
    if t.endswith(("wk.bias", "wv.bias")):
        return f"n_kv_heads={args.n_kv_heads} x {head}"
    if t.endswith(("wq.weight", "wo.weight")):
        return f"n_heads={args.n_heads} x {head}, dim={args.dim}"
    if t.endswith(("wk.weight", "wv.weight")):
        return f"n_kv_heads={args.n_kv_heads} x {head}, dim={args.dim}"
    if "feed_forward" in t:
        return (
            f"hidden_dim={args.hidden_dim} (multiple_of={args.multiple_of}, "
            f"ffn_dim_multiplier={args.ffn_dim_multiplier}), dim={args.dim}"
        )
    if t in ("tok_embeddings.weight", "output.weight"):
        return f"vocab_size={args.vocab_size}, dim={args.dim}"
    return f"dim={args.dim}"


def _per_shard(key: str, shape: tuple[int, ...], shards: int) -> str:
    """' (= 2 shards x [32, 64])' for a tensor merged from model-parallel shards."""
    cat_dim = META_SHARD_DIM.get(template(key))
    if shards <= 1 or cat_dim is None or key == "tok_embeddings.weight" or len(shape) <= cat_dim:
        return ""
    part = list(shape)
    part[cat_dim] //= shards
    return f" (= {shards} model-parallel shards x {part})"


def shape_of(value: Any) -> tuple[int, ...]:
    """Shape of a tensor or of a GGUFQuantTensor (its logical, dequantized shape)."""
    return tuple(int(s) for s in value.shape)


def check_state_dict(
    state_dict: Mapping[str, Any], args: ModelArgs, *, source: str, config: str, shards: int = 1
) -> None:
    """Check that a Meta-named state dict has exactly the tensors `args` implies, in the right shapes.

    Args:
        state_dict: Meta names -> tensors (or GGUFQuantTensor).
        args: the shape the config describes.
        source: the checkpoint path, for messages.
        config: where `args` came from ("params.json", "config.json", "GGUF metadata").
        shards: number of Meta model-parallel shards merged into `state_dict` (for messages).

    Raises:
        CheckpointError: naming missing tensors, unknown tensors and shape mismatches.
    """
    expected = meta_shapes(args)
    missing = [k for k in expected if k not in state_dict]
    unknown = [k for k in state_dict if k not in expected]
    problems = []
    if missing:
        tie = " (if the output layer shares the embedding, set tie_embeddings=True)" if "output.weight" in missing else ""
        problems.append(f"missing tensor(s): {_limit(missing)}{tie}")
    if unknown:
        extra = ""
        if any(_template_of(k)[1] is not None and int(_template_of(k)[1]) >= args.n_layers for k in unknown):
            extra = f" (layers beyond n_layers={args.n_layers}: {config} may give the wrong n_layers)"
        if "output.weight" in unknown and args.tie_embeddings:
            extra = " (output.weight present although the config ties it to tok_embeddings)"
        problems.append(f"unexpected tensor(s): {_limit(unknown)}{extra}")
    wrong = [
        f"{k} has shape {list(shape_of(state_dict[k]))}{_per_shard(k, shape_of(state_dict[k]), shards)} but "
        f"{config} implies {list(shape)} ({_why(k, args)})"
        for k, shape in expected.items()
        if k in state_dict and shape_of(state_dict[k]) != shape
    ]
    if wrong:
        problems.append("; ".join(wrong[:6]) + (f"; ... ({len(wrong) - 6} more)" if len(wrong) > 6 else ""))
    if problems:
        raise CheckpointError(
            f"{source} does not match {config}: " + " | ".join(problems)
            + f". Check that {config} belongs to these weights."
        )


def read_json_object(path: Path, missing: str, max_bytes: Optional[int] = None) -> dict[str, Any]:
    """A JSON file holding an object (config.json, params.json, adapter_config.json) as a dict.

    Raises:
        CheckpointError: `missing` when there is no such file; else what is wrong with it (larger than
            `max_bytes`, not JSON or not UTF-8, not an object).
    """
    try:
        if max_bytes is not None and path.stat().st_size > max_bytes:
            raise CheckpointError(f"{path} is larger than {max_bytes} bytes; it is no such config")
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(missing) from None
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, a 5000-digit number, nesting too deep
        raise CheckpointError(f"{path} is not valid JSON ({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def check_json_types(values: dict[str, Any], types: dict[str, tuple[type, ...]], where: str) -> None:
    """Refuse a JSON config value of the wrong type before it is used (a string where a number belongs).

    `types` maps a key to the Python types its JSON value may have (`type(None)` for null); keys not
    present in `values` are skipped, and true/false is never taken for a number.

    Raises:
        CheckpointError: naming the key, what it must be and what it is.
    """
    words = {str: "a string", list: "a list", dict: "an object", int: "an integer", float: "a number",
             bool: "true or false", type(None): "null"}
    for key, allowed in types.items():
        if key not in values:
            continue
        value = values[key]
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            must = " or ".join(words[t] for t in allowed)
            raise CheckpointError(f"{where}: {key} must be {must}, got {value!r:.60}")
