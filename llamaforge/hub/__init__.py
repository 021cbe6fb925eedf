"""Model references -> local files, through huggingface_hub's cache.

    from llamaforge import hub
    hub.resolve_model("bartowski/SmolLM2-135M-Instruct-GGUF:Q8_0")   # -> Path of the GGUF file
    hub.resolve_model("models/7B")                                   # an existing path, unchanged
    hub.pull("llama3.2"), hub.list_models(), hub.plan_removal("org/name:Q8_0").execute()

`resolve_model` is what every place that takes a checkpoint calls (Llama.build, the CLI, training
configs, spaCy configs). A reference already complete in the cache is used with no network call at
all; otherwise it is downloaded. `pull` always asks the Hub, so it also brings a branch up to date.
Parsing: refs.py; file choice: select.py; cache: store.py; downloads: download.py.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Union

from llamaforge.errors import CheckpointNotFoundError
from llamaforge.hub.refs import ALIASES, ModelRef, describe_grammar, parse_ref
from llamaforge.hub.store import CachedModel, Removal, cache_dir, find_cached, list_models

__all__ = [
    "ALIASES", "CachedModel", "ModelRef", "Removal", "cache_dir", "find_cached", "list_models", "parse_ref",
    "plan_removal", "pull", "resolve_model", "to_ref",
]

log = logging.getLogger("llamaforge.hub")


def to_ref(model: Union[str, ModelRef]) -> ModelRef:
    """Parse a reference, or a CheckpointNotFoundError saying what a reference looks like."""
    if isinstance(model, ModelRef):
        return model
    ref = parse_ref(model)
    if ref is None:
        raise CheckpointNotFoundError(f"{model!r} is not a model reference; {describe_grammar()}")
    return ref


def resolve_model(model: Union[str, Path, ModelRef, None], *, progress: bool = True) -> Path:
    """The local path for a checkpoint argument: a path, a model reference, or None (the default model).

    Args:
        model: an existing file or folder (returned as a Path), a `Path` (always taken as a path),
            "org/name[:QUANT][@REVISION]" or an alias (fetched into the Hugging Face cache if missing),
            or None for the default model.
        progress: show a download progress bar (in bytes) when something is fetched.

    Raises:
        CheckpointNotFoundError: neither an existing path nor a reference; no such repository,
            revision or quant (the message lists the quants there are); offline and not cached.
        HubError: a gated or private repository without access, or the Hub cannot be reached.
    """
    if model is None:
        from llamaforge.default_model import default_model_path

        return default_model_path()
    if isinstance(model, Path):
        return model
    if isinstance(model, str):
        path = Path(model).expanduser()
        if path.exists():
            return path
    ref = parse_ref(model) if isinstance(model, str) else model
    if not isinstance(ref, ModelRef):
        raise CheckpointNotFoundError(
            f"checkpoint {model!r} is neither an existing path nor a model reference; {describe_grammar()}"
        )
    cached = find_cached(ref)
    if cached is not None:
        log.info("%s: using the cached %s", ref, cached)
        return cached
    from llamaforge.hub.download import pull as _pull

    return _pull(ref, progress=progress).path


def pull(model: Union[str, ModelRef], *, progress: bool = True):
    """Fetch a reference into the cache, asking the Hub for its current revision; returns a `Pulled`."""
    from llamaforge.hub.download import pull as _pull

    return _pull(to_ref(model), progress=progress)


def plan_removal(model: Union[str, ModelRef], cache: Optional[Path] = None) -> Removal:
    """What deleting a reference from the cache removes (see store.plan_removal); `.execute()` does it."""
    from llamaforge.hub.store import plan_removal as _plan

    return _plan(to_ref(model), cache)
