"""Which files of a repository a reference needs, chosen from a listing (the Hub's, or the cache's).

GGUF repositories hold one file per quant (`Model-Q4_K_M.gguf`), or split parts
(`Model-Q4_K_M-00001-of-00003.gguf`); the quant is the last `-`/`.`-separated tag of the name, as
llama.cpp's `-hf` reads it. With no quant asked for: Q4_K_M, else the smallest file of at least 4 bits
that is not an i-quant (else the smallest). Safetensors repositories need config.json, the tokenizer files and the weights
(the shards the index names, or model.safetensors, or the root *.safetensors files).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from llamaforge.errors import CheckpointNotFoundError

DEFAULT_QUANT = "Q4_K_M"
_SPLIT = re.compile(r"^(?P<prefix>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})$", re.IGNORECASE)
_TAG = re.compile(r"[-.](?P<tag>[A-Za-z0-9_]+)$")
# GGUF files in model repositories that are not language models.
_NOT_MODELS = ("mmproj", "imatrix", "mtp-", "eagle3-", "draft")

HF_CONFIG = "config.json"
HF_EXTRA = ("generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
            "special_tokens_map.json", "chat_template.jinja", "chat_template.json")
SAFETENSORS_INDEX = "model.safetensors.index.json"
NAMED_TEMPLATES = "additional_chat_templates/"  # transformers' named chat templates, NAME.jinja


@dataclass(frozen=True)
class RepoFile:
    path: str
    size: Optional[int] = None


@dataclass(frozen=True)
class GGUFModel:
    """One GGUF model of a repository: a single file, or all the parts of a split file (first part first)."""

    quant: Optional[str]
    parts: tuple[RepoFile, ...]
    stem: str = ""  # the name without part numbers and .gguf (with its folder): "UD-Q4_K_XL/M-UD-Q4_K_XL"

    @property
    def size(self) -> Optional[int]:
        sizes = [p.size for p in self.parts]
        return None if any(s is None for s in sizes) else sum(sizes)  # type: ignore[arg-type]

    @property
    def bits(self) -> int:
        digits = re.search(r"\d+", self.quant or "")
        return int(digits.group()) if digits else 0


def _stem(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    return name[: -len(".gguf")]


def gguf_models(files: Sequence[RepoFile]) -> list[GGUFModel]:
    """The repository's GGUF language models, split parts grouped; in listing order."""
    groups: dict[str, list[tuple[int, RepoFile]]] = {}
    counts: dict[str, int] = {}
    for f in files:
        name = f.path.rsplit("/", 1)[-1]
        if not name.lower().endswith(".gguf") or any(k in name.lower() for k in _NOT_MODELS):
            continue
        stem = _stem(f.path)
        index, count = 1, 1
        split = _SPLIT.match(stem)
        if split:
            stem, index, count = split.group("prefix"), int(split.group("index")), int(split.group("count"))
        key = f.path.rsplit("/", 1)[0] + "/" + stem if "/" in f.path else stem
        groups.setdefault(key, []).append((index, f))
        counts[key] = count
    models = []
    for key, parts in groups.items():
        parts.sort(key=lambda p: p[0])
        if [i for i, _ in parts] != list(range(1, counts[key] + 1)):
            continue  # an incomplete split (some parts missing): not a usable model
        tag = _TAG.search(key.rsplit("/", 1)[-1])
        models.append(GGUFModel(tag.group("tag").upper() if tag else None, tuple(f for _, f in parts), key))
    return models


def choose_gguf(models: Sequence[GGUFModel], quant: Optional[str], repo: str) -> GGUFModel:
    """The GGUF model for `quant` (or the default choice); a clear error naming the quants there are."""
    if quant is not None:
        # a name ending in the tag (the quant, or a longer tag: "UD-Q4_K_XL"), the shortest first, so that
        # Q4_K_XL is M-Q4_K_XL.gguf where M-UD-Q4_K_XL.gguf is there too
        tail = quant.upper()
        named = sorted((m for m in models if m.stem.upper().endswith(("-" + tail, "." + tail, "/" + tail))),
                       key=lambda m: len(m.stem))
        if named:
            return named[0]
        have = ", ".join(sorted({m.quant or "?" for m in models}))
        raise CheckpointNotFoundError(
            f"{repo} has no {quant.upper()} GGUF file; it has: {have}. "
            f"Ask for one of them, e.g. {repo}:{models[0].quant or '?'}"
        )
    for m in models:
        if m.quant == DEFAULT_QUANT:
            return m
    # i-quants and ternary quants need an importance matrix's kernels llama.cpp has and this loader may not
    sensible = [m for m in models if m.bits >= 4 and not (m.quant or "").startswith(("IQ", "TQ"))] or list(models)
    return min(sensible, key=lambda m: (m.size is None, m.size or 0))


def hf_files(files: Sequence[RepoFile], read_index: Callable[[str], Optional[dict]]) -> Optional[list[str]]:
    """The files a safetensors checkpoint needs, or None when the listing holds none.

    `read_index(name)` returns the parsed index JSON (it may need a download first), or None if absent.
    Only files at the repository's root count (subfolders hold other formats: onnx/, original/), and the
    named chat templates in `additional_chat_templates/`.
    """
    root = {f.path for f in files if "/" not in f.path}
    templates = sorted(f.path for f in files if f.path.startswith(NAMED_TEMPLATES) and f.path.endswith(".jinja")
                       and "/" not in f.path[len(NAMED_TEMPLATES):])
    if HF_CONFIG not in root:
        return None
    weights: list[str]
    if SAFETENSORS_INDEX in root:
        index = read_index(SAFETENSORS_INDEX)
        if not index or not isinstance(index.get("weight_map"), dict):
            return None
        weights = [SAFETENSORS_INDEX] + sorted(set(map(str, index["weight_map"].values())))
    elif "model.safetensors" in root:
        weights = ["model.safetensors"]
    else:
        weights = sorted(p for p in root if p.endswith(".safetensors"))
        if not weights:
            return None
    return [HF_CONFIG] + [p for p in HF_EXTRA if p in root] + templates + weights


@dataclass(frozen=True)
class Plan:
    """What to fetch for a reference: the format, the files, and the file (GGUF) to load."""

    format: str  # "gguf" or "hf"
    files: tuple[str, ...]
    quant: Optional[str] = None

    @property
    def primary(self) -> Optional[str]:
        return self.files[0] if self.format == "gguf" else None


def plan(files: Sequence[RepoFile], quant: Optional[str], repo: str,
         read_index: Callable[[str], Optional[dict]]) -> Plan:
    """Choose what a reference needs from a repository listing.

    A quant asks for GGUF. Without one, a repository with GGUF files gives its default GGUF (as
    llama.cpp's `-hf`), otherwise its safetensors checkpoint.

    Raises:
        CheckpointNotFoundError: nothing loadable there, or not the quant asked for.
    """
    models = gguf_models(files)
    if models:
        chosen = choose_gguf(models, quant, repo)
        return Plan("gguf", tuple(p.path for p in chosen.parts), chosen.quant)
    if quant is not None:
        raise CheckpointNotFoundError(
            f"{repo} holds no GGUF files, so it has no {quant} quant; leave out ':{quant}' to use its "
            "safetensors checkpoint, or use the repository of its GGUF conversion"
        )
    needed = hf_files(files, read_index)
    if needed is None:
        names = ", ".join(sorted(f.path for f in files)[:12]) or "no files"
        raise CheckpointNotFoundError(
            f"{repo} holds no checkpoint llamaforge can load (GGUF files, or config.json + safetensors); "
            f"it has: {names}"
        )
    return Plan("hf", tuple(needed))
