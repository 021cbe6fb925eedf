"""spaCy and spacy-llm registrations: the `llamaforge.Llama.v1` model and the `llamaforge_vectors` component.

Importing this module registers both; spaCy also imports it through entry points when llamaforge is
installed (`spacy_factories` for the component, spacy-llm's `thinc_llm_models` for the model), so a
config file can name them without any import:

    [components.llm.model]
    @llm_models = "llamaforge.Llama.v1"
    model = null            # a checkpoint path; null is the default model
    config = {"temperature": 0, "max_gen_len": 256}

    nlp.add_pipe("llamaforge_vectors", config={"pooling": "mean"})

spaCy loads every `spacy_factories` entry point whenever it creates a pipeline, so this module stays
light: torch and the model are imported and loaded only when a component is used. The model
registration needs spacy-llm; without it only the vectors component is registered.
"""

# No `from __future__ import annotations`: spaCy/confection validate config values against these
# signatures' annotations, which must be real types.
from typing import Any, Callable, Dict, Iterable, Optional

from spacy.language import Language
from spacy.util import SimpleFrozenDict

LLM_MODEL_NAME = "llamaforge.Llama.v1"
VECTORS_FACTORY = "llamaforge_vectors"

__all__ = ["llamaforge_llama_v1", "make_llamaforge_vectors", "register", "LLM_MODEL_NAME", "VECTORS_FACTORY"]


def llamaforge_llama_v1(
    model: Optional[str] = None,
    device: str = "auto",
    dtype: Optional[str] = None,
    max_seq_len: Optional[int] = None,
    max_batch_size: int = 4,
    config: Dict[str, Any] = SimpleFrozenDict(),
    chat: bool = True,
    system_prompt: Optional[str] = None,
) -> Callable[[Iterable[Iterable[str]]], Iterable[Iterable[str]]]:
    """spacy-llm model `llamaforge.Llama.v1`: a local llamaforge checkpoint answering the task's prompts.

    Args:
        model: checkpoint path (Meta folder, Hugging Face folder or .gguf file); None (null) for the
            default model, SmolLM2-135M-Instruct.
        device: "auto", "cpu", "cuda", "cuda:N" or "mps".
        dtype: "float32", "bfloat16", "float16" or None for the device's default.
        max_seq_len: longest prompt + answer in tokens; None for the model's context length.
        max_batch_size: prompts generated together (the prompts of all docs of an `nlp.pipe`
            batch are batched).
        config: generation settings: temperature (default 0, greedy), top_p (0.9), top_k (null),
            max_gen_len (256), seed (null).
        chat: wrap each prompt as a user message in the model's chat format (instruction-tuned
            models); false sends the prompt as raw text to complete.
        system_prompt: with chat, a system message put before each prompt.

    Returns:
        A callable taking the prompts of each doc and returning the answers of each doc.
    """
    from llamaforge.integrations.llm_model import LlamaforgeLLM

    return LlamaforgeLLM(
        model, device=device, dtype=dtype, max_seq_len=max_seq_len, max_batch_size=max_batch_size,
        config=dict(config), chat=chat, system_prompt=system_prompt,
    )


@Language.factory(
    VECTORS_FACTORY,
    default_config={
        "model": None,
        "device": "auto",
        "dtype": None,
        "pooling": "mean",
        "layer": None,
        "window": 512,
        "batch_size": 8,
    },
)
def make_llamaforge_vectors(
    nlp: Language,
    name: str,
    model: Optional[str],
    device: str,
    dtype: Optional[str],
    pooling: str,
    layer: Optional[int],
    window: int,
    batch_size: int,
):
    """spaCy factory `llamaforge_vectors`: `doc.tensor` and doc/span/token vectors from a Llama's hidden states.

    See `llamaforge.integrations.vectors.LlamaforgeVectors` for the settings.
    """
    from llamaforge.integrations.vectors import LlamaforgeVectors

    return LlamaforgeVectors(
        name, model=model, device=device, dtype=dtype, pooling=pooling, layer=layer, window=window,
        batch_size=batch_size,
    )


def register() -> bool:
    """Register `llamaforge.Llama.v1` in spacy-llm's `llm_models` registry; False if spacy-llm is missing.

    Runs on import; entry points make spacy-llm find the model without it as well.
    """
    try:
        from spacy_llm.registry import registry as llm_registry
    except ImportError:
        return False
    llm_registry.llm_models.register(LLM_MODEL_NAME, func=llamaforge_llama_v1)
    return True


register()
