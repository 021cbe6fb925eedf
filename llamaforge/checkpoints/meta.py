"""Meta checkpoints: params.json + consolidated.NN.pth, with model-parallel shards merged on one process.

Meta's reference (meta-llama/llama, llama3, llama-models) saves one `consolidated.NN.pth` per
model-parallel rank. fairscale's ColumnParallelLinear (wq, wk, wv, w1, w3, output) splits dim 0,
RowParallelLinear (wo, w2) dim 1, norms are replicated, and the embedding is split on dim 1 by
Llama 1/2's ParallelEmbedding but on dim 0 (the vocabulary) by Llama 3's VocabParallelEmbedding; the
merge tells the two apart from the shapes and params.json's `dim`. `split_meta_shards` is the inverse.

Context length. Meta's params.json usually says nothing about it (the reference takes max_seq_len as a
build argument), so `ModelArgs.max_seq_len` is, in order: params.json's `max_seq_len` if present;
131072 when `use_scaled_rope` is set (Llama 3.1/3.2 are trained to 128K); 8192 for a Llama 3 vocabulary
(>= 128000 tokens); 2048 for Llama 1 (norm_eps 1e-6, no n_kv_heads, no rope_theta); else 4096 (Llama 2).

Rotary scaling (llama-models): `use_scaled_rope: true` is Llama 3 scaling with factor
`rope_scaling_factor` (default 8) and `rope_high_freq_factor` (default 4), low factor 1 and an
original context of 8192. llamaforge also reads/writes `rope_low_freq_factor` and
`rope_original_max_position_embeddings` when they differ from those constants.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch

from llamaforge.checkpoints import keymaps
from llamaforge.errors import CheckpointError, ConfigError
from llamaforge.model.args import ModelArgs, RopeScaling, meta_hidden_dim
from llamaforge.progress import iterate_bytes

log = logging.getLogger(__name__)

KNOWN_PARAMS = {
    "dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier", "norm_eps",
    "rope_theta", "use_scaled_rope", "rope_scaling_factor", "rope_high_freq_factor", "rope_low_freq_factor",
    "rope_original_max_position_embeddings", "max_seq_len", "max_batch_size",
}
# The JSON types of params.json's values (see keymaps.check_json_types); ranges are ModelArgs' to check.
PARAM_TYPES: dict[str, tuple[type, ...]] = {
    "dim": (int,), "n_layers": (int,), "n_heads": (int,), "n_kv_heads": (int, type(None)),
    "vocab_size": (int, type(None)), "multiple_of": (int,), "ffn_dim_multiplier": (int, float, type(None)),
    "norm_eps": (int, float), "rope_theta": (int, float), "use_scaled_rope": (bool,),
    "rope_scaling_factor": (int, float, type(None)), "rope_high_freq_factor": (int, float, type(None)),
    "rope_low_freq_factor": (int, float, type(None)), "rope_original_max_position_embeddings": (int, type(None)),
    "max_seq_len": (int, type(None)), "max_batch_size": (int, type(None)),
}
LLAMA3_VOCAB = 128000
ZIP_MAGIC = b"PK\x03\x04"


def is_torch_file(path: Path) -> bool:
    """Whether a file looks like a torch.save file: a zip archive (current) or a pickle (legacy)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head == ZIP_MAGIC or head[:1] == b"\x80"


def read_params(folder: Path) -> dict[str, Any]:
    """params.json as a dict, or a CheckpointError saying what is wrong with it."""
    path = folder / "params.json"
    params = keymaps.read_json_object(
        path, f"{folder} has no params.json; a Meta checkpoint needs one next to its .pth files")
    keymaps.check_json_types(params, PARAM_TYPES, str(path))
    unknown = sorted(set(params) - KNOWN_PARAMS)
    if unknown:
        log.warning("%s: ignoring unknown keys %s", path, unknown)
    missing = [k for k in ("dim", "n_layers", "n_heads") if k not in params]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}; Meta params need dim, n_layers and n_heads")
    return params


def default_max_seq_len(params: dict[str, Any], vocab_size: int) -> int:
    """Context length of a Meta model whose params.json does not say (see the module docstring)."""
    if params.get("max_seq_len"):
        return params["max_seq_len"]
    if params.get("use_scaled_rope"):
        return 131072
    if vocab_size >= LLAMA3_VOCAB:
        return 8192
    if params.get("norm_eps") == 1e-6 and "n_kv_heads" not in params and "rope_theta" not in params:
        return 2048
    return 4096


def args_from_params(params: dict[str, Any], vocab_size: int, source: str) -> ModelArgs:
    """ModelArgs from params.json; `vocab_size` (from the embedding rows) is used when params says -1."""
    vocab = params.get("vocab_size", -1)
    if vocab is None or vocab <= 0:
        vocab = vocab_size
    rope_scaling = None
    try:
        if params.get("use_scaled_rope"):
            rope_scaling = RopeScaling(
                factor=params.get("rope_scaling_factor") or 8.0,
                low_freq_factor=params.get("rope_low_freq_factor") or 1.0,
                high_freq_factor=params.get("rope_high_freq_factor") or 4.0,
                original_max_position_embeddings=params.get("rope_original_max_position_embeddings") or 8192,
            )
        return ModelArgs(
            dim=params["dim"], n_layers=params["n_layers"], n_heads=params["n_heads"], vocab_size=vocab,
            n_kv_heads=params.get("n_kv_heads"), multiple_of=params.get("multiple_of", 256),
            ffn_dim_multiplier=params.get("ffn_dim_multiplier"), norm_eps=params.get("norm_eps", 1e-5),
            rope_theta=params.get("rope_theta", 10000.0), rope_scaling=rope_scaling,
            max_seq_len=default_max_seq_len(params, vocab), tie_embeddings=False,
            qkv_bias=bool(params.get("qkv_bias", False)), qk_norm=bool(params.get("qk_norm", False)),
        )
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{source}/params.json describes an invalid model: {e}") from e


def meta_ffn_params(args: ModelArgs) -> tuple[int, Optional[float]]:
    """(multiple_of, ffn_dim_multiplier) for which Meta's formula gives `args.hidden_dim`.

    The args' own values when they work, else Meta's released combinations, else an exact fallback
    (multiple_of = hidden_dim, with a multiplier below 1 when the formula's base is larger).
    """
    tries = [(args.multiple_of, args.ffn_dim_multiplier), (256, None), (1024, 1.3), (4096, 1.3), (256, 1.3),
             (256, 1.5), (1024, 1.5), (1024, None), (4096, None)]
    for multiple_of, mult in tries:
        if meta_hidden_dim(args.dim, multiple_of, mult) == args.hidden_dim:
            return multiple_of, mult
    base = int(2 * (4 * args.dim) / 3)
    mult = None if base <= args.hidden_dim else args.hidden_dim / base
    if meta_hidden_dim(args.dim, args.hidden_dim, mult) == args.hidden_dim:
        return args.hidden_dim, mult
    raise CheckpointError(  # pragma: no cover - the fallback always works for hidden_dim >= 2
        f"cannot express hidden_dim={args.hidden_dim} with Meta's multiple_of/ffn_dim_multiplier for dim={args.dim}"
    )


def params_from_args(args: ModelArgs) -> dict[str, Any]:
    """params.json for these args, with Meta's keys only (extra keys only where needed, see module doc)."""
    if args.head_dim != args.dim // args.n_heads:
        raise CheckpointError(
            f"the Meta format cannot express head_dim={args.head_dim} != dim/n_heads={args.dim // args.n_heads}; "
            "save this model as Hugging Face or GGUF"
        )
    multiple_of, mult = meta_ffn_params(args)
    params: dict[str, Any] = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads}
    if args.n_kv_heads != args.n_heads:
        params["n_kv_heads"] = args.n_kv_heads
    params["vocab_size"] = args.vocab_size
    params["multiple_of"] = multiple_of
    if mult is not None:
        params["ffn_dim_multiplier"] = mult
    params["norm_eps"] = args.norm_eps
    # Llama 2's reference has no rope_theta (10000 fixed); Llama 3's defaults to 500000 when absent.
    if args.rope_theta != 10000.0 or args.vocab_size >= LLAMA3_VOCAB:
        params["rope_theta"] = args.rope_theta
    rs = args.rope_scaling
    if rs is not None:
        params["use_scaled_rope"] = True
        if rs.factor != 8.0:
            params["rope_scaling_factor"] = rs.factor
        if rs.high_freq_factor != 4.0:
            params["rope_high_freq_factor"] = rs.high_freq_factor
        if rs.low_freq_factor != 1.0:
            params["rope_low_freq_factor"] = rs.low_freq_factor
        if rs.original_max_position_embeddings != 8192:
            params["rope_original_max_position_embeddings"] = rs.original_max_position_embeddings
    # Not Meta's, but needed for Qwen-shaped models (read back by args_from_params).
    if args.qkv_bias:
        params["qkv_bias"] = True
    if args.qk_norm:
        params["qk_norm"] = True
    # Never max_seq_len: Meta's build passes it as a keyword beside **params, so a params.json holding it
    # makes Meta's own code fail ("got multiple values for keyword argument 'max_seq_len'").
    return params


def find_shards(folder: Path) -> list[Path]:
    """The model-parallel shard files of a Meta folder, in rank order (Meta's `sorted(glob("*.pth"))`)."""
    return sorted(p for p in folder.glob("*.pth") if p.is_file())


def _load_shard(path: Path) -> dict[str, torch.Tensor]:
    try:
        with open(path, "rb") as f:
            zipped = f.read(4) == ZIP_MAGIC
        sd = torch.load(path, map_location="cpu", mmap=zipped, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
        raise CheckpointError(
            f"{path}: cannot read this PyTorch checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "the file is truncated or corrupt, download it again"
        ) from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} does not hold a flat dict of tensors (got {type(sd).__name__})")
    return sd


def _embedding_dim(shapes: list[tuple[int, ...]], dim: int, files: list[Path]) -> int:
    """Which dim Meta's embedding was split on: 1 (Llama 1/2 ParallelEmbedding) or 0 (Llama 3)."""
    n = len(shapes)
    if n == 1:
        return 0
    cols = shapes[0][1]
    if cols * n == dim:
        return 1
    if cols == dim:
        return 0
    raise CheckpointError(
        f"tok_embeddings.weight shards have shape {list(shapes[0])} in each of {n} files ({files[0].name}...), "
        f"but params.json says dim={dim}: expected {dim // n} columns per shard (split embedding) or {dim}"
    )


def merge_shards(
    shards: list[dict[str, torch.Tensor]], dim: int, files: list[Path], source: str
) -> dict[str, torch.Tensor]:
    """Merge Meta model-parallel shards into one state dict (the inverse of `split_meta_shards`)."""
    if len(shards) == 1:
        return dict(shards[0])
    keys = list(shards[0])
    for path, sd in zip(files[1:], shards[1:]):
        if set(sd) != set(keys):
            diff = sorted(set(sd) ^ set(keys))
            raise CheckpointError(f"{path.name} and {files[0].name} hold different tensors: {diff[:8]}")
    merged: dict[str, torch.Tensor] = {}
    for key in keys:
        parts = [sd[key] for sd in shards]
        shapes = [tuple(p.shape) for p in parts]
        if len(set(shapes)) != 1:
            raise CheckpointError(
                f"{source}: {key} has different shapes in the {len(parts)} shards: "
                + ", ".join(f"{f.name}: {list(s)}" for f, s in zip(files, shapes))
            )
        tmpl = keymaps.template(key)
        if tmpl in keymaps.IGNORED["meta"]:
            continue
        if tmpl not in keymaps.META_SHARD_DIM:
            merged[key] = parts[0]  # unknown: reported by name by the key check that follows
            continue
        cat_dim = keymaps.META_SHARD_DIM[tmpl]
        if key == "tok_embeddings.weight":
            cat_dim = _embedding_dim(shapes, dim, files)
        if cat_dim is None:
            for f, p in zip(files[1:], parts[1:]):
                if not torch.equal(p, parts[0]):
                    raise CheckpointError(
                        f"{source}: {key} should be identical in every model-parallel shard but "
                        f"{f.name} differs from {files[0].name}; the shards do not belong together"
                    )
            merged[key] = parts[0]
        else:
            merged[key] = torch.cat(parts, dim=cat_dim)
    return merged


def split_meta_shards(
    state_dict: dict[str, torch.Tensor], args: ModelArgs, n: int, *, vocab_parallel_embedding: bool = False
) -> list[dict[str, torch.Tensor]]:
    """Split a Meta-named state dict into `n` model-parallel shards as Meta's fairscale layers do.

    Args:
        state_dict: full (merged) Meta-named tensors.
        args: the model's shape (for divisibility checks).
        n: number of model-parallel ranks.
        vocab_parallel_embedding: split tok_embeddings on the vocabulary (Llama 3) instead of dim (Llama 1/2).

    Returns:
        One state dict per rank, with the tensors sliced (contiguous copies).
    """
    if not isinstance(n, int) or n < 1:
        raise CheckpointError(f"number of model-parallel shards must be a positive integer, got {n!r}")
    for what, value in (("n_heads", args.n_heads), ("n_kv_heads", args.n_kv_heads), ("hidden_dim", args.hidden_dim),
                        ("vocab_size" if vocab_parallel_embedding else "dim",
                         args.vocab_size if vocab_parallel_embedding else args.dim)):
        if value % n:
            raise CheckpointError(f"cannot split into {n} model-parallel shards: {what}={value} is not divisible by {n}")
    if n == 1:
        return [dict(state_dict)]
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for key, tensor in state_dict.items():
        tmpl = keymaps.template(key)
        if tmpl not in keymaps.META_SHARD_DIM:
            raise CheckpointError(f"cannot shard unknown tensor {key!r}; known: {sorted(keymaps.META_SHARD_DIM)}")
        cat_dim = keymaps.META_SHARD_DIM[tmpl]
        if key == "tok_embeddings.weight" and vocab_parallel_embedding:
            cat_dim = 0
        for rank in range(n):
            # clone: torch.save of a view would write the whole underlying tensor into every shard
            shards[rank][key] = tensor.clone() if cat_dim is None else tensor.chunk(n, dim=cat_dim)[rank].clone()
    return shards


def load_meta(
    folder: Path, files: list[Path], *, progress: bool = False
) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """Load a Meta checkpoint: params.json in `folder`, shard `files` in rank order; shards are merged.

    Raises:
        CheckpointError: unreadable params or shards, inconsistent shards, or weights that do not match params.
    """
    params = read_params(folder)
    source = str(folder)
    shards = [_load_shard(f) for f in iterate_bytes(files, lambda f: f.stat().st_size, f"loading {folder.name}",
                                                     enabled=progress)]
    emb = [tuple(sd["tok_embeddings.weight"].shape) for sd in shards if "tok_embeddings.weight" in sd]
    vocab = 0
    if len(emb) == len(shards) and emb and len(emb[0]) == 2 and isinstance(params.get("dim"), int):
        split = _embedding_dim(emb, params["dim"], files)
        vocab = emb[0][0] * (len(shards) if split == 0 else 1)
    elif params.get("vocab_size", -1) in (None, -1) or params.get("vocab_size", -1) <= 0:
        raise CheckpointError(
            f"{source}: params.json has vocab_size={params.get('vocab_size')} and the weights have no "
            "tok_embeddings.weight to take it from"
        )
    args = args_from_params(params, vocab, source)
    merged = merge_shards(shards, args.dim, files, source)
    merged = {k: v for k, v in merged.items() if keymaps.template(k) not in keymaps.IGNORED["meta"]}
    if "output.weight" not in merged:
        # llamaforge writes tied models without output.weight; Meta's own checkpoints always have it.
        args.tie_embeddings = True
    keymaps.check_state_dict(merged, args, source=source, config="params.json", shards=len(files))
    return args, merged
