"""The `llamaforge_vectors` component: doc.tensor, vector/similarity hooks, batching, windows, pickling.

Mechanics run on the tiny random checkpoint; the similarity test runs the default model.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

spacy = pytest.importorskip("spacy")

import llamaforge.integrations.spacy  # noqa: E402,F401  (registers the factory)
from llamaforge.errors import ConfigError  # noqa: E402
from llamaforge.integrations import models  # noqa: E402
from llamaforge.integrations.alignment import encode_aligned, overlaps  # noqa: E402
from llamaforge.integrations.vectors import layer_states  # noqa: E402

TEXTS = [
    "the llama model is a chat assistant",
    "hello world",
    "theory of relativity states that cheese is naïve",
    "a",
    "",
    "the sea otter   and the café: 日本 語 🤖",
]

ATOL = 1e-4  # float32 states of one text computed in different batch shapes / window layouts


@pytest.fixture(scope="module")
def tiny_nlp(tiny_checkpoints):
    nlp = spacy.blank("en")
    nlp.add_pipe("llamaforge_vectors", config={"model": str(tiny_checkpoints.gguf), "device": "cpu", "batch_size": 4})
    return nlp


def reference_tensor(llama, doc, layer=None) -> np.ndarray:
    """Per spaCy token: mean of the overlapping model tokens' states, computed one text at a time."""
    tok = llama.tokenizer
    ids, spans = encode_aligned(tok, doc.text, [(t.text, t.whitespace_) for t in doc])
    bos = [tok.bos_id] if tok.add_bos else []
    with torch.inference_mode():
        h = layer_states(llama.model, torch.tensor([bos + ids]), layer)[0, len(bos):].float().numpy()
    words = [(t.idx, t.idx + len(t.text)) for t in doc]
    return np.stack([h[hits].mean(0) for hits in overlaps(words, spans)]) if len(doc) else np.zeros((0, h.shape[1]))


def test_tensor_and_hooks(tiny_nlp):
    comp = tiny_nlp.get_pipe("llamaforge_vectors")
    dim = comp.llama.args.dim
    doc = tiny_nlp("the llama model is a chat assistant")
    assert doc.tensor.shape == (len(doc), dim) and doc.tensor.dtype == np.float32
    np.testing.assert_allclose(doc.tensor, reference_tensor(comp.llama, doc), atol=ATOL, rtol=0)
    np.testing.assert_allclose(doc.vector, doc.tensor.mean(0), atol=1e-6)
    span = doc[1:3]
    np.testing.assert_allclose(span.vector, doc.tensor[1:3].mean(0), atol=1e-6)
    np.testing.assert_array_equal(doc[2].vector, doc.tensor[2])
    assert doc.has_vector and span.has_vector and doc[0].has_vector
    assert doc.vector_norm == pytest.approx(float(np.linalg.norm(doc.vector)), rel=1e-6)
    assert doc[0].vector_norm == pytest.approx(float(np.linalg.norm(doc.tensor[0])), rel=1e-6)
    assert doc.similarity(doc) == pytest.approx(1.0, abs=1e-6)
    other = tiny_nlp("hello world")
    cos = float(doc.vector @ other.vector / (np.linalg.norm(doc.vector) * np.linalg.norm(other.vector)))
    assert doc.similarity(other) == pytest.approx(cos, abs=1e-6)
    assert span.similarity(doc[0]) == pytest.approx(
        float(span.vector @ doc[0].vector / (np.linalg.norm(span.vector) * np.linalg.norm(doc[0].vector))), abs=1e-6
    )


def test_pipe_batches_equal_one_doc_at_a_time(tiny_nlp):
    single = [tiny_nlp(t).tensor for t in TEXTS]
    piped = [d.tensor for d in tiny_nlp.pipe(TEXTS, batch_size=3)]
    for a, b in zip(single, piped):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_empty_doc_has_zero_vector(tiny_nlp):
    doc = tiny_nlp("")
    assert doc.tensor.shape[0] == 0
    assert not doc.vector.any()
    assert doc.similarity(tiny_nlp("hello")) == 0.0


def windowed_reference(llama, doc, window: int) -> np.ndarray:
    """doc.tensor computed by hand: consecutive windows of ids, each run alone with its own BOS."""
    tok = llama.tokenizer
    ids, spans = encode_aligned(tok, doc.text, [(t.text, t.whitespace_) for t in doc])
    bos = [tok.bos_id] if tok.add_bos else []
    room = window - len(bos)
    states = []
    with torch.inference_mode():
        for start in range(0, len(ids), room):
            chunk = torch.tensor([bos + ids[start : start + room]])
            states.append(layer_states(llama.model, chunk, None)[0, len(bos):].float().numpy())
    h = np.concatenate(states)
    words = [(t.idx, t.idx + len(t.text)) for t in doc]
    return np.stack([h[hits].mean(0) for hits in overlaps(words, spans)])


@pytest.mark.parametrize("window, effective", [(16, 16), (10_000, 128)])  # 128: the tiny model's context
def test_long_texts_are_split_into_windows(tiny_checkpoints, window, effective):
    nlp = spacy.blank("en")
    cfg = {"model": str(tiny_checkpoints.gguf), "device": "cpu", "window": window}
    comp = nlp.add_pipe("llamaforge_vectors", config=cfg)
    doc = nlp(" ".join(["the llama model is a chat assistant"] * 12))
    n_ids = len(encode_aligned(comp.llama.tokenizer, doc.text, [])[0])
    assert comp.llama.args.max_seq_len == 128 and n_ids > 2 * effective  # several windows
    np.testing.assert_allclose(doc.tensor, windowed_reference(comp.llama, doc, effective), atol=ATOL, rtol=0)


def test_layer_and_pooling_options(tiny_checkpoints):
    nlp = spacy.blank("en")
    cfg = {"model": str(tiny_checkpoints.gguf), "device": "cpu"}
    emb = nlp.add_pipe("llamaforge_vectors", name="emb", config={**cfg, "layer": 0})
    doc = nlp("hello world")
    llama = emb.llama
    ids, _ = encode_aligned(llama.tokenizer, "hello", [])
    expected = llama.model.tok_embeddings.weight[ids].detach().float().numpy()
    np.testing.assert_allclose(doc.tensor[0], expected.mean(0), atol=1e-6)
    nlp.remove_pipe("emb")
    nlp.add_pipe("llamaforge_vectors", name="first", config={**cfg, "layer": 0, "pooling": "first"})
    np.testing.assert_allclose(nlp("hello world").tensor[0], expected[0], atol=1e-6)
    with pytest.raises(ConfigError, match="pooling"):
        nlp.add_pipe("llamaforge_vectors", name="bad", config={**cfg, "pooling": "median"})
    bad_layer = nlp.add_pipe("llamaforge_vectors", name="deep", config={**cfg, "layer": 99})
    with pytest.raises(ConfigError, match="layer=99"):
        bad_layer(nlp.make_doc("hello"))


def test_docs_pickle_with_their_hooks(tiny_nlp):
    doc = tiny_nlp("hello world")
    back = pickle.loads(pickle.dumps(doc))
    np.testing.assert_array_equal(back.vector, doc.vector)
    assert back.similarity(doc) == pytest.approx(1.0, abs=1e-6)


def test_config_round_trip(tiny_nlp, tiny_checkpoints):
    """The pipeline's config rebuilds the same component (what spacy.load does)."""
    rebuilt = spacy.util.load_model_from_config(tiny_nlp.config, auto_fill=True)
    assert rebuilt.pipe_names == ["llamaforge_vectors"]
    text = "hello world"
    np.testing.assert_allclose(rebuilt(text).tensor, tiny_nlp(text).tensor, atol=ATOL)


@pytest.mark.slow
def test_paraphrase_is_closer_than_an_unrelated_sentence(default_llama):
    models.preload(default_llama)
    try:
        nlp = spacy.blank("en")
        nlp.add_pipe("llamaforge_vectors", config={"device": "cpu"})
        triples = [
            ("The cat sat on the mat.", "A cat was sitting on the rug.", "Stock markets fell sharply on Tuesday."),
            ("How do I reset my password?", "What is the way to change my forgotten password?",
             "The river flows into the sea near the old harbour."),
            ("The weather is cold and rainy today.", "Today it is raining and chilly.", "He bought a new laptop for work."),
        ]
        for anchor, paraphrase, unrelated in triples:
            a, p, u = nlp.pipe([anchor, paraphrase, unrelated])
            assert a.similarity(p) > a.similarity(u), (anchor, a.similarity(p), a.similarity(u))
        # word level: the same word in two sentences is closer than two different words
        d1, d2 = nlp("The bank approved my loan."), nlp("The bank raised its interest rates.")
        assert d1[1].similarity(d2[1]) > d1[1].similarity(d2[4])
    finally:
        models.clear_cache()


def test_pipeline_pickles_without_the_loaded_model(tiny_nlp):
    """spaCy pickles pipelines for nlp.pipe(n_process>1); the copy reloads the model itself."""
    expected = tiny_nlp("hello world").tensor  # the model is loaded now
    restored = pickle.loads(pickle.dumps(tiny_nlp))
    comp = restored.get_pipe("llamaforge_vectors")
    assert comp._llama is None
    np.testing.assert_allclose(restored("hello world").tensor, expected, atol=ATOL)
    assert tiny_nlp.get_pipe("llamaforge_vectors")._llama is not None  # the original keeps its model
