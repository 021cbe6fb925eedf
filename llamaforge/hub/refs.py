"""Model references: what a user may type where a checkpoint path goes, parsed without any network call.

    org/name              a Hugging Face repository (its default branch)
    org/name:Q8_0         a GGUF repository's file of that quant (case-insensitive; also tags as Unsloth's
                          UD-Q4_K_XL; `:latest`, Ollama's default tag, is the default choice)
    org/name@v1.0         a branch, tag or commit of the repository (combines with :QUANT)
    smollm2, llama3.2     short aliases for a few well-known repositories (ALIASES); with a size as
                          Ollama's tags (llama3.2:3b, smollm2:360m, SIZES) the repository of that size
    hf.co/org/name:Q4_K_M the same, as Ollama and LM Studio write it

A string is only a reference when it is not an existing path and has this shape, so a mistyped path
is reported as such instead of becoming a request to the Hub.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

# Short names -> real repositories (GGUF files of the instruct models, quantized by bartowski / Qwen).
ALIASES: dict[str, str] = {
    "smollm2": "bartowski/SmolLM2-135M-Instruct-GGUF",
    "smollm2-360m": "bartowski/SmolLM2-360M-Instruct-GGUF",
    "llama3.2": "bartowski/Llama-3.2-1B-Instruct-GGUF",
    "llama3.2-3b": "bartowski/Llama-3.2-3B-Instruct-GGUF",
    "qwen2.5": "Qwen/Qwen2.5-0.5B-Instruct-GGUF",
}

# Ollama-style size tags of the aliases (`llama3.2:3b`): alias -> size -> repository
SIZES: dict[str, dict[str, str]] = {
    "smollm2": {"135M": ALIASES["smollm2"], "360M": ALIASES["smollm2-360m"]},
    "llama3.2": {"1B": ALIASES["llama3.2"], "3B": ALIASES["llama3.2-3b"]},
    "qwen2.5": {"0.5B": ALIASES["qwen2.5"]},
}
DEFAULT_TAG = "LATEST"  # Ollama's tag for a model's default: the default quant here

# The Hub's repository id rules (huggingface_hub.utils.validate_repo_id): letters, digits, '-', '_', '.';
# no '--' or '..'; not starting or ending with '-' or '.'; at most 96 characters.
_PART = r"[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9_])?"
_REF = re.compile(
    rf"^(?P<name>{_PART}(?:/{_PART})?)"
    r"(?::(?P<quant>[A-Za-z0-9_]+(?:[-.][A-Za-z0-9_]+)*))?"
    r"(?:@(?P<revision>[\w][\w./-]*))?$"
)
_HOST_PREFIXES = ("https://huggingface.co/", "huggingface.co/", "hf.co/")
# Names that are files, not repositories.
_FILE_SUFFIXES = (".gguf", ".safetensors", ".pth", ".pt", ".bin", ".json", ".model")
COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference.

    Attributes:
        repo_id: "org/name" on the Hugging Face Hub.
        quant: the GGUF quant asked for ("Q4_K_M"), upper-cased, or None for the default choice.
        revision: branch, tag or commit; None means the repository's default branch ("main").
        alias: the short name it was written as, if any.
    """

    repo_id: str
    quant: Optional[str] = None
    revision: Optional[str] = None
    alias: Optional[str] = None

    @property
    def rev(self) -> str:
        return self.revision or "main"

    def __str__(self) -> str:
        return self.repo_id + (f":{self.quant}" if self.quant else "") + (f"@{self.revision}" if self.revision else "")


def parse_ref(text: str) -> Optional[ModelRef]:
    """The ModelRef `text` spells, or None when it does not have a reference's shape (then it is a path)."""
    if not isinstance(text, str):
        return None
    for prefix in _HOST_PREFIXES:
        if text.startswith(prefix):
            text = text[len(prefix):]
            break
    m = _REF.match(text)
    if m is None:
        return None
    name, quant, revision = m.group("name"), m.group("quant"), m.group("revision")
    if len(name) > 96 or "--" in name or ".." in name or name.lower().endswith(_FILE_SUFFIXES):
        return None
    if revision is not None and (".." in revision or revision.endswith("/")):
        return None
    quant = quant.upper() if quant else None
    if quant == DEFAULT_TAG:
        quant = None
    if "/" not in name:
        repo = ALIASES.get(name.lower())
        if repo is None:
            return None
        sized = SIZES.get(name.lower(), {}).get(quant or "")
        if sized is not None:
            return ModelRef(sized, None, revision, alias=f"{name.lower()}:{quant.lower()}")
        return ModelRef(repo, quant, revision, alias=name.lower())
    return ModelRef(name, quant, revision)


def describe_grammar() -> str:
    """One line telling the user what a reference looks like."""
    return (
        "a model reference is org/name[:QUANT][@REVISION] (a Hugging Face repository) or one of the aliases "
        + ", ".join(sorted(ALIASES))
    )
