"""The `llamaforge_vectors` spaCy component: word and document vectors from a Llama's hidden states.

For each doc the text is encoded once as the model reads it (with BOS where the model expects one),
run through the model, and each spaCy token gets the pooled hidden states of the model tokens that
overlap it (`alignment.py` says how tokens are matched by character offsets). The result is
`doc.tensor` (n_tokens, dim), and hooks as spacy-transformers installs them: `doc.vector`,
`span.vector` (means of their rows of `doc.tensor`), `token.vector` (its row) and `similarity`
(cosine) on all three.

Hidden states: `layer=None` takes the model's final normalised hidden states (what its output layer
reads), an integer takes the residual stream after that many blocks (0 = token embeddings, negative
counts from the end). On SmolLM2-135M the final states give the clearest paraphrase-vs-unrelated
margins of all layers; middle layers are dominated by the first token's outsized activations.

Texts longer than `window` model tokens are cut into consecutive windows that are run separately
(each with its own BOS), so a token's context starts at its window. The hooks are module functions,
so docs stay picklable.
"""

from __future__ import annotations

from typing import Iterable, Iterator, List, Optional, Sequence

import numpy as np
import torch

from llamaforge.errors import ConfigError
from llamaforge.integrations.alignment import encode_aligned, overlaps
from llamaforge.integrations.models import LazyLlama

POOLINGS = ("mean", "first", "last", "max")


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def layer_states(model, tokens: torch.Tensor, layer: Optional[int]) -> torch.Tensor:
    """Hidden states (B, T, dim) of token ids (B, T): final normalised (layer None) or after `layer` blocks.

    Rows are causal, so right padding does not change the states of the real tokens before it.
    """
    if layer is None:
        return model.hidden_states(tokens)
    depth = layer if layer >= 0 else len(model.layers) + 1 + layer
    return model.hidden_states(tokens, layer=depth)


class LlamaforgeVectors(LazyLlama):
    """spaCy component: sets `doc.tensor` and vector/similarity hooks from a Llama's hidden states."""

    def __init__(
        self,
        name: str = "llamaforge_vectors",
        *,
        model: Optional[str] = None,
        device: str = "auto",
        dtype: Optional[str] = None,
        pooling: str = "mean",
        layer: Optional[int] = None,
        window: int = 512,
        batch_size: int = 8,
        llama=None,
    ) -> None:
        """Describe the component; the model is loaded on first use and shared within the process.

        Args:
            name: the component's name in the pipeline.
            model: checkpoint path, or None for the default model.
            device: "auto", "cpu", "cuda", "cuda:N" or "mps".
            dtype: "float32", "bfloat16", "float16" or None for the device's default.
            pooling: how the states of the model tokens overlapping a spaCy token are combined:
                "mean", "first", "last" or "max" (elementwise).
            layer: None for the final normalised hidden states, or the number of blocks to run
                (0 = token embeddings; negative counts from the end, -1 = all blocks, not normalised).
            window: most model tokens (BOS included) per forward pass, at most the model's context
                length; longer texts are split.
            batch_size: windows run together in one forward pass.
            llama: an already built `llamaforge.Llama` to use instead of loading `model`.
        """
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {list(POOLINGS)}, got {pooling!r}")
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)):
            raise ConfigError(f"layer must be an integer or null (final normalised states), got {layer!r}")
        self.name = name
        self.model_path = model
        self.device = device
        self.dtype = dtype
        self.pooling = pooling
        self.layer = layer
        self.window = _check_int("window", window, 2)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self._hold(llama)
        if llama is not None:
            self._check_layer()

    @property
    def llama(self):
        """The `llamaforge.Llama` whose hidden states are used (loaded on first access)."""
        if self._load_once():
            self._check_layer()
        return self._llama

    def _check_layer(self) -> None:
        n = len(self._llama.model.layers)
        if self.layer is not None and not -(n + 1) <= self.layer <= n:
            raise ConfigError(f"layer={self.layer} but the model has {n} blocks; use -{n + 1} .. {n} or null")

    # -- spaCy component protocol ----------------------------------------------------------------

    def __call__(self, doc):
        """Set `doc.tensor` and the vector hooks of one doc."""
        return next(iter(self.pipe([doc])))

    def pipe(self, stream: Iterable, *, batch_size: Optional[int] = None) -> Iterator:
        """Process docs in batches of `batch_size` docs (default: this component's batch_size)."""
        size = batch_size or self.batch_size
        batch: List = []
        for doc in stream:
            batch.append(doc)
            if len(batch) >= size:
                yield from self._process(batch)
                batch = []
        if batch:
            yield from self._process(batch)

    def initialize(self, get_examples=None, *, nlp=None) -> None:
        """Load the model now rather than on the first doc (called by `nlp.initialize()`)."""
        self.llama  # noqa: B018 (loads)

    # -- work ------------------------------------------------------------------------------------

    def _process(self, docs: Sequence) -> List:
        llama = self.llama
        tok = llama.tokenizer
        bos = [tok.bos_id] if tok.add_bos and tok.bos_id is not None else []
        room = min(self.window, llama.max_seq_len) - len(bos)  # the model has no positions past what it was built for
        if room < 1:
            raise ConfigError(f"window={self.window} leaves no room for text after the BOS token")
        aligned, windows = [], []  # windows: (doc index, first id index, ids)
        for d, doc in enumerate(docs):
            ids, spans = encode_aligned(tok, doc.text, [(t.text, t.whitespace_) for t in doc])
            aligned.append((ids, spans))
            for start in range(0, len(ids), room):
                windows.append((d, start, ids[start : start + room]))
        states = [np.zeros((len(ids), llama.args.dim), dtype=np.float32) for ids, _ in aligned]
        order = sorted(range(len(windows)), key=lambda w: -len(windows[w][2]))
        for b in range(0, len(order), self.batch_size):
            chunk = [windows[w] for w in order[b : b + self.batch_size]]
            longest = len(bos) + max(len(ids) for _, _, ids in chunk)
            pad = tok.eos_id if tok.eos_id is not None else 0
            rows = [bos + ids + [pad] * (longest - len(bos) - len(ids)) for _, _, ids in chunk]
            tokens = torch.tensor(rows, dtype=torch.long, device=llama.device)  # (B, T)
            with torch.inference_mode():
                h = layer_states(llama.model, tokens, self.layer).float().cpu().numpy()  # (B, T, dim)
            for row, (d, start, ids) in enumerate(chunk):
                states[d][start : start + len(ids)] = h[row, len(bos) : len(bos) + len(ids)]
        for doc, (ids, spans), doc_states in zip(docs, aligned, states):
            words = [(t.idx, t.idx + len(t.text)) for t in doc]
            tensor = np.zeros((len(doc), llama.args.dim), dtype=np.float32)
            for i, hits in enumerate(overlaps(words, spans)):
                if hits:
                    tensor[i] = self._pool(doc_states[hits])
            doc.tensor = tensor
            set_hooks(doc)
        return list(docs)

    def _pool(self, rows: np.ndarray) -> np.ndarray:
        if self.pooling == "mean":
            return rows.mean(axis=0)
        if self.pooling == "first":
            return rows[0]
        if self.pooling == "last":
            return rows[-1]
        return rows.max(axis=0)


# -- hooks (module functions, so docs with them pickle) ------------------------------------------


def _rows_mean(tensor: np.ndarray) -> np.ndarray:
    if tensor.shape[0] == 0:
        return np.zeros((tensor.shape[1],), dtype=np.float32)
    return tensor.mean(axis=0)


def doc_vector(doc) -> np.ndarray:
    """Mean of the doc's rows of `doc.tensor`."""
    return _rows_mean(doc.tensor)


def span_vector(span) -> np.ndarray:
    """Mean of the span's rows of `doc.tensor`."""
    return _rows_mean(span.doc.tensor[span.start : span.end])


def token_vector(token) -> np.ndarray:
    """The token's row of `doc.tensor`."""
    return token.doc.tensor[token.i]


def has_vector(obj) -> bool:
    """Every doc, span and token processed by the component has a vector."""
    return True


def cosine(a, b) -> float:
    """Cosine similarity of the vectors of two docs, spans or tokens (0.0 when one is all zeros)."""
    va, vb = np.asarray(a.vector, dtype=np.float64), np.asarray(b.vector, dtype=np.float64)
    norm = float(np.linalg.norm(va) * np.linalg.norm(vb))
    return float(va @ vb / norm) if norm > 0 else 0.0


def doc_vector_norm(doc) -> float:
    return float(np.linalg.norm(doc_vector(doc)))


def span_vector_norm(span) -> float:
    return float(np.linalg.norm(span_vector(span)))


def token_vector_norm(token) -> float:
    return float(np.linalg.norm(token_vector(token)))


def set_hooks(doc) -> None:
    """Install vector, vector_norm, has_vector and similarity hooks on a doc, its spans and tokens."""
    doc.user_hooks.update(
        {"vector": doc_vector, "vector_norm": doc_vector_norm, "has_vector": has_vector, "similarity": cosine}
    )
    doc.user_span_hooks.update(
        {"vector": span_vector, "vector_norm": span_vector_norm, "has_vector": has_vector, "similarity": cosine}
    )
    doc.user_token_hooks.update(
        {"vector": token_vector, "vector_norm": token_vector_norm, "has_vector": has_vector, "similarity": cosine}
    )
