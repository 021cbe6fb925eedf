"""One loaded model per process per (checkpoint, device, dtype), shared by the spaCy integrations.

A spaCy pipeline may name the same checkpoint in several places (a spacy-llm component, the
`llamaforge_vectors` component, several pipelines in one process): the weights are loaded once and
each user gets a light `Llama` view with its own `max_seq_len` and `max_batch_size` over the same
model and tokenizer. Nothing here imports spaCy.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Dict, Optional, Tuple

from llamaforge.errors import ConfigError

_LOCK = threading.Lock()
# (resolved checkpoint path, device, dtype, context length or None for the model's own) -> Llama
_LOADED: Dict[Tuple[str, str, str, Optional[int]], "object"] = {}


def load_llama(
    model: Optional[str] = None,
    *,
    device: str = "auto",
    dtype: Optional[str] = None,
    max_seq_len: Optional[int] = None,
    max_batch_size: int = 4,
):
    """A `Llama` for a checkpoint, loading its weights only the first time in this process.

    Args:
        model: a checkpoint path `Llama.build` accepts (Meta folder, Hugging Face folder, .gguf file),
            or None for the default model.
        device: "auto", "cpu", "cuda", "cuda:N" or "mps".
        dtype: "float32", "bfloat16", "float16" or None for the device's default.
        max_seq_len: longest prompt + generation for this view; None uses the model's context length
            (bounded by memory, as `Llama.build` chooses it).
        max_batch_size: most prompts per generation call for this view.

    Returns:
        A `llamaforge.Llama` sharing its model and tokenizer with every other view of the same
        (checkpoint, device, dtype) in this process.
    """
    from llamaforge import devices
    from llamaforge.api import Llama
    from llamaforge.hub import resolve_model

    if model is not None and not isinstance(model, (str, Path)):
        raise ConfigError(f"model must be a checkpoint path, a model reference (org/name[:QUANT]) or None for the default model, got {model!r}")
    if not isinstance(max_batch_size, int) or isinstance(max_batch_size, bool) or max_batch_size < 1:
        raise ConfigError(f"max_batch_size must be a positive integer, got {max_batch_size!r}")
    if max_seq_len is not None and (
        not isinstance(max_seq_len, int) or isinstance(max_seq_len, bool) or max_seq_len < 1
    ):
        raise ConfigError(f"max_seq_len must be a positive integer or None, got {max_seq_len!r}")
    path = resolve_model(model, progress=False).resolve()
    dev = devices.resolve_device(device)
    torch_dtype = devices.resolve_dtype(dtype, dev)

    def get(context: Optional[int]):
        key = (str(path), str(dev), str(torch_dtype), context)
        with _LOCK:
            loaded = _LOADED.get(key)
            if loaded is None:
                loaded = Llama.build(path, max_seq_len=context, device=dev, dtype=torch_dtype, progress=False)
                _LOADED[key] = loaded
        return loaded

    base = get(None)
    if max_seq_len is not None and max_seq_len > base.max_seq_len:
        # Rotary tables cover the length a model was built for: a longer one is built on its own.
        base = get(max_seq_len)
    return Llama(
        base.model, base.tokenizer, max_seq_len=max_seq_len or base.max_seq_len, max_batch_size=max_batch_size,
        device=base.device, checkpoint_format=base.checkpoint_format, source=base.source,
        decode_step=base.decode_step,
    )


def preload(llama, model: Optional[str] = None) -> None:
    """Make `load_llama` return views of an already built `Llama` for its checkpoint, device and dtype.

    For a process that built its model itself (custom settings, weights changed in memory) and wants
    spaCy pipelines that name the same checkpoint (`model`, None for the default model) on the same
    device and dtype to use it rather than load another copy.
    """
    from llamaforge.hub import resolve_model

    path = resolve_model(model, progress=False).resolve()
    key = (str(path), str(llama.device), str(llama.model.norm.weight.dtype), None)
    with _LOCK:
        _LOADED[key] = llama


def clear_cache() -> None:
    """Forget every loaded model (their memory is freed once no pipeline holds a view)."""
    with _LOCK:
        _LOADED.clear()


class LazyLlama:
    """Base of the spaCy-side objects that hold a `Llama`: one passed in (`llama=`), or one loaded with
    `load_llama(self.model_path, device=self.device, dtype=self.dtype, ...)` on first use.

    spaCy pickles pipelines for n_process > 1: a model loaded here is left out of the pickle and the copy
    loads its own on first use; a Llama passed in travels with it.
    """

    model_path: Optional[str]
    device: str
    dtype: Optional[str]

    def _hold(self, llama: "object") -> None:
        """Start with the caller's Llama, or None to load one on first use."""
        self._llama = llama
        self._loaded_here = False

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if state.get("_loaded_here"):
            state["_llama"], state["_loaded_here"] = None, False
        return state

    def _load_once(self, **view) -> bool:
        """Load the Llama if none is held yet (`view`: load_llama's max_seq_len, max_batch_size); True if it did."""
        if self._llama is not None:
            return False
        self._loaded_here = True
        self._llama = load_llama(self.model_path, device=self.device, dtype=self.dtype, **view)
        return True
