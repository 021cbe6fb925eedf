"""What the served model is, for Ollama's /api/tags, /api/show and /api/ps: format, family, size, quantization."""

from __future__ import annotations

import collections
from datetime import datetime, timezone
from pathlib import Path

import llamaforge


def _files_size(source) -> tuple[int, float]:
    """Total bytes and newest modification time of a checkpoint file or folder (0, now when unknown)."""
    if not source:
        return 0, datetime.now(timezone.utc).timestamp()
    path = Path(str(source))
    files = [path] if path.is_file() else [p for p in path.glob("*") if p.is_file()] if path.is_dir() else []
    if not files:
        return 0, datetime.now(timezone.utc).timestamp()
    return sum(p.stat().st_size for p in files), max(p.stat().st_mtime for p in files)


def _parameter_size(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def _weight_type(llama) -> str:
    """The most common storage type of the model's matrices: a GGUF quant name (Q4_K, ...) or F32 / F16 / BF16."""
    counts: collections.Counter = collections.Counter()
    for module in llama.model.modules():
        qtype = getattr(module, "qtype", None)
        weight = getattr(module, "weight", None)
        if isinstance(qtype, str):
            counts[qtype] += 1
        elif weight is not None and getattr(weight, "dim", lambda: 0)() == 2:
            counts[{"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16"}.get(
                str(weight.dtype), str(weight.dtype))] += 1
    return counts.most_common(1)[0][0] if counts else "unknown"


def describe_model(llama, name: str) -> dict:
    """The fields of server.ollama.Backend that describe `llama` (a loaded llamaforge.Llama) served as `name`."""
    args = llama.args
    family = getattr(args, "arch", "llama") or "llama"
    size, mtime = _files_size(getattr(llama, "source", None))
    quant = _weight_type(llama)
    details = {"parent_model": "", "format": str(getattr(llama, "checkpoint_format", "") or ""), "family": family,
               "families": [family], "parameter_size": _parameter_size(args.n_params), "quantization_level": quant}
    info = {"general.architecture": family, "general.parameter_count": args.n_params,
            f"{family}.context_length": llama.max_seq_len, f"{family}.embedding_length": args.dim,
            f"{family}.block_count": args.n_layers, f"{family}.attention.head_count": args.n_heads,
            f"{family}.attention.head_count_kv": args.n_kv_heads, f"{family}.feed_forward_length": args.hidden_dim,
            f"{family}.vocab_size": args.vocab_size}
    template = llama.tokenizer.chat_template or ""
    capabilities = ["completion"] + (["tools"] if "tools" in template else [])
    return {"details": details, "size": size, "template": template, "model_info": info,
            "modified_at": datetime.fromtimestamp(mtime, timezone.utc).isoformat().replace("+00:00", "Z"),
            "context_length": llama.max_seq_len, "capabilities": capabilities,
            "version": llamaforge.__version__}
